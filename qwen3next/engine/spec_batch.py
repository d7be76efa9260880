"""Packing per-sequence token runs into one flat ForwardBatch: the one batch builder.

ModelRunner.build_batch packs each scheduled sequence's next tokens; the speculative step also
feeds tokens that are not (yet) part of a sequence: drafts behind the last token in the verify
forward, and the *next* tokens paired with each position in the MTP forwards. `pack` takes
(sequence, first position, tokens) runs and builds input ids, positions, cu_seqlens, context
lengths, state slots and the slot mapping on the host (one tensor, one copy to the device) and
gathers the block tables from the cache manager's per-slot table on the device.
"""

from __future__ import annotations

from array import array

import torch

from qwen3next.engine.cache import CacheManager
from qwen3next.engine.sequence import Sequence
from qwen3next.forward_batch import ForwardBatch


def pack(cache: CacheManager, device: torch.device, runs: list[tuple[Sequence, int, list[int]]],
         per_token_state_slots: list[int] | None = None):
    """runs: (seq, context = first position, tokens) -> (input_ids [T], positions [T], ForwardBatch).
    per_token_state_slots [T] (speculative verify), when given, travel in the same copy.

    Every position written must already have a block (CacheManager.grow)."""
    bs = cache.block_size
    ctx = [c for _, c, _ in runs]
    lens = [len(toks) for _, _, toks in runs]
    slots = [seq.slot for seq, _, _ in runs]
    max_blocks = max(1, max(len(seq.block_ids) for seq, _, _ in runs))
    B = len(runs)
    if all(n == 1 for n in lens):  # decode and draft steps: one token per sequence
        ids = [toks[0] for _, _, toks in runs]
        pos = ctx
        smap = [seq.block_ids[c // bs] * bs + c % bs for seq, c, _ in runs]
        cu = list(range(B + 1))
    else:
        ids, pos, smap, cu = [], [], [], [0]
        for seq, c, toks in runs:
            ids += toks
            end = c + len(toks)
            pos += range(c, end)
            p = c
            while p < end:  # one range of cache slots per block touched
                b, off = divmod(p, bs)
                stop = min(end, p - off + bs)
                first = seq.block_ids[b] * bs
                smap += range(first + off, first + off + stop - p)
                p = stop
            cu.append(end - c + cu[-1])
    T = len(ids)
    flat = ids + pos + smap + cu + ctx + slots
    if per_token_state_slots is not None:
        flat += per_token_state_slots
    # (3-4x faster than torch.tensor(list) for a few hundred ints)
    host = torch.frombuffer(array("q", flat), dtype=torch.long)
    if device.type != "cpu":
        host = host.to(device, non_blocking=True)
    # views into the one tensor: [ids T | positions T | slot mapping T | cu B+1 | ctx B | slots B | pts T]
    input_ids, positions, slot_mapping = host[:T], host[T:2 * T], host[2 * T:3 * T]
    o = 3 * T
    cu_t, ctx_t, slots_t = host[o:o + B + 1], host[o + B + 1:o + 2 * B + 1], host[o + 2 * B + 1:o + 3 * B + 1]
    tables = cache.block_tables[slots_t, :max_blocks]  # [B, max_blocks]
    batch = ForwardBatch(cu_seqlens=cu_t, seq_lens=lens, context_lens=ctx, cache=cache.cache,
                         block_tables=tables, slot_mapping=slot_mapping, state_slots=slots_t)
    batch.__dict__["context_lens_tensor"] = ctx_t  # the cached property, already on the device
    if per_token_state_slots is not None:
        batch.per_token_state_slots = host[o + 3 * B + 1:]
    return input_ids, positions, batch
