"""Qwen3NextForCausalLM in plain PyTorch (architecture.md §4), the engine's model contract
(docs/structure.md): forward over a packed ForwardBatch -> final hidden states, compute_logits,
state_spec, and the optional MTP head at `self.mtp`.

Parameter names equal the checkpoint's (`model.*`, `lm_head.weight`, `mtp.*`), except routed
experts, which are held stacked (`mlp.experts.gate_up_proj` / `down_proj`; see loader.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import FULL, ModelConfig
from .distributed.parallel_state import tp_size
from .forward_batch import ForwardBatch, StateSpec
from .kernels import ops
from .layers.decoder_layer import DecoderLayer
from .layers.gated_deltanet import GatedDeltaNet
from .layers.moe import Experts
from .layers.norm import GatedRMSNorm, ZCRMSNorm
from .layers.rotary import RotaryEmbedding


class Qwen3NextModel(nn.Module):
    """The trunk under the `model.` prefix: embed_tokens, layers, norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if tp_size() > 1:  # rows of the vocabulary per rank
            from .distributed.vocab_parallel import VocabParallelEmbedding

            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        else:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, cfg.layer_types[i], cfg.is_moe_layer(i), cache_index=i)
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = ZCRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3NextForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, with_mtp: bool | None = None):
        """with_mtp: build the MTP head (default: when cfg.num_mtp_layers > 0). The loader sets
        `mtp = None` when the checkpoint holds no mtp.* tensors."""
        super().__init__()
        self.config = cfg
        self.model = Qwen3NextModel(cfg)
        if tp_size() > 1:  # logit columns per rank, gathered by its forward
            from .distributed.vocab_parallel import VocabParallelLMHead

            self.lm_head = VocabParallelLMHead(cfg.hidden_size, cfg.vocab_size)
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.rope)
        if with_mtp is None:
            with_mtp = cfg.num_mtp_layers > 0
        from .mtp import Qwen3NextMTP  # mtp.py imports this module's layers

        self.mtp = Qwen3NextMTP(cfg, self) if with_mtp else None
        # set by the engine from the tokenizer: logits of ids at or above it are masked
        self.sampled_vocab_size: int | None = None
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ---- contract ------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                return_router_logits: bool = False):
        """input_ids, positions [T] -> hidden [T, H] after model.norm.

        return_router_logits=True returns (hidden, [router logits [T, E] per MoE layer, in layer
        order]) for the training loss (load balancing); dense layers contribute nothing.
        """
        x = self.model.embed_tokens(input_ids)
        routers: list | None = [] if return_router_logits else None
        residual = cos = sin = None
        for layer in self.model.layers:
            if cos is None and layer.layer_type == FULL:
                # built when the first attention layer needs them: the ~10 small launches are then
                # not between the embedding and the first layer, where the GPU waits for the host
                cos, sin = self.rotary(positions, x.dtype)
            x, residual = layer(x, residual, cos, sin, batch, routers)
        hidden, _ = self.model.norm(x, residual)
        return (hidden, routers) if return_router_logits else hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, V] float32; ids >= sampled_vocab_size get -inf."""
        if type(self.lm_head) is nn.Linear and ops.cpu_fast_ok(hidden, self.lm_head.weight):
            # few-row decode/verify steps: the C++ weight-streaming kernel beats the aten matmul
            logits = ops.linear(hidden, self.lm_head.weight).float()
        else:
            logits = self.lm_head(hidden).float()
        n = self.sampled_vocab_size
        if n is not None and n < logits.shape[-1]:
            # the embedding has padding rows past the tokenizer (151669..151935): never emit them
            logits[:, n:] = float("-inf")
        return logits

    def state_spec(self) -> StateSpec:
        """This rank's shapes: head counts and conv channels are the layers' own (a shard under
        tensor parallelism)."""
        cfg = self.config
        layers = self.model.layers
        kv = {i: (layers[i].self_attn.num_kv_heads, cfg.head_dim) for i in cfg.full_layers}
        if self.mtp is not None:
            for j, layer in enumerate(self.mtp.layers):
                kv[cfg.num_hidden_layers + j] = (layer.self_attn.num_kv_heads, cfg.head_dim)
        conv = {i: (layers[i].linear_attn.conv_dim, cfg.linear_conv_kernel_dim - 1) for i in cfg.linear_layers}
        rec = {
            i: (layers[i].linear_attn.num_v_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
            for i in cfg.linear_layers
        }
        return StateSpec(kv_layers=kv, conv_layers=conv, recurrent_layers=rec)

    # ---- initialisation (training from scratch) ------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers-like init: normal(0, initializer_range) for linears, embeddings and
        experts; zero-centred norms at 0, gated norms at 1; A_log = log U(1, 16), dt_bias = 1."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
            elif isinstance(m, Experts):
                m.gate_up_proj.normal_(0.0, std)
                m.down_proj.normal_(0.0, std)
            elif isinstance(m, ZCRMSNorm):
                m.weight.zero_()
            elif isinstance(m, GatedRMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, GatedDeltaNet):
                m.A_log.uniform_(1.0, 16.0).log_()
                m.dt_bias.fill_(1.0)
                nn.init.kaiming_uniform_(m.conv1d.weight, a=math.sqrt(5))
