"""The `qwen3next` command: generate, errors as one line, and `serve` shutting down cleanly on SIGINT
with a stream in flight."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from qwen3next.cli import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_subcommands_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"serve", "generate", "chat"} <= set(sub.choices)
    try:
        import qwen3next.train.cli  # noqa: F401
    except ImportError:
        return
    assert {"train", "eval"} <= set(sub.choices)


def test_dtype_takes_vllms_spellings():
    """--dtype half / float (vLLM's choices) are float16 / float32; others are refused by argparse."""
    parser = build_parser()
    assert parser.parse_args(["generate", "--prompt", "x", "--dtype", "half"]).dtype == "float16"
    assert parser.parse_args(["generate", "--prompt", "x", "--dtype", "float"]).dtype == "float32"
    assert parser.parse_args(["serve", "--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--prompt", "x", "--dtype", "double"])


def test_generate_prints_text(tiny_ckpt, capsys):
    assert main(["generate", "--model", tiny_ckpt, "--prompt", "Hello", "--max-tokens", "4",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and len(out) > 1


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


def test_serve_missing_chat_template_file_is_one_line(tiny_ckpt, capsys, monkeypatch):
    import uvicorn

    # (were the path taken as template text, the server would start: fail instead of serving)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: (_ for _ in ()).throw(RuntimeError("served")))
    # vLLM's rule: no '{', '}' or newline and no such file -> a missing file, not template text
    assert main(["serve", "--model", tiny_ckpt, "--chat-template", "/nonexistent/t.jinja"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --chat-template") and "no such file" in err and "\n" not in err


def test_missing_demo_model_is_a_clear_error(capsys, monkeypatch):
    import qwen3next.cli as cli

    monkeypatch.setattr(cli, "DEMO_MODEL", "/nonexistent/demo_model")
    assert main(["chat"]) == 1
    assert "pass --model" in capsys.readouterr().err


def test_serve_sigint_shuts_down_cleanly(tiny_ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen3next", "serve", "--model", tiny_ckpt, "--port", str(port),
         "--served-model-name", "tiny", "--shutdown-timeout", "0.3", "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400,
                "ignore_eos": True, "stream": True}
        lines = []
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        if len(lines) == 3:  # once: a second SIGINT means "force quit" to uvicorn
                            proc.send_signal(signal.SIGINT)
        except httpx.HTTPError as e:
            proc.wait(20)
            raise AssertionError(f"{e}; lines={lines[-3:]}; server said: {proc.stdout.read()[-3000:]}") from None
        assert proc.wait(20) == 0
        # the stream ended well-formed: aborted with an error event by the shutdown, then [DONE]
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(x[6:]) for x in lines[:-1]]
        last = events[-1]
        assert last.get("error", {}).get("message") == "The server is shutting down." or (
            last["choices"][0]["finish_reason"] == "length"), last  # finished within the grace time
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_offline_commands_need_no_server_packages(tiny_ckpt):
    code = (
        "import sys\n"
        "for m in ('fastapi', 'uvicorn', 'pydantic', 'prometheus_client'):\n"
        "    sys.modules[m] = None  # importing any of them now fails\n"
        "import qwen3next.engine.llm_engine\n"
        "from qwen3next.cli import main\n"
        f"raise SystemExit(main(['generate', '--model', {tiny_ckpt!r}, '--prompt', 'Hi', '--max-tokens', '2']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_chat_shows_thinking_apart(tiny_ckpt, monkeypatch, capsys):
    import io

    import qwen3next.api.engine_setup as setup
    from tests.helpers.server_harness import ScriptedSampler

    real_build = setup.build_engine

    def scripted_build(ns):  # TESTS ONLY: the random model "says" a scripted reply
        engine, path = real_build(ns)
        from qwen3next.tokenizer import get_tokenizer

        tok = get_tokenizer(path)
        sampler = ScriptedSampler(engine.runner.sampler, min(engine.eos_token_ids))
        sampler.sticky = tok.encode("Let me think.\n</think>\n\nHi there.")
        engine.runner.sampler = sampler
        return engine, path

    monkeypatch.setattr(setup, "build_engine", scripted_build)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/reset\nAgain\n/exit\n"))
    assert main(["chat", "--model", tiny_ckpt, "--max-tokens", "30"]) == 0
    out = capsys.readouterr().out
    assert out.count("[thinking] Let me think.") == 2 and out.count("Hi there.") == 2
    assert out.index("Let me think.") < out.index("Hi there.")
    assert "</think>" not in out


def test_chat_turns_reuse_the_prefix_cache(tiny_ckpt, monkeypatch, capsys):
    """`chat --enable-prefix-caching`: the second turn's prompt (history + new message) resumes
    after the first turn's cached prefix."""
    import io

    import qwen3next.api.engine_setup as setup

    real_build, engines = setup.build_engine, []

    def keep(ns):
        engine, path = real_build(ns)
        engines.append(engine)
        return engine, path

    monkeypatch.setattr(setup, "build_engine", keep)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nAgain\n/exit\n"))
    assert main(["chat", "--model", tiny_ckpt, "--max-tokens", "4", "--system", "Be brief. " * 8,
                 "--enable-prefix-caching", "--block-size", "8", "--prefix-caching-state-block", "16"]) == 0
    st = engines[0].stats["prefix_cache"]
    assert engines[0].cache.prefix.state_block == 16 and st["hit_tokens"] >= 64


def test_vllm_command_lines_parse():
    """The model card's vLLM serve commands run as they are (flags that change nothing here are
    accepted); an fp8 KV cache, not implemented, is refused by name."""
    p = build_parser()
    ns = p.parse_args(["serve", "--model", "m", "--port", "8000", "--tensor-parallel-size", "4",
                       "--max-model-len", "262144", "--reasoning-parser", "deepseek_r1", "--trust-remote-code",
                       "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--kv-cache-dtype", "auto"])
    assert ns.tensor_parallel_size == 4 and ns.max_model_len == 262144
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--model", "m", "--kv-cache-dtype", "fp8"])
