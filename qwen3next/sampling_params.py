"""SamplingParams: how one request is sampled and when it stops (vLLM names and semantics).

Fields a model's generation_config.json may supply (temperature, top_p, top_k, min_p,
repetition_penalty, max_tokens <- max_new_tokens) remember whether the caller set them:
`with_generation_config` fills only the unset ones (vLLM `--generation-config auto`).
`logit_bias` ({token id: bias}) is added to the raw logits before penalties, min_tokens,
temperature and truncation (vLLM V1's order), greedy rows included; logprobs stay the raw ones.
`prompt_logprobs` (N >= 0) asks for each prompt token's raw logprob plus the top-N at every
prompt position after the first (RequestOutput.prompt_logprobs, first entry None).
`structured_outputs` (StructuredOutputsParams, vLLM's name) constrains the output to a JSON schema,
any JSON object, a regex, a choice of strings or a Lark / GBNF grammar (engine/structured_output.py);
`start_after_token_id` leaves the output free until that token has been generated (`</think>`).
Every invalid value raises a one-line ValueError naming the field.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

# Below this a temperature means greedy (vLLM's _SAMPLING_EPS).
GREEDY_EPS = 1e-5


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()

# field -> (built-in default, generation_config.json key)
_GEN_DEFAULTS = {
    "temperature": (1.0, "temperature"),
    "top_p": (1.0, "top_p"),
    "top_k": (0, "top_k"),
    "min_p": (0.0, "min_p"),
    "repetition_penalty": (1.0, "repetition_penalty"),
    "max_tokens": (16, "max_new_tokens"),
}


@dataclass
class StructuredOutputsParams:
    """Exactly one of json (a JSON schema, dict or string), regex, choice, grammar, json_object."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark (llguidance dialect) or GBNF
    json_object: bool = False  # any JSON object
    disable_any_whitespace: bool = False  # JSON: no whitespace between tokens at all
    # the grammar applies from the token after the first generated one with this id (a Thinking
    # template's </think>); None: from the first output token
    start_after_token_id: int | None = None

    def __post_init__(self) -> None:
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object is True else []
        if len(kinds) != 1:
            raise ValueError("structured_outputs must set exactly one of json, regex, choice, grammar, "
                             f"json_object (got {', '.join(kinds) or 'none'})")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (dict or string), got {self.json!r}")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {v!r}")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                             f"got {self.choice!r}")
        t = self.start_after_token_id
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 0):
            raise ValueError(f"structured_outputs.start_after_token_id must be a token id, got {t!r}")

    @property
    def kind(self) -> str:
        """Which constraint this is: "json", "regex", "choice", "grammar" or "json_object"."""
        if self.json_object:
            return "json_object"
        return next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = UNSET
    top_p: float = UNSET
    top_k: int = UNSET  # 0 or -1: all tokens
    min_p: float = UNSET
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = UNSET
    max_tokens: int | None = UNSET  # None: up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # top-N per generated token (the chosen token is always added)
    prompt_logprobs: int | None = None  # top-N per prompt position (the prompt token always added)
    skip_special_tokens: bool = True
    # token id -> added to its raw logit (ids are checked against the vocabulary at add_request)
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    _unset: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unset = set()
        for name, (default, _) in _GEN_DEFAULTS.items():
            if getattr(self, name) is UNSET:
                unset.add(name)
                setattr(self, name, default)
        self._unset = frozenset(unset)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.logit_bias, dict):
            self.logit_bias = dict(self.logit_bias) or None
        self._validate()

    # ---- derived ------------------------------------------------------------------------------
    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def is_set(self, name: str) -> bool:
        """Whether the caller gave `name` explicitly (vs. the built-in default)."""
        return name not in self._unset

    def with_generation_config(self, gen: dict[str, Any] | None) -> "SamplingParams":
        """A copy whose unset fields take the model's generation_config values."""
        out = copy.copy(self)
        if not gen:
            return out
        unset = set(self._unset)
        for name, (_, key) in _GEN_DEFAULTS.items():
            if name in unset and gen.get(key) is not None:
                setattr(out, name, gen[key])
                unset.discard(name)
        if out.top_k == -1:
            out.top_k = 0
        out._unset = frozenset(unset)
        out._validate()
        return out

    # ---- validation ---------------------------------------------------------------------------
    def _validate(self) -> None:
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:  # NaN / inf pass every range check below, so refuse them here
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not is_num(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be -1, 0 (all tokens) or a positive integer, got {self.top_k!r}")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        # (torch.Generator.manual_seed's range; beyond it the first step failed with "Overflow ...")
        if self.seed is not None and (not is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        if self.logprobs is not None and (not is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs must be an integer >= 0 or None, got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (not is_int(self.prompt_logprobs) or self.prompt_logprobs < 0):
            raise ValueError(f"prompt_logprobs must be an integer >= 0 or None, got {self.prompt_logprobs!r}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                  StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, "
                             f"got {self.structured_outputs!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}")
            for t, b in self.logit_bias.items():
                if not is_int(t) or t < 0 or not is_num(b) or not math.isfinite(b):
                    raise ValueError(f"logit_bias must map token ids >= 0 to finite numbers, "
                                     f"got {t!r}: {b!r}")
