// Fused CPU kernels for qwen3next (float32), one translation unit so the first build stays short.
//
// gdn_varlen:      the whole Gated DeltaNet core after the input projections, over a packed varlen
//                  batch on the state-slot pools: causal conv (from the conv state) + SiLU, q/k L2
//                  norm, gates g / beta, the delta-rule recurrence token by token, optional per-token
//                  states (speculative verify). Decode (one token per sequence) is the T = B case.
// paged_attention: causal attention of each new token over the paged KV cache, walking its block
//                  table (no gather, no padding).
// moe_dense_act:   the dense MoE's routing (softmax, top-k) and gated activations, between its
//                  up and down matmuls (which stay torch's).
// moe_route / moe_experts: routing, and the routed experts grouped by expert (torch matmuls).
// + small elementwise ops: RMSNorms, rotary, KV write, output gate (one call instead of several).
// All are parallel over (sequence or token, head) with at::parallel_for. The Python side
// (kernels/cpu_ext/__init__.py) checks dtypes, devices and layouts before calling.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// exp(x) as 2^n * P(r), |r| <= ln2 / 2 (relative error ~2e-7), written so loops over arrays
// vectorise (std::exp is a scalar libm call: it dominated softmax and SiLU).
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 split in two for accuracy
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// 8 floats as one vector (GCC/Clang vector extension: a ymm register with AVX, two xmm without).
typedef float v8 __attribute__((vector_size(32)));
inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

inline float silu(float x) { return x / (1.0f + fast_exp(-x)); }
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
// log(1 + e^x) = max(x, 0) + log(1 + u), u = e^-|x| in (0, 1], the log as 2 atanh(u / (2 + u)) by
// its odd series (argument <= 1/3: 7 terms reach float precision); no libm call.
inline float softplus(float x) {
  const float u = fast_exp(-std::fabs(x));
  const float s = u / (2.0f + u), s2 = s * s;
  float p = 1.0f / 13;
  p = p * s2 + 1.0f / 11;
  p = p * s2 + 1.0f / 9;
  p = p * s2 + 1.0f / 7;
  p = p * s2 + 1.0f / 5;
  p = p * s2 + 1.0f / 3;
  p = p * s2 + 1.0f;
  return std::max(x, 0.0f) + 2.0f * s * p;
}

// Work items per parallel chunk (at::parallel_for runs inline below one chunk): ~256k flops, some
// tens of microseconds, so a decode step's small ops stay on one thread (a fork/join of the
// OpenMP pool costs microseconds on a quiet machine, far more when the other cores are busy).
int64_t grain(int64_t items, int64_t cost_per_item) {
  const int64_t target = 1 << 18;
  return std::max<int64_t>(1, std::min<int64_t>(items, target / std::max<int64_t>(cost_per_item, 1)));
}

// q . k over D floats: 8 lanes at a time, then the lanes summed.
inline float dot(const float* q, const float* k, int64_t D) {
  v8 acc = {};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) acc += load8(q + d) * load8(k + d);
  float s = 0.0f;
  for (int u = 0; u < 8; ++u) s += acc[u];
  for (; d < D; ++d) s += q[d] * k[d];
  return s;
}

// out[j] = q . k[j * ks ..] over D floats for 8 rows of k (D a multiple of 8): one accumulator per
// row, the 8 reduced together (3 levels of pairwise adds) instead of one horizontal sum each.
inline void dot8(const float* q, const float* k, int64_t ks, int64_t D, float* out) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + j * ks + d), a[j]);
  }
  // hadd pairs lanes: u0 = [row 0..3 sums of lanes 0-3 | row 0..3 sums of lanes 4-7], u1 rows 4..7
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
#else
  for (int j = 0; j < 8; ++j) out[j] = dot(q, k + j * ks, D);
#endif
}

// out[0 .. 8 NV) += sum_j w[j] * rows[j * stride + 0 .. 8 NV), in NV vector registers.
template <int NV>
inline void weighted_rows(float* out, const float* rows, int64_t stride, const float* w, int64_t n) {
  v8 acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = load8(out + 8 * j);
  for (int64_t i = 0; i < n; ++i)
    for (int j = 0; j < NV; ++j) acc[j] += w[i] * load8(rows + i * stride + 8 * j);
  for (int j = 0; j < NV; ++j) store8(out + 8 * j, acc[j]);
}

// Causal conv (K = 4) + SiLU of one block of 16 channels over n tokens: win [3][16] holds the 3
// previous inputs (oldest first) and is left holding the last 3; wt: the taps as rows [4][C] at
// this block's channels; x / y rows strided by xs / ys.
inline void conv4_block(float (*win)[16], const float* wt, int64_t C, const float* x, int64_t xs, float* y,
                        int64_t ys, int64_t n) {
  v8 h0[2], h1[2], h2[2], w0[2], w1[2], w2[2], w3[2];
  for (int j = 0; j < 2; ++j) {
    h0[j] = load8(&win[0][8 * j]);
    h1[j] = load8(&win[1][8 * j]);
    h2[j] = load8(&win[2][8 * j]);
    w0[j] = load8(wt + 8 * j);
    w1[j] = load8(wt + C + 8 * j);
    w2[j] = load8(wt + 2 * C + 8 * j);
    w3[j] = load8(wt + 3 * C + 8 * j);
  }
  for (int64_t i = 0; i < n; ++i) {
    float acc[16];
    for (int j = 0; j < 2; ++j) {
      const v8 xv = load8(x + i * xs + 8 * j);
      store8(acc + 8 * j, w0[j] * h0[j] + w1[j] * h1[j] + w2[j] * h2[j] + w3[j] * xv);
      h0[j] = h1[j];
      h1[j] = h2[j];
      h2[j] = xv;
    }
    float* out = y + i * ys;
    for (int u = 0; u < 16; ++u) out[u] = silu(acc[u]);
  }
  for (int j = 0; j < 2; ++j) {
    store8(&win[0][8 * j], h0[j]);
    store8(&win[1][8 * j], h1[j]);
    store8(&win[2][8 * j], h2[j]);
  }
}

// What the DeltaNet recurrence reads and writes (see gdn_varlen).
struct Run {
  const float* y;  // [T, C] post-conv [q_all | k_all | v_all]
  const float *a, *b, *dt_bias;
  const int64_t* pts;  // per-token state slots or nullptr
  float* pool;         // recurrent state pool [N, Hv, dk, dv]
  float* o;            // [T, Hv, dv]
  int64_t C, as, bs, Hk, Hv, dk, dv;
  float qscale;
};

// Columns e0 .. e0 + 8 NV of one delta-rule step (see recur): 2 NV vector accumulators.
template <int NV>
inline void column_block(float* __restrict__ S, const float* q, const float* k, const float* v, float* out,
                         int64_t dk, int64_t dv, int64_t e0, float decay, float beta, float qk) {
  v8 ks[NV], qs[NV], delta[NV];
  for (int j = 0; j < NV; ++j) ks[j] = qs[j] = v8{};
  for (int64_t d = 0; d < dk; ++d)
    for (int j = 0; j < NV; ++j) {
      const v8 sr = load8(S + d * dv + e0 + 8 * j);
      ks[j] += k[d] * sr;
      qs[j] += q[d] * sr;
    }
  for (int j = 0; j < NV; ++j) {
    delta[j] = beta * (load8(v + e0 + 8 * j) - decay * ks[j]);
    store8(out + e0 + 8 * j, decay * qs[j] + qk * delta[j]);
  }
  for (int64_t d = 0; d < dk; ++d)
    for (int j = 0; j < NV; ++j) {
      float* sp = S + d * dv + e0 + 8 * j;
      store8(sp, decay * load8(sp) + k[d] * delta[j]);
    }
}

