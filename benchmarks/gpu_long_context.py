"""Long context on one GPU: the 80B dimensions on 8 layers (benchmarks/gpu_model.py's DIMS, ROPE and
randomize_, random bf16 weights) through LLMEngine with chunked prefill, one request at a time.

    python benchmarks/gpu_long_context.py --out long.json [--commit SHA] [--budget-s 115]
        [--lengths 32768,131072,262080] [--yarn-len 327680] [--sections engine,attention,yarn]

Sections (each saved as it finishes; one that would not fit in --budget-s is skipped and says so):
  engine     TTFT of one prompt per length, longest first (chunks of 8192), then ms per decode
             step at that context (B = 1, greedy, CUDA-graph replay), GPU memory
  chunks     (right after the longest) that prompt again with chunks of 16384: last-token logits
             against the 8192 run (relative error, argmax, top-1 margin), the greedy tokens after
  attention  one layer's paged attention at the longest context (8192 queries after the prefix,
             and a decode query) against torch SDPA (flash) and an fp32 reference; the KV pages
             sit above 2**31 elements of the pool, in shuffled order (int64 offsets)
  yarn       the model card's 1M recipe (rope yarn, factor 4, original 262144): TTFT and eager
             decode of one --yarn-len prompt past the native 262144 positions
The paged prefill kernel is pinned to its measured pick (128/64/8/3, sessions 2-4's autotune at
8K) so the call pays no 12-config autotune at 256K; other kernels autotune as usual.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time

import torch
import triton

from benchmarks.gpu_model import DIMS, ROPE, build_slice
from benchmarks.results import Results
from qwen3next.engine import EngineArgs, LLMEngine
from qwen3next.sampling_params import SamplingParams

R = Results("gpu_long_context.json")
RES = R.data
T0 = time.time()
BUDGET = [115.0]
CHUNKS = (8192, 16384)  # max_num_batched_tokens of the runs, and of the comparison run
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}
GIB = 1 << 30


def left_s() -> float:
    return BUDGET[0] - (time.time() - T0)


def pin_paged_prefill() -> None:
    from qwen3next.kernels.triton import attention

    attention._prefill_kernel.configs = [triton.Config({"BM": 128, "BN": 64}, num_warps=8, num_stages=3)]


class LogitTap:
    """Keeps the last one-row compute_logits output of eager forwards (the prompt's last token;
    decode steps replay CUDA graphs and never reach it). Installed after the graphs are captured."""

    def __init__(self, model):
        self.orig, self.last = model.compute_logits, None
        model.compute_logits = self

    def __call__(self, hidden):
        out = self.orig(hidden)
        if out.shape[0] == 1:
            self.last = out[0].clone()
        return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def run_request(eng: LLMEngine, prompt: list[int], out_len: int, chunk: int, tap: LogitTap | None = None) -> dict:
    """One greedy request alone on the engine: TTFT, per-step decode times, tokens, peak memory;
    with a tap, its logits of the prompt's last token (not saved: "_logits")."""
    eng.scheduler.max_num_batched_tokens = chunk
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    rid = f"r{time.time_ns()}"
    t0 = time.perf_counter()
    eng.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True))
    tokens, steps, ttft, last, first = [], [], None, t0, None
    while eng.has_unfinished_requests():
        outs = eng.step()
        now = time.perf_counter()
        got = sum(len(o.outputs[0].token_ids) for o in outs if o.outputs)
        if got:
            if ttft is None:
                ttft = now - t0
                first = tap.last if tap is not None else None
            else:
                steps.append((now - last) * 1e3)
            last = now
        for o in outs:
            if o.outputs:
                tokens += o.outputs[0].token_ids
    free, total = torch.cuda.mem_get_info()
    return {"prompt_len": len(prompt), "chunk": chunk, "ttft_s": round(ttft, 3),
            "prefill_tok_per_s": round(len(prompt) / ttft), "decode_ms_per_step": round(statistics.median(steps), 3),
            "decode_steps": len(steps), "decode_ms_min_max": [round(min(steps), 3), round(max(steps), 3)],
            "peak_alloc_GiB": round(torch.cuda.max_memory_allocated() / GIB, 2),
            "device_used_GiB": round((total - free) / GIB, 2), "tokens": tokens, "_logits": first}


