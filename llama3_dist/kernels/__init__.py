"""Kernel dispatchers: the model calls only these.

Each picks the Triton kernel for CUDA tensors, the compiled CPU kernels (cpu.py) for bfloat16
and float32 CPU tensors, and the torch reference elsewhere (float16 on CPUs, or where the CPU
kernels cannot be built). LLAMA3_DIST_KERNELS=torch|triton|auto (default auto) forces a path:
torch means the reference everywhere. The module functions read it at every call; a model picks
its kernels once, when it is built (select()), so set it before that.

"triton" on CPU tensors runs the kernels in triton's interpreter, which is how they are tested
on machines without a GPU. With triton 3.9 the interpreter is chosen when the kernels are
decorated, i.e. when llama3_dist.kernels.triton_kernels is first imported (lazily, on the first
Triton call): set TRITON_INTERPRET=1 in os.environ before that, e.g. at the top of a test module
or in the environment of the process. Triton itself is never imported unless a Triton path is
taken, so the package imports where triton is absent (macOS).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from . import cpu, reference

_MODES = ("auto", "torch", "triton")
_triton_available: bool | None = None


def _triton_installed() -> bool:
    global _triton_available
    if _triton_available is None:
        try:
            _triton_available = importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError, AttributeError):  # e.g. sys.modules["triton"] = None
            _triton_available = False
    return _triton_available


def _mode() -> str:
    mode = os.environ.get("LLAMA3_DIST_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"LLAMA3_DIST_KERNELS={mode!r} is not one of {'|'.join(_MODES)}")
    return mode


def _impl(x: torch.Tensor, mode: str | None = None) -> ModuleType | cpu.KernelLibrary:
    """The kernels that serve tensors like x: a module or the compiled CPU library."""
    mode = mode or _mode()
    if mode == "torch":
        return reference
    if mode == "auto" and not (x.is_cuda and _triton_installed()):
        return cpu.kernels_for(x) or reference
    if not _triton_installed():
        raise RuntimeError(
            "LLAMA3_DIST_KERNELS=triton but triton is not installed; "
            "install triton or use LLAMA3_DIST_KERNELS=torch|auto"
        )
    from . import triton_kernels

    if not x.is_cuda and not triton_kernels.INTERPRET:
        raise RuntimeError(
            f"LLAMA3_DIST_KERNELS=triton with {x.device} tensors needs triton's interpreter: set "
            "TRITON_INTERPRET=1 before llama3_dist.kernels.triton_kernels is first imported, or "
            "use LLAMA3_DIST_KERNELS=auto to run the torch reference on CPU"
        )
    return triton_kernels


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(x).rms_norm(x, weight, eps, residual)


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, interleaved: bool
) -> None:
    _impl(q).rotary_embedding(positions, q, k, cos_sin_cache, interleaved)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _impl(x).silu_and_mul(x)


def store_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    _impl(k_cache).store_kv_cache(k, v, k_cache, v_cache, slot_mapping)


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
    """max_query_len: the most new tokens of one sequence if the caller knows it on the host
    (spares the Triton kernel a device sync); the result does not depend on it."""
    return _impl(q).prefill_attention(
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, sliding_window, max_query_len
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    return _impl(q).paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window)


def _linear_for(x: torch.Tensor, mode: str) -> Callable[..., torch.Tensor]:
    """x @ weight.T + bias for tensors like x. cuBLAS on GPUs is already the right kernel; CPU
    tensors take the routes of cpu.linear (the compiled GEMV only where the other kernels take
    the compiled path too); LLAMA3_DIST_KERNELS=torch keeps plain torch."""
    if mode == "torch" or x.device.type != "cpu":
        return reference.linear
    impl = _impl(x, mode)
    return functools.partial(cpu.linear, kernels=impl if isinstance(impl, cpu.KernelLibrary) else None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _linear_for(weight, _mode())(x, weight, bias)


# The kernels with a Triton implementation; linear has none (cuBLAS on GPUs).
TRITON_KERNELS = (
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "store_kv_cache",
    "prefill_attention",
    "paged_decode_attention",
)


def _as_stored(weight: reference.GroupQuantized) -> reference.GroupQuantized:
    """The torch reference's layout of group-quantized weights: the logical form itself."""
    return weight


