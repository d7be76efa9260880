"""The Qwen3 tokenizer: byte-level BPE from a model dir, added tokens, chat template, generation_config.

Owns `Tokenizer` (wraps a `tokenizers.Tokenizer` loaded from tokenizer.json, or vocab.json +
merges.txt, with the added tokens of tokenizer_config.json), `get_tokenizer(path)` and
`read_generation_config(path)`. Rendering lives in chat_template.py, streaming decode in
detokenizer.py. No weights are touched here.
"""

from __future__ import annotations

import json
import os
from functools import cached_property

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from qwen3next.chat_template import render_chat, select_template

# The 26 added tokens of Qwen3 / Qwen3-Next (chat_format.md §6): (content, special), ids 151643.. in order
QWEN3_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False),
    ("</tool_response>", False), ("<think>", False), ("</think>", False),
]  # fmt: skip
# Qwen2/3 pre-tokenizer split (chat_format.md §7): like cl100k but one digit per token
QWEN3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode char alphabet used by ByteLevel."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTES_TO_UNICODE = _bytes_to_unicode()


# characters above which encode goes through encode_batch (~0.1 s of tokenizing)
_LONG_TEXT = 65536


def set_qwen3_pipeline(tok: HFTokenizer) -> HFTokenizer:
    """NFC normalizer, regex split + ByteLevel pre-tokenizer, ByteLevel decoder (in place)."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN3_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def added_token(content: str, special: bool) -> AddedToken:
    return AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def read_generation_config(path: str) -> dict:
    """generation_config.json of a model dir (or the file itself) as a dict; {} when absent.

    `eos_token_id` always comes back as a list of ints (the file may hold an int or a list).
    """
    file = os.path.join(path, "generation_config.json") if os.path.isdir(path) else path
    cfg = _read_json(file)
    eos = cfg.get("eos_token_id")
    cfg["eos_token_id"] = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return cfg


def _token_content(value) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as AddedToken dicts
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """HF-compatible Qwen3 tokenizer. `encode` adds no BOS; added tokens are matched anywhere."""

    def __init__(self, tok: HFTokenizer, config: dict | None = None, chat_template=None):
        self._tok = tok
        self.config = dict(config or {})
        self._register_added_tokens()
        if chat_template is None:
            chat_template = self.config.get("chat_template")
        if isinstance(chat_template, list):
            if not all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in chat_template):
                raise ValueError("chat_template: a list must hold {'name', 'template'} entries")
            chat_template = {t["name"]: t["template"] for t in chat_template}
        self.chat_template = chat_template  # str, {name: str}, or None (= built-in Thinking template)
        self.eos_token = _token_content(self.config.get("eos_token")) or "<|im_end|>"
        self.pad_token = _token_content(self.config.get("pad_token")) or "<|endoftext|>"
        self.bos_token = _token_content(self.config.get("bos_token"))
        self.unk_token = _token_content(self.config.get("unk_token"))
        self.model_max_length = self.config.get("model_max_length")

    @classmethod
    def from_dir(cls, path: str) -> Tokenizer:
        if not os.path.isdir(path):
            raise ValueError(f"tokenizer path {path!r} is not a directory")
        tok_file = os.path.join(path, "tokenizer.json")
        vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        try:  # tokenizers' own errors ("key must be a string at line 1 column 2") name no file
            if os.path.isfile(tok_file):
                tok = HFTokenizer.from_file(tok_file)
            elif os.path.isfile(vocab_file) and os.path.isfile(merges_file):
                tok = set_qwen3_pipeline(HFTokenizer(models.BPE.from_file(vocab_file, merges_file)))
            else:
                raise ValueError(f"{path}: no tokenizer.json (or vocab.json + merges.txt)")
        except Exception as e:
            if isinstance(e, ValueError) and str(e).startswith(path):
                raise
            where = tok_file if os.path.isfile(tok_file) else f"{vocab_file} / {merges_file}"
            raise ValueError(f"{where}: cannot be read as a tokenizer ({e})") from None
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        template = None
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        return cls(tok, config, template)

    def _register_added_tokens(self):
        """Make the tokenizer hold every added token of the config at its stated id."""
        decoder = self.config.get("added_tokens_decoder")
        if decoder:
            wanted = sorted((int(i), d["content"], bool(d.get("special", False))) for i, d in decoder.items())
        elif not self._tok.get_added_tokens_decoder():
            base = self._tok.get_vocab_size(with_added_tokens=False)
            wanted = [(base + i, c, s) for i, (c, s) in enumerate(QWEN3_ADDED_TOKENS)]
        else:
            wanted = []
        for tid, content, special in wanted:
            have = self._tok.token_to_id(content)
            if have is None:
                if self._tok.get_vocab_size(with_added_tokens=True) != tid:
                    raise ValueError(f"added_tokens_decoder: {content!r} wants id {tid}, next free id differs")
                self._tok.add_tokens([added_token(content, special)])
            elif have != tid:
                raise ValueError(f"added_tokens_decoder: {content!r} has id {have} in the vocab, config says {tid}")

    # ---- encode / decode ----
    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode: text must be a str, got {type(text).__name__}")
        if len(text) > _LONG_TEXT:
            # tokenizers' encode holds the GIL throughout on text with added tokens (a 5 MB chat
            # prompt: 10 s in which the server's event loop cannot run); encode_batch releases it
            return self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._tok.token_to_id(tokens)
        return [self._tok.token_to_id(t) for t in tokens]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ---- properties ----
    @property
    def backend(self) -> HFTokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Tokens including the added ones (151669 for Qwen3; the model's embedding has padding rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def eos_token_id(self) -> int:
        return self._tok.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self._tok.token_to_id(self.pad_token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._tok.token_to_id(self.bos_token)

    @cached_property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(sorted(self._tok.get_added_tokens_decoder().items()))

    @cached_property
    def all_special_ids(self) -> list[int]:
        return [i for i, t in self.added_tokens_decoder.items() if t.special]

    @cached_property
    def special_tokens_map(self) -> dict[str, str]:
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                 "pad_token": self.pad_token}  # fmt: skip
        return {k: v for k, v in names.items() if v is not None}

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """id -> the bytes it decodes to (added tokens: their UTF-8 text). Byte-level tokenizers only."""
        if not isinstance(self._tok.decoder, decoders.ByteLevel):
            raise ValueError("token_bytes: the tokenizer's decoder is not ByteLevel")
        byte_of = {c: b for b, c in BYTES_TO_UNICODE.items()}
        table = [b""] * self.vocab_size
        for token, tid in self._tok.get_vocab(with_added_tokens=False).items():
            table[tid] = bytes(byte_of[c] for c in token)
        for tid, t in self.added_tokens_decoder.items():
            table[tid] = t.content.encode("utf-8")
        return table

    @cached_property
    def special_id_set(self) -> frozenset[int]:
        return frozenset(self.all_special_ids)

    # ---- chat ----
    def get_chat_template(self, chat_template: str | None = None, tools=None) -> str:
        return select_template(self.chat_template, chat_template, tools)

    def apply_chat_template(
        self,
        messages,
        tools=None,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **kwargs,
    ):
        """Render as HF does (str), or its token ids when `tokenize=True`. Extra kwargs reach the template."""
        template = self.get_chat_template(chat_template, tools)
        text = render_chat(
            template,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **{**self.special_tokens_map, **kwargs},
        )
        return self.encode(text) if tokenize else text

_TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "*.jinja",
                    "generation_config.json"]  # fmt: skip


def get_tokenizer(path: str) -> Tokenizer:
    """Tokenizer of a model dir, or of a hub id (downloads only the tokenizer files)."""
    path = os.path.expanduser(str(path))
    if not os.path.isdir(path):
        if path.count("/") != 1 or os.path.exists(path):
            raise ValueError(f"tokenizer path {path!r} is not a directory")
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(path, allow_patterns=_TOKENIZER_FILES)
        except Exception as e:  # offline, unknown repo, ...: one clear line
            raise ValueError(f"tokenizer {path!r}: not a local dir and the hub download failed ({e})") from None
    return Tokenizer.from_dir(path)
