"""Training and evaluation of Qwen3-Next models: synthetic chat data, tokenizer training, the
training loop (next-token + MTP + router balance losses), checkpoints, eval, and the CLI verbs."""