@dataclass(frozen=True)
class Kernels:
    """The kernels one model uses, chosen once for its device and dtype (select()): the module
    functions above decide per call, which costs a few microseconds each, and a CPU decode step
    of a small model makes hundreds of calls."""

    rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary_embedding: Callable[..., None]
    silu_and_mul: Callable[..., torch.Tensor]
    store_kv_cache: Callable[..., None]
    prefill_attention: Callable[..., torch.Tensor]
    paged_decode_attention: Callable[..., torch.Tensor]
    linear: Callable[..., torch.Tensor]
    # x @ (int8 weight * scale per row).T (+ bias): weight-only int8 projections.
    int8_linear: Callable[..., torch.Tensor] = reference.int8_weight_linear
    # x @ (float8 weight * scale per row).T (+ bias), x in float8 per token: FP8 projections.
    # One implementation (torch._scaled_mm) for every device.
    fp8_linear: Callable[..., torch.Tensor] = reference.fp8_linear
    # Group-quantized weights (reference.GroupQuantized: int4, GGUF types read grouped): pack_grouped
    # puts one in these kernels' layout at load, grouped_linear(x, packed, bias) multiplies.
    # runs_grouped: whether these kernels keep such weights as stored (the CPU library; the Triton
    # GEMV, which larger batches on GPUs reach through one dequantizing pass per call); the torch
    # reference dequantizes with several torch operations per call (correct, not fast), so there
    # stored GGUF types are dequantized at load instead.
    pack_grouped: Callable[..., Any] = _as_stored
    # pack_grouped for the LM head, whose logits pick the token: never x rounded to int8.
    pack_head: Callable[..., Any] = _as_stored
    grouped_linear: Callable[..., torch.Tensor] = reference.grouped_linear
    runs_grouped: bool = False
    # Whether pack_grouped packs for the CPU library's integer GEMV (bfloat16 models on CPUs with
    # byte dot products): int8 weights then take it too, with one group per row.
    integer_gemv: bool = False
    # The compiled CPU library when it runs whole decoder-layer halves per call for decode steps
    # (cpu.FusedDecodeLayer); LLAMA3_DIST_CPU_FUSED=0 keeps one call per kernel.
    fused_decode: cpu.KernelLibrary | None = None
    # Whether a model on one rank runs all its fused layers in one call (cpu.FusedDecodeStack);
    # LLAMA3_DIST_CPU_FUSED=halves keeps one call per half, as tensor-parallel ranks run them.
    fused_stack: bool = False
    # The kernels never wait for the device, so a CUDA graph can capture them (the Triton ones;
    # the torch reference masks and gathers by data, which syncs).
    capture_safe: bool = False


