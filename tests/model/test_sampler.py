"""The sampler against hand-written references of vLLM's definitions."""

from __future__ import annotations

import os

import numpy as np
import pydantic
import pytest
import torch

from llama3_dist.core.sampling_metadata import SamplingMetadata
from llama3_dist.model import sampler as sampling
from llama3_dist.model.sampler import Sampler, apply_penalties, compute_logprobs
from llama3_dist.sampling_params import SamplingParams

EOS = 7
# The sampler runs where the logits are: LLAMA3_DIST_TEST_DEVICE=cuda runs these on a GPU.
DEVICE = torch.device(os.environ.get("LLAMA3_DIST_TEST_DEVICE", "cpu"))


def meta_for(params, outputs=None, prompts=None):
    b = len(params)
    outputs = outputs if outputs is not None else [[] for _ in range(b)]
    prompts = prompts if prompts is not None else [[] for _ in range(b)]
    return SamplingMetadata.build(params, prompts, outputs, eos_token_ids=[EOS])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
        (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
        (dict(top_k=-2), "got -2"),
        (dict(min_p=1.2), "min_p must be in [0, 1], got 1.2"),
        (dict(max_tokens=0), "max_tokens must be at least 1, got 0"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens (5) must be <= max_tokens (4)"),
        (dict(n=0), "n must be at least 1, got 0"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2], got 2.5"),
        (dict(frequency_penalty=-3), "frequency_penalty must be in [-2, 2], got -3"),
        (dict(logprobs=-1), "logprobs must be >= 0"),
        (dict(prompt_logprobs=-1), "prompt_logprobs must be >= 0"),
        (dict(stop=["ok", ""]), "stop strings must not be empty"),
        (dict(temperatur=0.5), "temperatur"),  # a typo is an error, not ignored
    ],
)
def test_params_validation(kwargs, message):
    with pytest.raises(pydantic.ValidationError) as e:
        SamplingParams(**kwargs)
    assert message in str(e.value)


def test_params_defaults_and_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=None, top_k=-1, temperature=0)
    assert p.stop == ["###"] and p.stop_token_ids == [] and p.is_greedy
    assert SamplingParams(stop=None).stop == []
    d = SamplingParams()
    assert (
        d.n,
        d.temperature,
        d.top_p,
        d.top_k,
        d.min_p,
        d.max_tokens,
        d.repetition_penalty,
        d.skip_special_tokens,
    ) == (1, 1.0, 1.0, 0, 0.0, 16, 1.0, True)


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    torch.manual_seed(0)
    logits = (torch.randn(12, 1000) * 3).to(DEVICE)
    params = [
        SamplingParams(temperature=0.0)
        if i % 3 == 0
        else SamplingParams(temperature=1.3, top_k=1, seed=i if i % 2 else None)
        for i in range(12)
    ]
    out = Sampler(seed=0)(logits, meta_for(params))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    all_greedy = Sampler()(logits, meta_for([SamplingParams(temperature=0)] * 12))
    assert all_greedy.token_ids.tolist() == logits.argmax(-1).tolist()


def test_seeded_rows_ignore_the_rest_of_the_batch():
    torch.manual_seed(1)
    v = 5000
    row = (torch.randn(v) * 2).to(DEVICE)
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    others = [SamplingParams(temperature=1.0, seed=s) for s in (None, 5, None)] + [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=20, min_p=0.01),
    ]

    def draws(batch_with_others: bool, sampler_seed: int) -> list[int]:
        sampler, tokens = Sampler(seed=sampler_seed), []
        for step in range(20):
            params, logits = [p], row[None]
            if batch_with_others:
                params = [*others[:2], p, *others[2:]]
                logits = torch.cat([torch.randn(2, v).to(DEVICE), row[None], torch.randn(3, v).to(DEVICE)])
            out = sampler(logits, meta_for(params, [[0] * step] * len(params)))
            tokens.append(int(out.token_ids[params.index(p)]))
        return tokens

    alone = draws(False, 0)
    assert alone == draws(True, 1) == draws(True, 2)
    assert len(set(alone)) > 5  # the step index changes the draw
    # resumed after preemption: the same step gives the same token
    out = Sampler()(row[None], meta_for([p], [[0] * 13]))
    assert out.token_ids[0] == alone[13]


