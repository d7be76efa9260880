"""Building the engine from command-line arguments; shared by `serve`, `generate` and `chat`.

Kept apart from server.py so the offline commands never import FastAPI / uvicorn / pydantic.
"""

from __future__ import annotations

import logging

log = logging.getLogger("qwen3next.api")

# command-line options that are EngineArgs fields of the same name (the engine process receives
# these + model + speculative_config: one list, so a new flag cannot miss the child)
ENGINE_FIELDS = ("dtype", "device", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                 "kv_cache_memory_bytes", "gpu_memory_utilization", "block_size", "seed", "tensor_parallel_size",
                 "quantization", "enable_prefix_caching", "prefix_caching_state_block", "hf_overrides",
                 "mamba_ssm_cache_dtype", "load_format")


def build_engine(ns):
    """An LLMEngine from the serve/chat/generate arguments (model dir or hub id)."""
    from qwen3next.engine.args import EngineArgs
    from qwen3next.engine.llm_engine import LLMEngine

    fields = {k: getattr(ns, k) for k in ENGINE_FIELDS if getattr(ns, k, None) is not None}
    spec = getattr(ns, "speculative_config", None)
    if spec is not None:
        if "speculative_config" in EngineArgs.names():
            fields["speculative_config"] = spec  # the engine parses (and names errors in) the JSON
        else:
            log.warning("--speculative-config ignored: this engine has no speculative decoding option")
    tokenizer_dir = tokenizer_path(getattr(ns, "tokenizer", None))  # a bad path fails before the load
    engine = LLMEngine.from_args(EngineArgs(model=ns.model, **fields))
    if tokenizer_dir is not None:
        use_tokenizer(engine, tokenizer_dir)
    return engine, engine.model_dir


def tokenizer_path(tokenizer: str | None) -> str | None:
    """The dir of a `--tokenizer` / `LLM(tokenizer=)` dir or hub id (None: the model's)."""
    if tokenizer is None:
        return None
    from qwen3next.loader import resolve_model_dir

    try:
        return resolve_model_dir(tokenizer)
    except ValueError as e:  # (not the hub client's repo-id error)
        raise ValueError(f"tokenizer: {e}") from None


def use_tokenizer(engine, tokenizer_dir: str) -> None:
    """The engine read the model dir's tokenizer.json (none beside a config.json alone, as
    load_format="dummy" allows): its grammars and sampled vocabulary follow this tokenizer instead."""
    from qwen3next.engine.llm_engine import tokenizer_size

    engine.structured.tokenizer_dir = tokenizer_dir
    getattr(engine.model, "inner", engine.model).sampled_vocab_size = tokenizer_size(tokenizer_dir)


def thinking_template(tokenizer) -> bool:
    """Does the model's template open a think block for the answer (a Thinking model)?"""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)
    return text.rstrip("\n").endswith("<think>")
