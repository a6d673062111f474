"""Plain torch implementations of every kernel: the CPU path and the oracle for the Triton tests.

Shapes: N = tokens in the flat ragged batch, B = sequences, Hq/Hk = query/KV heads on this rank,
d = head_dim. A paged cache is [num_blocks, block_size, Hk, d]; slot = page * block_size + offset.
"""

from __future__ import annotations

import torch


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (norm(h), h) with h = x + residual (or x). Statistics in float32, as transformers."""
    h = x if residual is None else x + residual
    hf = h.float()
    out = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if weight is not None:
        out = weight * out
    return out, h


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, interleaved: bool
) -> None:
    """Rotates the first rotary_dim features of every head of q [N, Hq, d] and k [N, Hk, d] in place.

    cos_sin_cache is [max_pos, rotary_dim] float32: cos in the first half, sin in the second.
    rotate-half pairs feature i with i + rotary_dim/2 (Hugging Face layout); interleaved pairs
    2i with 2i+1 (GGUF layout).
    """
    rot = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)  # [N, 1, rot/2]
    for x in (q, k):
        xr = x[..., :rot]
        if interleaved:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = xr.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        xr.copy_(out)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x is [N, 2I] laid out [gate | up]; returns SiLU(gate) * up, [N, I]."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def store_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Writes k, v [N, Hk, d] into the paged caches at slot_mapping [N]; slot -1 is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def _gather_blocks(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence: [length, Hk, d]."""
    block_size = cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    return cache[block_table[:n_blocks].long()].flatten(0, 1)[:length]


# Queries attended in blocks of this many rows bound the float32 score matrix of a long prefill.
_Q_BLOCK = 256


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos0: int, scale: float, sliding_window: int | None
) -> torch.Tensor:
    """q [Tq, Hq, d] at positions q_pos0.. attending to k, v [Tk, Hk, d] at positions 0..Tk-1.

    Float32 math with GQA as a view (query heads grouped under their KV head, no K/V copy):
    on CPUs without native bfloat16 this is several times faster than SDPA's bfloat16 path,
    and it never reads a slot past the context, so unwritten cache slots cannot leak in.
    """
    tq, hq, d = q.shape
    tk, hk = k.shape[0], k.shape[1]
    g = hq // hk
    kt = k.float().permute(1, 2, 0)  # [Hk, d, Tk]
    vt = v.float().transpose(0, 1)  # [Hk, Tk, d]
    out = torch.empty(tq, hq, d, dtype=q.dtype, device=q.device)
    for r0 in range(0, tq, _Q_BLOCK):
        t = min(_Q_BLOCK, tq - r0)
        # Rows ordered (group, token) under each KV head: both products are batched over KV heads.
        qb = (q[r0 : r0 + t].float() * scale).view(t, hk, g, d).permute(1, 2, 0, 3).reshape(hk, g * t, d)
        scores = torch.matmul(qb, kt).view(hk, g, t, tk)
        first = q_pos0 + r0  # position of this block's first query
        if t > 1 or (sliding_window is not None and first + 1 > sliding_window):
            q_pos = torch.arange(first, first + t, device=q.device)[:, None]
            k_pos = torch.arange(tk, device=q.device)[None, :]
            allowed = k_pos <= q_pos
            if sliding_window is not None:
                allowed &= k_pos > q_pos - sliding_window
            scores.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(hk, g * t, tk)
        out[r0 : r0 + t] = torch.matmul(probs, vt).view(hk, g, t, d).permute(2, 0, 1, 3).reshape(t, hq, d)
    return out


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
    """Causal attention for a ragged batch whose K/V are already in the cache.

    Sequence b owns queries q[query_start_loc[b]:query_start_loc[b+1]], the last tokens of its
    context_lens[b] cached tokens (earlier tokens come from the prefix cache or earlier chunks).
    max_query_len is accepted for the kernels' common signature and not needed here.
    """
    out = torch.empty_like(q)
    starts, lens = query_start_loc.tolist(), context_lens.tolist()
    for b, ctx in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        k = _gather_blocks(k_cache, block_tables[b], ctx)
        v = _gather_blocks(v_cache, block_tables[b], ctx)
        out[s:e] = _attend(q[s:e], k, v, ctx - (e - s), scale, sliding_window)
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One query token per sequence (q [B, Hq, d], the last of its context) against its blocks:
    prefill attention with one query row each."""
    one_each = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return prefill_attention(q, k_cache, v_cache, block_tables, one_each, context_lens, scale, sliding_window)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def int8_weight_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ (weight * scale[:, None]).T for int8 weights with one scale per output channel: the
    weight widened to x's dtype per call (correct everywhere; the CPU library's GEMV serves the
    few-row decode case without widening). Not torch's _weight_int8pack_mm: in torch 2.13 its
    bfloat16 CPU kernel returns garbage when k is not a multiple of 16 and crashes for some k."""
    out = torch.nn.functional.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)
    return out if bias is None else out + bias


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (int8 weight, float32 scale per row), scale = max|w| / 127."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale
