"""Long context by YaRN (the model card's 1M-token recipe): `hf_overrides` / `--hf-overrides` change
config.json keys at load (vLLM's flag), and the engine's length limit follows vLLM's rule --
max_position_embeddings, or original_max_position_embeddings x factor with YaRN. A checkpoint
whose config.json was edited the same way generates the same tokens."""

from __future__ import annotations

import json
import shutil

import pytest

from qwen3next.cli import main
from qwen3next.config import ModelConfig
from qwen3next.engine import EngineArgs, LLMEngine
from qwen3next.sampling_params import SamplingParams

# the tiny checkpoint's max_position_embeddings is 512
YARN = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}}


def test_overrides_merge_and_the_yarn_limit(tiny_ckpt):
    plain = ModelConfig.from_dir(tiny_ckpt)
    assert plain.rope.rope_type == "default" and plain.max_model_len_limit == 512
    cfg = ModelConfig.from_dir(tiny_ckpt, YARN)
    assert cfg.rope.rope_type == "yarn" and cfg.rope.factor == 4.0 and cfg.max_model_len_limit == 2048
    assert cfg.hidden_size == plain.hidden_size and cfg.max_position_embeddings == 512
    # nested dicts merge key by key: the factor alone changes, the rest of the block stays
    half = ModelConfig.from_dir(tiny_ckpt, {**YARN, "rope_scaling": {**YARN["rope_scaling"], "factor": 2.0}})
    assert half.max_model_len_limit == 1024


def _engine(path: str, **kw) -> LLMEngine:
    return LLMEngine.from_args(EngineArgs(model=path, device="cpu", dtype="float32",
                                          kv_cache_memory_bytes=1 << 26, **kw))


def test_engine_limit_and_an_edited_config_give_the_same_tokens(tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"exceeds the model's limit \(512\).*YaRN"):
        _engine(tiny_ckpt, max_model_len=1024)
    over = _engine(tiny_ckpt, hf_overrides=json.dumps(YARN))  # JSON text, as the CLI passes it
    assert over.max_model_len == 2048
    with pytest.raises(ValueError, match=r"limit \(2048\)"):
        _engine(tiny_ckpt, hf_overrides=YARN, max_model_len=4096)
    edited = tmp_path / "edited"
    shutil.copytree(tiny_ckpt, edited)
    conf = json.loads((edited / "config.json").read_text())
    conf["rope_parameters"].update(YARN["rope_scaling"])  # (this checkpoint is in transformers-5 layout)
    (edited / "config.json").write_text(json.dumps(conf))
    prompt = [3 + i % 500 for i in range(600)]  # past the original 512 positions
    outs = []
    for eng in (over, _engine(str(edited)), _engine(tiny_ckpt, max_model_len=512)):
        eng.add_request("r", prompt[:500] if eng.max_model_len == 512 else prompt,
                        SamplingParams(max_tokens=6, temperature=0, logprobs=1))
        got = []
        while eng.has_unfinished_requests():
            for o in eng.step():
                got += [(t, round(d[t].logprob, 5)) for t, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
        outs.append(got)
    assert outs[0] == outs[1]
    # YaRN changes the rotary frequencies: the same 500-token prompt's logits differ without it
    yarn_500 = _engine(tiny_ckpt, hf_overrides=YARN)
    yarn_500.add_request("r", prompt[:500], SamplingParams(max_tokens=6, temperature=0, logprobs=1))
    got = []
    while yarn_500.has_unfinished_requests():
        for o in yarn_500.step():
            got += [(t, round(d[t].logprob, 5)) for t, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
    assert got != outs[2]


@pytest.mark.parametrize("text,msg", [("{bad", "not valid JSON"), ("[1, 2]", "must be a JSON object")])
def test_bad_hf_overrides_is_one_line(tiny_ckpt, capsys, text, msg):
    assert main(["generate", "--model", tiny_ckpt, "--prompt", "x", "--hf-overrides", text]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "hf_overrides" in err and msg in err and "\n" not in err


def test_two_ranks_apply_the_overrides(tiny_ckpt):
    """The worker rank loads the overridden config too: 2-rank greedy tokens and logprobs past the
    original 512 positions equal 1 rank's (a worker without YaRN rotates its kv head otherwise)."""
    from qwen3next import LLM

    prompt = {"prompt_token_ids": [3 + i % 500 for i in range(560)]}
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1)
    kw = dict(dtype="float32", device="cpu", max_num_seqs=2, hf_overrides=YARN, kv_cache_memory_bytes=1 << 26)

    def run(llm):
        c = llm.generate(prompt, params)[0].outputs[0]
        return c.token_ids, [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]

    one_tokens, one_lps = run(LLM(model=tiny_ckpt, **kw))
    llm = LLM(model=tiny_ckpt, tensor_parallel_size=2, **kw)
    try:
        assert llm.llm_engine.max_model_len == 2048
        tokens, lps = run(llm)
        assert tokens == one_tokens and max(abs(a - b) for a, b in zip(lps, one_lps)) < 1e-4
    finally:
        llm.llm_engine.shutdown()
