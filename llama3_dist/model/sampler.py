"""The batched sampler, run on the rank that holds the logits.

The driver turns each running sequence's SamplingParams into one row of a `SamplingMetadata`
(plain numpy and lists: it is pickled to the worker every step). The worker holding the logits
runs `Sampler` on them and sends back token ids and, for rows that asked, log-probabilities.

Processing order follows vLLM: min_tokens masking, penalties, logit_bias and the grammar masks
of structured outputs (packed bitmasks the driver computed) on the logits; greedy rows take
the argmax; the others are divided by their temperature, filtered by min_p, top_k and top_p
(each keeps a top slice of the distribution, so together they are one probability threshold per
row), and sampled by inverse CDF with one uniform number per row. A seeded row draws that number
from (seed, step), so it is reproducible whatever else shares the batch and after preemption.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..core.sampling_metadata import PenaltyInputs, SamplingMetadata
from ..kernels import cpu as cpu_kernels
from ..outputs import TokenLogprobs
from ..sampling_params import SAMPLING_EPS


@dataclass(slots=True)
class SamplerOutput:
    token_ids: np.ndarray  # int64 [B]; empty until the host has them for a draw kept on the device
    logprobs: list[TokenLogprobs | None]  # per row; entry 0 is the sampled token
    device_token_ids: torch.Tensor | None = None  # [B] on the logits' device, for a draw kept there


class Sampler:
    """Samples one token per row of logits [B, V] (float32, any device); never modifies them.

    `seed` seeds the generator shared by unseeded rows (None: nondeterministic). The sampler keeps
    [B, V] work buffers between calls: on CPUs the page faults of fresh multi-megabyte tensors
    cost more than the arithmetic done in them. It runs under its caller's grad mode (the
    worker's inference mode): logits never require grad, so it records no graph either way.
    """

    def __init__(self, seed: int | None = None):
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(
        self, logits: torch.Tensor, meta: SamplingMetadata, keep_on_device: bool = False, scratch: bool = False
    ) -> SamplerOutput:
        """keep_on_device (CUDA logits, no logprobs asked): the token ids stay on the GPU
        (device_token_ids) and nothing here waits for it; the caller copies them back when it
        needs them. Otherwise token_ids are on the host when this returns. scratch: the caller
        has no further use for the logits, so bans, penalties, biases and grammar masks go into
        them in place (unless a row asks for logprobs, which are of the raw logits) instead of
        into a copy: one pass over [B, V] less."""
        b, v = logits.shape
        dev = logits.device
        if b != meta.batch_size:
            raise ValueError(f"logits have {b} rows but the sampling metadata {meta.batch_size}")
        no_logprobs = all(k is None for k in meta.num_logprobs)
        in_place = scratch and no_logprobs
        if keep_on_device and dev.type == "cuda" and no_logprobs:
            return SamplerOutput(np.empty(0, np.int64), [None] * b, self._draw_on_device(logits, meta, in_place))
        # Every row greedy with nothing to mask or score (most decode steps): the argmax alone, the
        # token the full path below picks, without its bookkeeping (a step's Python runs from caches
        # the weights have just streamed through).
        untouched = meta.penalties is None and meta.banned_rows is None and meta.bias is None
        if no_logprobs and untouched and meta.allowed_rows is None and (meta.temperature < SAMPLING_EPS).all():
            return SamplerOutput(_argmax(logits if logits.dtype == torch.float32 else logits.float()), [None] * b)
        # Rows whose grammar allows few tokens draw among those alone (below): no pass over V.
        sparse = _sparse_rows(meta, v) if dev.type == "cpu" else {}
        x = processed = self._processed(logits, meta, skip_mask_rows=sparse, in_place=in_place)

        greedy = meta.temperature < SAMPLING_EPS
        in_sparse = np.zeros(b, bool)
        in_sparse[list(sparse)] = True
        r_rows = np.flatnonzero(~greedy & ~in_sparse)
        if len(r_rows) == 0:
            token_ids = _argmax(x) if greedy.any() else np.empty(b, np.int64)
        else:
            work = self._buffer("probs", len(r_rows), v, dev)
            if len(r_rows) < b:
                token_ids = _argmax(x)  # cheaper than gathering the greedy rows first
                _gather_rows(x, r_rows, work)
                x = work
            else:
                token_ids = np.empty(b, np.int64)
            token_ids[r_rows] = sample_filtered(
                x,
                meta.temperature[r_rows],
                meta.top_k[r_rows],
                meta.top_p[r_rows],
                meta.min_p[r_rows],
                self._uniforms(meta, r_rows),
                out=work,
                has_minus_inf=_has_minus_inf(meta),
            )
        if sparse:
            self._sample_sparse(processed, meta, sparse, token_ids)

        logprobs: list[TokenLogprobs | None] = [None] * b
        asked = {i: k for i, k in enumerate(meta.num_logprobs) if k is not None}
        lp_rows = list(asked)
        if lp_rows:
            rows = logits if len(lp_rows) == b else logits[_t(np.array(lp_rows), dev)]
            computed = compute_logprobs(rows, token_ids[lp_rows], list(asked.values()))
            for i, lp in zip(lp_rows, computed):
                logprobs[i] = lp
        return SamplerOutput(token_ids, logprobs)

    def _draw_on_device(self, logits: torch.Tensor, meta: SamplingMetadata, in_place: bool = False) -> torch.Tensor:
        """The same draws as __call__ makes on a GPU (same uniforms, same filters), as a device
        tensor, with no host sync: greedy rows by argmax, the others over whole sorted rows."""
        _b, v = logits.shape
        dev = logits.device
        x = self._processed(logits, meta, in_place=in_place)
        token_ids = x.argmax(dim=-1)
        greedy = meta.temperature < SAMPLING_EPS
        if greedy.all():
            return token_ids
        r_rows = np.flatnonzero(~greedy)
        work = self._buffer("probs", len(r_rows), v, dev)
        torch.index_select(x, 0, _t(r_rows, dev), out=work)
        w = _weights(work, meta.temperature[r_rows], out=work, has_minus_inf=_has_minus_inf(meta))
        token_ids[_t(r_rows, dev)] = _draw_whole_rows(
            w, meta.top_k[r_rows], meta.top_p[r_rows], meta.min_p[r_rows], self._uniforms(meta, r_rows)
        )
        return token_ids

    def _sample_sparse(
        self, x: torch.Tensor, meta: SamplingMetadata, sparse: dict[int, np.ndarray], token_ids: np.ndarray
    ) -> None:
        """Rows under a grammar that allows at most SPARSE_MAX_FRACTION of the tokens: their processed
        logits gathered at those tokens (in id order, padded with -inf), then the same greedy
        pick or filtered draw (same uniform) as over the whole masked row; into token_ids."""
        rows = np.fromiter(sparse, np.int64, len(sparse))
        lengths = np.fromiter((len(ids) for ids in sparse.values()), np.int64, len(sparse))
        width = int(lengths.max())
        valid = np.arange(width)[None, :] < lengths[:, None]
        ids = np.zeros((len(rows), width), np.int64)
        ids[valid] = np.concatenate(list(sparse.values()))  # row-major: each row's ids in order
        dev = x.device
        if dev.type == "cpu" and x.is_contiguous():  # numpy's take: no advanced-indexing dispatch
            flat = np.take(x.numpy().reshape(-1), rows[:, None] * x.shape[1] + ids)
            cand = torch.from_numpy(np.where(valid, flat, np.float32(-np.inf)))
        else:
            cand = x[_t(rows, dev)[:, None], _t(ids, dev)].masked_fill_(~torch.from_numpy(valid).to(dev), float("-inf"))
        greedy = meta.temperature[rows] < SAMPLING_EPS
        picked = np.empty(len(rows), np.int64)
        if greedy.any():
            picked[greedy] = _argmax(cand[_t(np.flatnonzero(greedy), dev)])
        drawn = np.flatnonzero(~greedy)
        if len(drawn):
            r = rows[drawn]
            picked[drawn] = sample_filtered(
                cand[_t(drawn, dev)].contiguous(),
                meta.temperature[r],
                meta.top_k[r],
                meta.top_p[r],
                meta.min_p[r],
                self._uniforms(meta, r),
                has_minus_inf=True,
            )
        token_ids[rows] = ids[np.arange(len(rows)), picked]

    def _processed(
        self,
        logits: torch.Tensor,
        meta: SamplingMetadata,
        skip_mask_rows: dict[int, np.ndarray] | None = None,
        in_place: bool = False,
    ) -> torch.Tensor:
        """The logits that sampling draws from: min_tokens bans, penalties, logit_bias, then the
        grammar masks, in a copy (logprobs are of the raw logits) or, in_place, in the float32
        logits themselves; the logits themselves when no row has any of these. Rows in
        skip_mask_rows are left unmasked (_sample_sparse reads only their allowed tokens)."""
        b, v = logits.shape
        dev = logits.device
        x = logits.float()
        if meta.penalties is None and meta.banned_rows is None and meta.bias is None and meta.allowed_rows is None:
            return x
        if not (in_place and x is logits and x.is_contiguous()):
            x = self._buffer("penalised", b, v, dev).copy_(x)
        if meta.banned_rows is not None and meta.banned_ids is not None:
            x[_t(meta.banned_rows, dev), _t(meta.banned_ids, dev)] = float("-inf")
        if meta.penalties is not None:
            apply_penalties(x, meta.penalties)
        if meta.bias is not None:
            bias = meta.bias
            if bias.token_ids.max() >= v:
                raise ValueError(f"logit_bias token ids must be < {v}, got {bias.token_ids.max()}")
            x.index_put_((_t(bias.rows, dev), _t(bias.token_ids, dev)), _f(bias.values, dev), accumulate=True)
        bitmask = meta.bitmask()
        if meta.allowed_rows is not None and bitmask is not None:
            masked = np.array([r not in (skip_mask_rows or {}) for r in meta.allowed_rows.tolist()], bool)
            if masked.any():
                apply_token_bitmask(x, meta.allowed_rows[masked], bitmask[masked])
        return x

    def _buffer(self, name: str, rows: int, v: int, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < rows * v or buf.device != device:
            buf = self._buffers[name] = torch.empty(rows * v, dtype=torch.float32, device=device)
        return buf[: rows * v].view(rows, v)

    def _uniforms(self, meta: SamplingMetadata, rows: np.ndarray) -> np.ndarray:
        """One uniform number in [0, 1) per row: from (seed, step) for seeded rows, else from
        the shared generator."""
        u = torch.rand(len(rows), generator=self.generator, dtype=torch.float64, device="cpu").numpy()
        for j, i in enumerate(rows):
            if meta.seeds[i] is not None:
                u[j] = _seeded_uniform(meta.seeds[i], meta.steps[i])
        return u


_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _seeded_uniform(seed: int, step: int) -> float:
    """A counter-based draw: the same (seed, step) always gives the same number, with no
    generator state to carry across steps or preemption. SplitMix64, 53 bits."""
    z = _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))
    return (z >> 11) * 2.0**-53


def apply_penalties(logits: torch.Tensor, pen: PenaltyInputs) -> None:
    """vLLM's penalties, in place on logits [B, V]: repetition over prompt and output tokens
    (positive logits divided by it, others multiplied), then frequency (times each output
    token's count) and presence (once per distinct output token) subtracted."""
    _b, v = logits.shape
    dev = logits.device
    for ids in (pen.output_ids, pen.prompt_ids):
        if len(ids) and (ids.min() < 0 or ids.max() >= v):
            raise ValueError(
                f"penalty token ids must be in [0, {v}) for logits of vocabulary "
                f"{v}, got ids from {ids.min()} to {ids.max()}"
            )
    out_keys, counts = torch.unique(_t(pen.output_rows, dev) * v + _t(pen.output_ids, dev), return_counts=True)
    rep = torch.from_numpy(pen.repetition).to(dev)
    if (pen.repetition != 1.0).any():
        keys = torch.unique(torch.cat([_t(pen.prompt_rows, dev) * v + _t(pen.prompt_ids, dev), out_keys]))
        r, t = keys // v, keys % v
        vals, p = logits[r, t], rep[r]
        logits[r, t] = torch.where(vals > 0, vals / p, vals * p)
    r, t = out_keys // v, out_keys % v
    freq = torch.from_numpy(pen.frequency).to(dev)
    pres = torch.from_numpy(pen.presence).to(dev)
    logits[r, t] -= freq[r] * counts.to(logits.dtype) + pres[r]


_BIT_POSITIONS: dict[torch.device, torch.Tensor] = {}


def apply_token_bitmask(logits: torch.Tensor, rows: np.ndarray, bitmask: np.ndarray) -> None:
    """In place on logits [B, V]: in each of `rows`, tokens whose bit is clear in that row of
    bitmask (int32 words [R, W], bit t % 32 of word t // 32) become -inf, as do tokens past
    W * 32 (logits padded beyond the tokenizer's vocabulary)."""
    _b, v = logits.shape
    dev = logits.device
    words = np.ascontiguousarray(bitmask, np.int32)
    width = min(v, words.shape[1] * 32)
    library = _library(logits)
    if library is not None:
        # The CPU library reads the words as they are (~10x cheaper than unpacking them first).
        library.apply_token_bitmask(logits, rows, words)
        return
    shifts = _BIT_POSITIONS.get(dev)
    if shifts is None:
        shifts = _BIT_POSITIONS[dev] = torch.arange(32, dtype=torch.int32, device=dev)
    w = torch.from_numpy(words).to(dev, non_blocking=True)
    refused = ((w[:, :, None] >> shifts) & 1).flatten(1)[:, :width] == 0  # [R, width]
    rows_t = _t(rows, dev)
    logits[rows_t, :width] = logits[rows_t, :width].masked_fill_(refused, float("-inf"))
    if width < v:
        logits[_t(rows, dev), width:] = float("-inf")


def _library(logits: torch.Tensor) -> cpu_kernels.KernelLibrary | None:
    """The compiled CPU library where it serves these logits (float32 on the CPU, rows
    contiguous), else None (the torch path: GPUs, CPUs without the library)."""
    return cpu_kernels.kernels_for(logits) if logits.dtype == torch.float32 and logits.stride(1) == 1 else None


def sample_filtered(
    logits: torch.Tensor,  # [R, V], float32
    temperature: np.ndarray,  # [R], all >= SAMPLING_EPS
    top_k: np.ndarray,  # [R], 0 = off
    top_p: np.ndarray,  # [R]
    min_p: np.ndarray,  # [R]
    u: np.ndarray,  # [R] uniforms in [0, 1)
    out: torch.Tensor | None = None,  # [R, V] float32 work buffer; may be `logits` itself
    has_minus_inf: bool = False,  # some logits are -inf (masked) or far below the rest
) -> np.ndarray:
    """Temperature, then min_p / top_k / top_p filtering, then one draw per row. Returns [R]."""
    r, v = logits.shape
    dev = logits.device
    top_k = np.where(top_k >= v, 0, top_k)
    library = _library(logits)
    if library is not None:  # every row in one call: no sort of whole rows or candidate blocks
        weights = out if out is not None and out.is_contiguous() else torch.empty(r, v)
        return library.sample_logits(logits, temperature, top_k, top_p, min_p, u, weights)
    w = _weights(logits, temperature, out, has_minus_inf)
    filtered = (top_k > 0) | (top_p < 1.0) | (min_p > 0.0)
    if dev.type == "cuda" and filtered.any():
        # A GPU sorts whole rows quickly, and sizing candidate blocks (below) would cost host
        # syncs: one draw over the whole rows, filters off where a row has none.
        return _draw_whole_rows(w, top_k, top_p, min_p, u).cpu().numpy()
    if filtered.all():
        return _sample_top(w, top_k, top_p, min_p, u)
    if not filtered.any():
        return _inverse_cdf(w, u).cpu().numpy()
    f_rows, n_rows = np.flatnonzero(filtered), np.flatnonzero(~filtered)
    tokens = np.empty(r, np.int64)
    tokens[n_rows] = _inverse_cdf(w[_t(n_rows, dev)], u[n_rows]).cpu().numpy()
    tokens[f_rows] = _sample_top(w[_t(f_rows, dev)], top_k[f_rows], top_p[f_rows], min_p[f_rows], u[f_rows])
    return tokens


# exp() of float32 below this underflows; torch's CPU exp takes a path ~20x slower for such inputs
# (-inf included), so masked rows are clamped here first and their weights zeroed after.
_EXP_FLOOR = -87.0
_WEIGHT_FLOOR = 2e-38  # just above exp(_EXP_FLOOR): weights at or below it become exactly 0


def _weights(
    logits: torch.Tensor, temperature: np.ndarray, out: torch.Tensor | None = None, has_minus_inf: bool = False
) -> torch.Tensor:
    """Unnormalised probabilities exp((x - max) / T), the largest exactly 1 (normalising would
    cost two more passes over [R, V]; thresholds are scaled by the row sums instead). `out` may
    be `logits` itself. has_minus_inf (grammar masks, bans, large negative biases): weights that
    underflow are exactly 0 by a clamp and a threshold, not by exp(-inf), which is slow on CPUs."""
    w = out if out is not None else torch.empty_like(logits, dtype=torch.float32)
    torch.sub(logits, logits.amax(dim=-1, keepdim=True), out=w)
    if (temperature != 1.0).any():
        w.mul_(_f(1.0 / temperature, logits.device)[:, None])
    if not has_minus_inf:
        return w.exp_()
    torch.nn.functional.threshold(w.clamp_(min=_EXP_FLOOR).exp_(), _WEIGHT_FLOOR, 0.0, inplace=True)
    return w


# A grammar row allowing at most this share of the vocabulary is sampled from its allowed tokens
# alone (on CPUs, where each pass over the whole vocabulary costs the most): JSON's structural
# positions, enums, numbers, strings near their maxLength. The rest are masked whole.
SPARSE_MAX_FRACTION = 0.25


def _sparse_rows(meta: SamplingMetadata, v: int) -> dict[int, np.ndarray]:
    """Row -> its allowed token ids (ascending, < v), for the grammar rows that allow few."""
    bitmask = meta.bitmask()
    if meta.allowed_rows is None or bitmask is None:
        return {}
    words = np.ascontiguousarray(bitmask, np.int32)
    counts = np.bitwise_count(words.view(np.uint32)).sum(axis=1)
    library = cpu_kernels.library()
    out = {}
    bit = np.arange(32, dtype=np.int64)
    for j in np.flatnonzero((counts > 0) & (counts <= SPARSE_MAX_FRACTION * v)).tolist():
        if library is not None:
            allowed = library.token_bitmask_ids(words[j], v, int(counts[j]))
        else:
            used = np.flatnonzero(words[j])  # only the words with a bit set: a few of ~4000
            bits = np.unpackbits(words[j, used].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
            allowed = (used[:, None] * 32 + bit)[bits.astype(bool)]  # ascending
            allowed = allowed[allowed < v]
        if len(allowed):
            out[int(meta.allowed_rows[j])] = allowed
    return out


def _has_minus_inf(meta: SamplingMetadata) -> bool:
    return meta.allowed_rows is not None or meta.banned_rows is not None or meta.bias is not None


def _draw_whole_rows(
    w: torch.Tensor, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray, u: np.ndarray
) -> torch.Tensor:
    """One draw per row of weights w [R, V] over the whole sorted rows (top_k >= V means off);
    overwrites w; a device tensor, no host sync."""
    dev = w.device
    top_k = np.where(top_k >= w.shape[1], 0, top_k)
    f = _Filters(_t(top_k, dev), _f(top_p, dev), _f(min_p, dev), w.amax(dim=-1), w.sum(dim=-1))
    return _draw_top(w, f, u)


def _sample_top(
    probs: torch.Tensor, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray, u: np.ndarray
) -> np.ndarray:
    """Draw from the top slice of each row of probs [R, V] (unnormalised: fractions are of the
    row sums) that min_p, top_k and top_p keep. Overwrites probs.

    All three keep the tokens above a per-row probability threshold, so the kept set is a prefix
    of the sorted distribution. To avoid sorting the whole vocabulary (slow on CPUs), first find a
    lower bound `c` on that threshold from per-block maxima, gather the few blocks that hold
    tokens >= c, and sort only those. A flat distribution whose blocks mostly pass falls back
    to sorting the whole rows.
    """
    r, v = probs.shape
    dev = probs.device
    bs = _block_size(v)
    block_max = _block_reduce(probs, bs, "amax")  # [R, nb]
    nb = block_max.shape[1]
    bm_sorted = _sort_desc(block_max)  # [R, nb]
    f = _Filters(
        _t(top_k, dev),
        _f(top_p, dev),
        _f(min_p, dev),
        bm_sorted[:, 0],
        probs.sum(dim=-1),
    )
    has_k = f.top_k > 0
    p_only = ~has_k & (f.min_p <= 0.0)

    # Lower bounds c on the final threshold, from the block maxima (themselves tokens):
    # top_k: the k largest block maxima are k tokens, so the k-th largest token is at least the
    # k-th largest block maximum. min_p: exact. top_p alone: the tokens >= the j-th largest
    # block maximum weigh at least the j largest maxima together; once those reach p, that set
    # contains the nucleus. Failing that (flat rows), the tokens below (1 - p) / V weigh less
    # than 1 - p together, so the nucleus lies above (1 - p) / V.
    kth = bm_sorted.gather(1, (f.top_k.clamp(1, nb) - 1)[:, None])[:, 0]
    c = torch.where(has_k & (f.top_k <= nb), kth, 0.0)
    c = torch.maximum(c, f.min_p * f.pmax)
    reaches = torch.cumsum(bm_sorted, dim=-1) >= (f.top_p * f.total)[:, None]
    first = (~reaches).sum(dim=-1).clamp_(max=nb - 1)  # reaches is False then True
    c_p = torch.where(reaches[:, -1], bm_sorted.gather(1, first[:, None])[:, 0], 0.0)
    c = torch.where(p_only, torch.maximum(c_p, (1.0 - f.top_p) * f.total / v), c)

    passing = block_max >= c[:, None]
    counts = passing.sum(dim=-1).cpu().numpy()
    order = _true_first(passing)  # per row the passing blocks first, then the others
    tokens = np.empty(r, np.int64)
    # Rows go in tiers by candidate blocks, so that one wide row does not widen all the others;
    # past V / 4 candidates a row gains nothing over being taken whole.
    lo = 0
    for hi in sorted({min(8, v // (4 * bs)), min(64, v // (4 * bs)), v // (4 * bs)}):
        rows = np.flatnonzero((counts > lo) & (counts <= hi))
        lo = hi
        if len(rows) == 0:
            continue
        rows_t = _t(rows, dev)
        m = int(counts[rows].max())
        # Padding blocks need no mask: all their tokens lie below c, so below the threshold.
        cand, cand_ids = _gather_blocks(probs, rows_t, order[rows_t, :m], bs, fill=0.0)
        idx = _draw_top(cand, f.rows(rows_t), u[rows])
        tokens[rows] = cand_ids.gather(1, idx[:, None])[:, 0].cpu().numpy()
    rows = np.flatnonzero(counts > lo)
    if len(rows):
        rows_t = _t(rows, dev)
        cand = probs if len(rows) == r else probs[rows_t]
        tokens[rows] = _draw_top(cand, f.rows(rows_t), u[rows]).cpu().numpy()
    return tokens


@dataclass(slots=True)
class _Filters:
    """Per-row filter settings and row statistics, as tensors on the logits' device."""

    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    pmax: torch.Tensor  # the largest weight
    total: torch.Tensor  # the sum of the weights

    def rows(self, idx: torch.Tensor) -> _Filters:
        return _Filters(self.top_k[idx], self.top_p[idx], self.min_p[idx], self.pmax[idx], self.total[idx])


def _draw_top(cand: torch.Tensor, f: _Filters, u: np.ndarray) -> torch.Tensor:
    """Given candidates [R, M] holding every token that the filters may keep (the whole row,
    or the blocks above the bound), find the exact threshold from their sorted values and draw
    among those above it. Overwrites cand; returns column indices [R]."""
    s = _sort_desc(cand)  # [R, M]
    has_k = f.top_k > 0
    pos = torch.arange(s.shape[1], device=s.device)
    keep = ~has_k[:, None] | (pos[None, :] < f.top_k[:, None])
    keep &= s >= (f.min_p * f.pmax)[:, None]
    s_kept = s * keep
    # top_p is a fraction of what min_p and top_k kept; those keep all candidates when off.
    mass = torch.where(has_k | (f.min_p > 0.0), s_kept.sum(dim=-1), f.total)
    before = torch.cumsum(s_kept, dim=-1) - s_kept
    keep &= before < (torch.where(f.top_p < 1.0, f.top_p, float("inf")) * mass)[:, None]
    n_kept = keep.sum(dim=-1).clamp_(min=1)
    threshold = s.gather(1, (n_kept - 1)[:, None])
    return _inverse_cdf(cand.masked_fill_(cand < threshold, 0.0), u)


def _inverse_cdf(w: torch.Tensor, u: np.ndarray) -> torch.Tensor:
    """Index of the first entry of each row of non-negative weights w [R, M] whose cumulative sum
    exceeds u * total. Long rows go in two levels (block sums, then within the chosen block),
    which costs one pass over w instead of a full cumsum. Never picks a zero weight."""
    _r, m = w.shape
    dev = w.device
    u_t = torch.from_numpy(np.asarray(u, np.float64)).to(device=dev, non_blocking=True).to(w.dtype)
    if m <= 4096:
        cdf = torch.cumsum(w, dim=-1)
        return _search(cdf, u_t * cdf[:, -1])
    bs = 256
    sums = _block_reduce(w, bs, "sum")  # [R, nb]
    cdf = torch.cumsum(sums, dim=-1)
    target = u_t * cdf[:, -1]
    blk = _search(cdf, target)
    rest = target - (cdf.gather(1, blk[:, None])[:, 0] - sums.gather(1, blk[:, None])[:, 0])
    ids = blk[:, None] * bs + torch.arange(bs, device=dev)
    inside = ids < m
    wb = w.gather(1, ids.clamp(max=m - 1)) * inside
    cdf_b = torch.cumsum(wb, dim=-1)
    return blk * bs + _search(cdf_b, rest.clamp(min=0.0))


def _search(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """First index with cdf > target, clamped to the last index that carries weight (rounding can
    put target at or past the total)."""
    i = torch.searchsorted(cdf, target[:, None].contiguous(), right=True)
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)
    return torch.minimum(i, last)[:, 0]


def compute_logprobs(
    logits: torch.Tensor,  # [N, V]
    token_ids: Sequence[int] | np.ndarray,  # [N]: the chosen token of each row
    num_logprobs: int | Sequence[int],  # top-k to include, per row or for all
    chunk: int = 64,
) -> list[TokenLogprobs]:
    """Log-probabilities (log-softmax of these logits) of the chosen tokens with their ranks,
    plus each row's top k. For sampled tokens and for prompt_logprobs alike."""
    n = logits.shape[0]
    ks = [num_logprobs] * n if isinstance(num_logprobs, int) else list(num_logprobs)
    library = _library(logits)
    if library is not None and n and max(ks) <= logits.shape[1]:  # every row in one call, each walked once
        chosen, ranks, best_ids, best_lps = library.logprobs_rows(logits, np.asarray(token_ids), max(ks))
        return [
            TokenLogprobs(
                [int(token_ids[j]), *best_ids[j, : ks[j]].tolist()],
                [float(chosen[j]), *best_lps[j, : ks[j]].tolist()],
                [int(ranks[j]), *range(1, ks[j] + 1)],
            )
            for j in range(n)
        ]
    tokens = torch.as_tensor(np.asarray(token_ids, np.int64), device=logits.device)
    out: list[TokenLogprobs] = []
    for lo in range(0, n, chunk):  # a prompt's worth of [N, V] at once would be too big
        hi = min(lo + chunk, n)
        x = logits[lo:hi].float()
        # log-softmax only where it is read: x - logsumexp(x); ranks compare raw logits
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        tok = tokens[lo:hi, None]
        tok_x = x.gather(1, tok)
        rank = ((x > tok_x).sum(dim=-1) + 1).tolist()
        kmax = max(ks[lo:hi])
        top_ids: list[list[int]] = []
        top_lps: list[list[float]] = []
        if kmax > 0:
            top_x, top_indices = _topk(x, kmax)
            top_lps, top_ids = (top_x - lse).tolist(), top_indices.tolist()
        token_lps: list[float] = (tok_x - lse)[:, 0].tolist()
        token_ids_here: list[int] = tok[:, 0].tolist()
        for j in range(hi - lo):
            k = ks[lo + j]
            ids, lps = [token_ids_here[j]], [token_lps[j]]
            if k > 0:
                ids += top_ids[j][:k]
                lps += top_lps[j][:k]
            out.append(TokenLogprobs(ids, lps, [rank[j], *range(1, k + 1)]))
    return out


# ---- small helpers; numpy on CPU where torch's CPU kernels are many times slower --------------


def _t(a: np.ndarray, device: torch.device) -> torch.Tensor:
    # non_blocking: from pageable memory the copy is staged at once, without waiting for the
    # device's queued work (a blocking copy would wait for it: a host sync).
    return torch.from_numpy(np.asarray(a, np.int64)).to(device, non_blocking=True)


def _f(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, np.float32)).to(device, non_blocking=True)


def _gather_rows(x: torch.Tensor, rows: np.ndarray, out: torch.Tensor) -> None:
    """out[:] = x[rows] (numpy's take on CPU: torch's index_select there was seen taking ~0.4 s
    for 32 rows of 128k floats, 100x its usual time)."""
    if x.device.type == "cpu" and x.is_contiguous() and out.is_contiguous():
        np.take(x.numpy(), rows, axis=0, out=out.numpy())
    else:
        torch.index_select(x, 0, _t(rows, x.device), out=out)


def _argmax(x: torch.Tensor) -> np.ndarray:
    if x.device.type == "cpu":  # numpy's argmax is ~7x faster than torch's on CPU
        # numpy reads any strides; no torch call (each costs microseconds from cold caches)
        return x.numpy().argmax(axis=-1).astype(np.int64, copy=False)
    return x.argmax(dim=-1).cpu().numpy()


def _sort_desc(x: torch.Tensor) -> torch.Tensor:
    """The values of each row, sorted descending (numpy on CPU: torch's CPU sort is ~20x
    slower there)."""
    if x.device.type == "cpu":
        return torch.from_numpy(-np.sort(-x.contiguous().numpy(), axis=-1))
    return torch.sort(x, dim=-1, descending=True).values


def _topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k) for small k, sorted. The k largest lie in the k blocks with the largest
    maxima, so only those are searched (torch's CPU topk over a long row is slow)."""
    _r, v = x.shape
    bs = _block_size(v)
    if k * bs * 4 > v:
        return torch.topk(x, k, dim=-1)
    blocks = torch.topk(_block_reduce(x, bs, "amax"), k, dim=-1).indices
    vals, ids = _gather_blocks(x, None, blocks, bs, fill=float("-inf"))
    top, j = torch.topk(vals, k, dim=-1)
    return top, ids.gather(1, j)


def _gather_blocks(
    x: torch.Tensor, rows: torch.Tensor | None, blocks: torch.Tensor, bs: int, fill: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and column ids of whole blocks of bs columns: blocks [R, m] of x's `rows` (None:
    all) -> [R, m * bs]. Columns past the end of a row (a partial last block) get `fill`."""
    v = x.shape[1]
    ids = (blocks[:, :, None] * bs + torch.arange(bs, device=x.device)).flatten(1)
    over = ids >= v if v % bs else None
    if over is not None:
        ids = ids.clamp_(max=v - 1)
    # torch.take on flat offsets: much cheaper on CPU than advanced indexing x[rows, ids]
    vals = x.gather(1, ids) if rows is None else torch.take(x, rows[:, None] * v + ids)
    if over is not None:
        vals.masked_fill_(over, fill)
    return vals, ids


def _true_first(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the column indices with True first (a stable argsort of ~mask)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.argsort(~mask.numpy(), axis=-1, kind="stable"))
    return torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)


def _block_size(v: int) -> int:
    """About a thousand blocks per row, at least 16 wide."""
    bs = 16
    while bs * 1024 < v:
        bs *= 2
    return bs


def _block_reduce(x: torch.Tensor, bs: int, op: str) -> torch.Tensor:
    """amax or sum over consecutive blocks of bs entries of each row; the last may be partial."""
    r, v = x.shape
    nb = v // bs
    full = getattr(x[:, : nb * bs].reshape(r, nb, bs), op)(dim=-1)
    if v % bs == 0:
        return full
    tail = getattr(x[:, nb * bs :], op)(dim=-1, keepdim=True)
    return torch.cat([full, tail], dim=1)
