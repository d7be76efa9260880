"""Shared pytest fixtures. `tiny_ckpt`: one tiny random Qwen3-Next checkpoint (with MTP tensors
and the tiny tokenizer) per test session; treat it as read-only."""

import pytest


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from tests.helpers.checkpoints import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))
