"""The `qwen3next` command: serve | generate | chat (+ train / eval when the training package is present).

`serve` starts the OpenAI-compatible server (imports FastAPI only then), `generate` completes one
raw prompt, `chat` is an interactive chat that shows the model's thinking apart from its answer.
--model defaults to the packaged demo model. Errors print as one line (no traceback), exit code 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import uuid

from .env_switches import check_all

DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model")


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model dir or hub id (default: the packaged demo model)")
    p.add_argument("--tokenizer", help="tokenizer dir or hub id (default: the model's; vLLM's flag), e.g. "
                                       "for a dir holding config.json alone under --load-format dummy")
    # vLLM's spellings half / float name float16 / float32
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   type=lambda v: {"half": "float16", "float": "float32"}.get(v, v),
                   help="auto | float32 (float) | bfloat16 | float16 (half)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--kv-cache-memory-bytes", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--block-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--tensor-parallel-size", "-tp", type=int,
                   help="ranks to split the model over (one process each; cuda:0..N-1 on GPUs)")
    p.add_argument("--speculative-config",
                   help='MTP speculative decoding, vLLM\'s JSON: {"method": "qwen3_next_mtp", '
                        '"num_speculative_tokens": 1..4}')
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the KV blocks and DeltaNet state snapshots of earlier prompts' shared "
                        "prefixes (default off)")
    p.add_argument("--prefix-caching-state-block", type=int,
                   help="tokens between DeltaNet state snapshots, a multiple of --block-size (default 256, rounded up to one; "
                        "larger on GPUs: a prompt's prefill stops at each boundary that needs one)")
    p.add_argument("--hf-overrides",
                   help="config.json keys to change at load, as JSON (vLLM's flag), e.g. YaRN for 1M tokens: "
                        '\'{"rope_scaling": {"rope_type": "yarn", "factor": 4.0, '
                        '"original_max_position_embeddings": 262144}}\'')
    # accepted so vLLM command lines run unchanged: this architecture's code is built in, and the
    # KV cache is kept in the model dtype (an fp8 KV cache is not implemented: argparse names the choice)
    p.add_argument("--trust-remote-code", action="store_true", help="accepted for vLLM compatibility; no effect")
    p.add_argument("--kv-cache-dtype", choices=["auto"], help="auto only: the KV cache in the model dtype")
    p.add_argument("--mamba-ssm-cache-dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the DeltaNet recurrent states between steps (vLLM's flag; auto: float32); "
                        "bfloat16 halves their memory and the bytes each decode step moves")
    p.add_argument("--load-format", choices=["auto", "safetensors", "dummy"],
                   help="auto / safetensors: the checkpoint's safetensors; dummy: config.json only, random weights "
                        "(benchmarks)")
    p.add_argument("--quantization", "-q", choices=["auto", "fp8"],
                   help="fp8: block-FP8 weights on the GPU (quantises a bf16 checkpoint at load); "
                        "auto (default): FP8 checkpoints stay FP8 on one GPU, are dequantised on CPU")


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, e.g. '[\"*\"]', got {text!r}")
    return value


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3next", description="Run, serve and train Qwen3-Next models.")
    parser.add_argument("--verbose", "-v", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    for flag in ("--allowed-origins", "--allowed-methods", "--allowed-headers"):
        s.add_argument(flag, type=_json_list, default=["*"], help="CORS, a JSON list (vLLM's flag; default [\"*\"])")
    s.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials (vLLM's flag)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (or $QWEN3NEXT_API_KEY)")
    s.add_argument("--served-model-name", nargs="+", help="names clients may ask for (default: --model)")
    s.add_argument("--reasoning-parser", choices=["qwen3", "deepseek_r1", "none"],
                   help="split <think> output into reasoning_content (default: qwen3 if the template "
                        "opens <think>, else none)")
    s.add_argument("--chat-template", help="a Jinja file or template text replacing the model's own")
    s.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests bring their own chat_template (vLLM's flag; off: such a request is a "
                        "400, since its Jinja runs in the server)")
    s.add_argument("--tool-call-parser", choices=["auto", "hermes", "qwen3_coder", "none"], default="auto",
                   help="tool-call format read from the output: hermes (JSON in <tool_call>), qwen3_coder "
                        "(Qwen3-Coder's XML); auto: qwen3_coder if the chat template writes calls as "
                        "<function=...>, else hermes")
    s.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM command lines; auto tool choice is always on")
    s.add_argument("--max-waiting", type=int, default=256,
                   help="sequences allowed to wait beyond --max-num-seqs before answering 503")
    s.add_argument("--generation-config", choices=["auto", "vllm"], default="auto",
                   help="auto: unset sampling fields take the model's generation_config.json")
    s.add_argument("--exclude-tools-when-tool-choice-none", action="store_true")
    s.add_argument("--strip-reasoning-newlines", action="store_true",
                   help="drop the newlines around </think> in reasoning/content (not vLLM-exact)")
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds open requests get to finish on SIGINT/SIGTERM")
    s.add_argument("--log-level", default="info", type=str.lower,
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    s.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run the engine in a process of its own, the API in this one (default: on "
                        "when serving on CPU, off on GPUs)")
    s.set_defaults(func=cmd_serve)

    g = sub.add_parser("generate", help="complete one raw prompt (no chat template)")
    _engine_args(g)
    _sampling_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat; thinking is shown apart from the answer")
    _engine_args(c)
    _sampling_args(c)
    c.add_argument("--system", help="system prompt")
    c.set_defaults(func=cmd_chat)

    try:
        from qwen3next.train.cli import add_subcommands
    except ImportError:
        add_subcommands = None
    if add_subcommands is not None:
        add_subcommands(sub)
    return parser


def resolve_model(ns) -> None:
    if ns.model:
        return
    if os.path.isfile(os.path.join(DEMO_MODEL, "config.json")):
        ns.model = DEMO_MODEL
        return
    raise ValueError("no --model given and the demo model is not installed "
                     f"({DEMO_MODEL}); pass --model DIR_or_hub_id")


def cmd_serve(ns) -> int:
    if ns.max_waiting < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {ns.max_waiting}")
    if ns.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {ns.shutdown_timeout}")
    resolve_model(ns)
    if ns.served_model_name is None and ns.model == DEMO_MODEL:
        ns.served_model_name = ["qwen3next-demo"]  # not the install path
    from qwen3next.api.server import run_server

    run_server(ns)
    return 0


def _session(ns):
    """(engine, tokenizer, generation defaults) for generate/chat."""
    from qwen3next.api.engine_setup import build_engine, tokenizer_path
    from qwen3next.loader import resolve_model_dir
    from qwen3next.tokenizer import get_tokenizer, read_generation_config

    resolve_model(ns)
    # a missing or bad tokenizer fails before the (80B: minutes-long) model load
    tokenizer = get_tokenizer(tokenizer_path(ns.tokenizer) or resolve_model_dir(ns.model))
    engine, model_dir = build_engine(ns)
    return engine, tokenizer, read_generation_config(model_dir)


def _params(ns, gen: dict):
    from qwen3next.sampling_params import SamplingParams

    kw = {k: getattr(ns, k) for k in ("temperature", "top_p", "top_k") if getattr(ns, k) is not None}
    return SamplingParams(max_tokens=ns.max_tokens, seed=ns.seed, **kw).with_generation_config(gen)


def _stream(engine, tok, ids: list[int], params, stopped=lambda: False):
    """Yield text deltas of one request, stepping the engine in this thread (until `stopped()`,
    asked between steps)."""
    from qwen3next.api.text_stream import TextStream

    if len(ids) + params.max_tokens > engine.max_model_len:
        params.max_tokens = max(1, engine.max_model_len - len(ids))
    rid = uuid.uuid4().hex
    text = TextStream(tok, params.stop, params.skip_special_tokens)
    engine.add_request(rid, ids, params)
    try:
        while engine.has_unfinished_requests() and not stopped():
            for out in engine.step():
                if out.request_id != rid:  # e.g. the "abort" report of a reply stopped by Ctrl-C
                    continue
                for co in out.outputs:
                    yield text.add([t for t in co.token_ids if t not in engine.eos_token_ids])
                    if co.finish_reason is not None:
                        yield text.finish()
                        return
    finally:
        engine.abort_request(rid)


def cmd_generate(ns) -> int:
    engine, tok, gen = _session(ns)
    if ns.chat:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": ns.prompt}]))
    else:
        ids = tok.encode(ns.prompt)
    if not ids:
        raise ValueError("--prompt must not be empty")
    for delta in _stream(engine, tok, ids, _params(ns, gen)):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(ns) -> int:
    from qwen3next.api.engine_setup import thinking_template
    from qwen3next.parsers import ReasoningStream

    engine, tok, gen = _session(ns)
    thinking = thinking_template(tok)
    dim, reset = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
    history = [{"role": "system", "content": ns.system}] if ns.system else []
    print("qwen3next chat: /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if ns.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = tok.encode(tok.apply_chat_template(history))
        if len(ids) >= engine.max_model_len:  # the session goes on: the user can /reset
            history.pop()
            print(f"error: the conversation ({len(ids)} tokens) no longer fits in max_model_len "
                  f"({engine.max_model_len}); /reset starts over", file=sys.stderr)
            continue
        split = ReasoningStream(strip_newlines=True) if thinking else None
        answer, shown_thinking = "", False
        with _CtrlC() as ctrl_c:
            for delta in _stream(engine, tok, ids, _params(ns, gen), stopped=lambda: ctrl_c.hit):
                reasoning, content = split.feed(delta) if split else ("", delta)
                if reasoning:
                    if not shown_thinking:
                        sys.stdout.write(f"{dim}[thinking] ")
                        shown_thinking = True
                    sys.stdout.write(reasoning)
                if content:
                    if shown_thinking and not answer:
                        sys.stdout.write(f"{reset}\n\n")
                    answer += content
                    sys.stdout.write(content)
                sys.stdout.flush()
        if ctrl_c.hit:  # the reply was stopped: the turn is dropped from the history
            sys.stdout.write(f"{reset}\n[interrupted]\n")
            history.pop()
            continue
        if split is not None:
            sys.stdout.write(split.finish()[0])
        sys.stdout.write(f"{reset}\n")
        history.append({"role": "assistant", "content": answer})


class _CtrlC:
    """Ctrl-C while a chat reply streams stops that reply, not the chat: SIGINT only sets `hit`,
    which `_stream` reads between engine steps (an interrupt inside a step could leave the cache
    half-updated)."""

    def __enter__(self):
        self.hit = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, sig, frame):
        self.hit = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if getattr(ns, "func", None) is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        check_all()  # a mistyped QWEN3NEXT_* switch: one line now, not a silent default later
        return int(ns.func(ns) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's contract: one line, no traceback
        if ns.verbose:
            logging.exception("failed")
        print(f"error: {e}", file=sys.stderr)
        return 1
