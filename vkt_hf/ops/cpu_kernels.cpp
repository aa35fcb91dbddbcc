// VKT's CPU kernels (loaded by vkt_hf/ops/cpu_kernels.py): the one-token decoding step, and the causal decayed
// mean's forward and backward (at the end of the file).
//
// Decoding: the same math as `decode_step` of vkt_hf/layers/decode.py (read that first; docs/method.md has the
// formula) for the layers conversions install: keys as the context, values gated and read out, the
// global read-out as a slot of the window's softmax, float32. Every head of a row is a few thousand
// multiply-adds; the eager step spends ~100 tensor operations (dispatch, not arithmetic) on them.
//
// Layouts (all contiguous, float32 unless said): q (B, H, d) the raw queries; k, v (B, Hk, d) the raw
// keys and values; gates (B, 2, H) the read-out gates (g_K, g_T); cos, sin (B, d) the RoPE tables of
// the new position (empty: no RoPE); importance (H, d); gamma (H) the decays (empty: none);
// summary_bias (H); learned_key, learned_value (H, d) (empty: no learned sink). State, updated in
// place: weighted_sum (B, H, 2d) the global mean of [key, value]; weight_total (B, H); window
// (B, H, n, 2d) the ring of the last n [key, value]; keys, values (B, Hk, w, d) the attention
// window's ring; sink_keys, sink_values (B, Hk, s, d); tokens_seen (B) int64.
//
// The caller has checked that both rings are full of real tokens and that every row has tokens
// beyond the window and the sink (the global slot is visible): `ready` in decode.py.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr float kMax = std::numeric_limits<float>::max();
constexpr float kTiny = std::numeric_limits<float>::min();

// normalization codes, in the order of NORMALIZATION_CODES in cpu_kernels.py
float normalize(float x, int64_t code) {
  switch (code) {
    case 0: return x / (1.0f + std::fabs(x));  // softsign
    case 1: return 1.0f / (1.0f + std::exp(-x));  // sigmoid
    case 2: return std::tanh(x);
    default: return x;  // none
  }
}

template <typename T>
T clamp_max(T x) {  // torch.clamp(x, max=finfo.max): +inf -> max, NaN stays NaN
  return x > std::numeric_limits<T>::max() ? std::numeric_limits<T>::max() : x;
}

float clamp_finite(float x) {  // torch.clamp(x, -max, max): NaN stays NaN
  return x < -kMax ? -kMax : clamp_max(x);
}

float guard(float den, float eps) {  // keep the sign, |den| >= eps (vkt_hf.ops.functional.guard)
  if (std::isnan(den)) return den;
  return den >= 0 ? (den < eps ? eps : den) : (den > -eps ? -eps : den);
}

float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }  // torch's threshold 20

float dot(const float* a, const float* b, int64_t n) {
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) total += a[i] * b[i];
  return total;
}

void rotate(const float* x, const float* cos, const float* sin, float* out, int64_t d) {
  const int64_t half = d / 2;  // x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[half:], x[:half])
  for (int64_t j = 0; j < d; ++j) out[j] = x[j] * cos[j] + (j < half ? -x[j + half] : x[j - half]) * sin[j];
}

float torch_lerp(float start, float end, float weight) {  // torch.lerp's formula
  return weight < 0.5f ? start + weight * (end - start) : end - (end - start) * (1.0f - weight);
}

}  // namespace

