"""Faster plain-torch variants of the reference kernels for the CPU path (same signatures).

The references loop over sequences or experts with many tiny ops; on CPU, per-op overhead
dominates small models, so these batch the work: paged attention as one padded, masked matmul
per group of sequences (decode rows together), the DeltaNet decode step as one gather -> update
-> scatter of the state slots, and MoE as one dense "all experts" batched matmul when that is
cheaper than looping. kernels/ops.py picks them off CUDA; tests/test_cpu_fast.py holds them to
the references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import attention as _ref_attn
from . import delta_rule as _ref_dr
from . import moe as _ref_moe
from . import norm as _ref_norm
from .attention import _as_list


# ---- norms -----------------------------------------------------------------------------------
def zc_rmsnorm(x, weight, eps, residual=None):
    """Same contract as norm.zc_rmsnorm; float32 through one F.rms_norm (other dtypes: the reference,
    whose casts between steps F.rms_norm would not repeat)."""
    if x.dtype != torch.float32:
        return _ref_norm.zc_rmsnorm(x, weight, eps, residual)
    if residual is not None:
        x = x + residual
    w = 1.0 + weight.float()
    if w.dim() == 1:
        y = F.rms_norm(x, (x.shape[-1],), w, eps)
    else:  # a per-head weight [heads, D] (q and k normed together)
        y = F.rms_norm(x, (x.shape[-1],), None, eps).mul_(w)
    return y if residual is None else (y, x)


def gated_rmsnorm(x, z, weight, eps):
    """Same contract as norm.gated_rmsnorm; float32 through one F.rms_norm."""
    if x.dtype != torch.float32 or z.dtype != torch.float32:
        return _ref_norm.gated_rmsnorm(x, z, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight.float(), eps).mul_(F.silu(z))


# ---- paged attention -------------------------------------------------------------------------
def _attend_group(q, kv_cache, block_tables, rows, starts, lens, ctx, scale, out):
    """Attention of the sequences `rows` (host lists of equal length), padded to the longest
    query run and key run: one gather of their blocks, one masked SDPA call. Writes into out.
    Keys past a sequence's end (stale slots, other blocks) are masked out."""
    dev = q.device
    G, Hq, D = len(rows), q.shape[1], q.shape[2]
    nb_all, _, bs, Hkv, _ = kv_cache.shape
    nmax = max(lens)
    nblk = -(-max(c + n for c, n in zip(ctx, lens)) // bs)
    L = nblk * bs
    blocks = block_tables.index_select(0, torch.tensor(rows, device=dev))[:, :nblk].reshape(-1)
    k = kv_cache[:, 0].index_select(0, blocks).view(G, L, Hkv, D).transpose(1, 2)  # [G, Hkv, L, D]
    v = kv_cache[:, 1].index_select(0, blocks).view(G, L, Hkv, D).transpose(1, 2)
    steps = torch.arange(nmax, device=dev)
    pos = torch.tensor(starts, device=dev)[:, None] + steps  # [G, nmax] query rows in q
    valid = steps[None, :] < torch.tensor(lens, device=dev)[:, None]
    qg = q.index_select(0, pos.clamp(max=q.shape[0] - 1).reshape(-1)).view(G, nmax, Hq, D).transpose(1, 2)
    qpos = torch.tensor(ctx, device=dev)[:, None] + steps  # [G, nmax] absolute position of each query
    # key j visible to query i iff j <= its position; padded query rows still see key 0 (no NaN)
    visible = (torch.arange(L, device=dev)[None, None, :] <= qpos[:, :, None])[:, None]  # [G, 1, nmax, L]
    if qg.dtype != torch.float32 or k.dtype != torch.float32:
        qg, k, v = qg.float(), k.float(), v.float()
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=visible, scale=scale, enable_gqa=Hq != Hkv)
    o = o.transpose(1, 2)  # [G, nmax, Hq, D]
    if nmax == 1:
        out.index_copy_(0, pos.view(-1), o.reshape(G, Hq, D).to(out.dtype))
    else:
        out.index_copy_(0, pos[valid], o[valid].to(out.dtype))


