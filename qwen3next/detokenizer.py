"""Incremental detokenization: token ids in one at a time, new text out, never half a character.

For a byte-level BPE, `decode(ids)` is "concatenate each token's bytes, then UTF-8 with
errors='replace'". So instead of re-decoding a window of ids each step (vLLM's prefix/read offsets),
we keep each token's bytes (`Tokenizer.token_bytes`) and push them through Python's incremental
UTF-8 decoder: it holds back an incomplete trailing sequence and replaces invalid bytes exactly as
a full decode does. O(1) per token; the concatenated deltas equal `decode(all ids)` after `flush()`.
"""

from __future__ import annotations

import codecs


class IncrementalDetokenizer:
    """Feed ids with `add` / `add_many`; `flush` at the end releases held-back bytes (as U+FFFD)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self._bytes = tokenizer.token_bytes
        self._skip = tokenizer.special_id_set if skip_special_tokens else frozenset()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.token_ids: list[int] = []
        self.text = ""  # everything emitted so far

    def add(self, token_id: int) -> str:
        """Append one id; return the text that became complete (may be "")."""
        token_id = int(token_id)
        self.token_ids.append(token_id)
        if token_id in self._skip or not 0 <= token_id < len(self._bytes):
            # Ids past the tokenizer (embedding padding rows) decode to nothing, as in `decode`
            return ""
        delta = self._decoder.decode(self._bytes[token_id])
        self.text += delta
        return delta

    def add_many(self, token_ids) -> str:
        return "".join([self.add(t) for t in token_ids])

    @property
    def pending(self) -> bool:
        """True while bytes of an incomplete character are held back."""
        return bool(self._decoder.getstate()[0])

    def flush(self) -> str:
        """End of stream: any incomplete trailing bytes become U+FFFD, as a full decode would do."""
        delta = self._decoder.decode(b"", final=True)
        self.text += delta
        return delta
