"""GPU check of the Triton kernels: correctness against the torch references, timings against the
torch path, and a single-device end-to-end generation on the Triton path.

    python benchmarks/gpu_check.py               # on a CUDA machine (about 1-2 minutes)
    python benchmarks/gpu_check.py --cpu-smoke   # tiny sizes in triton's interpreter, no GPU
    python benchmarks/gpu_check.py --compile-only [--arch 90]  # compile every kernel for sm_90, no GPU

Sizes fill a chip with Llama-3.1-8B head shapes (32 query heads, 8 KV heads, head_dim 128, page
size 16): decode of 64 sequences over 4k-token contexts, prefill of 8 x 1024 tokens, and
norm / rope / silu on 8192 tokens of hidden size 4096. Every check prints one line; the script
exits non-zero if any check failed.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:  # before triton_kernels is imported: triton 3.9 picks the interpreter at decoration
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

F32, BF16 = torch.float32, torch.bfloat16
SHORT = {F32: "f32", BF16: "bf16"}
TOL = {F32: 1e-5, BF16: 1e-2}  # rtol = atol

# Full sizes on CUDA; tiny ones for the interpreter smoke run.
SIZES = {
    "gpu": dict(
        tokens=8192,
        hidden=4096,
        inter=14336,
        hq=32,
        hk=8,
        d=128,
        page=16,
        decode_batch=64,
        decode_ctx=4096,
        prefill=(8, 1024),
        runs=30,
        e2e_steps=16,
        e2e_prompts=(5, 77, 300, 1),
        graph_batches=(1, 7, 64),
        graph_steps=64,
    ),
    "smoke": dict(
        tokens=16,
        hidden=64,
        inter=96,
        hq=8,
        hk=2,
        d=64,
        page=16,
        decode_batch=2,
        decode_ctx=70,
        prefill=(2, 24),
        runs=2,
        e2e_steps=2,
        e2e_prompts=(5, 19, 1),
        graph_batches=(1, 3),
        graph_steps=3,
    ),
}

results: list[tuple[str, bool]] = []


def report(name: str, ok: bool, detail: str) -> None:
    results.append((name, ok))
    print(f"{'PASS' if ok else 'FAIL'}  {name:<44} {detail}", flush=True)


def check(name: str, got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    got, expected = got.float(), expected.float()
    err = (got - expected).abs()
    bad = err > tol + tol * expected.abs()
    nonfinite = int((~torch.isfinite(got)).sum())
    ok = not bool(bad.any()) and nonfinite == 0
    report(
        name, ok, f"max abs err {err.max().item():.2e} (tol {tol:g}), {int(bad.sum())} over tol, {nonfinite} non-finite"
    )


class Timer:
    """Median milliseconds of `runs` calls: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device, runs: int):
        self.device, self.runs = device, runs

    def __call__(self, fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(self.runs):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


timings: list[tuple[str, str, float, float, str]] = []


def time_pair(name: str, shape: str, timer: Timer, torch_fn, triton_fn, extra=None) -> None:
    t_torch, t_triton = timer(torch_fn), timer(triton_fn)
    timings.append((name, shape, t_torch, t_triton, extra(t_triton) if extra else ""))


def paged(lens: list[int], page: int, hk: int, d: int, dtype, device, spare: int = 2):
    """Random K/V for sequences of `lens` tokens on shuffled pages; unused pages hold NaN."""
    n_blocks = [-(-n // page) for n in lens]
    total = sum(n_blocks) + spare
    k = torch.full((total, page, hk, d), float("nan"), dtype=dtype, device=device)
    v = torch.full_like(k, float("nan"))
    order = torch.randperm(total - 1, device=device) + 1  # page 0 stays NaN: padding points at it
    tables = torch.zeros((len(lens), max(n_blocks) + 1), dtype=torch.int32, device=device)
    used = 0
    for b, (n, p) in enumerate(zip(lens, n_blocks)):
        pages = order[used : used + p]
        used += p
        tables[b, :p] = pages.to(torch.int32)
        slots = (pages[:, None] * page + torch.arange(page, device=device)).flatten()[:n]
        k.view(-1, hk, d)[slots] = torch.randn(n, hk, d, device=device).to(dtype)
        v.view(-1, hk, d)[slots] = torch.randn(n, hk, d, device=device).to(dtype)
    return k, v, tables, torch.tensor(lens, dtype=torch.int32, device=device)


def kernel_checks(device: torch.device, s: dict, timer: Timer) -> None:
    from llama3_dist.kernels import reference as ref
    from llama3_dist.kernels import triton_kernels as tk

    N, H, inter = s["tokens"], s["hidden"], s["inter"]
    hq, hk, d, page = s["hq"], s["hk"], s["d"], s["page"]

    def guarded(name, fn):
        try:
            fn()
        except Exception as e:  # one broken kernel must not hide the others
            traceback.print_exc()
            report(name, False, f"raised {type(e).__name__}: {e}")

    # RMSNorm + residual
    def norm():
        for dtype in (F32, BF16):
            x, r = torch.randn(N, H, device=device).to(dtype), torch.randn(N, H, device=device).to(dtype)
            w = (1 + 0.1 * torch.randn(H, device=device)).to(dtype)
            out, h = tk.rms_norm(x, w, 1e-5, r)
            e_out, e_h = ref.rms_norm(x, w, 1e-5, r)
            check(f"rms_norm+residual {SHORT[dtype]} [{N},{H}]", torch.cat([out, h]), torch.cat([e_out, e_h]), dtype)
        time_pair(
            "rms_norm+residual",
            f"{N}x{H} bf16",
            timer,
            lambda: ref.rms_norm(x, w, 1e-5, r),
            lambda: tk.rms_norm(x, w, 1e-5, r),
        )

    guarded("rms_norm", norm)

    # Rotary on q/k views of a fused qkv output: full rotary, partial (0.75) interleaved.
    def rope():
        max_pos = 8192
        for dtype, rot, inter in ((F32, d, False), (BF16, d, False), (BF16, 3 * d // 4, True)):
            qkv = torch.randn(N, (hq + 2 * hk) * d, device=device).to(dtype)
            inv = 1.0 / (500000.0 ** (torch.arange(0, rot, 2, device=device).float() / rot))
            f = torch.arange(max_pos, device=device).float()[:, None] * inv
            cs = torch.cat((f.cos(), f.sin()), -1)
            pos = torch.randint(0, max_pos, (N,), device=device)
            q, k = qkv[:, : hq * d].view(N, hq, d), qkv[:, hq * d : (hq + hk) * d].view(N, hk, d)
            expected = qkv.clone()
            ref.rotary_embedding(
                pos, expected[:, : hq * d].view(N, hq, d), expected[:, hq * d : (hq + hk) * d].view(N, hk, d), cs, inter
            )
            tk.rotary_embedding(pos, q, k, cs, inter)
            check(f"rotary {SHORT[dtype]} rot={rot} interleaved={inter}", qkv, expected, dtype)
        time_pair(
            "rotary (partial, interleaved)",
            f"{N}x({hq}+{hk})x{d} bf16",
            timer,
            lambda: ref.rotary_embedding(pos, q, k, cs, inter),
            lambda: tk.rotary_embedding(pos, q, k, cs, inter),
        )

    guarded("rotary", rope)

    def silu():
        for dtype in (F32, BF16):
            x = torch.randn(N, 2 * inter, device=device).to(dtype)
            check(f"silu_and_mul {SHORT[dtype]} [{N},{2 * inter}]", tk.silu_and_mul(x), ref.silu_and_mul(x), dtype)
        time_pair(
            "silu_and_mul", f"{N}x{2 * inter} bf16", timer, lambda: ref.silu_and_mul(x), lambda: tk.silu_and_mul(x)
        )

    guarded("silu_and_mul", silu)

    def store():
        dtype = BF16
        pages = -(-N // page) + 4
        kc = torch.full((pages, page, hk, d), float("nan"), dtype=dtype, device=device)
        vc = torch.full_like(kc, float("nan"))
        k, v = torch.randn(N, hk, d, device=device).to(dtype), torch.randn(N, hk, d, device=device).to(dtype)
        slots = torch.randperm(pages * page, device=device)[:N]
        slots[::7] = -1
        ekc, evc = kc.clone(), vc.clone()
        ref.store_kv_cache(k, v, ekc, evc, slots)
        tk.store_kv_cache(k, v, kc, vc, slots)
        same = all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in ((kc, ekc), (vc, evc)))
        report(
            f"store_kv_cache {SHORT[dtype]} [{N},{hk},{d}]",
            same,
            "bit-exact, skipped/unused slots untouched" if same else "cache differs from the reference",
        )
        time_pair(
            "store_kv_cache",
            f"{N}x{hk}x{d} bf16",
            timer,
            lambda: ref.store_kv_cache(k, v, ekc, evc, slots),
            lambda: tk.store_kv_cache(k, v, kc, vc, slots),
        )

    guarded("store_kv_cache", store)

    def decode():
        B, ctx = s["decode_batch"], s["decode_ctx"]
        scale = d**-0.5
        # Ragged lengths (not page multiples), GQA 4, both dtypes; then a window and GQA 8.
        for dtype, hq_, hk_, d_, window, lens in (
            (F32, hq, hk, d, None, [ctx - 3 * b for b in range(min(B, 8))]),
            (BF16, hq, hk, d, None, [ctx - 5 * b for b in range(B)]),
            (BF16, hq, hq // 8, 64, 1000, [ctx - 11 * b for b in range(min(B, 8))]),
            (BF16, hq, hk, d, None, [37, 1, 300]),
        ):
            kc, vc, bt, cl = paged(lens, page, hk_, d_, dtype, device)
            q = torch.randn(len(lens), hq_, d_, device=device).to(dtype)
            check(
                f"decode {SHORT[dtype]} B={len(lens)} G={hq_ // hk_} d={d_} win={window}",
                tk.paged_decode_attention(q, kc, vc, bt, cl, scale, window),
                ref.paged_decode_attention(q, kc, vc, bt, cl, scale, window),
                dtype,
            )
        kc, vc, bt, cl = paged([ctx] * B, page, hk, d, BF16, device)
        q = torch.randn(B, hq, d, device=device).to(BF16)
        check(
            f"decode bf16 B={B} ctx={ctx} (timed shape)",
            tk.paged_decode_attention(q, kc, vc, bt, cl, scale),
            ref.paged_decode_attention(q, kc, vc, bt, cl, scale),
            BF16,
        )
        kv_bytes = 2 * B * ctx * hk * d * 2
        time_pair(
            "paged_decode_attention",
            f"B={B} ctx={ctx} {hq}/{hk}x{d} bf16",
            timer,
            lambda: ref.paged_decode_attention(q, kc, vc, bt, cl, scale),
            lambda: tk.paged_decode_attention(q, kc, vc, bt, cl, scale),
            extra=lambda ms: f"{kv_bytes / ms / 1e6:.0f} GB/s K/V",
        )

    guarded("paged_decode_attention", decode)

    def prefill():
        nseq, length = s["prefill"]
        scale = d**-0.5
        for dtype, window, seqs in (
            (F32, None, [(length // 4 + 3, length // 4 + 3), (length // 8 + 5, 9)]),
            (BF16, None, [(length - 7 * b, length - 7 * b) for b in range(nseq)]),
            (BF16, 256, [(length + 13, length // 2), (300, 300)]),
        ):
            lens = [c for c, _ in seqs]
            kc, vc, bt, cl = paged(lens, page, hk, d, dtype, device)
            qsl = torch.tensor([0] + [n for _, n in seqs], device=device).cumsum(0).to(torch.int32)
            q = torch.randn(int(qsl[-1]), hq, d, device=device).to(dtype)
            check(
                f"prefill {SHORT[dtype]} B={len(seqs)} win={window}",
                tk.prefill_attention(q, kc, vc, bt, qsl, cl, scale, window),
                ref.prefill_attention(q, kc, vc, bt, qsl, cl, scale, window),
                dtype,
            )
        kc, vc, bt, cl = paged([length] * nseq, page, hk, d, BF16, device)
        qsl = torch.arange(nseq + 1, device=device, dtype=torch.int32) * length
        q = torch.randn(nseq * length, hq, d, device=device).to(BF16)
        flops = 4 * nseq * hq * d * length * length / 2  # causal
        time_pair(
            "prefill_attention",
            f"{nseq}x{length} {hq}/{hk}x{d} bf16",
            timer,
            lambda: ref.prefill_attention(q, kc, vc, bt, qsl, cl, scale),
            lambda: tk.prefill_attention(q, kc, vc, bt, qsl, cl, scale),
            extra=lambda ms: f"{flops / ms / 1e9:.0f} TFLOP/s",
        )

    guarded("prefill_attention", prefill)


def end_to_end(device: torch.device, s: dict) -> None:
    """A small random bfloat16 Llama through Llama3Model on one device: prefill of a ragged batch
    and teacher-forced decode steps, Triton path against the torch path."""
    import transformers

    from llama3_dist import Llama3Model, ReturnLogits, TextContext

    name = "end-to-end Llama3Model bf16, triton vs torch"
    try:
        cfg = transformers.LlamaConfig(
            hidden_size=512,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=1024,
            num_hidden_layers=4,
            vocab_size=1024,
            max_position_embeddings=4096,
        )
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as path:
            transformers.LlamaForCausalLM(cfg).to(BF16).save_pretrained(path)
            g = torch.Generator().manual_seed(1)
            prompts = [torch.randint(0, 1024, (n,), generator=g).tolist() for n in s["e2e_prompts"]]
            feed = torch.randint(0, 1024, (s["e2e_steps"], len(prompts)), generator=g)
            runs = {}
            for mode in ("torch", "triton"):
                os.environ["LLAMA3_DIST_KERNELS"] = mode  # set back in `finally` below
                with Llama3Model.from_pretrained(
                    path, devices=[str(device)], dtype="bfloat16", return_logits=ReturnLogits.ALL, num_kv_blocks=256
                ) as model:
                    t = time.perf_counter()
                    inputs = model.prepare_initial_token_inputs([TextContext(tokens=list(p)) for p in prompts])
                    logits = [model.execute(inputs).logits]
                    for step in range(s["e2e_steps"]):
                        inputs = model.prepare_next_token_inputs(feed[step], inputs)
                        logits.append(model.execute(inputs).logits)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    runs[mode] = (logits, (time.perf_counter() - t) * 1e3)
        expected, got = (torch.cat(runs[m][0]).float() for m in ("torch", "triton"))
        err = (got - expected).abs().max().item()
        scale = expected.abs().max().item()
        agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
        ok = bool(torch.isfinite(got).all()) and err <= 2e-2 * max(scale, 1.0)
        report(
            name,
            ok,
            f"max abs logit err {err:.2e} (max |logit| {scale:.2f}), argmax agreement "
            f"{agree:.1%}, {s['e2e_steps']} decode steps; torch {runs['torch'][1]:.0f} ms, "
            f"triton {runs['triton'][1]:.0f} ms (first run includes Triton compilation)",
        )
    except Exception as e:
        traceback.print_exc()
        report(name, False, f"raised {type(e).__name__}: {e}")
    finally:
        os.environ.pop("LLAMA3_DIST_KERNELS", None)


def graphs_vs_eager(device: torch.device, s: dict) -> None:
    """A small random bfloat16 Llama through Llama3Model twice, CUDA graphs against eager: greedy
    decoding for 64 steps at batch 1, 7 and 64 (padded buckets), logits within bfloat16 error and
    the same tokens (a divergence counts only where the eager top-2 logits are closer than that
    error: a near-tie either path may break either way)."""
    import transformers

    from llama3_dist import Llama3Model, TextContext

    cfg = transformers.LlamaConfig(
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1024,
        num_hidden_layers=4,
        vocab_size=1024,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as path:
        transformers.LlamaForCausalLM(cfg).to(BF16).save_pretrained(path)
        for batch in s["graph_batches"]:
            name = f"graphs vs eager, greedy batch {batch}"
            try:
                g = torch.Generator().manual_seed(batch)
                prompts = [
                    torch.randint(0, 1024, (int(n),), generator=g).tolist()
                    for n in torch.randint(1, 200, (batch,), generator=g)
                ]
                runs = {}
                for eager in (True, False):
                    with Llama3Model.from_pretrained(
                        path,
                        devices=[str(device)],
                        dtype="bfloat16",
                        num_kv_blocks=2048,
                        enforce_eager=eager,
                        max_batch_size=64,
                    ) as model:
                        graphed = model.executor.worker.decode_graphs is not None
                        contexts = [TextContext(tokens=list(p)) for p in prompts]
                        inputs = model.prepare_initial_token_inputs(contexts)
                        logits, tokens = [], []
                        out = model.execute(inputs).next_token_logits
                        t = time.perf_counter()
                        for _ in range(s["graph_steps"]):
                            chosen = out.argmax(-1)
                            tokens.append(chosen.cpu())
                            logits.append(out.float().cpu())
                            inputs = model.prepare_next_token_inputs(chosen, inputs)
                            out = model.execute(inputs).next_token_logits
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        runs[eager] = (torch.stack(tokens), logits, (time.perf_counter() - t) * 1e3, graphed)
                (tok_e, log_e, ms_e, _), (tok_g, log_g, ms_g, graphed) = runs[True], runs[False]
                same = torch.equal(tok_e, tok_g)
                first = len(log_e) - 1 if same else int((tok_e != tok_g).any(-1).nonzero()[0])
                err = max((a - b).abs().max().item() for a, b in zip(log_e[: first + 1], log_g[: first + 1]))
                detail = f"max abs logit err {err:.2e} over steps 0..{first}"
                if not same:
                    top2 = log_e[first].topk(2, dim=-1).values
                    margin = (top2[:, 0] - top2[:, 1])[(tok_e[first] != tok_g[first])].min().item()
                    detail += f"; tokens diverge at step {first}, eager top-2 margin {margin:.2e}"
                ok = graphed and err <= 3e-2 and (same or margin <= 2 * err)
                report(
                    name,
                    ok,
                    f"{detail}; {'identical' if same else 'near-tie'} tokens over {s['graph_steps']} "
                    f"steps; eager {ms_e / s['graph_steps']:.2f} ms/step, graphs {ms_g / s['graph_steps']:.2f} "
                    f"ms/step (includes the host's argmax copy)" + ("" if graphed else "; NO GRAPHS CAPTURED"),
                )
            except Exception as e:
                traceback.print_exc()
                report(name, False, f"raised {type(e).__name__}: {e}")


def compile_only(arch: int) -> int:
    """Compiles every kernel specialization the GPU run uses down to a cubin for sm_<arch>, with
    triton's bundled ptxas: catches code-generation errors the interpreter cannot see."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_check --compile-only: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llama3_dist.kernels import triton_kernels as tk

    target = GPUTarget("cuda", arch, 32)

    def build(fn, types: dict, consts: dict, num_warps: int = 4) -> None:
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
        name = f"compile sm_{arch} {fn.__name__} {types.get('q_ptr', types.get('x_ptr', ''))}"
        try:
            t = time.perf_counter()
            k = triton.compile(
                ASTSource(fn, sig, constexprs=consts), target=target, options=dict(num_warps=num_warps, num_stages=2)
            )
            report(name, True, f"{time.perf_counter() - t:.1f} s, {k.metadata.shared} B shared, {consts}")
        except Exception as e:
            report(name, False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} {consts}")

    for dt in ("bf16", "fp32"):
        p = "*" + dt
        build(
            tk._rms_norm_kernel,
            dict(x_ptr=p, r_ptr=p, w_ptr=p, out_ptr=p, h_ptr=p, eps="fp32"),
            dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, BLOCK_D=4096),
            num_warps=8,
        )
        build(
            tk._rotary_kernel,
            dict(pos_ptr="*i64", q_ptr=p, k_ptr=p, cs_ptr="*fp32"),
            dict(INTERLEAVED=True, BLOCK_H=16, BLOCK_HALF=64),
        )
        build(tk._silu_and_mul_kernel, dict(x_ptr=p, out_ptr=p), dict(BLOCK=1024))
        build(
            tk._store_kv_kernel,
            dict(k_ptr=p, v_ptr=p, kc_ptr=p, vc_ptr=p, slot_ptr="*i64"),
            dict(BLOCK_H=8, BLOCK_D=128),
        )
        prec, block = ("ieee", 32) if dt == "fp32" else ("tf32", 64)
        for split in (False, True):
            build(
                tk._decode_kernel,
                dict(
                    q_ptr=p,
                    kc_ptr=p,
                    vc_ptr=p,
                    bt_ptr="*i32",
                    cl_ptr="*i32",
                    out_ptr=p,
                    po_ptr="*fp32",
                    pm_ptr="*fp32",
                    pl_ptr="*fp32",
                    scale_log2="fp32",
                ),
                dict(
                    SPLIT=split, USE_WINDOW=split, BLOCK_G=16, BLOCK_N=block, BLOCK_D=128, UPCAST=False, PRECISION=prec
                ),
            )
        build(
            tk._decode_reduce_kernel,
            dict(po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32", out_ptr=p),
            dict(BLOCK_S=8, BLOCK_D=128),
        )
        for window in (False, True):
            build(
                tk._prefill_kernel,
                dict(
                    q_ptr=p,
                    kc_ptr=p,
                    vc_ptr=p,
                    bt_ptr="*i32",
                    qsl_ptr="*i32",
                    cl_ptr="*i32",
                    out_ptr=p,
                    scale_log2="fp32",
                ),
                dict(USE_WINDOW=window, BLOCK_M=block, BLOCK_N=block, BLOCK_D=128, UPCAST=False, PRECISION=prec),
            )
    failed = [n for n, ok in results if not ok]
    print(f"{len(results) - len(failed)}/{len(results)} kernels compiled")
    return 1 if failed else 0


def decode_splits(device: torch.device) -> None:
    """Batch-1 decode attention of the 8B shape against its split count (flash-decoding), the block
    table as wide as a 2048-token sequence (as the decode graphs hold it) and the context shorter:
    32 calls replayed as one CUDA graph (per-launch latency as in the engine's graphs), us a call."""
    from gpu_gemv import replay_ms

    from llama3_dist.kernels import triton_kernels as tk

    hq, hk, d, page, cap = 32, 8, 128, 16, 2048
    heuristic = tk._num_decode_splits(1, hk, cap, device)
    print(f"\ndecode attention, batch 1, block table {cap} tokens wide (heuristic: {heuristic} splits), us a call:")
    for ctx in (160, 1000, 2000):
        kc, vc, bt, cl = paged([ctx], page, hk, d, BF16, device)
        table = torch.zeros((1, cap // page), dtype=torch.int32, device=device)
        table[0, : bt.shape[1]] = bt[0]
        q = torch.randn(1, hq, d, device=device).to(BF16)
        line = []
        for splits in (1, 4, 8, 16, 32, 64):
            call = functools.partial(tk.paged_decode_attention, q, kc, vc, table, cl, d**-0.5, num_splits=splits)
            line.append(f"{splits} splits {replay_ms([call] * 32, 10) / 32 * 1e3:.1f}")
        print(f"  context {ctx}: " + ", ".join(line), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny sizes on CPU in triton's interpreter (checks this script, not speed)",
    )
    parser.add_argument(
        "--compile-only", action="store_true", help="compile every kernel for --arch with triton's ptxas; needs no GPU"
    )
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability for --compile-only")
    args = parser.parse_args()
    if args.compile_only:
        return compile_only(args.arch)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device visible (torch.cuda.is_available() is False); run it on a "
            "GPU machine, or pass --cpu-smoke for a tiny run in triton's interpreter",
            file=sys.stderr,
        )
        return 2
    try:
        import triton
    except ImportError:
        print("gpu_check: triton is not installed; pip install triton", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    s = SIZES["smoke" if args.cpu_smoke else "gpu"]
    name = "CPU (triton interpreter)" if args.cpu_smoke else torch.cuda.get_device_name(device)
    print(f"gpu_check on {name}: torch {torch.__version__}, triton {triton.__version__}")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        kernel_checks(device, s, Timer(device, s["runs"]))
    end_to_end(device, s)
    if not args.cpu_smoke:  # graphs exist only on CUDA
        graphs_vs_eager(device, s)
        try:
            decode_splits(device)
        except Exception as e:  # a measurement for the split heuristic, not a check
            print(f"decode split timings failed: {type(e).__name__}: {e}")

    print(f"\n{'kernel':<30} {'shape':<34} {'torch ms':>10} {'triton ms':>10} {'speedup':>8}")
    for kname, shape, t_torch, t_triton, extra in timings:
        print(f"{kname:<30} {shape:<34} {t_torch:>10.3f} {t_triton:>10.3f} {t_torch / t_triton:>7.2f}x  {extra}")
    failed = [n for n, ok in results if not ok]
    print(
        f"\n{len(results) - len(failed)}/{len(results)} checks passed in {time.perf_counter() - t0:.0f} s"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
