"""Structured outputs: grammar-constrained decoding through llguidance (JSON schema, any JSON
object, regex, choice, Lark / GBNF grammar).

`grammar_of(so)` turns StructuredOutputsParams into an llguidance grammar and checks it (one-line
ValueError); the API process calls it to answer 400s before a request reaches the engine.
`StructuredOutputs` (one per engine) builds the tokenizer-side table once, on the first
constrained request (llguidance.LLTokenizer from the model's tokenizer.json, ~1 s for 150K
tokens), keeps one matcher per sequence, masks the logits rows of constrained sequences before
sampling and advances the matchers with the sampled tokens; under speculative decoding
`mask_verify` masks each verify position by the grammar after the drafts before it. Rows
without a grammar cost nothing.
llguidance is optional: without it a constrained request is a ValueError naming the package.
"""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
import torch

from qwen3next.sampling_params import SamplingParams, StructuredOutputsParams

log = logging.getLogger("qwen3next.structured_output")

# JSON whitespace between tokens, at most 24 characters in a row: any amount (vLLM's default) lets
# a looping or random model emit whitespace until max_tokens; 24 still allows indented JSON
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,24}"
INSTALL_HINT = "pip install llguidance, or the qwen3next[structured] extra"


def llguidance():
    """The llguidance module; ValueError (a client-facing 400) when it is not installed."""
    try:
        import llguidance as llg
    except ImportError:
        raise ValueError(f"structured outputs need the llguidance package ({INSTALL_HINT})") from None
    return llg


def available() -> bool:
    try:
        llguidance()
    except ValueError:
        return False
    return True


def grammar_of(so: StructuredOutputsParams) -> str:
    """The llguidance grammar (a string) of `so`; ValueError with the first line of the compiler's
    message when the schema / regex / grammar is invalid."""
    llg = llguidance()
    M = llg.LLMatcher
    ws = {"whitespace_flexible": False} if so.disable_any_whitespace else {"whitespace_pattern": JSON_WHITESPACE}
    kind = so.kind
    try:
        if kind == "json_object":
            grammar = M.grammar_from_json_schema({"type": "object"}, defaults=ws)
        elif kind == "json":
            schema = so.json
            if isinstance(schema, str):
                schema = json.loads(schema)
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema must be an object")
            grammar = M.grammar_from_json_schema(no_extra_properties(schema), defaults=ws)
        elif kind == "regex":
            grammar = M.grammar_from_regex(so.regex)
        elif kind == "choice":
            # Lark string literals take JSON escapes (llguidance's own grammar_from("choice") does this)
            grammar = M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in so.choice))
        else:  # Lark, or GBNF converted to Lark
            grammar = llg.grammar_from("grammar", so.grammar)
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"invalid {kind}: {_first_line(e)}") from None
    err = M.validate_grammar(grammar, None)
    if err:
        raise ValueError(f"invalid {kind}: {_first_line(err)}")
    return grammar


