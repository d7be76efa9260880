"""Parity of qwen3next's model with transformers' Qwen3Next on tiny random checkpoints built at
test time: logits (fp32, 1e-4), 24 greedy tokens, chunked prefill + decode through the paged KV
cache and state slots == one full forward, the MTP head against an oracle assembled from
transformers' layer classes (architecture.md §8.1), and a bf16 CPU run."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from qwen3next.forward_batch import ForwardBatch
from qwen3next.loader import load_model
from tests.helpers.checkpoints import make_tiny_checkpoint
from tests.helpers.model_cache import TinyCache

F_, L_ = "full_attention", "linear_attention"
VARIANTS = {
    # default tiny: L L L F, value heads 2x key heads, partial rotary 0.25
    "new": dict(layout="new"),
    # legacy config.json; interval 2; rotary 0.5; MoE only on odd layers (decoder_sparse_step 2)
    "legacy": dict(layout="legacy", full_attention_interval=2, partial_rotary_factor=0.5, decoder_sparse_step=2),
    # irregular layer types, dense layers listed explicitly, no top-k renormalisation, value heads
    # 1x, value head dim != key head dim (a transposed state would fail loudly)
    "irregular": dict(num_hidden_layers=5, layer_types=[F_, L_, L_, F_, L_], mlp_only_layers=[1, 3],
                      norm_topk_prob=False, linear_num_value_heads=2, linear_value_head_dim=8),
    # YaRN with positions far past original_max_position_embeddings; value heads 4x; rotary 0.5
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                 partial_rotary_factor=0.5, linear_num_key_heads=1, linear_num_value_heads=4),
    # every weight rounded to bf16 (as released checkpoints hold them)
    "bf16w": dict(bf16_round=True),
}


class Case:
    def __init__(self, name, tmp):
        from transformers import Qwen3NextForCausalLM as HF

        self.name = name
        self.path = make_tiny_checkpoint(tmp / name, with_tokenizer=False, seed=len(name), **VARIANTS[name])
        self.hf = HF.from_pretrained(self.path, dtype=torch.float32).eval()
        self.model, self.cfg = load_model(self.path, dtype=torch.float32, progress=False)


@pytest.fixture(scope="session")
def cases(tmp_path_factory):
    return {}, tmp_path_factory.mktemp("parity")


@pytest.fixture(params=list(VARIANTS))
def case(request, cases):
    store, tmp = cases
    if request.param not in store:
        store[request.param] = Case(request.param, tmp)
    return store[request.param]


def _ids(n, seed, vocab=512):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf, ids, start=0):
    pos = torch.arange(start, start + len(ids))[None]
    return hf(ids[None], position_ids=pos).logits[0].float()


@torch.no_grad()
def test_logits_match_transformers(case):
    lens = [70, 33, 1]
    seqs = [_ids(n, i) for i, n in enumerate(lens)]
    ids = torch.cat(seqs)
    pos = torch.cat([torch.arange(n) for n in lens])
    hidden, routers = case.model(ids, pos, ForwardBatch.full(lens), return_router_logits=True)
    logits = case.model.compute_logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (sum(lens), case.cfg.vocab_size)
    off = 0
    for s in seqs:
        ref = _hf_logits(case.hf, s)
        assert ref.abs().max() > 1.0  # weights are O(1): the comparison is not trivially small
        torch.testing.assert_close(logits[off : off + len(s)], ref, atol=1e-4, rtol=0)
        off += len(s)
    n_moe = sum(case.cfg.is_moe_layer(i) for i in range(case.cfg.num_hidden_layers))
    assert len(routers) == n_moe and all(r.shape == (sum(lens), case.cfg.num_experts) for r in routers)


@torch.no_grad()
def test_greedy_24_tokens_match_transformers(case):
    prompt = _ids(12, 7)
    ref = case.hf.generate(prompt[None], max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, 12:].tolist()
    tc = TinyCache(case.model, num_seqs=1)
    tokens, new = [], prompt
    for _ in range(24):
        pos = tc.positions([0], [len(new)])
        h = case.model(new, pos, tc.batch([0], [len(new)]))
        nxt = int(case.model.compute_logits(h[-1:]).argmax(-1))
        tokens.append(nxt)
        new = torch.tensor([nxt])
    assert tokens == ref


@torch.no_grad()
def test_chunked_prefill_then_decode_equals_full_forward(case):
    # two sequences sharing each step; pieces cross the 64-token chunk edge and the conv width
    a, b = _ids(150, 1), _ids(90, 2)
    plan = [{0: 1, 1: 64}, {0: 63, 1: 3}, {0: 1}, {0: 40, 1: 2}] + [{0: 1, 1: 1}] * 21 + [{0: 1}] * 24
    tc = TinyCache(case.model, num_seqs=2)
    seqs, done, out = [a, b], [0, 0], [[], []]
    for step in plan:
        sids, lens = list(step), list(step.values())
        pos = tc.positions(sids, lens)
        ids = torch.cat([seqs[s][done[s] : done[s] + n] for s, n in step.items()])
        h = case.model(ids, pos, tc.batch(sids, lens))
        off = 0
        for s, n in step.items():
            out[s].append(h[off : off + n])
            off += n
            done[s] += n
    assert done == [150, 90]
    for s in (0, 1):
        full = case.model(seqs[s], torch.arange(len(seqs[s])), ForwardBatch.full([len(seqs[s])]))
        torch.testing.assert_close(
            case.model.compute_logits(torch.cat(out[s])), case.model.compute_logits(full), atol=1e-4, rtol=0
        )


def _mtp_oracle(case):
    """mtp.* loaded into transformers' own layer classes (Qwen3NextDecoderLayer / RMSNorm)."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextDecoderLayer, Qwen3NextRMSNorm

    sd = load_file(os.path.join(case.path, "model-mtp.safetensors"))
    hcfg = case.hf.config.__class__(**{**case.hf.config.to_dict(), "layer_types": [F_] * case.cfg.num_hidden_layers})
    layer = Qwen3NextDecoderLayer(hcfg, 0)
    lsd, E = {}, case.cfg.num_experts
    for n, t in sd.items():
        if n.startswith("mtp.layers.0.") and ".experts." not in n:
            lsd[n[len("mtp.layers.0."):]] = t
    if case.cfg.is_moe_layer(0):
        p = "mtp.layers.0.mlp.experts"
        lsd["mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"{p}.{e}.gate_proj.weight"], sd[f"{p}.{e}.up_proj.weight"]]) for e in range(E)])
        lsd["mlp.experts.down_proj"] = torch.stack([sd[f"{p}.{e}.down_proj.weight"] for e in range(E)])
    layer.load_state_dict(lsd, strict=True)
    H = case.cfg.hidden_size
    norms = {}
    for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        norms[n] = Qwen3NextRMSNorm(H, case.cfg.rms_norm_eps)
        norms[n].weight.data.copy_(sd[f"mtp.{n}.weight"])
    fc = torch.nn.Linear(2 * H, H, bias=False)
    fc.weight.data.copy_(sd["mtp.fc.weight"])

    def run(ids, next_ids):
        T = len(ids)
        h = case.hf.model(ids[None]).last_hidden_state[0]  # after model.norm
        e = case.hf.model.embed_tokens(next_ids)
        z = fc(torch.cat([norms["pre_fc_norm_embedding"](e), norms["pre_fc_norm_hidden"](h)], -1))[None]
        pos = torch.arange(T)[None]
        pe = case.hf.model.rotary_emb(z, pos)
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        z = layer(z, position_embeddings=pe, attention_mask=mask, position_ids=pos)
        return case.hf.lm_head(norms["norm"](z[0])).float()

    return run


@pytest.mark.parametrize("case", ["new", "legacy"], indirect=True)  # MoE and dense layer 0
@torch.no_grad()
def test_mtp_matches_oracle_and_cache(case):
    m = case.model
    assert m.mtp is not None
    seq = _ids(81, 3)
    ids, nxt = seq[:-1], seq[1:]
    T = len(ids)
    pos = torch.arange(T)
    hidden = m(ids, pos, ForwardBatch.full([T]))
    out = m.mtp(nxt, hidden, pos, ForwardBatch.full([T]))
    ref = _mtp_oracle(case)(ids, nxt)
    torch.testing.assert_close(m.compute_logits(out), ref, atol=1e-4, rtol=0)
    # through the MTP layer's own paged KV cache (index num_hidden_layers), in pieces
    tc = TinyCache(m, num_seqs=1)
    assert case.cfg.num_hidden_layers in tc.cache.kv
    pieces, off = [], 0
    for n in (30, 1, 49):
        p = tc.positions([0], [n])
        pieces.append(m.mtp(nxt[off : off + n], hidden[off : off + n], p, tc.batch([0], [n])))
        off += n
    torch.testing.assert_close(m.compute_logits(torch.cat(pieces)), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["bf16w"], indirect=True)
@torch.no_grad()
def test_bf16_forward_on_cpu(case):
    m32 = case.model
    m16, _ = load_model(case.path, dtype=torch.bfloat16, progress=False)
    assert m16.lm_head.weight.dtype == torch.bfloat16
    ids = _ids(80, 5)
    batch = ForwardBatch.full([80])
    l32 = m32.compute_logits(m32(ids, torch.arange(80), batch))
    l16 = m16.compute_logits(m16(ids, torch.arange(80), batch))
    assert l16.dtype == torch.float32 and torch.isfinite(l16).all()
    agree = (l32.argmax(-1) == l16.argmax(-1)).float().mean().item()
    assert agree >= 0.8, agree
    # bf16 cached decode runs and stays close to the full bf16 forward's argmax
    tc = TinyCache(m16, num_seqs=1, dtype=torch.bfloat16)
    h = m16(ids[:70], torch.arange(70), tc.batch([0], [70]))
    steps = [m16(ids[70 + i : 71 + i], torch.tensor([70 + i]), tc.batch([0], [1])) for i in range(10)]
    dec = m16.compute_logits(torch.cat([h] + steps))
    assert (dec.argmax(-1) == l16.argmax(-1)).float().mean().item() >= 0.9


def test_backward_reaches_every_trunk_parameter(tiny_ckpt):
    model, cfg = load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    model.train()
    lens = [40, 40]
    ids = _ids(80, 9, cfg.vocab_size)
    pos = torch.cat([torch.arange(n) for n in lens])
    hidden, routers = model(ids, pos, ForwardBatch.full(lens), return_router_logits=True)
    loss = model.compute_logits(hidden).logsumexp(-1).mean() + sum(r.float().pow(2).mean() for r in routers)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if not n.startswith("mtp.") and p.grad is None]
    assert no_grad == []