def reference_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """Sort-based, straight from the definitions (vLLM's order)."""
    probs = torch.softmax(logits.double() / temperature, -1)
    keep = probs >= min_p * probs.max()
    if top_k > 0:
        keep &= probs >= torch.sort(probs, descending=True).values[top_k - 1]
    probs = torch.where(keep, probs, 0.0)
    probs = probs / probs.sum()
    if top_p < 1.0:
        s, order = torch.sort(probs, descending=True)
        before = torch.cumsum(s, 0) - s
        keep_sorted = before < top_p  # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order, torch.where(keep_sorted, s, 0.0))
        probs = probs / probs.sum()
    return probs


def sparse_logits(v, n_live, seed):
    """Most tokens far below the rest, so the sampler takes its few-candidate-blocks path; the
    last tokens (in a partial last block) are live, the very last one likely."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.full((v,), -25.0)
    live = [*torch.randperm(v - 1, generator=g)[: n_live - 3].tolist(), v - 3, v - 2, v - 1]
    logits[live] = torch.linspace(-4.0, 2.0, n_live)[torch.randperm(n_live, generator=g)]
    logits[v - 1] = 1.0
    return logits


CONFIGS = [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.8, min_p=0.15),
    dict(temperature=1.5, top_k=9, top_p=0.75, min_p=0.02),
]


# The CPU library draws every row in one call; the torch path (GPUs, CPUs without the library)
# sorts candidate blocks or whole rows. Both must follow the filtered softmax (on a CPU the torch
# path, a fallback there, runs in the whole suite only).
PATHS = ["library", pytest.param("torch", marks=pytest.mark.slow)] if DEVICE.type == "cpu" else ["torch"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("vocab", ["dense", "sparse"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sampled_frequencies_follow_filtered_softmax(cfg, vocab, path, monkeypatch):
    if path == "torch":
        monkeypatch.setattr(sampling.cpu_kernels, "kernels_for", lambda x: None)
    if vocab == "dense":
        v, rows, calls = 40, 20000, 1
        logits = torch.randn(v, generator=torch.Generator().manual_seed(3)) * 1.5
    else:
        v, rows, calls = 4100, 2000, 10  # 4100 = 256 * 16 + 4: partial last blocks
        logits = sparse_logits(v, 40, seed=4)
        widths = []
        sort_desc = sampling._sort_desc
        monkeypatch.setattr(sampling, "_sort_desc", lambda x: widths.append(x.shape[1]) or sort_desc(x))
    expected = reference_probs(logits, **cfg)
    sampler = Sampler(seed=11)
    # flat rows in the same batch take the whole-row path; they must not disturb the others
    extra = 0 if vocab == "dense" else 16
    meta = meta_for([SamplingParams(**cfg)] * (rows + extra))
    meta.seeds = [i if i % 2 else None for i in range(rows + extra)]  # both sources of draws
    batch = torch.cat([logits.expand(rows, v), torch.randn(extra, v)]).to(DEVICE)
    counts = np.zeros(v, np.int64)
    for call in range(calls):
        meta.steps = [call] * (rows + extra)  # else the seeded rows repeat their draws
        counts += np.bincount(sampler(batch, meta).token_ids[:rows], minlength=v)
    n = rows * calls
    p = expected.numpy()
    assert counts[p == 0].sum() == 0, "a filtered-out token was sampled"
    # every bin within 5 sigma of its binomial expectation (fixed seeds: deterministic)
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 5 * sigma + 1), (counts, n * p)
    # (a GPU sorts whole rows, with no host sync to size candidate blocks: only the CPU's torch path
    # has them; it sorts block maxima, candidates, rows)
    if vocab == "sparse" and DEVICE.type != "cuda" and path == "torch" and widths:
        nb = -(-v // sampling._block_size(v))
        assert any(w < v / 4 and w != nb for w in widths), "expected the candidate-block path"
        if "top_k" not in cfg:
            assert v in widths, "expected the whole-row path for the flat rows"


def reference_draw(w: np.ndarray, top_k: int, top_p: float, min_p: float, u: float) -> int:
    """The sampler's draw from one row of weights (its kept set as _draw_top defines it), from the
    definitions in float64: sort, keep, threshold, then the inverse CDF in token id order."""
    s = -np.sort(-w)
    keep = np.ones(len(w), bool)
    by_k = 0 < top_k < len(w)
    if by_k:
        keep[top_k:] = False
    keep &= s >= min_p * s[0]
    s_kept = s * keep
    mass = s_kept.sum() if by_k or min_p > 0 else w.sum()
    if top_p < 1.0:
        keep &= np.cumsum(s_kept) - s_kept < top_p * mass
    threshold = s[max(1, keep.sum()) - 1]
    kept = np.where((w >= threshold) & (w > 0), w, 0.0)
    cdf = np.cumsum(kept)
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), np.flatnonzero(kept)[-1]))


def test_library_draws_by_the_definitions():
    """The CPU library's draw (its own weights; binned by their top bits, only the bin at each
    filter's cut sorted) picks the token of the float64 definitions on those weights, and the
    torch path's sorted rows nearly always agree (they sum in float32): real-looking and flat rows,
    ties, masked (-inf) tokens, a row with one live token, every filter alone and together, top_k
    past the vocabulary."""
    library = sampling.cpu_kernels.library()
    if library is None:
        pytest.skip("the CPU kernel library is not built here")
    rng = np.random.default_rng(5)
    v, rows = 3001, 240
    logits = torch.from_numpy(rng.normal(size=(rows, v)).astype(np.float32)) * torch.from_numpy(
        rng.choice([0.05, 1.0, 3.0, 8.0], size=(rows, 1)).astype(np.float32)
    )
    logits[::7, :500] = 2.0  # ties
    logits[::5, rng.choice(v, 2000, replace=False)] = float("-inf")  # a grammar's or a ban's mask
    logits[3, 1:] = float("-inf")  # one live token
    temperature = rng.choice([0.3, 0.8, 1.0, 1.7], size=rows).astype(np.float32)
    top_k = rng.choice([0, 0, 1, 5, 50, 2999, 5000], size=rows)
    top_p = rng.choice([1.0, 1.0, 0.5, 0.9, 0.99], size=rows).astype(np.float32)
    min_p = rng.choice([0.0, 0.0, 0.01, 0.2], size=rows).astype(np.float32)
    disagree = 0
    for _ in range(5):
        u = rng.random(rows)
        w = torch.empty(rows, v)
        got = library.sample_logits(logits, temperature, top_k, top_p, min_p, u, w)
        # its weights: torch's to within 2 float32 ulps of exp, masked tokens exactly 0
        torch.testing.assert_close(w, sampling._weights(logits, temperature, has_minus_inf=True), rtol=3e-7, atol=0)
        w64 = w.double().numpy()
        expected = [reference_draw(w64[r], top_k[r], float(top_p[r]), float(min_p[r]), u[r]) for r in range(rows)]
        assert got.tolist() == expected
        disagree += int((sampling._draw_whole_rows(w.clone(), top_k, top_p, min_p, u).numpy() != got).sum())
    assert disagree <= rows * 5 // 100, disagree


def reference_penalties(logits, prompts, outputs, params):
    out = logits.clone()
    for i, p in enumerate(params):
        seen = set(prompts[i]) | set(outputs[i])
        for t in seen:
            x = out[i, t]
            out[i, t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for t in set(outputs[i]):
            out[i, t] -= outputs[i].count(t) * p.frequency_penalty + p.presence_penalty
    return out


def test_penalties_match_vllm_formulas():
    torch.manual_seed(2)
    v = 50
    logits = (torch.randn(4, v) * 2).to(DEVICE)
    params = [
        SamplingParams(repetition_penalty=1.7),
        SamplingParams(presence_penalty=0.6, frequency_penalty=0.4),
        SamplingParams(),
        SamplingParams(repetition_penalty=0.6, presence_penalty=-0.5, frequency_penalty=1.5),
    ]
    prompts = [[1, 2, 3, 3, 40], [4, 5], [6], [1, 9, 9, 30]]
    outputs = [[3, 10, 10], [4, 11, 11, 11, 12], [13], [9, 9, 20, 21, 21]]
    meta = meta_for(params, outputs, prompts)
    got = logits.clone()
    apply_penalties(got, meta.penalties)
    want = reference_penalties(logits.cpu(), prompts, outputs, params)
    got = got.cpu()
    torch.testing.assert_close(got, want)
    # prompt tokens get no presence/frequency penalty; a row without penalties is unchanged
    assert got[1, 5] == logits[1, 5].cpu() and torch.equal(got[2], logits[2].cpu())
    greedy = [p.model_copy(update={"temperature": 0.0}) for p in params]
    out = Sampler()(logits, meta_for(greedy, outputs, prompts))
    assert out.token_ids.tolist() == want.argmax(-1).tolist()


def test_min_tokens_masks_eos_and_stop_token_ids():
    logits = torch.zeros(3, 20)
    logits[:, EOS] = 10.0
    logits[:, 8] = 9.0
    params = [
        SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[8]),
        SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[8]),
        SamplingParams(temperature=0, min_tokens=3, ignore_eos=True),
    ]
    out = Sampler()(logits.to(DEVICE), meta_for(params, [[1, 1], [1, 1, 1], [1]]))
    assert out.token_ids.tolist() == [0, EOS, EOS]  # row 0 masked; row 1 done; row 2 keeps eos


def test_logprobs_are_raw_log_softmax_with_ranks():
    torch.manual_seed(5)
    v = 3000  # 16-wide blocks, the last one partial
    logits = torch.randn(5, v) * 2
    logits[0, -1] = 20.0  # the top token in the partial last block
    logits = logits.to(DEVICE)
    params = [
        SamplingParams(temperature=0.5, top_p=0.5, logprobs=3, repetition_penalty=1.3),
        SamplingParams(logprobs=0, seed=3),
        SamplingParams(temperature=0, logprobs=5),
        SamplingParams(),
        SamplingParams(temperature=2.0, logprobs=2),
    ]
    original = logits.clone()
    out = Sampler(seed=0)(logits, meta_for(params, [[1, 2]] * 5, [[3]] * 5))
    assert torch.equal(logits, original), "the sampler must not modify its input"
    ref = torch.log_softmax(logits.double(), -1).cpu()
    for i, p in enumerate(params):
        lp = out.logprobs[i]
        if p.logprobs is None:
            assert lp is None
            continue
        tok = int(out.token_ids[i])
        assert lp.token_ids[0] == tok and len(lp.token_ids) == 1 + p.logprobs
        order = torch.argsort(ref[i], descending=True).tolist()
        assert lp.token_ids[1:] == order[: p.logprobs]
        assert lp.ranks == [order.index(tok) + 1, *range(1, p.logprobs + 1)]
        np.testing.assert_allclose(lp.logprobs, ref[i, lp.token_ids].numpy(), atol=1e-5)
        d = lp.to_dict(decode=lambda t: f"<{t}>")
        assert tok in d and d[tok].rank == order.index(tok) + 1
        assert d[tok].decoded_token == f"<{tok}>"
        assert len(d) in (p.logprobs, p.logprobs + 1)


def test_compute_logprobs_for_prompt_tokens():
    torch.manual_seed(6)
    logits = torch.randn(7, 2000)
    tokens = [3, 9, 1, 1999, 0, 5, 5]
    got = compute_logprobs(logits.to(DEVICE), tokens, 4, chunk=3)  # chunk ends inside the rows
    ref = torch.log_softmax(logits.double(), -1)
    for j, lp in enumerate(got):
        assert lp.token_ids[0] == tokens[j]
        assert lp.ranks[0] == int((ref[j] > ref[j, tokens[j]]).sum()) + 1
        assert lp.token_ids[1:] == torch.topk(ref[j], 4).indices.tolist()
        np.testing.assert_allclose(lp.logprobs, ref[j, lp.token_ids].numpy(), atol=1e-5)


def test_library_logprobs_equal_the_torch_paths(monkeypatch):
    """The CPU library's log-probabilities (each row walked once) equal the torch path's: the
    chosen token's value and rank, the top k in order (tied logits: lower ids first, a stable
    sort's order), per-row k, on rows with -inf logits and a partial last vector."""
    if sampling.cpu_kernels.library() is None:
        pytest.skip("the CPU kernel library is not built here")
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(9, 1001, generator=g) * 3
    logits[2, 100:110] = 9.0  # ten tied top logits
    logits[4, ::3] = float("-inf")
    tokens = [0, 1000, 105, 7, 3, 999, 500, 1, 2]
    ks = [0, 1, 5, 20, 3, 0, 7, 2, 4]
    got = compute_logprobs(logits, tokens, ks)
    monkeypatch.setattr(sampling, "_library", lambda x: None)
    expected = compute_logprobs(logits, tokens, ks)
    ref = torch.log_softmax(logits.double(), -1)
    for j, (a, b) in enumerate(zip(got, expected)):
        assert a.ranks == b.ranks and a.token_ids[0] == b.token_ids[0] == tokens[j]
        stable = np.argsort(-logits[j].numpy(), kind="stable")[: ks[j]].tolist()
        assert a.token_ids[1:] == stable
        if j != 2:  # torch's top-k orders ties its own way
            assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, ref[j, a.token_ids].numpy(), atol=1e-5)


