"""Attention prefill on one GPU (issue #5): our Triton kernels against torch SDPA's backends.

The 80B attention shape (16 q / 2 kv heads of 256, KV pages of 16 tokens) at three prefills:
one 8K sequence, 8 x 1K varlen, and 4K new tokens after a 4K cached prefix. Per variant: median
ms (do_bench), TFLOP/s of the causal work (4 * D * Hq per visible query-key pair) and the error
against a float32 reference (max abs, and ||o - ref|| / ||ref||). Variants: the pointer-gather
kernel (`_prefill_kernel` at its autotuned pick), `paged_attention`'s no-prefix dispatch (cuDNN for
equal lengths, the TMA kernel `prefill_fresh`), the TMA kernel at each config, the output gate
pass alone, and SDPA cuDNN / flash / efficient directly (GQA, or KV expanded).

    python3 benchmarks/bench_attention_gpu.py --out $OUT/attn.json        # on the device machine
    PYTHONPATH=.:/tmp/tri36 python benchmarks/bench_attention_gpu.py --compile-only  # here: sm_90
        compile + ptxas registers / spills of every TMA config (triton 3.6 in /tmp/tri36)
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HQ, HKV, D, BS = 16, 2, 256, 16
SCALE = D ** -0.5
CASES = {"8k": ([0], [8192]), "8x1k": ([0] * 8, [1024] * 8), "prefix4k+4k": ([4096], [4096])}
# every fresh-prefill (TMA) config timed on its own, beyond the autotuned pick (BM, BN, warps, stages)
SWEEP = ((64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (64, 32, 4, 3), (32, 32, 4, 2))
# the pointer kernel at its autotuned pick for these shapes (session 4's H200 run): BM, BN, warps, stages
PTR_PICK = (128, 64, 8, 3)


def compile_only() -> int:
    """sm_90 compile of every fresh-prefill config with ptxas -v (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qwen3next.kernels.triton import attention as A

    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    print("triton", triton.__version__)
    fails = 0
    for bm, bn, w, st in sorted(set(SWEEP) | set(A.FRESH_CONFIGS)):
        sig = dict(q_ptr="*bf16", k_desc=f"tensordesc<bf16[{bn},{D}]>", v_desc=f"tensordesc<bf16[{bn},{D}]>",
                   cu_ptr="*i64", B="i32", o_ptr="*bf16", scale="fp32", TB="i32")
        const = dict(HQ=HQ, HKV=HKV, D=D, BB=2, BM=bm, BN=bn, PREC="tf32")
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if sig[n].startswith("*")}
        try:
            k = triton.compile(ASTSource(A._prefill_fresh_body, sig, const, attrs=attrs),
                               target=GPUTarget("cuda", 90, 32), options={"num_warps": w, "num_stages": st})
        except Exception as e:  # report every config
            fails += 1
            print("FAIL", (bm, bn, w, st), str(e).splitlines()[0][:200] if str(e) else repr(e))
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(k.asm["ptx"])
            f.flush()
            r = subprocess.run([str(ptxas), "-v", "-arch=sm_90a", f.name, "-o", "/dev/null"], capture_output=True,
                               text=True)
        info = [ln.split("info    : ")[-1].strip() for ln in r.stderr.splitlines() if "spill" in ln or "Used" in ln]
        fit = "fits" if k.metadata.shared <= 232448 else "TOO MUCH SMEM"
        print("ok  ", (bm, bn, w, st), f"smem {k.metadata.shared} ({fit})", "; ".join(info))
    return 1 if fails else 0