// Tokens t0 .. t0+n-1 of one sequence on value head h's state S [dk, dv] (in place); rate is
// -exp(A_log[h]). `buf` holds 2 dk floats. (Compile-time dv specialisations measured slower.)
void recur(const Run& run, float* __restrict__ S, int64_t h, int64_t t0, int64_t n, float rate, float* buf) {
  const int64_t dk = run.dk, dv = run.dv, kh = h / (run.Hv / run.Hk);
  float* __restrict__ q = buf;
  float* __restrict__ k = buf + dk;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = t0 + i;
    const float* row = run.y + t * run.C;
    float qq = 0.0f, kk = 0.0f;
    for (int64_t d = 0; d < dk; ++d) {
      q[d] = row[kh * dk + d];
      k[d] = row[run.Hk * dk + kh * dk + d];
      qq += q[d] * q[d];
      kk += k[d] * k[d];
    }
    const float qn = run.qscale / std::sqrt(qq + 1e-6f), kn = 1.0f / std::sqrt(kk + 1e-6f);
    for (int64_t d = 0; d < dk; ++d) { q[d] *= qn; k[d] *= kn; }
    const float* v = row + 2 * run.Hk * dk + h * dv;
    const float decay = fast_exp(rate * softplus(run.a[t * run.as + h] + run.dt_bias[h]));
    const float beta = 1.0f / (1.0f + fast_exp(-run.b[t * run.bs + h]));
    // With S'' = decay S, delta = beta (v - k S'') and S' = S'' + k (x) delta, the output is
    // q S' = decay (q S) + (q . k) delta. Columns are independent: 32 (or 8) at a time, q S and
    // k S summed in vector registers, then the same [dk, 32] slice updated while it is in L1.
    float qk = 0.0f;
    for (int64_t d = 0; d < dk; ++d) qk += q[d] * k[d];
    float* out = run.o + (t * run.Hv + h) * dv;
    int64_t e0 = 0;
    for (; e0 + 32 <= dv; e0 += 32) column_block<4>(S, q, k, v, out, dk, dv, e0, decay, beta, qk);
    for (; e0 + 8 <= dv; e0 += 8) column_block<1>(S, q, k, v, out, dk, dv, e0, decay, beta, qk);
    for (; e0 < dv; ++e0) {  // columns past the last multiple of 8
      float ks1 = 0.0f, qs1 = 0.0f;
      for (int64_t d = 0; d < dk; ++d) { ks1 += k[d] * S[d * dv + e0]; qs1 += q[d] * S[d * dv + e0]; }
      const float delta1 = beta * (v[e0] - decay * ks1);
      out[e0] = decay * qs1 + qk * delta1;
      for (int64_t d = 0; d < dk; ++d) S[d * dv + e0] = decay * S[d * dv + e0] + k[d] * delta1;
    }
    const int64_t ps = run.pts ? run.pts[t] : -1;
    if (ps >= 0) std::copy(S, S + dk * dv, run.pool + (ps * run.Hv + h) * dk * dv);
  }
}

// y[m, n] = x[m, :] . w[n, :] for rows [n0, n1) of w [N, K] (row-major, K % 8 == 0) and M rows of x.
// Each block of 8 weight rows is read from memory once for all rows of x (a GEMM library packs the
// weight for M > 1, which costs more than the product itself at these sizes). Every output is one
// 8-lane accumulator over k, its lanes summed in a fixed order: the same bits whatever M is, so a
// token's projection does not depend on how many others share the call (a verify row equals the
// decode row of the same token; tests/test_cpu_ext.py checks it).
template <int MB, int NB>
inline void linear_tile(
    const float* __restrict__ x, int64_t xs, const float* __restrict__ w, int64_t K, float* __restrict__ y,
    int64_t ys) {
  v8 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = v8{};
  for (int64_t k = 0; k < K; k += 8) {
    v8 xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = load8(x + i * xs + k);
    for (int j = 0; j < NB; ++j) {
      const v8 wv = load8(w + j * K + k);
      for (int i = 0; i < MB; ++i) acc[i][j] += xv[i] * wv;
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      const v8 a = acc[i][j];
      y[i * ys + j] = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
    }
}

// Rows [n0, n1) of the product for all M rows: 8 weight rows at a time (they stay in L1 while every
// block of up to 4 x rows goes over them); tiles of 8 accumulators (1x8, 2x4) fill the registers.
void linear_range(
    const float* x, int64_t xs, const float* w, int64_t K, float* y, int64_t ys, int64_t M, int64_t n0, int64_t n1) {
  for (int64_t nb = n0; nb < n1; nb += 8) {
    const int64_t ne = std::min(nb + 8, n1);
    for (int64_t m = 0; m < M; m += 4) {
      const int64_t mb = std::min<int64_t>(4, M - m);
      const float* xm = x + m * xs;
      float* ym = y + m * ys;
      int64_t n = nb;
      if (mb == 1) {
        for (; n + 8 <= ne; n += 8) linear_tile<1, 8>(xm, xs, w + n * K, K, ym + n, ys);
      } else if (mb == 2) {
        for (; n + 4 <= ne; n += 4) linear_tile<2, 4>(xm, xs, w + n * K, K, ym + n, ys);
      } else if (mb == 3) {
        for (; n + 4 <= ne; n += 4) {
          linear_tile<2, 4>(xm, xs, w + n * K, K, ym + n, ys);
          linear_tile<1, 4>(xm + 2 * xs, xs, w + n * K, K, ym + 2 * ys + n, ys);
        }
      } else {
        for (; n + 4 <= ne; n += 4) {
          linear_tile<2, 4>(xm, xs, w + n * K, K, ym + n, ys);
          linear_tile<2, 4>(xm + 2 * xs, xs, w + n * K, K, ym + 2 * ys + n, ys);
        }
      }
      for (; n < ne; ++n) {  // leftover weight rows, one at a time (same per-output arithmetic)
        for (int64_t i = 0; i < mb; ++i) linear_tile<1, 1>(xm + i * xs, xs, w + n * K, K, ym + i * ys + n, ys);
      }
    }
  }
}

void linear_into(const float* x, int64_t xs, const float* w, int64_t K, float* y, int64_t ys, int64_t M, int64_t N) {
  at::parallel_for(0, (N + 7) / 8, grain((N + 7) / 8, 8 * M * K), [&](int64_t b0, int64_t b1) {
    linear_range(x, xs, w, K, y, ys, M, b0 * 8, std::min(b1 * 8, N));
  });
}

}  // namespace

