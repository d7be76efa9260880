"""Audit (session 5): browser clients. vLLM serves CORS (any origin by default, `--allowed-origins`
etc.); without it a web UI's preflight got 405 and its requests never left the browser."""

import httpx
import pytest

pytest.importorskip("fastapi")

from tests.helpers.server_harness import ServerHarness  # noqa: E402

PREFLIGHT = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


@pytest.fixture(scope="module")
def srv(tiny_ckpt):
    h = ServerHarness(tiny_ckpt, "--served-model-name", "tiny", "--api-key", "k")
    yield h
    h.close()


def test_preflight_and_cors_headers_with_an_api_key(srv):
    r = httpx.options(srv.url + "/v1/chat/completions", headers=PREFLIGHT)
    assert r.status_code == 200, r.text  # answered before the key check: browsers send no key here
    assert r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"
    r = httpx.post(srv.url + "/v1/chat/completions", json=body,
                   headers={"Origin": "http://localhost:3000", "Authorization": "Bearer k"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert srv.wait_idle()


def test_allowed_origins_flag():
    from qwen3next.cli import build_parser

    ns = build_parser().parse_args(["serve", "--allowed-origins", '["https://a.example"]', "--allow-credentials"])
    assert ns.allowed_origins == ["https://a.example"] and ns.allow_credentials and ns.allowed_headers == ["*"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--allowed-origins", "*"])  # vLLM's form is a JSON list