def test_device_draw_gives_the_host_draws():
    """The draw kept on the device (overlapped scheduling on a GPU: whole sorted rows, no host
    sync) picks the tokens the host path picks, for greedy, top-k, top-p, min-p and plain
    temperature rows with the same uniforms."""
    v = 3000
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.8, top_k=20),
        dict(temperature=1.2, top_p=0.7),
        dict(temperature=0.9, min_p=0.05),
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=5, top_p=0.9),
    ]
    params = [SamplingParams(seed=100 + i, **kinds[i % len(kinds)]) for i in range(24)]
    logits = torch.stack([sparse_logits(v, 30, seed=i) for i in range(24)]).to(DEVICE)
    meta = meta_for(params)
    for step in range(5):
        meta.steps = [step] * len(params)
        expected = Sampler(seed=1)(logits, meta).token_ids
        got = Sampler(seed=1)._draw_on_device(logits, meta).cpu().numpy()
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("path", ["sparse", "library", "torch"])
def test_grammar_masks_and_logit_bias_leave_only_allowed_tokens(path, monkeypatch):
    """Packed bitmasks on some rows (tokens past the mask's width refused too) and logit_bias:
    greedy, plain and filtered draws pick only allowed tokens; the other rows are untouched."""
    v, b = 70, 4
    logits = torch.randn(b, v) * 5
    allowed = {0: [3, 40], 2: [5, 65, 69]}  # 65 and 69 lie past the 64 tokens two words hold
    bitmask = np.zeros((2, 3), np.int32)
    for j, (_row, ids) in enumerate(allowed.items()):
        for t in ids:
            if t < 64:
                bitmask[j, t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))
    bitmask = bitmask[:, :2]  # two words: 64 tokens; 65 and 69 are refused as padding
    settings = [(0.0, 1.0), (1.0, 1.0), (1.0, 0.9), (0.0, 1.0)]
    params = [SamplingParams(temperature=t, top_p=p, seed=i) for i, (t, p) in enumerate(settings)]
    meta = SamplingMetadata.build(params, [[1]] * b, [[]] * b, allowed_rows=[0, 2], allowed_bitmask=bitmask)
    meta.bias = SamplingMetadata.build(
        [SamplingParams(), SamplingParams(logit_bias={7: 100.0})] + [SamplingParams()] * 2, [[1]] * b, [[]] * b
    ).bias
    if path != "sparse":  # whole rows masked: by the CPU library, or in torch (GPUs; CPUs without it)
        monkeypatch.setattr(sampling, "SPARSE_MAX_FRACTION", 0.0)
    if path == "torch":
        monkeypatch.setattr(sampling.cpu_kernels, "kernels_for", lambda x: None)
    raw = logits.clone()
    for step in range(20):
        meta.steps = [step] * b
        tokens = Sampler(seed=step)(logits, meta).token_ids
        assert tokens[0] in (3, 40) and tokens[1] == 7
        assert tokens[3] == int(logits[3].argmax())
        assert tokens[2] == 5  # 65 and 69 are padding, refused whatever the mask says
    assert torch.equal(logits, raw)  # the logits themselves are never modified


