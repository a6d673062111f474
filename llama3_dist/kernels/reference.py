"""Plain torch implementations of every kernel: the CPU path and the oracle for the Triton tests.

Shapes: N = tokens in the flat ragged batch, B = sequences, Hq/Hk = query/KV heads on this rank,
d = head_dim. A paged cache is [num_pages, page_size, Hk, d]; slot = page * page_size + offset.
"""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (norm(h), h) with h = x + residual (or x). Statistics in float32, as transformers."""
    h = x if residual is None else x + residual
    hf = h.float()
    out = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if weight is not None:
        out = weight * out
    return out, h


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, interleaved: bool) -> None:
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


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Writes k, v [N, Hk, d] into the paged caches at slot_mapping [N]; slot -1 is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def _gather_pages(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence: [length, Hk, d]."""
    page_size = cache.shape[1]
    n_pages = (length + page_size - 1) // page_size
    return cache[block_table[:n_pages].long()].flatten(0, 1)[:length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
            scale: float, sliding_window: int | None) -> torch.Tensor:
    """q [Tq, Hq, d] at absolute positions q_pos [Tq]; k, v [Tk, Hk, d] at positions 0..Tk-1."""
    k_pos = torch.arange(k.shape[0], device=q.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed,
        scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                      context_lens: torch.Tensor, scale: float,
                      sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention for a ragged batch whose K/V are already in the cache.

    Sequence b owns queries q[query_start_loc[b]:query_start_loc[b+1]], the last tokens of its
    context_lens[b] cached tokens (earlier tokens come from the prefix cache or earlier chunks).
    """
    out = torch.empty_like(q)
    starts, lens = query_start_loc.tolist(), context_lens.tolist()
    for b, ctx in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        k = _gather_pages(k_cache, block_tables[b], ctx)
        v = _gather_pages(v_cache, block_tables[b], ctx)
        q_pos = torch.arange(ctx - (e - s), ctx, device=q.device)
        out[s:e] = _attend(q[s:e], k, v, q_pos, scale, sliding_window)
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    """One query token per sequence (q [B, Hq, d], the last of its context) against its pages.

    All sequences are gathered at once, padded to the longest context and masked, so a decode
    step costs one attention call per layer instead of one per sequence.
    """
    B, page_size = q.shape[0], k_cache.shape[1]
    max_len = int(context_lens.max())
    n_pages = (max_len + page_size - 1) // page_size
    pages = block_tables[:, :n_pages].long().clamp_min(0)
    k = k_cache[pages].flatten(1, 2)[:, :max_len]  # [B, T, Hk, d]
    v = v_cache[pages].flatten(1, 2)[:, :max_len]
    k_pos = torch.arange(max_len, device=q.device)
    q_pos = (context_lens.long() - 1)[:, None]
    # Slots past a sequence's length (padding pages, the tail of its last page) hold whatever
    # the cache held (torch.empty garbage: NaN/inf); masking the scores is not enough, as
    # 0 * NaN = NaN in the softmax @ V product and NaN + -inf = NaN in the masked scores.
    unwritten = (k_pos[None, :] > q_pos)[:, :, None, None]
    k = k.masked_fill(unwritten, 0)
    v = v.masked_fill(unwritten, 0)
    allowed = k_pos[None, :] <= q_pos
    if sliding_window is not None:
        allowed &= k_pos[None, :] > q_pos - sliding_window
    out = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed[:, None, None, :],
        scale=scale, enable_gqa=q.shape[1] != k.shape[2])  # [B, Hq, 1, d]
    return out.squeeze(2)