std::vector<torch::Tensor> decode_step(
    torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor gates, torch::Tensor cos, torch::Tensor sin,
    torch::Tensor importance, torch::Tensor gamma, torch::Tensor summary_bias, torch::Tensor learned_key,
    torch::Tensor learned_value, torch::Tensor weighted_sum, torch::Tensor weight_total, torch::Tensor window,
    torch::Tensor keys, torch::Tensor values, torch::Tensor sink_keys, torch::Tensor sink_values,
    torch::Tensor tokens_seen, int64_t position, double eps_, int64_t normalization, bool uniform_weights) {
  for (const auto& t : {q, k, v, gates, cos, sin, importance, gamma, summary_bias, learned_key, learned_value,
                        weighted_sum, weight_total, window, keys, values, sink_keys, sink_values})
    TORCH_CHECK(t.numel() == 0 || (t.is_contiguous() && t.scalar_type() == torch::kFloat32 && t.device().is_cpu()),
                "vkt decode kernel: every tensor must be a contiguous float32 CPU tensor");
  TORCH_CHECK(tokens_seen.is_contiguous() && tokens_seen.scalar_type() == torch::kInt64, "tokens_seen: int64");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k.size(1), group = heads / kv_heads;
  const int64_t ring = window.size(2), slots = keys.size(2), sinks = sink_keys.numel() ? sink_keys.size(2) : 0;
  const int64_t wide = 2 * dim;
  const bool rope = cos.numel() > 0, decay = gamma.numel() > 0, learned = learned_key.numel() > 0;
  const float eps = static_cast<float>(eps_), scale = 1.0f / std::sqrt(static_cast<float>(dim));
  const int64_t ring_slot = position % ring, window_slot = position % slots;

  auto mixed = torch::empty({batch, heads, dim}, q.options());
  auto scalar = torch::empty({batch, heads}, q.options());
  const float *Q = q.data_ptr<float>(), *Kin = k.data_ptr<float>(), *Vin = v.data_ptr<float>();
  const float *G = gates.data_ptr<float>(), *V = importance.data_ptr<float>(), *bias = summary_bias.data_ptr<float>();
  const float *C = rope ? cos.data_ptr<float>() : nullptr, *S = rope ? sin.data_ptr<float>() : nullptr;
  const float *gam = decay ? gamma.data_ptr<float>() : nullptr;
  const float *lk = learned ? learned_key.data_ptr<float>() : nullptr;
  const float *lv = learned ? learned_value.data_ptr<float>() : nullptr;
  float *mean_all = weighted_sum.data_ptr<float>(), *total_all = weight_total.data_ptr<float>();
  float *ring_all = window.data_ptr<float>(), *keys_all = keys.data_ptr<float>(), *values_all = values.data_ptr<float>();
  const float *sk_all = sinks ? sink_keys.data_ptr<float>() : nullptr;
  const float *sv_all = sinks ? sink_values.data_ptr<float>() : nullptr;
  int64_t* seen = tokens_seen.data_ptr<int64_t>();
  float *out_all = mixed.data_ptr<float>(), *a_all = scalar.data_ptr<float>();

  std::vector<float> local(wide), rq(dim), rk(dim), logits(sinks + slots + 2);
  for (int64_t b = 0; b < batch; ++b) {
    const float far = static_cast<float>(seen[b] - (slots - 1 + sinks));
    for (int64_t kv = 0; kv < kv_heads; ++kv) {
      const float* key = Kin + (b * kv_heads + kv) * dim;
      const float* value = Vin + (b * kv_heads + kv) * dim;
      float* key_ring = keys_all + (b * kv_heads + kv) * slots * dim;
      float* value_ring = values_all + (b * kv_heads + kv) * slots * dim;
      const float* sink_key = sinks ? sk_all + (b * kv_heads + kv) * sinks * dim : nullptr;
      const float* sink_value = sinks ? sv_all + (b * kv_heads + kv) * sinks * dim : nullptr;
      // the new key and value take the oldest slot of the window first: the token attends to itself
      if (rope) rotate(key, C + b * dim, S + b * dim, rk.data(), dim);
      for (int64_t j = 0; j < dim; ++j) {
        key_ring[window_slot * dim + j] = rope ? rk[j] : key[j];
        value_ring[window_slot * dim + j] = value[j];
      }
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kv * group + g, row = b * heads + h;
        const float* query = Q + row * dim;
        float* mean = mean_all + row * wide;
        float* ring_row = ring_all + row * ring * wide;
        float* out = out_all + row * dim;
        // VKT terms: a = norm(s / guard(K . T)), a * value + g_T * T_value (K: the mean before this token)
        const float score = dot(query, V + h * dim, dim);
        for (int64_t j = 0; j < wide; ++j) local[j] = 0.0f;
        for (int64_t slot = 0; slot < ring; ++slot)
          for (int64_t j = 0; j < wide; ++j) local[j] += ring_row[slot * wide + j];
        for (int64_t j = 0; j < wide; ++j) local[j] /= static_cast<float>(ring);
        const float den = clamp_finite(dot(mean, local.data(), dim));
        const float a = normalize(clamp_finite(score / guard(den, eps)), normalization);
        a_all[row] = a;
        const float gate_t = G[(b * 2 + 1) * heads + h];
        for (int64_t j = 0; j < dim; ++j) out[j] = a * value[j] + gate_t * local[dim + j];
        // the softmax over [sink, window, learned sink, global slot]
        const float* wq = query;
        if (rope) {
          rotate(query, C + b * dim, S + b * dim, rq.data(), dim);
          wq = rq.data();
        }
        int64_t n = 0;
        for (int64_t i = 0; i < sinks; ++i) logits[n++] = dot(wq, sink_key + i * dim, dim) * scale;
        for (int64_t i = 0; i < slots; ++i) logits[n++] = dot(wq, key_ring + i * dim, dim) * scale;
        if (learned) logits[n++] = dot(query, lk + h * dim, dim) * scale;
        logits[n++] = dot(query, mean, dim) * scale + std::log1p(far) + bias[h];
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < n; ++i) {
          logits[i] = clamp_max(logits[i]);
          top = logits[i] > top ? logits[i] : top;
        }
        float norm = 0.0f;
        for (int64_t i = 0; i < n; ++i) norm += (logits[i] = std::exp(logits[i] - top));
        for (int64_t i = 0; i < n; ++i) logits[i] /= norm;
        n = 0;
        for (int64_t i = 0; i < sinks; ++i, ++n)
          for (int64_t j = 0; j < dim; ++j) out[j] += logits[n] * sink_value[i * dim + j];
        for (int64_t i = 0; i < slots; ++i, ++n)
          for (int64_t j = 0; j < dim; ++j) out[j] += logits[n] * value_ring[i * dim + j];
        if (learned) {
          for (int64_t j = 0; j < dim; ++j) out[j] += logits[n] * lv[h * dim + j];
          ++n;
        }
        for (int64_t j = 0; j < dim; ++j) out[j] += logits[n] * mean[dim + j];
        // the sums, once this head has read them: total <- gamma total + w, mean <- lerp(mean, R, w / total)
        const float weight = uniform_weights ? 1.0f : softplus(score);
        float& total = total_all[row];
        total = (decay ? total * gam[h] : total) + weight;
        const float share = weight / (total > kTiny ? total : kTiny);
        float* newest = ring_row + ring_slot * wide;
        for (int64_t j = 0; j < wide; ++j) {
          const float stream = j < dim ? key[j] : value[j - dim];
          mean[j] = torch_lerp(mean[j], stream, share);
          newest[j] = stream;
        }
      }
    }
    seen[b] += 1;
  }
  return {mixed, scalar};
}

