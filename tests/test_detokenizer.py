"""Incremental detokenizer: streamed text equals a full decode, no U+FFFD while a character is split
across tokens (emoji, CJK), special tokens skipped or kept, garbage and padding ids like `decode`."""

import random
import time

import pytest

from qwen3next.detokenizer import IncrementalDetokenizer
from qwen3next.tokenizer import get_tokenizer
from tests.helpers.qwen_vocab import qwen_tokenizer_dir
from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

TEXTS = [
    "Family: 👨‍👩‍👧‍👦, party 🎉🎉🎉, thumbs 👍🏽, flag 🇫🇷, heart ❤️.",
    "中文分词测试：你好，世界！日本語のテキストも。한국어 문장입니다. 𠜎𠜱𠝹 (CJK ext B)",
    "<think>\nLet me think… 数学 ∑x² ≈ 3.14\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "mixed Привет مرحبا 👋 नमस्ते<|im_end|><|endoftext|>",
]


@pytest.fixture(scope="module")
def qwen():
    path = qwen_tokenizer_dir()
    if path is None:
        pytest.skip("qwen-agent (qwen.tiktoken) not installed")
    return get_tokenizer(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tok")
    write_tiny_tokenizer(path)
    return get_tokenizer(path)


def _stream(tok, ids, skip=True):
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.flush(), detok


@pytest.mark.parametrize("which", ["qwen", "tiny"])
def test_stream_equals_full_decode(request, which):
    tok = request.getfixturevalue(which)
    split_somewhere = False
    for text in TEXTS:
        ids = tok.encode(text)
        for skip in (True, False):
            deltas, tail, detok = _stream(tok, ids, skip)
            assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip) == detok.text
            assert tail == "" and not any("\ufffd" in d for d in deltas)
            split_somewhere |= "" in deltas
    # the texts do split characters across tokens (else this test would prove nothing)
    assert split_somewhere


def test_split_emoji_is_held_back(qwen):
    ids = qwen.encode(" 👨")
    assert len(ids) == 2  # b' \xf0\x9f\x91' + b'\xa8' (chat_format.md §7)
    detok = IncrementalDetokenizer(qwen)
    assert detok.add(ids[0]) == " " and detok.pending
    assert detok.add(ids[1]) == "👨" and not detok.pending


def test_special_tokens(qwen):
    ids = qwen.encode("<|im_start|>assistant\n<think>\nhi</think><|im_end|>")
    assert "".join(_stream(qwen, ids)[0]) == "assistant\n<think>\nhi</think>"
    assert "".join(_stream(qwen, ids, skip=False)[0]) == "<|im_start|>assistant\n<think>\nhi</think><|im_end|>"


def test_random_ids_match_decode(qwen):
    # Random byte tokens make invalid UTF-8: replacement chars must match the full decode exactly,
    # including embedding padding ids (>= 151669) that decode to nothing.
    rng = random.Random(0)
    byte_ids = list(range(256))
    for _ in range(300):
        n = rng.randrange(1, 25)
        ids = [rng.choice(byte_ids) if rng.random() < 0.6 else rng.randrange(151936) for _ in range(n)]
        deltas, tail, _ = _stream(qwen, ids)
        assert "".join(deltas) + tail == qwen.decode(ids), ids


def test_truncated_character_flushes_as_replacement(qwen):
    ids = qwen.encode(" 👨")[:1]
    deltas, tail, detok = _stream(qwen, ids)
    assert deltas == [" "] and tail == "\ufffd" == qwen.decode(ids)[1:]


def test_cost_is_per_token(qwen):
    ids = qwen.encode("某些文本 with emoji 🎉 " * 4000)  # ~40k tokens
    detok = IncrementalDetokenizer(qwen)
    t0 = time.perf_counter()
    detok.add_many(ids)
    # O(1) per token: re-decoding the whole sequence each step would take minutes here
    assert time.perf_counter() - t0 < 2.0
    assert detok.text == qwen.decode(ids)
