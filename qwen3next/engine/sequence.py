"""Requests and the sequences the scheduler moves around (token ids only).

A `Request` owns `n` `Sequence`s sharing one prompt. Only sequence 0 is scheduled until its
prompt is prefilled; the other n-1 wait (status FORK) and are sampled from the same logits at
that step, then take a copy of sequence 0's cache (see LLMEngine._fork). From then on every
sequence is scheduled, preempted and finished on its own.
"""

from __future__ import annotations

import enum

import torch

from qwen3next.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FORK = 2  # a child of an n > 1 request waiting for the prompt's prefill
    FINISHED = 3


class Request:
    __slots__ = ("request_id", "prompt_token_ids", "params", "seqs", "eos_ids", "stop_ids",
                 "max_len", "prompt_mask", "plain_greedy", "num_cached_tokens")

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_ids: frozenset[int], max_len: int):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.eos_ids = frozenset() if params.ignore_eos else eos_ids
        self.stop_ids = frozenset(params.stop_token_ids)
        # total tokens (prompt + generated) at which a sequence stops with "length"
        self.max_len = max_len
        self.seqs: list[Sequence] = []
        self.prompt_mask: torch.Tensor | None = None  # [V] bool, built by the sampler when needed
        # prompt tokens found in the prefix cache when sequence 0 was first admitted (None: not yet)
        self.num_cached_tokens: int | None = None
        # argmax of the raw logits is the whole sampling rule (the sampler's fast path)
        self.plain_greedy = (params.greedy and params.logprobs is None and params.min_tokens == 0
                             and params.repetition_penalty == 1.0 and not params.presence_penalty
                             and not params.frequency_penalty and not params.logit_bias)

    @property
    def finished(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.seqs)


class Sequence:
    __slots__ = ("seq_id", "request", "index", "token_ids", "num_prompt_tokens",
                 "num_computed_tokens", "status", "block_ids", "slot", "generator",
                 "logprobs", "cumulative_logprob", "num_reported", "finish_reason",
                 "stop_reason", "children", "output_counts", "num_counted", "spec_token_ids",
                 "spec_draft_probs", "mtp_pending", "mtp_pending_start", "block_hashes", "num_registered")

    def __init__(self, seq_id: int, request: Request, index: int, device: torch.device):
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.token_ids = list(request.prompt_token_ids)  # prompt + generated
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0  # tokens whose KV / state are in the cache
        self.status = Status.WAITING
        self.block_ids: list[int] = []
        self.slot = -1
        seed = request.params.seed
        self.generator = None
        if seed is not None:
            # vLLM's parallel sampling gives sample i the seed `seed + i`
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed + index)
        self.logprobs: list | None = [] if request.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.num_reported = 0  # generated tokens already returned by step()
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.children: list[Sequence] = []  # FORK siblings sampled with this one's prompt
        # penalties: [V] occurrences of each token among the first `num_counted` outputs
        self.output_counts: torch.Tensor | None = None
        self.num_counted = 0
        # speculative decoding: drafts to verify after the last token, and (sampling rows) the
        # distributions [k, V] they were drawn from
        self.spec_token_ids: list[int] = []
        self.spec_draft_probs: torch.Tensor | None = None
        # trunk hidden [n, H] chunks of positions mtp_pending_start.. whose MTP catch-up was
        # deferred (steps above disable_by_batch_size), run when drafting resumes
        self.mtp_pending: list[torch.Tensor] = []
        self.mtp_pending_start = 0
        # prefix caching: hash chain of the full blocks of token_ids (extended lazily), and how
        # many of the sequence's blocks were offered to the cache so far
        self.block_hashes: list[bytes] = []
        self.num_registered = 0

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def reset_for_recompute(self) -> None:
        """Preempted: the cache is gone; prompt + generated tokens are prefilled again later."""
        self.num_computed_tokens = 0
        self.status = Status.WAITING
        self.spec_token_ids, self.spec_draft_probs = [], None
        self.mtp_pending = []

    def __repr__(self) -> str:
        return (f"Sequence({self.request.request_id}#{self.index}, {self.status.name}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens})")
