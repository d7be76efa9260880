"""What an MTP speculative step costs on the GPU against a plain decode step (issue #9), on the
80B-dimension 8-layer slice of gpu_model.py (+ one MTP layer, random bf16 weights), 1K context.

    python benchmarks/gpu_spec_step.py --out gpu_spec_step.json [--batches 1,16,64] [--ks 1,2,3]
                                       [--profile]

Per batch size B (medians, device time incl. launch gaps):
  plain     one decode step (forward + logits), CUDA-graph replay (CudaGraphRunner) and eager
  verify_k  the verify forward of k drafts: B x (k+1) tokens with per-position DeltaNet state slots,
            forward + logits of every position; eager and by VerifyGraphRunner replay
  mtp       the MTP head: one draft step (B tokens + logits; graph and eager) and the catch-up over
            B x (k+1) positions (eager)
The spec step = verify_k + catch-up + (k - 1) draft steps; `breakeven_len` is the mean accepted
length (tokens one verify emits) at which its tokens per second equal the plain step's. With --profile: kernel tables of decode B=1 and prefill 8K by torch op and shape.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch
from triton.testing import do_bench

from benchmarks.gpu_model import BS, CTX, DIMS, build_models, make_cache, randomize_, timed
from qwen3next.engine.cuda_graph import CudaGraphRunner, VerifyGraphRunner
from qwen3next.forward_batch import ForwardBatch
from qwen3next.mtp import Qwen3NextMTP

RES: dict = {}


def graph_ms(fn) -> float:
    """Capture fn() once (after a warm-up call) and time its replays."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=25, rep=200, return_mode="median")


