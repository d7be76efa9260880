"""Conversations -> token ids + loss mask, and packing them into training batches.

A conversation is rendered with the Thinking chat template (the same renderer the server uses),
tokenized, and its loss mask marks exactly the assistant turns' bodies: everything after
`<|im_start|>assistant\\n` up to and including that turn's `<|im_end|>`. System, user and tool
turns, and the role headers, are context only.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from tokenizers import Tokenizer

from qwen3next.chat_template import builtin_template, render_chat
from qwen3next.train.data import Conversation

_ASSISTANT_BODY = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.DOTALL)


def render(conv: Conversation, add_generation_prompt: bool = False) -> str:
    return render_chat(builtin_template("qwen3_next_thinking"), conv.messages, tools=conv.tools,
                       add_generation_prompt=add_generation_prompt)  # fmt: skip


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of every assistant body (incl. its <|im_end|>)."""
    return [m.span(1) for m in _ASSISTANT_BODY.finditer(text)]


def encode_text(text: str, tok: Tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids and, per token, whether it lies inside an assistant body."""
    enc = tok.encode(text, add_special_tokens=False)
    spans = assistant_spans(text)
    mask = [any(s <= a and b <= e for s, e in spans) for a, b in enc.offsets]
    return enc.ids, mask


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]


def encode_conversations(convs: list[Conversation], tok: Tokenizer, max_len: int) -> list[Example]:
    """Encode, dropping conversations longer than max_len tokens (never truncated mid-answer)."""
    out = []
    for conv in convs:
        ids, mask = encode_text(render(conv), tok)
        if len(ids) <= max_len:
            out.append(Example(ids, mask))
    return out


def pack_batches(examples: list[Example], tokens_per_batch: int, rng: random.Random) -> list[list[Example]]:
    """Shuffle, then greedily fill batches up to tokens_per_batch tokens (whole sequences only)."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    batches, cur, n = [], [], 0
    for i in order:
        ex = examples[i]
        if cur and n + len(ex.ids) > tokens_per_batch:
            batches.append(cur)
            cur, n = [], 0
        cur.append(ex)
        n += len(ex.ids)
    if cur:
        batches.append(cur)
    return batches
