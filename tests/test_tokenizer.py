"""Tokenizer: the real Qwen3 vocab (built from qwen.tiktoken) against known ids and HF, the tiny test
tokenizer, loading paths (tokenizer.json, vocab.json + merges.txt), generation_config reading."""

import hashlib
import json
import os
import random
import unicodedata

import pytest

from qwen3next.chat_template import builtin_template
from qwen3next.tokenizer import QWEN3_ADDED_TOKENS, QWEN3_SPLIT_REGEX, Tokenizer, get_tokenizer, read_generation_config
from tests.helpers.qwen_vocab import qwen_tokenizer_dir
from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

MIXED_TEXT = (
    "Hello, world! 12345 3.14159 -42\n\tTabs  and   spaces\r\n"
    "中文测试，你好世界。日本語のテキスト。한국어 텍스트. Привет, мир! مرحبا بالعالم שלום עולם नमस्ते दुनिया สวัสดีชาวโลก\n"
    "def f(x):\n    return x ** 2  # comment\n"
    "emoji 👨‍👩‍👧 🎉🎉 👍🏽 ❤️\u00a0nbsp\u3000ideographic\u2028ls\u0085nel\ufeffbom\x0bvt\x0cff e\u0301 "
    "I'm you're they've we'll she'd IT'S\n\n\n"
    "<|im_start|>user\nhi<|im_end|> <think>x</think> <tool_call>{}</tool_call> <|endoftext|>"
)


@pytest.fixture(scope="module")
def qwen():
    path = qwen_tokenizer_dir()
    if path is None:
        pytest.skip("qwen-agent (qwen.tiktoken) not installed")
    return get_tokenizer(path)


@pytest.fixture(scope="module")
def hf_qwen():
    transformers = pytest.importorskip("transformers")
    path = qwen_tokenizer_dir()
    if path is None:
        pytest.skip("qwen-agent (qwen.tiktoken) not installed")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tok")
    write_tiny_tokenizer(path)
    return path


def test_templates_are_byte_exact():
    want = {
        "qwen3_next_thinking": (4049, "3802169b2a02b81e6adb7ab4f64f91ff02db753c8c3a64a01c35192d3a61d8d7"),
        "qwen3_next_instruct": (2630, "64f85b198065d0fba2a81f37e10ed68161ce2c19a754c7100e67e0ca2ee9c326"),
    }
    for name, (size, sha) in want.items():
        data = builtin_template(name).encode("utf-8")
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha)


def test_qwen_special_tokens(qwen):
    assert qwen.vocab_size == 151669
    assert qwen.convert_ids_to_tokens(list(range(151643, 151669))) == [c for c, _ in QWEN3_ADDED_TOKENS]
    assert qwen.eos_token_id == 151645 and qwen.pad_token_id == 151643 and qwen.bos_token_id is None
    assert qwen.all_special_ids == list(range(151643, 151657))
    # <think>/</think>/<tool_call> are added but not special: they survive skip_special_tokens
    for tok in ("<tool_call>", "</tool_call>", "<think>", "</think>"):
        assert qwen.token_to_id(tok) not in qwen.all_special_ids


def test_qwen_known_ids(qwen):
    assert qwen.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert qwen.encode("12345") == [16, 17, 18, 19, 20]
    prompt = qwen.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert prompt[-5:] == [151644, 77091, 198, 151667, 198]
    # Added tokens are recognised inside any text (split_special_tokens=false), no BOS is added
    assert qwen.encode("a<|im_start|>b") == [64, 151644, 65]


def test_qwen_decode(qwen):
    ids = qwen.encode("<think>\nhm\n</think>\n\nOK<|im_end|>")
    assert qwen.decode(ids) == "<think>\nhm\n</think>\n\nOK"
    assert qwen.decode(ids, skip_special_tokens=False).endswith("OK<|im_end|>")
    assert qwen.decode(qwen.encode("e\u0301")) == "\u00e9"  # NFC
    assert qwen.decode([9707, 151700, 151935]) == "Hello"  # embedding padding ids decode to nothing


