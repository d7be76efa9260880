"""Train the demo model's small byte-level BPE tokenizer and write its HF files.

Same recipe as the Qwen3 tokenizer (chat_format.md §7): NFC normalizer, the Qwen split regex
(every digit its own pre-token) + ByteLevel, BPE without unk / byte fallback. The 26 Qwen3 added
tokens (§6) follow the learned vocabulary in the same order with the same `special` flags, so
only their ids differ from the real tokenizer. `write_tokenizer_files` writes tokenizer.json and
a tokenizer_config.json that carries the Thinking chat template.
"""

from __future__ import annotations

import json
import os
import re

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from qwen3next.chat_template import builtin_template
from qwen3next.tokenizer import QWEN3_ADDED_TOKENS, added_token, set_qwen3_pipeline

ADDITIONAL_SPECIAL = [t for t, _ in QWEN3_ADDED_TOKENS[1:14]]  # <|im_start|> .. <|video_pad|>
_ADDED_RE = re.compile("|".join(re.escape(t) for t, _ in QWEN3_ADDED_TOKENS))


def empty_qwen_bpe() -> Tokenizer:
    """An untrained BPE with Qwen3's normalizer, pre-tokenizer, decoder and post-processor."""
    tok = set_qwen3_pipeline(Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False)))
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """BPE with `vocab_size` regular tokens (256 bytes + merges), then the 26 added tokens."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must exceed the 256-byte alphabet, got {vocab_size}")
    tok = empty_qwen_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # Added-token strings must not become merges: learn from the text between them.
    pieces = (p for t in texts for p in _ADDED_RE.split(t) if p)
    tok.train_from_iterator(pieces, trainer)
    n = tok.get_vocab_size()
    for i, (content, special) in enumerate(QWEN3_ADDED_TOKENS):
        at = added_token(content, special)
        tok.add_special_tokens([at]) if special else tok.add_tokens([at])
        if tok.token_to_id(content) != n + i:
            raise RuntimeError(f"added token {content!r} got id {tok.token_to_id(content)}, expected {n + i}")
    return tok


def tokenizer_config(tok: Tokenizer) -> dict:
    """tokenizer_config.json as the Qwen3 Thinking repos ship it, with this vocabulary's ids."""
    decoder = {}
    for content, special in QWEN3_ADDED_TOKENS:
        decoder[str(tok.token_to_id(content))] = {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special,
        }  # fmt: skip
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ADDITIONAL_SPECIAL,
        "bos_token": None,
        "chat_template": builtin_template("qwen3_next_thinking"),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer_files(tok: Tokenizer, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(tok), f, indent=2, ensure_ascii=False)
        f.write("\n")
