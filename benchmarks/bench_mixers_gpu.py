"""The mixer layers on the GPU before / after session 3's fusions, at Qwen3-Next-80B shapes
(DeltaNet 16 / 32 heads of 128, attention 16 q / 2 kv heads of 256, hidden 2048), one layer each,
random bf16 weights.

    python benchmarks/bench_mixers_gpu.py --out mixers.json [--smoke] [--only model,gdn,attn,delta_rule]

"before" re-runs the session-2 layer code kept here (`old_*`: reshape copies + cat for the conv
input, b / a copies, the torch q / k L2 norm and gates with fp32 casts, the chunked delta rule's
cast copies; verify through kernels/gdn.py's composition of single kernels; attention q / k norm
then rotary, the gate half copied); "after" is the layer as committed. Rows:
  gdn_prefill_8k   DeltaNet layer forward, one 8K prompt with cache (eager, median)
  gdn_verify_B_q   DeltaNet layer forward of B sequences x q tokens with per-token states (graph replay)
  gdn_decode_B     DeltaNet layer decode step (graph replay)
  attn_prefill_8k  attention layer forward, one 8K prompt with paged cache (eager)
  attn_decode_1    attention layer decode step, 1K context (graph replay)
  delta_rule_8k    the chunked delta rule alone with state-kernel variants (bv_state, warps)
  model_prefill_8k gpu_model.py's 8-layer 80B slice, one 8K prompt with cache (its prefill
                   section, random weights built here), DeltaNet unfused (QWEN3NEXT_GDN_FUSED=0's
                   path) vs fused (and fused with the q / k norm in the conv), one process;
                   profiler kernel tables of both
--smoke: tiny shapes on CPU under TRITON_INTERPRET=1, each function run once (no timings).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from qwen3next.config import ModelConfig  # noqa: E402
from qwen3next.forward_batch import ForwardBatch, ModelCache  # noqa: E402
from qwen3next.kernels import gdn as gdn_ref  # noqa: E402
from qwen3next.kernels import ops  # noqa: E402
from qwen3next.layers.attention import GatedAttention  # noqa: E402
from qwen3next.kernels.triton import gdn_prep  # noqa: E402
from qwen3next.layers import gated_deltanet as gdn_mod  # noqa: E402
from qwen3next.layers.gated_deltanet import GatedDeltaNet  # noqa: E402
from qwen3next.layers.rotary import RotaryEmbedding  # noqa: E402

if SMOKE:  # the Triton kernels on CPU tensors, through the interpreter
    ops._use_triton = lambda *t: True
# "after" is the fused DeltaNet path (the library's default; set here whatever QWEN3NEXT_GDN_FUSED says)
gdn_prep.FUSED, gdn_mod.GROUPED_MAX_T = True, 512
DEV = "cpu" if SMOKE else "cuda"
DT = torch.float32 if SMOKE else torch.bfloat16
BS = 16
if SMOKE:
    DIMS = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
                linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)
    T_PREFILL, CTX = 100, 40
else:
    DIMS = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                linear_value_head_dim=128)
    T_PREFILL, CTX = 8192, 1024
CFG = ModelConfig.from_hf(dict(DIMS, model_type="qwen3_next", num_hidden_layers=2, vocab_size=1000,
                               layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                               rope_parameters={"rope_type": "default", "rope_theta": 1e7,
                                                "partial_rotary_factor": 0.25}))
RES: dict = {}


def bench(fn, graph: bool = False) -> float:
    """Median ms (eager: do_bench, host work included; graph: replays of one capture)."""
    fn()
    if SMOKE:
        return 0.0
    from triton.testing import do_bench

    torch.cuda.synchronize()
    if not graph:
        return round(do_bench(fn, warmup=5, rep=50, return_mode="median"), 4)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return round(do_bench(g.replay, warmup=10, rep=100, return_mode="median"), 4)


def rand_(module: torch.nn.Module) -> torch.nn.Module:
    module = module.to(DEV)
    g = torch.Generator(device=DEV).manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("A_log"):
                p.uniform_(-2.0, 1.0, generator=g)
            elif "norm" in name or name.endswith("dt_bias"):
                p.normal_(0.0, 0.1, generator=g)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
    return module.to(DEV, DT).eval()


def cache(layer_kv: bool, slots: int, blocks: int) -> ModelCache:
    C = 2 * CFG.linear_num_key_heads * CFG.linear_key_head_dim + CFG.linear_num_value_heads * CFG.linear_value_head_dim
    hv, dk, dv = CFG.linear_num_value_heads, CFG.linear_key_head_dim, CFG.linear_value_head_dim
    return ModelCache(
        kv={1: torch.randn(blocks, 2, BS, CFG.num_key_value_heads, CFG.head_dim, dtype=DT, device=DEV)},
        conv={0: torch.randn(slots, C, 3, dtype=DT, device=DEV)},
        recurrent={0: 0.1 * torch.randn(slots, hv, dk, dv, device=DEV)}, block_size=BS)


def batch(B: int, q: int, ctx: int, c: ModelCache, per_token: bool = False) -> ForwardBatch:
    nb = (ctx + q) // BS + 1
    tables = torch.arange(B * nb, device=DEV).view(B, nb)
    pos = (ctx + torch.arange(q, device=DEV)).repeat(B)
    row = torch.arange(B, device=DEV).repeat_interleave(q)
    fb = ForwardBatch(cu_seqlens=torch.arange(B + 1, device=DEV) * q, seq_lens=[q] * B, context_lens=[ctx] * B,
                      cache=c, block_tables=tables, slot_mapping=tables[row, pos // BS] * BS + pos % BS,
                      state_slots=torch.arange(B, device=DEV))
    if per_token:
        fb.per_token_state_slots = B + torch.arange(B * q, device=DEV)
    fb.context_lens_tensor, fb.has_initial_state  # noqa: B018  built before any capture
    return fb, pos


# ---- session-2 layer code (the "before") -------------------------------------------------------
def old_split(self: GatedDeltaNet, x):
    T, Hk, dk, dv, r = x.shape[0], self.num_k_heads, self.head_k_dim, self.head_v_dim, self.ratio
    p = self.in_proj_qkvz(x).view(T, Hk, 2 * dk + 2 * r * dv)
    q, k, v, z = torch.split(p, [dk, dk, r * dv, r * dv], dim=-1)
    pb = self.in_proj_ba(x).view(T, Hk, 2 * r)
    b, a = pb[..., :r].reshape(T, -1), pb[..., r:].reshape(T, -1)
    m = torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], dim=-1)
    return m, z.reshape(T, self.num_v_heads, dv), b, a


def old_gdn_cached(m, a, b, w, conv, rec, cu, slots, has, pts, A_log, dt_bias, hk):
    """kernels/gdn.py's composition with session 2's glue: the chunked rule got fp32 q / k (copies)."""
    Hv, dk, dv = rec.shape[1:]
    if pts is not None:
        return gdn_ref.gdn_cached(m, a, b, w, conv, rec, cu, slots, has, pts, A_log, dt_bias, hk)
    mc = ops.causal_conv1d_varlen(m, w, cu, conv, slots, has)
    q, k, v, g, beta = gdn_ref.qkv_gates(mc, a, b, A_log, dt_bias, hk, dk, Hv, dv)
    return ops.gated_delta_rule_chunked(q, k, v.contiguous(), g, beta, cu, rec, slots, has)


def old_gdn_forward(self: GatedDeltaNet, x, fb):
    T = x.shape[0]
    m, z, b, a = old_split(self, x)
    w = self.conv1d.weight[:, 0, :]
    c = fb.cache
    if fb.is_decode and fb.per_token_state_slots is None:
        o = ops.gdn_decode(m, a, b, w, c.conv[0], c.recurrent[0], fb.state_slots, self.A_log, self.dt_bias,
                           self.num_k_heads)
    else:
        o = old_gdn_cached(m, a, b, w, c.conv[0], c.recurrent[0], fb.cu_seqlens, fb.state_slots,
                           fb.has_initial_state, fb.per_token_state_slots, self.A_log, self.dt_bias, self.num_k_heads)
    return self.out_proj(self.norm(o, z).reshape(T, self.value_dim))


def old_attn_forward(self: GatedAttention, x, cos, sin, fb):
    T, D = x.shape[0], self.head_dim
    qg = self.q_proj(x).view(T, self.num_heads, 2 * D)
    q, gate = qg[..., :D], qg[..., D:]
    k = self.k_proj(x).view(T, self.num_kv_heads, D)
    v = self.v_proj(x).view(T, self.num_kv_heads, D)
    q = ops.apply_rotary(self.q_norm(q), cos, sin)
    k = ops.apply_rotary(self.k_norm(k), cos, sin)
    kv = fb.cache.kv[self.cache_index]
    ops.write_kv(k, v, kv, fb.slot_mapping)
    o = ops.paged_attention(q, kv, fb.block_tables, fb.cu_seqlens, fb.context_lens_tensor, self.scale)
    o = ops.gate_output(o, gate.contiguous()).reshape(T, self.num_heads * D)
    return self.o_proj(o)


# ---- rows -------------------------------------------------------------------------------------
def both(name, new, old, graph=False, check=None):
    """Times old and new; `check` (optional) compares their outputs once."""
    row = RES.setdefault(name, {})
    try:
        if check is not None:
            row["rel_err_new_vs_old"] = float(f"{check():.3g}")
        row["before_ms"] = bench(old, graph)
        row["after_ms"] = bench(new, graph)
        if row["after_ms"]:
            row["speedup"] = round(row["before_ms"] / row["after_ms"], 2)
    except Exception as e:  # keep the other rows
        row["error"] = repr(e)[:400]
    print(name, row, flush=True)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@torch.inference_mode()
def gdn_rows():
    layer = rand_(GatedDeltaNet(CFG, 0))
    H = CFG.hidden_size
    B_list = [(1, 2), (1, 4), (16, 4)] if not SMOKE else [(2, 3)]
    cases = [("gdn_prefill_8k", 1, T_PREFILL, 0, False, False)]
    cases += [(f"gdn_verify_{B}_{q}", B, q, CTX, True, True) for B, q in B_list]
    cases += [(f"gdn_decode_{B}", B, 1, CTX, False, True) for B in ([1, 64] if not SMOKE else [2])]
    for name, B, q, ctx, per_token, graph in cases:
        c = cache(False, B * (q + 1) + 1 if per_token else B + 1, 1)
        fb, _ = batch(B, q, ctx, c, per_token)
        x = torch.randn(B * q, H, dtype=DT, device=DEV)
        keep = (c.conv[0].clone(), c.recurrent[0].clone())

        def check():
            c.conv[0].copy_(keep[0]), c.recurrent[0].copy_(keep[1])
            o_old = old_gdn_forward(layer, x, fb)
            c.conv[0].copy_(keep[0]), c.recurrent[0].copy_(keep[1])
            return rel(layer(x, fb), o_old)

        both(name, lambda: layer(x, fb), lambda: old_gdn_forward(layer, x, fb), graph, check)
        if name == "gdn_prefill_8k":  # A/B the two prefill switches
            defaults = gdn_mod.GROUPED_MAX_T, gdn_prep.FUSE_QK_NORM
            for grouped, fuse in ((False, False), (False, True), (True, False), (True, True)):
                gdn_mod.GROUPED_MAX_T, gdn_prep.FUSE_QK_NORM = (1 << 30) if grouped else 0, fuse
                try:
                    RES[name][f"after_grouped{int(grouped)}_fuse{int(fuse)}_ms"] = bench(lambda: layer(x, fb))
                except Exception as e:
                    RES[name][f"after_grouped{int(grouped)}_fuse{int(fuse)}_ms"] = repr(e)[:200]
            gdn_mod.GROUPED_MAX_T, gdn_prep.FUSE_QK_NORM = defaults
            print(name, RES[name], flush=True)
            conv_rows(layer, x)


def conv_rows(layer, x):
    """The conv alone at 8K: contiguous input vs the grouped projection (its map gathered by
    index_select first), with and without the q / k norm epilogue."""
    from qwen3next.kernels.triton import conv1d

    T = x.shape[0]
    p = layer.in_proj_qkvz(x)
    cols = layer._conv_cols(x.device)
    m = p.index_select(1, cols)
    w = layer.conv1d.weight[:, 0, :]
    cu = torch.tensor([0, T], device=DEV)
    qk = (layer.num_k_heads, layer.head_k_dim)
    row = RES.setdefault("conv_8k", {"map_run": conv1d._map_run(cols)})
    for key, fn in (("contig", lambda: conv1d.causal_conv1d_varlen(m, w, cu)),
                    ("contig_norm", lambda: conv1d.causal_conv1d_varlen(m, w, cu, qk_heads=qk)),
                    ("gathered", lambda: conv1d.causal_conv1d_varlen(p, w, cu, x_cols=cols)),
                    ("gathered_norm", lambda: conv1d.causal_conv1d_varlen(p, w, cu, x_cols=cols, qk_heads=qk))):
        try:
            row[key + "_ms"] = bench(fn)
        except Exception as e:
            row[key + "_ms"] = repr(e)[:200]
    print("conv_8k", row, flush=True)


@torch.inference_mode()
def attn_rows():
    layer = rand_(GatedAttention(CFG, 1))
    rot = RotaryEmbedding(CFG.rope)
    for name, B, q, ctx, graph in (("attn_prefill_8k", 1, T_PREFILL, 0, False), ("attn_decode_1", 1, 1, CTX, True)):
        nb = (ctx + q) // BS + 1
        c = cache(True, 1, B * nb)
        fb, pos = batch(B, q, ctx, c)
        cos, sin = rot(pos, DT)
        x = torch.randn(B * q, CFG.hidden_size, dtype=DT, device=DEV)
        both(name, lambda: layer(x, cos, sin, fb), lambda: old_attn_forward(layer, x, cos, sin, fb), graph,
             lambda: rel(layer(x, cos, sin, fb), old_attn_forward(layer, x, cos, sin, fb)))


@torch.inference_mode()
def delta_rule_rows():
    if SMOKE:
        return
    from qwen3next.kernels.triton import delta_rule as dr

    T, hk, hv, d = T_PREFILL, 16, 32, 128
    q = torch.nn.functional.normalize(torch.randn(T, hk, d, device=DEV), dim=-1).to(DT) * d ** -0.5
    k = torch.nn.functional.normalize(torch.randn(T, hk, d, device=DEV), dim=-1).to(DT)
    v = torch.randn(T, hv, d, device=DEV, dtype=DT)
    g = -torch.nn.functional.softplus(torch.randn(T, hv, device=DEV) - 2)
    beta = torch.sigmoid(torch.randn(T, hv, device=DEV))
    cu = torch.tensor([0, T], device=DEV)
    st = torch.zeros(2, hv, d, d, device=DEV)
    slots, has = torch.tensor([0], device=DEV), torch.tensor([True], device=DEV)
    row = RES.setdefault("delta_rule_8k", {})
    for bv, w, fuse in ((32, 4, False), (16, 4, False), (16, 2, False), (64, 4, False), (64, 8, False),
                        (32, 4, True), (16, 4, True)):
        key = f"bv{bv}_w{w}{'_fused' if fuse else ''}"
        try:
            row[key] = bench(lambda: dr.gated_delta_rule_chunked(q, k, v, g, beta, cu, st, slots, has, fuse_output=fuse,
                                                                 bv_state=bv, warps_state=w))
        except Exception as e:
            row[key] = repr(e)[:200]
    print("delta_rule_8k", row, flush=True)


@torch.inference_mode()
def model_rows():
    """The 8K prefill of the 8-layer slice with each DeltaNet path (gpu_model.py's prefill section)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gpu_model as gm

    from qwen3next.model import Qwen3NextForCausalLM

    cfg = ModelConfig.from_hf(dict(gm.DIMS, model_type="qwen3_next", rope_parameters=dict(gm.ROPE)))
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen3NextForCausalLM(cfg, with_mtp=False).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    gm.randomize_(model)
    T = 8192
    c = gm.make_cache(model, 2, T // BS + 1)
    ids = torch.randint(0, cfg.vocab_size, (T,), device="cuda")
    pos = torch.arange(T, device="cuda")
    fb = ForwardBatch(cu_seqlens=torch.tensor([0, T], device="cuda"), seq_lens=[T], context_lens=[0], cache=c,
                      block_tables=torch.arange(T // BS + 1, device="cuda")[None],
                      slot_mapping=torch.arange(T, device="cuda"), state_slots=torch.tensor([0], device="cuda"))
    row = RES.setdefault("model_prefill_8k", {})

    def step():
        return model.compute_logits(model(ids, pos, fb)[-1:])

    defaults = gdn_prep.FUSED, gdn_mod.GROUPED_MAX_T, gdn_prep.FUSE_QK_NORM
    for name, fused, fuse_qk in (("unfused", False, False), ("fused", True, False), ("fused_qknorm", True, True),
                                 ("unfused_again", False, False)):
        gdn_prep.FUSED, gdn_mod.GROUPED_MAX_T, gdn_prep.FUSE_QK_NORM = fused, 512 if fused else 0, fuse_qk
        try:
            row[name + "_ms"] = round(gm.timed(step, reps=10, warmup=2), 3)
            if name in ("unfused", "fused"):
                row[name + "_kernels_us"] = gm.top_kernels(step, n=30)
        except Exception as e:
            row[name + "_error"] = repr(e)[:300]
        print("model_prefill_8k", name, row.get(name + "_ms"), flush=True)
    gdn_prep.FUSED, gdn_mod.GROUPED_MAX_T, gdn_prep.FUSE_QK_NORM = defaults
    del model, c
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="mixers.json")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--only", default="gdn,attn,delta_rule", help="sections in order (model: the 8-layer slice)")
    args = ap.parse_args()
    if not SMOKE:
        RES["device"] = torch.cuda.get_device_name()
    fns = {"model": model_rows, "gdn": gdn_rows, "attn": attn_rows, "delta_rule": delta_rule_rows}
    for fn in [fns[n] for n in args.only.split(",") if not (SMOKE and n == "model")]:
        try:
            fn()
        except Exception as e:
            RES[fn.__name__ + "_error"] = repr(e)[:600]
            print(fn.__name__, "failed:", e, flush=True)
        with open(args.out, "w") as f:
            json.dump(RES, f, indent=1)


if __name__ == "__main__":
    main()
