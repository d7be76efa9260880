"""A tiny Qwen3-shaped tokenizer for tests: byte-level BPE trained here, plus the 26 Qwen3 added tokens.

`write_tiny_tokenizer(path)` trains (deterministically, well under a second) a ~480-token byte-level
BPE on built-in English text with the Qwen3 normalizer / pre-tokenizer / decoder, appends the added
tokens of chat_format.md §6 right after it, and writes tokenizer.json, tokenizer_config.json
(Thinking template) and generation_config.json into `path`. Returns the total vocab size.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from qwen3next.tokenizer import QWEN3_ADDED_TOKENS, added_token, set_qwen3_pipeline
from qwen3next.train.tokenizer_train import tokenizer_config

TINY_BPE_SIZE = 480  # regular tokens (256 bytes + merges); added tokens follow

_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model can still learn the shape of a language.
Hello, world! How are you today? I am fine, thank you. What is the weather in Paris and in Rome?
The user asks a question and the assistant answers it. The assistant may think before it answers.
Let me think about this step by step. First, we read the question. Then we write the answer.
Numbers like 12345 and 2024 are split into single digits. Two plus two is four; three times three is nine.
def add(a, b):
    return a + b
print(add(1, 2))
The function get_weather takes a city and returns the temperature in degrees.
Once upon a time there was a little cat who lived in a house by the river. Every morning the cat
walked to the water, looked at the fish, and went back home to sleep in the warm sun.
Tokens, words and sentences: the tokenizer turns text into numbers, and the model turns numbers
into more numbers. Sampling picks the next token; the detokenizer turns it back into text.
"""


def train_tiny_bpe(vocab_size: int = TINY_BPE_SIZE) -> Tokenizer:
    tok = set_qwen3_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_TEXT.splitlines(keepends=True), trainer=trainer)
    return tok


def write_tiny_tokenizer(path) -> int:
    """Write the tiny tokenizer files into `path` (created if needed); return the vocab size incl. added."""
    path = str(path)
    os.makedirs(path, exist_ok=True)
    tok = train_tiny_bpe()
    base = tok.get_vocab_size(with_added_tokens=False)
    for content, special in QWEN3_ADDED_TOKENS:
        tok.add_tokens([added_token(content, special)])
    tok.save(os.path.join(path, "tokenizer.json"))
    config = tokenizer_config(tok)  # the same tokenizer_config.json the demo model's training writes
    im_end, endoftext = base + 2, base
    generation = {
        "bos_token_id": endoftext,
        "do_sample": True,
        "eos_token_id": [im_end, endoftext],
        "pad_token_id": endoftext,
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
    }
    for name, obj in (("tokenizer_config.json", config), ("generation_config.json", generation)):
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2)
    return base + len(QWEN3_ADDED_TOKENS)
