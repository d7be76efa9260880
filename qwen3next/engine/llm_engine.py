"""LLMEngine: requests in (token ids + SamplingParams), incremental RequestOutputs out, one step
at a time.

`add_request` validates and queues; `step` schedules, runs the model once, samples, applies stop
rules, forks n > 1 samples off their shared prompt, frees what finished and reports what changed;
`abort_request` frees a request at once (reported as "abort" by the next step). With a
speculative_config the step goes through SpecDecoder (MTP drafts, verify, state rollback) and a
sequence may gain several tokens per step. Prompt logprobs (SamplingParams.prompt_logprobs) are
gathered chunk by chunk during prefill (engine/prompt_logprobs.py) and reported once, with the
request's first output. Structured outputs (SamplingParams.structured_outputs) keep a grammar
matcher per sequence (engine/structured_output.py): the sampler masks those rows, step() feeds
each sampled token back and stops a sequence whose grammar is complete; with speculative decoding
a grammar row's drafts are verified under its masks (spec_decode.py). With enable_prefix_caching
(engine/prefix_cache.py) admission may start a prompt after a cached prefix, and after each step
the cache hashes newly full blocks and snapshots DeltaNet states at boundaries; every output
carries the request's `num_cached_tokens`. The engine is single-threaded; the async server
drives it from one thread.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os

import torch

from qwen3next.engine import prompt_logprobs
from qwen3next.engine.args import EngineArgs
from qwen3next.engine.cache import CacheManager, plan_cache
from qwen3next.engine.model_runner import ModelRunner
from qwen3next.engine.sampler import Sampler
from qwen3next.engine.scheduler import Scheduler
from qwen3next.engine.sequence import Request, Sequence, Status
from qwen3next.engine.spec_decode import SpecDecoder
from qwen3next.engine.structured_output import StructuredOutputs
from qwen3next.env_switches import switch
from qwen3next.outputs import CompletionOutput, RequestOutput
from qwen3next.sampling_params import SamplingParams

logger = logging.getLogger("qwen3next.engine")


def tokenizer_size(model_dir: str) -> int | None:
    """Token count (added tokens included) of the dir's tokenizer.json, None without one: the
    embedding may have more rows than there are tokens, and those ids must never be sampled."""
    file = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(file).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # tokenizers' own message names neither the file nor the problem's kind
        raise ValueError(f"{file} is not a valid tokenizer file: {e}") from None


def read_generation_config(model_dir: str) -> dict:
    """The model's generation_config.json as a dict ({} when absent)."""
    file = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from None


