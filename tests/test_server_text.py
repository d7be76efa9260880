"""Stop strings over incremental detokenization (api/text_stream.py) on the tiny tokenizer."""

import pytest

from qwen3next.api.text_stream import TextStream
from qwen3next.tokenizer import get_tokenizer
from tests.helpers.tiny_tokenizer import write_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(path)
    return get_tokenizer(str(path))


def feed(tok, text, **kw):
    ts = TextStream(tok, **kw)
    out = "".join(ts.add([i]) for i in tok.encode(text))
    return out + ts.finish(), ts


def test_no_stop_round_trips(tok):
    text = "The quick brown fox 👨 jumps."
    out, ts = feed(tok, text, stop=None)
    assert out == text and ts.stopped is None


def test_stop_string_cut_across_tokens(tok):
    out, ts = feed(tok, "Hello, world! How are you today?", stop=["How are", "zzz"])
    assert out == "Hello, world! " and ts.stopped == "How are"
    out, ts = feed(tok, "Hello, world! How are you today?", stop=["How are"],
                   include_stop_str_in_output=True)
    assert out == "Hello, world! How are"


def test_held_back_tail_is_released_at_finish(tok):
    ts = TextStream(tok, stop=["fox jumps"])
    got = "".join(ts.add([i]) for i in tok.encode("the quick fox"))
    assert len(got) < len("the quick fox")  # something was held back ...
    assert got + ts.finish() == "the quick fox"  # ... and released at the end


def test_earliest_stop_wins(tok):
    out, ts = feed(tok, "one two three", stop=["three", "two"])
    assert out == "one " and ts.stopped == "two"
