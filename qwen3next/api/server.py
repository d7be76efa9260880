"""The FastAPI app (routes, auth, error envelope) and `run_server` (engine + uvicorn).

`build_app(state)` wires one `ServerState` into the endpoints of openai_api.md §0 (+ vLLM's
/tokenize, /detokenize); `build_state` makes that state from CLI arguments. `run_server` starts the
engine thread with the app's lifespan; on SIGINT/SIGTERM uvicorn stops accepting, open requests
get `--shutdown-timeout` seconds, then each is aborted with a 503 (an SSE error event + [DONE] for
streams) and the lifespan exit stops the engine thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import qwen3next
from qwen3next.api.errors import APIError, error_body
from qwen3next.api.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard,
                                    ModelList, TokenizeRequest)
from qwen3next.api.serving_chat import create_chat_completion
from qwen3next.api.serving_common import ServerState
from qwen3next.api.serving_completions import create_completion
from qwen3next.api.serving_responses import create_response
from qwen3next.api.validate import parse_body, template_messages

log = logging.getLogger("qwen3next.api")


def build_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        try:
            yield
        finally:
            state.engine.shutdown()

    app = FastAPI(title="qwen3next", version=qwen3next.__version__, lifespan=lifespan)
    app.state.server = state

    app.add_middleware(AuthAndCount, state=state)
    # outermost: a browser's preflight (OPTIONS, no Authorization header) is answered before auth
    app.add_middleware(CORSMiddleware, **state.cors)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # unknown paths (404) and wrong methods (405) in the same envelope
        return JSONResponse(error_body(str(exc.detail), exc.status_code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", 500), status_code=500)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse_body(await request.body(), ChatCompletionRequest)
        return _respond(await create_chat_completion(state, req, request))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_body(await request.body(), CompletionRequest)
        return _respond(await create_completion(state, req, request))

    @app.post("/v1/responses")
    async def responses(request: Request):
        return _respond(await create_response(state, await request.body(), request))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = parse_body(await request.body(), TokenizeRequest)
        if (body.prompt is None) == (body.messages is None):
            raise APIError("give exactly one of prompt or messages", 400, "prompt")
        def encode() -> list[int]:
            if body.prompt is not None:
                return state.tokenizer.encode(body.prompt)
            chat = ChatCompletionRequest(messages=body.messages, tools=body.tools)
            text = state.tokenizer.apply_chat_template(template_messages(chat), tools=[
                t.model_dump(exclude_none=True) for t in body.tools or []] or None,
                add_generation_prompt=body.add_generation_prompt)
            return state.tokenizer.encode(text)

        ids = await asyncio.to_thread(encode)  # off the event loop, as the chat path
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = parse_body(await request.body(), DetokenizeRequest)
        if any(not 0 <= t < state.vocab_size for t in body.tokens):
            raise APIError(f"tokens must be ids in [0, {state.vocab_size})", 400, "tokens")
        return {"prompt": state.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/v1/models")
    async def models():
        cards = [ModelCard(id=n, root=state.model_path, max_model_len=state.max_model_len)
                 for n in state.served_names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.get("/health")
    async def health():
        return Response(status_code=503 if state.engine.dead is not None else 200)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.exposition(), media_type=state.metrics.content_type)

    @app.get("/version")
    async def version():
        return {"version": qwen3next.__version__}

    return app


_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/health", "/metrics",
           "/version", "/tokenize", "/detokenize"}


class AuthAndCount:
    """Pure ASGI middleware (keeps disconnects visible to streams): bearer auth on /v1, HTTP counts."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, key = scope["path"], self.state.api_key
        # a bounded label set: unknown paths (scanners, typos) share one label
        label = path if path in _ROUTES else "other"
        if key and path.startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {key}".encode()):
                self.state.metrics.count_http(label, 401)
                return await JSONResponse(error_body("Unauthorized", 401), status_code=401)(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.state.metrics.count_http(label, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def _respond(result):
    """A dict -> JSON; an async iterator of SSE strings -> event stream."""
    if isinstance(result, dict):
        return Response(json.dumps(result, ensure_ascii=False), media_type="application/json")
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def serving_on_cpu(ns) -> bool:
    if ns.device:
        return not ns.device.startswith("cuda")
    import torch

    return not torch.cuda.is_available()


def use_engine_process(ns) -> bool:
    """--engine-process / --no-engine-process; default: a process of its own when serving on CPU
    (measured: docs/benchmarks.md), the engine thread on GPUs (not measured there)."""
    flag = getattr(ns, "engine_process", None)
    return flag if flag is not None else serving_on_cpu(ns)


# vLLM's default for its CPU API server: prefill in 2048-token steps, so a burst of prompts gets
# its first tokens step by step (128 streams: TTFT p50 -30%, same throughput; docs/benchmarks.md)
CPU_SERVING_BATCHED_TOKENS = 2048


def load_chat_template(source: str | None) -> str | None:
    """--chat-template: a file's text, or the argument itself when it is template text (vLLM's rule:
    a value with none of '{', '}', newline that is no file is a missing file, not a template)."""
    if not source:
        return None
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            text = f.read()
    elif not any(c in source for c in "{}\n"):
        raise ValueError(f"--chat-template {source!r} looks like a file path, but there is no such file")
    else:
        text = source
    import jinja2

    from qwen3next.chat_template import compile_template

    try:  # a syntax error now, naming the flag, rather than from the first render
        compile_template(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template: not a valid Jinja template: {e} (line {e.lineno})") from None
    return text


def build_state(ns, engine=None, model_dir: str | None = None) -> ServerState:
    """Everything the app needs, from CLI arguments (`engine` may be given pre-built, e.g. tests).
    With the engine in its own process this process never loads the model."""
    from qwen3next.api.async_engine import AsyncEngine
    from qwen3next.api.engine_process import ENGINE_OPTIONS, engine_info
    from qwen3next.api.engine_setup import build_engine, thinking_template
    from qwen3next.api.metrics import Metrics
    from qwen3next.parsers import resolve_tool_parser
    from qwen3next.tokenizer import get_tokenizer, read_generation_config

    template = load_chat_template(getattr(ns, "chat_template", None))  # before the model loads
    tokenizer = None
    if engine is None:  # a missing or bad tokenizer fails before the (80B: minutes-long) model load
        from qwen3next.api.engine_setup import tokenizer_path
        from qwen3next.loader import resolve_model_dir

        tokenizer = get_tokenizer(tokenizer_path(getattr(ns, "tokenizer", None)) or resolve_model_dir(ns.model))
    if engine is None and getattr(ns, "max_num_batched_tokens", None) is None and serving_on_cpu(ns):
        ns.max_num_batched_tokens = CPU_SERVING_BATCHED_TOKENS
    if engine is None and use_engine_process(ns):
        from qwen3next.api.engine_client import ProcessEngine

        async_engine = ProcessEngine({k: getattr(ns, k, None) for k in ENGINE_OPTIONS}, ns.max_waiting)
        info = async_engine.info
    else:
        if engine is None:
            engine, model_dir = build_engine(ns)
        async_engine = AsyncEngine(engine, engine.args.max_num_seqs, ns.max_waiting)
        info = engine_info(engine, model_dir or engine.model_dir)
    model_dir = info["model_dir"]
    try:
        if tokenizer is None:
            tokenizer = get_tokenizer(info.get("tokenizer_dir") or model_dir)
        if template is not None:
            tokenizer.chat_template = template  # this server's own tokenizer instance
    except BaseException:
        async_engine.shutdown()
        raise
    names = ns.served_model_name or [ns.model]  # vLLM: the --model argument as given
    reasoning = ns.reasoning_parser
    if reasoning is None:  # default: split reasoning only for templates that open <think>
        reasoning = "qwen3" if thinking_template(tokenizer) else "none"
    gen = read_generation_config(model_dir) if ns.generation_config == "auto" else {}
    gen = {k: v for k, v in gen.items() if k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
    return ServerState(
        engine=async_engine, tokenizer=tokenizer, served_names=list(names), model_path=model_dir,
        max_model_len=info["max_model_len"], vocab_size=info["vocab_size"],
        metrics=Metrics(names[0], lambda: async_engine.snapshot),
        reasoning_parser=None if reasoning == "none" else reasoning,
        tool_parser=resolve_tool_parser(ns.tool_call_parser, tokenizer),
        generation_config=gen,
        api_key=ns.api_key or os.environ.get("QWEN3NEXT_API_KEY") or os.environ.get("VLLM_API_KEY") or None,
        exclude_tools_when_none=ns.exclude_tools_when_tool_choice_none,
        strip_reasoning_newlines=ns.strip_reasoning_newlines,
        trust_request_chat_template=ns.trust_request_chat_template,
        cors={"allow_origins": ns.allowed_origins, "allow_methods": ns.allowed_methods,
              "allow_headers": ns.allowed_headers, "allow_credentials": ns.allow_credentials}, eos_ids=frozenset(info["eos_token_ids"]),
        cache_tokens=info["cache_tokens"])


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn, or a one-line ValueError naming --host / --port."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = info[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run_server(ns) -> None:
    """Load the model, serve until SIGINT/SIGTERM, then shut down cleanly.

    On the signal uvicorn stops accepting; open requests get `--shutdown-timeout` seconds to
    finish, then each is aborted with a 503 error (an error event + [DONE] for streams), so every
    client sees a well-formed end and the cache is freed before the process exits.
    """
    import signal
    import threading

    import uvicorn

    from qwen3next.cpu_tuning import tune_for_cpu_serving

    # the port first (as vLLM does): a taken or invalid port is one line now, not after the model loads
    sock = listen_socket(ns.host, ns.port)
    try:
        if not use_engine_process(ns):
            tune_for_cpu_serving(ns.device)  # else the engine process tunes itself
        state = build_state(ns)
    except BaseException:
        sock.close()
        raise
    app = build_app(state)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after shutdown (exit 130 / killed by SIGTERM); a clean
            # shutdown should exit 0, so only install the handlers
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:  # uvicorn logs no address for sockets it did not bind itself
                host, port = sock.getsockname()[:2]
                url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
                logging.getLogger("uvicorn.error").info("Uvicorn running on %s (Press CTRL+C to quit)", url)

        def handle_exit(self, sig, frame):
            if not self.should_exit:
                timer = threading.Timer(ns.shutdown_timeout, state.engine.fail_all,
                                        [APIError("The server is shutting down.", 503)])
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    log.info("serving %s on http://%s:%d/v1", ", ".join(state.served_names), ns.host, ns.port)
    try:  # from here on the engine (its own process on CPU) runs: every way out must stop it
        config = uvicorn.Config(app, host=ns.host, port=ns.port, log_level=ns.log_level,
                                timeout_graceful_shutdown=ns.shutdown_timeout + 5)
        Server(config).run(sockets=[sock])
    finally:
        sock.close()
        state.engine.shutdown()  # idempotent; covers a server that failed before its lifespan ran