def no_extra_properties(schema):
    """A copy of the schema in which every object with properties but no additionalProperties
    gets additionalProperties false: vLLM's default backend (xgrammar, strict mode) reads schemas
    this way, and with extra keys allowed a model can wander off into free-text key names."""
    if isinstance(schema, list):
        return [no_extra_properties(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: no_extra_properties(v) for k, v in schema.items()}
    if ("properties" in out or "patternProperties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def set_bits(words: np.ndarray, ids: list[int], on: bool) -> None:
    """Set (on) or clear the bits of token `ids` in one row of packed int32 mask words."""
    if not ids:
        return
    t = np.asarray(ids, dtype=np.int64)
    u = words.view(np.uint32)
    b = (np.uint32(1) << (t & 31).astype(np.uint32))
    if on:
        np.bitwise_or.at(u, t >> 5, b)
    else:
        np.bitwise_and.at(u, t >> 5, ~b)


def unpack_bits_numpy(bits: np.ndarray, V: int) -> np.ndarray:
    """[R, W] int32 mask words -> [R, V] bool (token t = bit t % 32 of word t // 32)."""
    return np.unpackbits(bits.view(np.uint8), axis=1, count=V, bitorder="little").view(bool)


def unpack_bits(bits: torch.Tensor, V: int) -> torch.Tensor:
    """unpack_bits_numpy on any device: [R, W] int32 -> [R, V] bool."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    return ((bits[:, :, None] >> shifts) & 1).bool().reshape(bits.shape[0], -1)[:, :V]


def _first_line(msg) -> str:
    return str(msg).strip().splitlines()[0] if str(msg).strip() else type(msg).__name__


class _Row:
    """One constrained sequence: its matcher, and the token that must come before the grammar starts."""

    __slots__ = ("matcher", "waiting_for")

    def __init__(self, matcher, waiting_for: int | None):
        self.matcher = matcher
        self.waiting_for = waiting_for


class StructuredOutputs:
    def __init__(self, vocab_size: int, eos_token_ids: frozenset[int]):
        self.vocab_size = vocab_size  # logits columns (the embedding's rows)
        self.eos_token_ids = eos_token_ids
        self.tokenizer_dir: str | None = None  # set by LLMEngine.from_args (the model dir)
        self._tokenizer = None  # llguidance.LLTokenizer, built on first use
        self._executor = None  # llguidance.LLExecutor: computes a step's masks on its own threads
        self.rows: dict[int, _Row] = {}  # seq_id -> state, only for constrained sequences

    def tokenizer(self):
        if self._tokenizer is None:
            llg = llguidance()
            file = os.path.join(self.tokenizer_dir or "", "tokenizer.json")
            if self.tokenizer_dir is None or not os.path.isfile(file):
                raise ValueError("structured outputs need the model's tokenizer.json "
                                 f"(none in {self.tokenizer_dir!r})")
            with open(file, encoding="utf-8") as f:
                text = f.read()
            # n_vocab = the logits width: ids past the tokenizer's tokens are simply never allowed
            self._tokenizer = llg.LLTokenizer(text, n_vocab=self.vocab_size,
                                              eos_token=sorted(self.eos_token_ids) or None)
            self._executor = llg.LLExecutor()
        return self._tokenizer

    # ---- requests ---------------------------------------------------------------------------
    def add(self, seq_ids: list[int], params: SamplingParams) -> None:
        """A matcher for each sequence of a new constrained request (ValueError if the grammar is bad)."""
        so = params.structured_outputs
        llg = llguidance()
        try:  # offline callers see the field's name, as the server's 400 gives it
            grammar = grammar_of(so)
        except ValueError as e:
            raise ValueError(f"structured_outputs.{so.kind}: {e}") from None
        matcher = llg.LLMatcher(self.tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{so.kind}: invalid {so.kind}: {_first_line(matcher.get_error())}")
        for i, sid in enumerate(seq_ids):
            self.rows[sid] = _Row(matcher if i == 0 else matcher.deep_copy(), so.start_after_token_id)

    def free(self, seq_id: int) -> None:
        self.rows.pop(seq_id, None)

    # ---- per step ---------------------------------------------------------------------------
    def active_matcher(self, seq):
        """The sequence's matcher when its grammar applies now (None: unconstrained, or waiting)."""
        st = self.rows.get(seq.seq_id)
        return st.matcher if st is not None and st.waiting_for is None else None

    def mask(self, logits: torch.Tensor, rows: list) -> torch.Tensor:
        """logits [B, V] (row i samples rows[i]) -> a copy in which each constrained row allows
        only what its grammar allows next; EOS / stop tokens only where the grammar is complete.
        The same tensor when no row is constrained (or none has reached its grammar yet)."""
        picked = [(i, seq, m) for i, seq in enumerate(rows) if (m := self.active_matcher(seq)) is not None]
        if not picked:
            return logits
        return self._apply(logits, [i for i, _, _ in picked], self._bits([(s, m) for _, s, m in picked]))

    def mask_verify(self, logits: torch.Tensor, seqs: list, drafts: list[list[int]], starts: list[int]) -> torch.Tensor:
        """logits [T, V] of a speculative verify: sequence r's positions start at row starts[r], one
        per draft plus one. A copy in which position j of a constrained sequence allows what its
        grammar allows after drafts d_1..d_j (a sequence waiting for its start token: positions
        after the draft that is that token, from the grammar's start); a position after an invalid
        draft, or after the draft that completes the grammar, stays unmasked (it is never
        accepted). Matchers end where they began (rolled back)."""
        rows = []  # (seq, matcher, row of its first masked position, drafts from there)
        for r, s in enumerate(seqs):
            st = self.rows.get(s.seq_id)
            if st is None:
                continue
            d, e = drafts[r], 0
            if st.waiting_for is not None:
                if st.waiting_for not in d:
                    continue
                e = d.index(st.waiting_for) + 1
            rows.append((s, st.matcher, starts[r] + e, d[e:]))
        if not rows:
            return logits
        took = [0] * len(rows)  # drafts each matcher consumed, rolled back at the end
        idx, blocks = [], []
        live, j = list(range(len(rows))), 0
        while live:
            blocks.append(self._bits([rows[i][:2] for i in live]))  # masks at depth j
            idx += [rows[i][2] + j for i in live]
            nxt = []
            for i in live:
                _, m, _, d = rows[i]
                # (try_consume_tokens: an invalid draft leaves the matcher as it was, not in error)
                if j < len(d) and m.try_consume_tokens([d[j]]) == 1:
                    took[i] += 1
                    if not m.is_stopped():
                        nxt.append(i)
            live, j = nxt, j + 1
        for (_, m, _, _), n in zip(rows, took):
            if n:
                m.rollback(n)
        return self._apply(logits, idx, np.concatenate(blocks))

    def _bits(self, items: list) -> np.ndarray:
        """[(seq, matcher)] (distinct matchers) -> [R, W] int32 mask words of their current states:
        bit t % 32 of word t // 32 set when token t is allowed."""
        R, W = len(items), (self.vocab_size + 31) // 32
        bits = np.empty((R, W), dtype=np.int32)
        self._executor.unsafe_compute_mask_ptr([(m, j) for j, (_, m) in enumerate(items)],
                                               bits.ctypes.data, W * 4, R)
        eos_all = list(self.eos_token_ids)
        for j, (seq, m) in enumerate(items):
            req = seq.request
            # EOS: the request's own, only once the grammar accepts; stop tokens then too
            set_bits(bits[j], eos_all, False)
            if m.is_accepting():
                set_bits(bits[j], list(req.eos_ids | req.stop_ids), True)
            if not bits[j].any():  # (the matcher broke: let the row end rather than sample from nothing)
                log.warning("structured output: no token allowed for %s (%s)", seq, m.get_error())
                set_bits(bits[j], eos_all, True)
        return bits

    def _apply(self, logits: torch.Tensor, idx: list[int], bits: np.ndarray) -> torch.Tensor:
        """A copy of logits [B, V] with rows idx (distinct) masked by bits [len(idx), W]."""
        B, V = logits.shape
        if logits.device.type == "cpu":
            keep = torch.from_numpy(unpack_bits_numpy(bits, V))  # [R, V]
        else:  # (the packed words cross to the device: 1/8 of the bytes)
            keep = unpack_bits(torch.from_numpy(bits).to(logits.device), V)
        # (torch.where: 2-3x faster than masked_fill on CPU; a new tensor, the raw logits stay
        # intact for logprobs)
        if idx == list(range(B)):
            return torch.where(keep, logits, -math.inf)
        t = torch.tensor(idx, device=logits.device)
        out = logits.clone()
        out[t] = torch.where(keep, logits[t], -math.inf)
        return out

    def advance(self, seq, tok: int) -> bool:
        """Feed the sampled token to the sequence's matcher; True when the sequence must stop now
        (the grammar is complete and allows nothing more, or the token broke it)."""
        st = self.rows.get(seq.seq_id)
        if st is None:
            return False
        if st.waiting_for is not None:
            if tok == st.waiting_for:
                st.waiting_for = None  # the grammar starts with the next token
            return False
        if not st.matcher.consume_token(tok):
            log.warning("structured output: token %d rejected for %s (%s)", tok, seq, st.matcher.get_error())
            return True
        return st.matcher.is_stopped()
