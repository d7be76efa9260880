"""The engine's cache memory: paged KV blocks for attention layers, state slots for DeltaNet.

One byte budget is split at start-up: `num_slots` state slots (conv + recurrent state per linear
layer, one per running sequence; the recurrent pool in `plan.state_dtype`, float32 unless
mamba_ssm_cache_dtype says otherwise) come first, then (prefix caching) `num_snapshot_slots`
more for state snapshots, the rest becomes KV blocks of `block_size` tokens. `CacheManager` hands
blocks and slots to sequences, keeps a persistent block table per slot (rows gathered per step,
never rebuilt), copies a sequence's cache for n > 1 forks, and frees everything when a sequence
finishes, is aborted or is preempted; with prefix caching (prefix_cache.py) freed hashed blocks
stay findable until evicted, and a hit shares blocks and restores a state snapshot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from qwen3next.engine.prefix_cache import PrefixCache
from qwen3next.forward_batch import ModelCache, StateSpec

logger = logging.getLogger("qwen3next.engine")


@dataclass(frozen=True)
class CachePlan:
    num_blocks: int
    block_size: int
    num_slots: int
    bytes_per_block: int  # all attention layers together
    bytes_per_slot: int  # all linear layers together
    num_snapshot_slots: int = 0  # prefix caching: state snapshots, after the num_slots slots
    # the recurrent state pool's dtype (travels with the plan to tensor-parallel workers)
    state_dtype: torch.dtype = torch.float32

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block + (self.num_slots + self.num_snapshot_slots) * self.bytes_per_slot


def bytes_per_block(spec: StateSpec, block_size: int, dtype: torch.dtype) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    return sum(2 * block_size * h * d * item for h, d in spec.kv_layers.values())


def bytes_per_slot(spec: StateSpec, dtype: torch.dtype, state_dtype: torch.dtype = torch.float32) -> int:
    """Conv states in the model dtype, recurrent states in `state_dtype`."""
    item = torch.empty((), dtype=dtype).element_size()
    state_item = torch.empty((), dtype=state_dtype).element_size()
    conv = sum(c * k * item for c, k in spec.conv_layers.values())
    rec = sum(h * dk * dv * state_item for h, dk, dv in spec.recurrent_layers.values())
    return conv + rec


def plan_cache(spec: StateSpec, dtype: torch.dtype, block_size: int, num_slots: int,
               budget_bytes: int, max_blocks: int | None = None, snapshot_fraction: float = 0.0,
               state_block: int = 0, state_dtype: torch.dtype = torch.float32) -> CachePlan:
    """Slots first, then snapshot slots (`snapshot_fraction` of the budget, at least one, at most
    one per `state_block` tokens of `max_blocks`), the rest of `budget_bytes` to KV blocks (at
    most `max_blocks`)."""
    per_block = bytes_per_block(spec, block_size, dtype)
    per_slot = bytes_per_slot(spec, dtype, state_dtype)
    snaps = 0
    if snapshot_fraction > 0:
        snaps = max(1, int(snapshot_fraction * budget_bytes) // max(1, per_slot))
        if max_blocks is not None:
            snaps = min(snaps, max(1, max_blocks * block_size // state_block))
    left = budget_bytes - (num_slots + snaps) * per_slot
    if per_block == 0:  # a model without attention layers still needs block bookkeeping
        num_blocks = max_blocks or 1
    else:
        num_blocks = left // per_block if left > 0 else 0
        if max_blocks is not None:
            num_blocks = min(num_blocks, max_blocks)
    if num_blocks < 1:
        need = (num_slots + snaps) * per_slot + per_block
        slots = f"{num_slots} state slots" + (f" + {snaps} prefix-caching snapshot slots" if snaps else "")
        raise ValueError(
            f"the cache budget of {budget_bytes} bytes (kv_cache_memory_bytes, or what "
            f"gpu_memory_utilization leaves) is too small: {slots} "
            f"({per_slot} bytes each) and one KV block ({per_block} bytes) need {need} bytes"
        )
    return CachePlan(int(num_blocks), block_size, num_slots, per_block, per_slot, snaps, state_dtype)


def allocate_cache(spec: StateSpec, plan: CachePlan, dtype: torch.dtype,
                   device: torch.device) -> ModelCache:
    cache = ModelCache(block_size=plan.block_size)
    for i, (h, d) in spec.kv_layers.items():
        cache.kv[i] = torch.zeros(plan.num_blocks, 2, plan.block_size, h, d, dtype=dtype, device=device)
    slots = plan.num_slots + plan.num_snapshot_slots
    for i, (c, k) in spec.conv_layers.items():
        cache.conv[i] = torch.zeros(slots, c, k, dtype=dtype, device=device)
    for i, shape in spec.recurrent_layers.items():
        cache.recurrent[i] = torch.zeros(slots, *shape, dtype=plan.state_dtype, device=device)
    return cache


class CacheManager:
    """Blocks (ref-counted, so forked sequences share their prompt) and slots for sequences."""

    def __init__(self, spec: StateSpec, plan: CachePlan, dtype: torch.dtype,
                 device: torch.device, max_model_len: int, num_scratch_slots: int = 0,
                 prefix_state_block: int = 0):
        """The last `num_scratch_slots` state slots are never handed to a sequence: speculative
        decoding keeps per-position DeltaNet states there (slots >= `scratch_base`).
        `prefix_state_block` > 0 turns prefix caching on (snapshots every that many tokens)."""
        self.plan = plan
        self.block_size = plan.block_size
        self.cache = allocate_cache(spec, plan, dtype, device)
        self.max_blocks_per_seq = -(-max_model_len // plan.block_size)
        # popping from the end hands out low ids first
        self._free_blocks = list(range(plan.num_blocks - 1, -1, -1))
        self._refs = [0] * plan.num_blocks
        self.scratch_base = plan.num_slots - num_scratch_slots
        self._free_slots = list(range(self.scratch_base - 1, -1, -1))
        # [sequence slots, max_blocks_per_seq]: row `slot` is the block table of the sequence in it
        self.block_tables = torch.zeros(self.scratch_base, self.max_blocks_per_seq,
                                        dtype=torch.long, device=device)
        self.prefix: PrefixCache | None = None
        # speculative decoding: a snapshot also keeps the trunk's last hidden row [H] (snap_hidden,
        # allocated on first use), and a hit copies its last block, whose last position's MTP KV
        # depends on the token after the boundary (set by SpecDecoder's owner, LLMEngine)
        self.mtp_prefix = False
        self.snap_hidden: torch.Tensor | None = None
        if prefix_state_block:
            self.prefix = PrefixCache(plan.block_size, prefix_state_block, plan.num_blocks,
                                      plan.num_slots, plan.num_snapshot_slots)

    # ---- accounting ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free ones and cached ones nobody uses (evicted then)."""
        return len(self._free_blocks) + (len(self.prefix.evictable) if self.prefix else 0)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_block(self) -> int:
        """A block for new tokens (ref 1): a free one, else the least recently freed cached one."""
        b = self._free_blocks.pop() if self._free_blocks else self.prefix.evict()
        self._refs[b] = 1
        return b

    # ---- per-sequence operations ------------------------------------------------------------
    def allocate_slot(self, seq) -> bool:
        if not self._free_slots:
            return False
        seq.slot = self._free_slots.pop()
        if seq.block_ids:
            self._write_table(seq, 0)
        return True

    def grow(self, seq, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more tokens after the computed ones; False if full."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            return False
        start = len(seq.block_ids)
        for _ in range(need):
            seq.block_ids.append(self._take_block())
        if seq.slot >= 0:
            self._write_table(seq, start)
        return True

    def free(self, seq) -> None:
        """Give back the sequence's blocks (shared ones when their last user goes) and slot.
        Cached blocks become evictable tail first, so a prefix outlives its continuations."""
        for b in reversed(seq.block_ids):
            self._refs[b] -= 1
            if self._refs[b] == 0 and not (self.prefix and self.prefix.release(b)):
                self._free_blocks.append(b)
        seq.block_ids = []
        seq.num_registered = 0
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            seq.slot = -1

    def fork(self, parent, child, copy_last: bool = False) -> bool:
        """Give `child` a copy of `parent`'s cache: shared full blocks, a copied partial last block
        (`copy_last`: the last block even when full) and a copied state slot. False (nothing
        taken) when no slot or block is free."""
        n = parent.num_computed_tokens
        partial = n % self.block_size != 0 or copy_last
        if not self._free_slots or (partial and not self.num_free_blocks):
            return False
        child.slot = self._free_slots.pop()
        # only the blocks holding computed tokens: speculative drafting may have reserved more
        blocks = parent.block_ids[:self.blocks_needed(n)]
        if partial:
            # the child will write its own tokens (MTP: its own last MTP KV) into the last block: copy it
            src, dst = blocks[-1], self._take_block()
            self._refs[dst] = 0
            self.copy_block(src, dst)
            blocks[-1] = dst
        for b in blocks:
            self._refs[b] += 1
        child.block_ids = blocks
        child.num_registered = min(parent.num_registered, n // self.block_size)
        for conv in self.cache.conv.values():
            conv[child.slot].copy_(conv[parent.slot])
        for rec in self.cache.recurrent.values():
            rec[child.slot].copy_(rec[parent.slot])
        child.num_computed_tokens = n
        self._write_table(child, 0)
        return True

    # ---- prefix caching (prefix_cache.py) -----------------------------------------------------
    def match_prefix(self, seq) -> tuple[int, list[int], int] | None:
        """The reusable prefix of a sequence with nothing computed (see PrefixCache.match)."""
        return self.prefix.match(seq) if self.prefix is not None else None

    def prefix_blocks_needed(self, hit: tuple[int, list[int], int], num_tokens: int) -> int:
        """Blocks a hit needs taken from the free ones to hold `num_tokens` tokens: new blocks,
        the cached ones nobody uses yet, and (MTP) the copy of its last block."""
        blocks = hit[1]
        unused = sum(1 for b in blocks if self._refs[b] == 0)
        new = max(0, self.blocks_needed(num_tokens) - len(blocks))
        if not self.mtp_prefix:
            return unused + new
        # the copy is taken while its source is held; a source nobody else uses is evictable again
        # right after (counting it twice refused a prompt that fills the whole cache forever)
        back = int(self._refs[blocks[-1]] == 0)
        return unused + max(1, new + 1 - back)

    def take_prefix(self, seq, hit: tuple[int, list[int], int]) -> None:
        """Share the hit's blocks with `seq` and mark its first `b` tokens computed; the state
        snapshot is copied into the sequence's slot by `restore_prefix` once it has one."""
        b, blocks, _ = hit
        for x in blocks:
            if self._refs[x] == 0:
                self.prefix.reuse(x)
            self._refs[x] += 1
        seq.block_ids = list(blocks)
        seq.num_registered = len(blocks)
        if self.mtp_prefix:
            # the MTP catch-up rewrites position b-1 (its next token is this sequence's own)
            src, dst = blocks[-1], self._take_block()
            self._refs[src] -= 1
            if self._refs[src] == 0:  # back among the evictable ones
                self.prefix.release(src)
            self.copy_block(src, dst)
            seq.block_ids[-1] = dst
            seq.num_registered -= 1
        seq.num_computed_tokens = b
        if seq.slot >= 0:
            self._write_table(seq, 0)

    def restore_prefix(self, seq, hit: tuple[int, list[int], int]) -> None:
        """Copy the hit's state snapshot into the sequence's slot; with MTP, the trunk's hidden row
        at b-1 becomes the sequence's deferred MTP catch-up (SpecDecoder.propose runs it)."""
        b, _, slot = hit
        self.copy_slots([slot], [seq.slot])
        if self.mtp_prefix:
            seq.mtp_pending = [self.snap_hidden[slot - self.plan.num_slots][None].clone()]
            seq.mtp_pending_start = b - 1

    def commit(self, seq, last_hidden: torch.Tensor | None = None) -> None:
        """After a step: cache the sequence's newly full blocks, and snapshot its DeltaNet state
        (and, MTP, `last_hidden` [H]: the trunk's row at its last computed position) when its
        computed tokens end at a boundary that has none. With MTP only blocks whose MTP KV is
        written (deferred catch-up) are cached."""
        upto = None
        if self.mtp_prefix and seq.mtp_pending:
            upto = seq.mtp_pending_start
        key = self.prefix.register(seq, upto)
        if key is None or (self.mtp_prefix and last_hidden is None):
            return
        slot = self.prefix.snapshot_slot(key)
        self.copy_slots([seq.slot], [slot])
        if self.mtp_prefix:
            if self.snap_hidden is None:
                self.snap_hidden = last_hidden.new_empty(self.plan.num_snapshot_slots, last_hidden.shape[-1])
            self.snap_hidden[slot - self.plan.num_slots] = last_hidden

    def copy_block(self, src: int, dst: int) -> None:
        """KV (every attention layer, MTP included) of block `src` into block `dst`."""
        for kv in self.cache.kv.values():
            kv[dst].copy_(kv[src])

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        """DeltaNet state (conv and recurrent, every layer) of slots `src` into slots `dst`."""
        s = torch.tensor(src, dtype=torch.long, device=self.block_tables.device)
        d = torch.tensor(dst, dtype=torch.long, device=self.block_tables.device)
        for t in (*self.cache.conv.values(), *self.cache.recurrent.values()):
            t[d] = t[s]

    def _write_table(self, seq, start: int) -> None:
        new = seq.block_ids[start:]
        if len(new) == 1:  # a decode crossing into a new block: no tensor to build
            self.block_tables[seq.slot, start] = new[0]
        else:
            self.block_tables[seq.slot, start:start + len(new)] = torch.tensor(new, dtype=torch.long)

    def log_plan(self, max_model_len: int) -> None:
        p = self.plan
        gib = 1 << 30
        logger.info(
            "cache: %d KV blocks x %d tokens = %d tokens (%.3f GiB) + %d state slots (%.3f MiB each, "
            "recurrent states in %s); %d sequences run at once, %.2f of them at max_model_len=%d",
            p.num_blocks, p.block_size, p.num_tokens, p.num_blocks * p.bytes_per_block / gib,
            p.num_slots, p.bytes_per_slot / (1 << 20), str(p.state_dtype).removeprefix("torch."), self.scratch_base,
            p.num_tokens / max_model_len, max_model_len,
        )
        if self.prefix is not None:
            logger.info("prefix caching: %d state snapshot slots (%.3f GiB), one per %d tokens",
                        p.num_snapshot_slots, p.num_snapshot_slots * p.bytes_per_slot / gib,
                        self.prefix.state_block)
