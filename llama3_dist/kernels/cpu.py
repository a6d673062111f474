"""Kernels for bfloat16 and float32 models on CPUs: the compiled library of cpu_kernels.cpp where
it can be built, torch otherwise.

On a CPU a decode step of a small model is a few hundred tiny torch ops (each 3-20 us of
dispatch) around GEMVs that torch runs below the memory's speed. cpu_kernels.cpp does each
kernel of the decode path in one call with the reference's arithmetic (float32 math, bfloat16
roundings where the reference's bfloat16 tensors round). It is one portable source written with
vector extensions, built per instruction set with the machine's C++ compiler at first use (as
several translation units compiled in parallel, then linked: see `_compile`) and cached by
source, flags and instruction set:

- avx512: x86-64 with AVX-512 F/BW/VL/DQ (64-byte vectors);
- avx2: x86-64 with AVX2 and FMA (32-byte vectors);
- generic: the base instruction set (SSE2 on x86-64, NEON on aarch64; 16-byte vectors).

The instruction set comes from what torch reports (torch.backends.cpu.get_cpu_capability(), which
ATEN_CPU_CAPABILITY lowers), never from the compiler's guess, so a library never holds an
instruction the CPU lacks; LLAMA3_DIST_CPU_ISA=avx512|avx2|generic picks one of those this CPU
can run (the tests build and check every one of them). Where no library can be built (no
compiler) everything falls back to the torch reference, with one warning.

Linear layers: few rows (decode) go through the library's GEMV, many rows through torch. Half
precision weights on CPUs whose oneDNN has no native bfloat16/float16 GEMM (no avx512_bf16/AMX),
where torch's half-precision GEMM runs at a fraction of its float32 speed, are widened into a
reused float32 buffer (a cheap, exact copy) and multiplied in float32; all accumulate in float32
and round the result once, as a bfloat16 GEMM does.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F

from ..paths import cache_root
from . import reference

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# Below this many rows a product is bound by reading the weight once: the GEMV (measured in
# passes of 8 rows over the weight; one pass since) beats widening it or torch's GEMM.
WIDEN_MIN_ROWS = 16
# Half-precision weights where torch's GEMM for them is not native: from this many rows the weight
# is widened to float32 for one GEMM (a full copy of it each product), below it GEMV passes. The
# GEMV passes were faster up to 32-48 rows and even at 64 (SmolLM2-135M, 284M benchmark model in
# bfloat16, whole prompts on a 2-core AVX2 host: 16 rows 137 -> 263 and 66 -> 163 prompt tok/s).
HALF_WIDEN_MIN_ROWS = 48
GEMV_MAX_ROWS = 8  # the most rows of x a GEMV tile multiplies at once (the fused halves' limit)
# The dense and panel GEMVs (cpu_kernels.cpp's GEMV_ANY_MAX_ROWS) take up to this many rows in one
# call, in groups of GEMV_MAX_ROWS: each tile or panel of weight rows is read from memory once and
# multiplied into every group in turn.
GEMV_ANY_MAX_ROWS = 4096
# Panel weights (the integer GEMV, bfloat16 models) in decode steps stay in the panel GEMV far
# longer than the float GEMV: it reads each panel once for all rows and multiplies bytes (VNNI's
# 64 byte products an instruction), while widening dequantizes the whole weight before its GEMM.
# SmolLM2-135M's shapes (benchmarks/quantized_rows.py, results/cpu-quantized-batch.log), a whole
# layer's projections: where torch's bfloat16 GEMM is native, the panel GEMV 1.5-2.4x faster than
# dequantizing for it at 64-256 rows (the heads, x in 15 bits: 1.3-4.6x up to 128, 0.8-1.4x at
# 256); where it is a float32 GEMM, 1.5-3.4x faster at 16-256 rows (only the int8 head at 256
# rows lost, 0.84x), so there it is never widened.
PANEL_WIDEN_MIN_ROWS = 256
# Prompt rows take the panels with x exact (gemv_grouped's exact_x): a float product per weight and
# row, 1.3-2.6x the integer GEMV's time, so widening for the GEMM wins sooner: from 64 rows where
# torch's bfloat16 GEMM is native (a layer at 32 rows: exact 1.33 ms, widened 1.67; at 64 2.74 and
# 2.57), from 192 where it is a float32 one (128 rows: 11.4 and 13.1 ms; 256: 18.9 and 17.5).
EXACT_PANEL_WIDEN_MIN_ROWS = 64
EXACT_PANEL_WIDEN_MIN_ROWS_SLOW_GEMM = 192
# 4-bit panels where the library multiplies prompt rows by AVX-512 BF16 dot products (Zen 4,
# Sapphire Rapids on): SmolLM2-135M int4 prompts, exact / widened, 64 tokens 52 / 80 ms, 128: 102 /
# 127, 256: 210-217 / 228-232, 384: 332-339 / 352-362.
EXACT_DOT_PANEL_WIDEN_MIN_ROWS = 256
# The panel layouts whose GEMV also takes x exact (gemv_grouped's exact_x: prompt rows); the heads'
# (x in 15 bits) do not need it.
EXACT_X_LAYOUTS = ("panels4", "panels8")
BASE_FLAGS = ("-O3", "-ffp-contract=fast", "-fno-math-errno", "-fPIC")
OPENMP_FLAG = "-fopenmp"


@dataclass(frozen=True)
class InstructionSet:
    name: str
    vector_bytes: int
    x86_flags: tuple[str, ...]  # compiler flags on x86-64; other machines build their base ISA
    rank: int  # a CPU that runs one instruction set runs every lower-ranked one


INSTRUCTION_SETS = {
    isa.name: isa
    for isa in (
        InstructionSet("avx512", 64, ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"), 2),
        InstructionSet("avx2", 32, ("-mavx2", "-mfma", "-mf16c"), 1),
        InstructionSet("generic", 16, (), 0),
    )
}
# torch.backends.cpu.get_cpu_capability() -> the best of ours that CPU runs.
_FROM_TORCH = {"AVX512": "avx512", "AVX2": "avx2"}
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

_P, _I64, _F32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
# name -> (argument types, return type); each exists as NAME_bf16 and NAME_f32.
_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "gemv": ([_P, _P, _P, _P, _I64, _I64, _I64], _INT),
    "rms_norm": ([_P, _P, _P, _F32, _P, _P, _I64, _I64], None),
    "rotary": ([_P, _P, _I64, _I64, _P, _I64, _I64, _I64, _P, _I64, _INT, _I64], None),
    "store_kv": ([_P, _I64, _P, _I64, _P, _P, _P, _I64, _I64], None),
    "decode_attention": ([_P, _I64, _P, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64, _F32, _I64], None),
    "silu_and_mul": ([_P, _P, _I64, _I64], None),
}
_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}
_FUSED_SIGNATURES: dict[
    str, list[Any]
] = {  # name -> argument types; each returns 0, or -1 for a batch over GEMV_MAX_ROWS
    "attention_block": [_P, _P, _P, _P, _P, _P, _P],
    "mlp_block": [_P, _I64, _P, _P, _P],
    "decode_layers": [_P, _P, _P, _P, _I64, _P, _P, _P, _P, _P, _F32, _P, _P, _I64, _P, _P, _I64, _P, _P, _I64, _I64],
}


class DecodeStep(ctypes.Structure):
    """cpu_kernels.cpp's DecodeStep: one decode step's metadata, shared by every layer."""

    _fields_ = [
        ("positions", _P),
        ("slots", _P),
        ("block_tables", _P),
        ("context_lens", _P),
        ("batch", _I64),
        ("max_blocks", _I64),
        ("cos_sin", _P),
    ]


class Weight(ctypes.Structure):
    """cpu_kernels.cpp's Weight: a projection's dense rows (bits 0) or panels (4/8 bits with x in
    one int8 digit; the LM head's 6/8 bits with x in two)."""

    _fields_ = [
        ("dense", _P),
        ("words", _P),
        ("scales", _P),
        ("offsets", _P),
        ("factors", _P),
        ("bits", _I64),
        ("group_size", _I64),
        ("digits", _I64),
    ]


class AttentionBlock(ctypes.Structure):
    """cpu_kernels.cpp's AttentionBlock: one layer's attention half on this rank."""

    _fields_ = [
        ("norm_weight", _P),
        ("qkv_weight", Weight),
        ("qkv_bias", _P),
        ("o_weight", Weight),
        ("hidden", _I64),
        ("heads", _I64),
        ("kv_heads", _I64),
        ("head_dim", _I64),
        ("rotary_dim", _I64),
        ("block_size", _I64),
        ("window", _I64),
        ("eps", _F32),
        ("scale", _F32),
        ("interleaved", ctypes.c_int32),
    ]


class MlpBlock(ctypes.Structure):
    """cpu_kernels.cpp's MlpBlock: one layer's MLP half on this rank."""

    _fields_ = [
        ("norm_weight", _P),
        ("gate_up_weight", Weight),
        ("gate_up_bias", _P),
        ("down_weight", Weight),
        ("hidden", _I64),
        ("intermediate", _I64),
        ("eps", _F32),
    ]


_ELEMENT_BYTES = {torch.bfloat16: 2, torch.float32: 4}


@functools.cache
def host_isa() -> str:
    """The best instruction set of ours that this CPU runs, as torch reports the CPU (so
    ATEN_CPU_CAPABILITY=avx2 on an AVX-512 host gives avx2; torch reads it once, at start)."""
    if not _X86:
        return "generic"
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "generic"
    return _FROM_TORCH.get(capability, "generic")


def executable_isas() -> list[str]:
    """Every instruction set of ours this CPU runs, best first."""
    top = INSTRUCTION_SETS[host_isa()].rank
    return [isa.name for isa in sorted(INSTRUCTION_SETS.values(), key=lambda i: -i.rank) if isa.rank <= top]


def selected_isa() -> str:
    """LLAMA3_DIST_CPU_ISA if set (it must be one this CPU runs), else host_isa()."""
    wanted = os.environ.get("LLAMA3_DIST_CPU_ISA", "").strip().lower()
    if not wanted or wanted == "auto":
        return host_isa()
    runnable = executable_isas()
    if wanted not in runnable:
        known = "|".join(INSTRUCTION_SETS)
        raise ValueError(
            f"LLAMA3_DIST_CPU_ISA={wanted!r}: this CPU runs {', '.join(runnable)} "
            f"(torch reports {host_isa()}); the accepted values are auto|{known}"
        )
    return wanted


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX or install g++ or clang++)")
    return compiler


