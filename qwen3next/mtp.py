"""The multi-token-prediction head `mtp.*` (architecture.md §8.1).

Given the trunk's final hidden h_t (after model.norm) and the next token x_{t+1}:
z = fc([ZCRMSNorm(embed(x_{t+1})) ; ZCRMSNorm(h_t)]), then full-attention + MoE decoder layer(s)
with their own KV cache (ModelCache.kv[num_hidden_layers + i]), then mtp.norm. Embedding and
lm_head are the trunk's (not stored under mtp.*); logits come from the trunk's compute_logits.
On CPU a cached step (draft, catch-up) runs as one C++ call (OneCallMTP, the torch path being its
reference), and greedy drafting as one call for the catch-up and all draft steps (draft_greedy).
"""

from __future__ import annotations

from array import array
from itertools import chain

import torch
from torch import nn

from .config import FULL, ModelConfig
from .forward_batch import ForwardBatch
from .kernels import cpu_ext, ops
from .layers.decoder_layer import DecoderLayer
from .layers.fused import DerivedWeight
from .layers.norm import ZCRMSNorm


class Qwen3NextMTP(nn.Module):
    def __init__(self, cfg: ModelConfig, trunk: nn.Module):
        super().__init__()
        H = cfg.hidden_size
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.pre_fc_norm_embedding = ZCRMSNorm(H, cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = ZCRMSNorm(H, cfg.rms_norm_eps)
        self.norm = ZCRMSNorm(H, cfg.rms_norm_eps)
        # CPU inference: the two pre-fc norms as one norm over [T, 2, H] with a weight per half
        self._pre_fc = DerivedWeight(lambda we, wh: torch.stack([we, wh]))  # [2, H]
        # the MoE rule of trunk layer 0 applies (§8.1); KV cache index follows the trunk's layers
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, 0, FULL, cfg.is_moe_layer(0), cache_index=cfg.num_hidden_layers + i)
            for i in range(max(cfg.num_mtp_layers, 1))
        )
        self._trunk = (trunk,)  # a tuple: shared, not registered (no mtp.model.* names)
        # CPU inference, few tokens with a cache: the whole head as one C++ call
        self._one_call = OneCallMTP(self)

    def forward(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                batch: ForwardBatch, rows=None) -> torch.Tensor:
        """next_ids [T] (token after each position), hidden [T, H] (trunk output after model.norm
        or the MTP's own previous output) -> [T, H] after mtp.norm; logits via trunk.compute_logits.
        rows (flat indices): only those rows' outputs, [len(rows), H] (the KV of every row is still
        written); a catch-up needs each sequence's last position only, and the one-call CPU path
        then skips the rest of the last layer's work."""
        trunk = self._trunk[0]
        if self._one_call.applies(hidden, batch, rows):
            return self._one_call(next_ids, hidden, positions, batch, rows)
        e = trunk.model.embed_tokens(next_ids)
        if ops.cpu_fast_ok(hidden, self.fc.weight):  # the same values in two calls instead of five
            w = self._pre_fc.get(self.pre_fc_norm_embedding.weight, self.pre_fc_norm_hidden.weight)
            c = ops.zc_rmsnorm(torch.stack([e, hidden], 1), w, self.pre_fc_norm_embedding.eps)  # [T, 2, H]
            x = ops.linear(c.view(c.shape[0], -1), self.fc.weight)
        else:
            c = torch.cat([self.pre_fc_norm_embedding(e), self.pre_fc_norm_hidden(hidden)], dim=-1)
            x = self.fc(c)
        cos, sin = trunk.rotary(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, batch)
        out, _ = self.norm(x, residual)
        if rows is not None:
            out = out[torch.as_tensor(rows, dtype=torch.long, device=out.device)]
        return out

    def draft_greedy(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                     batch: ForwardBatch, rows: list[int], draft_positions: list[list[int]],
                     draft_slots: list[list[int]]) -> list[list[int]] | None:
        """Catch-up (forward with `rows`, one per drafting sequence) and greedy drafts 1..S in one
        C++ call, each draft the argmax of trunk.compute_logits of the head's output (draft j >= 2
        from (draft j-1, that output) at draft_positions[r][j-2], KV at cache slot draft_slots[r][j-2];
        a slot < 0 stops the row) -> drafts per row (S or fewer), or None where the one-call path
        does not apply (the caller then drafts step by step)."""
        if not rows or not self._one_call.applies(hidden, batch, rows) or not self._one_call.lm_head_ok():
            return None
        return self._one_call.draft_greedy(next_ids, hidden, positions, batch, rows, draft_positions, draft_slots)