def spec_batch(B: int, q: int, nb: int, k_slots: int, dev: str = "cuda"):
    """B sequences of q new tokens at positions CTX.. on their own blocks; the state after position
    j < q-1 of row r goes to scratch slot B + r*k_slots + j. -> (ids, pos, batch)."""
    tables = torch.arange(B * nb, device=dev).view(B, nb)
    pos = (CTX + torch.arange(q, device=dev)).repeat(B)
    row = torch.arange(B, device=dev).repeat_interleave(q)
    slot_mapping = tables[row, pos // BS] * BS + pos % BS
    fb = ForwardBatch(cu_seqlens=torch.arange(B + 1, device=dev) * q, seq_lens=[q] * B, context_lens=[CTX] * B,
                      cache=None, block_tables=tables, slot_mapping=slot_mapping,
                      state_slots=torch.arange(B, device=dev))
    if q > 1:
        fb.per_token_state_slots = torch.tensor([B + r * k_slots + j if j < q - 1 else -1
                                                 for r in range(B) for j in range(q)], device=dev)
    ids = torch.randint(0, DIMS["vocab_size"], (B * q,), device=dev)
    return ids, pos, fb


def op_table(fn, n: int = 25) -> list:
    """[(op, input shapes, device us per call)] by torch op and shape (self device time), 3 calls."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages(group_by_input_shape=True):
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0)
        if t:
            rows.append((ev.key[:60], str(ev.input_shapes)[:120], round(t / 3, 1), ev.count // 3))
    rows.sort(key=lambda r: -r[2])
    return [("TOTAL", "", round(sum(r[2] for r in rows), 1), 0)] + rows[:n]


def run(batches: list[int], ks: list[int], profile: bool) -> None:
    ours, _ = build_models(with_hf=False)
    cfg = ours.config
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            ours.mtp = Qwen3NextMTP(cfg, ours).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    randomize_(ours.mtp, seed=1)
    kmax, bmax = max(ks), max(batches)
    nb = (CTX + kmax + 1) // BS + 2
    cache = make_cache(ours, bmax * (kmax + 1) + 1, bmax * nb)
    plain = CudaGraphRunner(ours, cache, nb, max_batch=bmax, batch_sizes=batches)
    plain.capture()
    verify = {}
    for k in ks:
        t0 = time.time()
        try:
            verify[k] = VerifyGraphRunner(ours, cache, nb, max_batch=bmax, tokens_per_seq=k + 1, batch_sizes=batches)
            verify[k].capture()
        except Exception:
            RES.setdefault("verify_graph_errors", {})[k] = traceback.format_exc()[-1500:]
            verify.pop(k, None)
        RES.setdefault("verify_capture_s", {})[k] = round(time.time() - t0, 1)
    for B in batches:
        r = RES[f"B{B}"] = {}
        ids, pos, fb = spec_batch(B, 1, nb, kmax)
        fb.cache = cache
        with torch.inference_mode():
            plain.run(ids, pos, fb)
            r["plain_graph_ms"] = round(do_bench(plain.graphs[B].replay, warmup=25, rep=200, return_mode="median"), 4)

            def plain_eager():
                ours.compute_logits(ours(ids, pos, fb))
            r["plain_eager_ms"] = round(timed(plain_eager, reps=10, warmup=2), 3)
            # MTP draft step: B tokens through the MTP layer + logits (decode-shaped)
            hid = torch.randn(B, DIMS["hidden_size"], device="cuda", dtype=torch.bfloat16)
            fb.context_lens_tensor  # noqa: B018  (cached before a capture)

            def mtp_step():
                ours.compute_logits(ours.mtp(ids, hid, pos, fb))
            r["mtp_draft_eager_ms"] = round(timed(mtp_step, reps=10, warmup=2), 3)
            try:
                r["mtp_draft_graph_ms"] = round(graph_ms(mtp_step), 4)
            except Exception as e:
                r["mtp_draft_graph_error"] = repr(e)[:300]
            for k in ks:
                q = k + 1
                vids, vpos, vfb = spec_batch(B, q, nb, kmax)
                vfb.cache = cache
                ends = torch.arange(B, device="cuda") * q + k

                def verify_eager():
                    h = ours(vids, vpos, vfb)
                    ours.compute_logits(h)
                vr = r[f"verify_k{k}"] = {"tokens": B * q}
                vr["eager_ms"] = round(timed(verify_eager, reps=10, warmup=2), 3)
                if k in verify:
                    verify[k].run(vids, vpos, vfb)
                    vr["graph_ms"] = round(do_bench(verify[k].graphs[B].replay, warmup=25, rep=200,
                                                    return_mode="median"), 4)
                # MTP catch-up over all q positions (every draft accepted), logits of the last
                chid = torch.randn(B * q, DIMS["hidden_size"], device="cuda", dtype=torch.bfloat16)

                def catch_up():
                    ours.compute_logits(ours.mtp(vids, chid, vpos, vfb)[ends])
                vr["mtp_catchup_eager_ms"] = round(timed(catch_up, reps=10, warmup=2), 3)
                verify_ms = vr.get("graph_ms", vr["eager_ms"])
                draft_ms = r.get("mtp_draft_graph_ms", r["mtp_draft_eager_ms"])
                step = verify_ms + vr["mtp_catchup_eager_ms"] + (k - 1) * draft_ms
                vr["spec_step_ms"] = round(step, 3)
                vr["verify_over_plain"] = round(verify_ms / r["plain_graph_ms"], 3)
                # tokens per verify needed for the spec step to match the plain step's tokens/s
                vr["breakeven_len"] = round(step / r["plain_graph_ms"], 3)
        print(f"B={B}: " + json.dumps(r), flush=True)
        save()
    if profile:
        prof = RES["profile"] = {}
        with torch.inference_mode():
            ids, pos, fb = spec_batch(1, 1, nb, kmax)
            fb.cache = cache
            prof["decode_B1_eager_ops"] = op_table(lambda: ours.compute_logits(ours(ids, pos, fb)))
            prof["decode_B1_graph_ops"] = op_table(plain.graphs[1].replay)
            if 16 in batches and 3 in verify:
                prof["verify_B16_k3_graph_ops"] = op_table(verify[3].graphs[16].replay)
            del plain, verify
            T = 8192
            pcache = make_cache(ours, 2, T // BS + 1)
            pids = torch.randint(0, DIMS["vocab_size"], (T,), device="cuda")
            ppos = torch.arange(T, device="cuda")
            pfb = ForwardBatch(cu_seqlens=torch.tensor([0, T], device="cuda"), seq_lens=[T], context_lens=[0],
                               cache=pcache, block_tables=torch.arange(T // BS + 1, device="cuda")[None],
                               slot_mapping=torch.arange(T, device="cuda"), state_slots=torch.tensor([0], device="cuda"))
            prof["prefill_8k_ops"] = op_table(lambda: ours.compute_logits(ours(pids, ppos, pfb)[-1:]), n=40)
        save()


OUT = "gpu_spec_step.json"


def save() -> None:
    with open(OUT, "w") as f:
        json.dump(RES, f, indent=1)


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--ks", default="1,2,3")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--commit", default=None)
    a = ap.parse_args()
    OUT = a.out
    import triton

    RES["env"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "commit": a.commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        run([int(b) for b in a.batches.split(",")], [int(k) for k in a.ks.split(",")], a.profile)
    except Exception:
        RES["error"] = traceback.format_exc()[-3000:]
        print(RES["error"], flush=True)
    save()


if __name__ == "__main__":
    main()
