"""qwen3next: run, serve and train the Qwen3-Next model family.

The public names are imported lazily so `import qwen3next` stays cheap and the engine stays
importable without the server's packages.
"""

__version__ = "0.1.0"

_LAZY = {
    "LLM": ("qwen3next.llm", "LLM"),
    "SamplingParams": ("qwen3next.sampling_params", "SamplingParams"),
    "get_tokenizer": ("qwen3next.tokenizer", "get_tokenizer"),
    "ModelConfig": ("qwen3next.config", "ModelConfig"),
}

__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'qwen3next' has no attribute {name!r}")
