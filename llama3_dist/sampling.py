"""SamplingParams (vLLM's names and meanings) and the batched sampler, run where the logits are.

The driver turns each running sequence's SamplingParams into one row of a `SamplingMetadata`
(plain numpy and lists: it is pickled to the worker every step). The worker holding the logits
runs `Sampler` on them and sends back token ids and, for rows that asked, log-probabilities.

Processing order follows vLLM: min_tokens masking and penalties on the logits; greedy rows take
the argmax; the others are divided by their temperature, filtered by min_p, top_k and top_p
(each keeps a top slice of the distribution, so together they are one probability threshold per
row), and sampled by inverse CDF with one uniform number per row. A seeded row draws that number
from (seed, step), so it is reproducible whatever else shares the batch and after preemption.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .outputs import TokenLogprobs

# Below this a temperature means greedy, as in vLLM.
SAMPLING_EPS = 1e-5


class SamplingParams(BaseModel):
    """How to sample one request. Names, defaults and meanings are vLLM's.

    For n > 1 with a seed, give child i the seed `seed + i` (as vLLM does), or all n children
    draw the same tokens.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # how many top log-probabilities per generated token
    prompt_logprobs: int | None = None  # the same, per prompt token
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if any(isinstance(s, str) and s == "" for s in v):
            raise ValueError("stop strings must not be empty, got ''")
        return v

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _stop_ids_list(cls, v):
        return [] if v is None else v

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v < 1:
            raise ValueError(f"n must be at least 1, got {v}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if not v >= 0.0:  # also refuses NaN
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {v}")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v):
        if not 0.0 < v <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {v}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v):
        if v < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or a positive count, got {v}")
        return v

    @field_validator("min_p")
    @classmethod
    def _min_p(cls, v):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {v}")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v):
        if v < 1:
            raise ValueError(f"max_tokens must be at least 1, got {v}")
        return v

    @field_validator("min_tokens")
    @classmethod
    def _min_tokens(cls, v):
        if v < 0:
            raise ValueError(f"min_tokens must be >= 0, got {v}")
        return v

    @field_validator("logprobs", "prompt_logprobs")
    @classmethod
    def _logprobs(cls, v, info):
        if v is not None and v < 0:
            raise ValueError(f"{info.field_name} must be >= 0 (or None for none), got {v}")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v, info):
        if not -2.0 <= v <= 2.0:
            raise ValueError(f"{info.field_name} must be in [-2, 2], got {v}")
        return v

    @field_validator("repetition_penalty")
    @classmethod
    def _repetition_penalty(cls, v):
        if not (v > 0.0 and np.isfinite(v)):
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {v}")
        return v

    @model_validator(mode="after")
    def _min_le_max(self):
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        return self

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


@dataclass(slots=True)
class PenaltyInputs:
    """Penalties of a batch, for the rows that have any. Token ids travel flat, with their row."""

    presence: np.ndarray  # float32 [B]
    frequency: np.ndarray  # float32 [B]
    repetition: np.ndarray  # float32 [B]
    output_rows: np.ndarray  # int64 [N]: the row of each generated token in output_ids
    output_ids: np.ndarray  # int64 [N]
    prompt_rows: np.ndarray  # int64 [P]: prompt tokens, only of rows with a repetition penalty
    prompt_ids: np.ndarray  # int64 [P]


