"""Triton kernels for the hot paths. Semantics, shapes and rounding follow reference.py exactly.

Importing this module imports triton. Triton 3.9 decides between compiling for the GPU and its
CPU interpreter when @triton.jit decorates a function, i.e. when this module is first imported:
TRITON_INTERPRET=1 must be in os.environ by then (before or after `import triton` itself does
not matter) for the kernels to run on CPU tensors. `INTERPRET` records which mode was taken.

Every kernel computes addresses in int64 (caches can exceed 2**31 elements), pads block sizes to
powers of two with masks (head_dim 96, rotary_dim 48, ...) and accumulates in float32.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import reference

try:  # Gluon (triton >= 3.4): kernels with their register layouts written out; CUDA only
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:
    gluon = gl = None

try:
    INTERPRET = bool(triton.knobs.runtime.interpret)
except AttributeError:  # triton < 3.4 has no knobs
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The triton 3.9 interpreter computes tl.dot on bfloat16 operands wrongly (it multiplies the raw
# bit patterns), so under the interpreter both operands are upcast to float32 first. The values
# are the same (bfloat16 products are exact in float32 and the accumulator is float32 anyway).
_DOT_UPCAST = INTERPRET
# It also rounds float32 -> bfloat16 casts toward zero instead of to nearest even (the GPU's
# rounding), so under the interpreter _cast rounds first, exactly, in float32 arithmetic.
_FIX_BF16_CAST = tl.constexpr(INTERPRET)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here (the tests poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _pow2(n: int, minimum: int = 1) -> int:
    return max(triton.next_power_of_2(int(n)), minimum)


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs would otherwise go through TF32 tensor cores (10-bit mantissa) on CUDA.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest even also under the interpreter."""
    y = x.to(dtype)
    if _FIX_BF16_CAST:  # noqa: SIM102 (compile-time: False on the GPU; each constexpr `if` folds on its own)
        if dtype == tl.bfloat16:
            # Veltkamp split: c - (c - x) with c = x * (2**16 + 1) is x rounded to nearest even at
            # 8 significant bits (bfloat16's precision), so the truncating cast below is exact.
            xf = x.to(tl.float32)
            c = xf * 65537.0
            y = (c - (c - xf)).to(dtype)
    return y


