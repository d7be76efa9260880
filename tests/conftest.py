"""Shared pytest fixtures and settings.

`tiny_ckpt`: one tiny random Qwen3-Next checkpoint (with MTP tensors and the tiny tokenizer) per
test session; treat it as read-only. `client`: an openai client on the module's `srv` (a
ServerHarness) with the scripted sampler reset, that checks afterwards that the request left no
cache blocks or state slots behind. Torch runs single-threaded in tests: the models are tiny and
on a shared 2-core machine intra-op threads cost ~10x in contention (QWEN3NEXT_TEST_THREADS overrides).
"""

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("QWEN3NEXT_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from tests.helpers.checkpoints import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))


@pytest.fixture
def client(srv):
    import openai

    srv.sampler.queue.clear()
    srv.sampler.sticky = None
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="EMPTY", max_retries=0)
    assert srv.wait_idle(), "a request left cache blocks or state slots behind"
