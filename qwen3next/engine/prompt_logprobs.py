"""Prompt logprobs (vLLM's SamplingParams.prompt_logprobs), computed chunk by chunk during prefill.

Entry p (p >= 1) of a request's list is the raw logprob of prompt token p under the model's
distribution at position p-1, with its rank and the top-N; entry 0 is None. A prompt chunk
covering positions [c, c+n) of an L-token prompt yields entries c+1 .. min(c+n, L-1) (the last
prompt position predicts the first output token, not a prompt entry). Only the hidden rows of
requests that ask reach the lm_head, in slices of bounded size, so a long chunk never holds [T, V]
at once. The lists live in the engine (request id -> entries so far) until reported. The engine
skips the prefix cache's read for such requests (as vLLM), so every prompt position is computed.
"""

from __future__ import annotations

import torch

from qwen3next.engine.sequence import Sequence
from qwen3next.outputs import Logprob

# bytes of float32 logits one slice may hold ([rows, V])
SLICE_BYTES = 64 << 20


def span(seq: Sequence, first: int, n: int, lists: dict[str, list]) -> tuple[int, int] | None:
    """Positions [start, stop) of the run first..first+n-1 whose logits give new entries for the
    sequence's request (None: it did not ask, or nothing new, e.g. a recompute after preemption)."""
    entries = lists.get(seq.request.request_id)
    if entries is None:
        return None
    start = max(first, len(entries) - 1)
    stop = min(first + n, seq.num_prompt_tokens - 1)
    return (start, stop) if start < stop else None


@torch.inference_mode()
def collect(model, items: list[tuple[Sequence, int, torch.Tensor]], lists: dict[str, list]) -> None:
    """items: (sequence, first position p0, hidden [m, H] of positions p0..p0+m-1, after the final
    norm) -> appends entries p0+1 .. p0+m to the request's list in `lists`."""
    hidden = items[0][2] if len(items) == 1 else torch.cat([h for _, _, h in items])  # [R, H]
    targets, tops = [], []
    for seq, p0, h in items:
        ids = seq.request.prompt_token_ids
        targets += ids[p0 + 1:p0 + 1 + h.shape[0]]
        tops += [seq.params.prompt_logprobs] * h.shape[0]
    dev = hidden.device
    target_t = torch.tensor(targets, dtype=torch.long, device=dev)
    top_n = max(tops)
    entries: list[dict[int, Logprob]] = []
    step = max(1, SLICE_BYTES // (4 * model.config.vocab_size))
    for r in range(0, hidden.shape[0], step):
        logits = model.compute_logits(hidden[r:r + step])  # [m, V] float32
        m = logits.shape[0]
        entries += _entries(torch.log_softmax(logits, -1), target_t[r:r + m], tops[r:r + m], top_n)
    k = 0
    for seq, _, h in items:
        lists[seq.request.request_id] += entries[k:k + h.shape[0]]
        k += h.shape[0]


def _entries(lp: torch.Tensor, target: torch.Tensor, tops: list[int], top_n: int) -> list[dict]:
    """lp [m, V] log-softmax rows, target [m] -> one {token id: Logprob} per row: the target first
    (with its rank), then the row's top-N others (the Sampler's layout for output tokens)."""
    t_lp = lp.gather(1, target[:, None]).squeeze(1)  # [m]
    rank = (lp > t_lp[:, None]).sum(-1) + 1
    if top_n:
        top_v, top_i = lp.topk(top_n, dim=-1)
        top_v, top_i = top_v.tolist(), top_i.tolist()
    out = []
    for j, (t, v, rk) in enumerate(zip(target.tolist(), t_lp.tolist(), rank.tolist())):
        d = {t: Logprob(v, rk)}
        for i in range(tops[j]):
            if top_i[j][i] != t:
                d[top_i[j][i]] = Logprob(top_v[j][i], i + 1)
        out.append(d)
    return out