def make_case(ctx: list[int], new: list[int], seed: int):
    """Random q / k / v (bf16), a paged cache with a random block order holding a random prefix and
    the new k / v (written by write_kv) -> dict of tensors."""
    from qwen3next.kernels.triton import attention as tri

    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, dt = "cuda", torch.bfloat16
    T = sum(new)
    per = [-(-(c + n) // BS) for c, n in zip(ctx, new)]
    nblocks = sum(per) + 1
    kv = torch.randn(nblocks, 2, BS, HKV, D, generator=g, device=dev).to(dt)
    perm = torch.randperm(nblocks, generator=g, device=dev)
    bt = torch.zeros(len(ctx), max(per), dtype=torch.long, device=dev)
    slots, used = [], 0
    for b, (c, n) in enumerate(zip(ctx, new)):
        bt[b, : per[b]] = perm[used : used + per[b]]
        used += per[b]
        p = torch.arange(c, c + n, device=dev)
        slots.append(bt[b, p // BS] * BS + p % BS)
    q = torch.randn(T, HQ, D, generator=g, device=dev).to(dt)
    k = torch.randn(T, HKV, D, generator=g, device=dev).to(dt)
    v = torch.randn(T, HKV, D, generator=g, device=dev).to(dt)
    gate = torch.randn(T, HQ, 2 * D, generator=g, device=dev).to(dt)[..., D:]  # the gate half of q_proj, in place
    tri.write_kv(k, v, kv, torch.cat(slots))
    cu = torch.zeros(len(new) + 1, dtype=torch.long, device=dev)
    cu[1:] = torch.tensor(new, device=dev).cumsum(0)
    return dict(q=q, k=k, v=v, gate=gate, kv=kv, bt=bt, cu=cu, ctx=torch.tensor(ctx, device=dev), ctx_l=ctx,
                new_l=new)


def reference(c) -> torch.Tensor:
    """float32 causal attention over prefix (read back from the pages) + new keys -> o [T, Hq, D]."""
    out = torch.empty(c["q"].shape, dtype=torch.float32, device="cuda")
    bos = 0
    for b, (cx, n) in enumerate(zip(c["ctx_l"], c["new_l"])):
        p = torch.arange(cx, device="cuda")
        pages = c["bt"][b, p // BS]
        K = torch.cat([c["kv"][pages, 0, p % BS], c["k"][bos : bos + n]]).float()  # [L, Hkv, D]
        V = torch.cat([c["kv"][pages, 1, p % BS], c["v"][bos : bos + n]]).float()
        for h in range(HQ):
            for r0 in range(0, n, 2048):
                r1 = min(n, r0 + 2048)
                s = c["q"][bos + r0 : bos + r1, h].float() @ K[:, h // (HQ // HKV)].T * SCALE
                qpos = cx + torch.arange(r0, r1, device="cuda")
                s.masked_fill_(torch.arange(K.shape[0], device="cuda")[None, :] > qpos[:, None], float("-inf"))
                out[bos + r0 : bos + r1, h] = torch.softmax(s, -1) @ V[:, h // (HQ // HKV)]
        bos += n
    return out


def flops(c) -> float:
    return sum(4 * D * HQ * (n * cx + n * (n + 1) / 2) for cx, n in zip(c["ctx_l"], c["new_l"]))


def sdpa_variants(c):
    """torch SDPA per backend on the same problem (equal-length sequences, no prefix): name -> fn."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if any(c["ctx_l"]) or len(set(c["new_l"])) != 1:
        return {}
    B, L = len(c["new_l"]), c["new_l"][0]
    q = c["q"].view(B, L, HQ, D).transpose(1, 2)
    k = c["k"].view(B, L, HKV, D).transpose(1, 2)
    v = c["v"].view(B, L, HKV, D).transpose(1, 2)
    ke, ve = (t.repeat_interleave(HQ // HKV, 1) for t in (k, v))
    fns = {}
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for tag, kk, vv, gqa in (("gqa", k, v, True), ("expanded kv", ke, ve, False)):
            def fn(be=be, kk=kk, vv=vv, gqa=gqa):
                with sdpa_kernel([be]):
                    o = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=SCALE,
                                                                         enable_gqa=gqa)
                return o.transpose(1, 2).reshape(B * L, HQ, D)
            try:
                fn()
            except Exception as e:  # a backend that refuses the shape is reported, not fatal
                print(f"  sdpa {name} {tag}: not available ({str(e).splitlines()[0][:100]})")
                continue
            fns[f"sdpa {name} ({tag})"] = fn
            break
    return fns


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--out", default="")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--sweep", default="8k", help="cases that time every TMA config of SWEEP")
    a = ap.parse_args()
    if a.compile_only:
        return compile_only()
    import triton

    from qwen3next.kernels.triton import attention as tri

    print("device", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    rows, res = [], {}
    for name in a.cases.split(","):
        c = make_case(*CASES[name], seed=len(name))
        ref = reference(c)
        fl = flops(c)
        args = (c["q"], c["kv"], c["bt"], c["cu"], c["ctx"], SCALE)

        def ptr():
            bm, bn, w, st = PTR_PICK
            o = torch.empty_like(c["q"])
            T, B = c["q"].shape[0], len(c["new_l"])
            tri._prefill_kernel.fn[(HQ, T // bm + B)](c["q"], c["kv"], c["bt"], c["cu"], B, c["ctx"], o, SCALE,
                                                      c["bt"].shape[1], 4096, HQ=HQ, HKV=HKV, D=D, BS=BS,
                                                      BB=max(2, triton.next_power_of_2(B)), PREC="tf32", BM=bm, BN=bn,
                                                      num_warps=w, num_stages=st)
            return o

        fresh = None if any(c["ctx_l"]) else c["new_l"]

        def dispatch(cudnn, tma):
            tri.DENSE_CUDNN, tri.PREFILL_FRESH = cudnn, tma
            return tri.paged_attention(*args, k=c["k"], v=c["v"], fresh_lens=fresh)

        def gate_pass():
            return tri.gate_output(c["q"], c["gate"])

        fns = {f"triton ptr {PTR_PICK}": ptr, "paged_attention, cuDNN on": lambda: dispatch(True, False),
               "paged_attention, TMA on": lambda: dispatch(False, True),
               "paged_attention, both on": lambda: dispatch(True, True), "gate pass (o * sigmoid(g))": gate_pass}
        if name in a.sweep.split(","):
            for cfg in SWEEP:
                fns[f"triton fresh {cfg}"] = (lambda cfg=cfg: tri.prefill_fresh(c["q"], c["k"], c["v"], c["cu"], SCALE,
                                                                                config=cfg))
        fns.update(sdpa_variants(c))
        for vname, fn in fns.items():
            try:
                o = fn().float()
                torch.cuda.synchronize()
                want = ref
                if "gate" in vname:  # the gate pass times o * sigmoid(gate) on q's tensor
                    want = (c["q"].float() * torch.sigmoid(c["gate"].float())).to(torch.bfloat16).float()
                err = (o - want).abs().max().item()
                rel = ((o - want).norm() / want.norm()).item()
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            except Exception as e:  # out of shared memory etc.: report, go on
                print(f"{name:12s} {vname:40s} FAILED {str(e).splitlines()[0][:120]}", flush=True)
                continue
            tf = 0.0 if "gate" in vname else fl / ms / 1e9
            ok = math.isfinite(rel) and rel < 1e-2
            rows.append(f"{name:12s} {vname:40s} {ms:8.3f} ms {tf:6.0f} TFLOP/s  max|err| {err:.2e}  rel {rel:.2e}"
                        + ("" if ok else "  WRONG"))
            res.setdefault(name, {})[vname] = dict(ms=ms, tflops=tf, max_err=err, rel_err=rel)
            print(rows[-1], flush=True)
        res.setdefault(name, {})["autotune fresh"] = {str(k): str(v) for k, v in tri._prefill_fresh_kernel.cache.items()}
        del c, ref
        torch.cuda.empty_cache()
    print("\n".join(["", "summary"] + rows))
    print("autotune fresh", {str(k): str(v) for k, v in tri._prefill_fresh_kernel.cache.items()})
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