@pytest.mark.parametrize("case", ["new"], indirect=True)
@torch.no_grad()
def test_per_token_state_slots_hold_the_state_after_each_token(case):
    """Speculative verify: with batch.per_token_state_slots, the DeltaNet conv and recurrent states
    after every token land in those slots, equal to a run that stopped at that token."""
    m, seq = case.model, _ids(30, 11)
    tc = TinyCache(m, num_seqs=6)
    m(seq[:25], torch.arange(25), tc.batch([0], [25]))
    pos = tc.positions([0], [5])
    fb = tc.batch([0], [5])
    fb.per_token_state_slots = torch.tensor([3, -1, 4, 5, 6])
    m(seq[25:], pos, fb)
    for t, slot in [(0, 3), (2, 4), (3, 5), (4, 6)]:
        ref = TinyCache(m, num_seqs=1)
        m(seq[: 26 + t], torch.arange(26 + t), ref.batch([0], [26 + t]))
        for i in case.cfg.linear_layers:
            torch.testing.assert_close(tc.cache.conv[i][slot], ref.cache.conv[i][1], atol=1e-5, rtol=0)
            torch.testing.assert_close(tc.cache.recurrent[i][slot], ref.cache.recurrent[i][1], atol=1e-4, rtol=0)
    # and the sequence's own slot holds the state after the last token
    ref = TinyCache(m, num_seqs=1)
    m(seq, torch.arange(30), ref.batch([0], [30]))
    i = case.cfg.linear_layers[-1]
    torch.testing.assert_close(tc.cache.recurrent[i][1], ref.cache.recurrent[i][1], atol=1e-4, rtol=0)


@pytest.mark.slow
@torch.no_grad()
def test_larger_model_long_sequence_matches_transformers(tmp_path):
    """Wider heads, more experts and a 300-token sequence (several delta-rule chunks)."""
    from transformers import Qwen3NextForCausalLM as HF

    path = make_tiny_checkpoint(
        tmp_path / "big", with_tokenizer=False, hidden_size=256, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, linear_key_head_dim=32, linear_value_head_dim=48,
        linear_num_key_heads=4, linear_num_value_heads=8, num_experts=64, num_experts_per_tok=8,
        moe_intermediate_size=64, shared_expert_intermediate_size=128, max_shard_size="5MB",
    )
    hf = HF.from_pretrained(path, dtype=torch.float32).eval()
    model, _ = load_model(path, dtype=torch.float32, progress=False)
    ids = _ids(300, 12)
    ours = model.compute_logits(model(ids, torch.arange(300), ForwardBatch.full([300])))
    torch.testing.assert_close(ours, _hf_logits(hf, ids), atol=1e-4, rtol=0)