def make_engine(model, max_model_len: int, chunk: int, eager: bool = False) -> LLMEngine:
    """One sequence of max_model_len. The cache budget is given (the KV of one sequence plus room):
    no cache-less profiling forward at start, whose compiles and autotuning this run never uses."""
    t0 = time.time()
    kv_bytes = 2 * max_model_len * 2 * 2 * 256 * 2 + (1 << 30)  # 2 layers x K, V x 2 heads x 256 x bf16
    eng = LLMEngine(model, EngineArgs(device="cuda", max_num_seqs=1, max_num_batched_tokens=chunk,
                                      max_model_len=max_model_len, enforce_eager=eager,
                                      kv_cache_memory_bytes=kv_bytes), eos_token_ids=[])
    p = eng.cache.plan
    RES.setdefault("engines", []).append(
        {"max_model_len": max_model_len, "init_s": round(time.time() - t0, 1), "kv_blocks": p.num_blocks,
         "kv_GiB": round(p.num_blocks * p.bytes_per_block / GIB, 3),
         "state_MiB_per_slot": round(p.bytes_per_slot / (1 << 20), 1), "graphs": not eager})
    return eng


def prompt_of(n: int, seed: int, vocab: int | None = None) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab or DIMS["vocab_size"], (n,), generator=g).tolist()


@R.section
def engine(res, eng, tap, lengths, out_len):
    # warm-up: compiles (and autotunes) the cached-path shapes of both chunk sizes, prefix or not
    t0 = time.time()
    for chunk in CHUNKS:
        run_request(eng, prompt_of(chunk + 1000, 99), 2, chunk).pop("_logits")
    res["warmup_s"] = round(time.time() - t0, 1)
    print(f"warm-up {res['warmup_s']} s", flush=True)
    # the longest first (and its chunking comparison right after): the figures that matter most
    for i, n in enumerate(sorted(lengths, reverse=True)):
        est = 4.0 * (n / 262144) ** 1.6 + 1.0  # (quadratic attention, linear rest), H200
        if left_s() < est + 3:
            res[f"L{n}"] = {"skipped": f"{left_s():.0f} s left"}
            continue
        r = run_request(eng, prompt_of(n, n), out_len, CHUNKS[0], tap)
        logits = r.pop("_logits")
        r["last_logits_argmax"] = int(logits.argmax())
        res[f"L{n}"] = r
        print(f"L={n}: TTFT {r['ttft_s']} s ({r['prefill_tok_per_s']} tok/s), decode {r['decode_ms_per_step']} "
              f"ms/step, peak {r['peak_alloc_GiB']} GiB", flush=True)
        R.save()
        if i == 0:
            chunks(eng, tap, n, logits, r["tokens"], out_len)


@R.section
def chunks(res, eng, tap, n, ref, ref_tokens, out_len):
    if left_s() < 4.0 * (n / 262144) ** 1.6 + 3:
        res["skipped"] = f"{left_s():.0f} s left"
        return
    r = run_request(eng, prompt_of(n, n), out_len, CHUNKS[1], tap)
    got = r.pop("_logits")
    top2 = ref.topk(2).values
    res.update(prompt_len=n, chunks=CHUNKS, ttft_s=r["ttft_s"], decode_ms_per_step=r["decode_ms_per_step"], last_logits_rel_err=rel_err(got, ref),
               max_abs_diff=float((got - ref).abs().max()), ref_top1_margin=float(top2[0] - top2[1]),
               argmax_agree=bool(got.argmax() == ref.argmax()),
               greedy_tokens_equal=r["tokens"] == ref_tokens,
               greedy_first_diff=next((i for i, (a, b) in enumerate(zip(r["tokens"], ref_tokens)) if a != b), None))
    print(f"chunks {CHUNKS} at {n}: rel err {res['last_logits_rel_err']:.3e}, argmax "
          f"{res['argmax_agree']}, greedy equal {res['greedy_tokens_equal']}", flush=True)