def test_sparse_grammar_rows_draw_as_the_masked_whole_rows(monkeypatch):
    """A grammar row that allows few tokens is sampled from those alone: the same tokens as the
    masked whole row (greedy, temperature, top-k, top-p, min-p), whatever the path."""
    v, b = 5000, 6
    rng = np.random.default_rng(1)
    bitmask = np.zeros((b, (v + 31) // 32), np.int32)
    for row in range(b):
        for t in rng.choice(v, 40, replace=False):
            bitmask[row, t // 32] |= np.uint32(1 << (t % 32)).view(np.int32)
    settings = [dict(temperature=0.0), dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1)]
    for seed in range(30):
        logits = torch.from_numpy(rng.normal(size=(b, v)).astype(np.float32) * 4)
        params = [SamplingParams(seed=seed, **kw) for kw in settings]
        meta = SamplingMetadata.build(params, [[1]] * b, [[]] * b, allowed_rows=range(b), allowed_bitmask=bitmask)
        sparse = Sampler()(logits, meta).token_ids
        monkeypatch.setattr(sampling, "SPARSE_MAX_FRACTION", 0.0)
        whole = Sampler()(logits, meta).token_ids
        monkeypatch.undo()
        assert sparse.tolist() == whole.tolist()
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
        assert all(bits[row, t] for row, t in enumerate(sparse))
