"""Gated delta rule references (architecture.md §5.5-5.6) over a packed varlen batch.

`gated_delta_rule_recurrent` is the definition (token by token, batched over sequences and
heads; it also serves decode). `gated_delta_rule_chunked` is the chunked WY form (chunk 64) used
for prefill and training: sequences with the same number of chunks are zero-padded to a common
length and run together (zero padding at the end leaves the state unchanged: g = beta = k = 0).
Both work in fp32 with an fp32 state [Hv, dk, dv], and support autograd when state is None. The
state pool may be fp32, bf16 or fp16 (mamba_ssm_cache_dtype): read into fp32, every store
(final and per-token states) rounded to the pool's dtype.
"""

from __future__ import annotations

import torch

CHUNK = 64


def _lens(cu_seqlens) -> tuple[list[int], list[int]]:
    """-> (length of each sequence, its start offset)."""
    cu = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    return [cu[i + 1] - cu[i] for i in range(len(cu) - 1)], cu[:-1]


def _pad(x: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x [T, ...] -> [b, L, ...] gathered at pos [b, L], zero where not valid."""
    out = x.index_select(0, pos.reshape(-1).clamp(min=0, max=max(x.shape[0] - 1, 0)))
    out = out.view(*pos.shape, *x.shape[1:])
    mask = valid.view(*valid.shape, *([1] * (x.dim() - 1)))
    return out * mask.to(out.dtype)


def _initial(state, state_slots, has_initial_state, rows, shape, device):
    """Incoming fp32 state for the sequences `rows` (list of batch indices), from a pool of any float dtype."""
    if state is None:
        return torch.zeros(len(rows), *shape, dtype=torch.float32, device=device)
    idx = torch.as_tensor(rows, device=state_slots.device)
    s = state[state_slots[idx]].float()
    if has_initial_state is not None:
        keep = has_initial_state.to(s.device)[idx]
        if not bool(keep.all()):  # decode batches skip this pass over the states
            s = torch.where(keep.view(-1, 1, 1, 1), s, torch.zeros_like(s))  # where: stale slots may hold NaN
    return s


def _prepare(q, k, v, g, beta, pos, valid):
    """Padded, head-major fp32 views: q,k [b, Hv, L, dk]; v [b, Hv, L, dv]; g, beta [b, Hv, L]."""
    r = v.shape[1] // k.shape[1]
    qp = _pad(q.float(), pos, valid).repeat_interleave(r, dim=2).transpose(1, 2)
    kp = _pad(k.float(), pos, valid).repeat_interleave(r, dim=2).transpose(1, 2)
    vp = _pad(v.float(), pos, valid).transpose(1, 2)
    gp = _pad(g.float(), pos, valid).transpose(1, 2)
    bp = _pad(beta.float(), pos, valid).transpose(1, 2)
    return qp, kp, vp, gp, bp


def gated_delta_rule_recurrent(q, k, v, g, beta, cu_seqlens, state=None, state_slots=None,
                               has_initial_state=None, per_token_state_slots=None):
    """Token-by-token definition. q, k [T, Hk, dk]; v [T, Hv, dv]; g, beta [T, Hv] -> o [T, Hv, dv].

    per_token_state_slots [T] long (optional, -1 = skip): also store the state after each token
    into that slot of `state` (speculative-decoding rollback).
    """
    lens, starts = _lens(cu_seqlens)
    B, L, dev = len(lens), max(lens), v.device
    steps = torch.arange(L, device=dev)
    pos = torch.tensor(starts, device=dev)[:, None] + steps  # [B, L]
    valid = steps[None, :] < torch.tensor(lens, device=dev)[:, None]
    qp, kp, vp, gp, bp = _prepare(q, k, v, g, beta, pos, valid)
    Hv, dk, dv = vp.shape[1], kp.shape[-1], vp.shape[-1]
    S = _initial(state, state_slots, has_initial_state, list(range(B)), (Hv, dk, dv), dev)
    pts = None
    if per_token_state_slots is not None:
        pts = torch.where(valid, per_token_state_slots[pos.clamp(max=v.shape[0] - 1)], -1)
    outs = []
    for t in range(L):
        kt, qt = kp[:, :, t], qp[:, :, t]  # [B, Hv, dk]
        S = S * gp[:, :, t].exp()[..., None, None]  # decay first
        pred = torch.einsum("bhk,bhkv->bhv", kt, S)
        delta = bp[:, :, t, None] * (vp[:, :, t] - pred)  # [B, Hv, dv]
        S = S + kt[..., :, None] * delta[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qt, S))
        if pts is not None:
            sel = pts[:, t] >= 0
            if bool(sel.any()):
                state[pts[sel, t]] = S[sel].to(state.dtype)
    o = torch.stack(outs, dim=1)  # [B, L, Hv, dv]
    if state is not None:
        state[state_slots] = S.to(state.dtype)
    return o[valid].to(v.dtype)


def _chunk_core(q, k, v, g, beta, S, chunk=CHUNK):
    """One group of padded sequences: q,k [b,H,n*C,dk]; v [b,H,n*C,dv]; g,beta [b,H,n*C]; S [b,H,dk,dv],
    or None for a zero incoming state (fresh prompts): its terms are then skipped."""
    b, H, Lp, dk = q.shape
    dv, n, C = v.shape[-1], Lp // chunk, chunk
    q, k = q.view(b, H, n, C, dk), k.view(b, H, n, C, dk)
    v, beta = v.view(b, H, n, C, dv), beta.view(b, H, n, C)
    G = g.view(b, H, n, C).cumsum(-1)  # cumulative log-decay within each chunk
    incl = torch.ones(C, C, dtype=q.dtype, device=q.device).tril()  # 0/1: causal incl. the diagonal
    # zeroed before exp (above the diagonal G_r - G_s > 0 could overflow) and after (exp(0) = 1)
    D = ((G[..., :, None] - G[..., None, :]) * incl).exp() * incl  # [b,H,n,C,C]
    A = beta[..., :, None] * (k @ k.transpose(-1, -2)) * D
    # (I + strictly-lower part of A)^-1 (a unit-triangular solve reads only A's strict lower
    # triangle) by one C-column solve, then one matmul for both right-hand sides
    # [beta v | beta exp(G) k]: on CPU ~3x cheaper than solving for the dv + dk columns
    eye = torch.eye(C, dtype=q.dtype, device=q.device).expand_as(A)
    inv = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)
    rhs = torch.cat([beta[..., None] * v, (beta * G.exp())[..., None] * k], dim=-1)
    U, Kd = (inv @ rhs).split([dv, dk], dim=-1)
    QK = (q @ k.transpose(-1, -2)) * D  # causal incl. diagonal (D is 0 above it)
    eG = G.exp()
    to_end = (G[..., -1:] - G).exp()  # decay from each row to the chunk end
    outs = []
    for c in range(n):
        if S is None:  # zero state: W = U, no q S term, nothing to decay
            outs.append(QK[:, :, c] @ U[:, :, c])
            S = (to_end[:, :, c, :, None] * k[:, :, c]).transpose(-1, -2) @ U[:, :, c]
            continue
        W = U[:, :, c] - Kd[:, :, c] @ S  # [b,H,C,dv]
        outs.append(eG[:, :, c, :, None] * (q[:, :, c] @ S) + QK[:, :, c] @ W)
        S = eG[:, :, c, -1, None, None] * S + (to_end[:, :, c, :, None] * k[:, :, c]).transpose(-1, -2) @ W
    return torch.stack(outs, dim=2).view(b, H, Lp, dv), S


def gated_delta_rule_chunked(q, k, v, g, beta, cu_seqlens, state=None, state_slots=None,
                             has_initial_state=None, chunk=CHUNK):
    """Chunked WY form; same contract as `gated_delta_rule_recurrent` (without per-token states).
    `chunk` (a power of two) trades intra-chunk work (~L*chunk) against chunk steps (L/chunk)."""
    lens, starts = _lens(cu_seqlens)
    dev, Hv, dv, dk = v.device, v.shape[1], v.shape[2], k.shape[2]
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lens):
        if n > 0:
            groups.setdefault(-(-n // chunk), []).append(i)
    # groups of fresh sequences (no state kept, or none cached yet) skip the incoming-state terms
    init = has_initial_state.tolist() if state is not None and has_initial_state is not None else None
    vals, where = [], []
    for nc, rows in groups.items():
        Lp = nc * chunk
        steps = torch.arange(Lp, device=dev)
        pos = torch.tensor([starts[i] for i in rows], device=dev)[:, None] + steps
        valid = steps[None, :] < torch.tensor([lens[i] for i in rows], device=dev)[:, None]
        qp, kp, vp, gp, bp = _prepare(q, k, v, g, beta, pos, valid)
        fresh = state is None or (init is not None and not any(init[i] for i in rows))
        S0 = None if fresh else _initial(state, state_slots, has_initial_state, rows, (Hv, dk, dv), dev)
        o, S = _chunk_core(qp, kp, vp, gp, bp, S0, chunk)  # o [b, Hv, Lp, dv]
        vals.append(o.transpose(1, 2)[valid])
        where.append(pos[valid])
        if state is not None:
            state[state_slots[torch.tensor(rows, device=state_slots.device)]] = S.to(state.dtype)
    if not vals:
        return v.new_zeros(v.shape)
    o = torch.cat(vals)[torch.argsort(torch.cat(where))]
    return o.to(v.dtype)