class LLMEngine:
    def __init__(self, model: torch.nn.Module, args: EngineArgs,
                 eos_token_ids: list[int] | tuple[int, ...] = ()):
        """`model` follows the docs/structure.md contract and already sits on its device."""
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.model = model
        self.args = args
        cfg = model.config
        self.vocab_size = cfg.vocab_size
        limit = cfg.max_model_len_limit
        self.max_model_len = args.max_model_len or limit
        if self.max_model_len > limit:
            yarn = "" if cfg.rope.rope_type == "yarn" else (
                "; longer contexts need YaRN rope scaling (hf_overrides / --hf-overrides, see README)")
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the model's limit ({limit}){yarn}")
        if not args.enable_chunked_prefill and args.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens ({args.max_num_batched_tokens}) must be >= "
                             f"max_model_len ({self.max_model_len}) when enable_chunked_prefill is False")
        self.eos_token_ids = frozenset(eos_token_ids)
        spec = model.state_spec()
        # one state slot per running sequence, and k scratch slots each for speculative verify
        k = args.speculative_config.num_speculative_tokens if args.speculative_config else 0
        num_slots = args.max_num_seqs * (1 + k)
        blocks_per_seq = -(-self.max_model_len // args.block_size)
        state_block = args.prefix_caching_state_block if args.enable_prefix_caching else 0
        # (at most max_num_seqs sequences hold blocks: scratch slots never do)
        plan = plan_cache(spec, self.dtype, args.block_size, num_slots,
                          self._budget_bytes(), max_blocks=args.max_num_seqs * blocks_per_seq,
                          snapshot_fraction=args.prefix_caching_state_fraction if state_block else 0.0,
                          state_block=state_block, state_dtype=args.state_dtype())
        # tensor parallel: every rank allocates the same plan (its own heads' shards)
        make_cache = getattr(model, "make_cache_manager", CacheManager)
        self.cache = make_cache(spec, plan, self.dtype, self.device, self.max_model_len,
                                num_scratch_slots=args.max_num_seqs * k, prefix_state_block=state_block)
        self.cache.log_plan(self.max_model_len)
        self.scheduler = Scheduler(self.cache, args.max_num_seqs, args.max_num_batched_tokens,
                                   args.enable_chunked_prefill)
        sampler = Sampler(self.device, args.seed)
        # grammar matchers of structured-output sequences (the tokenizer table is built on first use)
        self.structured = sampler.structured = StructuredOutputs(self.vocab_size, self.eos_token_ids)
        self.runner = ModelRunner(model, self.cache, sampler, self.device)
        self.spec: SpecDecoder | None = None
        graphs = self.device.type == "cuda" and not args.enforce_eager
        if args.speculative_config is not None:
            self.cache.mtp_prefix = self.cache.prefix is not None
            self.spec = SpecDecoder(model, self.cache, sampler, self.device, args.speculative_config,
                                    self.cache.scratch_base, args.max_num_seqs)
            # on by default (engine path GPU-tested: test_spec_decode -k verify_cuda); =0 switches off;
            # one rank only (tensor parallel: decode graphs only, distributed/graphs.py)
            if graphs and args.tensor_parallel_size == 1 and switch("QWEN3NEXT_VERIFY_GRAPHS") == "1":
                self._capture_verify_graphs()
        elif graphs:
            self._capture_cuda_graphs()
        self.requests: dict[str, Request] = {}
        # request id -> prompt logprob entries so far ([None] + one per prefilled position), until
        # reported; the runner appends to these lists
        self._prompt_lps: dict[str, list] = {}
        self.runner.prompt_lps = self._prompt_lps
        self._seq_ids = itertools.count()
        self._pending: list[RequestOutput] = []  # aborts, reported by the next step()
        self.generation_config: dict = {}
        self.model_dir: str | None = None

    @classmethod
    def from_args(cls, args: EngineArgs) -> "LLMEngine":
        """Load `args.model` (a dir or hub id) onto its device and build the engine around it.
        The model's generation_config.json is kept as `engine.generation_config` (a dict)."""
        from qwen3next.config import ModelConfig
        from qwen3next.loader import load_model, resolve_model_dir

        if args.model is None:
            raise ValueError("model must name a checkpoint directory or hub id")
        path = resolve_model_dir(args.model)
        device = args.torch_device()
        dtype = args.torch_dtype(ModelConfig.from_dir(path, args.hf_overrides).dtype, device)
        torch.manual_seed(args.seed)
        # the MTP head only for speculative decoding: without it the cache has no MTP KV layer
        if args.tensor_parallel_size > 1:  # this process becomes rank 0 of N (distributed/)
            from qwen3next.distributed.launch import start

            model, cfg = start(path, args.tensor_parallel_size, dtype, device,
                               with_mtp=args.speculative_config is not None, hf_overrides=args.hf_overrides,
                               load_format=args.load_format)
        else:
            model, cfg = load_model(path, dtype=dtype, device=device,
                                    with_mtp=args.speculative_config is not None, progress=False,
                                    quantization=args.quantization, hf_overrides=args.hf_overrides,
                                    load_format=args.load_format)
        (getattr(model, "inner", model)).sampled_vocab_size = tokenizer_size(path)
        gen = read_generation_config(path)
        eos = gen.get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else list(eos or cfg.eos_token_id)
        try:
            engine = cls(model, args, eos)
        except BaseException:
            if args.tensor_parallel_size > 1:  # don't leave the workers waiting
                model.shutdown()
            raise
        engine.generation_config = gen
        engine.model_dir = engine.structured.tokenizer_dir = path
        return engine

    def _budget_bytes(self) -> int:
        a = self.args
        if a.kv_cache_memory_bytes is not None:
            return a.kv_cache_memory_bytes
        if self.device.type == "cuda":
            peak = self._profile_activations()
            free, total = torch.cuda.mem_get_info(self.device)
            # vLLM's rule: this process may use gpu_memory_utilization of the whole device
            budget = int(a.gpu_memory_utilization * total - (total - free) - peak)
            logger.info("GPU: %.2f GiB total, %.2f GiB free after loading, %.2f GiB activation peak",
                        total / (1 << 30), free / (1 << 30), peak / (1 << 30))
            return budget
        return 4 << 30  # CPU: vLLM's default KV space (capped by what max_num_seqs can use)

    def _capture_cuda_graphs(self) -> None:
        """Compile every prefill batch-size class, then capture the decode steps (cuda_graph.py)."""
        from qwen3next.engine.cuda_graph import CudaGraphRunner

        a = self.args
        # tensor parallel: the driver's runner captures and replays on every rank in step
        make = getattr(self.model, "graph_runner", None) or functools.partial(CudaGraphRunner, self.model)
        graphs = make(self.cache.cache, self.cache.max_blocks_per_seq, a.max_num_seqs)
        graphs.warmup_prefill(a.max_num_seqs, a.max_num_batched_tokens)
        graphs.capture()
        self.runner.graphs = graphs

    def _capture_verify_graphs(self) -> None:
        """CUDA graphs of the speculative verify forward with all k drafts (cuda_graph.py)."""
        from qwen3next.engine.cuda_graph import VerifyGraphRunner

        graphs = VerifyGraphRunner(self.model, self.cache.cache, self.cache.max_blocks_per_seq,
                                   self.args.max_num_seqs, self.spec.k + 1)
        graphs.capture()
        self.spec.verify_graphs = graphs

    @torch.inference_mode()
    def _profile_activations(self) -> int:
        """Peak bytes a cache-less forward of a full step (max_num_batched_tokens) allocates."""
        from qwen3next.forward_batch import ForwardBatch

        dev = self.device
        n = min(self.args.max_num_batched_tokens, self.max_model_len)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        ids = torch.zeros(n, dtype=torch.long, device=dev)
        hidden = self.model(ids, torch.arange(n, device=dev), ForwardBatch.full([n], dev))
        self.model.compute_logits(hidden[-min(n, self.args.max_num_seqs):])
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        del ids, hidden
        torch.cuda.empty_cache()
        return peak

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent; also done at exit)."""
        stop = getattr(self.model, "shutdown", None)
        if stop is not None:
            stop()

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling_params: SamplingParams | None = None) -> None:
        params = sampling_params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        ids = list(prompt_token_ids)
        if not ids:
            raise ValueError("prompt_token_ids must not be empty")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"prompt_token_ids must be integers in [0, {self.vocab_size})")
        bad = [t for t in params.logit_bias or () if t >= self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias: token id {bad[0]} is out of range [0, {self.vocab_size})")
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - len(ids)
        total = len(ids) + max_tokens
        if params.max_tokens is None and max_tokens < 1:
            raise ValueError(f"prompt ({len(ids)} tokens) leaves no room for output tokens within "
                             f"max_model_len ({self.max_model_len})")
        if max_tokens < 1 or total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len ({self.max_model_len})"
            )
        # the last sampled token is never written to the cache
        if self.cache.blocks_needed(total - 1) > self.cache.plan.num_blocks:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) needs more KV blocks "
                f"than the whole cache holds ({self.cache.plan.num_tokens} tokens); raise "
                f"kv_cache_memory_bytes or lower max_tokens"
            )
        req = Request(request_id, ids, params, self.eos_token_ids, total)
        for i in range(params.n):
            req.seqs.append(Sequence(next(self._seq_ids), req, i, self.device))
        if params.structured_outputs is not None:
            self.structured.add([s.seq_id for s in req.seqs], params)
        first = req.seqs[0]
        first.children = req.seqs[1:]
        for child in first.children:
            child.status = Status.FORK
        self.requests[request_id] = req
        if params.prompt_logprobs is not None:
            self._prompt_lps[request_id] = [None]
        self.scheduler.add(first)

    def abort_request(self, request_id: str) -> None:
        """Free the request's cache now; the next step() reports it finished with "abort".
        Unknown or already finished ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        self._prompt_lps.pop(request_id, None)
        out = RequestOutput(request_id, None, req.prompt_token_ids, finished=True,
                            num_cached_tokens=req.num_cached_tokens or 0)
        for seq in req.seqs:
            self.structured.free(seq.seq_id)
            if seq.status is Status.FINISHED:
                continue
            self.scheduler.remove(seq)
            self.cache.free(seq)
            seq.status = Status.FINISHED
            seq.finish_reason = "abort"
            out.outputs.append(self._delta(seq))
        self._pending.append(out)

    def stop_sequence(self, request_id: str, index: int, stop_reason: int | str | None = None) -> None:
        """Finish one sample with "stop" (a stop string found above the engine) and free its cache.
        When that was the request's last running sample, the next step() reports it finished."""
        req = self.requests.get(request_id)
        if req is None or index >= len(req.seqs) or req.seqs[index].status is Status.FINISHED:
            return
        seq = req.seqs[index]
        self.scheduler.remove(seq)
        self.cache.free(seq)
        self.structured.free(seq.seq_id)
        seq.status = Status.FINISHED
        seq.finish_reason, seq.stop_reason = "stop", stop_reason
        if req.finished:
            del self.requests[request_id]
            self._prompt_lps.pop(request_id, None)
            out = RequestOutput(request_id, None, req.prompt_token_ids, finished=True,
                                num_cached_tokens=req.num_cached_tokens or 0)
            out.outputs.append(self._delta(seq))
            self._pending.append(out)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests or self._pending)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    @property
    def stats(self) -> dict:
        c, s = self.cache, self.scheduler
        out = {
            "num_requests_running": len(s.running),
            "num_requests_waiting": len(s.waiting),
            "num_preemptions": s.num_preemptions,
            "kv_blocks_total": c.plan.num_blocks,
            "kv_blocks_used": c.plan.num_blocks - c.num_free_blocks,
            "state_slots_total": c.scratch_base,
            "state_slots_used": c.scratch_base - c.num_free_slots,
        }
        if self.spec is not None:
            out["spec_decode"] = self.spec.stats.as_dict()
        if c.prefix is not None:
            out["prefix_cache"] = c.prefix.as_dict()
        return out

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        sched = self.scheduler.schedule()
        if not sched.seqs:
            return outputs
        if self.spec is not None:
            return self._spec_step(sched, outputs)
        rows, sampled = self.runner.execute(sched)
        for seq, n in zip(sched.seqs, sched.num_new_tokens):
            seq.num_computed_tokens += n
            if self.cache.prefix is not None:  # hash full blocks, snapshot at a boundary
                self.cache.commit(seq)
        if not rows:
            return outputs
        finished = []
        grammars = self.structured.rows
        for i, (seq, tok) in enumerate(zip(rows, sampled.token_ids)):
            seq.token_ids.append(tok)
            if seq.logprobs is not None:
                seq.logprobs.append(sampled.logprobs[i])
                seq.cumulative_logprob += sampled.chosen_logprobs[i]
            req = seq.request
            # the cheap necessary condition first: most tokens stop nothing
            if ((tok in req.eos_ids or tok in req.stop_ids or len(seq.token_ids) >= req.max_len)
                    and self._check_stop(seq, tok)):
                finished.append(seq)
            elif grammars and self.structured.advance(seq, tok):  # its grammar is complete
                seq.finish_reason = "stop"
                finished.append(seq)
        return self._finish_step(rows, finished, outputs)

    def _spec_step(self, sched, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """step() with speculative decoding: each row may bring several tokens; a stop inside the
        run drops the rest. The MTP then catches up and drafts (before forks copy the cache)."""
        res = self.spec.execute(sched)
        if self._prompt_lps:  # prompt chunks' trunk hidden rows are in res.hidden
            items = []
            for seq, n, h in zip(sched.seqs, res.computed, res.hidden):
                c = seq.num_computed_tokens
                sp = prompt_logprobs.span(seq, c, n, self._prompt_lps) if n else None
                if sp:
                    items.append((seq, sp[0], h[sp[0] - c:sp[1] - c]))
            if items:
                prompt_logprobs.collect(self.model, items, self._prompt_lps)
        for seq, n in zip(sched.seqs, res.computed):
            seq.num_computed_tokens += n
        finished = []
        grammars = self.structured.rows
        for i, seq in enumerate(res.rows):
            for j, tok in enumerate(res.tokens[i]):
                seq.token_ids.append(tok)
                if seq.logprobs is not None:
                    seq.logprobs.append(res.logprobs[i][j])
                    seq.cumulative_logprob += res.chosen_logprobs[i][j]
                if self._check_stop(seq, tok):
                    finished.append(seq)
                    break
                if grammars and self.structured.advance(seq, tok):  # its grammar is complete
                    seq.finish_reason = "stop"
                    finished.append(seq)
                    break
        # n > 1 parents that completed their prompt: what their children's MTP catch-up needs
        fork_src = {seq.seq_id: (list(seq.mtp_pending), seq.mtp_pending_start, seq.num_computed_tokens - n, h)
                    for seq, n, h in zip(sched.seqs, res.computed, res.hidden) if seq.children and n}
        self.spec.propose(sched, res, {s.seq_id for s in res.rows})
        if self.cache.prefix is not None:  # (after the MTP catch-up wrote its KV)
            for seq, n, h in zip(sched.seqs, res.computed, res.hidden):
                # (a sequence that finished got no MTP catch-up for this step's positions)
                if n and seq.finish_reason is None:
                    self.cache.commit(seq, h[-1])
        if not res.rows:
            return outputs
        return self._finish_step(res.rows, finished, outputs, fork_src)

    def _finish_step(self, rows: list[Sequence], finished: list[Sequence],
                     outputs: list[RequestOutput], fork_src: dict | None = None) -> list[RequestOutput]:
        """Forks, frees what finished and reports every row's new tokens."""
        for seq in rows:
            if seq.children:
                self._fork(seq, fork_src.get(seq.seq_id) if fork_src else None)
        for seq in finished:
            self.cache.free(seq)
            self.structured.free(seq.seq_id)
            seq.status = Status.FINISHED
        if finished:
            self.scheduler.drop_finished()
        by_request: dict[str, RequestOutput] = {}  # n > 1 requests: one output for all samples
        plp = self._prompt_lps
        for seq in rows:
            req = seq.request
            if len(req.seqs) == 1:
                done = seq.status is Status.FINISHED
                out = RequestOutput(req.request_id, None, req.prompt_token_ids, [self._delta(seq)], done,
                                    num_cached_tokens=req.num_cached_tokens or 0)
                outputs.append(out)
                if plp and req.request_id in plp:
                    # a sampled row has its whole prompt computed: the entries are complete
                    out.prompt_logprobs = plp.pop(req.request_id)
                if done:
                    del self.requests[req.request_id]
                continue
            out = by_request.get(req.request_id)
            if out is None:
                out = by_request[req.request_id] = RequestOutput(
                    req.request_id, None, req.prompt_token_ids, num_cached_tokens=req.num_cached_tokens or 0)
                outputs.append(out)
                if plp and req.request_id in plp:
                    out.prompt_logprobs = plp.pop(req.request_id)
            out.outputs.append(self._delta(seq))
        for rid, out in by_request.items():
            if self.requests[rid].finished:
                out.finished = True
                del self.requests[rid]
        return outputs

    def _check_stop(self, seq: Sequence, tok: int) -> bool:
        req = seq.request
        if seq.num_output_tokens >= req.params.min_tokens:
            if tok in req.eos_ids:
                seq.finish_reason = "stop"
                return True
            if tok in req.stop_ids:
                seq.finish_reason, seq.stop_reason = "stop", tok
                return True
        if seq.num_tokens >= req.max_len:
            seq.finish_reason = "length"
            return True
        return False

    def _fork(self, parent: Sequence, src: tuple | None = None) -> None:
        """The prompt is prefilled and every sample has its first token: give each unfinished
        child a copy of the parent's cache, or queue it for recompute when none is free.

        Speculative decoding (`src`: the parent's deferred catch-up, its start, the step's first
        position and trunk hidden rows, taken before SpecDecoder.propose): the MTP KV of the last
        prompt position pairs it with the next token, the parent's own; each child gets its own
        copy of that block and redoes the catch-up from there with its own token."""
        for child in parent.children:
            if child.finish_reason is not None:
                continue
            if (len(self.scheduler.running) < self.args.max_num_seqs
                    and self.cache.fork(parent, child, copy_last=src is not None)):
                if src is not None:
                    self._fork_mtp_catch_up(parent, child, *src)
                child.status = Status.RUNNING
                self.scheduler.running.append(child)
            else:
                self.scheduler.add(child)
        parent.children = []

    @staticmethod
    def _fork_mtp_catch_up(parent: Sequence, child: Sequence, pending: list, start: int, first: int,
                           hidden: torch.Tensor) -> None:
        """The positions whose MTP KV the child must (re)compute, as a deferred catch-up."""
        if parent.finish_reason is not None:  # finished at its first token: nothing was caught up
            child.mtp_pending = pending + [hidden.clone()]  # (a copy: the step's [T, H] is not kept alive)
            child.mtp_pending_start = start if pending else first
        elif parent.mtp_pending:  # the parent's catch-up was deferred: the child replays it alike
            child.mtp_pending, child.mtp_pending_start = list(parent.mtp_pending), parent.mtp_pending_start
        else:  # caught up with the parent's token: only the last position differs
            child.mtp_pending, child.mtp_pending_start = [hidden[-1:].clone()], parent.num_computed_tokens - 1

    @staticmethod
    def _delta(seq: Sequence) -> CompletionOutput:
        """What the sequence produced since it was last reported."""
        start = seq.num_prompt_tokens + seq.num_reported
        new = seq.token_ids[start:]
        lps = None
        if seq.logprobs is not None:
            lps = seq.logprobs[seq.num_reported:]
        seq.num_reported += len(new)
        cum = seq.cumulative_logprob if seq.logprobs is not None else None
        return CompletionOutput(seq.index, "", new, cum, lps, seq.finish_reason, seq.stop_reason)