// The whole attention of a decoding step for plain nn.Linear projections: q, k, v and the read-out gates from x
// (B, hidden), decode_step, then o_proj; returns {out (B, hidden), a (B, H)}. `projections` holds the weights
// and biases of q, k, v, the gates and o, in that order (an empty bias: none). The products are ATen calls from
// here: the same kernels as F.linear, without a trip through Python for each.
std::vector<torch::Tensor> decode_layer(
    torch::Tensor x, std::vector<torch::Tensor> projections, int64_t heads, int64_t kv_heads, torch::Tensor cos,
    torch::Tensor sin, torch::Tensor importance, torch::Tensor gamma, torch::Tensor summary_bias,
    torch::Tensor learned_key, torch::Tensor learned_value, torch::Tensor weighted_sum, torch::Tensor weight_total,
    torch::Tensor window, torch::Tensor keys, torch::Tensor values, torch::Tensor sink_keys,
    torch::Tensor sink_values, torch::Tensor tokens_seen, int64_t position, double eps, int64_t normalization,
    bool uniform_weights) {
  TORCH_CHECK(projections.size() == 10, "decode_layer: 5 weights and 5 biases");
  const auto linear = [&](const torch::Tensor& input, int64_t i) {
    const auto& bias = projections[2 * i + 1];
    return bias.numel() ? at::linear(input, projections[2 * i], bias) : at::linear(input, projections[2 * i]);
  };
  const int64_t batch = x.size(0), dim = importance.size(1);
  auto result = decode_step(linear(x, 0).view({batch, heads, dim}), linear(x, 1).view({batch, kv_heads, dim}),
                            linear(x, 2).view({batch, kv_heads, dim}), linear(x, 3), cos, sin, importance, gamma,
                            summary_bias, learned_key, learned_value, weighted_sum, weight_total, window, keys,
                            values, sink_keys, sink_values, tokens_seen, position, eps, normalization,
                            uniform_weights);
  return {linear(result[0].view({batch, heads * dim}), 4), result[1]};
}

// ------------------------------------------------------------------------------------------------
// The causal decayed mean of vkt_hf/ops/autograd.py (`DecayedMean`), forward and backward, as one sequential
// sweep per (batch, head) row: y_t = exp(ld_t) y_{t-1} + [w_t v_t, w_t] (y_{-1} = initial), token t gets
// E_t = exp(ld_t) y_{t-1} and the mean E_t[:D] / E_t[D] (the fallback where that total is 0). The chunked
// PyTorch scan makes ~20 passes over (N, D + 1) tensors; this makes one (and one back).
//
// vectors (B, H, N, D), weights (B, H, N), log_decay (B, H, N) or empty, initial (B, H, D + 1),
// fallback (B, H, D); float32 or float64, contiguous.

namespace {

template <typename T>
void mean_row(const T* v, const T* w, const T* ld, const T* initial, const T* fallback, T* mean, T* last,
              T* exclusive, int64_t n, int64_t dim) {
  const int64_t wide = dim + 1;
  std::vector<T> y(initial, initial + wide);
  for (int64_t t = 0; t < n; ++t) {
    const T decay = ld ? std::exp(ld[t]) : T(1);
#pragma omp simd
    for (int64_t j = 0; j < wide; ++j) y[j] *= decay;  // E_t: the tokens before t
    if (exclusive) std::copy(y.begin(), y.end(), exclusive + t * wide);
    const T total = y[dim];
    if (total > 0) {
      const T inverse = T(1) / total;
#pragma omp simd
      for (int64_t j = 0; j < dim; ++j) mean[t * dim + j] = y[j] * inverse;
    } else {
      std::copy(fallback, fallback + dim, mean + t * dim);
    }
#pragma omp simd
    for (int64_t j = 0; j < dim; ++j) y[j] += w[t] * v[t * dim + j];
    y[dim] += w[t];
  }
  std::copy(y.begin(), y.end(), last);
}

template <typename T>
struct BackwardBuffers {  // one per thread: a row's exclusive sums and means, and the running gradients
  std::vector<T> exclusive, mean, last, g, h;
  BackwardBuffers(int64_t n, int64_t dim)
      : exclusive(n * (dim + 1)), mean(n * dim), last(dim + 1), g(dim + 1), h(dim + 1) {}
};

template <typename T>
void backward_row(BackwardBuffers<T>& b, int64_t r, int64_t n, int64_t dim, const T* v, const T* w, const T* ld,
                  const T* init, const T* fb, const T* gm, const T* gl, T* dv, T* dw, T* dld, T* dinit, T* dfb) {
  const int64_t wide = dim + 1;
  const T* ldr = ld ? ld + r * n : nullptr;
  const T *vr = v + r * n * dim, *wr = w + r * n;
  T *g = b.g.data(), *h = b.h.data();
  mean_row<T>(vr, wr, ldr, init + r * wide, fb + r * dim, b.mean.data(), b.last.data(), b.exclusive.data(), n, dim);
  for (int64_t j = 0; j < wide; ++j) g[j] = gl ? gl[r * wide + j] : T(0);
  for (int64_t t = n - 1; t >= 0; --t) {
    const T* e = b.exclusive.data() + t * wide;
    const T* vt = vr + t * dim;
    T* dvt = dv + (r * n + t) * dim;
    // dx_t = G_t: through x_t = [w_t v_t, w_t]
    T dot_v = 0;
#pragma omp simd reduction(+ : dot_v)
    for (int64_t j = 0; j < dim; ++j) {
      dvt[j] = g[j] * wr[t];
      dot_v += g[j] * vt[j];
    }
    dw[r * n + t] = dot_v + g[dim];
    // H_t = dE_t + G_t
    const T total = e[dim];
    const T* gt = gm ? gm + (r * n + t) * dim : nullptr;
    if (gt && total > 0) {
      const T inverse = T(1) / total;
      const T* mt = b.mean.data() + t * dim;
      T along = 0;
#pragma omp simd reduction(+ : along)
      for (int64_t j = 0; j < dim; ++j) {
        h[j] = gt[j] * inverse + g[j];
        along += gt[j] * mt[j];
      }
      h[dim] = -along * inverse + g[dim];
    } else {
      if (gt)
        for (int64_t j = 0; j < dim; ++j) dfb[r * dim + j] += gt[j];
      for (int64_t j = 0; j < wide; ++j) h[j] = g[j];
    }
    if (dld) {
      T along = 0;
#pragma omp simd reduction(+ : along)
      for (int64_t j = 0; j < wide; ++j) along += h[j] * e[j];
      dld[r * n + t] = along;
    }
    const T decay = ldr ? std::exp(ldr[t]) : T(1);
#pragma omp simd
    for (int64_t j = 0; j < wide; ++j) g[j] = decay * h[j];  // G_{t-1}
  }
  for (int64_t j = 0; j < wide; ++j) dinit[r * wide + j] = g[j];
}

}  // namespace