@dataclass(slots=True)
class SamplingMetadata:
    """One step's sampling inputs, one row per sequence; built on the driver, no torch inside."""

    temperature: np.ndarray  # float32 [B]; < SAMPLING_EPS means greedy
    top_k: np.ndarray  # int64 [B]; 0 = off
    top_p: np.ndarray  # float32 [B]
    min_p: np.ndarray  # float32 [B]
    seeds: list[int | None]
    steps: list[int]  # tokens each row has generated so far; with the seed it picks the draw
    num_logprobs: list[int | None]  # top-k log-probabilities to return per row, None for none
    penalties: PenaltyInputs | None = None  # None when no row has one
    banned_rows: np.ndarray | None = None  # min_tokens: (row, token) pairs that may not be
    banned_ids: np.ndarray | None = None  # sampled yet (eos and stop_token_ids)

    @property
    def batch_size(self) -> int:
        return len(self.temperature)

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        eos_token_ids: Iterable[int] = (),
    ) -> SamplingMetadata:
        """Row i samples the next token of a sequence with prompt_token_ids[i] and
        output_token_ids[i] so far. Prompt ids matter only for a repetition penalty."""
        eos = list(eos_token_ids)
        b = len(params)
        temperature = np.fromiter((p.temperature for p in params), np.float32, b)
        top_k = np.fromiter((max(p.top_k, 0) for p in params), np.int64, b)
        top_p = np.fromiter((p.top_p for p in params), np.float32, b)
        min_p = np.fromiter((p.min_p for p in params), np.float32, b)
        steps = [len(o) for o in output_token_ids]

        penalties = None
        pen_rows = [i for i, p in enumerate(params) if p.has_penalties]
        if pen_rows:
            out_rows, out_ids, pr_rows, pr_ids = [], [], [], []
            for i in pen_rows:
                out_ids.append(np.asarray(output_token_ids[i], np.int64))
                out_rows.append(np.full(len(out_ids[-1]), i, np.int64))
                if params[i].repetition_penalty != 1.0:
                    pr_ids.append(np.asarray(prompt_token_ids[i], np.int64))
                    pr_rows.append(np.full(len(pr_ids[-1]), i, np.int64))
            cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
            penalties = PenaltyInputs(
                presence=np.fromiter((p.presence_penalty for p in params), np.float32, b),
                frequency=np.fromiter((p.frequency_penalty for p in params), np.float32, b),
                repetition=np.fromiter((p.repetition_penalty for p in params), np.float32, b),
                output_rows=cat(out_rows), output_ids=cat(out_ids),
                prompt_rows=cat(pr_rows), prompt_ids=cat(pr_ids))

        banned_rows = banned_ids = None
        banned = [(i, t) for i, p in enumerate(params) if steps[i] < p.min_tokens
                  for t in (p.stop_token_ids if p.ignore_eos else [*eos, *p.stop_token_ids])]
        if banned:
            banned_rows, banned_ids = (np.array(c, np.int64) for c in zip(*banned))

        return cls(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            seeds=[p.seed for p in params], steps=steps,
            num_logprobs=[p.logprobs for p in params],
            penalties=penalties, banned_rows=banned_rows, banned_ids=banned_ids)


@dataclass(slots=True)
class SamplerOutput:
    token_ids: np.ndarray  # int64 [B]
    logprobs: list[TokenLogprobs | None]  # per row; entry 0 is the sampled token


