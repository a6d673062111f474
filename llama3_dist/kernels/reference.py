"""Plain torch implementations of every kernel: the CPU path and the oracle for the Triton tests.

Shapes: N = tokens in the flat ragged batch, B = sequences, Hq/Hk = query/KV heads on this rank,
d = head_dim. A paged cache is [num_blocks, block_size, Hk, d]; slot = page * block_size + offset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
    return attend_ragged(
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        context_lens,
        lambda rows, k, v, first: _attend(rows, k, v, first, scale, sliding_window),
    )


def attend_ragged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor],
) -> torch.Tensor:
    """prefill_attention's walk over a ragged batch: for each sequence with queries, its cached
    K/V gathered ([context, Hk, d]) and attend(its query rows, k, v, the first row's position)."""
    out = torch.empty_like(q)
    starts, lens = query_start_loc.tolist(), context_lens.tolist()
    for b, ctx in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        k = _gather_blocks(k_cache, block_tables[b], ctx)
        v = _gather_blocks(v_cache, block_tables[b], ctx)
        out[s:e] = attend(q[s:e], k, v, ctx - (e - s))
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


FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel float8_e4m3fn: (fp8 weight, float32 scale per row), scale = max|w| / 448."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    return (w / scale[:, None]).to(torch.float8_e4m3fn), scale


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ (weight * scale[:, None]).T + bias for float8_e4m3fn weights with a scale per output row,
    x rounded to float8 with a scale per row (token) of its own: FP8 W8A8 with dynamic per-token
    activation scales, as vLLM serves FP8 checkpoints. The float8 product (fp8_product) runs on
    the FP8 tensor cores of GPUs of compute capability 8.9+ (torch._scaled_mm) and upcast on CPUs;
    both scales are applied after it, in float32, so a row's result does not depend on the rest
    of the batch."""
    k, n = x.shape[-1], weight.shape[0]
    rows = x.reshape(-1, k).float()
    x_scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    x8 = (rows / x_scale).to(torch.float8_e4m3fn)
    out = fp8_product(x8, weight, scaled_mm=x.is_cuda) * x_scale * scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def fp8_product(x8: torch.Tensor, weight: torch.Tensor, scaled_mm: bool) -> torch.Tensor:
    """x8 [m, k] @ weight [n, k].T, both float8_e4m3fn, in float32 (each product is exact there).
    scaled_mm: torch._scaled_mm, which wants every dimension in multiples of 16 (rows of x8 are
    padded; a k or n off them, which no real model has, pads a copy of the weight too, with zeros
    that add nothing); without it, both upcast and a float32 matmul: torch's CPU _scaled_mm is
    ~10x slower than that."""
    m, k = x8.shape
    n = weight.shape[0]
    if not scaled_mm:
        return x8.float() @ weight.float().t()

    def padded(t: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        pad = (0, -columns % 16, 0, -rows % 16)
        return torch.nn.functional.pad(t.view(torch.uint8), pad).view(torch.float8_e4m3fn) if any(pad) else t

    one = torch.ones((), device=x8.device)
    product = torch._scaled_mm(
        padded(x8, m, k), padded(weight, n, k).t(), scale_a=one, scale_b=one, out_dtype=torch.float32
    )
    return product[:m, :n]


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (int8 weight, float32 scale per row), scale = max|w| / 127."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


# Coded group scales (GroupQuantized.factors): groups of a row share a scale factor and an offset
# factor in runs of this many (cpu_kernels.cpp's FACTOR_GROUPS).
FACTOR_GROUPS = 8


@dataclass(frozen=True)
class GroupQuantized:
    """Weights as small integers with a scale, and for 4 bits an offset, per group of
    `group_size` consecutive input features of each row:
    w[o, i] = values[o, i] * scale[o, i // group_size] + offset[o, i // group_size].

    The one logical form of every group-wise type: llama.cpp's Q8_0 (8 bits, symmetric, groups
    of 32), Q4_0 (4 bits, offset -8 * scale) and Q4_1, our int4 (quantize_int4) and our 6-bit LM
    heads (quantize_int6_groups: symmetric, values -32..31). Kernels repack it into their own
    layout (cpu.pack_grouped); those without a 6-bit or coded one read plain().

    Scales and offsets are float16 as stored, or (4 bits, `factors` given: our int4) coded:
    `scales` uint8 and `offsets` int8 codes, and factors bfloat16 [n, ceil(groups /
    FACTOR_GROUPS), 2], the scale and offset factors of each run of FACTOR_GROUPS groups; a
    group's scale is its code times its run's scale factor, its offset likewise, each product
    a float16 exactly (quantize_int4 makes the factors so). bfloat16, not float16: a factor is
    about 1/255 of a scale, below float16's normal range for most models' weights, and
    widening float16 subnormals costs x86 CPUs a microcode assist each (2x slower decode). A
    decode step reads 2.5 bytes of them per group of 32 instead of 4; kernels that read no
    codes take plain(), the same values."""

    values: torch.Tensor  # int8 [n, k]: 0..15 for 4 bits, -32..31 for 6, -128..127 for 8
    scales: torch.Tensor  # float16 [n, ceil(k / group_size)] (coded: uint8)
    offsets: torch.Tensor | None  # float16 like scales for 4 bits (coded: int8); None for 6 and 8 (symmetric)
    bits: int
    group_size: int
    factors: torch.Tensor | None = None  # coded scales: bfloat16 [n, ceil(groups / FACTOR_GROUPS), 2]

    def __post_init__(self) -> None:
        if self.bits not in (4, 6, 8) or (self.bits == 4) != (self.offsets is not None):
            raise ValueError(f"{self.bits}-bit groups take offsets exactly when 4-bit (4, 6 or 8 bits)")
        n, groups = self.values.shape[0], -(-self.values.shape[1] // self.group_size)
        if self.factors is None:
            dtypes: tuple[torch.dtype, torch.dtype | None] = (torch.float16, torch.float16)
        else:
            dtypes = (torch.uint8, torch.int8)
            runs = -(-groups // FACTOR_GROUPS)
            if self.factors.shape != (n, runs, 2) or self.factors.dtype != torch.bfloat16:
                raise ValueError(f"factors must be bfloat16 {[n, runs, 2]}, got {self.factors.dtype} "
                                 f"{list(self.factors.shape)}")  # fmt: skip
        if self.scales.shape != (n, groups) or self.scales.dtype != dtypes[0]:
            raise ValueError(f"scales must be {dtypes[0]} {[n, groups]}, got {self.scales.dtype} "
                             f"{list(self.scales.shape)}")  # fmt: skip
        if self.offsets is not None and (self.offsets.shape != (n, groups) or self.offsets.dtype != dtypes[1]):
            raise ValueError(f"offsets must be {dtypes[1]} {[n, groups]}, got {self.offsets.dtype} "
                             f"{list(self.offsets.shape)}")  # fmt: skip

    def float_scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each group's scale and offset (None: symmetric 8 bits) as float32, exactly."""
        if self.factors is None:
            return self.scales.float(), None if self.offsets is None else self.offsets.float()
        assert self.offsets is not None
        factors = self.factors.float().repeat_interleave(FACTOR_GROUPS, dim=1)[:, : self.scales.shape[1]]
        return self.scales.float() * factors[..., 0], self.offsets.float() * factors[..., 1]

    def plain(self) -> GroupQuantized:
        """This weight, the same values, in the forms every kernel reads: float16 scales and
        offsets (not coded), 6-bit values as 8-bit ones."""
        if self.bits == 6:
            return GroupQuantized(self.values, self.scales, None, 8, self.group_size)
        if self.factors is None:
            return self
        scales, offsets = self.float_scales()
        assert offsets is not None
        return GroupQuantized(self.values, scales.half(), offsets.half(), self.bits, self.group_size)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.values.shape[0], self.values.shape[1])

    def rows(self, start: int, stop: int) -> GroupQuantized:
        offsets = None if self.offsets is None else self.offsets[start:stop]
        factors = None if self.factors is None else self.factors[start:stop]
        return GroupQuantized(
            self.values[start:stop], self.scales[start:stop], offsets, self.bits, self.group_size, factors
        )

    def to(self, device: torch.device | str) -> GroupQuantized:
        offsets = None if self.offsets is None else self.offsets.to(device)
        factors = None if self.factors is None else self.factors.to(device)
        return GroupQuantized(
            self.values.to(device), self.scales.to(device), offsets, self.bits, self.group_size, factors
        )

    @staticmethod
    def cat(parts: list[GroupQuantized]) -> GroupQuantized:
        """Row-wise concatenation (fused q|k|v, gate|up) of parts of one type (coded scales stay
        coded where every part has them)."""
        first = parts[0]
        if any((p.bits, p.group_size, p.shape[1]) != (first.bits, first.group_size, first.shape[1]) for p in parts):
            raise ValueError("fused weights must share one quantized type, group size and width")
        if any(p.factors is None for p in parts):
            parts = [p.plain() for p in parts]
        offsets = None if first.offsets is None else torch.cat([p.offsets for p in parts if p.offsets is not None])
        factors = None if parts[0].factors is None else torch.cat([p.factors for p in parts if p.factors is not None])
        return GroupQuantized(
            torch.cat([p.values for p in parts]), torch.cat([p.scales for p in parts]), offsets, first.bits,
            first.group_size, factors,
        )  # fmt: skip


