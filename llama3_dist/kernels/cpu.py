"""Kernels for bfloat16 models on CPUs: the compiled library of cpu_kernels.cpp where it can be
built, torch otherwise.

On a CPU a decode step of a small model is a few hundred tiny torch ops (each 3-20 us of
dispatch) around GEMVs that torch runs below the memory's speed on CPUs without bfloat16
arithmetic. cpu_kernels.cpp does each kernel of the decode path in one call with the reference's
arithmetic (float32 math, bfloat16 roundings where the reference's bfloat16 tensors round); it is
built with the machine's C++ compiler at first use and cached. Where it cannot be built (no
compiler, no AVX-512) everything falls back to the torch reference, with one warning.

Linear layers with bfloat16 weights on CPUs without native bfloat16 (no avx512_bf16 / AMX), where
torch's bfloat16 GEMM runs at a fraction of its float32 speed (measured: 50-60 GFLOP/s against
185-195 for float32 at 64 rows or more):
- products with few rows (decode) go through the library's GEMV (oneDNN's bfloat16 path, about
  twice as fast as torch's default one for a single row, without the library);
- products with many rows widen the weight into a reused float32 buffer (a cheap, exact copy)
  and multiply in float32.
All accumulate in float32 and round the result to bfloat16, as a bfloat16 GEMM does.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cache import cache_root
from . import reference

log = logging.getLogger(__name__)

# Below this many rows a product is bound by reading the weight once: widening it would only add
# traffic.
WIDEN_MIN_ROWS = 16
SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
COMPILE_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp", "-shared", "-fPIC")
NEEDED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "fma")
GEMV_MAX_ROWS = 8  # the largest m bf16_gemv() takes

_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "bf16_gemv": [_P, _P, _P, _P, _I64, _I64, _I64],
    "bf16_rms_norm": [_P, _P, _P, _F32, _P, _P, _I64, _I64],
    "bf16_rotary": [_P, _P, _I64, _I64, _P, _I64, _I64, _I64, _P, _I64, ctypes.c_int, _I64],
    "bf16_store_kv": [_P, _I64, _P, _I64, _P, _P, _P, _I64, _I64],
    "bf16_decode_attention": [_P, _I64, _P, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64, _F32, _I64],
    "bf16_silu_and_mul": [_P, _P, _I64, _I64],
}


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None  # not Linux
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


_FLAGS = _cpu_flags()
# Not Linux: leave torch's choice alone.
NATIVE_BF16 = _FLAGS is None or bool({"avx512_bf16", "amx_bf16"} & _FLAGS)
_scratch = threading.local()
_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable


def missing_features() -> list[str]:
    """The CPU features the library needs and this CPU lacks (all of them off Linux)."""
    return [f for f in NEEDED_CPU_FLAGS if f not in (_FLAGS or ())]


def build() -> Path:
    """Compile cpu_kernels.cpp into the cache (once per source and flags); returns the library.

    Several processes (Ray ranks) may build at once: each compiles into its own temporary file
    and renames it into place, so a reader never sees half a library."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"cpu_kernels-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".building-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([compiler, *COMPILE_FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {SOURCE.name}:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (logged once, with the reason) where they cannot be had.
    LLAMA3_DIST_CPU_KERNELS=0 turns them off."""
    global _lib
    if _lib is not None:
        return _lib or None
    with _lib_lock:
        if _lib is None:
            missing = missing_features()
            try:
                if os.environ.get("LLAMA3_DIST_CPU_KERNELS", "1") == "0":
                    raise RuntimeError("LLAMA3_DIST_CPU_KERNELS=0")
                if missing:
                    raise RuntimeError(f"the CPU lacks {', '.join(missing)}")
                lib = ctypes.CDLL(str(build()))
                for name, argtypes in _SIGNATURES.items():
                    getattr(lib, name).argtypes = argtypes
                    getattr(lib, name).restype = ctypes.c_int if name == "bf16_gemv" else None
                _lib = lib
            except (OSError, RuntimeError) as e:
                log.warning("bfloat16 CPU kernels run in torch (slower): the compiled ones are "
                            "unavailable: %s", e)
                _lib = False
        return _lib or None


def handles(x: torch.Tensor) -> bool:
    """Whether this module serves tensors like x: bfloat16 on the CPU, with the library built."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and library() is not None


