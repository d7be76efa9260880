"""tool_choice "required" / named on a Thinking template: reason freely, then prefill the call.

Phase 1 runs the request with `</think>` as an extra stop token. Each sample that closes its think
block continues in a phase-2 request of its own whose prompt is prompt + that sample's tokens + the
start of a hermes call (`\\n\\n<tool_call>\\n{"name": "` [+ `N", "arguments": `]), so the model
only writes the rest of the call, under `grammar` (the tools' schemas, api/structured.forced_call)
when given. The caller sees one stream of per-sample `Step`s shaped like the
engine's CompletionOutputs; the prefill tokens come as `forced_ids` (text, but not completion
tokens). vLLM likewise constrains only what follows `</think>` (openai_api.md §4.3).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from qwen3next.outputs import RequestOutput


@dataclass
class Step:
    index: int
    token_ids: list[int]
    logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    forced_ids: list[int] = field(default_factory=list)  # prefill, detokenized before token_ids
    engine_index: int | None = None  # the sample's index inside its engine request, if different


def reason_then_call(engine, rid: str, ids: list[int], params, think_end: int,
                     prefix_ids: list[int], grammar=None) -> AsyncIterator[RequestOutput]:
    """Admit phase 1 now (a 503 surfaces before any byte is streamed); return the merged stream of
    RequestOutputs, one Step each, `request_id` = the engine request it came from."""
    p1 = copy.copy(params)
    p1.stop_token_ids = list(params.stop_token_ids) + [think_end]
    gen1 = engine.generate(rid, ids, p1)
    return _merged(engine, rid, ids, params, think_end, prefix_ids, gen1, grammar)


async def _merged(engine, rid, ids, params, think_end, prefix_ids, gen1, grammar) -> AsyncIterator[RequestOutput]:
    queue: asyncio.Queue = asyncio.Queue()
    generated: list[list[int]] = [[] for _ in range(params.n)]
    tasks: list[asyncio.Task] = []
    prompt_lps: list = []  # phase 1's prompt logprobs, handed on with the next step
    cached = [0]  # phase 1's prompt tokens found in the prefix cache (usage: the user's prompt's)

    async def put(request_id: str, step: Step) -> None:
        out = RequestOutput(request_id, None, ids, [step], num_cached_tokens=cached[0])
        if prompt_lps:
            out.prompt_logprobs = prompt_lps.pop()
        await queue.put(out)

    async def run(gen, on_output, phase1: bool = False) -> None:
        try:
            async for out in gen:
                if phase1:
                    cached[0] = out.num_cached_tokens
                if out.prompt_logprobs is not None:
                    prompt_lps.append(out.prompt_logprobs)
                for co in out.outputs:
                    await on_output(out.request_id, co)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put(e)
        finally:
            await gen.aclose()

    async def phase1_output(request_id: str, co) -> None:
        generated[co.index] += co.token_ids
        if co.finish_reason == "stop" and co.stop_reason == think_end:
            # the think block closed: keep the tag as text and go on to the call
            await put(request_id, Step(co.index, co.token_ids, co.logprobs))
            tasks.append(asyncio.ensure_future(phase2(co.index)))
        else:
            await put(request_id, Step(co.index, co.token_ids, co.logprobs, co.finish_reason, co.stop_reason))

    async def phase2(i: int) -> None:
        sub_id = f"{rid}-call{i}"
        budget = params.max_tokens - len(generated[i]) - len(prefix_ids)
        if budget < 1:
            await put(sub_id, Step(i, [], finish_reason="length"))
            return
        p2 = copy.copy(params)
        p2.n, p2.max_tokens, p2.min_tokens = 1, budget, 0
        p2.prompt_logprobs = None  # the request's prompt is phase 1's
        p2.structured_outputs = grammar
        if params.seed is not None:
            p2.seed = params.seed + i
        await put(sub_id, Step(i, [], forced_ids=list(prefix_ids)))

        async def forward(request_id: str, co) -> None:
            await put(request_id, Step(i, co.token_ids, co.logprobs, co.finish_reason, co.stop_reason,
                                       engine_index=co.index))

        # the sample's capacity was admitted in phase 1: no second admission check
        await run(engine.generate(sub_id, ids + generated[i] + prefix_ids, p2, reserved=True), forward)

    tasks.append(asyncio.ensure_future(run(gen1, phase1_output, phase1=True)))
    finished = 0
    try:
        while finished < params.n:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            finished += item.outputs[0].finish_reason is not None
            yield item
    finally:
        for t in tasks:
            t.cancel()