# --------------------------------------------------------------------------------------------
# RMSNorm fused with the residual add


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    out_ptr,
    h_ptr,
    D,
    eps,
    stride_x,
    stride_r,
    stride_out,
    stride_h,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        h = _cast(x.to(tl.float32) + r.to(tl.float32), h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
        hf = h.to(tl.float32)
    else:
        hf = x.to(tl.float32)
    var = tl.sum(hf * hf, axis=0) / D
    # Rounded to x's dtype before the weight multiply, as transformers' LlamaRMSNorm does.
    normed = _cast(hf * (1.0 / tl.sqrt(var + eps)), x.dtype).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        normed = w.to(tl.float32) * normed
    tl.store(out_ptr + row * stride_out + cols, _cast(normed, out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    shape, D = x.shape, x.shape[-1]
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = x2.shape[0]
    out_dtype = x.dtype if weight is None else torch.result_type(weight, x)
    out = _empty((n, D), out_dtype, x.device)
    if residual is not None:
        r2 = residual.reshape(-1, D)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        h = _empty((n, D), torch.result_type(x, residual), x.device)
    else:
        r2, h = x2, x2
    if n:
        block_d = _pow2(D)
        _rms_norm_kernel[(n,)](
            x2,
            r2,
            weight if weight is not None else x2,
            out,
            h,
            D,
            float(eps),
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            h.stride(0),
            HAS_RESIDUAL=residual is not None,
            HAS_WEIGHT=weight is not None,
            BLOCK_D=block_d,
            num_warps=min(max(block_d // 512, 1), 16),
        )
    if residual is None:
        return out.view(shape), x
    return out.view(shape), h.view(shape)


# --------------------------------------------------------------------------------------------
# Rotary embedding, in place


@triton.jit
def _rotate_heads(base, heads, H, stride_h, stride_d, off1, off2, fmask, cos, sin):
    mask = (heads[:, None] < H) & fmask[None, :]
    hoff = heads[:, None].to(tl.int64) * stride_h
    p1 = base + hoff + off1[None, :] * stride_d
    p2 = base + hoff + off2[None, :] * stride_d
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p2, mask=mask, other=0.0)
    dt = x1.dtype
    # Every product and sum is rounded to the element dtype, as the reference (and transformers,
    # which runs rotary in the activation dtype) computes it; a no-op for float32.
    c = _cast(cos, dt).to(tl.float32)[None, :]
    s = _cast(sin, dt).to(tl.float32)[None, :]
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    o1 = _cast(x1 * c, dt).to(tl.float32) - _cast(x2 * s, dt).to(tl.float32)
    o2 = _cast(x2 * c, dt).to(tl.float32) + _cast(x1 * s, dt).to(tl.float32)
    tl.store(p1, _cast(o1, dt), mask=mask)
    tl.store(p2, _cast(o2, dt), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    cs_ptr,
    Hq,
    Hk,
    HALF,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_cs,
    INTERLEAVED: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    fmask = i < HALF
    cos = tl.load(cs_ptr + pos * stride_cs + i, mask=fmask, other=0.0)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + i, mask=fmask, other=0.0)
    if INTERLEAVED:
        off1 = 2 * i
        off2 = 2 * i + 1
    else:
        off1 = i
        off2 = i + HALF
    _rotate_heads(q_ptr + t * stride_qt, heads, Hq, stride_qh, stride_qd, off1, off2, fmask, cos, sin)
    _rotate_heads(k_ptr + t * stride_kt, heads, Hk, stride_kh, stride_kd, off1, off2, fmask, cos, sin)


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, interleaved: bool
) -> None:
    n, hq, hk, rot = q.shape[0], q.shape[1], k.shape[1], cos_sin_cache.shape[1]
    if rot % 2 or rot > q.shape[2] or rot > k.shape[2]:
        raise ValueError(f"rotary_dim {rot} must be even and at most head_dim {q.shape[2]}")
    if n == 0:
        return
    if cos_sin_cache.stride(1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    positions = positions.contiguous()
    block_h = min(_pow2(max(hq, hk)), 16)
    grid = (n, triton.cdiv(max(hq, hk), block_h))
    _rotary_kernel[grid](
        positions,
        q,
        k,
        cos_sin_cache,
        hq,
        hk,
        rot // 2,
        *q.stride(),
        *k.stride(),
        cos_sin_cache.stride(0),
        INTERLEAVED=bool(interleaved),
        BLOCK_H=block_h,
        BLOCK_HALF=_pow2(rot // 2),
        num_warps=4,
    )


# --------------------------------------------------------------------------------------------
# SiLU(gate) * up


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, intermediate, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # silu rounded to the element dtype before the multiply, as torch computes silu(gate) * up.
    act = _cast(g / (1.0 + tl.exp(-g)), gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, _cast(act * up.to(tl.float32), gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    two_i = x.shape[-1]
    if two_i % 2:
        raise ValueError(f"silu_and_mul needs an even last dim ([gate | up]), got {two_i}")
    x2 = x.reshape(-1, two_i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    i = two_i // 2
    out = _empty((x2.shape[0], i), x.dtype, x.device)
    if x2.shape[0]:
        block = min(_pow2(i), 1024)
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(i, block))](
            x2, out, i, x2.stride(0), out.stride(0), BLOCK=block, num_warps=4
        )
    return out.view(*x.shape[:-1], i)


# --------------------------------------------------------------------------------------------
# KV cache store


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    H,
    D,
    BLOCK_SIZE,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_kcp,
    stride_kcs,
    stride_kch,
    stride_kcd,
    stride_vcp,
    stride_vcs,
    stride_vch,
    stride_vcd,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    block = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H).to(tl.int64)[:, None]
    d = tl.arange(0, BLOCK_D).to(tl.int64)[None, :]
    # Skipped tokens (slot -1): broadcast the scalar test to the tile (the interpreter rejects a
    # scalar operand in a mask).
    mask = (h < H) & (d < D) & ((slot + tl.zeros([BLOCK_H, BLOCK_D], tl.int64)) >= 0)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    tl.store(
        kc_ptr + block * stride_kcp + off * stride_kcs + h * stride_kch + d * stride_kcd,
        _cast(k, kc_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        vc_ptr + block * stride_vcp + off * stride_vcs + h * stride_vch + d * stride_vcd,
        _cast(v, vc_ptr.dtype.element_ty),
        mask=mask,
    )


def store_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    n, hk, d = k.shape
    if n == 0:
        return
    _store_kv_kernel[(n,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping.contiguous(),
        hk,
        d,
        k_cache.shape[1],
        *k.stride(),
        *v.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        BLOCK_H=_pow2(hk),
        BLOCK_D=_pow2(d),
        num_warps=4,
    )


# --------------------------------------------------------------------------------------------
# Attention over the paged cache. Scores are kept in the log2 domain (scale * log2(e) folded in)
# so the softmax uses exp2. Keys are gathered token by token through the block table, so tile
# sizes are independent of the block size and blocks past a sequence's length are never read.

_LOG2E = 1.4426950408889634


@triton.jit
def _load_kv_tile(cache_ptr, bt_row_ptr, n, n_mask, kvh, d, d_mask, BLOCK_SIZE, stride_p, stride_s, stride_h):
    block = tl.load(bt_row_ptr + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    slot = (n % BLOCK_SIZE).to(tl.int64)
    ptrs = cache_ptr + (block * stride_p + slot * stride_s + kvh * stride_h)[:, None] + d[None, :]
    return tl.load(ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _decode_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    bt_ptr,
    cl_ptr,
    out_ptr,
    po_ptr,
    pm_ptr,
    pl_ptr,
    scale_log2,
    G,
    D,
    BLOCK_SIZE,
    WINDOW,
    PARTITION,
    stride_qb,
    stride_qh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ob,
    stride_oh,
    SPLIT: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One program per (sequence, KV head, split): the G query heads sharing this KV head are the
    # rows of the score tile, so each K/V tile is read once for the whole group.
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    ctx = tl.load(cl_ptr + b)
    lo = ctx * 0
    hi = ctx
    if USE_WINDOW:
        lo = tl.maximum(ctx - WINDOW, 0)
    if SPLIT:
        lo = tl.maximum(lo, split * PARTITION)
        hi = tl.minimum(hi, (split + 1) * PARTITION)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < G
    d_mask = d < D
    heads = kvh * G + g
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    bt_row = bt_ptr + b * stride_bt

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        # Every tile holds at least one allowed key (start < hi), so m_new is finite.
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        k = _load_kv_tile(kc_ptr, bt_row, n, n_mask, kvh, d, d_mask, BLOCK_SIZE, stride_kp, stride_ks, stride_kh)
        s = _dot(q, tl.trans(k), UPCAST, PRECISION) * scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(vc_ptr, bt_row, n, n_mask, kvh, d, d_mask, BLOCK_SIZE, stride_vp, stride_vs, stride_vh)
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype), v, UPCAST, PRECISION)
        m_i = m_new

    mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        # Unnormalized partials [B, Hq, splits, (D)], combined by _decode_reduce_kernel.
        row = (b * G * tl.num_programs(1) + heads) * num_splits + split
        tl.store(po_ptr + row[:, None] * D + d[None, :], acc, mask=mask)
        tl.store(pm_ptr + row, m_i, mask=g_mask)
        tl.store(pl_ptr + row, l_i, mask=g_mask)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
            _cast(out, out_ptr.dtype.element_ty),
            mask=mask,
        )


@triton.jit
def _decode_reduce_kernel(
    po_ptr, pm_ptr, pl_ptr, out_ptr, NUM_SPLITS, D, stride_ob, stride_oh, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    row0 = (b * tl.num_programs(1) + h) * NUM_SPLITS
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < NUM_SPLITS
    d_mask = d < D
    m = tl.load(pm_ptr + row0 + s, mask=s_mask, other=float("-inf"))
    partial_sum = tl.load(pl_ptr + row0 + s, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # empty splits have m = -inf: weight 0
    total = tl.sum(w * partial_sum, 0)
    acc = tl.load(po_ptr + (row0 + s)[:, None] * D + d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, _cast(out, out_ptr.dtype.element_ty), mask=d_mask)


# The fewest keys a flash-decoding split takes. On an H200 the 8B-shaped model's batch-1 decode
# attention took 8.5 us a layer at a 160-token context (run 3): one serial loop of 64-key tiles,
# since the decode graphs' 2048-token block tables give 8 splits of 256 keys and the context fills
# one. LLAMA3_DIST_DECODE_MIN_PARTITION (a multiple of 64) tries smaller ones; gpu_check.py times
# split counts, gpu_all.sh the engine with 64.
DECODE_MIN_PARTITION = int(os.environ.get("LLAMA3_DIST_DECODE_MIN_PARTITION", "256"))


def _num_decode_splits(batch: int, kv_heads: int, ctx_cap: int, device: torch.device) -> int:
    """Flash-decoding: split long contexts so that there are enough programs to fill the chip."""
    if ctx_cap <= 4 * DECODE_MIN_PARTITION:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 16
    want = triton.cdiv(8 * sms, batch * kv_heads)
    return max(1, min(want, triton.cdiv(ctx_cap, DECODE_MIN_PARTITION), 64))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """num_splits (tests only) overrides the split heuristic; 1 disables flash-decoding."""
    B, hq, d = q.shape
    block_size, hk = k_cache.shape[1], k_cache.shape[2]
    if hq % hk:
        raise ValueError(f"query heads {hq} must be a multiple of KV heads {hk}")
    group = hq // hk
    out = _empty((B, hq, d), q.dtype, q.device)
    if B == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV caches must be contiguous along head_dim")
    # An upper bound on the context without a device sync: the width of the block table.
    ctx_cap = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = _num_decode_splits(B, hk, ctx_cap, q.device)
    block_n = 32 if q.dtype == torch.float32 or d > 128 else 64
    partition = triton.cdiv(triton.cdiv(ctx_cap, num_splits), block_n) * block_n
    split = num_splits > 1
    if split:
        partial_out = _empty((B, hq, num_splits, d), torch.float32, q.device)
        partial_m = _empty((B, hq, num_splits), torch.float32, q.device)
        partial_l = _empty((B, hq, num_splits), torch.float32, q.device)
    else:
        partial_out = partial_m = partial_l = out
    block_d = _pow2(d, 16)
    _decode_kernel[(B, hk, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        partial_out,
        partial_m,
        partial_l,
        float(scale) * _LOG2E,
        group,
        d,
        block_size,
        int(sliding_window) if sliding_window is not None else 0,
        partition,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        SPLIT=split,
        USE_WINDOW=sliding_window is not None,
        BLOCK_G=_pow2(group, 16),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        UPCAST=_DOT_UPCAST,
        PRECISION=_precision(q.dtype),
        num_warps=4,
        num_stages=2,
    )
    if split:
        _decode_reduce_kernel[(B, hq)](
            partial_out,
            partial_m,
            partial_l,
            out,
            num_splits,
            d,
            out.stride(0),
            out.stride(1),
            BLOCK_S=_pow2(num_splits),
            BLOCK_D=_pow2(d),
            num_warps=4,
        )
    return out


@triton.jit
def _prefill_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    bt_ptr,
    qsl_ptr,
    cl_ptr,
    out_ptr,
    scale_log2,
    G,
    D,
    BLOCK_SIZE,
    WINDOW,
    stride_qt,
    stride_qh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    USE_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One program per (query block, KV head, sequence). The rows of a query block are
    # (token, query head) pairs of one KV head's group, token-major: row r is token r // G,
    # head r % G, so each K/V tile is read once for the whole group.
    m_blk = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    ctx = tl.load(cl_ptr + b)
    first_pos = ctx - q_len  # absolute position of the sequence's first query

    rows = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len * G
    tok = rows // G
    heads = kvh * G + rows % G
    pos = first_pos + tok
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + (q_rows * stride_qt + heads * stride_qh)[:, None] + d[None, :],
        mask=row_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    bt_row = bt_ptr + b * stride_bt

    # Keys this block can see: up to its last query's position, from its first query's window.
    block_first = first_pos + (m_blk * BLOCK_M) // G
    block_last = tl.minimum(first_pos + (m_blk * BLOCK_M + BLOCK_M - 1) // G, ctx - 1)
    lo = block_first * 0
    if USE_WINDOW:
        lo = tl.maximum(block_first - WINDOW + 1, 0)
    hi = tl.where(m_blk * BLOCK_M < q_len * G, block_last + 1, lo)  # empty block: no loop

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        k = _load_kv_tile(kc_ptr, bt_row, n, n_mask, kvh, d, d_mask, BLOCK_SIZE, stride_kp, stride_ks, stride_kh)
        s = _dot(q, tl.trans(k), UPCAST, PRECISION) * scale_log2
        allowed = n_mask[None, :] & (n[None, :] <= pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (n[None, :] > pos[:, None] - WINDOW)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row may have no allowed key in this tile yet (window, causal edge, padding rows).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(vc_ptr, bt_row, n, n_mask, kvh, d, d_mask, BLOCK_SIZE, stride_vp, stride_vs, stride_vh)
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype), v, UPCAST, PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + (q_rows * stride_ot + heads * stride_oh)[:, None] + d[None, :],
        _cast(out, out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & d_mask[None, :],
    )


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
    n, hq, d = q.shape
    block_size, hk = k_cache.shape[1], k_cache.shape[2]
    if hq % hk:
        raise ValueError(f"query heads {hq} must be a multiple of KV heads {hk}")
    group = hq // hk
    out = _empty((n, hq, d), q.dtype, q.device)
    B = context_lens.shape[0]
    if n == 0 or B == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV caches must be contiguous along head_dim")
    # The grid's size: from the caller's host-side max_query_len, else one device sync.
    max_q = max_query_len if max_query_len is not None else int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_q <= 0:
        return out
    if q.dtype == torch.float32 or d > 128:
        block_m, block_n, warps = 32, 32, 4
    else:
        block_m, block_n, warps = 64, 64, 4
    grid = (triton.cdiv(max_q * group, block_m), hk, B)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        context_lens,
        out,
        float(scale) * _LOG2E,
        group,
        d,
        block_size,
        int(sliding_window) if sliding_window is not None else 0,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        USE_WINDOW=sliding_window is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=_pow2(d, 16),
        UPCAST=_DOT_UPCAST,
        PRECISION=_precision(q.dtype),
        num_warps=warps,
        num_stages=2,
    )
    return out


# --------------------------------------------------------------------------------------------
# Linear layers: w8a16 (int8, a scale per row), w4a16 (4 bits, a scale and offset per group of
# input features; GGUF Q8_0 / Q4_0 / Q4_1 too) and dense weights. The weights stay in their
# integers in memory. Decode's few rows multiply them in the GEMV below, dequantized in
# registers; more rows (large batches, prompts) dequantize each weight into a scratch of x's
# dtype in one pass and hand it to cuBLAS. Measured on an H200 (benchmarks/results/
# h200-gpu-run3.log), the Triton GEMM that dequantized tile by tile before each dot, which this
# replaced, ran a batch-64 step of the 8B-shaped model in 36 ms (int8) and 302 ms (int4)
# against bfloat16's 5.6 ms: at 16 to 64 rows it read the weights at 0.03-0.24 TB/s.


@functools.cache
def _warn_slow_4_bit() -> None:
    logging.getLogger("llama3_dist").warning(
        "4-bit weights on a GPU decode slower than bfloat16 with triton %s: it has no Gluon (triton "
        ">= 3.4), which the fast 4-bit GEMV is written in, and the other one is bound by its "
        "instructions (measured on an H200, 8B-shaped model: 5.28 ms a token against bfloat16's 4.46 "
        "and 2.84 with Gluon); int8 (3.40 ms) or bfloat16 serve faster here",
        triton.__version__,
    )


@dataclass(frozen=True)
class TritonGroupWeights:
    """A reference.GroupQuantized in this module's layout: 4-bit values two to a byte (the even
    column in the low nibble), 8-bit ones as int8; scales (and offsets) per row and group."""

    words: torch.Tensor  # uint8 [n, ceil(k / 2)] for 4 bits, int8 [n, k] for 8 bits
    scales: torch.Tensor  # float16 (group-wise) or float32 (int8 per row) [n, groups]
    offsets: torch.Tensor | None  # like scales, 4 bits only
    bits: int
    group_size: int
    k: int  # input features

    @property
    def shape(self) -> tuple[int, int]:
        return (self.words.shape[0], self.k)


def pack_grouped(weight: reference.GroupQuantized) -> TritonGroupWeights:
    """The weight in this module's layout (coded scales as float16: the GEMV reads those)."""
    weight = weight.plain()
    if weight.bits == 4 and weight.values.is_cuda and gluon is None:
        _warn_slow_4_bit()
    k = weight.shape[1]
    values = weight.values
    if weight.bits == 4:
        pairs = torch.nn.functional.pad(values.to(torch.uint8), (0, k % 2))  # an odd width gets a zero column
        words = pairs[:, 0::2] | (pairs[:, 1::2] << 4)
    else:
        words = values.to(torch.int8)
    offsets = None if weight.offsets is None else weight.offsets.contiguous()
    scales = weight.scales.contiguous()
    return TritonGroupWeights(words.contiguous(), scales, offsets, weight.bits, weight.group_size, k)


# Decode steps multiply a few rows by every weight once: a GEMM's tiles of 16+ rows then waste the
# tensor cores and, worse, split N into too few programs to keep HBM busy. The GEMV below gives each
# program BLOCK_N weight rows over the whole of K (no split-K partial sums to reduce) and walks the
# few x rows over each weight tile while it sits in registers. One kernel serves dense weights and
# both quantized layouts (BITS 16 = the weight in its own float dtype). Quantized weights are not
# rounded to x's dtype as reference.dequantize does (and the dequantizing route below): a group's
# sums are scaled in float32, so the GEMV's product is the closer of the two to the exact one.
GEMV_MAX_ROWS = 4
# Dense weights: cuBLAS is as fast from 2 rows on (one row: equal on the 8B-shaped projections as
# one graph, but the GEMV needs no split-K reduction kernels, which saves launches; 2 and 4 rows:
# cuBLAS 5.1 ms a token's projections against the GEMV's 6.1 and 8.8).
DENSE_GEMV_MAX_ROWS = 1
# (BLOCK_N, BLOCK_K, num_warps, num_stages[, VARIANT]) by bit width; chosen by benchmarks/gpu_gemv.py
# on an H200 (see benchmarks/results/): small BLOCK_N so even a 4096-row projection has hundreds of
# programs. VARIANT for quantized weights: 0 the tiled kernel below, GEMV_JOIN (4 bits) its nibbles
# joined in registers, GEMV_WORDS the Gluon kernel over 32-bit words (_gemv_words_kernel). Bit
# width 0: float8 weights (the tiled kernel; the 8-bit integer tiles may be the words kernel's).
# LLAMA3_DIST_GEMV_CONFIGS (JSON: {"16": [16, 512, 4, 3], ...}) overrides them, for tuning.
# H200 run 5 (benchmarks/results/h200-gpu-run5.log), the decode step's projections of an 8B-shaped
# model as one CUDA graph: bf16 (8, 1024, 8, 3) 3.73 ms (84% of the HBM peak; (4, 1024, 4, 3)
# 3.93), int4 words 2.11 ms (the tiled kernel 4.73); int8 words and tiled alike (2.64 ms), tiled
# kept (the words kernel timed slower at 2-4 rows); float8 (8, 1024, 4, 3): its 8B-shaped decode
# 3.56 ms, the sweep's pick (32, 512, 4, 4) 4.21.
GEMV_JOIN, GEMV_WORDS = 1, 2
GEMV_CONFIGS: dict[int, tuple[int, ...]] = {
    16: (8, 1024, 8, 3),
    8: (8, 1024, 4, 3),
    4: (8, 1024, 2, 1, GEMV_WORDS),
    0: (8, 1024, 4, 3),
}
# the tiled kernel's tiles where a words config meets no Gluon (triton < 3.4) or a shape it skips
GEMV_TILED_CONFIGS: dict[int, tuple[int, ...]] = {8: (8, 1024, 4, 3), 4: (8, 1024, 4, 1)}
if os.environ.get("LLAMA3_DIST_GEMV_CONFIGS"):
    GEMV_CONFIGS.update(
        {int(bits): tuple(config) for bits, config in json.loads(os.environ["LLAMA3_DIST_GEMV_CONFIGS"]).items()}
    )


@triton.jit
def _small_int_to_float(value, ZERO: tl.constexpr):
    """float(value - ZERO) for integers value in 0..255 without an int-to-float conversion (a
    quarter-rate instruction, which would bound a 4-bit GEMV below the memory's speed): value put
    into the mantissa of 2**23, then 2**23 + ZERO subtracted (both exact)."""
    return (value | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + ZERO)


@triton.jit
def _e4m3_rounded(v):
    """float32 v (|v| <= 448) rounded to the nearest float8_e4m3fn value, ties to even, as float32:
    torch's .to(torch.float8_e4m3fn) bit for bit. Written out rather than a cast because Triton's
    interpreter (the CPU tests) rounds wrongly where rounding up carries into the exponent (124
    became 64). Normal values keep 3 of float32's 23 mantissa bits (the carry of a round-up moves
    the exponent); below 2^-6 the steps are subnormal, 2^-9 apart: added to 1.5 * 2^14, whose
    float32 spacing that is, v rounds to them in the adder."""
    magnitude = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    rounded = (magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) & -1048576  # -1048576: ~0xFFFFF
    normal = rounded.to(tl.float32, bitcast=True)
    normal = tl.where(v < 0, -normal, normal)
    subnormal = (v + 24576.0) - 24576.0
    return tl.where(magnitude < 0x3C800000, subnormal, normal)  # 0x3C800000: 2^-6


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    offset_ptr,
    bias_ptr,
    out_ptr,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    ROWS: tl.constexpr,
    ROWS_P2: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    JOIN: tl.constexpr,
    FP8_X: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for m < ROWS, float32 sums.

    BITS 16: w as stored (any float dtype). BITS 8: int8 values; GROUP > 0 gives a float16 scale
    per group of GROUP columns, ROW_SCALE a float32 scale per row (int8 weights). BITS 4: two
    values a byte (even column in the low nibble), a scale and offset per group. A group's
    products are summed before its scale multiplies them, and its offset multiplies the group's
    sum of x, so the per-weight work is one convert and one multiply-add. JOIN (4 bits): the two
    nibbles of each byte are interleaved back into one row of columns in registers, so x is read
    contiguously, instead of reading x's even and odd columns apart (stride-2 loads). Both are bound
    by instructions on an H200 (~1 TB/s of 4-bit weights; H200 run 5, do_bench over an 8B-shaped
    step's projections: 5.6 ms without JOIN, 4.3 with it): 4-bit weights take _gemv_words_kernel
    where Triton has Gluon (3.8 ms there). FP8_X (float8 weights, BITS 16 with ROW_SCALE): each row of
    x rounded to float8_e4m3 with a scale of its own, its largest |x| / 448, as reference.fp8_linear
    does (W8A8 with dynamic per-token scales); the products of float8 values are exact in float32,
    and the sum is scaled by the row's scale, then the weight row's."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
    s_rows = rn[:, None].to(tl.int64) * stride_sn
    row_ids = tl.arange(0, ROWS_P2)
    acc = tl.zeros((ROWS_P2, BLOCK_N), dtype=tl.float32)
    HALF: tl.constexpr = BLOCK_K // 2
    GROUPS: tl.constexpr = BLOCK_K // GROUP if GROUP > 0 else 1
    SPLIT: tl.constexpr = BITS == 4 and not JOIN  # a 4-bit tile as even and odd columns apart
    PER_GROUP: tl.constexpr = GROUP // 2 if SPLIT else GROUP  # products per group in a tile row
    x_scales = tl.zeros((ROWS_P2,), dtype=tl.float32)
    if FP8_X:  # a first pass over each row of x for its scale (x is small and stays in cache)
        for m in tl.static_range(ROWS):
            largest = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + m * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)
                largest = tl.maximum(largest, tl.abs(x))
            row_scale = tl.maximum(tl.max(largest, axis=0), 1e-12) / 448.0
            x_scales = tl.where(row_ids == m, row_scale, x_scales)
    for k0 in range(0, K, BLOCK_K):
        if BITS == 4:
            pair = k0 // 2 + tl.arange(0, HALF)  # byte index: columns 2 * pair and 2 * pair + 1
            byte = tl.load(w_rows + pair[None, :], mask=n_mask[:, None] & (2 * pair < K)[None, :], other=0)
            byte = byte.to(tl.int32)
            low = _small_int_to_float(byte & 15, 0)
            high = _small_int_to_float(byte >> 4, 0)
            if JOIN:
                rk = k0 + tl.arange(0, BLOCK_K)
                w = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            w_mask = n_mask[:, None] & (rk < K)[None, :]
            if FP8_X:  # (Triton's interpreter casts no integer 0 to float8)
                w = tl.load(w_rows + rk[None, :], mask=w_mask, other=0.0)
            else:
                w = tl.load(w_rows + rk[None, :], mask=w_mask, other=0)
            if BITS == 8:  # noqa: SIM108 (-128..127 shifted to 0..255 and back; a compile-time branch)
                w = _small_int_to_float(w.to(tl.int32) + 128, 128)
            else:
                w = w.to(tl.float32)
        if GROUP > 0:
            group = k0 // GROUP + tl.arange(0, GROUPS)
            g_mask = n_mask[:, None] & (group * GROUP < K)[None, :]
            scale = tl.load(scale_ptr + s_rows + group[None, :], mask=g_mask, other=0.0).to(tl.float32)
            if HAS_OFFSET:
                offset = tl.load(offset_ptr + s_rows + group[None, :], mask=g_mask, other=0.0).to(tl.float32)
        for m in tl.static_range(ROWS):
            x_row = x_ptr + m * stride_xm
            if SPLIT:
                x_even = tl.load(x_row + 2 * pair, mask=2 * pair < K, other=0.0).to(tl.float32)
                x_odd = tl.load(x_row + 2 * pair + 1, mask=2 * pair + 1 < K, other=0.0).to(tl.float32)
                products = low * x_even[None, :] + high * x_odd[None, :]
                x_sums = x_even + x_odd
            else:
                x = tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
                if FP8_X:
                    x_scale = tl.sum(tl.where(row_ids == m, x_scales, 0.0), axis=0)
                    x = _e4m3_rounded(x / x_scale)
                products = w * x[None, :]
                x_sums = x
            if GROUP > 0:
                group_sums = tl.sum(tl.reshape(products, (BLOCK_N, GROUPS, PER_GROUP)), axis=2)
                part = tl.sum(group_sums * scale, axis=1)
                if HAS_OFFSET:
                    x_group_sums = tl.sum(tl.reshape(x_sums, (GROUPS, PER_GROUP)), axis=1)
                    part += tl.sum(offset * x_group_sums[None, :], axis=1)
            else:
                part = tl.sum(products, axis=1)
            acc = tl.where(row_ids[:, None] == m, acc + part[None, :], acc)
    if FP8_X:
        acc *= x_scales[:, None]
    if ROW_SCALE:
        acc *= tl.load(scale_ptr + rn.to(tl.int64) * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + row_ids[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, _cast(acc, out_ptr.dtype.element_ty), mask=(row_ids < ROWS)[:, None] & n_mask[None, :])


if gluon is not None:

    @gluon.jit
    def _word_values(words, value, one_bits, BITS: gl.constexpr):
        """The float 1 + u / 2**BITS of each value u of the 32-bit words (value: the index of a
        value in its word, along the last axis): u rotated from bits BITS * value to bits
        23 - BITS .. 22 and or-ed into one_bits, 1.0's bits (for 8 bits also bit 22, by xor: the
        sign flipped, q + 128 = u). one_bits is an argument, not a constant, so that the and and the
        or make one LOP3 (it takes a single immediate operand): two integer instructions a value."""
        left = ((23 - BITS - BITS * value) & 31).to(gl.uint32)  # never 0
        rotated = ((words << left) | (words >> (32 - left))) & (((1 << BITS) - 1) << (23 - BITS))
        if BITS == 8:
            return (rotated ^ one_bits.to(gl.uint32)).to(gl.float32, bitcast=True)
        return (rotated | one_bits.to(gl.uint32)).to(gl.float32, bitcast=True)

    @gluon.jit
    def _gemv_words_kernel(
        x_ptr,
        w_ptr,
        scale_ptr,
        offset_ptr,
        bias_ptr,
        out_ptr,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_sn,
        stride_om,
        one_bits,
        ROWS: gl.constexpr,
        ROWS_P2: gl.constexpr,
        BITS: gl.constexpr,
        GROUP: gl.constexpr,
        ROW_SCALE: gl.constexpr,
        HAS_OFFSET: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        BLOCK_N: gl.constexpr,
        BLOCKS: gl.constexpr,
        LAYOUT: gl.constexpr,
    ):
        """out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for m < ROWS: _gemv_kernel's product for
        8- and 4-bit weights read as 32-bit words (w_ptr: int32 [N, K * BITS / 32]), in Gluon so that
        the layout is ours: LAYOUT is [ROWS_P2, BLOCK_N, BLOCKS, BITS words, 32 // BITS values], each
        thread holding every row of x and whole blocks of 32 columns (a block's BITS words, each
        word's values), so a block's sums never leave the thread's registers, and the x of a block
        is read and widened once for all the rows a thread holds. The triton.jit kernel's compiler
        spread the group sums over threads (shuffles, shared memory): on an H200 its 4-bit form
        ran 9-10 instructions a weight and read at 1 TB/s; this one compiles to about 4 at 16-32
        rows a program (benchmarks/gpu_gemv.py measures both).

        Each value u becomes the float 1 + u / 2**BITS (_word_values). A block's sum
        S = sum(x) + sum(u x) / 2**BITS then gives sum(q x) = 2**BITS * S - (ZERO + 2**BITS) *
        sum(x), and a group's scale s and offset o make it s * sum(q x) + o * sum(x)."""
        VALUES: gl.constexpr = 32 // BITS  # values a word holds
        ZERO: gl.constexpr = 128 if BITS == 8 else 0  # int8 read as unsigned: q + 128
        WORDS3: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(4, LAYOUT))  # [BLOCK_N, BLOCKS, BITS]
        X4: gl.constexpr = gl.SliceLayout(1, LAYOUT)  # [ROWS_P2, BLOCKS, BITS, VALUES]
        ACC: gl.constexpr = gl.SliceLayout(3, gl.SliceLayout(4, LAYOUT))  # [ROWS_P2, BLOCK_N, BLOCKS]
        SCALES: gl.constexpr = gl.SliceLayout(0, ACC)  # [BLOCK_N, BLOCKS]
        pid = gl.program_id(0)

        rn = pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, WORDS3)))
        w_block = gl.arange(0, BLOCKS, layout=gl.SliceLayout(0, gl.SliceLayout(2, WORDS3)))
        w_word = gl.arange(0, BITS, layout=gl.SliceLayout(0, gl.SliceLayout(1, WORDS3)))
        word_in_tile = w_block[None, :, None] * BITS + w_word[None, None, :]
        w_rows = w_ptr + rn[:, None, None].to(gl.int64) * stride_wn
        w_row_mask = (rn < N)[:, None, None]

        x_row = gl.arange(0, ROWS_P2, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, X4))))
        x_block = gl.arange(0, BLOCKS, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, X4))))
        x_word = gl.arange(0, BITS, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, X4))))
        x_value = gl.arange(0, VALUES, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, X4))))
        column_in_tile = (
            x_block[None, :, None, None] * 32 + x_word[None, None, :, None] * VALUES + x_value[None, None, None, :]
        )
        x_rows = x_ptr + x_row[:, None, None, None] * stride_xm
        x_row_mask = (x_row < ROWS)[:, None, None, None]

        VALUE: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, LAYOUT))))
        value = gl.arange(0, VALUES, layout=VALUE)[None, None, None, None, :]

        rs = pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, SCALES))
        s_block = gl.arange(0, BLOCKS, layout=gl.SliceLayout(0, SCALES))
        s_rows = rs[:, None].to(gl.int64) * stride_sn
        s_row_mask = (rs < N)[:, None]

        block_sums = gl.zeros((ROWS_P2, BLOCK_N, BLOCKS), gl.float32, layout=ACC)
        x_terms = gl.zeros((ROWS_P2, BLOCK_N, BLOCKS), gl.float32, layout=ACC)
        for k0 in range(0, K, BLOCKS * 32):
            word = k0 // VALUES + word_in_tile
            words = gl.load(w_rows + word, mask=w_row_mask & (word < K // VALUES), other=0)
            words = words.to(gl.uint32, bitcast=True)[None, :, :, :, None]
            column = k0 + column_in_tile
            x = gl.load(x_rows + column, mask=x_row_mask & (column < K), other=0.0).to(gl.float32)
            w = _word_values(words, value, one_bits, BITS)
            sums = gl.sum(gl.sum(w * x[:, None, :, :, :], axis=4), axis=3)  # [ROWS_P2, BLOCK_N, BLOCKS]
            x_sums = gl.convert_layout(gl.sum(gl.sum(x, axis=3), axis=2), gl.SliceLayout(1, ACC))[:, None, :]
            if GROUP > 0:
                group = (k0 + s_block * 32) // GROUP
                group_mask = s_row_mask & (k0 + s_block * 32 < K)[None, :]
                scale = gl.load(scale_ptr + s_rows + group[None, :], mask=group_mask, other=0.0).to(gl.float32)
                block_sums += scale[None, :, :] * sums
                x_factor = -(ZERO + (1 << BITS)) * scale
                if HAS_OFFSET:
                    offset = gl.load(offset_ptr + s_rows + group[None, :], mask=group_mask, other=0.0)
                    x_factor += offset.to(gl.float32)
                x_terms += x_factor[None, :, :] * x_sums
            else:
                block_sums += sums
                x_terms += x_sums
        if GROUP > 0:
            out = (1 << BITS) * gl.sum(block_sums, axis=2) + gl.sum(x_terms, axis=2)
        else:
            out = (1 << BITS) * gl.sum(block_sums, axis=2) - (ZERO + (1 << BITS)) * gl.sum(x_terms, axis=2)
        OUT: gl.constexpr = gl.SliceLayout(2, ACC)
        ro = pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, OUT))
        row = gl.arange(0, ROWS_P2, layout=gl.SliceLayout(1, OUT))
        if ROW_SCALE:
            out *= gl.load(scale_ptr + ro.to(gl.int64) * stride_sn, mask=ro < N, other=0.0).to(gl.float32)[None, :]
        if HAS_BIAS:
            out += gl.load(bias_ptr + ro, mask=ro < N, other=0.0).to(gl.float32)[None, :]
        gl.store(
            out_ptr + row[:, None].to(gl.int64) * stride_om + ro[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=(row < ROWS)[:, None] & (ro < N)[None, :],
        )


def _takes_words(weight: torch.Tensor, k: int, bits: int, group_size: int) -> bool:
    """Whether the words kernels take this integer weight of k columns: Gluon there, a GPU, 8- or
    4-bit weights whose rows are whole 32-bit words, groups of whole blocks of 32 columns."""
    return (
        gluon is not None
        and weight.is_cuda
        and bits in (4, 8)
        and k % (32 // bits) == 0
        and weight.stride(0) * weight.element_size() % 4 == 0
        and weight.data_ptr() % 4 == 0
        and (group_size % 32 == 0 if group_size else bits == 8)
    )


@functools.cache
def _words_layout(rows_p2: int, bits: int, block_n: int, blocks: int, warps: int):
    """[ROWS_P2, BLOCK_N, BLOCKS, words, values]: a block of 32 columns (bits words) a thread;
    threads across blocks, and across rows where a tile has fewer than 32 blocks."""
    threads_n = max(1, 32 // blocks)
    return gl.BlockedLayout(
        [rows_p2, 1, 1, bits, 32 // bits], [1, threads_n, 32 // threads_n, 1, 1], [1, warps, 1, 1, 1], [4, 3, 2, 0, 1]
    )


@functools.cache
def _dequantize_layout(block_n: int, blocks: int, warps: int):
    """[BLOCK_N, BLOCKS, 4 words, 8 values]: a block of 32 4-bit columns a thread."""
    threads_n = max(1, 32 // blocks)
    return gl.BlockedLayout([1, 1, 4, 8], [threads_n, 32 // threads_n, 1, 1], [warps, 1, 1, 1], [3, 2, 1, 0])


def _int32_words(weight: torch.Tensor) -> torch.Tensor:
    """An integer weight's rows as 32-bit words (_takes_words has checked that they are whole)."""
    return (weight if weight.stride(1) == 1 else weight.contiguous()).view(torch.int32)


# _word_values' one_bits by bit width: 1.0's bits, and for 8 bits bit 22 (q's sign) too
_ONE_BITS = {4: 0x3F800000, 8: 0x3FC00000}


def _product_operands(rows, weight, scales, offsets, bias, out) -> tuple:
    """The GEMV kernels' first arguments: x, w, scales, offsets, bias (each absent one stands in
    as w, never read), out, N, K and the four row strides."""
    return (
        rows,
        weight,
        scales if scales is not None else weight,
        offsets if offsets is not None else weight,
        bias if bias is not None else weight,
        out,
        weight.shape[0],
        rows.shape[1],
        rows.stride(0),
        weight.stride(0),
        scales.stride(0) if scales is not None else 0,
        out.stride(0),
    )


def _gemv_words(
    rows: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    offsets: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    bits: int,
    group_size: int,
    block_n: int,
    block_k: int,
    warps: int,
) -> None:
    m = rows.shape[0]
    words = _int32_words(weight)
    blocks = max(1, block_k // 32)
    rows_p2 = _pow2(m)
    threads_n = max(1, 32 // blocks) * warps
    block_n = max(block_n, threads_n)  # (a config's tile narrower than its threads: widened to them)
    while block_n > threads_n and block_n // threads_n * rows_p2 > 8:
        # at most 8 (tile row, x row) pairs a thread: sm_90 code of 16 spilled registers (8 bits,
        # 3 rows of x, 8 tile rows a thread); the tile's rows shrink instead
        block_n //= 2
    _gemv_words_kernel[(triton.cdiv(words.shape[0], block_n),)](
        *_product_operands(rows, words, scales, offsets, bias, out),
        _ONE_BITS[bits],
        ROWS=m,
        ROWS_P2=rows_p2,
        BITS=bits,
        GROUP=group_size,
        ROW_SCALE=bits == 8 and not group_size,
        HAS_OFFSET=offsets is not None,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        BLOCKS=blocks,
        LAYOUT=_words_layout(rows_p2, bits, block_n, blocks, warps),
        num_warps=warps,
    )


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scales: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    bits: int = 16,
    group_size: int = 0,
    config: tuple[int, ...] | None = None,
    fp8: bool = False,
) -> torch.Tensor:
    """x @ w.T (+ bias) for at most GEMV_MAX_ROWS rows of x (decode steps), w dense (bits 16) or
    in TritonGroupWeights' layout (bits 8/4 with `scales`, `offsets`, `group_size`; group_size 0
    with bits 8: int8 weights with one float32 scale per row). fp8: float8_e4m3fn weights with a
    float32 scale per row (`scales`), x rounded to float8 per row as reference.fp8_linear does."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m, n = rows.shape[0], weight.shape[0]
    if m > GEMV_MAX_ROWS:
        raise ValueError(f"gemv takes at most {GEMV_MAX_ROWS} rows, got {m}")
    out = _empty((m, n), x.dtype, x.device)
    if m and n:
        block_n, block_k, warps, stages, *variant = config or GEMV_CONFIGS[0 if fp8 else bits]
        if variant and variant[0] == GEMV_WORDS:
            if not fp8 and _takes_words(weight, k, bits, group_size):
                _gemv_words(rows, weight, scales, offsets, bias, out, bits, group_size, block_n, block_k, warps)
                return out.reshape(*x.shape[:-1], n)
            block_n, block_k, warps, stages = GEMV_TILED_CONFIGS.get(bits, (block_n, block_k, warps, stages))[:4]
        if group_size:
            block_k = max(block_k, group_size)  # whole groups per tile (group sizes are powers of two)
        _gemv_kernel[(triton.cdiv(n, block_n),)](
            *_product_operands(rows, weight, scales, offsets, bias, out),
            ROWS=m,
            ROWS_P2=_pow2(m),
            BITS=bits,
            GROUP=group_size,
            ROW_SCALE=(bits == 8 and not group_size) or fp8,
            HAS_OFFSET=offsets is not None,
            HAS_BIAS=bias is not None,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            JOIN=bits == 4 and bool(variant and variant[0] == GEMV_JOIN),
            FP8_X=fp8,
            num_warps=warps,
            num_stages=stages,
        )
    return out.reshape(*x.shape[:-1], n)


@triton.jit
def _dequantize_kernel(
    w_ptr,
    scale_ptr,
    offset_ptr,
    out_ptr,
    N,
    K,
    stride_wn,
    stride_sn,
    stride_on,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[n, k] = w[n, k] * scale (+ offset), rounded once to out's dtype: reference.dequantize
    (GROUP 0: int8 weights with a float32 scale per row)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rn < N)[:, None] & (rk < K)[None, :]
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
    s_rows = scale_ptr + rn[:, None].to(tl.int64) * stride_sn
    if BITS == 4:
        byte = tl.load(w_rows + rk[None, :] // 2, mask=mask, other=0).to(tl.int32)
        w = _small_int_to_float((byte >> ((rk[None, :] % 2) * 4)) & 15, 0)
    else:
        w = _small_int_to_float(tl.load(w_rows + rk[None, :], mask=mask, other=0).to(tl.int32) + 128, 128)
    if GROUP > 0:
        group = rk[None, :] // GROUP
        w *= tl.load(s_rows + group, mask=mask, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            w += tl.load(offset_ptr + rn[:, None].to(tl.int64) * stride_sn + group, mask=mask, other=0.0).to(tl.float32)
    else:
        w *= tl.load(s_rows, mask=rn[:, None] < N, other=0.0).to(tl.float32)
    out = out_ptr + rn[:, None].to(tl.int64) * stride_on + rk[None, :]
    tl.store(out, _cast(w, out_ptr.dtype.element_ty), mask=mask)


if gluon is not None:

    @gluon.jit
    def _dequantize_words_kernel(
        w_ptr,
        scale_ptr,
        offset_ptr,
        out_ptr,
        N,
        K,
        stride_wn,
        stride_sn,
        stride_on,
        one_bits,
        GROUP: gl.constexpr,
        HAS_OFFSET: gl.constexpr,
        BLOCK_N: gl.constexpr,
        BLOCKS: gl.constexpr,
        LAYOUT: gl.constexpr,
    ):
        """_dequantize_kernel's out[n, k] for 4-bit weights read as 32-bit words, as
        _gemv_words_kernel reads them (LAYOUT: [BLOCK_N, BLOCKS, 4 words, 8 values], a block of 32
        columns a thread): one load of a block's words, its scale (and offset), one multiply-add a
        value, 64 contiguous bytes of bfloat16 stored. The triton.jit kernel loads a scale and an
        offset for every value: on an H200 it dequantized an 8B-shaped model's 4-bit weights at
        0.09 TB/s (52 ms a decode step of more than GEMV_MAX_ROWS rows). (8-bit weights keep it: it
        loads int8's one scale a row once, and H200 run 6 timed int8's batch-64 decode step at
        26.5 ms through an 8-bit form of this kernel against 12.3 through it.)

        With f = 1 + q / 16 (_word_values), a value s * q + o of a group is
        16 * s * f + (o - 16 * s): one multiply-add, rounded once (float16 scales: s * q is exact
        in float32, so this is the reference's value)."""
        WORDS3: gl.constexpr = gl.SliceLayout(3, LAYOUT)  # [BLOCK_N, BLOCKS, 4]
        SCALES: gl.constexpr = gl.SliceLayout(2, WORDS3)  # [BLOCK_N, BLOCKS]
        first_row = gl.program_id(0) * BLOCK_N
        first_block = gl.program_id(1) * BLOCKS

        rn = first_row + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, SCALES))
        block = first_block + gl.arange(0, BLOCKS, layout=gl.SliceLayout(0, SCALES))
        word_in_block = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, WORDS3)))
        word = block[None, :, None] * 4 + word_in_block[None, None, :]
        word_mask = (rn < N)[:, None, None] & (word < K // 8)
        words = gl.load(w_ptr + rn[:, None, None].to(gl.int64) * stride_wn + word, mask=word_mask, other=0)
        words = words.to(gl.uint32, bitcast=True)[:, :, :, None]
        VALUE: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LAYOUT)))
        value = gl.arange(0, 8, layout=VALUE)[None, None, None, :]
        f = _word_values(words, value, one_bits, 4)

        scale_mask = (rn < N)[:, None] & (block * 32 < K)[None, :]
        group = rn[:, None].to(gl.int64) * stride_sn + ((block * 32) // GROUP)[None, :]
        scale = gl.load(scale_ptr + group, mask=scale_mask, other=0.0).to(gl.float32)
        shift = -16 * scale
        if HAS_OFFSET:
            shift += gl.load(offset_ptr + group, mask=scale_mask, other=0.0).to(gl.float32)
        w = f * (16 * scale)[:, :, None, None] + shift[:, :, None, None]

        row4 = first_row + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, WORDS3)))
        column = (block[None, :, None] * 32 + word_in_block[None, None, :] * 8)[:, :, :, None] + value
        out = out_ptr + row4[:, None, None, None].to(gl.int64) * stride_on + column
        gl.store(out, w.to(out_ptr.dtype.element_ty), mask=(row4 < N)[:, None, None, None] & (column < K))


