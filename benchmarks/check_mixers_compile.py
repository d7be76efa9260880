"""Compile every variant of the mixer kernels (DeltaNet conv / prep / verify / decode / delta rule,
attention rotary and gate) for sm_90 with the installed triton, on any machine: no GPU needed.

    python benchmarks/check_mixers_compile.py
    PYTHONPATH=/tmp/tri36 python benchmarks/check_mixers_compile.py   # the H200 image's triton 3.6.0
                                                                      # (pip install --target /tmp/tri36 triton==3.6.0)

Arguments are specialised as at run time (pointers 16-byte aligned, integer strides and sizes
divisible by 16, the kernels' do_not_specialize arguments left alone), which is what made a
column-mapped conv fail to compile on the H200 under triton 3.6 (TritonGPURemoveLayoutConversions:
"operand does not dominate this use") while 3.9 compiled it. Exit status 1 when any variant fails.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qwen3next.kernels.triton import (attention, conv1d, delta_rule, delta_rule_kkt, gdn_decode, gdn_prep, gdn_verify,
                                      rotary)
from qwen3next.kernels.triton import norm as norm_k

TARGET = GPUTarget("cuda", 90, 32)
NO_SPECIALIZE = {"T", "TB", "B", "P", "R", "NH", "S0", "S1", "N", "L", "ZNH", "XNH"}
FAILS: list[str] = []


def compile_one(name: str, fn, sig: dict, const: dict, warps: int = 4) -> None:
    fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)
             if sig[n].startswith("*") or (sig[n].startswith("i") and n not in NO_SPECIALIZE)}
    try:
        k = triton.compile(ASTSource(fn, sig, const, attrs=attrs), target=TARGET, options={"num_warps": warps})
        print("ok  ", name, const, flush=True)
        return k
    except Exception as e:  # report every variant, fail at the end
        FAILS.append(f"{name} {const}")
        print("FAIL", name, const, str(e).splitlines()[0][:160], flush=True)


def no_spills(name: str, k) -> None:
    """Fail the variant when ptxas gave it local memory (register spills): cuobjdump -res-usage."""
    if k is None:
        return
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    regs, local = re.search(r"REG:(\d+)", usage), re.search(r"LOCAL:(\d+)", usage)
    if not (regs and local) or int(local.group(1)):
        FAILS.append(f"{name} spills")
    print("    ", name, "registers", regs and regs.group(1), "local bytes", local and local.group(1), flush=True)


def p(t: str) -> str:
    return "*" + t


def main() -> int:
    print("triton", triton.__version__)
    conv = dict(x_ptr=p("bf16"), w_ptr=p("bf16"), y_ptr=p("bf16"), cu_ptr=p("i64"), B="i32", P="i32", st_ptr=p("bf16"),
                slot_ptr=p("i64"), init_ptr=p("i1"), map_ptr=p("i64"), T="i32", C="i32", TB="i32", SX="i32",
                scale="fp32")
    for qk, state, mapped, (bt, bc, w) in itertools.product((0, 32), (False, True), (False, True), conv1d._CONFIGS):
        if (not qk or bc >= conv1d.NORM_BC) and (not mapped or bc == conv1d.MAP_BC):
            compile_one("conv_varlen", conv1d._conv_varlen_body, conv,
                        dict(K=4, HAS_STATE=state, QK_HEADS=qk, DK=128 if qk else 1, MAPPED=mapped, FIXUP=False,
                             BT=bt, BC=bc), w)
    for qk, mapped in itertools.product((0, 32), (False, True)):  # the state rows' launch
        compile_one("conv_fixup", conv1d._conv_varlen_body, conv, dict(K=4, HAS_STATE=True, QK_HEADS=qk,
                    DK=128 if qk else 1, MAPPED=mapped, FIXUP=True, BT=4, BC=128), 4)
    for mapped in (False, True):
        compile_one("conv_state", conv1d._conv_state_kernel, dict(x_ptr=p("bf16"), cu_ptr=p("i64"), st_ptr=p("bf16"),
                    slot_ptr=p("i64"), init_ptr=p("i1"), map_ptr=p("i64"), C="i32", SX="i32"),
                    dict(K=4, KP=4, BC=conv1d.MAP_BC if mapped else 256, MAPPED=mapped))
    stream = dict(x_ptr=p("bf16"), w_ptr=p("bf16"), y_ptr=p("bf16"), cu_ptr=p("i64"), B="i32", P="i32",
                  st_ptr=p("bf16"), slot_ptr=p("i64"), init_ptr=p("i1"), map_ptr=p("i64"), T="i32", C="i32", SX="i32",
                  scale="fp32", L="i32")
    tiles = sorted({(r, w, pf) for r, _, w, pf in conv1d.STREAM_CONFIGS})  # (L is a run-time argument)
    for (r, w, pf), qk, state, mapped in itertools.product(tiles, (0, 32), (False, True), (False, True)):
        const = dict(HAS_STATE=state, QK_HEADS=qk, MAPPED=mapped, R=r, BC=128, PF=pf, FAST=True)  # (conv1d.STREAM)
        no_spills(f"conv_stream {const}", compile_one("conv_stream", conv1d._conv_stream_kernel, stream, const, w))
    for mp in (0, 16):
        compile_one("conv_update", conv1d._conv_update_kernel, dict(x_ptr=p("bf16"), w_ptr=p("bf16"), y_ptr=p("bf16"),
                    st_ptr=p("bf16"), slot_ptr=p("i64"), map_ptr=p("i64"), C="i32", SX="i32"),
                    dict(K=4, KP=4, BC=256, MAP=mp))
        compile_one("verify_conv", gdn_verify._verify_conv_kernel, dict(x_ptr=p("bf16"), w_ptr=p("bf16"), y_ptr=p("bf16"),
                    cu_ptr=p("i64"), st_ptr=p("bf16"), slot_ptr=p("i64"), init_ptr=p("i1"), ts_ptr=p("i64"),
                    map_ptr=p("i64"), C="i32", SX="i32"), dict(K=4, KP=4, BC=256, MAP=mp))
    heads = dict(HK=16, HV=32, DK=128, DV=128)
    for bv, w in ((16, 2), (64, 4)):
        compile_one("verify_rec", gdn_verify._verify_rec_kernel, dict(mc_ptr=p("bf16"), a_ptr=p("bf16"), b_ptr=p("bf16"),
                    alog_ptr=p("bf16"), dtb_ptr=p("bf16"), o_ptr=p("bf16"), cu_ptr=p("i64"), st_ptr=p("fp32"),
                    slot_ptr=p("i64"), init_ptr=p("i1"), pts_ptr=p("i64"), SA="i32", SB="i32", scale="fp32"),
                    dict(heads, BV=bv), w)
    for st in ("fp32", "bf16"):  # the decode step on both pool dtypes; the pipelined variant's sweep
        dec = dict(m_ptr=p("bf16"), a_ptr=p("bf16"), b_ptr=p("bf16"), alog_ptr=p("bf16"), dtb_ptr=p("bf16"),
                   st_ptr=p(st), slot_ptr=p("i64"), o_ptr=p("bf16"), scale="fp32", SA="i32", SB="i32")
        for bv, w in ((16, 2), (64, 4)):
            no_spills(f"decode {st}", compile_one(f"decode {st}", gdn_decode._decode_kernel, dec,
                                                  dict(heads, BV=bv), w))
        for bv, w, items, stages in gdn_decode.PIPE_SWEEP:
            for n in sorted({1, items}):
                no_spills(f"decode_pipe {st}", compile_one(f"decode_pipe {st}", gdn_decode._decode_pipe_kernel, dec,
                                                     dict(heads, BV=bv, ITEMS=n, STAGES=stages), w))
    for do_qk in (False, True):
        compile_one("prep", gdn_prep._prep_kernel, dict(mc_ptr=p("bf16"), a_ptr=p("bf16"), b_ptr=p("bf16"),
                    alog_ptr=p("bf16"), dtb_ptr=p("bf16"), g_ptr=p("fp32"), beta_ptr=p("fp32"), T="i32", SM="i32",
                    SA="i32", SB="i32", scale="fp32"), dict(HK=16, HV=32, DK=128, R=2, RP=2, BR=16, DO_QK=do_qk))
    for norm in (False, True):
        compile_one("rotary", rotary._rotary_kernel, dict(x_ptr=p("bf16"), cos_ptr=p("bf16"), sin_ptr=p("bf16"),
                    y_ptr=p("bf16"), w_ptr=p("bf16"), eps="fp32", R="i32", NH="i32", S0="i32", S1="i32", D="i32",
                    d="i32"), dict(HAS_NORM=norm, BR=16, BLOCK=256))
    compile_one("gate_rows", attention._gate_rows_kernel, dict(o_ptr=p("bf16"), g_ptr=p("bf16"), y_ptr=p("bf16"),
                R="i32", NH="i32", S0="i32", S1="i32"), dict(D=256, BR=16))
    dr = dict(HK=16, HV=32, DK=128, BB=16, BT=64, PREC="tf32")
    for wu, qk in ((False, False), (True, False), (True, True)):
        compile_one("dr_kkt", delta_rule_kkt._kkt_solve_kernel, dict(q_ptr=p("bf16"), k_ptr=p("bf16"), v_ptr=p("bf16"),
                    g_ptr=p("fp32"), b_ptr=p("fp32"), cu_ptr=p("i64"), B="i32", G_ptr=p("fp32"), A_ptr=p("bf16"),
                    u_ptr=p("bf16"), kd_ptr=p("bf16"), qk_ptr=p("bf16"), SQ="i32", SK="i32", SV="i32"),
                    dict(dr, DV=128, BC=16, BK=64, BQ=32, BA=32, WU=wu, QK=qk), 1)
    compile_one("dr_wu", delta_rule_kkt._wu_kernel, dict(k_ptr=p("bf16"), v_ptr=p("bf16"), b_ptr=p("fp32"),
                G_ptr=p("fp32"), A_ptr=p("bf16"), cu_ptr=p("i64"), B="i32", u_ptr=p("bf16"), kd_ptr=p("bf16"),
                SK="i32", SV="i32"), dict(dr, DV=128, BK=64, BV=64))
    for fuse, st in itertools.product((False, True), ("fp32", "bf16")):
        compile_one("dr_state", delta_rule._state_kernel, dict(q_ptr=p("bf16"), k_ptr=p("bf16"), u_ptr=p("bf16"),
                    kd_ptr=p("bf16"), G_ptr=p("fp32"), qk_ptr=p("bf16"), w_ptr=p("bf16"), h_ptr=p("bf16"),
                    o_ptr=p("bf16"), cu_ptr=p("i64"), B="i32", st_ptr=p(st), slot_ptr=p("i64"), init_ptr=p("i1"),
                    SQ="i32", SK="i32"), dict(dr, DV=128, BV=32, HAS_STATE=True, FUSE_O=fuse))
    for nrm in (False, True):  # (NORM: the layer's gated RMSNorm in the epilogue, gdn_prep.NORM_FUSED)
        no_spills(f"dr_out NORM={nrm}", compile_one("dr_out", delta_rule._out_kernel, dict(
            q_ptr=p("bf16"), k_ptr=p("bf16"), w_ptr=p("bf16"), h_ptr=p("bf16"), G_ptr=p("fp32"), o_ptr=p("bf16"),
            cu_ptr=p("i64"), B="i32", SQ="i32", SK="i32", z_ptr=p("bf16"), nw_ptr=p("bf16"), ZT="i32", ZNH="i32",
            ZS0="i32", ZS1="i32", eps="fp32"), dict(dr, DV=128, BV=128, BK=64, NORM=nrm)))
    no_spills("gated_norm", compile_one("gated_norm", norm_k._gated_rmsnorm_kernel, dict(
        x_ptr=p("bf16"), z_ptr=p("bf16"), w_ptr=p("bf16"), y_ptr=p("bf16"), R="i32", D="i32", XNH="i32", XS0="i32",
        XS1="i32", ZNH="i32", ZS0="i32", ZS1="i32", eps="fp32"), dict(BR=32, BLOCK=128)))
    print(f"{len(FAILS)} failed" + "".join(f"\n  {f}" for f in FAILS))
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