std::vector<torch::Tensor> decayed_mean_forward(torch::Tensor vectors, torch::Tensor weights, torch::Tensor log_decay,
                                                torch::Tensor initial, torch::Tensor fallback) {
  const int64_t rows = vectors.size(0) * vectors.size(1), n = vectors.size(2), dim = vectors.size(3);
  auto mean = torch::empty_like(vectors);
  auto last = torch::empty_like(initial);
  const bool decay = log_decay.numel() > 0;
  AT_DISPATCH_FLOATING_TYPES(vectors.scalar_type(), "decayed_mean_forward", [&] {
    const scalar_t *v = vectors.data_ptr<scalar_t>(), *w = weights.data_ptr<scalar_t>();
    const scalar_t *ld = decay ? log_decay.data_ptr<scalar_t>() : nullptr;
    const scalar_t *init = initial.data_ptr<scalar_t>(), *fb = fallback.data_ptr<scalar_t>();
    scalar_t *m = mean.data_ptr<scalar_t>(), *l = last.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t first, int64_t end) {
      for (int64_t r = first; r < end; ++r)
        mean_row<scalar_t>(v + r * n * dim, w + r * n, ld ? ld + r * n : nullptr, init + r * (dim + 1),
                           fb + r * dim, m + r * n * dim, l + r * (dim + 1), nullptr, n, dim);
    });
  });
  return {mean, last};
}

// Backward: with dE_t = [g_t / W_t, -(g_t . mean_t) / W_t] (0 where W_t = 0, whose g_t goes to the fallback)
// and H_t = dE_t + G_t, G_t = exp(ld_{t+1}) H_{t+1} (G_{N-1} = the last state's gradient), from the end:
// dx_t = G_t, d ld_t = H_t . E_t, d initial = exp(ld_0) H_0; x_t = [w_t v_t, w_t] gives d v and d w.
std::vector<torch::Tensor> decayed_mean_backward(torch::Tensor grad_mean, torch::Tensor grad_last,
                                                 torch::Tensor vectors, torch::Tensor weights,
                                                 torch::Tensor log_decay, torch::Tensor initial,
                                                 torch::Tensor fallback) {
  const int64_t rows = vectors.size(0) * vectors.size(1), n = vectors.size(2), dim = vectors.size(3);
  const bool decay = log_decay.numel() > 0, has_mean = grad_mean.numel() > 0, has_last = grad_last.numel() > 0;
  auto d_vectors = torch::empty_like(vectors);
  auto d_weights = torch::empty_like(weights);
  auto d_log_decay = decay ? torch::empty_like(log_decay) : torch::empty({0}, vectors.options());
  auto d_initial = torch::empty_like(initial);
  auto d_fallback = torch::zeros_like(fallback);
  AT_DISPATCH_FLOATING_TYPES(vectors.scalar_type(), "decayed_mean_backward", [&] {
    const scalar_t *v = vectors.data_ptr<scalar_t>(), *w = weights.data_ptr<scalar_t>();
    const scalar_t *ld = decay ? log_decay.data_ptr<scalar_t>() : nullptr;
    const scalar_t *init = initial.data_ptr<scalar_t>(), *fb = fallback.data_ptr<scalar_t>();
    const scalar_t *gm = has_mean ? grad_mean.data_ptr<scalar_t>() : nullptr;
    const scalar_t *gl = has_last ? grad_last.data_ptr<scalar_t>() : nullptr;
    scalar_t *dv = d_vectors.data_ptr<scalar_t>(), *dw = d_weights.data_ptr<scalar_t>();
    scalar_t *dld = decay ? d_log_decay.data_ptr<scalar_t>() : nullptr;
    scalar_t *dinit = d_initial.data_ptr<scalar_t>(), *dfb = d_fallback.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t first, int64_t end) {
      BackwardBuffers<scalar_t> buffers(n, dim);
      for (int64_t r = first; r < end; ++r)
        backward_row<scalar_t>(buffers, r, n, dim, v, w, ld, init, fb, gm, gl, dv, dw, dld, dinit, dfb);
    });
  });
  return {d_vectors, d_weights, d_log_decay, d_initial, d_fallback};
}

// ------------------------------------------------------------------------------------------------
// The softmax window of vkt_hf/ops/autograd.py (`WindowSoftmax`: training, and inference on CPU), one query
// row at a time: logits over [sink, window, read-out slot], softmax, weighted values; the backward recomputes
// the probabilities from the saved row maximum and normaliser, dS = P (dP - rowsum(dO O)) (as the PyTorch
// Function). The PyTorch version multiplies (G n) x 2n blocks of which half the keys are masked and passes
// over (tokens x slots) tensors a dozen times; here each query reads only its n keys, in cache.
//
// Layouts (contiguous, float32 or float64): q (B, Hk, G, b, n, d) the query blocks; keys, values
// (B, Hk, b + 1, n, d) the key blocks (block 0 the history; query block i sees key blocks i and i + 1, "the
// pair"); allowed (B, b, n, 2n) bool, the keys of its pair each query sees, which must lie in the band
// [o + 1, o + n] for query offset o (sliding_window_attention builds it so); sink_keys, sink_values
// (B, Hk, s, d) and visible (B, b, n, s) bool, or empty (no sink); logit (B, Hk, G, b, n) and value
// (B, Hk, G, b, n, d), the read-out slot, or empty. Non-finite inputs follow the PyTorch Function's rules in the
// forward (a NaN logit makes its row NaN; a non-finite value reaches only the queries that weigh it), so a row's
// result never depends on another row's inputs; the backward's gradients are then not specified.