// m [T, C] (rows may be strided) pre-conv [q_all | k_all | v_all]; a, b [T, Hv] (rows strided);
// conv_weight [C, K] (rows strided); conv_state [N, C, K-1]; recurrent_state [N, Hv, dk, dv];
// cu_seqlens [B+1]; state_slots [B] (< 0: sequence skipped, o = 0); has_initial_state [B] bool
// (empty: all true); per_token_state_slots [T] (empty: none; -1 = don't save); A_log, dt_bias [Hv].
// -> o [T, Hv, dv]. States are updated in place.
torch::Tensor gdn_varlen(torch::Tensor m, torch::Tensor a, torch::Tensor b, torch::Tensor conv_weight,
                         torch::Tensor conv_state, torch::Tensor recurrent_state, torch::Tensor cu_seqlens,
                         torch::Tensor state_slots, torch::Tensor has_initial_state,
                         torch::Tensor per_token_state_slots, torch::Tensor A_log, torch::Tensor dt_bias,
                         int64_t num_k_heads) {
  const int64_t T = m.size(0), C = m.size(1), K = conv_weight.size(1), K1 = K - 1;
  const int64_t Hv = recurrent_state.size(1), dk = recurrent_state.size(2), dv = recurrent_state.size(3);
  const int64_t Hk = num_k_heads, r = Hv / Hk, B = cu_seqlens.size(0) - 1;
  TORCH_CHECK(K1 >= 1 && K1 <= 16, "gdn_varlen: conv kernel size must be 2..17, got ", K);
  const int64_t ms = m.stride(0), as = a.stride(0), bs = b.stride(0), ws = conv_weight.stride(0);
  const float* mp = m.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  const float* wp = conv_weight.data_ptr<float>();
  float* cs = conv_state.data_ptr<float>();
  float* rs = recurrent_state.data_ptr<float>();
  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  const int64_t* slots = state_slots.data_ptr<int64_t>();
  const bool* init = has_initial_state.numel() ? has_initial_state.data_ptr<bool>() : nullptr;
  const int64_t* pts = per_token_state_slots.numel() ? per_token_state_slots.data_ptr<int64_t>() : nullptr;
  const float* alog = A_log.data_ptr<float>();
  const float* dtb = dt_bias.data_ptr<float>();

  // taps transposed to [K, C] so the channel loop is contiguous
  std::vector<float> wt(K * C);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < K; ++j) wt[j * C + c] = wp[c * ws + j];
  auto y = torch::empty({T, C}, m.options());  // post-conv, post-SiLU
  float* yp = y.data_ptr<float>();

  // 1) conv per sequence and block of CB channels (the q/k channels are shared by r value heads,
  // so the conv runs before, not inside, the per-head recurrence). The K-1 cached inputs of a
  // block live in `win` [K-1][CB], oldest first, and slide one token at a time.
  constexpr int64_t CB = 16;
  const int64_t nblk = (C + CB - 1) / CB;
  at::parallel_for(0, B * nblk, grain(B * nblk, (T / std::max<int64_t>(B, 1) + 1) * CB * K * 2), [&](int64_t i0, int64_t i1) {
    float win[16][CB];  // K - 1 <= 16 (checked by the caller)
    float acc[CB];
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t s = it / nblk, c0 = (it % nblk) * CB, nc = std::min(CB, C - c0);
      const int64_t t0 = cu[s], n = cu[s + 1] - t0, slot = slots[s];
      if (n == 0 || slot < 0) continue;
      float* st = cs + slot * C * K1;  // [C, K-1]
      for (int64_t j = 0; j < K1; ++j)
        for (int64_t cb = 0; cb < CB; ++cb) win[j][cb] = (cb < nc && (!init || init[s])) ? st[(c0 + cb) * K1 + j] : 0.0f;
      // a run with no per-token state to save (a prompt chunk beside verify rows) takes the fast path
      const bool save = pts && std::any_of(pts + t0, pts + t0 + n, [](int64_t v) { return v >= 0; });
      if (K1 == 3 && nc == CB && !save) {  // the model's K = 4 on a whole block: windows in registers
        conv4_block(win, &wt[c0], C, mp + t0 * ms + c0, ms, yp + t0 * C + c0, C, n);
        for (int64_t cb = 0; cb < nc; ++cb)
          for (int64_t j = 0; j < K1; ++j) st[(c0 + cb) * K1 + j] = win[j][cb];
        continue;
      }
      for (int64_t i = 0; i < n; ++i) {
        const float* x = mp + (t0 + i) * ms + c0;
        const float* wl = &wt[K1 * C + c0];
        for (int64_t cb = 0; cb < nc; ++cb) acc[cb] = wl[cb] * x[cb];
        for (int64_t j = 0; j < K1; ++j) {
          const float* w = &wt[j * C + c0];
          for (int64_t cb = 0; cb < nc; ++cb) acc[cb] += w[cb] * win[j][cb];
        }
        float* out = yp + (t0 + i) * C + c0;
        for (int64_t cb = 0; cb < nc; ++cb) out[cb] = silu(acc[cb]);
        for (int64_t j = 0; j + 1 < K1; ++j)
          for (int64_t cb = 0; cb < CB; ++cb) win[j][cb] = win[j + 1][cb];
        for (int64_t cb = 0; cb < nc; ++cb) win[K1 - 1][cb] = x[cb];
        const int64_t ps = pts ? pts[t0 + i] : -1;
        if (ps >= 0) {  // the conv state after token i
          float* sp = cs + ps * C * K1;
          for (int64_t cb = 0; cb < nc; ++cb)
            for (int64_t j = 0; j < K1; ++j) sp[(c0 + cb) * K1 + j] = win[j][cb];
        }
      }
      for (int64_t cb = 0; cb < nc; ++cb)
        for (int64_t j = 0; j < K1; ++j) st[(c0 + cb) * K1 + j] = win[j][cb];
    }
  });

  // 2) recurrence per (sequence, value head)
  auto o = torch::zeros({T, Hv, dv}, m.options());
  Run run{yp, ap, bp, dtb, pts, rs, o.data_ptr<float>(), C, as, bs, Hk, Hv, dk, dv,
          1.0f / std::sqrt(static_cast<float>(dk))};
  at::parallel_for(0, B * Hv, grain(B * Hv, (T / std::max<int64_t>(B, 1)) * dk * dv * 6), [&](int64_t i0, int64_t i1) {
    std::vector<float> buf(2 * dk);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t s = it / Hv, h = it % Hv;
      const int64_t t0 = cu[s], n = cu[s + 1] - t0, slot = slots[s];
      if (n == 0 || slot < 0) continue;
      float* S = rs + (slot * Hv + h) * dk * dv;  // updated in place
      if (init && !init[s]) std::fill(S, S + dk * dv, 0.0f);
      const float rate = -std::exp(alog[h]);
      recur(run, S, h, t0, n, rate, buf.data());
    }
  });
  return o;
}