class Sampler:
    """Samples one token per row of logits [B, V] (float32, any device); never modifies them.

    `seed` seeds the generator shared by unseeded rows (None: nondeterministic). The sampler keeps
    [B, V] work buffers between calls: on CPUs the page faults of fresh multi-megabyte tensors
    cost more than the arithmetic done in them.
    """

    def __init__(self, seed: int | None = None):
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self._buffers: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        b, v = logits.shape
        dev = logits.device
        if b != meta.batch_size:
            raise ValueError(f"logits have {b} rows but the sampling metadata {meta.batch_size}")
        x = logits.float()
        if meta.penalties is not None or meta.banned_rows is not None:
            x = self._buffer("penalised", b, v, dev).copy_(x)  # logprobs are of the raw logits
            if meta.banned_rows is not None:
                x[_t(meta.banned_rows, dev), _t(meta.banned_ids, dev)] = float("-inf")
            if meta.penalties is not None:
                apply_penalties(x, meta.penalties)

        greedy = meta.temperature < SAMPLING_EPS
        if greedy.all():
            token_ids = _argmax(x)
        else:
            r_rows = np.flatnonzero(~greedy)
            work = self._buffer("probs", len(r_rows), v, dev)
            if len(r_rows) < b:
                token_ids = _argmax(x)  # cheaper than gathering the greedy rows first
                torch.index_select(x, 0, _t(r_rows, dev), out=work)
                x = work
            else:
                token_ids = np.empty(b, np.int64)
            token_ids[r_rows] = sample_filtered(
                x, meta.temperature[r_rows], meta.top_k[r_rows], meta.top_p[r_rows],
                meta.min_p[r_rows], self._uniforms(meta, r_rows), out=work)

        logprobs: list[TokenLogprobs | None] = [None] * b
        lp_rows = [i for i, k in enumerate(meta.num_logprobs) if k is not None]
        if lp_rows:
            rows = logits if len(lp_rows) == b else logits[_t(np.array(lp_rows), dev)]
            computed = compute_logprobs(
                rows, token_ids[lp_rows], [meta.num_logprobs[i] for i in lp_rows])
            for i, lp in zip(lp_rows, computed):
                logprobs[i] = lp
        return SamplerOutput(token_ids, logprobs)

    def _buffer(self, name: str, rows: int, v: int, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < rows * v or buf.device != device:
            buf = self._buffers[name] = torch.empty(rows * v, dtype=torch.float32, device=device)
        return buf[: rows * v].view(rows, v)

    def _uniforms(self, meta: SamplingMetadata, rows: np.ndarray) -> np.ndarray:
        """One uniform number in [0, 1) per row: from (seed, step) for seeded rows, else from
        the shared generator."""
        u = torch.rand(len(rows), generator=self.generator, dtype=torch.float64,
                       device="cpu").numpy()
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
    b, v = logits.shape
    dev = logits.device
    for ids in (pen.output_ids, pen.prompt_ids):
        if len(ids) and (ids.min() < 0 or ids.max() >= v):
            raise ValueError(f"penalty token ids must be in [0, {v}) for logits of vocabulary "
                             f"{v}, got ids from {ids.min()} to {ids.max()}")
    out_keys, counts = torch.unique(
        _t(pen.output_rows, dev) * v + _t(pen.output_ids, dev), return_counts=True)
    rep = torch.from_numpy(pen.repetition).to(dev)
    if (pen.repetition != 1.0).any():
        keys = torch.unique(torch.cat([_t(pen.prompt_rows, dev) * v + _t(pen.prompt_ids, dev),
                                       out_keys]))
        r, t = keys // v, keys % v
        vals, p = logits[r, t], rep[r]
        logits[r, t] = torch.where(vals > 0, vals / p, vals * p)
    r, t = out_keys // v, out_keys % v
    freq = torch.from_numpy(pen.frequency).to(dev)
    pres = torch.from_numpy(pen.presence).to(dev)
    logits[r, t] -= freq[r] * counts.to(logits.dtype) + pres[r]


def sample_filtered(
    logits: torch.Tensor,  # [R, V], float32
    temperature: np.ndarray,  # [R], all >= SAMPLING_EPS
    top_k: np.ndarray,  # [R], 0 = off
    top_p: np.ndarray,  # [R]
    min_p: np.ndarray,  # [R]
    u: np.ndarray,  # [R] uniforms in [0, 1)
    out: torch.Tensor | None = None,  # [R, V] float32 work buffer; may be `logits` itself
) -> np.ndarray:
    """Temperature, then min_p / top_k / top_p filtering, then one draw per row. Returns [R]."""
    r, v = logits.shape
    dev = logits.device
    # Unnormalised probabilities exp((x - max) / T), the largest exactly 1 (normalising would
    # cost two more passes over [R, V]; thresholds are scaled by the row sums instead).
    w = out if out is not None else torch.empty_like(logits, dtype=torch.float32)
    torch.sub(logits, logits.amax(dim=-1, keepdim=True), out=w)
    if (temperature != 1.0).any():
        w.mul_(torch.from_numpy(1.0 / temperature).to(dev)[:, None])
    w.exp_()

    top_k = np.where(top_k >= v, 0, top_k)
    filtered = (top_k > 0) | (top_p < 1.0) | (min_p > 0.0)
    if filtered.all():
        return _sample_top(w, top_k, top_p, min_p, u)
    if not filtered.any():
        return _inverse_cdf(w, u).cpu().numpy()
    f_rows, n_rows = np.flatnonzero(filtered), np.flatnonzero(~filtered)
    tokens = np.empty(r, np.int64)
    tokens[n_rows] = _inverse_cdf(w[_t(n_rows, dev)], u[n_rows]).cpu().numpy()
    tokens[f_rows] = _sample_top(w[_t(f_rows, dev)], top_k[f_rows], top_p[f_rows],
                                 min_p[f_rows], u[f_rows])
    return tokens


def _sample_top(probs: torch.Tensor, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray,
                u: np.ndarray) -> np.ndarray:
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
    f = _Filters(torch.from_numpy(top_k).to(dev), torch.from_numpy(top_p).to(dev),
                 torch.from_numpy(min_p).to(dev), bm_sorted[:, 0], probs.sum(dim=-1))
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
        return _Filters(self.top_k[idx], self.top_p[idx], self.min_p[idx], self.pmax[idx],
                        self.total[idx])


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
    r, m = w.shape
    dev = w.device
    u_t = torch.from_numpy(u).to(device=dev, dtype=w.dtype)
    if m <= 4096:
        cdf = torch.cumsum(w, dim=-1)
        return _search(cdf, u_t * cdf[:, -1])
    bs = 256
    sums = _block_reduce(w, bs, "sum")  # [R, nb]
    cdf = torch.cumsum(sums, dim=-1)
    target = u_t * cdf[:, -1]
    blk = _search(cdf, target)
    rest = (target - (cdf.gather(1, blk[:, None])[:, 0] - sums.gather(1, blk[:, None])[:, 0]))
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
        tok_lp = tok_x - lse
        kmax = max(ks[lo:hi])
        if kmax > 0:
            top_x, top_ids = _topk(x, kmax)
            top_lp, top_ids = (top_x - lse).tolist(), top_ids.tolist()
        tok_lp = tok_lp[:, 0].tolist()
        tok = tok[:, 0].tolist()
        for j in range(hi - lo):
            k = ks[lo + j]
            ids, lps = [tok[j]], [tok_lp[j]]
            if k > 0:
                ids += top_ids[j][:k]
                lps += top_lp[j][:k]
            out.append(TokenLogprobs(ids, lps, [rank[j], *range(1, k + 1)]))
    return out


# ---- small helpers; numpy on CPU where torch's CPU kernels are many times slower --------------

def _t(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, np.int64)).to(device)


def _argmax(x: torch.Tensor) -> np.ndarray:
    if x.device.type == "cpu":  # numpy's argmax is ~7x faster than torch's on CPU
        return np.argmax(x.contiguous().numpy(), axis=-1).astype(np.int64)
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
    r, v = x.shape
    bs = _block_size(v)
    if k * bs * 4 > v:
        return torch.topk(x, k, dim=-1)
    blocks = torch.topk(_block_reduce(x, bs, "amax"), k, dim=-1).indices
    vals, ids = _gather_blocks(x, None, blocks, bs, fill=float("-inf"))
    top, j = torch.topk(vals, k, dim=-1)
    return top, ids.gather(1, j)


def _gather_blocks(x: torch.Tensor, rows: torch.Tensor | None, blocks: torch.Tensor, bs: int,
                   fill: float) -> tuple[torch.Tensor, torch.Tensor]:
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
    tail = getattr(x[:, nb * bs:], op)(dim=-1, keepdim=True)
    return torch.cat([full, tail], dim=1)