namespace {

template <typename T>
inline T fast_exp(T x) {
  return std::exp(x);
}

// exp for x <= 0 (a logit minus its row maximum), vectorizable: 2^k p(r), r = x - k ln 2 in [-ln2/2, ln2/2],
// p the degree-6 Taylor polynomial (relative error < 2e-7); below -87 (exp < 2^-125) it returns 0. Built with
// -fno-trapping-math, without which the selects below are branches and the loop is not vectorized.
template <>
inline float fast_exp<float>(float x) {
  const float y = x < -87.0f ? -87.0f : x;
  const float k = std::nearbyint(y * 1.44269504088896341f);
  const float r = (y - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
  const float p =
      1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);  // 2^k
  return x < -87.0f ? 0.0f : p * scale;
}

template <typename T>
bool finite_row(const T* x, int64_t dim) {
  T acc = 0;  // x * 0 is 0 for a finite x and NaN otherwise
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < dim; ++k) acc += x[k] * T(0);
  return acc == 0;
}

// Marks in `bad` the `count` rows of `rows` that hold a non-finite number; if there are any, points `rows` at a
// copy in `clean` with those rows zeroed. Returns whether there were any.
template <typename T>
bool zero_non_finite_rows(const T*& rows, int64_t count, int64_t dim, uint8_t* bad, std::vector<T>& clean) {
  bool any = false;
  for (int64_t u = 0; u < count; ++u) any |= (bad[u] = !finite_row(rows + u * dim, dim));
  if (any) {
    clean.assign(rows, rows + count * dim);
    for (int64_t u = 0; u < count; ++u)
      if (bad[u]) std::fill_n(clean.begin() + u * dim, dim, T(0));
    rows = clean.data();
  }
  return any;
}

// Register-tiled products (a tile of accumulators stays in registers; a loop over memory would wait on its own
// stores): out[u] = sum_k x[k] columns[k stride + u] for u in [first, last) ...
template <typename T>
void columns_product(const T* x, const T* columns, int64_t stride, int64_t dim, int64_t first, int64_t last, T* out) {
  constexpr int64_t kTile = 256 / sizeof(T);  // 64 floats: 8 AVX2 registers
  int64_t u = first;
  for (; u + kTile <= last; u += kTile) {
    T acc[kTile] = {};
    for (int64_t k = 0; k < dim; ++k) {
      const T xk = x[k];
      const T* c = columns + k * stride + u;
#pragma omp simd
      for (int64_t i = 0; i < kTile; ++i) acc[i] += xk * c[i];
    }
    for (int64_t i = 0; i < kTile; ++i) out[u + i] = acc[i];
  }
  for (; u < last; ++u) {
    T acc = 0;
    for (int64_t k = 0; k < dim; ++k) acc += x[k] * columns[k * stride + u];
    out[u] = acc;
  }
}

// ... and out[k] (+)= sum_{u in [first, last)} w[u w_stride] rows[u row_stride + k] for k in [0, dim)
template <typename T>
void rows_product(const T* w, int64_t w_stride, const T* rows, int64_t row_stride, int64_t dim, int64_t first,
                  int64_t last, T* out, bool accumulate) {
  constexpr int64_t kTile = 256 / sizeof(T);
  int64_t k = 0;
  for (; k + kTile <= dim; k += kTile) {
    T acc[kTile];
    for (int64_t i = 0; i < kTile; ++i) acc[i] = accumulate ? out[k + i] : T(0);
    for (int64_t u = first; u < last; ++u) {
      const T wu = w[u * w_stride];
      const T* r = rows + u * row_stride + k;
#pragma omp simd
      for (int64_t i = 0; i < kTile; ++i) acc[i] += wu * r[i];
    }
    for (int64_t i = 0; i < kTile; ++i) out[k + i] = acc[i];
  }
  for (; k < dim; ++k) {
    T acc = accumulate ? out[k] : T(0);
    for (int64_t u = first; u < last; ++u) acc += w[u * w_stride] * rows[u * row_stride + k];
    out[k] = acc;
  }
}

template <typename T>
struct Window {
  const T *q, *keys, *values, *sink_keys, *sink_values, *logit, *value;
  const bool *allowed, *visible;
  int64_t kv_heads, group, blocks, n, dim, sinks;
  T scale;

  // the (pair) key block `block` of key head `hk` of row `b`: 2n rows of d
  int64_t pair(int64_t b, int64_t hk, int64_t block) const { return ((b * kv_heads + hk) * (blocks + 1) + block) * n; }
  // the query row (b, hk, g, block, o)
  int64_t row(int64_t b, int64_t hk, int64_t g, int64_t block, int64_t o) const {
    return (((b * kv_heads + hk) * group + g) * blocks + block) * n + o;
  }

  // the transposed keys (or values) of a pair, (d, 2n)
  void transpose(const T* rows, T* out) const {
    for (int64_t u = 0; u < 2 * n; ++u)
      for (int64_t k = 0; k < dim; ++k) out[k * 2 * n + u] = rows[u * dim + k];
  }