// q [T, Hq, D] (token and head strides free, last dim contiguous); kv_cache [NB, 2, bs, Hkv, D];
// block_tables [B, max_blocks]; cu_seqlens [B+1]; context_lens [B] (cached tokens before this step;
// the new ones are already written). Token i of sequence b sees keys 0 .. context_lens[b] + i.
// One work item = one token and one KV head with its `rep` query heads (each key row read once).
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_tables,
                              torch::Tensor cu_seqlens, torch::Tensor context_lens, double scale) {
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bsz = kv_cache.size(2), Hkv = kv_cache.size(3), rep = Hq / Hkv, B = cu_seqlens.size(0) - 1;
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), nbt = block_tables.size(1);
  const float* qp = q.data_ptr<float>();
  const float* kvp = kv_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  const int64_t* ctx = context_lens.data_ptr<int64_t>();
  const int64_t row = Hkv * D, blk = 2 * bsz * row;  // strides of a key row and of a block
  auto o = torch::zeros({T, Hq, D}, q.options());
  float* op = o.data_ptr<float>();
  std::vector<int64_t> seq_of(T, -1);
  int64_t total_keys = 0;
  for (int64_t s = 0; s < B; ++s)
    for (int64_t t = cu[s]; t < cu[s + 1]; ++t) { seq_of[t] = s; total_keys += ctx[s] + t - cu[s] + 1; }
  const float sc = static_cast<float>(scale);
  const int64_t cost = (total_keys / std::max<int64_t>(T, 1)) * D * 4 * rep;
  at::parallel_for(0, T * Hkv, grain(T * Hkv, cost), [&](int64_t i0, int64_t i1) {
    std::vector<float> p, qv(rep * D);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t t = it / Hkv, g = it % Hkv, s = seq_of[t];
      if (s < 0) continue;
      const int64_t nk = ctx[s] + (t - cu[s]) + 1;
      const int64_t* table = bt + s * nbt;
      for (int64_t r = 0; r < rep; ++r)  // scaled queries of this KV head's group
        for (int64_t d = 0; d < D; ++d) qv[r * D + d] = qp[t * qs0 + (g * rep + r) * qs1 + d] * sc;
      p.resize(rep * nk);
      for (int64_t j0 = 0; j0 < nk; j0 += bsz) {  // scores, block by block
        const float* kb = kvp + table[j0 / bsz] * blk + g * D;
        const int64_t n = std::min(bsz, nk - j0);
        int64_t jj = 0;
        if (D % 8 == 0)  // 8 keys at a time (a key's score depends only on its place in the block)
          for (; jj + 8 <= n; jj += 8)
            for (int64_t r = 0; r < rep; ++r) dot8(&qv[r * D], kb + jj * row, row, D, &p[r * nk + j0 + jj]);
        for (; jj < n; ++jj) {
          const float* kr = kb + jj * row;
          for (int64_t r = 0; r < rep; ++r) {
            p[r * nk + j0 + jj] = dot(&qv[r * D], kr, D);
          }
        }
      }
      for (int64_t r = 0; r < rep; ++r) {  // softmax per query head
        float* pr = &p[r * nk];
        float mx = -INFINITY;
        for (int64_t j = 0; j < nk; ++j) mx = std::max(mx, pr[j]);
        float sum = 0.0f;
        for (int64_t j = 0; j < nk; ++j) {
          pr[j] = fast_exp(pr[j] - mx);
          sum += pr[j];
        }
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < nk; ++j) pr[j] *= inv;
      }
      for (int64_t j0 = 0; j0 < nk; j0 += bsz) {  // weighted values
        const float* vb = kvp + table[j0 / bsz] * blk + bsz * row + g * D;
        const int64_t n = std::min(bsz, nk - j0);
        for (int64_t r = 0; r < rep; ++r) {
          float* out = op + (t * Hq + g * rep + r) * D;
          const float* pr = &p[r * nk + j0];
          int64_t d0 = 0;  // output dims in register blocks of 32, then 8, then one by one
          for (; d0 + 32 <= D; d0 += 32) weighted_rows<4>(out + d0, vb + d0, row, pr, n);
          for (; d0 + 8 <= D; d0 += 8) weighted_rows<1>(out + d0, vb + d0, row, pr, n);
          for (; d0 < D; ++d0)
            for (int64_t jj = 0; jj < n; ++jj) out[d0] += pr[jj] * vb[jj * row + d0];
        }
      }
    }
  });
  return o;
}

// The elementwise part of the dense MoE (everything between its up and down matmuls).
// y [T, 2Is + 1 + E*2I + E] (rows strided): shared expert gate | up | its sigmoid gate, each
// expert's gate | up, router logits. -> h [T, E*I + Is]: routed activations silu(g) * u scaled by
// the routing weight (softmax, top-k, optionally renormalised; 0 off the top-k), then the shared
// expert's silu(g) * u * sigmoid(gate).
torch::Tensor moe_dense_act(torch::Tensor y, int64_t Is, int64_t E, int64_t I, int64_t top_k, bool norm_topk) {
  const int64_t T = y.size(0), ys = y.stride(0), W = E * I + Is;
  const float* yp = y.data_ptr<float>();
  auto h = torch::zeros({T, W}, y.options());
  float* hp = h.data_ptr<float>();
  at::parallel_for(0, T, grain(T, W * 8), [&](int64_t t0, int64_t t1) {
    std::vector<float> p(E);
    std::vector<int64_t> ids(top_k);
    std::vector<float> w(top_k);
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = yp + t * ys;
      const float* logits = row + 2 * Is + 1 + E * 2 * I;
      float mx = -INFINITY, sum = 0.0f;
      for (int64_t e = 0; e < E; ++e) mx = std::max(mx, logits[e]);
      for (int64_t e = 0; e < E; ++e) { p[e] = std::exp(logits[e] - mx); sum += p[e]; }
      float wsum = 0.0f;
      for (int64_t kk = 0; kk < top_k; ++kk) {  // largest first; ties to the lower expert id
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e)
          if (p[e] >= 0.0f && (best < 0 || p[e] > p[best])) best = e;
        ids[kk] = best;
        w[kk] = p[best] / sum;
        wsum += w[kk];
        p[best] = -1.0f;  // taken
      }
      float* out = hp + t * W;
      for (int64_t kk = 0; kk < top_k; ++kk) {
        const float wk = norm_topk ? w[kk] / wsum : w[kk];
        const float* g = row + 2 * Is + 1 + ids[kk] * 2 * I;
        float* o = out + ids[kk] * I;
        for (int64_t i = 0; i < I; ++i) o[i] = silu(g[i]) * g[I + i] * wk;
      }
      const float sg = sigmoid(row[2 * Is]);
      float* o = out + E * I;
      for (int64_t i = 0; i < Is; ++i) o[i] = silu(row[i]) * row[Is + i] * sg;
    }
  });
  return h;
}

// ---- small fused elementwise ops (each replaces several aten ops on the per-token path) ----

// One row of RMSNorm: y = in / sqrt(mean(in^2) + eps) * (w + off), `in` = x (+ res, then also
// written to `sum` when res is given).
inline void norm_row(const float* x, const float* res, float* sum, const float* w, float* y, int64_t D,
                     float eps, float off) {
  const float* in = x;
  if (res) {
    for (int64_t d = 0; d < D; ++d) sum[d] = x[d] + res[d];
    in = sum;
  }
  float ss = 0.0f;
  for (int64_t d = 0; d < D; ++d) ss += in[d] * in[d];
  const float inv = 1.0f / std::sqrt(ss / D + eps);
  for (int64_t d = 0; d < D; ++d) y[d] = in[d] * inv * (w[d] + off);
}

// RMSNorm over the last dim D of x (rows contiguous): y = x / sqrt(mean(x^2) + eps) * w', with
// w' = 1 + weight (zero_centred) or weight, and weight [D] or [heads, D] (row r uses weight row
// r % heads). With a residual: x + residual is normed and returned as well.
std::vector<torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor weight, double eps, torch::Tensor residual,
                                    bool zero_centred) {
  const int64_t D = x.size(-1), R = x.numel() / std::max<int64_t>(D, 1), heads = weight.numel() / D;
  const bool add = residual.numel() > 0;
  auto y = torch::empty_like(x);
  torch::Tensor sum = add ? torch::empty_like(x) : torch::Tensor();
  const float* xp = x.data_ptr<float>();
  const float* rp = add ? residual.data_ptr<float>() : nullptr;
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* sp = add ? sum.data_ptr<float>() : nullptr;
  const float off = zero_centred ? 1.0f : 0.0f, e = static_cast<float>(eps);
  at::parallel_for(0, R, grain(R, D * 4), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      norm_row(xp + r * D, add ? rp + r * D : nullptr, add ? sp + r * D : nullptr, wp + (r % heads) * D,
               yp + r * D, D, e, off);
  });
  if (add) return {y, sum};
  return {y};
}