def _dequantized(
    words: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bits: int,
    group_size: int,
    k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The weight in `dtype` [n, k], one pass over its integers (group_size 0: a scale per row)."""
    n = words.shape[0]
    out = _empty((n, k), dtype, words.device)
    if n and k and bits == 4 and _takes_words(words, k, bits, group_size):
        block_n, blocks, warps = 16, 8, 4
        words32 = _int32_words(words)
        _dequantize_words_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, blocks * 32))](
            words32,
            scales,
            offsets if offsets is not None else scales,
            out,
            n,
            k,
            words32.stride(0),
            scales.stride(0),
            out.stride(0),
            _ONE_BITS[4],
            GROUP=group_size,
            HAS_OFFSET=offsets is not None,
            BLOCK_N=block_n,
            BLOCKS=blocks,
            LAYOUT=_dequantize_layout(block_n, blocks, warps),
            num_warps=warps,
        )
    elif n and k:
        block_n, block_k = 16, 256
        _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
            words,
            scales,
            offsets if offsets is not None else scales,
            out,
            n,
            k,
            words.stride(0),
            scales.stride(0),
            out.stride(0),
            BITS=bits,
            GROUP=group_size,
            HAS_OFFSET=offsets is not None,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_warps=4,
        )
    return out


def _quantized_product(
    x: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None,
    gemv_rows: int,
) -> torch.Tensor:
    """x @ dequantize(words).T + bias: the GEMV up to `gemv_rows` rows of x, the weight dequantized
    to x's dtype and cuBLAS beyond (group_size 0: 8 bits with a float32 scale per row)."""
    k = x.shape[-1]
    if x.numel() <= gemv_rows * k:
        return gemv(x, words, bias, scales=scales, offsets=offsets, bits=bits, group_size=group_size)
    return reference.linear(x, _dequantized(words, scales, offsets, bits, group_size, k, x.dtype), bias)


def _check_features(x: torch.Tensor, k: int) -> None:
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but the weight {k}")


def grouped_linear(
    x: torch.Tensor, weight: TritonGroupWeights, bias: torch.Tensor | None = None, gemv_rows: int = GEMV_MAX_ROWS
) -> torch.Tensor:
    """x @ dequantize(weight).T + bias (reference.grouped_linear), by _quantized_product's routes."""
    _check_features(x, weight.k)
    return _quantized_product(
        x, weight.words, weight.scales, weight.offsets, weight.bits, weight.group_size, bias, gemv_rows
    )


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    gemv_rows: int = GEMV_MAX_ROWS,
) -> torch.Tensor:
    """x @ (weight * scale[:, None]).T + bias for int8 weights with a scale per output row
    (reference.int8_weight_linear), by _quantized_product's routes."""
    _check_features(x, weight.shape[1])
    return _quantized_product(x, weight, scale.reshape(-1, 1), None, 8, 0, bias, gemv_rows)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    gemv_rows: int = GEMV_MAX_ROWS,
) -> torch.Tensor:
    """reference.fp8_linear (float8 weights with a scale per row, x rounded to float8 per token):
    the GEMV for decode's rows (torch._scaled_mm pads a product to 16 rows and read an 8B-shaped
    model's float8 weights at 0.4 TB/s at one row on an H200), _scaled_mm beyond."""
    _check_features(x, weight.shape[1])
    if x.numel() <= gemv_rows * x.shape[-1]:
        return gemv(x, weight, bias, scales=scale.float().reshape(-1, 1), bits=16, fp8=True)
    return reference.fp8_linear(x, weight, scale, bias)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gemv_rows: int = DENSE_GEMV_MAX_ROWS
) -> torch.Tensor:
    """x @ weight.T + bias for dense weights: the GEMV up to `gemv_rows` rows of x, cuBLAS beyond."""
    if x.numel() <= gemv_rows * weight.shape[1] and x.dtype == weight.dtype:
        return gemv(x, weight, bias)
    return reference.linear(x, weight, bias)
