"""Packing per-sequence token runs into one flat ForwardBatch: the one batch builder.

ModelRunner.build_batch packs each scheduled sequence's next tokens; the speculative step also
feeds tokens that are not (yet) part of a sequence: drafts behind the last token in the verify
forward, and the *next* tokens paired with each position in the MTP forwards. `pack` takes
(sequence, first position, tokens) runs and builds input ids, positions, cu_seqlens, context
lengths, state slots, block tables (from the cache manager's per-slot table) and the slot mapping
(on the device).
"""

from __future__ import annotations

import torch

from qwen3next.engine.cache import CacheManager
from qwen3next.engine.sequence import Sequence
from qwen3next.forward_batch import ForwardBatch


def pack(cache: CacheManager, device: torch.device, runs: list[tuple[Sequence, int, list[int]]]):
    """runs: (seq, context = first position, tokens) -> (input_ids [T], positions [T], ForwardBatch).

    Every position written must already have a block (CacheManager.grow)."""
    ids: list[int] = []
    pos: list[int] = []
    ctx: list[int] = []
    lens: list[int] = []
    slots: list[int] = []
    max_blocks = 1
    for seq, c, toks in runs:
        ids += toks
        pos += range(c, c + len(toks))
        ctx.append(c)
        lens.append(len(toks))
        slots.append(seq.slot)
        max_blocks = max(max_blocks, len(seq.block_ids))
    host = torch.tensor([ids, pos], dtype=torch.long)
    meta = torch.tensor(lens + slots, dtype=torch.long)
    if device.type != "cpu":
        host, meta = host.to(device, non_blocking=True), meta.to(device, non_blocking=True)
    input_ids, positions = host[0], host[1]
    B = len(lens)
    seq_lens_t, slots_t = meta[:B], meta[B:]
    cu = torch.zeros(B + 1, dtype=torch.long, device=device)
    torch.cumsum(seq_lens_t, 0, out=cu[1:])
    tables = cache.block_tables[slots_t, :max_blocks]  # [B, max_blocks]
    row_of_tok = torch.repeat_interleave(torch.arange(B, device=device), seq_lens_t, output_size=len(ids))
    blk = tables[row_of_tok, positions // cache.block_size]
    slot_mapping = blk * cache.block_size + positions % cache.block_size
    batch = ForwardBatch(cu_seqlens=cu, seq_lens=lens, context_lens=ctx, cache=cache.cache,
                         block_tables=tables, slot_mapping=slot_mapping, state_slots=slots_t)
    return input_ids, positions, batch
