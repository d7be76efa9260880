"""What generation returns (vLLM names): RequestOutput holding one CompletionOutput per sample.

`LLMEngine.step()` returns these *incrementally*: each CompletionOutput then carries only the
token ids (and logprobs) produced since the previous step and is listed only if it changed.
`LLM.generate` returns them whole, with `text` filled in. `prompt_logprobs` (asked with
SamplingParams.prompt_logprobs) is one entry per prompt token, the first None; the engine reports
it once, in the request's first output (the step that completes the prompt, vLLM's DELTA rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One entry of a per-token logprobs dict (token id -> Logprob)."""

    logprob: float
    rank: int  # 1 = most likely token under the model's raw distribution
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None  # one dict per generated token (None: not asked)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None (still running)
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache (vLLM's name)