// x [T, H, D] (contiguous); z [T, H, D] (token and head strides free) -> rms(x) * weight * silu(z).
torch::Tensor gated_rmsnorm(torch::Tensor x, torch::Tensor z, torch::Tensor weight, double eps) {
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), zs0 = z.stride(0), zs1 = z.stride(1);
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T * H, grain(T * H, D * 8), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* in = xp + r * D;
      const float* zr = zp + (r / H) * zs0 + (r % H) * zs1;
      float ss = 0.0f;
      for (int64_t d = 0; d < D; ++d) ss += in[d] * in[d];
      const float inv = 1.0f / std::sqrt(ss / D + e);
      float* out = yp + r * D;
      for (int64_t d = 0; d < D; ++d) out[d] = in[d] * inv * wp[d] * silu(zr[d]);
    }
  });
  return y;
}

// x [T, H, D] (token and head strides free); cos, sin [T, d] (rows contiguous), d <= D even:
// NeoX rotation of x[..., :d] (pairs i, i + d/2), the rest passed through -> contiguous [T, H, D].
torch::Tensor apply_rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), d = cos.size(1), h2 = d / 2;
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), cs = cos.stride(0), ss = sin.stride(0);
  auto y = torch::empty({T, H, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T * H, grain(T * H, D * 4), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / H;
      const float* in = xp + t * xs0 + (r % H) * xs1;
      const float* c = cp + t * cs;
      const float* s = sp + t * ss;
      float* out = yp + r * D;
      for (int64_t i = 0; i < h2; ++i) out[i] = in[i] * c[i] - in[h2 + i] * s[i];
      for (int64_t i = 0; i < h2; ++i) out[h2 + i] = in[h2 + i] * c[h2 + i] + in[i] * s[h2 + i];
      for (int64_t i = d; i < D; ++i) out[i] = in[i];
    }
  });
  return y;
}

// k, v [T, Hkv, D] (token and head strides free) into kv_cache [NB, 2, bs, Hkv, D] at
// slot_mapping [T] (block * bs + offset; negative: not written).
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor kv_cache, torch::Tensor slot_mapping) {
  const int64_t T = k.size(0), H = k.size(1), D = k.size(2), bsz = kv_cache.size(2);
  const int64_t row = H * D, blk = 2 * bsz * row;
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* cp = kv_cache.data_ptr<float>();
  const int64_t* sl = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    if (sl[t] < 0) continue;
    float* kd = cp + (sl[t] / bsz) * blk + (sl[t] % bsz) * row;
    float* vd = kd + bsz * row;
    for (int64_t h = 0; h < H; ++h) {
      std::copy(kp + t * k.stride(0) + h * k.stride(1), kp + t * k.stride(0) + h * k.stride(1) + D, kd + h * D);
      std::copy(vp + t * v.stride(0) + h * v.stride(1), vp + t * v.stride(0) + h * v.stride(1) + D, vd + h * D);
    }
  }
}

// o [T, H, D] (contiguous) * sigmoid(gate [T, H, D], token and head strides free).
torch::Tensor gate_output(torch::Tensor o, torch::Tensor gate) {
  const int64_t T = o.size(0), H = o.size(1), D = o.size(2), gs0 = gate.stride(0), gs1 = gate.stride(1);
  auto y = torch::empty_like(o);
  const float* op = o.data_ptr<float>();
  const float* gp = gate.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T * H, grain(T * H, D * 4), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = gp + (r / H) * gs0 + (r % H) * gs1;
      for (int64_t d = 0; d < D; ++d) yp[r * D + d] = op[r * D + d] / (1.0f + fast_exp(-g[d]));
    }
  });
  return y;
}

// Softmax top-k routing of router_logits [T, E] (rows strided): -> (weights [T, k] fp32, ids [T, k]
// long), largest first (ties to the lower expert id), renormalised to sum 1 when norm_topk.
std::vector<torch::Tensor> moe_route(torch::Tensor logits, int64_t top_k, bool norm_topk) {
  const int64_t T = logits.size(0), E = logits.size(1), ls = logits.stride(0);
  auto w = torch::empty({T, top_k}, logits.options());
  auto ids = torch::empty({T, top_k}, logits.options().dtype(torch::kLong));
  const float* lp = logits.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  at::parallel_for(0, T, grain(T, E * 8), [&](int64_t t0, int64_t t1) {
    std::vector<float> p(E);
    for (int64_t t = t0; t < t1; ++t) {
      const float* l = lp + t * ls;
      float mx = -INFINITY, sum = 0.0f, wsum = 0.0f;
      for (int64_t e = 0; e < E; ++e) mx = std::max(mx, l[e]);
      for (int64_t e = 0; e < E; ++e) { p[e] = std::exp(l[e] - mx); sum += p[e]; }
      for (int64_t kk = 0; kk < top_k; ++kk) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e)
          if (p[e] >= 0.0f && (best < 0 || p[e] > p[best])) best = e;
        ip[t * top_k + kk] = best;
        wp[t * top_k + kk] = p[best] / sum;
        wsum += p[best] / sum;
        p[best] = -1.0f;  // taken
      }
      if (norm_topk)
        for (int64_t kk = 0; kk < top_k; ++kk) wp[t * top_k + kk] /= wsum;
    }
  });
  return {w, ids};
}

// x [M, K] (rows contiguous) @ w[N, K]^T -> [M, N], for few rows M (linear_range above).
torch::Tensor linear(torch::Tensor x, torch::Tensor w) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && K % 8 == 0, "linear: shapes ", x.sizes(), " x ", w.sizes(), " (K % 8 == 0)");
  auto y = torch::empty({M, N}, x.options());
  linear_into(x.data_ptr<float>(), x.stride(0), w.data_ptr<float>(), K, y.data_ptr<float>(), N, M, N);
  return y;
}

