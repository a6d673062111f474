"""Kernel dispatchers: the model calls only these.

Each picks the Triton kernel for CUDA tensors, the compiled CPU kernels (cpu.py) for bfloat16
and float32 CPU tensors, and the torch reference elsewhere (float16 on CPUs, or where the CPU
kernels cannot be built). LLAMA3_DIST_KERNELS=torch|triton|auto (read at
every call, default auto) forces a path: torch means the reference everywhere.

"triton" on CPU tensors runs the kernels in triton's interpreter, which is how they are tested
on machines without a GPU. With triton 3.9 the interpreter is chosen when the kernels are
decorated, i.e. when llama3_dist.kernels.triton_kernels is first imported (lazily, on the first
Triton call): set TRITON_INTERPRET=1 in os.environ before that, e.g. at the top of a test module
or in the environment of the process. Triton itself is never imported unless a Triton path is
taken, so the package imports where triton is absent (macOS).
"""
from __future__ import annotations

import importlib.util
import os
from types import ModuleType

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


def _impl(x: torch.Tensor) -> ModuleType | cpu.KernelLibrary:
    """The kernels that serve tensors like x: a module or the compiled CPU library."""
    mode = _mode()
    if mode == "torch":
        return reference
    if mode == "auto" and not (x.is_cuda and _triton_installed()):
        return cpu.library() if cpu.handles(x) else reference
    if not _triton_installed():
        raise RuntimeError("LLAMA3_DIST_KERNELS=triton but triton is not installed; "
                           "install triton or use LLAMA3_DIST_KERNELS=torch|auto")
    from . import triton_kernels

    if not x.is_cuda and not triton_kernels.INTERPRET:
        raise RuntimeError(
            f"LLAMA3_DIST_KERNELS=triton with {x.device} tensors needs triton's interpreter: set "
            "TRITON_INTERPRET=1 before llama3_dist.kernels.triton_kernels is first imported, or "
            "use LLAMA3_DIST_KERNELS=auto to run the torch reference on CPU")
    return triton_kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(x).rms_norm(x, weight, eps, residual)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, interleaved: bool) -> None:
    _impl(q).rotary_embedding(positions, q, k, cos_sin_cache, interleaved)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _impl(x).silu_and_mul(x)


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    _impl(k_cache).store_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                      context_lens: torch.Tensor, scale: float,
                      sliding_window: int | None = None) -> torch.Tensor:
    return _impl(q).prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc,
                                  context_lens, scale, sliding_window)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    return _impl(q).paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                       sliding_window)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias. cuBLAS on GPUs is already the right kernel; CPU tensors take the
    routes of cpu.linear (the compiled GEMV only where the other kernels take the compiled path
    too); LLAMA3_DIST_KERNELS=torch keeps plain torch."""
    if _mode() == "torch" or weight.device.type != "cpu":
        return reference.linear(x, weight, bias)
    impl = _impl(x)
    return cpu.linear(x, weight, bias, impl if isinstance(impl, cpu.KernelLibrary) else None)


# The kernels with a Triton implementation; linear has none (cuBLAS on GPUs).
TRITON_KERNELS = ("rms_norm", "rotary_embedding", "silu_and_mul", "store_kv_cache", "prefill_attention",
                  "paged_decode_attention")
__all__ = ["linear", *TRITON_KERNELS]