def paged_attention(q, kv_cache, block_tables, cu_seqlens, context_lens, scale) -> torch.Tensor:
    """Same contract as attention.paged_attention. Decode rows run as one padded group; the
    multi-token rows as another when padding them to a common length wastes at most half the
    work, else one by one."""
    cu, ctx = _as_list(cu_seqlens), _as_list(context_lens)
    out = q.new_zeros(q.shape)
    dec, multi = [], []
    for b in range(len(cu) - 1):
        n = cu[b + 1] - cu[b]
        if n == 1:
            dec.append(b)
        elif n > 1:
            multi.append(b)

    def run(rows):
        _attend_group(q, kv_cache, block_tables, rows, [cu[b] for b in rows],
                      [cu[b + 1] - cu[b] for b in rows], [ctx[b] for b in rows], scale, out)

    if dec:
        run(dec)
    if multi:
        exact = sum((cu[b + 1] - cu[b]) * (ctx[b] + cu[b + 1] - cu[b]) for b in multi)
        padded = len(multi) * max(cu[b + 1] - cu[b] for b in multi) * max(ctx[b] + cu[b + 1] - cu[b] for b in multi)
        if padded <= 2 * exact:
            run(multi)
        else:
            for b in multi:
                run([b])
    return out


def write_kv(k, v, kv_cache, slot_mapping) -> None:
    """Same contract as attention.write_kv: one row copy of K and V into the flattened cache."""
    if not bool((slot_mapping >= 0).all()):
        return _ref_attn.write_kv(k, v, kv_cache, slot_mapping)
    NB, _, bs, Hkv, D = kv_cache.shape
    T = k.shape[0]
    row_k = (slot_mapping // bs) * (2 * bs) + slot_mapping % bs  # rows of [NB * 2 * bs, Hkv * D]
    rows = torch.cat([row_k, row_k + bs])
    src = torch.cat([k.reshape(T, -1), v.reshape(T, -1)]).to(kv_cache.dtype)
    kv_cache.view(NB * 2 * bs, Hkv * D).index_copy_(0, rows, src)


# ---- Gated DeltaNet decode -------------------------------------------------------------------
def _qk_rows(q, k, Hv):
    """q, k [B, Hk, dk] -> [B, Hv, 2, dk] with rows (q, k); value head j reads key head j // r."""
    B, Hk, dk = k.shape
    return torch.stack([q, k], dim=2).unsqueeze(2).expand(B, Hk, Hv // Hk, 2, dk).reshape(B, Hv, 2, dk)


def _step(qk, v, g, beta, S):
    """One token of each of B sequences on their states S [B, Hv, dk, dv] (updated in place).

    With S'' = exp(g) S, delta = beta (v - k S'') and S' = S'' + k (x) delta, the output is
    q S' = q S'' + (q . k) delta: q and k share one batched matmul with S''."""
    S.mul_(g.exp()[..., None, None])  # S''
    X = torch.matmul(qk, S)  # [B, Hv, 2, dv]: q S'', k S''
    delta = (v.float() - X[:, :, 1]).mul_(beta[..., None])  # [B, Hv, dv]
    kr = qk[:, :, 1]
    S.addcmul_(kr.unsqueeze(-1), delta.unsqueeze(-2))
    return X[:, :, 0].addcmul_((qk[:, :, 0] * kr).sum(-1, keepdim=True), delta)


def delta_rule_step(q, k, v, g, beta, state, state_slots) -> torch.Tensor:
    """One token per sequence from its state slot (all slots hold a valid state).
    q, k [B, Hk, dk] fp32 (normalised, q scaled); v [B, Hv, dv]; g, beta [B, Hv] fp32;
    state [N, Hv, dk, dv] updated in place -> o [B, Hv, dv] in v's dtype. A bf16 / fp16 pool
    (mamba_ssm_cache_dtype) is stepped on an fp32 copy of the batch's states, rounded back once.

    The states are the step's big tensor (256 KiB per sequence and layer at 4 x 128 x 128). When
    the batch's slots fill most of a range lo..hi (the usual case: slots are handed out low
    first), `_step` updates them in place through a view of that range, saving a gather and a
    scatter of every state (3x faster at 32 sequences); rows of free slots inside the range get
    zero inputs, which leave them as they are (decay exp(0) = 1, beta = 0)."""
    B, N = q.shape[0], state.shape[0]
    qk = _qk_rows(q, k, state.shape[1])
    if state.dtype != torch.float32:  # the update computes in place: never in the pool's 16 bits
        S = state.index_select(0, state_slots).float()
        o = _step(qk, v, g, beta, S)
        state.index_copy_(0, state_slots, S.to(state.dtype))
        return o.to(v.dtype)
    lo, hi = int(state_slots.min()), int(state_slots.max())
    R = hi - lo + 1
    if R > B + B // 4 + 1:  # scattered slots: gather, step, scatter back
        S = state.index_select(0, state_slots)  # [B, Hv, dk, dv] (a copy)
        o = _step(qk, v, g, beta, S)
        # contiguous [B, Hv*dk*dv] rows: index_copy_ on them is a plain row copy
        state.view(N, -1).index_copy_(0, state_slots, S.view(B, -1))
        return o.to(v.dtype)
    rows = state_slots - lo  # each sequence's row in the range
    spread = R != B or not torch.equal(rows, torch.arange(B, device=rows.device))
    if not spread:
        return _step(qk, v, g, beta, state[lo : hi + 1]).to(v.dtype)
    qk_r, v_r, g_r, beta_r = (x.new_zeros(R, *x.shape[1:]).index_copy_(0, rows, x) for x in (qk, v, g, beta))
    return _step(qk_r, v_r, g_r, beta_r, state[lo : hi + 1]).index_select(0, rows).to(v.dtype)


def _recurrent_short(q, k, v, g, beta, cu, state, state_slots, has_initial_state, per_token_state_slots):
    """A few tokens per sequence (speculative verify): inputs gathered once into [B, L] runs, the
    states gathered once, one batched `_step` per position (a sequence past its end steps with
    g = beta = 0, which leaves its state unchanged), per-token states saved in one copy at the end."""
    B, T, dev = len(cu) - 1, v.shape[0], v.device
    Hv = state.shape[1]
    lens = [cu[b + 1] - cu[b] for b in range(B)]
    L = max(lens)
    steps = torch.arange(L, device=dev)
    valid = steps[None, :] < torch.tensor(lens, device=dev)[:, None]  # [B, L]
    pos = torch.where(valid, torch.tensor(cu[:-1], device=dev)[:, None] + steps, 0).clamp_(max=max(T - 1, 0))
    idx = pos.reshape(-1)
    keep = valid.reshape(-1, 1).to(torch.float32)
    qk = _qk_rows(q.index_select(0, idx).float(), k.index_select(0, idx).float(), Hv).view(B, L, Hv, 2, -1)
    vv = v.index_select(0, idx).view(B, L, Hv, -1)
    gg = (g.index_select(0, idx).float() * keep).view(B, L, Hv)
    bb = (beta.index_select(0, idx).float() * keep).view(B, L, Hv)
    S = state.index_select(0, state_slots).float()  # (a bf16 / fp16 pool: fp32 here, rounded on store)
    if has_initial_state is not None and not bool(has_initial_state.all()):
        S = torch.where(has_initial_state.view(B, 1, 1, 1), S, torch.zeros_like(S))  # where: stale may be NaN
    outs, snaps = [], []
    for t in range(L):
        outs.append(_step(qk[:, t], vv[:, t], gg[:, t], bb[:, t], S))
        if per_token_state_slots is not None:
            snaps.append(S.clone())
    o = v.new_zeros(v.shape)
    if L:
        o[pos[valid]] = torch.stack(outs, dim=1)[valid].to(o.dtype)
    if snaps:
        slot = torch.where(valid, per_token_state_slots.index_select(0, idx).view(B, L), -1)
        save = slot >= 0
        state[slot[save]] = torch.stack(snaps, dim=1)[save].to(state.dtype)
    state.index_copy_(0, state_slots, S.to(state.dtype))
    return o


def gated_delta_rule_recurrent(q, k, v, g, beta, cu_seqlens, state=None, state_slots=None,
                               has_initial_state=None, per_token_state_slots=None):
    """Same contract as delta_rule.gated_delta_rule_recurrent: a decode batch (one token per
    sequence, each continuing from its slot) runs as `delta_rule_step`, a few tokens per sequence
    on a state pool as `_recurrent_short`, anything else the reference."""
    cu = _as_list(cu_seqlens)
    B = len(cu) - 1
    if state is None or B == 0 or max(cu[b + 1] - cu[b] for b in range(B)) > _SHORT:
        return _ref_dr.gated_delta_rule_recurrent(q, k, v, g, beta, cu_seqlens, state, state_slots,
                                                  has_initial_state, per_token_state_slots)
    if per_token_state_slots is None and cu == list(range(B + 1)) and (
            has_initial_state is None or bool(has_initial_state.all())):
        return delta_rule_step(q.float(), k.float(), v, g.float(), beta.float(), state, state_slots)
    return _recurrent_short(q, k, v, g, beta, cu, state, state_slots, has_initial_state, per_token_state_slots)


# Longest run per sequence that `_recurrent_short` takes (a Python step per position).
_SHORT = 16


# Chunk length of the chunked delta rule on CPU: half the reference's 64 halves the intra-chunk
# [C, C] work and the padding of short prompts, for twice the (cheap) chunk steps.
CHUNK = 32


def gated_delta_rule_chunked(q, k, v, g, beta, cu_seqlens, state=None, state_slots=None, has_initial_state=None):
    """Same contract as delta_rule.gated_delta_rule_chunked. In a mixed step the decoding
    sequences (one token on top of a state) take `delta_rule_step` instead of being padded to a
    whole chunk; the others run through the reference with chunk length `CHUNK`."""
    cu = _as_list(cu_seqlens)
    B = len(cu) - 1
    init = [True] * B if has_initial_state is None else has_initial_state.tolist()
    dec = [b for b in range(B) if cu[b + 1] - cu[b] == 1 and init[b]] if state is not None else []
    if not dec:
        return _ref_dr.gated_delta_rule_chunked(q, k, v, g, beta, cu_seqlens, state, state_slots, has_initial_state,
                                                chunk=CHUNK)
    dev = v.device
    o = v.new_zeros(v.shape)
    tok = torch.tensor([cu[b] for b in dec], device=dev)
    slots = state_slots.index_select(0, torch.tensor(dec, device=state_slots.device))
    pick = [x.index_select(0, tok) for x in (q, k, v, g, beta)]
    o.index_copy_(0, tok, gated_delta_rule_recurrent(*pick, torch.arange(len(dec) + 1), state, slots))
    dec_set = set(dec)
    rest = [b for b in range(B) if cu[b + 1] - cu[b] > 0 and b not in dec_set]
    if rest:
        lens = [cu[b + 1] - cu[b] for b in rest]
        tok = torch.cat([torch.arange(cu[b], cu[b + 1], device=dev) for b in rest])
        sub_cu = [0]
        for n in lens:
            sub_cu.append(sub_cu[-1] + n)
        rows = torch.tensor(rest, device=state_slots.device)
        sub_init = None if has_initial_state is None else has_initial_state[rest]
        pick = [x.index_select(0, tok) for x in (q, k, v, g, beta)]
        o.index_copy_(0, tok, _ref_dr.gated_delta_rule_chunked(*pick, sub_cu, state, state_slots.index_select(0, rows),
                                                               sub_init, chunk=CHUNK))
    return o


def causal_conv1d_varlen(x, weight, cu_seqlens, conv_state=None, state_slots=None, has_initial_state=None):
    """Same contract as conv1d.causal_conv1d_varlen: the same extended buffer (each sequence after
    its K-1 prefix), convolved over the whole buffer by K shifted row slices (contiguous
    multiply-adds, no gathers), then the token rows picked out."""
    T, C = x.shape
    K = weight.shape[-1]
    cu = _as_list(cu_seqlens)
    B, dev = len(cu) - 1, x.device
    lens = torch.tensor([cu[i + 1] - cu[i] for i in range(B)], device=dev)
    starts = torch.tensor(cu[:-1], device=dev)
    prefix = x.new_zeros(B, K - 1, C)
    if conv_state is not None:
        prefix = conv_state.index_select(0, state_slots).transpose(1, 2).to(x.dtype)  # [B, K-1, C]
        if has_initial_state is not None:  # where, not a product: a stale slot may hold NaN
            prefix = torch.where(has_initial_state.to(dev).view(B, 1, 1), prefix, torch.zeros_like(prefix))
    seq_id = torch.repeat_interleave(torch.arange(B, device=dev), lens, output_size=T)  # [T]
    tok_pos = torch.arange(T, device=dev) + (seq_id + 1) * (K - 1)  # where token t lands
    pre_pos = (starts + torch.arange(B, device=dev) * (K - 1))[:, None] + torch.arange(K - 1, device=dev)
    ext = x.new_empty(T + B * (K - 1), C)
    ext.index_copy_(0, tok_pos, x).index_copy_(0, pre_pos.reshape(-1), prefix.reshape(-1, C))
    # row i of acc is the window ext[i : i + K] (weight[:, K-1] on its last row): token t's is tok_pos[t] - (K-1)
    n = ext.shape[0] - (K - 1)
    wf = weight.float()
    acc = ext[:n].float() * wf[:, 0]
    for j in range(1, K):
        acc.addcmul_(ext[j : j + n].float(), wf[:, j])
    y = F.silu(acc.index_select(0, tok_pos - (K - 1))).to(x.dtype)
    if conv_state is not None:
        ends = (starts + lens + (torch.arange(B, device=dev) + 1) * (K - 1))[:, None]  # one past last
        idx = ends - (K - 1) + torch.arange(K - 1, device=dev)  # [B, K-1]
        new = ext.index_select(0, idx.reshape(-1)).view(B, K - 1, C).transpose(1, 2)
        conv_state.index_copy_(0, state_slots, new.to(conv_state.dtype))
    return y


def causal_conv1d_update(x, weight, conv_state, state_slots):
    """Same contract as conv1d.causal_conv1d_update: x [B, C] -> y [B, C]; conv_state in place.
    Works channels-last ([B, K, C]): the K taps are short rows, the channels long contiguous ones."""
    B, C = x.shape
    N, _, K1 = conv_state.shape
    win = x.new_empty(B, K1 + 1, C)  # [B, K, C]: the K-1 cached inputs (oldest first), then x
    win[:, :K1] = conv_state.index_select(0, state_slots).transpose(1, 2)
    win[:, K1] = x
    # contiguous [B, C*(K-1)] rows: index_copy_ on them is a plain row copy
    conv_state.view(N, -1).index_copy_(0, state_slots, win[:, 1:].transpose(1, 2).reshape(B, -1).to(conv_state.dtype))
    acc = (win.float() * weight.float().t()).sum(1)  # [B, C]
    return F.silu(acc).to(x.dtype)


def gdn_decode(m, a, b, conv_weight, conv_state, recurrent_state, state_slots, A_log, dt_bias,
               num_k_heads: int) -> torch.Tensor:
    """Same contract as triton/gdn_decode_ref.gdn_decode_reference (slots all >= 0)."""
    B = m.shape[0]
    Hv, dk, dv = recurrent_state.shape[1:]
    Hk = num_k_heads
    mc = causal_conv1d_update(m, conv_weight, conv_state, state_slots)
    qk = mc[:, : 2 * Hk * dk].reshape(B, 2, Hk, dk).float()  # [q_all | k_all]
    qk = qk * torch.rsqrt((qk * qk).sum(-1, keepdim=True) + 1e-6)  # L2 norm of both at once
    qk[:, 0] *= dk ** -0.5
    beta = torch.sigmoid(b).float()
    g = F.softplus(a.float() + dt_bias.float()).mul_(-A_log.float().exp())
    v = mc[:, 2 * Hk * dk :].reshape(B, Hv, dv)
    return delta_rule_step(qk[:, 0], qk[:, 1], v, g, beta, recurrent_state, state_slots)


# ---- MoE -------------------------------------------------------------------------------------
# Dense "every expert on every token" pays (E - k) / k times the routed flops but runs as two
# plain matmuls; the grouped loop pays about four ops per active expert. Measured on one core,
# one op's overhead is worth roughly this many flops (tiny model: dense wins below ~150 tokens).
_FLOPS_PER_EXPERT_STEP = 1_500_000


def moe_experts(x, gate_up_proj, down_proj, weights, ids) -> torch.Tensor:
    """Same contract as moe.moe_experts: x [T, H]; gate_up_proj [E, 2I, H]; down_proj [E, H, I];
    weights/ids [T, k] -> [T, H]."""
    T, k = ids.shape
    E, I2, H = gate_up_proj.shape
    if moe_dense_pays(T, E, k, H, I2 // 2):
        return _moe_dense(x, gate_up_proj, down_proj, weights, ids)
    return _moe_grouped(x, gate_up_proj, down_proj, weights, ids)


def moe_dense_pays(T: int, E: int, k: int, H: int, inter: int, flops_per_expert: int = _FLOPS_PER_EXPERT_STEP) -> bool:
    """Whether every expert on every token is cheaper than the grouped loop for T tokens, when one
    active expert's overhead in the grouped loop is worth `flops_per_expert`."""
    wasted = (E - k) * T * 3 * H * inter * 2
    return wasted <= min(E, T * k) * flops_per_expert


def moe_dense_act(y, shared_inter: int, num_experts: int, inter: int, top_k: int, norm_topk_prob: bool):
    """The dense MoE block's middle: y [T, 2Is + 1 + E*2I + E] = x @ [shared gate | shared up |
    shared_expert_gate | experts' gate_up | router].T -> h [T, E*I + Is]: each expert's
    silu(gate) * up scaled by its routing weight (0 off the top-k), then the shared expert's scaled by
    sigmoid(its gate); `h @ [experts' down | shared down]` is the block's output."""
    T, Is, E, I = y.shape[0], shared_inter, num_experts, inter
    weights, ids = _ref_moe.moe_route(y[:, -E:], top_k, norm_topk_prob)
    dense_w = weights.new_zeros(T, E).scatter_(1, ids, weights).to(y.dtype)  # [T, E]
    gu = y[:, 2 * Is + 1 : 2 * Is + 1 + E * 2 * I].view(T, E, 2 * I)
    h = F.silu(gu[..., :I]).mul_(gu[..., I:]).mul_(dense_w[..., None])  # [T, E, I]
    hs = F.silu(y[:, :Is]).mul_(y[:, Is : 2 * Is]).mul_(torch.sigmoid(y[:, 2 * Is : 2 * Is + 1]))  # [T, Is]
    return torch.cat([h.view(T, E * I), hs], dim=1)


def _moe_dense(x, gate_up_proj, down_proj, weights, ids):
    """Every expert on every token, as two plain matmuls: the routing weight (0 off the top-k)
    scales each expert's hidden activation, so the down projections sum in one [T, E*I] @ [E*I, H]."""
    T = x.shape[0]
    E, I2, H = gate_up_proj.shape
    inter = I2 // 2
    gu = torch.matmul(x, gate_up_proj.reshape(E * I2, H).t()).view(T, E, I2)  # [T, E, 2I]
    dense_w = weights.new_zeros(T, E).scatter_(1, ids, weights).to(x.dtype)  # [T, E]
    h = F.silu(gu[..., :inter]).mul_(gu[..., inter:]).mul_(dense_w[..., None])  # [T, E, I]
    out = torch.matmul(h.view(T, E * inter), down_proj.transpose(1, 2).reshape(E * inter, H))
    return out.to(x.dtype)


def _moe_grouped(x, gate_up_proj, down_proj, weights, ids):
    """Assignments sorted by expert: one gather of the token rows, a contiguous slice per expert,
    one weighted scatter-add at the end."""
    T, k = ids.shape
    inter = down_proj.shape[-1]
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=gate_up_proj.shape[0]).tolist()
    tok_of = order // k
    xs = x.index_select(0, tok_of)  # [T*k, H]
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        gu = torch.matmul(xs[start : start + n], gate_up_proj[e].t())  # [n, 2I]
        h = F.silu(gu[:, :inter]).mul_(gu[:, inter:])
        torch.matmul(h, down_proj[e].t(), out=ys[start : start + n])
        start += n
    ys.mul_(weights.reshape(-1)[order].to(x.dtype)[:, None])
    out = torch.zeros(T, x.shape[-1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, tok_of, ys.float()).to(x.dtype)