  // The logits of query row (b, g, block, o) of key head hk into `sink` (s) and `band` (2n, only [o + 1, o + n]
  // written), the slot's into `slot`; returns the row maximum (clamped to finite as torch's amax + clamp; NaN
  // when a logit the row sees is NaN).
  T logits(int64_t b, int64_t hk, int64_t block, int64_t o, const T* query, const T* kt, const T* slot_logit,
           T* sink, T* band, T* slot) const {
    T top = -std::numeric_limits<T>::infinity();
    const int64_t first = o + 1, last = o + n + 1, wide = 2 * n;
    // read as bytes: the vectorizer has no vector type for bool
    const uint8_t* ok = reinterpret_cast<const uint8_t*>(allowed + ((b * blocks + block) * n + o) * wide);
    columns_product(query, kt, wide, dim, first, last, band);
#pragma omp simd
    for (int64_t u = first; u < last; ++u) {
      band[u] = ok[u] != 0 ? clamp_max(band[u] * scale) : -std::numeric_limits<T>::infinity();
    }
    int nan = 0;
#pragma omp simd reduction(max : top) reduction(| : nan)
    for (int64_t u = first; u < last; ++u) {
      top = top > band[u] ? top : band[u];
      nan |= band[u] != band[u];
    }
    const T* sk = sinks ? sink_keys + (b * kv_heads + hk) * sinks * dim : nullptr;
    const bool* seen = sinks ? visible + ((b * blocks + block) * n + o) * sinks : nullptr;
    for (int64_t j = 0; j < sinks; ++j) {
      T d = 0;
#pragma omp simd reduction(+ : d)
      for (int64_t k = 0; k < dim; ++k) d += query[k] * sk[j * dim + k];
      sink[j] = seen[j] ? clamp_max(d * scale) : -std::numeric_limits<T>::infinity();
      top = std::max(top, sink[j]);
      nan |= sink[j] != sink[j];
    }
    if (slot_logit) {
      *slot = clamp_max(*slot_logit);
      top = std::max(top, *slot);
      nan |= *slot != *slot;
    }
    // a NaN logit makes the row's maximum NaN, and so every probability (torch.amax propagates NaN)
    return nan ? std::numeric_limits<T>::quiet_NaN() : std::max(top, std::numeric_limits<T>::lowest());
  }

  // exp(l - top) / norm in place; with norm <= 0, sets it to the sum (clamped to the smallest normal)
  void probabilities(int64_t o, T top, T& norm, T* sink, T* band, T* slot) const {
    const bool has_slot = logit != nullptr;
    const int64_t first = o + 1, last = o + n + 1;
    const bool fresh = norm <= 0;
#pragma omp simd
    for (int64_t u = first; u < last; ++u) band[u] = fast_exp<T>(band[u] - top);
    T total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t u = first; u < last; ++u) total += band[u];
    for (int64_t j = 0; j < sinks; ++j) total += (sink[j] = fast_exp<T>(sink[j] - top));
    if (has_slot) total += (*slot = fast_exp<T>(*slot - top));
    if (fresh) norm = std::max(total, std::numeric_limits<T>::min());
    const T inverse = T(1) / norm;
#pragma omp simd
    for (int64_t u = first; u < last; ++u) band[u] *= inverse;
    for (int64_t j = 0; j < sinks; ++j) sink[j] *= inverse;
    if (has_slot) *slot *= inverse;
  }
};

template <typename T>
Window<T> window_of(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                    const torch::Tensor& allowed, const torch::Tensor& sink_keys, const torch::Tensor& sink_values,
                    const torch::Tensor& visible, const torch::Tensor& logit, const torch::Tensor& value,
                    double scale) {
  const bool sink = sink_keys.numel() > 0, slot = logit.numel() > 0;
  return Window<T>{q.data_ptr<T>(),
                   keys.data_ptr<T>(),
                   values.data_ptr<T>(),
                   sink ? sink_keys.data_ptr<T>() : nullptr,
                   sink ? sink_values.data_ptr<T>() : nullptr,
                   slot ? logit.data_ptr<T>() : nullptr,
                   slot ? value.data_ptr<T>() : nullptr,
                   allowed.data_ptr<bool>(),
                   sink ? visible.data_ptr<bool>() : nullptr,
                   q.size(1),
                   q.size(2),
                   q.size(3),
                   q.size(4),
                   q.size(5),
                   sink ? sink_keys.size(2) : 0,
                   static_cast<T>(scale)};
}

void check_window(const std::vector<torch::Tensor>& tensors, const torch::Tensor& allowed,
                  const torch::Tensor& visible) {
  const auto type = tensors[0].scalar_type();
  for (const auto& t : tensors)
    TORCH_CHECK(t.numel() == 0 || (t.is_contiguous() && t.scalar_type() == type && t.device().is_cpu()),
                "vkt window kernel: every tensor must be a contiguous CPU tensor of the query's dtype");
  TORCH_CHECK(allowed.is_contiguous() && allowed.scalar_type() == torch::kBool, "allowed: contiguous bool");
  TORCH_CHECK(visible.numel() == 0 || (visible.is_contiguous() && visible.scalar_type() == torch::kBool),
              "visible: contiguous bool");
}

template <typename T>
void window_forward(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                    const torch::Tensor& allowed, const torch::Tensor& sink_keys, const torch::Tensor& sink_values,
                    const torch::Tensor& visible, const torch::Tensor& logit, const torch::Tensor& value, double scale,
                    torch::Tensor& out, torch::Tensor& top, torch::Tensor& norm) {
  const Window<T> w = window_of<T>(q, keys, values, allowed, sink_keys, sink_values, visible, logit, value, scale);
  const int64_t batch = q.size(0), kv_heads = w.kv_heads, group = w.group, blocks = w.blocks, n = w.n, dim = w.dim;
  constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
  T *O = out.data_ptr<T>(), *M = top.data_ptr<T>(), *Z = norm.data_ptr<T>();
  at::parallel_for(0, batch * kv_heads * blocks, 1, [&](int64_t first, int64_t end) {
    std::vector<T> kt(dim * 2 * n), band(2 * n), sink(w.sinks + 1), clean_values, clean_sink;
    std::vector<uint8_t> bad(2 * n), bad_sink(w.sinks + 1);
    T slot = 0;
    for (int64_t task = first; task < end; ++task) {
      const int64_t block = task % blocks, hk = (task / blocks) % kv_heads, b = task / (blocks * kv_heads);
      const T* pair_keys = w.keys + w.pair(b, hk, block) * dim;
      const T* pair_values = w.values + w.pair(b, hk, block) * dim;
      const T* sv = w.sinks ? w.sink_values + (b * kv_heads + hk) * w.sinks * dim : nullptr;
      w.transpose(pair_keys, kt.data());
      // a non-finite value reaches only the queries that weigh it (as the reference's _attend): in the products
      // it counts as 0, and a query that gives it weight gets NaN
      const bool any_bad = zero_non_finite_rows(pair_values, 2 * n, dim, bad.data(), clean_values);
      zero_non_finite_rows(sv, w.sinks, dim, bad_sink.data(), clean_sink);
      for (int64_t g = 0; g < group; ++g)
        for (int64_t o = 0; o < n; ++o) {
          const int64_t r = w.row(b, hk, g, block, o);
          const T* query = w.q + r * dim;
          T* o_row = O + r * dim;
          const T m = w.logits(b, hk, block, o, query, kt.data(), w.logit ? w.logit + r : nullptr, sink.data(),
                               band.data(), &slot);
          if (m != m) {  // a NaN logit: the whole row is NaN
            M[r] = Z[r] = kNaN;
            std::fill_n(o_row, dim, kNaN);
            continue;
          }
          T z = 0;
          w.probabilities(o, m, z, sink.data(), band.data(), &slot);
          M[r] = m;
          Z[r] = z;
          rows_product(band.data(), 1, pair_values, dim, dim, o + 1, o + n + 1, o_row, /*accumulate=*/false);
          bool poisoned = false;
          if (any_bad)
            for (int64_t u = o + 1; u < o + n + 1; ++u) poisoned |= bad[u] && band[u] != 0;
          for (int64_t j = 0; j < w.sinks; ++j) {
            poisoned |= bad_sink[j] && sink[j] != 0;
#pragma omp simd
            for (int64_t k = 0; k < dim; ++k) o_row[k] += sink[j] * sv[j * dim + k];
          }
          if (w.logit) {  // the slot's value is multiplied as is (0 * inf is NaN there too)
            const T* v = w.value + r * dim;
#pragma omp simd
            for (int64_t k = 0; k < dim; ++k) o_row[k] += slot * v[k];
          }
          if (poisoned) std::fill_n(o_row, dim, kNaN);
        }
    }
  });
}