// Routed experts, grouped: x [T, H]; gate_up_proj [E, 2I, H]; down_proj [E, H, I]; weights, ids
// [T, k] -> [T, H]. Assignments are bucketed by expert (counting sort); each active expert runs
// two matmuls (few rows: linear_into; more: at::mm) on its gathered rows, SiLU(gate) * up in between; outputs are added
// into their tokens' rows scaled by the routing weight.
torch::Tensor moe_experts(torch::Tensor x, torch::Tensor gate_up_proj, torch::Tensor down_proj,
                          torch::Tensor weights, torch::Tensor ids) {
  const int64_t T = x.size(0), H = x.size(1), k = ids.size(1), E = gate_up_proj.size(0), I = down_proj.size(2);
  const float* xp = x.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  const int64_t* ip = ids.data_ptr<int64_t>();
  std::vector<int64_t> start(E + 1, 0), order(T * k);
  for (int64_t a = 0; a < T * k; ++a) {
    TORCH_CHECK(ip[a] >= 0 && ip[a] < E, "moe_experts: expert id ", ip[a], " out of range [0, ", E, ")");
    start[ip[a] + 1]++;
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t a = 0; a < T * k; ++a) order[fill[ip[a]]++] = a;
  }
  auto out = torch::zeros({T, H}, x.options());
  float* op = out.data_ptr<float>();
  int64_t nmax = 0;
  for (int64_t e = 0; e < E; ++e) nmax = std::max(nmax, start[e + 1] - start[e]);
  auto xs = torch::empty({nmax, H}, x.options());
  auto h = torch::empty({nmax, I}, x.options());
  auto gu = torch::empty({nmax, 2 * I}, x.options());
  auto y = torch::empty({nmax, H}, x.options());
  const bool contiguous = gate_up_proj.is_contiguous() && down_proj.is_contiguous();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = start[e + 1] - start[e];
    if (n == 0) continue;
    float* xsp = xs.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t tok = order[start[e] + i] / k;
      std::copy(xp + tok * H, xp + tok * H + H, xsp + i * H);
    }
    // few rows (decode, verify): the weight-streaming kernel; more: torch's GEMM
    const bool few = n <= 8 && contiguous && H % 8 == 0 && I % 8 == 0;
    if (few) linear_into(xsp, H, gate_up_proj.data_ptr<float>() + e * 2 * I * H, H, gu.data_ptr<float>(), 2 * I, n, 2 * I);
    else {
      auto g = gu.narrow(0, 0, n);  // [n, 2I]
      at::mm_out(g, xs.narrow(0, 0, n), gate_up_proj[e].t());
    }
    const float* gp = gu.data_ptr<float>();
    float* hp = h.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < I; ++j) hp[i * I + j] = silu(gp[i * 2 * I + j]) * gp[i * 2 * I + I + j];
    if (few) linear_into(hp, I, down_proj.data_ptr<float>() + e * H * I, I, y.data_ptr<float>(), H, n, H);
    else {
      auto yn = y.narrow(0, 0, n);  // [n, H]
      at::mm_out(yn, h.narrow(0, 0, n), down_proj[e].t());
    }
    const float* yp = y.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t a = order[start[e] + i];
      const float wa = wp[a];
      float* o = op + (a / k) * H;
      for (int64_t c = 0; c < H; ++c) o[c] += wa * yp[i * H + c];
    }
  }
  return out;
}

// ---- the MTP head's forward for few tokens (draft and catch-up steps) in one call ----

// The zero-centred RMSNorm of rows of D floats (weight row w), optionally adding `res` first
// (then `sum` receives x + res): rms_norm's arithmetic, on raw rows.
inline void zc_norm_rows(const float* x, const float* res, float* sum, const float* w, float* y, int64_t R,
                         int64_t D, float eps) {
  for (int64_t r = 0; r < R; ++r)
    norm_row(x + r * D, res ? res + r * D : nullptr, res ? sum + r * D : nullptr, w, y + r * D, D, eps, 1.0f);
}

// x [M, K] (rows contiguous) @ w[N, K]^T: the few-row kernel up to 8 rows, torch's GEMM above
// (ops.linear's choice, so logits here have compute_logits' bits).
torch::Tensor project(const torch::Tensor& x, const torch::Tensor& w) {
  if (x.size(0) <= 8) return ::linear(x, w);
  return at::mm(x, w.t());
}

// Rotary tables as rope_cos_sin: angle = float(pos) * inv_freq, halves duplicated -> cos, sin [T, d].
std::vector<torch::Tensor> rope_tables(const torch::Tensor& positions, const torch::Tensor& inv_freq, float af) {
  const int64_t T = positions.size(0), d2 = inv_freq.size(0), d = 2 * d2;
  auto cos = torch::empty({T, d}, inv_freq.options()), sin = torch::empty({T, d}, inv_freq.options());
  const int64_t* pp = positions.data_ptr<int64_t>();
  const float* fp = inv_freq.data_ptr<float>();
  float* co = cos.data_ptr<float>();
  float* si = sin.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < d2; ++i) {
      const float a = static_cast<float>(pp[t]) * fp[i];
      co[t * d + i] = co[t * d + d2 + i] = std::cos(a) * af;
      si[t * d + i] = si[t * d + d2 + i] = std::sin(a) * af;
    }
  return {cos, sin};
}

// What one MTP pass reads (see mtp_forward): the step's layout and the rows the last layer keeps
// (`sel` undefined: all; else each kept row attends as a one-token sequence: sel_tables, sel_ctx).
struct MTPStep {
  torch::Tensor cos, sin, block_tables, cu_seqlens, context_lens, slot_mapping;
  torch::Tensor sel, sel_tables, sel_cu, sel_ctx;
};

// The kept rows' sequence (by cu_seqlens) and one-token attention layout.
void keep_rows(MTPStep& st, const torch::Tensor& rows, int64_t T) {
  const int64_t R = rows.numel(), B = st.cu_seqlens.size(0) - 1;
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* cu = st.cu_seqlens.data_ptr<int64_t>();
  const int64_t* ctx = st.context_lens.data_ptr<int64_t>();
  auto seq = torch::empty({R}, rows.options());
  st.sel = rows;
  st.sel_ctx = torch::empty({R}, rows.options());
  int64_t* sp = seq.data_ptr<int64_t>();
  int64_t* xp = st.sel_ctx.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(rp[r] >= 0 && rp[r] < T, "mtp_forward: row ", rp[r], " out of range");
    int64_t s = 0;
    while (s + 1 < B && cu[s + 1] <= rp[r]) ++s;
    sp[r] = s;
    xp[r] = ctx[s] + rp[r] - cu[s];
  }
  st.sel_tables = st.block_tables.index_select(0, seq);
  st.sel_cu = torch::arange(R + 1, rows.options());
}

