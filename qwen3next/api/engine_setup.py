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
    engine = LLMEngine.from_args(EngineArgs(model=ns.model, **fields))
    return engine, engine.model_dir


def thinking_template(tokenizer) -> bool:
    """Does the model's template open a think block for the answer (a Thinking model)?"""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)
    return text.rstrip("\n").endswith("<think>")