template <typename T>
void window_backward(const torch::Tensor& grad, const torch::Tensor& q, const torch::Tensor& keys,
                     const torch::Tensor& values, const torch::Tensor& allowed, const torch::Tensor& sink_keys,
                     const torch::Tensor& sink_values, const torch::Tensor& visible, const torch::Tensor& logit,
                     const torch::Tensor& value, double scale, const torch::Tensor& top, const torch::Tensor& norm,
                     const torch::Tensor& out, torch::Tensor& d_q, torch::Tensor& d_keys, torch::Tensor& d_values,
                     torch::Tensor& d_sink_keys, torch::Tensor& d_sink_values, torch::Tensor& d_logit,
                     torch::Tensor& d_value) {
  const Window<T> w = window_of<T>(q, keys, values, allowed, sink_keys, sink_values, visible, logit, value, scale);
  const int64_t batch = q.size(0), kv_heads = w.kv_heads, group = w.group, blocks = w.blocks, n = w.n, dim = w.dim;
  const bool has_slot = w.logit != nullptr;
  const T *dO = grad.data_ptr<T>(), *O = out.data_ptr<T>();
  const T *M = top.data_ptr<T>(), *Z = norm.data_ptr<T>();
  T *dQ = d_q.data_ptr<T>(), *dK = d_keys.data_ptr<T>(), *dV = d_values.data_ptr<T>();
  T *dSK = d_sink_keys.data_ptr<T>(), *dSV = d_sink_values.data_ptr<T>();
  T *dL = has_slot ? d_logit.data_ptr<T>() : nullptr;
  T *dVal = has_slot ? d_value.data_ptr<T>() : nullptr;
  const int64_t halves = (blocks + 1) / 2;
  for (int64_t parity = 0; parity < 2; ++parity) {
    at::parallel_for(0, batch * kv_heads * halves, 1, [&](int64_t first, int64_t end) {
      // per task: the probabilities and dS of the block's rows over their bands, (G n, 2n), for dK and dV at the end
      std::vector<T> kt(dim * 2 * n), vt(dim * 2 * n), probs(group * n * 2 * n), d_logits(group * n * 2 * n);
      std::vector<T> sink(w.sinks + 1);
      T slot = 0;
      for (int64_t task = first; task < end; ++task) {
        const int64_t block = 2 * (task % halves) + parity;
        if (block >= blocks) continue;
        const int64_t hk = (task / halves) % kv_heads, b = task / (halves * kv_heads), wide = 2 * n;
        const int64_t base = w.pair(b, hk, block) * dim;
        const T *pair_keys = w.keys + base, *pair_values = w.values + base;
        const int64_t sink_base = (b * kv_heads + hk) * w.sinks * dim;
        const T* sk = w.sinks ? w.sink_keys + sink_base : nullptr;
        const T* sv = w.sinks ? w.sink_values + sink_base : nullptr;
        T* dsk = dSK + ((b * kv_heads + hk) * blocks + block) * w.sinks * dim;
        T* dsv = dSV + ((b * kv_heads + hk) * blocks + block) * w.sinks * dim;
        w.transpose(pair_keys, kt.data());
        w.transpose(pair_values, vt.data());
        for (int64_t g = 0; g < group; ++g)
          for (int64_t o = 0; o < n; ++o) {
            const int64_t r = w.row(b, hk, g, block, o), lo = o + 1, hi = o + n + 1;
            const T *query = w.q + r * dim, *d_out = dO + r * dim, *o_row = O + r * dim;
            T *band = probs.data() + (g * n + o) * wide, *d_band = d_logits.data() + (g * n + o) * wide;
            w.logits(b, hk, block, o, query, kt.data(), w.logit ? w.logit + r : nullptr, sink.data(), band, &slot);
            T z = Z[r];
            w.probabilities(o, M[r], z, sink.data(), band, &slot);
            T delta = 0;
#pragma omp simd reduction(+ : delta)
            for (int64_t k = 0; k < dim; ++k) delta += d_out[k] * o_row[k];
            // dP over the band, then dS = P (dP - delta)
            columns_product(d_out, vt.data(), wide, dim, lo, hi, d_band);
#pragma omp simd
            for (int64_t u = lo; u < hi; ++u) d_band[u] = band[u] * (d_band[u] - delta) * w.scale;
            T* dq = dQ + r * dim;
            rows_product(d_band, 1, pair_keys, dim, dim, lo, hi, dq, /*accumulate=*/false);
            for (int64_t j = 0; j < w.sinks; ++j) {
              T dp = 0;
#pragma omp simd reduction(+ : dp)
              for (int64_t k = 0; k < dim; ++k) dp += d_out[k] * sv[j * dim + k];
              const T ds = sink[j] * (dp - delta) * w.scale, p = sink[j];
#pragma omp simd
              for (int64_t k = 0; k < dim; ++k) {
                dq[k] += ds * sk[j * dim + k];
                dsk[j * dim + k] += ds * query[k];
                dsv[j * dim + k] += p * d_out[k];
              }
            }
            if (w.logit) {
              const T* v = w.value + r * dim;
              T along = 0;
#pragma omp simd reduction(+ : along)
              for (int64_t k = 0; k < dim; ++k) along += d_out[k] * v[k];
              dL[r] = slot * (along - delta);
#pragma omp simd
              for (int64_t k = 0; k < dim; ++k) dVal[r * dim + k] = slot * d_out[k];
            }
          }
        // dK_u += sum over the rows o whose band holds u (o in [u - n, u - 1]) of dS_ou q_o; dV_u alike with P, dO
        for (int64_t u = 0; u < wide; ++u) {
          const int64_t o_first = std::max<int64_t>(0, u - n), o_last = std::min<int64_t>(n, u);
          for (int64_t g = 0; g < group && o_first < o_last; ++g) {
            const int64_t r0 = w.row(b, hk, g, block, 0), at = g * n * wide + u;
            rows_product(d_logits.data() + at, wide, w.q + r0 * dim, dim, dim, o_first, o_last, dK + base + u * dim,
                         /*accumulate=*/true);
            rows_product(probs.data() + at, wide, dO + r0 * dim, dim, dim, o_first, o_last, dV + base + u * dim,
                         /*accumulate=*/true);
          }
        }
      }
    });
  }
}

}  // namespace

