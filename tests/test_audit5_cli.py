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
