"""AsyncEngine (engine thread <-> asyncio) against a stand-in engine (TESTS ONLY): admission bound,
abort when the consumer leaves early, and a dying engine failing every open request."""

import asyncio
import gc
import time

import pytest

from qwen3next.api.async_engine import AsyncEngine, EngineDeadError
from qwen3next.api.errors import APIError
from qwen3next.outputs import CompletionOutput, RequestOutput
from qwen3next.sampling_params import SamplingParams


class CountingEngine:
    """Emits one token per step for every request until max_tokens; `explode` makes step() raise."""

    def __init__(self):
        self.requests: dict[str, list] = {}
        self.aborted: list[str] = []
        self.explode = False

    def add_request(self, rid, ids, params):
        if rid == "bad":
            raise ValueError("prompt_token_ids must not be empty")
        self.requests[rid] = [0, params.max_tokens]

    def abort_request(self, rid):
        self.aborted.append(rid)
        self.requests.pop(rid, None)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        time.sleep(0.001)  # a step takes time, so long requests are still running when closed
        if self.explode:
            raise RuntimeError("boom")
        outs = []
        for rid, st in list(self.requests.items()):
            st[0] += 1
            done = st[0] >= st[1]
            outs.append(RequestOutput(rid, None, [1], [CompletionOutput(0, "", [7], None, None,
                                                                        "length" if done else None)], done))
            if done:
                del self.requests[rid]
        return outs

    @property
    def stats(self):
        return {"num_requests_running": len(self.requests), "num_requests_waiting": 0, "kv_blocks_total": 1,
                "kv_blocks_used": 0, "state_slots_total": 1, "state_slots_used": 0}


@pytest.fixture
def engine():
    fake = CountingEngine()
    ae = AsyncEngine(fake, max_running=1, max_waiting=1)
    ae.start()
    yield fake, ae
    ae.shutdown()


def test_stream_admission_and_early_exit(engine):
    fake, ae = engine

    async def run():
        outs = [o async for o in ae.generate("a", [1], SamplingParams(max_tokens=3))]
        assert [o.finished for o in outs] == [False, False, True]
        g1 = ae.generate("b", [1], SamplingParams(max_tokens=10**6))
        g2 = ae.generate("c", [1], SamplingParams(max_tokens=10**6))
        with pytest.raises(APIError) as e:  # capacity 2 sequences
            ae.generate("d", [1], SamplingParams(max_tokens=1))
        assert e.value.status == 503 and e.value.headers["Retry-After"] == "1"
        await g1.__anext__()
        await g1.aclose()  # consumer leaves -> abort
        await g2.aclose()  # never started: only its admission is given back
        await settle()
        with pytest.raises(APIError) as e:
            async for _ in ae.generate("bad", [1], SamplingParams()):
                pass
        assert e.value.status == 400
        g3 = ae.generate("e", [1], SamplingParams(max_tokens=10**6))
        await g3.__anext__()
        del g3  # dropped without closing: collected -> aborted
        gc.collect()
        await settle()

    async def settle():
        for _ in range(200):
            if ae.num_live_requests == 0 and not fake.requests:
                return
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert fake.aborted == ["b", "c", "e"] and ae.num_live_requests == 0 and not fake.requests


def test_dead_engine_fails_open_requests(engine):
    fake, ae = engine

    async def run():
        g = ae.generate("x", [1], SamplingParams(max_tokens=10**6))
        await g.__anext__()
        fake.explode = True
        with pytest.raises(EngineDeadError):
            async for _ in g:
                pass
        with pytest.raises(APIError) as e:
            ae.generate("y", [1], SamplingParams())
        assert e.value.status == 503

    asyncio.run(run())
    assert ae.dead is not None