def _source_parts(source: bytes) -> int:
    """How many translation units cpu_kernels.cpp splits into (its LLAMA3_DIST_PARTS line)."""
    match = re.search(rb"^#define LLAMA3_DIST_PARTS (\d+)", source, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{SOURCE.name} defines no LLAMA3_DIST_PARTS")
    return int(match.group(1))


def _compile(compiler: str, flags: list[str], target: Path, parts: int) -> str | None:
    """Compiles the source's `parts` translation units in parallel (as many at once as this
    process may use CPUs: in one unit the build takes about a minute on one core) and links them
    into `target`, through a temporary file and an atomic rename, so that a reader never sees
    half a library. Returns the compiler's error output on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".building-") as tmp:
        objects = [Path(tmp) / f"part{part}.o" for part in range(parts)]

        def compile_part(part: int) -> subprocess.CompletedProcess:
            command = [compiler, *flags, f"-DLLAMA3_DIST_PART={part}", "-c", "-o", str(objects[part]), str(SOURCE)]
            return subprocess.run(command, capture_output=True, text=True)

        with concurrent.futures.ThreadPoolExecutor(min(parts, _usable_cpus())) as pool:
            compiled = list(pool.map(compile_part, range(parts)))
        failed = next((done for done in compiled if done.returncode != 0), None)
        if failed is None:
            library = Path(tmp) / "library.so"
            failed = subprocess.run(
                [compiler, *flags, "-shared", "-o", str(library), *map(str, objects)], capture_output=True, text=True
            )
            if failed.returncode == 0:
                os.replace(library, target)
                return None
        return failed.stderr[-2000:] or f"exit status {failed.returncode}"


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Held while a library is built: the ranks of a tensor-parallel group start together, and
    one build at a time beats several that share the CPUs (the others then find it built)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock_file:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; the atomic rename still keeps readers safe
            yield
            return
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks (some network mounts): build unlocked
            log.debug("no lock on %s (%s): building without one", path, e)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def build(isa: str) -> Path:
    """Compiles cpu_kernels.cpp for `isa` into the cache (once per source, compiler, flags and
    instruction set); returns the library's path. Without OpenMP in the compiler (Apple's clang)
    the library is built single-threaded, with a warning."""
    spec = INSTRUCTION_SETS[isa]
    compiler = _compiler()
    flags = [*BASE_FLAGS, *(spec.x86_flags if _X86 else ()), f"-DVECTOR_BYTES={spec.vector_bytes}"]
    # The integer GEMV's byte dot products: one instruction with VNNI, three with AVX-512BW alone
    # (LLAMA3_DIST_CPU_VNNI=0 builds those, to test them on a VNNI machine); decode attention's
    # bfloat16 scores: one instruction per 32 features with AVX-512 BF16 (LLAMA3_DIST_CPU_BF16=0
    # builds the float path, likewise).
    if isa == "avx512" and _X86 and "avx512_vnni" in _cpu_features() and os.environ.get("LLAMA3_DIST_CPU_VNNI") != "0":
        flags.append("-mavx512vnni")
    if isa == "avx512" and _X86 and "avx512_bf16" in _cpu_features() and os.environ.get("LLAMA3_DIST_CPU_BF16") != "0":
        flags.append("-mavx512bf16")
    source = SOURCE.read_bytes()
    parts = _source_parts(source)
    errors: list[str] = []
    for extra in ([OPENMP_FLAG], []):
        key = source + "\0".join([compiler, *flags, *extra]).encode()
        target = cache_root() / "kernels" / f"cpu_kernels-{isa}-{hashlib.sha256(key).hexdigest()[:16]}.so"
        if target.exists():
            return target
        with _build_lock(target.parent / ".build.lock"):
            if target.exists():  # built by another process while this one waited
                return target
            log.info(
                "Building the CPU kernel library for %s with %s (once per machine and version: ~40 s on "
                "2 cores, less on more): %s",
                isa,
                compiler,
                target,
            )
            start = time.perf_counter()
            error = _compile(compiler, [*flags, *extra], target, parts)
        if error is None:
            log.info("Built the CPU kernel library for %s in %.1f s", isa, time.perf_counter() - start)
            if not extra:
                log.warning(
                    "CPU kernels (%s) built without OpenMP, so they run on one thread: %s cannot "
                    "build with -fopenmp:\n%s",
                    isa,
                    compiler,
                    errors[0],
                )
            return target
        errors.append(error)
    raise RuntimeError(f"{compiler} failed to build {SOURCE.name} for {isa}:\n{errors[-1]}")


class KernelLibrary:
    """One compiled variant of cpu_kernels.cpp: the kernels of kernels/__init__.py for bfloat16
    and float32 CPU tensors (prefill attention stays in torch: it has many rows per op, so
    torch's dispatch cost is spread thin there)."""

    def __init__(self, isa: str):
        self.isa = isa
        self._lib = ctypes.CDLL(str(build(isa)))
        built_for = self._lib.vector_bytes()
        if built_for != INSTRUCTION_SETS[isa].vector_bytes:
            raise RuntimeError(f"the {isa} kernel library was built for {built_for}-byte vectors")
        self._functions: dict[tuple[str, torch.dtype], Any] = {}  # ctypes function pointers
        for name, (argtypes, restype) in _SIGNATURES.items():
            for dtype, suffix in _SUFFIX.items():
                function = getattr(self._lib, f"{name}_{suffix}")
                function.argtypes, function.restype = argtypes, restype
                self._functions[name, dtype] = function
        for name, argtypes in _FUSED_SIGNATURES.items():
            for dtype, suffix in _SUFFIX.items():
                function = getattr(self._lib, f"{name}_{suffix}")
                function.argtypes, function.restype = argtypes, _INT
                self._functions[name, dtype] = function
        self._lib.sum_floats.argtypes, self._lib.sum_floats.restype = [_P, _I64], _F32
        self._lib.apply_token_bitmask.argtypes = [_P, _I64, _I64, _P, _P, _I64, _I64]
        self._lib.apply_token_bitmask.restype = None
        self._lib.token_bitmask_ids.argtypes, self._lib.token_bitmask_ids.restype = [_P, _I64, _I64, _P, _I64], _I64
        self._lib.sample_logits.argtypes = [_P, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _P]
        self._lib.sample_logits.restype = None
        self._lib.logprobs_rows.argtypes = [_P, _I64, _I64, _I64, _P, _I64, _P, _P, _P, _P]
        self._lib.logprobs_rows.restype = None
        for dtype, suffix in _SUFFIX.items():
            function = getattr(self._lib, f"gemv_int8_{suffix}")
            function.argtypes, function.restype = [_P, _P, _P, _P, _P, _I64, _I64, _I64], _INT
            self._functions["gemv_int8", dtype] = function
            for layout in ("q4", "q8", "panels4", "panels8", "panels8x15", "panels6x15"):
                # panel layouts take one pointer more: coded scales' factors (or null)
                pointers = [_P] * (2 if layout.startswith("q") else 3)
                exact = [f"gemv_{layout}_exact"] if layout in EXACT_X_LAYOUTS else []
                for name in (f"gemv_{layout}", *exact):
                    function = getattr(self._lib, f"{name}_{suffix}")
                    function.argtypes, function.restype = [_P, _P, *pointers, _P, _P, _I64, _I64, _I64, _I64], _INT
                    self._functions[name, dtype] = function
                # panels8x15 holds panels8's weights: one dequantize serves both
                function = getattr(self._lib, f"dequantize_{layout.removesuffix('x15')}_{suffix}")
                function.argtypes, function.restype = [_P, *pointers, _P, _I64, _I64, _I64], _INT
                self._functions[f"dequantize_{layout}", dtype] = function

    @property
    def integer_dot(self) -> bool:
        """Whether this build has byte dot-product instructions (the 4-bit integer GEMV's)."""
        return bool(self._lib.native_dot4())

    @functools.cached_property
    def bf16_dot_panels(self) -> bool:
        """Whether prompt rows (x exact) meet 4-bit panels by AVX-512 BF16 dot products here (read
        once: grouped_linear asks at every prompt product)."""
        return bool(self._lib.bf16_dot_panels())

    @property
    def lanes(self) -> int:
        """float32 lanes per vector: the unit of the grouped weights' layout (pack_grouped)."""
        return INSTRUCTION_SETS[self.isa].vector_bytes // 4

    def __repr__(self) -> str:
        return f"KernelLibrary({self.isa!r})"

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if (weight is not None and weight.dtype != x.dtype) or (residual is not None and residual.dtype != x.dtype):
            return reference.rms_norm(x, weight, eps, residual)
        x = x.contiguous()
        width = x.shape[-1]
        out = torch.empty_like(x)
        hidden = x if residual is None else torch.empty_like(x)
        residual = None if residual is None else residual.contiguous()
        self._functions["rms_norm", x.dtype](
            x.data_ptr(),
            None if residual is None else residual.data_ptr(),
            None if weight is None else weight.data_ptr(),
            eps,
            out.data_ptr(),
            hidden.data_ptr(),
            x.numel() // width,
            width,
        )
        return out, hidden

    def rotary_embedding(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, interleaved: bool
    ) -> None:
        if not (_rows(q) and _rows(k)) or k.dtype != q.dtype or cos_sin_cache.dtype != torch.float32:
            return reference.rotary_embedding(positions, q, k, cos_sin_cache, interleaved)
        positions = positions.to(torch.int64).contiguous()
        cos_sin = cos_sin_cache.contiguous()
        self._functions["rotary", q.dtype](
            positions.data_ptr(),
            q.data_ptr(),
            q.stride(0),
            q.shape[1],
            k.data_ptr(),
            k.stride(0),
            k.shape[1],
            q.shape[2],
            cos_sin.data_ptr(),
            cos_sin.shape[1],
            int(interleaved),
            q.shape[0],
        )

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        intermediate = x.shape[-1] // 2
        out = torch.empty(*x.shape[:-1], intermediate, dtype=x.dtype)
        self._functions["silu_and_mul", x.dtype](x.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], intermediate)
        return out

    def store_kv_cache(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        if not (
            _rows(k)
            and _rows(v)
            and k_cache.is_contiguous()
            and v_cache.is_contiguous()
            and k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
        ):
            return reference.store_kv_cache(k, v, k_cache, v_cache, slot_mapping)
        slots = slot_mapping.to(torch.int64).contiguous()
        self._functions["store_kv", k.dtype](
            k.data_ptr(),
            k.stride(0),
            v.data_ptr(),
            v.stride(0),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            slots.data_ptr(),
            k.shape[0],
            k.shape[1] * k.shape[2],
        )

    def paged_decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        if not (
            _rows(q)
            and k_cache.is_contiguous()
            and v_cache.is_contiguous()
            and q.dtype == k_cache.dtype == v_cache.dtype
        ):
            return reference.paged_decode_attention(
                q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window
            )
        batch, query_heads, head_dim = q.shape
        tables = block_tables.to(torch.int32).contiguous()
        lengths = context_lens.to(torch.int32).contiguous()
        out = torch.empty(batch, query_heads, head_dim, dtype=q.dtype)
        self._functions["decode_attention", q.dtype](
            q.data_ptr(),
            q.stride(0),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            tables.data_ptr(),
            tables.shape[1],
            lengths.data_ptr(),
            out.data_ptr(),
            batch,
            query_heads,
            k_cache.shape[2],
            head_dim,
            k_cache.shape[1],
            scale,
            sliding_window or 0,
        )
        return out

    @staticmethod
    def prefill_attention(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        query_start_loc: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
        sliding_window: int | None = None,
        max_query_len: int | None = None,
    ) -> torch.Tensor:
        """reference.prefill_attention's causal attention of a ragged batch over its cached K/V,
        through torch's float32 scaled_dot_product_attention (its CPU flash attention: blocks of
        keys with an online softmax, the masked-out triangle skipped), where the reference forms
        every query block's whole score matrix and masks it. SmolLM2's heads, one 2000-token
        prompt: 160 -> 39 ms a layer; 512 tokens after 1488 cached ones: 37 -> 18 ms. Float32
        like the reference (torch's bfloat16 path was no faster here, and further from it)."""
        return reference.attend_ragged(
            q,
            k_cache,
            v_cache,
            block_tables,
            query_start_loc,
            context_lens,
            lambda rows, k, v, first: _flash_attend(rows, k, v, first, scale, sliding_window),
        )

    def gemv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """x @ weight.T + bias, every row of x in one pass over the weight; None where the library
        does not serve these tensors (other dtypes, mixed dtypes, strided weights)."""
        if weight.dtype != x.dtype:
            return None
        return self._gemv("gemv", x, weight, bias)

    def gemv_int8(
        self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """x @ (weight * scale[:, None]).T + bias for int8 weights and float32 scales, every row of x
        in one pass; None where the library does not serve these tensors."""
        if weight.dtype != torch.int8 or scale.dtype != torch.float32 or not scale.is_contiguous():
            return None
        return self._gemv("gemv_int8", x, weight, bias, scale)

    def _gemv(
        self,
        name: str,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Both GEMVs: the C function takes (x, w, [scale,] bias, y, m, n, k) and returns nonzero
        for a row count out of range."""
        dtype = x.dtype
        if (
            dtype not in _SUFFIX
            or not weight.is_contiguous()
            or (bias is not None and (bias.dtype != dtype or not bias.is_contiguous()))
        ):
            return None
        weights = (weight.data_ptr(),) if scale is None else (weight.data_ptr(), scale.data_ptr())
        return self._in_passes(name, x, weight.shape[0], weights, bias, pass_rows=GEMV_ANY_MAX_ROWS)

    def _in_passes(
        self,
        name: str,
        x: torch.Tensor,
        n: int,
        weights: tuple[int | None, ...],
        bias: torch.Tensor | None,
        trailing: tuple[int, ...] = (),
        pass_rows: int = GEMV_MAX_ROWS,
    ) -> torch.Tensor:
        """Every GEMV: the C function `name` takes (x, *weights, bias, y, m, n, k, *trailing) for m
        up to pass_rows rows of x and returns nonzero for arguments out of range; x's rows go
        through in passes of that many."""
        dtype, k = x.dtype, x.shape[-1]
        x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, k).contiguous()
        rows = x2.shape[0]
        out = torch.empty(rows, n, dtype=dtype)
        size = _ELEMENT_BYTES[dtype]
        function = self._functions[name, dtype]
        bias_ptr = None if bias is None else bias.data_ptr()
        x_ptr, out_ptr = x2.data_ptr(), out.data_ptr()
        for start in range(0, rows, pass_rows):
            m = min(pass_rows, rows - start)
            if function(x_ptr + start * k * size, *weights, bias_ptr, out_ptr + start * n * size, m, n, k, *trailing):
                raise ValueError(f"{name}: {m} rows (1 to {pass_rows} a pass) or {trailing} out of range")
        return out if x.dim() == 2 else out.view(*x.shape[:-1], n)

    def gemv_grouped(
        self, x: torch.Tensor, weight: PackedGroupWeights, bias: torch.Tensor | None, exact_x: bool = False
    ) -> torch.Tensor:
        """x @ dequantized(weight).T + bias for few rows: the integers are read as they are stored
        and dequantized in registers, GEMV_MAX_ROWS rows a pass over the weight, or for panel
        layouts up to GEMV_ANY_MAX_ROWS in one (each panel read once, multiplied into every row).
        Panels multiply x rounded to int8 blocks unless exact_x (panels4 and panels8 only: prompt
        rows, decode_rows), which multiplies the dequantized weights with x in float32."""
        if weight.lanes != self.lanes:
            raise ValueError(f"weights packed for {weight.lanes} lanes, this library ({self.isa}) takes {self.lanes}")
        if exact_x and weight.layout not in EXACT_X_LAYOUTS:
            raise ValueError(f"exact_x: {' or '.join(EXACT_X_LAYOUTS)} weights only, not {weight.layout}")
        weights = (weight.words.data_ptr(), *weight.scale_pointers())
        bias = None if bias is None else bias.to(x.dtype).contiguous()
        name = f"gemv_{weight.layout}_exact" if exact_x else f"gemv_{weight.layout}"
        pass_rows = GEMV_ANY_MAX_ROWS if weight.layout.startswith("panels") else GEMV_MAX_ROWS
        return self._in_passes(name, x, weight.shape[0], weights, bias, (weight.group_size,), pass_rows)

    def dequantize_grouped(
        self, weight: PackedGroupWeights, dtype: torch.dtype, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The weight as `dtype` [n, k] (bfloat16 or float32), for products of many rows; into
        `out` (contiguous, of that shape and dtype) when given."""
        n, k = weight.shape
        if out is None:
            out = torch.empty(n, k, dtype=dtype)
        elif out.shape != (n, k) or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"dequantize_grouped: out must be a contiguous {dtype} [{n}, {k}] tensor")
        function = self._functions[f"dequantize_{weight.layout}", dtype]
        if function(weight.words.data_ptr(), *weight.scale_pointers(), out.data_ptr(), n, k, weight.group_size):
            raise ValueError(f"dequantize_{weight.layout}: group size {weight.group_size} out of range")
        return out

    def apply_token_bitmask(self, logits: torch.Tensor, rows: np.ndarray, words: np.ndarray) -> None:
        """In place on float32 logits [B, V] (rows contiguous): in each of `rows`, tokens whose
        bit is clear in that row of `words` (int32 [len(rows), W]) become -inf, as do tokens at or
        past W * 32. The rows must be in range (checked here: the library does not)."""
        assert logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1
        rows = np.ascontiguousarray(rows, np.int64)
        words = np.ascontiguousarray(words, np.int32)
        if len(rows) != len(words) or (len(rows) and not 0 <= rows.min() <= rows.max() < logits.shape[0]):
            raise ValueError(f"bitmask rows {rows.tolist()} do not fit logits of {logits.shape[0]} rows")
        self._lib.apply_token_bitmask(
            logits.data_ptr(), logits.stride(0), logits.shape[1], rows.ctypes.data, words.ctypes.data,
            len(rows), words.shape[1],
        )  # fmt: skip

    def token_bitmask_ids(self, words: np.ndarray, vocab: int, num_set: int) -> np.ndarray:
        """The token ids below vocab (ascending) whose bits are set in one bitmask row `words`
        (int32 [W]) with num_set bits set in all."""
        words = np.ascontiguousarray(words, np.int32)
        ids = np.empty(num_set, np.int64)
        found = self._lib.token_bitmask_ids(words.ctypes.data, len(words), vocab, ids.ctypes.data, num_set)
        if found > num_set:
            raise ValueError(f"the bitmask row has {found} bits set, not {num_set}")
        return ids[:found]

    def sample_logits(
        self,
        logits: torch.Tensor,
        temperature: np.ndarray,
        top_k: np.ndarray,
        top_p: np.ndarray,
        min_p: np.ndarray,
        u: np.ndarray,
        weights: torch.Tensor,
    ) -> np.ndarray:
        """One token id per row of float32 logits [R, V] (rows contiguous; temperatures > 0): the
        weights exp((x - max) / T) into `weights` (contiguous [R, V]; may be `logits`), then the
        tokens min_p, top_k (0 or >= V: off) and top_p (>= 1: off) keep, as the sampler's torch
        path keeps them, drawn with u [R] in [0, 1) in id order. Each row's weights are binned by
        their top bits, and only the bin holding a filter's cut is sorted (the torch path sorts
        whole rows or candidate blocks). A row with no finite logit draws token 0."""
        assert logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1
        rows, v = logits.shape
        assert weights.dtype == torch.float32 and weights.shape == (rows, v) and weights.is_contiguous()
        settings: dict[str, np.ndarray] = {
            "temperature": np.ascontiguousarray(temperature, np.float32),
            "top_k": np.ascontiguousarray(top_k, np.int64),
            "top_p": np.ascontiguousarray(top_p, np.float32),
            "min_p": np.ascontiguousarray(min_p, np.float32),
            "u": np.ascontiguousarray(u, np.float64),
        }
        if any(len(a) != rows for a in settings.values()):
            lengths = ", ".join(f"{len(a)} {name}" for name, a in settings.items())
            raise ValueError(f"sample_logits: {rows} rows of logits but {lengths}")
        out = np.empty(rows, np.int64)
        self._lib.sample_logits(
            logits.data_ptr(), rows, v, logits.stride(0), *(a.ctypes.data for a in settings.values()),
            weights.data_ptr(), out.ctypes.data,
        )  # fmt: skip
        return out

    def logprobs_rows(
        self, logits: torch.Tensor, tokens: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For float32 logits [R, V] (rows contiguous) and one chosen token per row: its
        log-probability [R] and rank [R] (1 + the number of logits above its own), and the k most
        likely tokens' ids and log-probabilities [R, k] (descending; ties: lower id first)."""
        assert logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1
        rows, v = logits.shape
        tokens = np.ascontiguousarray(tokens, np.int64)
        if len(tokens) != rows or (rows and not 0 <= tokens.min() <= tokens.max() < v):
            raise ValueError(f"logprobs_rows: {rows} rows of {v} logits, chosen tokens {tokens.tolist()}")
        chosen, ranks = np.empty(rows, np.float32), np.empty(rows, np.int64)
        top_ids, top_logprobs = np.empty((rows, k), np.int64), np.empty((rows, k), np.float32)
        self._lib.logprobs_rows(
            logits.data_ptr(), rows, v, logits.stride(0), tokens.ctypes.data, k, chosen.ctypes.data,
            ranks.ctypes.data, top_ids.ctypes.data, top_logprobs.ctypes.data,
        )  # fmt: skip
        return chosen, ranks, top_ids, top_logprobs

    def sum_floats(self, x: torch.Tensor) -> float:
        """Sum of a contiguous float32 tensor read once by all threads (a streaming-read probe)."""
        assert x.dtype == torch.float32 and x.is_contiguous()
        return self._lib.sum_floats(x.data_ptr(), x.numel())


ProjectionWeight: TypeAlias = "torch.Tensor | PackedGroupWeights"


class FusedDecodeLayer:
    """One decoder layer's two halves for decode steps of up to GEMV_MAX_ROWS sequences, each one
    call of the library: the per-kernel path's kernels in its order, so bit-identical to it.
    Built from the layer's loaded weights: contiguous, of the model's dtype, or quantized in the
    integer GEMV's panels (bfloat16 models)."""

    def __init__(
        self,
        kernels: KernelLibrary,
        *,
        input_norm: torch.Tensor | None,
        qkv: ProjectionWeight,
        qkv_bias: torch.Tensor | None,
        o_proj: ProjectionWeight,
        post_norm: torch.Tensor | None,
        gate_up: ProjectionWeight,
        gate_up_bias: torch.Tensor | None,
        down: ProjectionWeight,
        heads: int,
        kv_heads: int,
        head_dim: int,
        rotary_dim: int,
        interleaved: bool,
        block_size: int,
        sliding_window: int | None,
        eps: float,
        scale: float,
    ):
        given = [
            t for t in (input_norm, qkv, qkv_bias, o_proj, post_norm, gate_up, gate_up_bias, down) if t is not None
        ]
        packed = [t for t in given if isinstance(t, PackedGroupWeights)]
        tensors = [t for t in given if isinstance(t, torch.Tensor)]
        if not tensors:
            raise ValueError("fused decode needs a dense tensor of the model's dtype (a norm weight or a bias)")
        self.dtype = tensors[0].dtype
        if any(t.dtype != self.dtype or not t.is_contiguous() or t.device.type != "cpu" for t in tensors):
            raise ValueError("fused decode needs contiguous CPU weights of one dtype")
        if any(p.layout not in ("panels4", "panels8") or p.lanes != kernels.lanes for p in packed):
            raise ValueError("fused decode takes quantized weights in this library's integer-GEMV panels only")
        self._tensors = [*tensors, *packed]  # the structs below point into them
        # Whether a projection runs the integer GEMV, which rounds x to int8 blocks: dense
        # weights take x exact (as float32), so a layer without panels never rounds.
        self.panel_bits = {p.bits for p in packed}  # FusedDecodeStack.takes_rows bounds prompt rows by them
        self.rounds = bool(self.panel_bits)
        # Whether every projection is in panels (the integer GEMV; else some run the dense one:
        # FusedDecodeStack.takes_rows bounds the rows of each kind).
        self.all_panels = all(isinstance(t, PackedGroupWeights) for t in (qkv, o_proj, gate_up, down))
        self.hidden = qkv.shape[1]
        self.kernels = kernels
        self._attention_function = kernels._functions["attention_block", self.dtype]
        self._mlp_function = kernels._functions["mlp_block", self.dtype]
        self.attention_block = AttentionBlock(
            _pointer(input_norm),
            _weight(qkv),
            _pointer(qkv_bias),
            _weight(o_proj),
            self.hidden,
            heads,
            kv_heads,
            head_dim,
            rotary_dim,
            block_size,
            sliding_window or 0,
            eps,
            scale,
            int(interleaved),
        )
        self.mlp_block = MlpBlock(
            _pointer(post_norm),
            _weight(gate_up),
            _pointer(gate_up_bias),
            _weight(down),
            self.hidden,
            gate_up.shape[0] // 2,
            eps,
        )

    @staticmethod
    def step(
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        cos_sin: torch.Tensor,
    ) -> tuple[DecodeStep, list[torch.Tensor]]:
        """The step's DecodeStep, and the tensors it points into (keep them alive with it)."""
        tensors = [
            _contiguous(positions, torch.int64),
            _contiguous(slot_mapping, torch.int64),
            _contiguous(block_tables, torch.int32),
            _contiguous(context_lens, torch.int32),
            _contiguous(cos_sin, torch.float32),
        ]
        positions, slots, tables, lengths, cos_sin = tensors
        return DecodeStep(
            positions.data_ptr(),
            slots.data_ptr(),
            tables.data_ptr(),
            lengths.data_ptr(),
            positions.shape[0],
            tables.shape[1],
            cos_sin.data_ptr(),
        ), tensors

    def attention(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        step: DecodeStep,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the attention half's output before any all-reduce, the residual stream x + residual).
        residual is updated in place."""
        x = x.contiguous()
        out = torch.empty_like(x)
        if self._attention_function(
            ctypes.byref(self.attention_block),
            ctypes.byref(step),
            x.data_ptr(),
            _pointer(residual),
            out.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
        ):
            raise ValueError(f"fused decode takes 1 to {GEMV_MAX_ROWS} sequences, got {step.batch}")
        return out, x if residual is None else residual

    def mlp(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the MLP half's output before any all-reduce, x + residual); residual updated in place."""
        x = x.contiguous()
        out = torch.empty_like(x)
        if self._mlp_function(
            ctypes.byref(self.mlp_block), x.shape[0], x.data_ptr(), residual.data_ptr(), out.data_ptr()
        ):
            raise ValueError(f"fused decode takes 1 to {GEMV_MAX_ROWS} rows, got {x.shape[0]}")
        return out, residual


HEAD_LAYOUTS = ("panels4", "panels8", "panels8x15", "panels6x15")  # the LM head forms the fused stack runs


@dataclass(frozen=True)
class StackOutput:
    """FusedDecodeStack's results: with a final norm, `first` is the normed hidden state and
    `second` the hidden state (as the final norm returns them), else the last layer's output and
    the residual stream beside it; with a head, the float32 logits [m, vocab] of every row."""

    first: torch.Tensor
    second: torch.Tensor
    logits: torch.Tensor | None = None


class FusedDecodeStack:
    """Every decoder layer of a decode step in one call of the library (a model on one rank:
    no all-reduce between the halves): the layers' halves in their order, so bit-identical to
    calling them one by one, without returning to Python twice a layer. With final_norm (the
    model's final RMS norm: its weight, or None for none, and eps) it runs in the same call, and
    with a head too (the LM head's weight: dense rows of the layers' dtype or HEAD_LAYOUTS panels,
    [rows >= vocab, hidden]) the logits of the first `vocab` rows, as the head's own GEMV and a
    float() give them."""

    def __init__(
        self,
        layers: list[FusedDecodeLayer],
        final_norm: tuple[torch.Tensor | None, float] | None = None,
        head: ProjectionWeight | None = None,
        vocab: int = 0,
        embedding: torch.Tensor | None = None,
    ):
        first = layers[0]
        if any(layer.kernels is not first.kernels or layer.dtype != first.dtype for layer in layers):
            raise ValueError("fused decode layers of one library and dtype")
        if final_norm is not None and final_norm[0] is not None and final_norm[0].dtype != first.dtype:
            raise ValueError(f"the final norm's weight is {final_norm[0].dtype}, the layers' {first.dtype}")
        if head is not None:
            if final_norm is None:
                raise ValueError("a fused head takes the final norm's output: give final_norm too")
            if not fused_head_serves(head, first.kernels, first.dtype):
                raise ValueError(
                    f"a fused head is dense contiguous {first.dtype} rows or {', '.join(HEAD_LAYOUTS)} panels "
                    f"of this library's {first.kernels.lanes} lanes"
                )
            if head.shape[1] != first.hidden or not 0 < vocab <= head.shape[0]:
                raise ValueError(f"head {tuple(head.shape)} for hidden size {first.hidden} and vocab {vocab}")
        if embedding is not None and not (
            embedding.dtype == first.dtype
            and embedding.is_contiguous()
            and embedding.device.type == "cpu"
            and embedding.dim() == 2
            and embedding.shape[1] == first.hidden
        ):
            raise ValueError(
                f"a fused embedding is contiguous {first.dtype} rows of {first.hidden} features on the CPU, got "
                f"{embedding.dtype} {tuple(embedding.shape)} on {embedding.device}"
            )
        self.final_norm = final_norm
        self.head = head
        self.vocab = vocab
        self.embedding = embedding  # with it, a step may give token ids instead of embedded rows
        # Whether the call rounds x anywhere: a layer's integer GEMV, or a head in panels (x in 15
        # bits). Without, it computes a prompt's rows exactly as the per-kernel path does.
        self.rounds = any(layer.rounds for layer in layers) or isinstance(head, PackedGroupWeights)
        # Whether any weight is dense (the library's GEMV; `rounds`: any in panels).
        self._dense = any(not layer.all_panels for layer in layers) or isinstance(head, torch.Tensor)
        # The layers' panel widths (the head is left out of prompt steps): they bound prompt rows.
        self._panel_bits = set().union(*(layer.panel_bits for layer in layers))
        # The head's outputs in the layers' dtype, before widening: never leave the call, so one
        # buffer serves every step (a fresh one would cost its page faults each step); it grows
        # to the most rows a step has had.
        self._head_out = None if head is None else torch.empty(GEMV_MAX_ROWS, head.shape[0], dtype=first.dtype)
        self._head_struct = None if head is None else _weight(head)
        self._head_rows = 0 if head is None else head.shape[0]
        self._layers = layers  # the structs below point into their tensors
        self._function = first.kernels._functions["decode_layers", first.dtype]
        self._attention = (AttentionBlock * len(layers))(*(layer.attention_block for layer in layers))
        self._mlp = (MlpBlock * len(layers))(*(layer.mlp_block for layer in layers))
        self._cache_pointers: tuple[list, Any, Any] | None = None

    def takes_rows(self, rows: int, decode: bool) -> bool:
        """Whether a step of `rows` rows (decode rows rounded to int8 blocks, or prompt rows) is
        best run here: where the per-kernel path would multiply them by the same GEMVs too (below
        dense_gemv_rows for dense weights, below where grouped_linear dequantizes panels for a
        GEMM), so that one call replaces a dozen returns to Python a layer."""
        if rows <= GEMV_MAX_ROWS:
            return True
        first = self._layers[0]
        if self._dense and rows >= dense_gemv_rows(first.dtype):
            return False
        if not self.rounds:
            return True
        if decode:
            widen_from = decode_panel_widen_rows(first.dtype)
        else:
            widen_from = min(
                (prompt_panel_widen_rows(first.dtype, bits, first.kernels) for bits in self._panel_bits), default=None
            )
        return widen_from is None or rows < widen_from

    def _caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Any, Any]:
        """The caches' pointers as C arrays, kept while the worker passes the same cache list."""
        if self._cache_pointers is None or self._cache_pointers[0] is not kv_caches:
            pointers = ctypes.c_void_p * len(self._layers)
            self._cache_pointers = (
                kv_caches,
                pointers(*(k.data_ptr() for k, _ in kv_caches)),
                pointers(*(v.data_ptr() for _, v in kv_caches)),
            )
        return self._cache_pointers[1], self._cache_pointers[2]

    def __call__(
        self,
        x: torch.Tensor | None,
        step: DecodeStep,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        tokens: torch.Tensor | None = None,
        prompt: bool = False,
    ) -> StackOutput:
        """The decode step for the embedded input x, or (x None) for the token ids `tokens`, whose
        rows the call looks up in the stack's embedding (StackOutput says what comes back).
        prompt: the rows are prompt tokens (`prompt_step` gives each its own metadata): x is never
        rounded (the integer GEMVs' panels multiply it exact) and the head is left out (no
        logits: the caller computes those of the rows it needs, exactly)."""
        if len(kv_caches) != len(self._layers):
            raise ValueError(f"{len(self._layers)} fused layers got {len(kv_caches)} KV caches")
        embedding = self.embedding
        if x is not None:
            x = x.contiguous()
            rows = x.shape[0]
        elif tokens is not None and embedding is not None:
            tokens = _contiguous(tokens, torch.int64)
            rows = tokens.shape[0]
        else:
            raise ValueError("a fused decode step takes embedded rows x, or token ids where the stack has an embedding")
        out, residual = (torch.empty(rows, self._layers[0].hidden, dtype=self._layers[0].dtype) for _ in range(2))
        norm_weight, eps = self.final_norm if self.final_norm is not None else (None, 0.0)
        normed = torch.empty_like(out) if self.final_norm is not None else None
        head = None if prompt else self._head_struct
        logits = None if head is None else torch.empty(rows, self.vocab, dtype=torch.float32)
        head_rows = 0 if head is None else self._head_rows
        if head is not None and self._head_out is not None and self._head_out.shape[0] < rows <= GEMV_ANY_MAX_ROWS:
            self._head_out = torch.empty(rows, self._head_rows, dtype=self._head_out.dtype)
        k_caches, v_caches = self._caches(kv_caches)
        status = self._function(
            self._attention,
            self._mlp,
            k_caches,
            v_caches,
            len(self._layers),
            ctypes.byref(step),
            _pointer(x),
            residual.data_ptr(),
            out.data_ptr(),
            _pointer(norm_weight),
            eps,
            _pointer(normed),
            None if head is None else ctypes.byref(head),
            head_rows,
            _pointer(self._head_out),
            _pointer(logits),
            self.vocab,
            _pointer(tokens if x is None else None),
            _pointer(embedding if x is None else None),
            0 if embedding is None else embedding.shape[0],
            int(prompt),
        )
        if status == -2:
            assert tokens is not None and embedding is not None
            bad = [t for t in tokens.tolist() if not 0 <= t < embedding.shape[0]]
            raise ValueError(f"token ids {bad} are outside the embedding's {embedding.shape[0]} rows")
        if status:
            raise ValueError(f"fused decode takes 1 to {GEMV_ANY_MAX_ROWS} rows of one hidden size, got {step.batch}")
        return StackOutput(out, residual) if normed is None else StackOutput(normed, residual, logits)

    @staticmethod
    def prompt_step(
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        query_start_loc: torch.Tensor,
        cos_sin: torch.Tensor,
    ) -> tuple[DecodeStep, list[torch.Tensor]]:
        """A prompt step's DecodeStep (and the tensors it points into): a row per token, each with
        its sequence's block table and the keys up to its own position (position + 1: causal)."""
        counts = query_start_loc[1:] - query_start_loc[:-1]
        tables = block_tables.repeat_interleave(counts.long(), dim=0)
        return FusedDecodeLayer.step(positions, slot_mapping, tables, (positions + 1).to(torch.int32), cos_sin)


# Query rows a scaled_dot_product_attention call takes where it needs an explicit mask (a prompt
# after cached tokens, a sliding window): bounds the boolean mask to this many rows of keys.
_FLASH_MASKED_ROWS = 1024


def _flash_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos0: int, scale: float, sliding_window: int | None
) -> torch.Tensor:
    """q [Tq, Hq, d] at positions q_pos0.. attending causally to k, v [Tk, Hk, d] at positions
    0..Tk-1 (reference._attend's contract), in float32 through scaled_dot_product_attention.
    Its is_causal lines the first query up with the first key, so it serves only queries that
    start at position 0 without a window; other blocks of queries get a boolean mask over the
    keys they may see (keys past the block's last query, or before its window, are left out)."""
    tq, tk = q.shape[0], k.shape[0]
    queries = q.float().transpose(0, 1).unsqueeze(0)  # [1, Hq, Tq, d]
    keys = k.float().transpose(0, 1).unsqueeze(0)  # [1, Hk, Tk, d]
    values = v.float().transpose(0, 1).unsqueeze(0)
    if q_pos0 == 0 and (sliding_window is None or sliding_window >= tk):
        attended = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        return attended[0].transpose(0, 1).to(q.dtype)
    out = torch.empty_like(q)
    for r0 in range(0, tq, _FLASH_MASKED_ROWS):
        rows = min(_FLASH_MASKED_ROWS, tq - r0)
        first = q_pos0 + r0  # this block's first query position
        key_end = first + rows
        key_start = 0 if sliding_window is None else max(0, first - sliding_window + 1)
        q_positions = torch.arange(first, first + rows)[:, None]
        k_positions = torch.arange(key_start, key_end)[None, :]
        allowed = k_positions <= q_positions
        if sliding_window is not None:
            allowed &= k_positions > q_positions - sliding_window
        attended = F.scaled_dot_product_attention(
            queries[:, :, r0 : r0 + rows],
            keys[:, :, key_start:key_end],
            values[:, :, key_start:key_end],
            attn_mask=allowed,
            scale=scale,
            enable_gqa=True,
        )
        out[r0 : r0 + rows] = attended[0].transpose(0, 1).to(q.dtype)
    return out


def _contiguous(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tensor as a contiguous `dtype` tensor: itself when it is one already (the worker's step
    tensors are; a .to() and a .contiguous() would still cost two dispatches each a step)."""
    return tensor if tensor.dtype == dtype and tensor.is_contiguous() else tensor.to(dtype).contiguous()


def fused_head_serves(head: ProjectionWeight, kernels: KernelLibrary, dtype: torch.dtype) -> bool:
    """Whether FusedDecodeStack can run this LM head weight with layers of `dtype`."""
    if isinstance(head, torch.Tensor):
        return head.dtype == dtype and head.is_contiguous() and head.device.type == "cpu"
    return head.layout in HEAD_LAYOUTS and head.lanes == kernels.lanes


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _weight(weight: ProjectionWeight) -> Weight:
    if isinstance(weight, torch.Tensor):
        return Weight(weight.data_ptr(), None, None, None, None, 0, 0, 1)
    scales, offsets, factors = weight.scale_pointers()
    digits = 2 if weight.layout.endswith("x15") else 1
    return Weight(None, weight.words.data_ptr(), scales, offsets, factors, weight.bits, weight.group_size, digits)


def _rows(x: torch.Tensor) -> bool:
    """x is [N, H, d] (or [N, F]) with each row's features contiguous."""
    return x.stride(-1) == 1 and (x.dim() == 2 or x.stride(-2) == x.shape[-1])


_lock = threading.Lock()
_libraries: dict[str, KernelLibrary | None] = {}


def library(isa: str | None = None) -> KernelLibrary | None:
    """The compiled kernels for `isa` (default: selected_isa()), or None (logged once, with the
    reason and its cost) where they cannot be had. LLAMA3_DIST_CPU_KERNELS=0 turns them off."""
    isa = isa or selected_isa()
    try:
        return _libraries[isa]
    except KeyError:
        pass
    with _lock:
        if isa not in _libraries:
            try:
                if os.environ.get("LLAMA3_DIST_CPU_KERNELS", "1") == "0":
                    raise RuntimeError("LLAMA3_DIST_CPU_KERNELS=0")
                if isa not in executable_isas():
                    raise RuntimeError(f"this CPU does not run {isa} (torch reports {host_isa()})")
                _libraries[isa] = KernelLibrary(isa)
            except (OSError, RuntimeError) as e:
                log.warning(
                    "CPU kernels run in torch, about 2x slower per decode step: the compiled ones "
                    "(%s) are unavailable: %s",
                    isa,
                    e,
                )
                _libraries[isa] = None
        return _libraries[isa]


def kernels_for(x: torch.Tensor) -> KernelLibrary | None:
    """The compiled kernels if they serve tensors like x (bfloat16 or float32 on the CPU, with
    the library built), else None."""
    return library() if x.dtype in _SUFFIX and x.device.type == "cpu" else None


# --- linear layers ------------------------------------------------------------------------------


@functools.cache
def _cpu_features() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (x86 'flags', Arm 'Features'); empty
    elsewhere, which counts as no native half-precision GEMM. Read once (dense_gemv_rows asks
    at every product: reading /proc/cpuinfo each time cost a 32-token prompt ~14 ms)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _onednn_reports(dtype: torch.dtype) -> bool:
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return False


_NATIVE_FEATURES = {
    torch.bfloat16: {"avx512_bf16", "amx_bf16", "bf16"},
    torch.float16: {"avx512_fp16", "amx_fp16", "fphp"},
}
_native_gemm: dict[torch.dtype, bool] = {}


def native_gemm(dtype: torch.dtype) -> bool:
    """Whether torch multiplies `dtype` (bfloat16, float16) matrices natively here: oneDNN says it
    supports the type (it does not when held below AVX-512 by ONEDNN_MAX_CPU_ISA or
    ATEN_CPU_CAPABILITY) and the CPU has the instructions (else oneDNN emulates them, slower than
    widening to float32). Logged once per type when not."""
    if dtype not in _native_gemm:
        native = _onednn_reports(dtype) and bool(_NATIVE_FEATURES[dtype] & _cpu_features())
        if not native:
            log.info(
                "%s products of %d rows or more widen the weight to float32 (an exact copy, then a "
                "float32 GEMM): this CPU has no native %s GEMM, where torch's runs 3-4x slower",
                dtype,
                HALF_WIDEN_MIN_ROWS,
                dtype,
            )
        _native_gemm[dtype] = native
    return _native_gemm[dtype]


_scratch = threading.local()


def _scratch_weight(name: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised [shape] tensor in a buffer reused across calls on this thread: the page
    faults of a fresh weight-sized tensor per product cost as much as filling it."""
    numel = math.prod(shape)
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
        # A normal tensor, not an inference tensor, so that it can be written in and out of
        # inference mode alike.
        with torch.inference_mode(False):
            buffer = torch.empty(numel, dtype=dtype)
        setattr(_scratch, name, buffer)
    return buffer[:numel].view(shape)


def _widened(weight: torch.Tensor) -> torch.Tensor:
    """weight as float32, in a buffer reused across calls on this thread."""
    return _scratch_weight("widened", weight.shape, torch.float32).copy_(weight)


# bfloat16 rows where torch's GEMM for them is native without AMX (AVX-512 BF16): below this many
# the library's GEMV (every row in one pass, AVX-512 BF16 dot products from 5 rows a group) beat it.
# SmolLM2's 30 layers on Zen 4, torch / library: 12 rows 20.8 / 12.2 ms, 16: 22.4 / 15.2, 24: 26.8 /
# 20.9, 32: 29.9 / 30.4, 64: 48.2 / 58.7. AMX's GEMM (unmeasured against it) keeps the GEMV to 8.
NATIVE_HALF_GEMV_MAX_ROWS = 32


def dense_gemv_rows(dtype: torch.dtype) -> int:
    """Below how many rows cpu.linear multiplies dense weights of `dtype` by the library's GEMV
    (torch's GEMM from there): float32 WIDEN_MIN_ROWS; half precision HALF_WIDEN_MIN_ROWS where
    torch's GEMM for it is not native (it would widen the weight first), NATIVE_HALF_GEMV_MAX_ROWS
    where it is, past GEMV_MAX_ROWS only without AMX."""
    if dtype not in _NATIVE_FEATURES:
        return WIDEN_MIN_ROWS
    if not native_gemm(dtype):
        return HALF_WIDEN_MIN_ROWS
    return GEMV_MAX_ROWS + 1 if "amx_bf16" in _cpu_features() else NATIVE_HALF_GEMV_MAX_ROWS


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, kernels: KernelLibrary | None = None
) -> torch.Tensor:
    """x @ weight.T + bias for CPU tensors: the GEMV of `kernels` for few rows, torch for many
    (half-precision weights widened to float32 where torch's half-precision GEMM is not native)."""
    rows = x.numel() // x.shape[-1]
    if rows < dense_gemv_rows(weight.dtype):
        out = None if kernels is None else kernels.gemv(x, weight, bias)
        if out is not None:
            return out
    elif weight.dtype in _NATIVE_FEATURES and x.dtype == weight.dtype and not native_gemm(weight.dtype):
        return F.linear(x.float(), _widened(weight), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    kernels: KernelLibrary | None = None,
) -> torch.Tensor:
    """x @ (weight * scale[:, None]).T + bias for int8 weights: the library's GEMV for few rows
    (it streams the int8 bytes), the widened weight otherwise (prefill: many rows per pass)."""
    if kernels is not None and x.numel() // x.shape[-1] < WIDEN_MIN_ROWS:
        out = kernels.gemv_int8(x, weight, scale, bias)
        if out is not None:
            return out
    return reference.int8_weight_linear(x, weight, scale, bias)


# --- group-quantized weights ----------------------------------------------------------------------


@dataclass(frozen=True)
class PackedGroupWeights:
    """A GroupQuantized weight in one of the library's layouts (cpu_kernels.cpp):
    - "q4" / "q8" (float GEMV, "group-quantized weights"): rows of blocks of `lanes` 32-bit
      words, element v of word l holding the block's weight v * lanes + l; scales (and
      offsets) float16 [n, groups] as stored;
    - "panels4" / "panels8" (the integer GEMV of bfloat16 models, "4-bit weights times 8-bit
      activations"): panels of `lanes` rows, blocks of 32; scales and offsets float16
      [panels, groups, lanes] (4 bits without offsets: symmetric, Q4_0's q - 8), or for coded
      4-bit weights (GroupQuantized.factors) scales uint8 [panels, groups, lanes, 2], each
      group's scale code and offset code, and factors bfloat16 [panels, runs, 2, lanes];
    - "panels8x15": panels8's words, multiplied with x rounded to 15 bits per block of 32 (two
      int8 digits) instead of 8: the LM head of bfloat16 models (pack_head);
    - "panels6x15": 6-bit weights (int4 models' LM head), 6 words a block and lane (the low 4
      bits as panels4's, then the high 2), with x in 15 bits."""

    words: torch.Tensor  # int32
    scales: torch.Tensor  # float16 (coded panels: uint8 code pairs)
    offsets: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]  # the logical (n, k)
    lanes: int
    layout: str
    factors: torch.Tensor | None = None  # coded panels' scale and offset factors

    def scale_pointers(self) -> tuple[int | None, ...]:
        """The kernels' scale arguments: scales, offsets and, for panel layouts, factors."""
        pointers = (self.scales.data_ptr(), _pointer(self.offsets))
        return (*pointers, _pointer(self.factors)) if self.layout.startswith("panels") else pointers


def pack_grouped(
    weight: reference.GroupQuantized, lanes: int, panels: bool = False, x_digits: int = 1
) -> PackedGroupWeights:
    """weight in the layout of a library with `lanes` float32 lanes per vector: panels for the
    integer GEMV (x_digits 2: x to 15 bits, 6- and 8-bit weights only; 6-bit ones take only
    that), else words for the float one (6-bit weights as 8-bit ones).
    The group size must be a multiple of 32 (and for words a power of two and a multiple of
    `lanes`)."""
    if x_digits not in (1, 2) or (x_digits == 2 and not panels):
        raise ValueError(f"x_digits {x_digits}: 1, or 2 with panels (the float GEMV keeps x exact)")
    if panels:
        if x_digits == 2 and weight.bits == 4:
            raise ValueError("x in 15 bits takes 6- or 8-bit weights, not 4-bit")
        if x_digits == 1 and weight.bits == 6:
            raise ValueError("6-bit weights run with x in 15 bits (x_digits 2: the LM head's) only")
        packed = _pack_panels(weight, lanes)
        return dataclasses.replace(packed, layout=f"panels{weight.bits}x15") if x_digits == 2 else packed
    weight = weight.plain()  # the float GEMV reads float16 scales, 4- or 8-bit values
    group_size, bits = weight.group_size, weight.bits
    if group_size % lanes or group_size & (group_size - 1):
        raise ValueError(f"group size {group_size} must be a power of two and a multiple of {lanes}")
    n, k = weight.shape
    elements = 32 // bits
    block = elements * lanes
    blocks = -(-k // block)

    def row_words(values: torch.Tensor) -> torch.Tensor:  # [rows, k] -> int32 [rows, blocks * lanes]
        rows = values.shape[0]
        # (Row-major first: a checkpoint's transposed values would leave `words` in their layout,
        # and the kernels read the words' memory as rows.)
        values = values.to(torch.int32, memory_format=torch.contiguous_format) & ((1 << bits) - 1)
        values = F.pad(values, (0, blocks * block - k))
        values = values.view(rows, blocks, elements, lanes)  # [.., v, l]: weight v * lanes + l of the block
        # Disjoint bit fields or-ed in int32 (torch's shift wraps into the sign bit as the kernels
        # read it): 5-8x faster than summing them in int64.
        words = values[:, :, 0].clone()
        for v in range(1, elements):
            words |= values[:, :, v] << (v * bits)
        return words.reshape(rows, blocks * lanes).contiguous()

    return PackedGroupWeights(
        _by_row_chunks(row_words, weight.values, lanes),
        weight.scales.contiguous(),
        None if weight.offsets is None else weight.offsets.contiguous(),
        bits,
        group_size,
        (n, k),
        lanes,
        f"q{bits}",
    )


def _by_row_chunks(pack: Callable[[torch.Tensor], torch.Tensor], values: torch.Tensor, lanes: int) -> torch.Tensor:
    """torch.cat of pack(values[chunk]) over reference.row_chunks, each a multiple of `lanes` rows
    (a panel never straddles two): the same tensor as pack(values). Packing widens the values to
    int64 in several copies (~35 bytes a weight); a whole LM head at once (Llama-3.2-3B's: 394M
    weights) took a load's memory to 6.6x the bfloat16 model's."""
    chunks = reference.row_chunks(values.shape[0], values.shape[1], multiple=lanes)
    if len(chunks) == 1:
        return pack(values)
    return torch.cat([pack(values[chunk]) for chunk in chunks])


def _pack_panels(weight: reference.GroupQuantized, lanes: int) -> PackedGroupWeights:
    n, k = weight.shape
    group_size = weight.group_size
    if group_size % 32:
        raise ValueError(f"group size {group_size} must be a multiple of 32")
    panels, blocks, groups = -(-n // lanes), -(-k // 32), -(-k // group_size)

    def panel_words(values: torch.Tensor) -> torch.Tensor:  # [rows, k] -> int32 [panels, blocks, c, lanes]
        rows = values.shape[0]
        chunk_panels = -(-rows // lanes)
        values = F.pad(values.to(torch.int64), (0, blocks * 32 - k, 0, chunk_panels * lanes - rows))
        if weight.bits == 4:
            # [panel, lane, block, half (elements 0-15 | 16-31), c, byte] -> bytes [.., c, byte]
            values = values.view(chunk_panels, lanes, blocks, 2, 4, 4)
            packed_bytes = values[:, :, :, 0] | (values[:, :, :, 1] << 4)
        elif weight.bits == 6:  # u = value + 32: its low 4 bits as 4-bit nibbles, then its high 2
            unsigned = (values + 32).view(chunk_panels, lanes, blocks, 2, 4, 4)  # [.., half, c, byte]
            low, high = unsigned & 15, unsigned >> 4
            shifts = 2 * torch.arange(4, dtype=torch.int64).view(1, 1, 1, 1, 4, 1)
            high_bytes = (high << shifts).sum(dim=4)  # [.., half, byte]: bits 2c..2c+1 from vector c
            packed_bytes = torch.cat([low[:, :, :, 0] | (low[:, :, :, 1] << 4), high_bytes], dim=3)
        else:  # [panel, lane, block, c, byte]: 4 consecutive signed bytes a word
            packed_bytes = (values & 0xFF).view(chunk_panels, lanes, blocks, 8, 4)
        words = (packed_bytes << (torch.arange(4, dtype=torch.int64) * 8)).sum(dim=-1)  # [panel, lane, block, c]
        words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
        return words.permute(0, 2, 3, 1).contiguous()

    words = _by_row_chunks(panel_words, weight.values, lanes)

    def by_panel(t: torch.Tensor) -> torch.Tensor:  # [n, groups] -> [panels, groups, lanes]
        return F.pad(t, (0, 0, 0, panels * lanes - n)).view(panels, lanes, groups).transpose(1, 2).contiguous()

    layout = f"panels{weight.bits}"
    if weight.factors is not None:  # coded: a uint16 a group and lane, the scale code and offset code
        assert weight.offsets is not None
        codes = torch.stack([weight.scales, weight.offsets.view(torch.uint8)], dim=2)  # [n, groups, 2]
        codes = F.pad(codes, (0, 0, 0, 0, 0, panels * lanes - n)).view(panels, lanes, groups, 2)
        runs = weight.factors.shape[1]
        factors = F.pad(weight.factors, (0, 0, 0, 0, 0, panels * lanes - n)).view(panels, lanes, runs, 2)
        return PackedGroupWeights(
            words, codes.transpose(1, 2).contiguous(), None, weight.bits, group_size, (n, k), lanes, layout,
            factors.permute(0, 2, 3, 1).contiguous(),
        )  # fmt: skip
    offsets = weight.offsets
    if offsets is not None and torch.equal(offsets.float(), weight.scales.float() * -8.0):
        offsets = None  # symmetric 4 bits (GGUF Q4_0): the kernels subtract the 8s, no offsets read
    return PackedGroupWeights(
        words, by_panel(weight.scales), None if offsets is None else by_panel(offsets), weight.bits, group_size,
        (n, k), lanes, layout,
    )  # fmt: skip


def pack_head(weight: reference.GroupQuantized, lanes: int, integer_gemv: bool) -> PackedGroupWeights:
    """The LM head's layout: its logits pick the token, so x is never rounded to int8 there (that
    flips near-tied logits): 6- and 8-bit weights take the integer GEMV with x in 15 bits where
    it runs (bfloat16 models), other weights the float GEMV (x exact)."""
    if integer_gemv and weight.bits in (6, 8):
        return pack_grouped(weight, lanes, panels=True, x_digits=2)
    return pack_grouped(weight, lanes)


_step = threading.local()


@contextlib.contextmanager
def decode_rows(is_decode: bool) -> Iterator[None]:
    """Products inside are of a decode step's rows (one token a sequence) or not (prompt
    tokens). Only decode rows are rounded to int8 blocks by the integer GEMV over panels. Rows
    carry a few activations far larger than the rest (SmolLM2-135M, the input of layer 2's down
    projection: a row's largest up to ~1900 times its median, at position 0 and later ones),
    which take their whole block's precision; a prompt's rows are all rounded at once and every
    later token reads the keys and values cached from them (SmolLM2's bfloat16 chat, Q4_1 file:
    "Paris" from an exact prefill, garbage from a rounded one), while a decode row's rounding
    is one row among exact ones. Outside any decode_rows, rows count as prompt rows."""
    previous = getattr(_step, "decode", False)
    _step.decode = is_decode
    try:
        yield
    finally:
        _step.decode = previous


def decode_panel_widen_rows(dtype: torch.dtype) -> int | None:
    """From how many decode rows grouped_linear dequantizes panel weights for a GEMM (None:
    never, where torch's GEMM in this dtype is a float32 one, which never catches up)."""
    native = dtype not in _NATIVE_FEATURES or native_gemm(dtype)
    return PANEL_WIDEN_MIN_ROWS if native else None


def prompt_panel_widen_rows(dtype: torch.dtype, bits: int, kernels: KernelLibrary) -> int:
    """From how many prompt rows (x exact) grouped_linear dequantizes `bits`-bit panel weights for
    a GEMM."""
    if bits == 4 and dtype == torch.bfloat16 and kernels.bf16_dot_panels:
        return EXACT_DOT_PANEL_WIDEN_MIN_ROWS
    native = dtype not in _NATIVE_FEATURES or native_gemm(dtype)
    return EXACT_PANEL_WIDEN_MIN_ROWS if native else EXACT_PANEL_WIDEN_MIN_ROWS_SLOW_GEMM


def grouped_linear(
    x: torch.Tensor, weight: PackedGroupWeights, bias: torch.Tensor | None, kernels: KernelLibrary
) -> torch.Tensor:
    """x @ dequantized(weight).T + bias: the library's GEMV for few rows (it streams the packed
    integers; panels once for all rows, other layouts GEMV_MAX_ROWS rows a pass); for many (large
    batches, long prompts), the weight dequantized once per call and a GEMM. Prompt rows (outside
    decode_rows) keep x exact: the panels' GEMV with exact_x, which dequantizes in registers
    (SmolLM2-135M int4, 8 prompt rows through a 960 x 576 projection: 150 us against 842 us
    dequantizing for a GEMM)."""
    rows = x.numel() // x.shape[-1]
    exact_x = weight.layout in EXACT_X_LAYOUTS and not getattr(_step, "decode", False)
    widen_from: int | None = WIDEN_MIN_ROWS
    if weight.layout.startswith("panels") and exact_x:
        widen_from = prompt_panel_widen_rows(x.dtype, weight.bits, kernels)
    elif weight.layout.startswith("panels"):
        widen_from = decode_panel_widen_rows(x.dtype)
    if widen_from is None or rows < widen_from:
        return kernels.gemv_grouped(x, weight, bias, exact_x=exact_x)
    # The weight as the model's dtype, as the dense model has it (widened where the GEMM is not native).
    dense = kernels.dequantize_grouped(weight, x.dtype, out=_scratch_weight("dequantized", weight.shape, x.dtype))
    return linear(x, dense, bias)
