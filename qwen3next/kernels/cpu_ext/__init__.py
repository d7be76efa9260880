"""The fused C++ CPU kernels (kernels.cpp): built with torch.utils.cpp_extension on first use and
cached (under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions: one folder per Python,
torch and source version; scripts/setup.sh prebuilds it). `get()` returns the loaded module, or
None when switched off (QWEN3NEXT_CPU_EXT=0 or QWEN3NEXT_KERNELS=torch) or when the build fails:
one warning is logged and the torch paths stay in charge. `usable(*tensors)` says whether float32 CPU tensors can go to it; the wrappers below
assume it said yes (no environment checks: this is the per-op path of every decode step).
The kernels compute in float32 only; a bf16 / fp16 recurrent state pool (mamba_ssm_cache_dtype)
reaches `gdn_varlen` as an fp32 copy of the slots the call touches, rounded back after it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import time

import torch

logger = logging.getLogger(__name__)
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.cpp")


# os.environ's underlying dict (bytes keys on POSIX): a lookup there costs ~50 ns, os.environ.get
# ~1 us (it encodes the key), and these switches are read by every op of every decode step.
_ENV = getattr(os.environ, "_data", None) if os.name == "posix" else None


def env(name: str, default: str = "") -> str:
    """os.environ.get(name, default), read live (tests flip the switches) but cheaply."""
    if _ENV is None:
        return os.environ.get(name, default)
    v = _ENV.get(name.encode())
    return default if v is None else v.decode()


def enabled() -> bool:
    """Not switched off by the environment (read on every call, so tests can flip it)."""
    if _ENV is None:
        return env("QWEN3NEXT_CPU_EXT", "1") != "0" and env("QWEN3NEXT_KERNELS").lower() != "torch"
    off, kernels = _ENV.get(b"QWEN3NEXT_CPU_EXT"), _ENV.get(b"QWEN3NEXT_KERNELS")
    return off != b"0" and (kernels is None or kernels.lower() != b"torch")


def _flags() -> tuple[str, list[str]]:
    """(module name, compiler flags). -fopenmp: at::parallel_for's OpenMP pragmas are compiled in;
    the float flags let dot-product reductions vectorise (no -ffast-math: infinities stay);
    AVX2 + FMA only where torch itself found them (the build runs on the machine that uses it).
    The name carries a hash of the source and flags: torch caches builds by name, and two
    checkouts (or an edit while another process builds) must never load each other's module."""
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math"]
    flavour = "base"
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags, flavour = flags + ["-mavx2", "-mfma"], "avx2"
    with open(_SOURCE, "rb") as f:
        digest = hashlib.sha1(f.read() + " ".join(flags).encode()).hexdigest()[:12]
    return f"qwen3next_cpu_ext_{flavour}_{digest}", flags


# A build takes ~25 s; a lock file much older than that was left by a killed build, and torch would
# wait on it forever.
_STALE_LOCK_S = 600