// One MTP pass (mtp_forward's maths) -> [R, H] after the final norm.
torch::Tensor mtp_pass(const torch::Tensor& ids, const torch::Tensor& hidden, const MTPStep& st,
                       const std::vector<torch::Tensor>& kv_caches, const std::vector<torch::Tensor>& w, int64_t Hq,
                       int64_t top_k, bool norm_topk, float e, double scale) {
  const int64_t T = ids.size(0), H = hidden.size(1), V = w[0].size(0), L = (int64_t)kv_caches.size();
  const auto opt = hidden.options();
  const int64_t* idp = ids.data_ptr<int64_t>();
  // [T, 2, H]: embedding rows next to the hidden rows, normed with one weight row per half
  auto c = torch::empty({T, 2, H}, opt);
  float* cp = c.data_ptr<float>();
  const float* emb = w[0].data_ptr<float>();
  const float* hp = hidden.data_ptr<float>();
  const float* pw = w[1].data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(idp[t] >= 0 && idp[t] < V, "mtp_forward: token id ", idp[t], " out of range");
    zc_norm_rows(emb + idp[t] * H, nullptr, nullptr, pw, cp + t * 2 * H, 1, H, e);
    zc_norm_rows(hp + t * H, nullptr, nullptr, pw + H, cp + t * 2 * H + H, 1, H, e);
  }
  auto x = project(c.view({T, 2 * H}), w[2]);  // [T, H]
  const bool subset = st.sel.defined();
  torch::Tensor residual;  // undefined before the first layer
  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* lw = &w[4 + 10 * l];
    auto h = torch::empty({T, H}, opt);
    if (residual.defined()) {
      auto sum = torch::empty({T, H}, opt);
      zc_norm_rows(x.data_ptr<float>(), residual.data_ptr<float>(), sum.data_ptr<float>(), lw[0].data_ptr<float>(),
                   h.data_ptr<float>(), T, H, e);
      residual = sum;
    } else {
      zc_norm_rows(x.data_ptr<float>(), nullptr, nullptr, lw[0].data_ptr<float>(), h.data_ptr<float>(), T, H, e);
      residual = x;
    }
    // attention. K, V of every row: normed, rotated, written to the cache
    const int64_t D = lw[2].size(1), Hkv = lw[2].size(0) - Hq;
    const float* nw = lw[2].data_ptr<float>();
    auto kv = project(h, lw[1].narrow(0, 2 * Hq * D, 2 * Hkv * D));  // [T, 2 Hkv D]: k | v
    auto k = torch::empty({T, Hkv, D}, opt);
    {
      const float* kvp = kv.data_ptr<float>();
      float* kp = k.data_ptr<float>();
      for (int64_t t = 0; t < T; ++t)
        for (int64_t hh = 0; hh < Hkv; ++hh)
          zc_norm_rows(kvp + t * 2 * Hkv * D + hh * D, nullptr, nullptr, nw + (Hq + hh) * D, kp + (t * Hkv + hh) * D,
                       1, D, e);
    }
    write_kv(apply_rotary(k, st.cos, st.sin), kv.narrow(1, Hkv * D, Hkv * D).view({T, Hkv, D}), kv_caches[l],
             st.slot_mapping);
    // queries of the rows that go on (all, or the kept ones in the last layer)
    const bool pick = l == L - 1 && subset;
    if (pick) {
      h = h.index_select(0, st.sel);
      residual = residual.index_select(0, st.sel);
    }
    const int64_t R = h.size(0);
    auto qg = project(h, lw[1].narrow(0, 0, 2 * Hq * D));  // [R, Hq 2D]: per head query | gate
    auto q = torch::empty({R, Hq, D}, opt);
    {
      const float* gp = qg.data_ptr<float>();
      float* qp = q.data_ptr<float>();
      for (int64_t r = 0; r < R; ++r)
        for (int64_t hh = 0; hh < Hq; ++hh)
          zc_norm_rows(gp + (r * Hq + hh) * 2 * D, nullptr, nullptr, nw + hh * D, qp + (r * Hq + hh) * D, 1, D, e);
    }
    torch::Tensor o;
    if (pick) {
      q = apply_rotary(q, st.cos.index_select(0, st.sel), st.sin.index_select(0, st.sel));
      o = paged_attention(q, kv_caches[l], st.sel_tables, st.sel_cu, st.sel_ctx, scale);
    } else {
      q = apply_rotary(q, st.cos, st.sin);
      o = paged_attention(q, kv_caches[l], st.block_tables, st.cu_seqlens, st.context_lens, scale);
    }
    o = gate_output(o, qg.view({R, Hq, 2 * D}).narrow(2, D, D)).view({R, Hq * D});
    auto a = project(o, lw[3]);  // [R, H]
    {
      auto sum = torch::empty({R, H}, opt);
      h = torch::empty({R, H}, opt);
      zc_norm_rows(a.data_ptr<float>(), residual.data_ptr<float>(), sum.data_ptr<float>(), lw[4].data_ptr<float>(),
                   h.data_ptr<float>(), R, H, e);
      residual = sum;
    }
    // sparse MoE: routed experts + the shared expert scaled by its sigmoid gate
    auto route = moe_route(project(h, lw[5]), top_k, norm_topk);
    auto su = project(h, lw[6]);  // [R, 2Is + 1]
    const int64_t Is = (su.size(1) - 1) / 2;
    auto hs = torch::empty({R, Is}, opt);
    {
      const float* sp = su.data_ptr<float>();
      float* hsp = hs.data_ptr<float>();
      for (int64_t r = 0; r < R; ++r) {
        const float* row = sp + r * (2 * Is + 1);
        const float sg = sigmoid(row[2 * Is]);
        for (int64_t i = 0; i < Is; ++i) hsp[r * Is + i] = silu(row[i]) * row[Is + i] * sg;
      }
    }
    x = moe_experts(h, lw[7], lw[8], route[0], route[1]);
    x.add_(project(hs, lw[9]));
  }
  const int64_t R = x.size(0);
  auto out = torch::empty({R, H}, opt);
  auto sum = torch::empty({R, H}, opt);
  zc_norm_rows(x.data_ptr<float>(), residual.data_ptr<float>(), sum.data_ptr<float>(), w[3].data_ptr<float>(),
               out.data_ptr<float>(), R, H, e);
  return out;
}

void check_weights(const std::vector<torch::Tensor>& w, size_t L, const torch::Tensor& hidden) {
  TORCH_CHECK(w.size() == 4 + 10 * L, "mtp_forward: expected ", 4 + 10 * L, " weights, got ", w.size());
  TORCH_CHECK(hidden.is_contiguous() && hidden.size(1) % 8 == 0,
              "mtp_forward: hidden must be contiguous [T, H], H % 8 == 0");
}

// Qwen3NextMTP.forward (mtp.py; its torch path is the reference) with a cache, in one call:
// z = fc([norm(embed(ids)) ; norm(hidden)]), then per layer gated attention over the paged cache
// (KV written at slot_mapping) and the sparse MoE with its shared expert, then the final norm.
// Only the rows in `rows` (flat indices, any order; None: all) come out: the last layer writes
// K/V for every row but runs its queries, o_proj, MoE and the final norm on those rows alone
// (a catch-up needs the output of each sequence's last position only).
// ids, positions [T]; hidden [T, H]; inv_freq [d/2] (partial NeoX rotary of the first d dims,
// angles in fp32 as rope_cos_sin) or cos, sin [T, d] given; kv_caches: one per layer; w: embed
// [V, H], pre-fc norms [2, H], fc [H, 2H], final norm [H], then per layer: input norm [H], fused
// q|k|v [(2Hq + 2Hkv) D, H] (query rows per head [query | gate]), q|k norm [Hq + Hkv, D], o_proj
// [H, Hq D], post norm [H], router [E, H], shared gate|up|expert-gate [2Is + 1, H], experts
// gate_up [E, 2I, H], experts down [E, H, I], shared down [H, Is]. -> [R, H].
torch::Tensor mtp_forward(torch::Tensor ids, torch::Tensor hidden, torch::Tensor positions, torch::Tensor inv_freq,
                          double attention_factor, c10::optional<torch::Tensor> cos_opt,
                          c10::optional<torch::Tensor> sin_opt, std::vector<torch::Tensor> kv_caches,
                          torch::Tensor block_tables, torch::Tensor cu_seqlens, torch::Tensor context_lens,
                          torch::Tensor slot_mapping, c10::optional<torch::Tensor> rows_opt,
                          std::vector<torch::Tensor> w, int64_t Hq, int64_t top_k, bool norm_topk, double eps,
                          double scale) {
  check_weights(w, kv_caches.size(), hidden);
  MTPStep st;
  if (cos_opt.has_value()) {  // long runs: torch's vectorised cos/sin
    st.cos = cos_opt->contiguous();
    st.sin = sin_opt->contiguous();
  } else {
    auto cs = rope_tables(positions, inv_freq, static_cast<float>(attention_factor));
    st.cos = cs[0];
    st.sin = cs[1];
  }
  st.block_tables = block_tables;
  st.cu_seqlens = cu_seqlens;
  st.context_lens = context_lens;
  st.slot_mapping = slot_mapping;
  if (rows_opt.has_value()) keep_rows(st, rows_opt->contiguous(), ids.size(0));
  return mtp_pass(ids, hidden, st, kv_caches, w, Hq, top_k, norm_topk, static_cast<float>(eps), scale);
}