def fp32_attention(q, k, v, qpos, scale):
    """q [n, Hq, D] at absolute positions qpos [n]; k, v [L, Hkv, D] -> [n, Hq, D] in fp32."""
    n, HQ, D = q.shape
    G = HQ // k.shape[1]
    out = torch.empty(n, HQ, D, device=q.device)
    kf, vf = k.float(), v.float()
    keys = torch.arange(k.shape[0], device=q.device)
    for h in range(HQ):
        s = (q[:, h].float() @ kf[:, h // G].T) * scale                   # [n, L]
        s.masked_fill_(keys[None, :] > qpos[:, None], float("-inf"))
        out[:, h] = torch.softmax(s, -1) @ vf[:, h // G]
    return out


def attention_check(L: int, n_q: int, high_pool: bool = True, time_it: bool = False, seed: int = 5,
                    dev: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> dict:
    """One gated-attention layer's paged attention (80B heads: 16 q / 2 kv of 256, pages of 16) at
    context L: n_q prefill queries after L - n_q cached tokens, then one decode query at position L,
    against torch SDPA (flash when it takes the problem; kv heads expanded) and an fp32 reference of
    the last 128 prefill queries + the decode query. high_pool: the pages are the top blocks of a pool
    past 2**31 elements, shuffled (the kernels' int64 offsets). -> relative errors (and timings)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    from qwen3next.kernels.triton.attention import paged_attention, write_kv

    HQ, HKV, D, BS = DIMS["num_attention_heads"], DIMS["num_key_value_heads"], DIMS["head_dim"], 16
    scale, sdpa = D ** -0.5, torch.nn.functional.scaled_dot_product_attention
    g = torch.Generator(device=dev).manual_seed(seed)
    N = L + 1  # L prompt tokens + the decode token
    k = torch.randn(N, HKV, D, device=dev, generator=g).to(dtype)
    v = torch.randn(N, HKV, D, device=dev, generator=g).to(dtype)
    q = (2 * torch.randn(n_q + 1, HQ, D, device=dev, generator=g)).to(dtype)  # a peaky softmax
    nb = -(-N // BS)
    per_block = 2 * BS * HKV * D
    num_blocks = ((2**31) // per_block if high_pool else 0) + nb + 64
    kv = torch.empty(num_blocks, 2, BS, HKV, D, device=dev, dtype=dtype)
    table = num_blocks - 1 - torch.randperm(nb, device=dev)                  # [nb] the top blocks, shuffled
    res = {"L": L, "n_q": n_q, "pool_GiB": round(kv.numel() * kv.element_size() / GIB, 2),
           "first_page_element": int(table.min()) * per_block}
    pos = torch.arange(N, device=dev)
    write_kv(k, v, kv, table[pos // BS] * BS + pos % BS)
    bt = table[None]

    def lens(*x):
        return torch.tensor(x, dtype=torch.long, device=dev)

    def ours_prefill():
        return paged_attention(q[:n_q], kv, bt, lens(0, n_q), lens(L - n_q), scale)

    def ours_decode():
        return paged_attention(q[n_q:], kv, bt, lens(0, 1), lens(L), scale)

    o_pre, o_dec = ours_prefill(), ours_decode()
    kx = k.transpose(0, 1).repeat_interleave(HQ // HKV, 0)[None]             # [1, HQ, N, D]
    vx = v.transpose(0, 1).repeat_interleave(HQ // HKV, 0)[None]

    def sdpa_prefill():
        return sdpa(q[:n_q].transpose(0, 1)[None], kx[:, :, :L], vx[:, :, :L], attn_mask=causal_lower_right(n_q, L),
                    scale=scale)[0].transpose(0, 1)

    def sdpa_decode():
        return sdpa(q[n_q:].transpose(0, 1)[None], kx, vx, scale=scale)[0].transpose(0, 1)

    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            s_pre, s_dec = sdpa_prefill(), sdpa_decode()
            if time_it:
                res["sdpa_prefill_ms"] = round(triton.testing.do_bench(sdpa_prefill, warmup=1, rep=20,
                                                                       return_mode="median"), 2)
        res["sdpa_backend"] = "flash"
    except RuntimeError as e:  # no flash for this torch / shape: torch's own pick
        res["sdpa_backend"] = f"default ({str(e)[:120]})"
        s_pre, s_dec = sdpa_prefill(), sdpa_decode()
    if time_it:
        res["ours_prefill_ms"] = round(triton.testing.do_bench(ours_prefill, warmup=1, rep=20, return_mode="median"), 2)
        res["ours_decode_ms"] = round(triton.testing.do_bench(ours_decode, warmup=1, rep=20, return_mode="median"), 3)
    m = min(128, n_q)
    sel = torch.arange(n_q - m, n_q + 1, device=dev)
    ref = fp32_attention(q[sel], k, v, L - n_q + sel, scale)
    res.update(prefill_ours_vs_sdpa=rel_err(o_pre, s_pre), decode_ours_vs_sdpa=rel_err(o_dec, s_dec),
               ours_vs_fp32=rel_err(torch.cat([o_pre[-m:], o_dec]), ref),
               sdpa_vs_fp32=rel_err(torch.cat([s_pre[-m:], s_dec]), ref),
               decode_ours_vs_fp32=rel_err(o_dec, ref[-1:]),
               finite=bool(o_pre.isfinite().all() and o_dec.isfinite().all()))
    return res


@R.section
def attention(res, L: int, n_q: int = 8192):
    res.update(attention_check(L, n_q, high_pool=True, time_it=True))
    print({k: v for k, v in res.items() if k != "wall_s"}, flush=True)


@R.section
def yarn(res, n: int, out_len: int):
    est = 4.0 * (n / 262144) ** 1.8 + 10  # model rebuild, an eager engine (no graph capture), the prompt
    if left_s() < est:
        res["skipped"] = f"{left_s():.0f} s left, needs ~{est:.0f}"
        return
    model = build_slice(dict(ROPE, **YARN))
    eng = make_engine(model, n + out_len + 64, CHUNKS[0], eager=True)
    r = run_request(eng, prompt_of(n, n), out_len, CHUNKS[0])
    r.pop("_logits")
    r["limit"] = model.config.max_model_len_limit
    res.update(r)
    print(f"yarn L={n}: TTFT {r['ttft_s']} s, decode {r['decode_ms_per_step']} ms/step (eager)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=R.path)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--budget-s", type=float, default=115.0, help="skip sections that would end past this")
    ap.add_argument("--lengths", default="32768,131072,262080", help="prompt lengths (<= 262144 - decode)")
    ap.add_argument("--out-len", type=int, default=33, help="tokens generated per request (1 + decode steps)")
    ap.add_argument("--yarn-len", type=int, default=327680)
    ap.add_argument("--sections", default="engine,attention,yarn", help="which of engine (+ chunks), attention, yarn")
    a = ap.parse_args()
    R.path, BUDGET[0] = a.out, a.budget_s
    RES["env"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "python": platform.python_version(), "commit": a.commit,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    lengths = [int(x) for x in a.lengths.split(",")]
    sections = a.sections.split(",")
    pin_paged_prefill()
    if "engine" in sections:
        model = build_slice(dict(ROPE))
        RES["build_s"] = round(time.time() - T0, 1)
        R.save()
        eng = make_engine(model, 262144, CHUNKS[1])
        print(f"built in {RES['build_s']} s, engine {RES['engines'][-1]}", flush=True)
        engine(eng, LogitTap(model), lengths, a.out_len)
        del eng, model
        gc.collect()
        torch.cuda.empty_cache()
    if "attention" in sections:
        if left_s() > 5:
            attention(max(lengths))
        else:
            RES["attention"] = {"skipped": f"{left_s():.0f} s left"}
        gc.collect()
        torch.cuda.empty_cache()
    if "yarn" in sections:
        yarn(a.yarn_len, a.out_len)
    RES["total_s"] = round(time.time() - T0, 1)
    R.save()
    summary(RES)


def summary(res: dict) -> None:
    """A few lines per section, token lists and tracebacks left out (the JSON has everything)."""
    def brief(d):
        return {k: v for k, v in d.items() if k not in ("tokens", "error")}

    print("engines", res.get("engines"), "build_s", res.get("build_s"), "total_s", res.get("total_s"))
    for name, v in res.items():
        if not isinstance(v, dict) or name == "env":
            continue
        if "error" in v:
            print(name, "ERROR", v["error"].strip().splitlines()[-1][:200])
        subs = {k: x for k, x in v.items() if isinstance(x, dict)}
        for k, x in subs.items():
            print(name, k, brief(x))
        print(name, {k: x for k, x in brief(v).items() if k not in subs})


if __name__ == "__main__":
    main()