class OneCallMTP:
    """The head's forward as one C++ call (cpu_ext.mtp_forward; Qwen3NextMTP's torch path is the
    reference) for cached steps of at most 8 tokens on the CPU kernels: a draft step or catch-up
    is ~30 small ops, most of whose cost is per-op overhead. The weight list (kernels.cpp's
    layout) is rebuilt when a source parameter is replaced or written to, as DerivedWeight does."""

    MAX_TOKENS = 8

    def __init__(self, mtp: Qwen3NextMTP):
        self.mtp = mtp
        self._static: bool | None = None  # the model's shape suits the kernel (checked once)
        self._sources: list[tuple[dict, str]] = []  # (module._parameters, name) of each source
        self._weights = DerivedWeight(lambda *ps: self._build())
        self._head = DerivedWeight(lambda w: w.detach())  # the lm_head weight as a plain tensor

    def _check_static(self) -> bool:
        """One rank, MoE layers, and every projection in the few-row kernel's layout (dims % 8)."""
        mtp, trunk = self.mtp, self.mtp._trunk[0]
        if type(trunk.model.embed_tokens) is not nn.Embedding or mtp.fc.weight.shape[0] % 8:
            return False
        srcs = [(trunk.model.embed_tokens, "weight"), (mtp.pre_fc_norm_embedding, "weight"),
                (mtp.pre_fc_norm_hidden, "weight"), (mtp.fc, "weight"), (mtp.norm, "weight")]
        for layer in mtp.layers:
            a, m = layer.self_attn, layer.mlp
            if (not layer.is_moe or a.tp != 1 or m.experts.tp != 1 or (a.num_heads * a.head_dim) % 8
                    or m.shared_expert.down_proj.weight.shape[1] % 8):
                return False
            se = m.shared_expert
            srcs += [(layer.input_layernorm, "weight"), (a.q_proj, "weight"), (a.k_proj, "weight"),
                     (a.v_proj, "weight"), (a.q_norm, "weight"), (a.k_norm, "weight"), (a.o_proj, "weight"),
                     (layer.post_attention_layernorm, "weight"), (m.gate, "weight"), (se.gate_proj, "weight"),
                     (se.up_proj, "weight"), (m.shared_expert_gate, "weight"), (m.experts, "gate_up_proj"),
                     (m.experts, "down_proj"), (se.down_proj, "weight")]
        self._sources = [(mod._parameters, name) for mod, name in srcs]
        a, m = mtp.layers[0].self_attn, mtp.layers[0].mlp
        self._kv = [layer.self_attn.cache_index for layer in mtp.layers]
        self._args = (a.num_heads, m.top_k, m.norm_topk_prob, mtp.norm.eps, a.scale)
        return True

    def applies(self, hidden: torch.Tensor, batch: ForwardBatch, rows) -> bool:
        """A cached step of at most MAX_TOKENS tokens, or any length when only some rows come out
        (a prompt's catch-up: the last layer's queries, MoE and norm run for those rows alone)."""
        if batch.cache is None or not (0 < hidden.shape[0] <= self.MAX_TOKENS or rows is not None):
            return False
        if self._static is None:
            self._static = self._check_static()
        if not self._static or hidden.dtype is not torch.float32 or not hidden.is_cpu:
            return False
        if torch.is_grad_enabled() and hidden.requires_grad:
            return False
        fc = self._sources[3][0]["weight"]
        if fc.dtype is not torch.float32 or not fc.is_cpu or cpu_ext.get() is None:  # (get: switches, build)
            return False
        return all(batch.cache.kv[i].dtype is torch.float32 and batch.cache.kv[i].is_contiguous() for i in self._kv)

    def lm_head_ok(self) -> bool:
        """Greedy drafting reads the trunk's lm_head as compute_logits' C++ path does."""
        head = self.mtp._trunk[0].lm_head
        return type(head) is nn.Linear and head.weight.dtype is torch.float32 and head.weight.is_contiguous()

    def _build(self) -> list[torch.Tensor]:
        """cpu_ext.mtp_forward's weight list (layout in kernels.cpp), detached and contiguous."""
        mtp = self.mtp
        w = [mtp._trunk[0].model.embed_tokens.weight,
             mtp._pre_fc.get(mtp.pre_fc_norm_embedding.weight, mtp.pre_fc_norm_hidden.weight),
             mtp.fc.weight, mtp.norm.weight]
        for layer in mtp.layers:
            a, m = layer.self_attn, layer.mlp
            se = m.shared_expert
            w += [layer.input_layernorm.weight, a._qkv.get(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
                  a._qk_norm.get(a.q_norm.weight, a.k_norm.weight), a.o_proj.weight,
                  layer.post_attention_layernorm.weight, m.gate.weight,
                  m._up.get(se.gate_proj.weight, se.up_proj.weight, m.shared_expert_gate.weight),
                  m.experts.gate_up_proj, m.experts.down_proj, se.down_proj.weight]
        return [t.detach().contiguous() for t in w]

    def __call__(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                 batch: ForwardBatch, rows) -> torch.Tensor:
        w = self._weights.get(*[params[name] for params, name in self._sources])
        rot = self.mtp._trunk[0].rotary
        # long runs: torch's vectorised cos/sin (the kernel's own loop is for a few rows)
        cos, sin = rot(positions, hidden.dtype) if hidden.shape[0] > self.MAX_TOKENS else (None, None)
        kv = [batch.cache.kv[i] for i in self._kv]
        return cpu_ext.mtp_forward(next_ids, hidden, positions, rot._inv_freq, rot.attention_factor, cos, sin, kv,
                                   batch.block_tables, batch.cu_seqlens, batch.context_lens_tensor,
                                   batch.slot_mapping, rows, w, *self._args)

    def draft_greedy(self, next_ids, hidden, positions, batch, rows, draft_positions, draft_slots):
        w = self._weights.get(*[params[name] for params, name in self._sources])
        trunk = self.mtp._trunk[0]
        rot = trunk.rotary
        cos, sin = rot(positions, hidden.dtype) if hidden.shape[0] > self.MAX_TOKENS else (None, None)
        head = self._head.get(trunk.lm_head.weight)
        n = trunk.sampled_vocab_size or head.shape[0]
        R, S1 = len(rows), len(draft_positions[0])
        # rows | draft positions | draft slots as one host tensor (3x cheaper than three torch.tensor)
        flat = torch.frombuffer(array("q", [*rows, *chain(*draft_positions), *chain(*draft_slots)]), dtype=torch.long)
        d = cpu_ext.mtp_draft_greedy(next_ids, hidden, positions, rot._inv_freq, rot.attention_factor, cos, sin,
                                     [batch.cache.kv[i] for i in self._kv], batch.block_tables, batch.cu_seqlens,
                                     batch.context_lens_tensor, batch.slot_mapping, flat[:R], w, *self._args, head, n,
                                     flat[R:R + R * S1].view(R, S1), flat[R + R * S1:].view(R, S1))
        return [[t for t in r if t >= 0] for r in d.tolist()]