std::vector<torch::Tensor> window_softmax_forward(torch::Tensor q, torch::Tensor keys, torch::Tensor values,
                                                  torch::Tensor allowed, torch::Tensor sink_keys,
                                                  torch::Tensor sink_values, torch::Tensor visible,
                                                  torch::Tensor logit, torch::Tensor value, double scale) {
  check_window({q, keys, values, sink_keys, sink_values, logit, value}, allowed, visible);
  const int64_t batch = q.size(0), kv_heads = q.size(1), group = q.size(2), blocks = q.size(3), n = q.size(4);
  auto out = torch::empty_like(q);
  auto top = torch::empty({batch, kv_heads, group, blocks, n}, q.options());
  auto norm = torch::empty_like(top);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "window_softmax_forward", [&] {
    window_forward<scalar_t>(q, keys, values, allowed, sink_keys, sink_values, visible, logit, value, scale, out, top,
                             norm);
  });
  return {out, top, norm};
}

// Backward, per query row: the probabilities P recomputed, delta = dO . O, dS = P (dO . V - delta); dq = s dS K,
// dK += s dS q, dV += P dO (sink alike), d logit = P_slot (dO . value - delta), d value = P_slot dO. Query
// blocks i and i + 1 share key block i + 1: the even blocks run in parallel, then the odd ones.
std::vector<torch::Tensor> window_softmax_backward(torch::Tensor grad, torch::Tensor q, torch::Tensor keys,
                                                   torch::Tensor values, torch::Tensor allowed,
                                                   torch::Tensor sink_keys, torch::Tensor sink_values,
                                                   torch::Tensor visible, torch::Tensor logit, torch::Tensor value,
                                                   double scale, torch::Tensor top, torch::Tensor norm,
                                                   torch::Tensor out) {
  check_window({q, grad, keys, values, sink_keys, sink_values, logit, value, top, norm, out}, allowed, visible);
  const int64_t batch = q.size(0), kv_heads = q.size(1), blocks = q.size(3), dim = q.size(5);
  const bool has_sink = sink_keys.numel() > 0, has_slot = logit.numel() > 0;
  auto d_q = torch::empty_like(q);
  auto d_keys = torch::zeros_like(keys);
  auto d_values = torch::zeros_like(values);
  const int64_t sinks = has_sink ? sink_keys.size(2) : 0;
  // the sink's gradients per query block, summed over the blocks at the end
  auto d_sink_keys = torch::zeros({batch, kv_heads, blocks, sinks, dim}, q.options());
  auto d_sink_values = torch::zeros_like(d_sink_keys);
  auto d_logit = has_slot ? torch::empty_like(logit) : torch::empty({0}, q.options());
  auto d_value = has_slot ? torch::empty_like(value) : torch::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "window_softmax_backward", [&] {
    window_backward<scalar_t>(grad, q, keys, values, allowed, sink_keys, sink_values, visible, logit, value, scale, top,
                              norm, out, d_q, d_keys, d_values, d_sink_keys, d_sink_values, d_logit, d_value);
  });
  return {d_q, d_keys, d_values, d_sink_keys.sum(2), d_sink_values.sum(2), d_logit, d_value};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_step", &decode_step, "one-token VKT decoding step (CPU)");
  m.def("decode_layer", &decode_layer, "one-token VKT decoding step with the projections (CPU)");
  m.def("decayed_mean_forward", &decayed_mean_forward, "causal decayed weighted mean, forward (CPU)");
  m.def("decayed_mean_backward", &decayed_mean_backward, "causal decayed weighted mean, backward (CPU)");
  m.def("window_softmax_forward", &window_softmax_forward, "softmax window with sink and slot, forward (CPU)");
  m.def("window_softmax_backward", &window_softmax_backward, "softmax window with sink and slot, backward (CPU)");
}
