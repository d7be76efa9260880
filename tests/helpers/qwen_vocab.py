"""The real Qwen3 tokenizer, built offline from the `qwen.tiktoken` ranks shipped in qwen-agent.

The ranks are the ids; merges are derived from them (chat_format.md §7): BPE each multi-byte token
with only lower-ranked merges, which must leave exactly two parts. `qwen_tokenizer_dir()` builds
tokenizer.json + tokenizer_config.json (official Thinking template) + generation_config.json once
per process in a temp dir (~2 s) and returns it; None when qwen-agent is not installed.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import tempfile

from tokenizers import Tokenizer, models

from qwen3next.chat_template import builtin_template
from qwen3next.tokenizer import BYTES_TO_UNICODE, QWEN3_ADDED_TOKENS, added_token, set_qwen3_pipeline

QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
QWEN_NUM_REGULAR = 151643

_built_dir: str | None = None


def tiktoken_path() -> str | None:
    spec = importlib.util.find_spec("qwen_agent")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "utils", "qwen.tiktoken")
    return path if os.path.isfile(path) else None


def load_ranks(path: str) -> dict[bytes, int]:
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != QWEN_TIKTOKEN_SHA256:
        raise ValueError(f"{path}: sha256 differs from the verified qwen.tiktoken")
    ranks = {}
    for line in data.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _split_by_lower_merges(token: bytes, ranks: dict[bytes, int], limit: int) -> list[bytes]:
    # Plain BPE on `token` alone, allowing only merges whose result ranks below `limit`
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = -1, limit
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], limit)
            if r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _split_by_lower_merges(token, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"rank {rank}: token {token!r} does not split into one merge ({len(parts)} parts)")
        merges.append((parts[0], parts[1]))
    return merges


def build_qwen_tokenizer(ranks: dict[bytes, int]) -> Tokenizer:
    def to_str(b: bytes) -> str:
        return "".join(BYTES_TO_UNICODE[x] for x in b)

    vocab = {to_str(t): r for t, r in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in derive_merges(ranks)]
    tok = set_qwen3_pipeline(Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False)))
    for content, special in QWEN3_ADDED_TOKENS:
        tok.add_tokens([added_token(content, special)])
    return tok


def write_qwen_tokenizer(path: str) -> None:
    src = tiktoken_path()
    if src is None:
        raise ValueError("qwen-agent (with utils/qwen.tiktoken) is not installed")
    os.makedirs(path, exist_ok=True)
    ranks = load_ranks(src)
    if len(ranks) != QWEN_NUM_REGULAR:
        raise ValueError(f"qwen.tiktoken: {len(ranks)} tokens, expected {QWEN_NUM_REGULAR}")
    build_qwen_tokenizer(ranks).save(os.path.join(path, "tokenizer.json"))
    decoder = {
        str(QWEN_NUM_REGULAR + i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": s}
        for i, (c, s) in enumerate(QWEN3_ADDED_TOKENS)
    }  # fmt: skip
    config = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": [c for c, _ in QWEN3_ADDED_TOKENS[1:14]], "bos_token": None,
        "chat_template": builtin_template("qwen3_next_thinking"), "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 262144,
        "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }  # fmt: skip
    generation = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                  "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95}  # fmt: skip
    for name, obj in (("tokenizer_config.json", config), ("generation_config.json", generation)):
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2)


def qwen_tokenizer_dir() -> str | None:
    """Dir with the real Qwen3 tokenizer files, built once per process; None without qwen-agent."""
    global _built_dir
    if _built_dir is None:
        if tiktoken_path() is None:
            return None
        path = tempfile.mkdtemp(prefix="qwen3_tokenizer_")
        write_qwen_tokenizer(path)
        _built_dir = path
    return _built_dir
