"""Training losses on a packed (varlen) batch: next token, MTP (token t+2), router load balance.

Sequences are packed end to end ([T] flat, `cu_seqlens` marks boundaries); `loss_mask[T]` marks
the tokens that count as targets (assistant turns). A target never crosses a sequence boundary.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from qwen3next.forward_batch import ForwardBatch
from qwen3next.layers.moe import SparseMoeBlock


def shift_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor, cu_seqlens: torch.Tensor, shift: int):
    """Targets `input_ids[t + shift]` within each sequence -> (targets [T], valid [T] bool).

    valid[t] is False where t + shift leaves t's sequence or the target is not a loss token.
    """
    T = input_ids.shape[0]
    targets = torch.zeros_like(input_ids)
    valid = torch.zeros(T, dtype=torch.bool, device=input_ids.device)
    if shift < T:
        targets[: T - shift] = input_ids[shift:]
        valid[: T - shift] = loss_mask[shift:]
    # the last `shift` positions of every sequence have no in-sequence target
    ends = cu_seqlens[1:]
    pos = torch.arange(T, device=input_ids.device)
    seq_of = torch.searchsorted(ends, pos, right=True)  # [T] sequence index of each position
    valid &= pos + shift < ends[seq_of]
    return targets, valid


def scored_ce(model, hidden: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of model.compute_logits(hidden) at the valid positions only (the
    lm_head runs just there)."""
    if not bool(valid.any()):
        return hidden.sum() * 0.0  # keeps the graph; nothing to learn from in this batch
    return F.cross_entropy(model.compute_logits(hidden[valid]), targets[valid])


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch / Qwen-MoE balance loss, averaged over MoE layers.

    Per layer with E experts over T tokens: f_e = share of the T*top_k routing slots that went to
    expert e, P_e = mean softmax probability of e; loss = E * sum_e f_e * P_e (1.0 when uniform).
    Only P carries gradient (f comes from a hard top-k).
    """
    if not router_logits:
        raise ValueError("load_balancing_loss needs at least one layer of router logits")
    losses = []
    for logits in router_logits:  # [T, E]
        E = logits.shape[-1]
        probs = logits.float().softmax(-1)
        chosen = probs.topk(top_k, dim=-1).indices  # [T, k]
        f = torch.zeros(E, device=logits.device).scatter_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel(), device=logits.device)
        ) / chosen.numel()
        losses.append(E * (f * probs.mean(0)).sum())
    return torch.stack(losses).mean()


@contextmanager
def capture_router_logits(module: torch.nn.Module):
    """Collect the router logits [T, E] of every MoE block under `module` during a forward."""
    found: list[torch.Tensor] = []
    handles = [
        m.register_forward_hook(lambda _m, _inp, out: found.append(out[1]))
        for m in module.modules()
        if isinstance(m, SparseMoeBlock)
    ]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def model_losses(model, input_ids: torch.Tensor, loss_mask: torch.Tensor, positions: torch.Tensor,
                 batch: ForwardBatch, mtp_weight: float, aux_coef: float) -> dict[str, torch.Tensor]:
    """Forward a packed batch and return {"loss", "lm", "mtp", "aux"} (mtp/aux only when present).

    loss = lm + mtp_weight * mtp + aux_coef * aux. The MTP head sees the pairs (x_{t+1}, h_t) for
    every position t but a sequence's last, and is scored on x_{t+2}; the balance loss averages
    over every MoE layer, the MTP layer's included.
    """
    hidden, routers = model(input_ids, positions, batch, return_router_logits=True)
    cu = batch.cu_seqlens
    tgt1, valid1 = shift_targets(input_ids, loss_mask, cu, 1)
    lm = scored_ce(model, hidden, tgt1, valid1)
    out = {"lm": lm}
    loss = lm
    if model.mtp is not None and mtp_weight > 0:
        _, has_next = shift_targets(input_ids, torch.ones_like(loss_mask), cu, 1)
        idx = has_next.nonzero().squeeze(1)  # [T - B] positions t with an in-sequence x_{t+1}
        mtp_batch = ForwardBatch.full([n - 1 for n in batch.seq_lens], device=input_ids.device)
        with capture_router_logits(model.mtp) as mtp_routers:
            y = model.mtp(input_ids[idx + 1], hidden[idx], positions[idx], mtp_batch)
        routers = list(routers) + mtp_routers
        tgt2, valid2 = shift_targets(input_ids, loss_mask, cu, 2)
        mtp = scored_ce(model, y, tgt2[idx], valid2[idx])
        out["mtp"] = mtp
        loss = loss + mtp_weight * mtp
    if routers:
        aux = load_balancing_loss(routers, model.config.num_experts_per_tok)
        out["aux"] = aux
        loss = loss + aux_coef * aux
    out["loss"] = loss
    return out