// First index of each row's maximum over the first n columns of x [R, V] @ lm_head^T (the greedy
// draft: compute_logits masks ids >= n, then argmax_rows).
std::vector<int64_t> greedy_tokens(const torch::Tensor& x, const torch::Tensor& lm_head, int64_t n) {
  auto logits = project(x, lm_head);
  const int64_t R = logits.size(0), V = logits.size(1), lim = std::min(n, V);
  const float* lp = logits.data_ptr<float>();
  std::vector<int64_t> out(R);
  for (int64_t r = 0; r < R; ++r) {  // the maximum 8 lanes at a time, then its first index
    const float* row = lp + r * V;
    float mx = row[0];
    int64_t v = 0;
    if (lim >= 8) {
      v8 m = load8(row);
      for (v = 8; v + 8 <= lim; v += 8) {
        const v8 x = load8(row + v);
        m = m > x ? m : x;
      }
      for (int u = 0; u < 8; ++u) mx = std::max(mx, m[u]);
    }
    for (; v < lim; ++v) mx = std::max(mx, row[v]);
    int64_t best = 0;
    while (best + 1 < lim && !(row[best] >= mx)) ++best;
    out[r] = best;
  }
  return out;
}

// Greedy drafting in one call: the catch-up pass (mtp_forward's arguments; its kept rows = one per
// drafting sequence), then for step j = 1 .. S-1 a pass of one token per row that still drafts:
// (previous draft, previous output) at draft_positions[r, j - 1] with KV at draft_slots[r, j - 1]
// (< 0: row r drafts no more from there on). Each draft is the argmax of the
// output's logits over the first n_vocab ids. -> drafts [R, S] (-1 where a row stopped).
torch::Tensor mtp_draft_greedy(torch::Tensor ids, torch::Tensor hidden, torch::Tensor positions,
                               torch::Tensor inv_freq, double attention_factor, c10::optional<torch::Tensor> cos_opt,
                               c10::optional<torch::Tensor> sin_opt, std::vector<torch::Tensor> kv_caches,
                               torch::Tensor block_tables, torch::Tensor cu_seqlens, torch::Tensor context_lens,
                               torch::Tensor slot_mapping, torch::Tensor rows, std::vector<torch::Tensor> w,
                               int64_t Hq, int64_t top_k, bool norm_topk, double eps, double scale,
                               torch::Tensor lm_head, int64_t n_vocab, torch::Tensor draft_positions,
                               torch::Tensor draft_slots) {
  const int64_t R = rows.numel(), S = draft_positions.size(1) + 1;
  TORCH_CHECK(draft_positions.size(0) == R && draft_slots.sizes() == draft_positions.sizes(),
              "mtp_draft_greedy: draft_positions / draft_slots must be [R, S - 1]");
  check_weights(w, kv_caches.size(), hidden);
  const float e = static_cast<float>(eps), af = static_cast<float>(attention_factor);
  MTPStep st;
  if (cos_opt.has_value()) {
    st.cos = cos_opt->contiguous();
    st.sin = sin_opt->contiguous();
  } else {
    auto cs = rope_tables(positions, inv_freq, af);
    st.cos = cs[0];
    st.sin = cs[1];
  }
  st.block_tables = block_tables;
  st.cu_seqlens = cu_seqlens;
  st.context_lens = context_lens;
  st.slot_mapping = slot_mapping;
  keep_rows(st, rows.contiguous(), ids.size(0));
  auto drafts = torch::full({R, S}, -1, rows.options());
  int64_t* dp = drafts.data_ptr<int64_t>();
  auto y = mtp_pass(ids, hidden, st, kv_caches, w, Hq, top_k, norm_topk, e, scale);  // [R, H]
  auto tok = greedy_tokens(y, lm_head, n_vocab);
  for (int64_t r = 0; r < R; ++r) dp[r * S] = tok[r];
  auto row_tables = st.sel_tables;  // [R, max_blocks]: each drafting row's block table
  const int64_t* pp = draft_positions.data_ptr<int64_t>();
  const int64_t* sp = draft_slots.data_ptr<int64_t>();
  const auto opt = rows.options();
  std::vector<int64_t> live(R);  // original row of each row of y
  for (int64_t r = 0; r < R; ++r) live[r] = r;
  for (int64_t j = 1; j < S && !live.empty(); ++j) {
    std::vector<int64_t> keep, next;  // rows of y that go on, and their original rows
    for (int64_t q = 0; q < (int64_t)live.size(); ++q)
      if (sp[live[q] * (S - 1) + j - 1] >= 0) {
        keep.push_back(q);
        next.push_back(live[q]);
      }
    if (next.empty()) break;
    const int64_t n = next.size();
    auto nid = torch::empty({n}, opt), npos = torch::empty({n}, opt), nslot = torch::empty({n}, opt);
    for (int64_t q = 0; q < n; ++q) {
      const int64_t r = next[q];
      TORCH_CHECK(pp[r * (S - 1) + j - 1] / kv_caches[0].size(2) < row_tables.size(1),
                  "mtp_draft_greedy: draft position past the row's block table");
      nid.data_ptr<int64_t>()[q] = dp[r * S + j - 1];
      npos.data_ptr<int64_t>()[q] = pp[r * (S - 1) + j - 1];
      nslot.data_ptr<int64_t>()[q] = sp[r * (S - 1) + j - 1];
    }
    if (n < (int64_t)live.size()) y = y.index_select(0, torch::tensor(keep, opt));
    MTPStep dst;
    auto cs = rope_tables(npos, inv_freq, af);
    dst.cos = cs[0];
    dst.sin = cs[1];
    dst.block_tables = n < R ? row_tables.index_select(0, torch::tensor(next, opt)) : row_tables;
    dst.cu_seqlens = torch::arange(n + 1, opt);
    dst.context_lens = npos;  // tokens before the draft's position
    dst.slot_mapping = nslot;
    y = mtp_pass(nid, y, dst, kv_caches, w, Hq, top_k, norm_topk, e, scale);
    tok = greedy_tokens(y, lm_head, n_vocab);
    for (int64_t q = 0; q < n; ++q) dp[next[q] * S + j] = tok[q];
    live = next;
  }
  return drafts;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("gdn_varlen", &gdn_varlen, "fused Gated DeltaNet core over a varlen batch (in place on state pools)");
  mod.def("moe_dense_act", &moe_dense_act, "the dense MoE's routing and activations between its two matmuls");
  mod.def("rms_norm", &rms_norm, "RMSNorm (+ residual add), plain or zero-centred weight");
  mod.def("gated_rmsnorm", &gated_rmsnorm, "rms(x) * weight * silu(z) per head");
  mod.def("apply_rotary", &apply_rotary, "partial NeoX rotary embedding");
  mod.def("write_kv", &write_kv, "K and V rows into the paged cache");
  mod.def("gate_output", &gate_output, "o * sigmoid(gate)");
  mod.def("moe_route", &moe_route, "softmax top-k routing");
  mod.def("linear", &linear, "x @ w.T for few rows of x (weight rows read once)");
  mod.def("moe_experts", &moe_experts, "routed experts, grouped by expert");
  mod.def("paged_attention", &paged_attention, "causal attention over the paged KV cache");
  mod.def("mtp_forward", &mtp_forward, "the MTP head's forward with a cache (drafts, catch-up)");
  mod.def("mtp_draft_greedy", &mtp_draft_greedy, "catch-up and greedy drafts of the MTP head in one call");
}
