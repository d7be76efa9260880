"""Token ids -> text deltas of one choice, with stop strings applied (the engine knows ids only).

`TextStream.add(ids)` detokenizes incrementally and holds back the tail that could still become a
stop string; when one appears, the text is cut before it (or after it, with
`include_stop_str_in_output`) and `stopped` names it. The search runs after each token, so a step
that brought several (speculative decoding) ends, as one token per step would, at the token that
completes the stop string: `taken` says how many of the step's ids count. As in vLLM (PR 22014), a
stop string counts only where it ends after the text of the first `min_tokens` tokens.
`finish()` releases what was held back.
"""

from __future__ import annotations

from qwen3next.detokenizer import IncrementalDetokenizer


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None, skip_special_tokens: bool = True,
                 include_stop_str_in_output: bool = False, min_tokens: int = 0):
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self._stops = [s for s in (stop or []) if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._include = include_stop_str_in_output
        self._min_tokens = min_tokens
        self._generated = 0  # ids added (prefill not counted)
        self._check_from = 0  # text offset a stop string must end after (the first min_tokens' text)
        self._pending = ""  # decoded but not yet released (may be the start of a stop string)
        self.text = ""  # released text
        self.stopped: str | None = None  # the stop string that ended this choice
        self.taken = 0  # ids of the last add() that count: up to the one completing the stop string

    @property
    def token_ids(self) -> list[int]:
        return self._detok.token_ids

    def add(self, token_ids, prefill=()) -> str:
        """Feed new ids (after `prefill`: forced text that is not a generated token); return the
        newly released text ("" while held back or after a stop)."""
        self.taken = 0
        if self.stopped is not None:
            return ""
        if not self._stops:
            self._pending += self._detok.add_many(prefill) + self._detok.add_many(token_ids)
            self.taken = len(token_ids)
            return self._release(len(self._pending))
        for t in prefill:
            if (hit := self._step(t)) is not None:
                return hit
        for t in token_ids:
            self._generated += 1
            self.taken += 1
            if (hit := self._step(t)) is not None:
                return hit
        return self._release(max(0, len(self._pending) - self._hold))

    def _step(self, token_id: int) -> str | None:
        """Decode one id and search the stop strings that end in its text; -> the released text
        when one did (the rest is dropped)."""
        before = len(self._pending)
        self._pending += self._detok.add(token_id)
        base = len(self.text)  # absolute offset of _pending[0]
        if self._min_tokens and self._generated <= self._min_tokens:
            self._check_from = base + len(self._pending)
            return None
        after = max(before, self._check_from - base)
        hit = None
        for s in self._stops:
            i = self._pending.find(s, max(0, after - len(s) + 1))
            if i >= 0 and (hit is None or i < hit[0]):
                hit = (i, s)
        if hit is None:
            return None
        i, s = hit
        self.stopped = s
        return self._release(i + len(s) if self._include else i, drop_rest=True)

    def finish(self) -> str:
        """End of generation: release the held-back tail (and any incomplete bytes as U+FFFD)."""
        if self.stopped is not None:
            return ""
        self._pending += self._detok.flush()
        return self._release(len(self._pending))

    def _release(self, upto: int, drop_rest: bool = False) -> str:
        out, self._pending = self._pending[:upto], "" if drop_rest else self._pending[upto:]
        self.text += out
        return out
