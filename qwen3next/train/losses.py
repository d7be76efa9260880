"""Training losses on a packed (varlen) batch: next token, MTP (token t+2), router load balance.

Sequences are packed end to end ([T] flat, `cu_seqlens` marks boundaries); `loss_mask[T]` marks
the tokens that count as targets (assistant turns). A target never crosses a sequence boundary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over valid positions; logits [T, V] (any float dtype, computed in fp32)."""
    if not bool(valid.any()):
        return logits.sum() * 0.0  # keeps the graph; nothing to learn from in this batch
    return F.cross_entropy(logits[valid].float(), targets[valid])


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
