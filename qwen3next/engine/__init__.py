"""The serving engine: sequences, cache (paged KV + DeltaNet state slots), scheduler, sampler,
model runner and LLMEngine (add_request / abort_request / step). Token ids only."""

from qwen3next.engine.args import EngineArgs
from qwen3next.engine.llm_engine import LLMEngine

__all__ = ["EngineArgs", "LLMEngine"]