def _build_dir(name: str) -> str:
    """One folder per (Python, torch, source + flags) under torch's extension root: concurrent
    processes building the same module share it safely (torch's lock file), others never meet."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    tag = f"qwen3next-py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__.split('+')[0]}"
    path = os.path.join(root, tag, name)
    os.makedirs(path, exist_ok=True)
    lock = os.path.join(path, "lock")
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > _STALE_LOCK_S:
        logger.warning("qwen3next: removing a stale C++ build lock %s", lock)
        os.remove(lock)
    return path


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the pip package's binary sits in the venv's bin, which is not
    on PATH when the venv's python is run without activating it."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.lru_cache(maxsize=1)
def _build():
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()
        name, flags = _flags()
        return load(name=name, sources=[_SOURCE], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                    build_directory=_build_dir(name), verbose=False)
    except Exception as e:  # no compiler, headers, ...: the torch paths keep working
        msg = str(e).strip().splitlines()
        logger.warning("qwen3next: C++ CPU kernels unavailable, using the torch paths (%s: %s)",
                       type(e).__name__, msg[0] if msg else "")
        return None


def get():
    """The extension module, or None (switched off, or the build failed)."""
    return _build() if enabled() else None


def usable(*tensors) -> bool:
    """All given tensors (None skipped) are float32 on the CPU and the extension loads. On the
    per-op path of every decode step: attribute checks only (a device object costs more)."""
    for t in tensors:
        if t is not None and (t.dtype is not torch.float32 or not t.is_cpu):
            return False
    return get() is not None


_NO_BOOL = torch.empty(0, dtype=torch.bool)
_NO_LONG = torch.empty(0, dtype=torch.long)
_NO_FLOAT = torch.empty(0, dtype=torch.float32)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with a contiguous last dim (row strides are free for the kernels)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _long(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor) and x.dtype is torch.long and x.is_contiguous():
        return x
    return torch.as_tensor(x, dtype=torch.long).contiguous()


_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def gdn_ok(m, a, b, conv_weight, conv_state, recurrent_state, A_log, dt_bias) -> bool:
    """The fused DeltaNet kernel can take these: float32 CPU (the recurrent pool fp32, bf16 or fp16),
    state pools contiguous (written in place)."""
    return (usable(m, a, b, conv_weight, conv_state, A_log, dt_bias)
            and recurrent_state.dtype in _STATE_DTYPES and recurrent_state.is_cpu
            and conv_state.is_contiguous() and recurrent_state.is_contiguous())


def gdn_varlen(m, a, b, conv_weight, conv_state, recurrent_state, cu_seqlens, state_slots, has_initial_state,
               per_token_state_slots, A_log, dt_bias, num_k_heads: int) -> torch.Tensor:
    """Same contract as kernels/gdn.gdn_cached (float32; state_slots < 0: sequence skipped, o = 0)."""
    has = _NO_BOOL if has_initial_state is None else has_initial_state.to(torch.bool).contiguous()
    pts = _NO_LONG if per_token_state_slots is None else _long(per_token_state_slots)
    if recurrent_state.dtype is not torch.float32:
        return _gdn_narrow_pool(m, a, b, conv_weight, conv_state, recurrent_state, cu_seqlens, _long(state_slots),
                                has, pts, A_log, dt_bias, num_k_heads)
    return _build().gdn_varlen(_rows(m), _rows(a), _rows(b), _rows(conv_weight), conv_state, recurrent_state,
                            _long(cu_seqlens), _long(state_slots), has, pts, A_log.contiguous(),
                            dt_bias.contiguous(), num_k_heads)


def _gdn_narrow_pool(m, a, b, conv_weight, conv_state, pool, cu_seqlens, slots, has, pts, A_log, dt_bias,
                     num_k_heads: int) -> torch.Tensor:
    """gdn_varlen on a bf16 / fp16 recurrent pool: the slots the call reads or writes (sequence and
    per-token slots) gathered into pools of their own (the recurrent one in fp32; the conv one too,
    as the slot ids index both), the kernel run on them with the slot ids renumbered, the rows
    copied back (rounded into `pool`): O(slots) copies around the kernel."""
    used = torch.cat([slots, pts]) if pts.numel() else slots
    rows = torch.unique(used[used >= 0])  # sorted distinct slots
    renum = torch.full((pool.shape[0],), -1, dtype=torch.long)
    renum[rows] = torch.arange(rows.numel())

    def local(s: torch.Tensor) -> torch.Tensor:
        return torch.where(s >= 0, renum[s.clamp(min=0)], -1) if s.numel() else s

    tmp, conv = pool.index_select(0, rows).float(), conv_state.index_select(0, rows)
    o = gdn_varlen(m, a, b, conv_weight, conv, tmp, cu_seqlens, local(slots), has if has.numel() else None,
                   local(pts) if pts.numel() else None, A_log, dt_bias, num_k_heads)
    pool.index_copy_(0, rows, tmp.to(pool.dtype))
    conv_state.index_copy_(0, rows, conv)
    return o


def paged_attention_ok(q, kv_cache) -> bool:
    return usable(q, kv_cache) and kv_cache.is_contiguous()


def paged_attention(q, kv_cache, block_tables, cu_seqlens, context_lens, scale) -> torch.Tensor:
    """Same contract as kernels/attention.paged_attention (float32)."""
    return _build().paged_attention(_rows(q), kv_cache, _long(block_tables), _long(cu_seqlens), _long(context_lens),
                                 float(scale))


def moe_dense_act(y, shared_inter: int, num_experts: int, inter: int, top_k: int, norm_topk_prob: bool):
    """Same contract as cpu_fast.moe_dense_act (float32)."""
    return _build().moe_dense_act(_rows(y), shared_inter, num_experts, inter, top_k, bool(norm_topk_prob))


def zc_rmsnorm(x, weight, eps, residual=None):
    """Same contract as norm.zc_rmsnorm (float32; weight [D] or per-head [heads, D])."""
    res = _NO_FLOAT if residual is None else residual.contiguous()
    out = _build().rms_norm(x.contiguous(), weight.contiguous(), float(eps), res, True)
    return out[0] if residual is None else (out[0], out[1])


def gated_rmsnorm(x, z, weight, eps):
    """Same contract as norm.gated_rmsnorm for x, z [T, heads, D] (float32)."""
    return _build().gated_rmsnorm(x.contiguous(), _rows(z), weight.contiguous(), float(eps))


def apply_rotary(x, cos, sin):
    """Same contract as rotary.apply_rotary (float32)."""
    return _build().apply_rotary(_rows(x), _rows(cos), _rows(sin))


def write_kv(k, v, kv_cache, slot_mapping) -> None:
    """Same contract as attention.write_kv (float32, contiguous cache)."""
    _build().write_kv(_rows(k), _rows(v), kv_cache, _long(slot_mapping))


def gate_output(o, gate):
    """o * sigmoid(gate) for o, gate [T, heads, D] (float32)."""
    return _build().gate_output(o.contiguous(), _rows(gate))


def moe_route(router_logits, top_k: int, norm_topk_prob: bool):
    """Same contract as moe.moe_route (float32 logits)."""
    w, ids = _build().moe_route(_rows(router_logits), top_k, bool(norm_topk_prob))
    return w, ids


def moe_experts(x, gate_up_proj, down_proj, weights, ids):
    """Same contract as moe.moe_experts (float32; contiguous expert weights)."""
    return _build().moe_experts(x.contiguous(), gate_up_proj.contiguous(), down_proj.contiguous(),
                                weights.float().contiguous(), _long(ids))


def linear_fits(x, w) -> bool:
    """x [M, K] @ w[N, K]^T has `linear`'s layout: 2-D, w row-major, K a multiple of 8 (dtype and
    device are `usable`'s to check)."""
    return x.dim() == 2 and w.dim() == 2 and x.shape[1] % 8 == 0 and w.is_contiguous()