def _rows(x: torch.Tensor) -> bool:
    """x is [N, H, d] (or [N, F]) with each row's features contiguous."""
    return x.stride(-1) == 1 and (x.dim() == 2 or x.stride(-2) == x.shape[-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if weight is not None and weight.dtype != torch.bfloat16:
        return reference.rms_norm(x, weight, eps, residual)
    x = x.contiguous()
    d = x.shape[-1]
    out = torch.empty_like(x)
    h = x if residual is None else torch.empty_like(x)
    res = None if residual is None else residual.contiguous()
    library().bf16_rms_norm(x.data_ptr(), None if res is None else res.data_ptr(),
                            None if weight is None else weight.data_ptr(), eps, out.data_ptr(),
                            h.data_ptr(), x.numel() // d, d)
    return out, h


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, interleaved: bool) -> None:
    if not (_rows(q) and _rows(k)) or cos_sin_cache.dtype != torch.float32:
        return reference.rotary_embedding(positions, q, k, cos_sin_cache, interleaved)
    pos = positions.to(torch.int64).contiguous()
    cs = cos_sin_cache.contiguous()
    library().bf16_rotary(pos.data_ptr(), q.data_ptr(), q.stride(0), q.shape[1], k.data_ptr(), k.stride(0),
                          k.shape[1], q.shape[2], cs.data_ptr(), cs.shape[1], int(interleaved), q.shape[0])


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    inter = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype)
    library().bf16_silu_and_mul(x.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], inter)
    return out


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    if not (_rows(k) and _rows(v) and k_cache.is_contiguous() and v_cache.is_contiguous()):
        return reference.store_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    slots = slot_mapping.to(torch.int64).contiguous()
    library().bf16_store_kv(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(),
                            v_cache.data_ptr(), slots.data_ptr(), k.shape[0], k.shape[1] * k.shape[2])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    if not (_rows(q) and k_cache.is_contiguous() and v_cache.is_contiguous()):
        return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                sliding_window)
    b, hq, d = q.shape
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty(b, hq, d, dtype=q.dtype)
    library().bf16_decode_attention(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                                    tables.data_ptr(), tables.shape[1], lens.data_ptr(), out.data_ptr(), b, hq,
                                    k_cache.shape[2], d, k_cache.shape[1], scale, sliding_window or 0)
    return out


# Prefill has many rows per op, so torch's dispatch cost is spread thin there.
prefill_attention = reference.prefill_attention


def needs_help(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """bfloat16 products that torch runs slowly: on CPUs without native bfloat16."""
    return not NATIVE_BF16 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x @ weight.T + bias through the library (8 rows of x per pass over the weight); None if it
    is unavailable or the tensors are not contiguous bfloat16."""
    lib = library()
    if (lib is None or x.dtype != torch.bfloat16 or not weight.is_contiguous()
            or (bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()))):
        return None
    k, n = x.shape[-1], weight.shape[0]
    x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, k).contiguous()
    rows = x2.shape[0]
    out = torch.empty(rows, n, dtype=torch.bfloat16)
    bias_ptr = None if bias is None else bias.data_ptr()
    x_ptr, w_ptr, out_ptr = x2.data_ptr(), weight.data_ptr(), out.data_ptr()
    for start in range(0, rows, GEMV_MAX_ROWS):
        m = min(GEMV_MAX_ROWS, rows - start)
        if lib.bf16_gemv(x_ptr + start * k * 2, w_ptr, bias_ptr, out_ptr + start * n * 2, m, n, k):
            raise ValueError(f"bf16_gemv takes 1 to {GEMV_MAX_ROWS} rows at a time, got {m}")
    return out if x.dim() == 2 else out.view(*x.shape[:-1], n)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           compiled: bool = True) -> torch.Tensor:
    """compiled=False keeps to torch (oneDNN for few rows)."""
    rows = x.numel() // x.shape[-1]
    if rows < WIDEN_MIN_ROWS:
        out = gemv(x, weight, bias) if compiled else None
        return out if out is not None else torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    wide = getattr(_scratch, "buffer", None)
    if wide is None or wide.numel() < weight.numel():
        # A normal tensor, not an inference tensor, so that it can be written in and out of
        # inference mode alike.
        with torch.inference_mode(False):
            wide = _scratch.buffer = torch.empty(weight.numel(), dtype=torch.float32)
    w32 = wide[:weight.numel()].view(weight.shape).copy_(weight)
    return F.linear(x.float(), w32, None if bias is None else bias.float()).to(x.dtype)
