"""The engine core in a process of its own (`qwen3next serve` on CPU): the child's side and the wire.

`main(conn, options)` runs in a spawned child: it builds the `LLMEngine` (CPU tuning applied here,
where the forward runs), answers ("ready", info) or ("error", message), then loops: apply the
commands that arrived (add / abort / stop_sample / stop), step, and send ONE message per step,
("step", outputs, events, stats), with every request's new token ids in plain tuples (cheap to
pickle). It speaks token ids only; text, templates and HTTP stay in the API process
(`engine_client.ProcessEngine`). It ignores SIGINT/SIGTERM: the API process decides when it stops,
and it exits by itself when that process is gone (the pipe reads EOF).
"""

from __future__ import annotations

import argparse
import logging
import signal

from qwen3next.api.engine_setup import ENGINE_FIELDS
from qwen3next.outputs import CompletionOutput, Logprob, RequestOutput

log = logging.getLogger("qwen3next.engine_process")

# the serve arguments the engine needs (build_engine's)
ENGINE_OPTIONS = ("model", "tokenizer", "speculative_config", *ENGINE_FIELDS)


def main(conn, options: dict, log_level: int) -> None:
    """Child process entry point (must stay importable: the spawn context pickles it by name)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    from qwen3next.api.engine_setup import build_engine
    from qwen3next.cpu_tuning import tune_for_cpu_serving

    ns = argparse.Namespace(**options)
    try:
        tune_for_cpu_serving(ns.device)
        engine, model_dir = build_engine(ns)
    except BaseException as e:  # noqa: BLE001 - reported as the CLI's one-line error
        conn.send(("error", str(e) or type(e).__name__))
        return
    conn.send(("ready", engine_info(engine, model_dir)))
    try:
        serve(engine, conn)
    except (EOFError, OSError):  # the API process is gone
        pass
    except BaseException as e:  # noqa: BLE001 - the engine broke: tell the API process, then exit
        log.exception("engine process died")
        try:
            conn.send(("dead", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
    finally:
        engine.shutdown()


def engine_info(engine, model_dir: str) -> dict:
    """What the API process needs to know about the engine (it never sees the engine object)."""
    structured = getattr(engine, "structured", None)  # (its tokenizer: the model's, or --tokenizer's)
    return {"model_dir": model_dir, "tokenizer_dir": getattr(structured, "tokenizer_dir", None) or model_dir,
            "max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size,
            "eos_token_ids": sorted(engine.eos_token_ids), "max_num_seqs": engine.args.max_num_seqs,
            "cache_tokens": engine.cache.plan.num_tokens,
            "speculative": engine.args.speculative_config is not None, "stats": engine.stats}


def serve(engine, conn) -> None:
    """Commands in, one message per step out, until ("stop",) or EOF."""
    last_stats = None
    while True:
        if not engine.has_unfinished_requests():
            conn.poll(None)  # idle: sleep until a command (or EOF) arrives
        events: list = []
        while conn.poll():
            cmd = conn.recv()
            if cmd[0] == "stop":
                return
            apply(engine, cmd, events)
        outs = engine.step() if engine.has_unfinished_requests() else []
        stats = engine.stats
        if outs or events or stats != last_stats:
            conn.send(("step", encode_outputs(outs), events, stats))
            last_stats = stats


def apply(engine, cmd: tuple, events: list) -> None:
    """One command; a request the engine refuses becomes a ("failed", rid, status, message) event."""
    op = cmd[0]
    if op == "add":
        _, rid, ids, params = cmd
        try:
            engine.add_request(rid, ids, params)
        except ValueError as e:
            events.append(("failed", rid, 400, str(e)))
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the loop for everyone
            log.exception("add_request failed")
            events.append(("failed", rid, 500, f"could not start the request: {e}"))
    elif op == "abort":
        engine.abort_request(cmd[1])
    elif op == "stop_sample":
        engine.stop_sequence(*cmd[1:])
    else:
        raise ValueError(f"unknown engine command {op!r}")


# ---- the wire format of a step's outputs: tuples of builtins, rebuilt as RequestOutputs ----

def encode_outputs(outs: list[RequestOutput]) -> list[tuple]:
    return [(o.request_id, o.finished, [(c.index, c.token_ids, c.cumulative_logprob,
                                         None if c.logprobs is None else _encode_logprobs(c.logprobs),
                                         c.finish_reason, c.stop_reason) for c in o.outputs],
             None if o.prompt_logprobs is None else _encode_logprobs(o.prompt_logprobs), o.num_cached_tokens)
            for o in outs]


def _encode_logprobs(lps: list[dict | None]) -> list[list[tuple] | None]:
    # (prompt logprobs start with None)
    return [None if d is None else [(t, lp.logprob, lp.rank) for t, lp in d.items()] for d in lps]


def _decode_logprobs(lps: list[list[tuple] | None]) -> list[dict | None]:
    return [None if d is None else {t: Logprob(lp, rank) for t, lp, rank in d} for d in lps]


def decode_output(item: tuple) -> RequestOutput:
    rid, finished, outputs, prompt_lps, cached = item
    out = RequestOutput(rid, None, [], [
        CompletionOutput(index, "", ids, cum, None if lps is None else _decode_logprobs(lps), reason, stop)
        for index, ids, cum, lps, reason, stop in outputs], finished, num_cached_tokens=cached)
    if prompt_lps is not None:
        out.prompt_logprobs = _decode_logprobs(prompt_lps)
    return out