@functools.cache
def linear_kernels_work(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton linear kernels (the GEMV over dense, int8 and group-quantized weights,
    the dequantizing pass for more rows) give the exact product on `device` within `dtype`'s
    rounding, tried once per device and dtype on a small problem. On hardware where they fail to
    compile or disagree, the model takes cuBLAS for dense weights and the torch reference for
    quantized ones (dequantized per call: correct, slower), with a warning, rather than a failed
    or wrong model."""
    from . import triton_kernels

    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(48, 96, generator=generator)
        grouped = [reference.quantize_int4(weight, 32), reference.quantize_int8_groups(weight)]
        values, scale = reference.quantize_int8(weight)
        for x_rows in (1, 20):
            x = torch.randn(x_rows, 96, generator=generator).to(device=device, dtype=dtype)
            products = [
                (triton_kernels.linear(x, weight.to(device, dtype)), weight.to(dtype).float()),
                (
                    triton_kernels.int8_linear(x, values.to(device), scale.to(device)),
                    values.float() * scale[:, None],
                ),
            ]
            for g in grouped:
                packed = triton_kernels.pack_grouped(g.to(device))
                products.append((triton_kernels.grouped_linear(x, packed), reference.dequantize(g)))
            for got, dense in products:
                exact = x.float() @ dense.to(device).T
                error = float((got.float() - exact).norm() / exact.norm())
                if not error < 1e-2:  # bfloat16's rounding of the result: ~2e-3 of its norm
                    raise RuntimeError(f"differs from the exact product by {error:.3g} of its norm")
        return True
    except Exception as e:  # any failure of an untried kernel on this device: keep the model correct
        logging.getLogger("llama3_dist").warning(
            "linear layers on %s run cuBLAS and, for quantized weights, the torch reference (dequantized per "
            "call, slower): the Triton linear kernels failed their check there: %s: %s",
            device,
            type(e).__name__,
            e,
        )
        return False


@functools.cache
def fp8_gemv_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton GEMV's float8 route (triton_kernels.fp8_linear) gives reference.fp8_linear's
    product on `device` (float8 hardware: compute capability 8.9+; or Triton's interpreter), tried
    once per device and dtype. Where it fails, float8 weights keep the reference (torch._scaled_mm)
    for every row count, with a warning."""
    from . import triton_kernels

    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return False  # no float8 there: quantization="fp8" is refused on such GPUs anyway
    try:
        generator = torch.Generator().manual_seed(0)
        values, scale = reference.quantize_fp8(torch.randn(48, 96, generator=generator))
        values, scale = values.to(device), scale.to(device)
        x = torch.randn(3, 96, generator=generator).to(device=device, dtype=dtype)
        got, want = triton_kernels.fp8_linear(x, values, scale).float(), reference.fp8_linear(x, values, scale).float()
        error = float((got - want).norm() / want.norm())
        if not error < 1e-2:  # the two sum the same exact products in different orders, then round
            raise RuntimeError(f"differs from reference.fp8_linear by {error:.3g} of its norm")
        return True
    except Exception as e:
        logging.getLogger("llama3_dist").warning(
            "float8 weights on %s take torch._scaled_mm for every row count: the Triton GEMV failed its check "
            "there: %s: %s",
            device,
            type(e).__name__,
            e,
        )
        return False


def select(device: torch.device | str, dtype: torch.dtype) -> Kernels:
    """The kernels for tensors of `dtype` on `device`, as the module functions would pick them now
    (LLAMA3_DIST_KERNELS, LLAMA3_DIST_CPU_ISA, LLAMA3_DIST_CPU_KERNELS and LLAMA3_DIST_CPU_FUSED
    are read here)."""
    probe = torch.empty(0, dtype=dtype, device=device)
    mode = _mode()
    impl = _impl(probe, mode)
    fused = (
        impl if isinstance(impl, cpu.KernelLibrary) and os.environ.get("LLAMA3_DIST_CPU_FUSED", "1") != "0" else None
    )
    integer_gemv = isinstance(impl, cpu.KernelLibrary) and dtype == torch.bfloat16 and impl.integer_dot
    if isinstance(impl, ModuleType) and impl.__name__.endswith("triton_kernels"):
        triton_kernels = {name: getattr(impl, name) for name in TRITON_KERNELS}
        # Decode's few rows take the Triton GEMV (dense weights one row only, on GPUs: cuBLAS
        # splits a one-row product into split-K partials and a reduction); LLAMA3_DIST_GEMV=0
        # keeps cuBLAS for every row count (quantized weights then dequantize per call).
        gemv_rows = impl.GEMV_MAX_ROWS if os.environ.get("LLAMA3_DIST_GEMV", "1") != "0" else 0
        if linear_kernels_work(probe.device, dtype):
            linear = impl.linear if probe.is_cuda and gemv_rows else _linear_for(probe, mode)
            # CUDA (or Triton's interpreter): quantized weights stay in their integers (GGUF types
            # in their grouped forms too), dequantized in registers by the GEMV for decode's rows,
            # into a scratch for cuBLAS for more; float8 weights take the GEMV for decode's rows
            # where it passes its check (one small compile at start-up on float8 GPUs).
            fp8_rows = gemv_rows if fp8_gemv_works(probe.device, dtype) else 0
            return Kernels(
                **triton_kernels,
                linear=linear,
                int8_linear=functools.partial(impl.int8_linear, gemv_rows=gemv_rows),
                fp8_linear=functools.partial(impl.fp8_linear, gemv_rows=fp8_rows),
                pack_grouped=impl.pack_grouped,
                pack_head=impl.pack_grouped,  # x stays in the model's dtype there
                grouped_linear=functools.partial(impl.grouped_linear, gemv_rows=gemv_rows),
                runs_grouped=True,
                capture_safe=probe.is_cuda,
            )
        return Kernels(**triton_kernels, linear=_linear_for(probe, mode), capture_safe=probe.is_cuda)
    return Kernels(
        **{name: getattr(impl, name) for name in TRITON_KERNELS},
        linear=_linear_for(probe, mode),
        int8_linear=(
            functools.partial(cpu.int8_linear, kernels=impl)
            if isinstance(impl, cpu.KernelLibrary)
            else reference.int8_weight_linear
        ),
        pack_grouped=(
            # bfloat16 models multiply 4-bit weights in integers (x quantized to int8, as
            # llama.cpp does) where the CPU has byte dot products; float32 ones dequantize in
            # registers, exact to float rounding.
            functools.partial(cpu.pack_grouped, lanes=impl.lanes, panels=integer_gemv)
            if isinstance(impl, cpu.KernelLibrary)
            else _as_stored
        ),
        pack_head=(
            functools.partial(cpu.pack_head, lanes=impl.lanes, integer_gemv=integer_gemv)
            if isinstance(impl, cpu.KernelLibrary)
            else _as_stored
        ),
        grouped_linear=(
            functools.partial(cpu.grouped_linear, kernels=impl)
            if isinstance(impl, cpu.KernelLibrary)
            else reference.grouped_linear
        ),
        runs_grouped=isinstance(impl, cpu.KernelLibrary),
        integer_gemv=integer_gemv,
        fused_decode=fused,
        fused_stack=fused is not None and os.environ.get("LLAMA3_DIST_CPU_FUSED", "1") != "halves",
        capture_safe=False,
    )


__all__ = ["Kernels", "linear", "select", *TRITON_KERNELS]
