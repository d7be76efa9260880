"""Automatic prefix caching for the hybrid model (vLLM's `enable_prefix_caching`, "align" mode).

KV blocks: every full block of `block_size` computed tokens gets a chained hash
`sha256(parent digest + its token ids)` (positions are implied by the chain; nothing else changes
the KV today). A hashed block stays findable after its last user frees it: it sits in an LRU of
evictable blocks that allocation takes from (oldest first; a freed sequence's tail before its
head) once the plain free list is empty. The digest is cryptographic because Python's own hash of
ints is forgeable (an int hashes to itself mod 2**61 - 1): a crafted prompt could otherwise
collide with another user's block and read or poison its KV (vLLM's CVE-2025-25183).

DeltaNet layers cannot resume from KV: a prefix is reusable only up to a *boundary* (a multiple of
`state_block` tokens, itself a multiple of block_size) where a snapshot of the conv + recurrent
state exists. Snapshots live in extra state slots after the sequence and scratch slots (their
number is planned from the memory budget, CachePlan.num_snapshot_slots), keyed by the hash of the
block that ends at the boundary, LRU-evicted; evicting that KV block drops its snapshot too.
Snapshots are taken after a step at every boundary a sequence's computed tokens reach and that has
none yet: the scheduler ends prefill chunks there (`cut`), decode passes each boundary by itself,
so a finished request leaves the state at the last boundary of its prompt + output behind (each
earlier snapshot taken while decoding is moved to the front of the LRU when the next is taken).
(Without chunked prefill no chunk is cut: a prompt then leaves only the snapshot at its own end,
when that is a boundary, and those its decode passes.)

A hit (`match`, at admission of a sequence with nothing computed) is the largest boundary
b <= num_tokens - 1 (the last prompt token is always recomputed: its logits are needed) with
all KV blocks before b cached and a snapshot at b: the sequence shares those blocks, gets the
snapshot copied into its own slot and starts prefill at b.

MTP speculative decoding (CacheManager.mtp_prefix): the MTP layer's KV at position t depends on
token t+1, so (1) blocks are cached only once the MTP catch-up covered them (not while it is
deferred), (2) a snapshot also keeps the trunk's hidden row at b-1, and (3) a hit copies its last
block and queues that row as the sequence's deferred catch-up, so position b-1's MTP KV is
rewritten with this sequence's own token b. (A verify step that jumps over a boundary leaves
no snapshot there: verify rows are not cut.) Snapshot and restore are plain index copies
(CacheManager.copy_slots: CPU or CUDA, outside any graph; replayed by tensor-parallel workers).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

# the parent digest of a sequence's first block
_ROOT = b"qwen3next-prefix-cache-v1"


class PrefixCache:
    """Hash -> block / snapshot bookkeeping; CacheManager owns the tensors and the copies."""

    def __init__(self, block_size: int, state_block: int, num_blocks: int, snap_base: int, num_snaps: int):
        self.block_size = block_size
        self.state_block = state_block
        self.block_of: dict[bytes, int] = {}  # block hash -> block id
        self.hash_of: list[bytes | None] = [None] * num_blocks  # block id -> its hash (None: not cached)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses, LRU first
        self.snapshots: OrderedDict[bytes, int] = OrderedDict()  # boundary block hash -> slot, LRU first
        self.free_snaps = list(range(snap_base + num_snaps - 1, snap_base - 1, -1))
        self.num_snaps = num_snaps
        # counters (tokens): asked for at admission, found
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.evicted_blocks = 0

    # ---- hashes ---------------------------------------------------------------------------------
    def hashes(self, seq, num_blocks: int) -> list[bytes]:
        """The sequence's block hash chain, extended to its first `num_blocks` full blocks."""
        h, bs, toks = seq.block_hashes, self.block_size, seq.token_ids
        parent = h[-1] if h else _ROOT
        for i in range(len(h), min(num_blocks, len(toks) // bs)):
            parent = hashlib.sha256(parent + array("q", toks[i * bs:(i + 1) * bs]).tobytes()).digest()
            h.append(parent)
        return h

    def _boundary_hash(self, seq, b: int) -> bytes:
        return self.hashes(seq, b // self.block_size)[b // self.block_size - 1]

    # ---- lookups ------------------------------------------------------------------------------
    def match(self, seq) -> tuple[int, list[int], int] | None:
        """(boundary b, the b // block_size cached blocks before it, the snapshot slot) of the
        longest reusable prefix of `seq` (nothing computed yet), or None."""
        bs, sb = self.block_size, self.state_block
        limit = seq.num_tokens - 1  # at least the last token is computed again
        h = self.hashes(seq, limit // bs)
        m = 0
        while m < limit // bs and h[m] in self.block_of:
            m += 1
        b = m * bs // sb * sb
        while b > 0:
            slot = self.snapshots.get(h[b // bs - 1])
            if slot is not None:
                self.snapshots.move_to_end(h[b // bs - 1])
                return b, [self.block_of[x] for x in h[:b // bs]], slot
            b -= sb
        return None

    def record(self, num_tokens: int, num_hit: int) -> None:
        """An admitted sequence looked up `num_tokens` tokens and reuses `num_hit` of them."""
        self.queried_tokens += num_tokens
        self.hit_tokens += num_hit

    def cut(self, seq, first: int, n: int) -> int:
        """Tokens of a chunk first..first+n-1 to run so that it ends at the first boundary inside
        it that has no snapshot yet (n when there is none)."""
        sb = self.state_block
        b = (first // sb + 1) * sb
        while b < first + n:
            if self._boundary_hash(seq, b) not in self.snapshots:
                return b - first
            b += sb
        return n

    # ---- after a step -------------------------------------------------------------------------
    def register(self, seq, upto: int | None = None) -> int | None:
        """Hash the sequence's newly full blocks among its first `upto` tokens (default: the
        computed ones); -> the boundary hash that wants a snapshot of the sequence's state now
        (None: not at a boundary, or one exists)."""
        c, bs = seq.num_computed_tokens, self.block_size
        full = c // bs
        if full <= seq.num_registered:
            return None
        h = self.hashes(seq, full)
        done = full if upto is None else min(full, upto // bs)
        for i in range(seq.num_registered, done):
            b = seq.block_ids[i]
            # a block another sequence computed first keeps that hash; this one stays uncached
            if h[i] not in self.block_of and self.hash_of[b] is None:
                self.block_of[h[i]] = b
                self.hash_of[b] = h[i]
        seq.num_registered = max(seq.num_registered, done)
        if c % self.state_block or not self.num_snaps or h[full - 1] in self.snapshots:
            return None
        prev = c - self.state_block
        if prev > seq.num_prompt_tokens:
            # the previous boundary was passed while decoding: only a turn's last one is likely
            # to be asked for again, so that one goes first when a slot is needed
            key = h[prev // bs - 1]
            if key in self.snapshots:
                self.snapshots.move_to_end(key, last=False)
        return h[full - 1]

    def snapshot_slot(self, key: int) -> int:
        """A slot for a new snapshot under `key` (a free one, else the least recently used)."""
        if self.free_snaps:
            slot = self.free_snaps.pop()
        else:
            _, slot = self.snapshots.popitem(last=False)
        self.snapshots[key] = slot
        return slot

    # ---- blocks -------------------------------------------------------------------------------
    def release(self, block: int) -> bool:
        """A block's last user left: True if it stays cached (evictable), False if plain free."""
        if self.hash_of[block] is None:
            return False
        self.evictable[block] = None
        return True

    def reuse(self, block: int) -> None:
        """A cached block gets a user again: no longer evictable."""
        self.evictable.pop(block, None)

    def evict(self) -> int:
        """The least recently freed cached block, forgotten (with the snapshot ending at it)."""
        block, _ = self.evictable.popitem(last=False)
        self.evicted_blocks += 1
        h = self.hash_of[block]
        self.hash_of[block] = None
        del self.block_of[h]
        slot = self.snapshots.pop(h, None)
        if slot is not None:
            self.free_snaps.append(slot)
        return block

    def as_dict(self) -> dict:
        q = self.queried_tokens
        return {"queried_tokens": q, "hit_tokens": self.hit_tokens,
                "hit_rate": self.hit_tokens / q if q else 0.0,
                "cached_blocks": len(self.block_of), "evicted_blocks": self.evicted_blocks,
                "snapshots": len(self.snapshots),
                "snapshot_slots": self.num_snaps}