def test_qwen_matches_hf(qwen, hf_qwen):
    texts = [MIXED_TEXT] + MIXED_TEXT.split(" ") + ["", " ", "\n\n", "  leading", "trailing  "]
    for text in texts:
        ids = qwen.encode(text)
        assert ids == hf_qwen.encode(text, add_special_tokens=False), repr(text)
        for skip in (True, False):
            assert qwen.decode(ids, skip) == hf_qwen.decode(ids, skip_special_tokens=skip), repr(text)


def test_qwen_matches_tiktoken_on_ranks(qwen):
    """Independent oracle for the derived merges: tiktoken BPE straight from qwen.tiktoken's ranks."""
    tiktoken = pytest.importorskip("tiktoken")
    from tests.helpers.qwen_vocab import load_ranks, tiktoken_path

    enc = tiktoken.Encoding(
        "qwen3", pat_str=QWEN3_SPLIT_REGEX, mergeable_ranks=load_ranks(tiktoken_path()),
        special_tokens={c: 151643 + i for i, (c, _) in enumerate(QWEN3_ADDED_TOKENS)},
    )  # fmt: skip
    rng = random.Random(0)
    pool = [*"aAzZ09 \n\t\r.,'!?-_<>|/", *"éüß中文日本語한국어Привет👍🏽👨‍👩‍\u00a0\u3000\u0301", "<think>", "<|im_end|>"]
    texts = [MIXED_TEXT] + ["".join(rng.choice(pool) for _ in range(rng.randrange(1, 40))) for _ in range(500)]
    for text in texts:
        want = enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        assert qwen.encode(text) == want, repr(text)


def test_tiny_tokenizer(tiny_dir, tmp_path):
    tok = get_tokenizer(tiny_dir)
    assert 400 <= tok.vocab_size <= 600
    base = tok.vocab_size - len(QWEN3_ADDED_TOKENS)
    assert tok.convert_ids_to_tokens(list(range(base, tok.vocab_size))) == [c for c, _ in QWEN3_ADDED_TOKENS]
    assert tok.eos_token_id == base + 2 and tok.pad_token_id == base
    assert all(tok.convert_ids_to_tokens(i) is not None for i in range(256))
    assert tok.encode("12345") == [tok.token_to_id(c) for c in "12345"]  # one digit per token
    text = "Hello, world! The assistant thinks: 你好 👍 e\u0301"
    assert tok.decode(tok.encode(text)) == text.replace("e\u0301", "\u00e9")
    # deterministic training: a second write gives the same files
    assert write_tiny_tokenizer(tmp_path) == tok.vocab_size
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes()
    assert read_generation_config(tiny_dir) == {
        "bos_token_id": base, "do_sample": True, "eos_token_id": [base + 2, base],
        "pad_token_id": base, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
    }  # fmt: skip


def test_tiny_tokenizer_loads_in_transformers(tiny_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    ours = get_tokenizer(tiny_dir)
    text = "Hello, world! 12345 <think>x</think><|im_end|>"
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    assert hf.eos_token_id == ours.eos_token_id


def test_vocab_merges_dir_matches_tokenizer_json(tiny_dir, tmp_path):
    ours = get_tokenizer(tiny_dir)
    ours.backend.model.save(str(tmp_path))  # writes vocab.json + merges.txt
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    other = get_tokenizer(tmp_path)
    assert other.vocab_size == ours.vocab_size
    text = "The quick brown fox, 2024! 你好 <|im_start|>user\nhi<|im_end|>"
    assert other.encode(text) == ours.encode(text)
    assert other.all_special_ids == ours.all_special_ids


def test_chat_template_jinja_file_overrides_config(tiny_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert get_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


def test_read_generation_config(tmp_path):
    assert read_generation_config(tmp_path) == {"eos_token_id": []}
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 7, "top_k": 20}')
    assert read_generation_config(tmp_path) == {"eos_token_id": [7], "top_k": 20}
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json"):
        read_generation_config(tmp_path)


def test_bad_input(tmp_path, tiny_dir):
    with pytest.raises(ValueError, match="not a directory"):
        get_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_dir(str(tmp_path))
    with pytest.raises(ValueError, match="encode"):
        get_tokenizer(tiny_dir).encode(None)
    import qwen3next

    assert qwen3next.get_tokenizer is get_tokenizer
