"""Audit (session 5) of the `qwen3next` command as a user runs it: a port that cannot be served is
a one-line error before the model loads (vLLM binds first too), not a traceback after it."""

import socket

import pytest

from qwen3next.cli import main


@pytest.fixture
def no_model_load(monkeypatch):
    import qwen3next.api.server as server

    def loaded(ns, *a, **k):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(server, "build_state", loaded)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_serve_on_a_taken_port_fails_before_loading(no_model_load, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 1
    assert f"127.0.0.1:{port}" in _one_line_error(capsys)


@pytest.mark.parametrize("args,needle", [
    (["--port", "99999"], "--port must be in 0..65535"),
    (["--port", "-1"], "--port must be in 0..65535"),
    (["--host", "nosuchhost.invalid"], "--host 'nosuchhost.invalid'"),
])
def test_serve_bad_host_or_port_is_one_line(no_model_load, capsys, args, needle):
    assert main(["serve", *args]) == 1
    assert needle in _one_line_error(capsys)


def _scripted_chat(monkeypatch, reply: str, on_step=None):
    """`qwen3next chat` whose random tiny model "says" `reply` (TESTS ONLY); on_step(k) runs each
    sampling call. Returns the list the built engines are appended to."""
    import qwen3next.api.engine_setup as setup
    from tests.helpers.server_harness import ScriptedSampler

    real_build, engines = setup.build_engine, []

    def scripted_build(ns):
        engine, path = real_build(ns)
        from qwen3next.tokenizer import get_tokenizer

        sampler = ScriptedSampler(engine.runner.sampler, min(engine.eos_token_ids))
        sampler.sticky = get_tokenizer(path).encode(reply)
        if on_step is not None:
            real_call = sampler.__call__
            calls = [0]

            class Hooked(ScriptedSampler):
                def __call__(self, logits, rows):
                    calls[0] += 1
                    on_step(calls[0])
                    return real_call(logits, rows)

            sampler.__class__ = Hooked
        engine.runner.sampler = sampler
        engines.append(engine)
        return engine, path

    monkeypatch.setattr(setup, "build_engine", scripted_build)
    return engines


def test_chat_survives_a_conversation_longer_than_the_context(tiny_ckpt, monkeypatch, capsys):
    import io

    engines = _scripted_chat(monkeypatch, "Hi there.")
    long_line = "hello " * 40
    monkeypatch.setattr("sys.stdin", io.StringIO(f"Hello\n{long_line}\n/reset\nAgain\n/exit\n"))
    assert main(["chat", "--model", tiny_ckpt, "--max-tokens", "8", "--max-model-len", "40"]) == 0
    cap = capsys.readouterr()
    assert "no longer fits in max_model_len (40); /reset starts over" in cap.err
    assert cap.out.count("Hi there.") == 2  # the turns before and after the overflow
    assert not engines[0].has_unfinished_requests()


def test_chat_ctrl_c_stops_the_reply_not_the_session(tiny_ckpt, monkeypatch, capsys):
    import io
    import os
    import signal

    stdin = io.StringIO("Hello\nAgain\n/exit\n")

    def interrupt_first_reply(k):
        if k == 3 and stdin.tell() == len("Hello\n"):  # the first reply, mid-stream
            os.kill(os.getpid(), signal.SIGINT)

    engines = _scripted_chat(monkeypatch, "one two three four five six seven eight", interrupt_first_reply)
    monkeypatch.setattr("sys.stdin", stdin)
    handler = signal.getsignal(signal.SIGINT)
    assert main(["chat", "--model", tiny_ckpt, "--max-tokens", "30"]) == 0
    assert signal.getsignal(signal.SIGINT) is handler  # restored after each reply
    out = capsys.readouterr().out
    assert "[interrupted]" in out and out.count("one two three four five six seven eight") == 1
    st = engines[0].stats  # the stopped reply was aborted: nothing left in the cache
    assert st["kv_blocks_used"] == 0 and st["state_slots_used"] == 0 and not engines[0].requests


def test_serve_stops_the_engine_when_uvicorn_cannot_start(tiny_ckpt, monkeypatch, capsys):
    """A failure between loading and serving (here uvicorn's config) used to leave the engine
    process running: the error printed, then `qwen3next serve` hung on its child."""
    import uvicorn

    import qwen3next.api.server as server

    real_build, stopped = server.build_state, []

    def build_state(ns):
        state = real_build(ns)
        real_stop = state.engine.shutdown
        state.engine.shutdown = lambda: (stopped.append(True), real_stop())
        return state

    def bad_config(*a, **k):
        raise ValueError("bad uvicorn config")

    monkeypatch.setattr(server, "build_state", build_state)
    monkeypatch.setattr(uvicorn, "Config", bad_config)
    assert main(["serve", "--model", tiny_ckpt, "--port", "0", "--no-engine-process"]) == 1
    assert "bad uvicorn config" in _one_line_error(capsys) and stopped


@pytest.mark.parametrize("args,needle", [
    (["--max-waiting", "-1"], "--max-waiting must be >= 0"),
    (["--shutdown-timeout", "-5"], "--shutdown-timeout must be >= 0"),
])
def test_serve_negative_limits_are_one_line(no_model_load, capsys, args, needle):
    assert main(["serve", "--port", "0", *args]) == 1
    assert needle in _one_line_error(capsys)


def test_serve_log_level_is_checked_by_argparse(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--log-level", "bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    from qwen3next.cli import build_parser

    assert build_parser().parse_args(["serve", "--log-level", "WARNING"]).log_level == "warning"


def test_serve_bad_chat_template_names_the_flag_before_loading(tmp_path, capsys, monkeypatch):
    import qwen3next.api.engine_client as engine_client
    import qwen3next.api.engine_setup as engine_setup

    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the template was checked")

    monkeypatch.setattr(engine_client, "ProcessEngine", loaded)
    monkeypatch.setattr(engine_setup, "build_engine", loaded)
    bad = tmp_path / "t.jinja"
    bad.write_text("{% if x %}\nabc")
    for source in ("{% for %}", str(bad)):
        assert main(["serve", "--port", "0", "--chat-template", source]) == 1
        assert _one_line_error(capsys).startswith("error: --chat-template: not a valid Jinja template")


def test_serve_model_without_tokenizer_names_the_real_error(tiny_ckpt, tmp_path, capsys):
    """The engine process starts before the tokenizer loads; its shutdown on that failure raised
    "cannot join thread before it is started", which hid the missing tokenizer."""
    import os
    import shutil

    for name in os.listdir(tiny_ckpt):
        if not name.startswith("tokenizer") and name not in ("vocab.json", "merges.txt"):
            shutil.copy(os.path.join(tiny_ckpt, name), tmp_path / name)
    assert main(["serve", "--model", str(tmp_path), "--port", "0", "--engine-process"]) == 1
    assert "no tokenizer.json" in _one_line_error(capsys)
