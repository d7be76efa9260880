"""Which sequences run in the next step, and how many of their tokens.

Each step packs, under `max_num_batched_tokens` tokens and `max_num_seqs` sequences, first the
running sequences (oldest first: decodes take 1 token, unfinished prompts a chunk of what is
left), then waiting ones (FIFO) as long as a state slot and KV blocks are free. When a running
sequence needs a block and none is free, the newest running sequence is preempted: its blocks and
slot are freed and it goes back to the front of the waiting queue to be recomputed later.
With prefix caching a sequence admitted with nothing computed starts after its longest cached
prefix (not for prompt-logprobs requests: every position must be computed, as vLLM), and prefill
chunks end at boundaries that still need a state snapshot (engine/prefix_cache.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qwen3next.engine.cache import CacheManager
from qwen3next.engine.sequence import Sequence, Status


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # per entry of seqs
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True):
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = Status.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        running, bs = self.running, self.cache.block_size
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            # a decode brings its drafts along (speculative decoding); the budget may cut them
            n = min(len(seq.token_ids) - seq.num_computed_tokens + len(seq.spec_token_ids), budget)
            # (prompt chunks only: a verify's drafts are not cut)
            if (self.cache.prefix is not None and self.enable_chunked_prefill
                    and len(seq.token_ids) - seq.num_computed_tokens > 1):
                n = self.cache.prefix.cut(seq, seq.num_computed_tokens, n)
            if seq.num_computed_tokens + n > len(seq.block_ids) * bs and not self._grow(seq, n, out):
                break  # `seq` preempted itself: it was the last one running
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n
            i += 1
        # vLLM's rule: nothing new is admitted in a step that had to preempt
        if not out.preempted:
            self._admit(out, budget)
        return out

    def _grow(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Blocks for `n` more tokens of a running sequence, preempting the newest running ones
        (never one scheduled earlier this step) while none is free; False if `seq` itself went."""
        while not self.cache.grow(seq, n):
            victim = self.running.pop()
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        waiting, cache, prefix = self.waiting, self.cache, self.cache.prefix
        while waiting and budget > 0 and len(self.running) < self.max_num_seqs and cache.num_free_slots:
            seq = waiting[0]
            hit = None
            if prefix is not None and seq.num_computed_tokens == 0 and seq.params.prompt_logprobs is None:
                hit = cache.match_prefix(seq)
            first = hit[0] if hit else seq.num_computed_tokens
            left = seq.num_tokens - first
            n = min(left, budget)
            if n < left and not self.enable_chunked_prefill:
                break
            if prefix is not None and self.enable_chunked_prefill:
                n = prefix.cut(seq, first, n)
            if hit:
                if cache.prefix_blocks_needed(hit, first + n) > cache.num_free_blocks:
                    break
                cache.take_prefix(seq, hit)
            if not cache.grow(seq, n):
                break
            waiting.popleft()
            cache.allocate_slot(seq)
            if hit:
                cache.restore_prefix(seq, hit)
            if prefix is not None:
                prefix.record(seq.num_tokens, first)
                if seq.index == 0 and seq.request.num_cached_tokens is None:
                    seq.request.num_cached_tokens = first
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.cache.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of whichever queue holds it (abort)."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)

    def drop_finished(self) -> None:
        self.running = [s for s in self.running if s.status is Status.RUNNING]
