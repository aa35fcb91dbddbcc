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

float clamp_finite(float x) {  // torch.clamp(x, -max, max): NaN stays NaN
  return x > kMax ? kMax : (x < -kMax ? -kMax : x);
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
          logits[i] = logits[i] > kMax ? kMax : logits[i];
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_step", &decode_step, "one-token VKT decoding step (CPU)");
  m.def("decayed_mean_forward", &decayed_mean_forward, "causal decayed weighted mean, forward (CPU)");
  m.def("decayed_mean_backward", &decayed_mean_backward, "causal decayed weighted mean, backward (CPU)");
}