def linear(x, w):
    """x @ w.T (float32) with each weight row read once for all rows of x; every output row as
    computed for that row alone (bitwise, whatever the number of rows)."""
    return _build().linear(_rows(x), w)


def mtp_forward(ids, hidden, positions, inv_freq, attention_factor, cos, sin, kv_caches, block_tables, cu_seqlens,
                context_lens, slot_mapping, rows, weights, num_heads: int, top_k: int, norm_topk_prob: bool,
                eps: float, scale: float):
    """The MTP head's forward with a cache in one call (kernels.cpp mtp_forward; mtp.py's torch path
    is the reference): -> [len(rows), H] after the final norm (rows None: all). cos, sin [T, d]
    (None: computed from inv_freq). KV written in place."""
    return _build().mtp_forward(_long(ids), hidden.contiguous(), _long(positions), inv_freq, float(attention_factor),
                                cos, sin, kv_caches, _long(block_tables), _long(cu_seqlens), _long(context_lens),
                                _long(slot_mapping), None if rows is None else _long(rows), weights, num_heads, top_k,
                                bool(norm_topk_prob), float(eps), float(scale))


def mtp_draft_greedy(ids, hidden, positions, inv_freq, attention_factor, cos, sin, kv_caches, block_tables,
                     cu_seqlens, context_lens, slot_mapping, rows, weights, num_heads: int, top_k: int,
                     norm_topk_prob: bool, eps: float, scale: float, lm_head, n_vocab: int, draft_positions,
                     draft_slots):
    """mtp_forward's catch-up (rows: one per drafting sequence) and then greedy drafts in one call:
    draft_positions / draft_slots [R, S-1] place drafts 2..S (slot < 0: the row stops) -> drafts
    [R, S] long (-1 where a row stopped); each the first argmax of lm_head logits over n_vocab ids."""
    return _build().mtp_draft_greedy(_long(ids), hidden.contiguous(), _long(positions), inv_freq,
                                     float(attention_factor), cos, sin, kv_caches, _long(block_tables),
                                     _long(cu_seqlens), _long(context_lens), _long(slot_mapping), _long(rows), weights,
                                     num_heads, top_k, bool(norm_topk_prob), float(eps), float(scale), lm_head,
                                     int(n_vocab), _long(draft_positions), _long(draft_slots))
