"""Tensor / expert parallelism on CPU with gloo, two ranks (this process + one spawned worker).

The 2-rank model gives the 1-rank logits (model level, kv heads replicated) and the 1-rank greedy
tokens through LLM.generate (kv heads split; chunked prefill; an n=2 fork whose cache copies the
worker must replay). Bad sizes fail before any process starts; a dead worker makes rank 0 raise
instead of hang, and workers exit when rank 0 dies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from qwen3next import LLM, SamplingParams
from qwen3next.forward_batch import ForwardBatch

GREEDY = dict(temperature=0, max_tokens=10, ignore_eos=True)
ENGINE = dict(dtype="float32", device="cpu", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=24)


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [{"prompt_token_ids": torch.randint(0, 500, (n,), generator=g).tolist()} for n in (5, 40, 13)]


def test_two_ranks_match_one_rank_logits(tmp_path):
    from tests.helpers.checkpoints import make_tiny_checkpoint
    from qwen3next.distributed.launch import start
    from qwen3next.loader import load_model

    # one kv head for two ranks: replicated, as vLLM does
    ckpt = make_tiny_checkpoint(tmp_path / "kv1", with_tokenizer=False, num_key_value_heads=1)
    ref, cfg = load_model(ckpt, dtype=torch.float32, progress=False)
    lens = [9, 4]
    ids = torch.randint(0, cfg.vocab_size, (sum(lens),), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(n) for n in lens])
    with torch.inference_mode():
        want = ref.compute_logits(ref(ids, pos, ForwardBatch.full(lens)))
    model, _ = start(ckpt, 2, torch.float32, torch.device("cpu"), with_mtp=False)
    try:
        assert model.inner.model.layers[0].linear_attn.num_k_heads == cfg.linear_num_key_heads // 2
        assert model.inner.model.layers[3].mlp.experts.gate_up_proj.shape[0] == cfg.num_experts // 2
        with torch.inference_mode():
            got = model.compute_logits(model(ids, pos, ForwardBatch.full(lens)))
    finally:
        model.shutdown()
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def single_rank_tokens(tiny_ckpt):
    llm = LLM(model=tiny_ckpt, **ENGINE)
    outs = llm.generate(_prompts(), SamplingParams(**GREEDY))
    return [o.outputs[0].token_ids for o in outs]


def test_generate_two_ranks_matches_one(tiny_ckpt, single_rank_tokens):
    llm = LLM(model=tiny_ckpt, tensor_parallel_size=2, **ENGINE)
    try:
        assert llm.llm_engine.cache.cache.kv[3].shape[-2] == 1  # 2 kv heads: one per rank
        outs = llm.generate(_prompts(), SamplingParams(**GREEDY))
        assert [o.outputs[0].token_ids for o in outs] == single_rank_tokens
        # two samples of one prompt: the fork's block and state copies are replayed on the worker
        fork = llm.generate(_prompts()[1], SamplingParams(n=2, **GREEDY))[0]
        assert [c.token_ids for c in fork.outputs] == [single_rank_tokens[1]] * 2
        # a worker that dies makes rank 0 raise, not hang
        llm.llm_engine.model.workers[0].kill()
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 1 is gone"):
            llm.generate(_prompts()[0], SamplingParams(**GREEDY))
        assert time.monotonic() - t0 < 30
    finally:
        llm.llm_engine.shutdown()


def test_speculative_decoding_two_ranks(tiny_ckpt, single_rank_tokens):
    # the MTP head runs on both ranks; rejected drafts roll the DeltaNet state back on both
    spec = {"method": "qwen3_next_mtp", "num_speculative_tokens": 2}
    llm = LLM(model=tiny_ckpt, tensor_parallel_size=2, speculative_config=spec, **ENGINE)
    try:
        outs = llm.generate(_prompts(), SamplingParams(**GREEDY))
        assert [o.outputs[0].token_ids for o in outs] == single_rank_tokens
        st = llm.llm_engine.stats["spec_decode"]  # some drafts rejected: rollbacks happened
        assert st["num_verifies"] > 0 and st["num_accepted_tokens"] < st["num_draft_tokens"]
    finally:
        llm.llm_engine.shutdown()


def test_sizes_that_do_not_split_fail_with_the_field_name(tiny_ckpt):
    from qwen3next.cli import build_parser

    assert build_parser().parse_args(["serve", "--tensor-parallel-size", "2"]).tensor_parallel_size == 2
    with pytest.raises(ValueError, match="num_attention_heads"):
        LLM(model=tiny_ckpt, tensor_parallel_size=3, **ENGINE)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(model=tiny_ckpt, tensor_parallel_size=0, **ENGINE)


def test_workers_exit_when_rank0_dies(tiny_ckpt):
    code = textwrap.dedent(f"""
        import os, sys
        from qwen3next import LLM
        llm = LLM(model={tiny_ckpt!r}, tensor_parallel_size=2, skip_tokenizer_init=True, **{ENGINE!r})
        print(llm.llm_engine.model.workers[0].pid, flush=True)
        os._exit(3)  # no atexit, no shutdown message: the worker must notice by itself
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert res.returncode == 3, res.stderr[-2000:]
    pid = int(res.stdout.split()[-1])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, 9)
    pytest.fail("the worker outlived rank 0")


def test_read_shard_dequantises_fp8_ranges_off_block_edges(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qwen3next.distributed.sharding import Shard, read_shard
    from qwen3next.kernels.fp8 import dequantize

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(12, 10, generator=g) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(3, 3, generator=g) + 0.5  # blocks of 4 x 4
    save_file({"w": w, "w_scale_inv": s}, str(tmp_path / "m.safetensors"))
    full = dequantize(w, s, (4, 4))
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        rows = read_shard(f.get_slice, "w", Shard(0, ((1, 3), (6, 11))), "w_scale_inv", (4, 4))
        cols = read_shard(f.get_slice, "w", Shard(1, ((5, 9),)), "w_scale_inv", (4, 4))
    assert torch.equal(rows, torch.cat([full[1:3], full[6:11]]))
    assert torch.equal(cols, full[:, 5:9])