def dequantize(weight: GroupQuantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight as `dtype`: each value computed in float32 and rounded once."""
    k = weight.shape[1]
    expand = lambda t: t.repeat_interleave(weight.group_size, dim=1)[:, :k]  # noqa: E731
    scales, offsets = weight.float_scales()
    values = weight.values.float() * expand(scales)
    if offsets is not None:
        values = values + expand(offsets)
    return values.to(dtype)


def grouped_linear(x: torch.Tensor, weight: GroupQuantized, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequantize(weight).T + bias, the weight dequantized to x's dtype per call (correct
    everywhere; the CPU library's GEMV serves decode without dequantizing)."""
    return torch.nn.functional.linear(x, dequantize(weight, x.dtype), bias)


def quantize_int8_groups(weight: torch.Tensor, group_size: int = 32) -> GroupQuantized:
    """Group-wise symmetric 8 bits (llama.cpp's Q8_0 for groups of 32): per group scale =
    max|w| / 127 (rounded to float16), values = round(w / scale) in -127..127. A last group may
    be partial."""
    return _symmetric_groups(weight, group_size, 8)


def quantize_int6_groups(weight: torch.Tensor, group_size: int = 32) -> GroupQuantized:
    """Group-wise symmetric 6 bits (the LM head of int4 models, as llama.cpp's Q4_K_M files keep
    theirs in Q6_K): per group scale = max|w| / 31 (rounded to float16), values = round(w /
    scale) in -31..31 (6.5 bits a weight with the scale). A last group may be partial."""
    return _symmetric_groups(weight, group_size, 6)


def _symmetric_groups(weight: torch.Tensor, group_size: int, bits: int) -> GroupQuantized:
    """Both symmetric forms: scale = max|w| / largest, values in -largest..largest."""
    largest = (1 << (bits - 1)) - 1

    def quantize(rows: torch.Tensor) -> GroupQuantized:
        n, k = rows.shape
        groups = -(-k // group_size)
        padded = torch.nn.functional.pad(rows.float(), (0, groups * group_size - k)).view(n, groups, group_size)
        scales = (padded.abs().amax(dim=2) / float(largest)).to(torch.float16)
        divisor = torch.where(scales.float() > 0, scales.float(), torch.ones(()))  # an all-zero group stays 0
        values = torch.round(padded / divisor[:, :, None]).clamp(-largest, largest).view(n, groups * group_size)
        return GroupQuantized(values[:, :k].to(torch.int8).contiguous(), scales, None, bits, group_size)

    return _in_row_chunks(quantize, weight)


# Weights quantized or packed at once: their float32 or int64 temporaries (~20-35 bytes a weight)
# stay ~100 MB, where a whole LM head (Llama-3-8B's: 525M weights) would take ~10-18 GB.
CHUNK_ELEMENTS = 1 << 22


def row_chunks(n: int, k: int, multiple: int = 1) -> list[slice]:
    """n rows of k values as slices of about CHUNK_ELEMENTS values each, a multiple of `multiple`
    rows (the last may be shorter): work done a slice at a time bounds its temporaries."""
    rows = max(multiple, CHUNK_ELEMENTS // max(k, 1) // multiple * multiple)
    return [slice(start, start + rows) for start in range(0, n, rows)]


def _in_row_chunks(quantize: Callable[[torch.Tensor], GroupQuantized], weight: torch.Tensor) -> GroupQuantized:
    """quantize(weight) a chunk of rows at a time (every form here quantizes each row on its
    own), the parts' tensors concatenated: the same GroupQuantized as one pass."""
    chunks = row_chunks(weight.shape[0], weight.shape[1])
    if len(chunks) == 1:
        return quantize(weight)
    parts = [quantize(weight[chunk]) for chunk in chunks]

    def joined(name: str) -> torch.Tensor | None:
        tensors = [getattr(part, name) for part in parts]
        return None if tensors[0] is None else torch.cat(tensors)

    values, scales = joined("values"), joined("scales")
    assert values is not None and scales is not None
    first = parts[0]
    return GroupQuantized(values, scales, joined("offsets"), first.bits, first.group_size, joined("factors"))


def quantize_int4(weight: torch.Tensor, group_size: int) -> GroupQuantized:
    """Group-wise asymmetric 4 bits with coded scales (_quantize_int4_rows), a chunk of rows at a
    time."""
    return _in_row_chunks(lambda rows: _quantize_int4_rows(rows, group_size), weight)


def _quantize_int4_rows(weight: torch.Tensor, group_size: int) -> GroupQuantized:
    """Group-wise asymmetric 4 bits with coded scales: per group, offset = its minimum and scale =
    (max - min) / 15, each coded in 8 bits against a factor shared by FACTOR_GROUPS groups (the
    run's largest scale / 255, its largest |offset| / 127, rounded up to 3 and 4 significant bits
    and to a multiple of 2^-24: every code times its factor is then a float16 exactly, so kernels
    without codes read the same values as float16), codes to nearest; then values = round((w -
    offset) / scale) in 0..15 against the coded scale and offset. A last group (and run) may be
    partial (k need not divide)."""
    n, k = weight.shape
    groups = -(-k // group_size)
    runs = -(-groups // FACTOR_GROUPS)
    w = weight.float()
    padded = torch.nn.functional.pad(w, (0, groups * group_size - k), value=float("nan")).view(n, groups, group_size)
    low = torch.nan_to_num(padded, nan=float("inf")).amin(dim=2)
    high = torch.nan_to_num(padded, nan=float("-inf")).amax(dim=2)

    def coded(wanted: torch.Tensor, largest_code: int, digits: int) -> tuple[torch.Tensor, torch.Tensor]:
        # [n, groups] -> codes and each run's factor (`digits` significant bits: largest_code
        # times it stays below 2^11, float16's significand); a run of zeros keeps factor 0
        by_run = torch.nn.functional.pad(wanted, (0, runs * FACTOR_GROUPS - groups)).view(n, runs, FACTOR_GROUPS)
        needed = by_run.abs().amax(dim=2) / largest_code
        exponent = torch.floor(torch.log2(needed.clamp(min=2.0**-24))) - (digits - 1)
        quantum = torch.exp2(exponent.clamp(min=-24))
        factor = torch.ceil(needed / quantum) * quantum
        divisor = torch.where(factor > 0, factor, torch.ones(()))
        codes = torch.round(by_run / divisor[:, :, None]).clamp(-largest_code, largest_code)
        return codes.view(n, runs * FACTOR_GROUPS)[:, :groups], factor.to(torch.bfloat16)  # exactly

    scale_codes, scale_factors = coded((high - low) / 15.0, 255, 3)
    offset_codes, offset_factors = coded(low, 127, 4)
    factors = torch.stack([scale_factors, offset_factors], dim=2)
    repeat = lambda t: t.float().repeat_interleave(FACTOR_GROUPS, dim=1)[:, :groups]  # noqa: E731
    scales = scale_codes * repeat(scale_factors)
    offsets = offset_codes * repeat(offset_factors)
    # A constant group (scale 0) dequantizes to its offset whatever the values.
    divisor = torch.where(scales > 0, scales, torch.ones(()))
    values = torch.round((padded - offsets[:, :, None]) / divisor[:, :, None]).clamp(0, 15)
    values = torch.nan_to_num(values, nan=0.0).view(n, groups * group_size)[:, :k].to(torch.int8)
    return GroupQuantized(
        values.contiguous(), scale_codes.to(torch.uint8), offset_codes.to(torch.int8), 4, group_size,
        factors.contiguous(),
    )  # fmt: skip
