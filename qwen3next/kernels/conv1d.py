"""Causal depthwise conv1d + SiLU references for the DeltaNet mixer (architecture.md §5.2, §5.8).

`causal_conv1d_varlen` handles a packed varlen batch in one vectorised pass: each sequence is
given a K-1 column prefix (its cached conv state, or zeros), the K taps are gathered from that
extended buffer, and the last K-1 inputs become the new state. `causal_conv1d_update` is the
one-token decode step. Sums are taken in fp32 and cast back to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _as_list(x) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def causal_conv1d_varlen(x, weight, cu_seqlens, conv_state=None, state_slots=None, has_initial_state=None):
    """x [T, C] pre-conv; weight [C, K]; -> silu(conv) [T, C]. conv_state [N, C, K-1] updated in place."""
    T, C = x.shape
    K = weight.shape[-1]
    cu = _as_list(cu_seqlens)
    B = len(cu) - 1
    lens = torch.tensor([cu[i + 1] - cu[i] for i in range(B)], device=x.device)
    starts = torch.tensor(cu[:-1], device=x.device)
    # prefix [B, K-1, C]: cached pre-conv inputs (oldest first) or zeros at sequence start
    prefix = x.new_zeros(B, K - 1, C)
    if conv_state is not None:
        cached = conv_state[state_slots].transpose(1, 2).to(x.dtype)  # [B, K-1, C]
        if has_initial_state is not None:  # where, not a product: a stale slot may hold NaN
            cached = torch.where(has_initial_state.to(x.device).view(B, 1, 1), cached, torch.zeros_like(cached))
        prefix = cached
    # extended buffer: [prefix_0, seq_0, prefix_1, seq_1, ...], each sequence shifted by (b+1)(K-1)
    seq_id = torch.repeat_interleave(torch.arange(B, device=x.device), lens)  # [T]
    tok_pos = torch.arange(T, device=x.device) + (seq_id + 1) * (K - 1)  # where token t lands
    pre_pos = (starts + torch.arange(B, device=x.device) * (K - 1))[:, None] + torch.arange(K - 1, device=x.device)
    ext = x.new_zeros(T + B * (K - 1), C)
    ext = ext.index_put((tok_pos,), x).index_put((pre_pos.reshape(-1),), prefix.reshape(-1, C))
    # weight[:, K-1] multiplies the current token, weight[:, 0] the one K-1 steps back
    acc = torch.zeros(T, C, dtype=torch.float32, device=x.device)
    wf = weight.float()
    for j in range(K):
        acc = acc + ext.index_select(0, tok_pos - (K - 1 - j)).float() * wf[:, j]
    y = F.silu(acc).to(x.dtype)
    if conv_state is not None:
        # the last K-1 entries of each sequence's extended run (prefix included for short runs)
        ends = (starts + lens + (torch.arange(B, device=x.device) + 1) * (K - 1))[:, None]  # one past last
        idx = ends - (K - 1) + torch.arange(K - 1, device=x.device)  # [B, K-1]
        new = ext.index_select(0, idx.reshape(-1)).view(B, K - 1, C).transpose(1, 2)
        conv_state[state_slots] = new.to(conv_state.dtype)
    return y


def causal_conv1d_update(x, weight, conv_state, state_slots):
    """One token per sequence: x [B, C]; conv_state [N, C, K-1] (in place) -> y [B, C]."""
    window = torch.cat([conv_state[state_slots].to(x.dtype), x[:, :, None]], dim=-1)  # [B, C, K]
    y = F.silu((window.float() * weight.float()).sum(-1)).to(x.dtype)
    conv_state[state_slots] = window[:, :, 1:].to(conv_state.dtype)
    return y


def save_token_windows(x, cu_seqlens, conv_state, state_slots, has_initial_state, token_slots) -> None:
    """Speculative verify: for every token t with token_slots[t] >= 0, store the conv state after t
    (the K-1 pre-conv inputs ending at t, the cached state supplying what precedes the run) into
    conv_state[token_slots[t]]. Reads the states at state_slots, so call it before they are updated."""
    T, C = x.shape
    K1 = conv_state.shape[-1]
    cu = _as_list(cu_seqlens)
    B, dev = len(cu) - 1, x.device
    lens = torch.tensor([cu[i + 1] - cu[i] for i in range(B)], device=dev)
    prev = conv_state[state_slots].transpose(1, 2).to(x.dtype)  # [B, K-1, C]
    prev = torch.where(has_initial_state.to(dev).view(B, 1, 1), prev, torch.zeros_like(prev))
    # the same extended buffer as causal_conv1d_varlen: each sequence after its K-1 prefix
    seq_id = torch.repeat_interleave(torch.arange(B, device=dev), lens)
    tok_pos = torch.arange(T, device=dev) + (seq_id + 1) * K1
    starts = torch.tensor(cu[:-1], device=dev)
    pre_pos = (starts + torch.arange(B, device=dev) * K1)[:, None] + torch.arange(K1, device=dev)
    ext = x.new_zeros(T + B * K1, C).index_put((tok_pos,), x).index_put((pre_pos.reshape(-1),), prev.reshape(-1, C))
    sel = (token_slots >= 0).nonzero().squeeze(1)
    idx = tok_pos[sel][:, None] - (K1 - 1) + torch.arange(K1, device=dev)  # [n, K-1] rows ending at t
    conv_state[token_slots[sel]] = ext[idx].transpose(1, 2).to(conv_state.dtype)
