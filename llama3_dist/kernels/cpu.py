"""Matrix products for bfloat16 weights on CPUs without native bfloat16 arithmetic.

There torch's bfloat16 GEMM runs at a fraction of its float32 speed (measured on this project's
machines: 50-60 GFLOP/s against 185-195 for float32 at 64 rows or more). Products with many rows
therefore widen the weight into a reused float32 buffer (a cheap, exact copy) and multiply in
float32; products with few rows (decode) are bandwidth-bound and go through oneDNN's bfloat16
path, about twice as fast as the default one for a single row. Both accumulate in float32 and
round the result to bfloat16, as a bfloat16 GEMM does.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch
import torch.nn.functional as F

# Below this many rows the product is bound by reading the weight once: widening it would
# only add traffic.
WIDEN_MIN_ROWS = 16


def _native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: leave torch's choice alone
    return "avx512_bf16" in flags or "amx_bf16" in flags


NATIVE_BF16 = _native_bf16()
_scratch = threading.local()


def needs_help(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return not NATIVE_BF16 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows < WIDEN_MIN_ROWS:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    wide = getattr(_scratch, "buffer", None)
    if wide is None or wide.numel() < weight.numel():
        # A normal tensor, not an inference tensor, so that it can be written in and out of
        # inference mode alike.
        with torch.inference_mode(False):
            wide = _scratch.buffer = torch.empty(weight.numel(), dtype=torch.float32)
    w32 = wide[:weight.numel()].view(weight.shape).copy_(weight)
    return F.linear(x.float(), w32, None if bias is None else bias.float()).to(x.dtype)
