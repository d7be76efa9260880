"""Audit (session 6b): `--tokenizer` (vLLM's flag) for serve / generate / chat: `--load-format dummy`
reads config.json alone, so a dir holding only it can run when the tokenizer comes from elsewhere
(before: "no tokenizer.json", with no way to name one)."""

import shutil

import pytest

from qwen3next.cli import build_parser, main


@pytest.fixture(scope="module")
def config_only(tiny_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("config_only_cli")
    shutil.copy(f"{tiny_ckpt}/config.json", d / "config.json")
    return str(d)


def test_generate_with_a_tokenizer_from_elsewhere(config_only, tiny_ckpt, capsys):
    base = ["generate", "--model", config_only, "--load-format", "dummy", "--device", "cpu", "--prompt", "Hi",
            "--max-tokens", "3", "--temperature", "0"]
    assert main(base) == 1
    assert "no tokenizer.json" in capsys.readouterr().err
    assert main([*base, "--tokenizer", tiny_ckpt]) == 0
    assert main([*base, "--tokenizer", config_only]) == 1  # still a clear error
    assert "no tokenizer.json" in capsys.readouterr().err
    assert build_parser().parse_args(["serve"]).tokenizer is None


def test_serve_with_a_tokenizer_from_elsewhere(config_only, tiny_ckpt):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("llguidance")
    from tests.helpers.server_harness import ServerHarness

    h = ServerHarness(config_only, "--tokenizer", tiny_ckpt, "--load-format", "dummy", "--served-model-name", "t")
    try:
        body = {"model": "t", "prompt": "Hi", "max_tokens": 8, "temperature": 0,
                "structured_outputs": {"choice": ["yes", "no"]}}
        r = httpx.post(h.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] in ("yes", "no")
        r = httpx.post(h.url + "/v1/chat/completions", timeout=60, json={
            "model": "t", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert r.status_code == 200, r.text
    finally:
        h.close()


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_missing_tokenizer_fails_before_the_model_loads(config_only, command, monkeypatch, capsys):
    """A config.json-only dir without --tokenizer: the error came after the (dummy 80B: minutes-long)
    model load; LLM(...) already checked first."""
    from qwen3next.api import engine_client
    from qwen3next.engine import llm_engine

    def loaded(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(llm_engine.LLMEngine, "from_args", classmethod(loaded))
    monkeypatch.setattr(engine_client.ProcessEngine, "__init__", loaded)
    extra = ["--prompt", "x"] if command == "generate" else ["--port", "1"]
    assert main([command, "--model", config_only, "--load-format", "dummy", "--device", "cpu", *extra]) == 1
    err = capsys.readouterr().err
    assert "no tokenizer.json" in err and "model was loaded" not in err
