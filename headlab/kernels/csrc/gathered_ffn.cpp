// Batch-1 decode FFN over a token's kept channels, reading only their weights.
//
// w3 is one layer's interleaved channel-major copy [F, 3d]: row j = gate row j | up row j |
// down column j, so everything channel j needs is one contiguous run of 3d floats. For kept
// channels idx[0..k):
//
//   u_j = <w3[j, d:2d], x> + up_bias[j]
//   a_j = gate_act[j]                                   (given: the chooser computed the gate)
//       | silu(<w3[j, :d], x> + gate_bias[j])           (otherwise)
//   out = sum_j (a_j * u_j) * w3[j, 2d:3d]
//
// Four channels run in lockstep: eight row streams in flight at once keep the memory system
// busy (one row at a time reached ~0.8 of the bandwidth of a dense matvec, four ~1.0), and each
// output element is loaded and stored once per four channels. Every inner loop works on LANES
// independent partial sums, so the compiler vectorises it without reassociating a reduction.
// One thread, no allocation; the Python caller holds the tensors, so the GIL is released.

#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include <optional>

namespace {

constexpr int LANES = 16;
constexpr int LOCKSTEP = 4;

struct Args {
  const float* w;
  int64_t d;
  int64_t stride;
  const float* x;
  const int64_t* idx;
  const float* gate_act;   // [F] or null
  const float* gate_bias;  // [F] or null
  const float* up_bias;    // [F] or null
  float* out;
};

template <int B, bool GIVEN>
inline void channels(const Args& a, const int64_t* j) {
  const int64_t d = a.d, dv = d - d % LANES;
  const float* row[B];
  for (int b = 0; b < B; ++b) row[b] = a.w + j[b] * a.stride;

  float g[B][LANES] = {}, u[B][LANES] = {};
  for (int64_t t = 0; t < dv; t += LANES) {
    for (int b = 0; b < B; ++b) {
      for (int v = 0; v < LANES; ++v) {
        const float xv = a.x[t + v];
        if (!GIVEN) g[b][v] += row[b][t + v] * xv;
        u[b][v] += row[b][d + t + v] * xv;
      }
    }
  }
  float h[B];
  for (int b = 0; b < B; ++b) {
    float gs = 0.f, us = 0.f;
    for (int v = 0; v < LANES; ++v) {
      gs += g[b][v];
      us += u[b][v];
    }
    for (int64_t t = dv; t < d; ++t) {
      if (!GIVEN) gs += row[b][t] * a.x[t];
      us += row[b][d + t] * a.x[t];
    }
    if (a.up_bias) us += a.up_bias[j[b]];
    float act;
    if (GIVEN) {
      act = a.gate_act[j[b]];
    } else {
      if (a.gate_bias) gs += a.gate_bias[j[b]];
      act = gs / (1.f + std::exp(-gs));  // SiLU, as torch computes it
    }
    h[b] = act * us;
  }

  const float* down[B];
  for (int b = 0; b < B; ++b) down[b] = row[b] + 2 * d;
  for (int64_t t = 0; t < dv; t += LANES) {
    for (int v = 0; v < LANES; ++v) {
      float acc = a.out[t + v];
      for (int b = 0; b < B; ++b) acc += h[b] * down[b][t + v];
      a.out[t + v] = acc;
    }
  }
  for (int64_t t = dv; t < d; ++t) {
    float acc = a.out[t];
    for (int b = 0; b < B; ++b) acc += h[b] * down[b][t];
    a.out[t] = acc;
  }
}

template <bool GIVEN>
void run(const Args& a, int64_t k) {
  for (int64_t t = 0; t < a.d; ++t) a.out[t] = 0.f;
  int64_t i = 0;
  for (; i + LOCKSTEP <= k; i += LOCKSTEP) channels<LOCKSTEP, GIVEN>(a, a.idx + i);
  for (; i < k; ++i) channels<1, GIVEN>(a, a.idx + i);
}

void check_vector(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == n &&
                  t.is_contiguous(),
              name, " must be a contiguous float32 CPU vector of ", n, " entries, got ", t.sizes(), " ",
              t.scalar_type(), " on ", t.device());
}

const float* optional_vector(const std::optional<at::Tensor>& t, const char* name, int64_t n) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_vector(*t, name, n);
  return t->data_ptr<float>();
}

void gathered_ffn(const at::Tensor& w3, const at::Tensor& x, const at::Tensor& idx, at::Tensor& out,
                  const std::optional<at::Tensor>& gate_act, const std::optional<at::Tensor>& gate_bias,
                  const std::optional<at::Tensor>& up_bias) {
  const int64_t d = x.numel();
  check_vector(x, "x", d);
  check_vector(out, "out", d);
  TORCH_CHECK(w3.device().is_cpu() && w3.scalar_type() == at::kFloat && w3.dim() == 2 && w3.size(1) == 3 * d &&
                  w3.is_contiguous(),
              "w3 must be a contiguous float32 CPU matrix [F, 3 * ", d, "], got ", w3.sizes(), " ",
              w3.scalar_type());
  const int64_t n_channels = w3.size(0);
  TORCH_CHECK(idx.device().is_cpu() && idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.is_contiguous(),
              "idx must be a contiguous int64 CPU vector, got ", idx.sizes(), " ", idx.scalar_type());
  const int64_t k = idx.size(0);
  const int64_t* I = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < k; ++i)  // a wrong index would read foreign memory
    TORCH_CHECK(I[i] >= 0 && I[i] < n_channels, "idx[", i, "] = ", I[i], " is outside [0, ", n_channels, ")");
  Args a{w3.data_ptr<float>(),
         d,
         w3.stride(0),
         x.data_ptr<float>(),
         I,
         optional_vector(gate_act, "gate_act", n_channels),
         optional_vector(gate_bias, "gate_bias", n_channels),
         optional_vector(up_bias, "up_bias", n_channels),
         out.data_ptr<float>()};
  pybind11::gil_scoped_release released;
  if (a.gate_act)
    run<true>(a, k);
  else
    run<false>(a, k);
}

// ---- The same FFN with every weight at 4 bits (16 levels per group of 32 inputs, asymmetric) ----
//
// One layer's channel-major 4-bit copy, made from the model's own 4-bit levels
// (headlab.engine.dynamic.int4_gathered):
//   q3  uint8 [F, 3d/2]: channel j's gate row | up row | down column, two levels a byte; in each
//       group of 32 values byte i holds value i (low nibble) and value i + 16 (high nibble);
//   sm  bf16 [F, 4 * d/32]: the gate's scales, the gate's offsets, the up's scales, the up's offsets,
//       one per group of 32 inputs of the channel's rows;
//   dsm bf16 [F/32, 2, d]: the down projection's scales and offsets: its groups run along the
//       channels (the down projection's inputs), so channels 32b..32b+31 share row b of each.
// A weight is level * scale + offset. A token reads its kept channels' runs of q3 and sm, and dsm
// rows of the blocks it touches. idx must be sorted (the down sums run block by block):
//   <w, x> = sum_g scale_g * <levels_g, x_g> + offset_g * sum(x_g)
//   out    = sum_b dscale_b * (sum_{j in b} h_j * dlevels_j) + doffset_b * (sum_{j in b} h_j)

constexpr int GROUP = 32;

inline float bf16(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

struct Q4Args {
  const uint8_t* q;
  int64_t q_stride;
  const uint16_t* sm;
  int64_t sm_stride;
  const uint16_t* dsm;
  int64_t d;
  const float* x;
  const float* xsum;  // [d/32]: sum of x over each group
  const int64_t* idx;
  const float* gate_act;
  const float* gate_bias;
  const float* up_bias;
  float* acc;  // [d] scratch: this block's sum_j h_j * dlevels_j
  float* out;
};

constexpr int HALF = GROUP / 2;

// h_j = act_j * up_j for channel j from its scaled level sums `us` / `gs` (both kernels): the groups' offsets
// added through xsum, then the biases and the activation (or the given gate activation).
template <bool GIVEN>
inline float channel_output(const Q4Args& a, const uint16_t* sm, int64_t j, float us, float gs) {
  const int64_t groups = a.d / GROUP;
  for (int64_t grp = 0; grp < groups; ++grp) {
    us += bf16(sm[3 * groups + grp]) * a.xsum[grp];
    if (!GIVEN) gs += bf16(sm[groups + grp]) * a.xsum[grp];
  }
  if (a.up_bias) us += a.up_bias[j];
  if (GIVEN) return a.gate_act[j] * us;
  if (a.gate_bias) gs += a.gate_bias[j];
  return gs / (1.f + std::exp(-gs)) * us;  // SiLU
}

#if defined(__AVX2__) && defined(__FMA__)
// 32 levels of one group as four float vectors: values 0-7, 8-15 (low nibbles), 16-23, 24-31 (high nibbles).
inline void levels8x4(const uint8_t* q, __m256 w[4]) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i mask = _mm_set1_epi8(15);
  const __m128i lo = _mm_and_si128(bytes, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// scale * <levels of the group, x of the group> added to acc
inline __m256 group_fma(const uint8_t* q, const __m256 x[4], float scale, __m256 acc) {
  __m256 w[4];
  levels8x4(q, w);
  __m256 t = _mm256_mul_ps(w[0], x[0]);
  t = _mm256_fmadd_ps(w[1], x[1], t);
  t = _mm256_fmadd_ps(w[2], x[2], t);
  t = _mm256_fmadd_ps(w[3], x[3], t);
  return _mm256_fmadd_ps(_mm256_set1_ps(scale), t, acc);
}

template <int B, bool GIVEN>
inline float channels_q4(const Q4Args& a, const int64_t* j) {
  const int64_t d = a.d, groups = d / GROUP, half = d / 2;
  const uint8_t* q[B];
  const uint16_t* sm[B];
  for (int b = 0; b < B; ++b) {
    q[b] = a.q + j[b] * a.q_stride;
    sm[b] = a.sm + j[b] * a.sm_stride;
  }
  __m256 g[B], u[B];
  for (int b = 0; b < B; ++b) g[b] = u[b] = _mm256_setzero_ps();
  for (int64_t grp = 0; grp < groups; ++grp) {
    const float* xp = a.x + grp * GROUP;
    const __m256 x[4] = {_mm256_loadu_ps(xp), _mm256_loadu_ps(xp + 8), _mm256_loadu_ps(xp + 16),
                         _mm256_loadu_ps(xp + 24)};
    for (int b = 0; b < B; ++b) {
      u[b] = group_fma(q[b] + half + grp * HALF, x, bf16(sm[b][2 * groups + grp]), u[b]);
      if (!GIVEN) g[b] = group_fma(q[b] + grp * HALF, x, bf16(sm[b][grp]), g[b]);
    }
  }
  float h[B];
  float hsum = 0.f;
  for (int b = 0; b < B; ++b) {
    h[b] = channel_output<GIVEN>(a, sm[b], j[b], hsum8(u[b]), GIVEN ? 0.f : hsum8(g[b]));
    hsum += h[b];
  }
  __m256 hv[B];
  for (int b = 0; b < B; ++b) hv[b] = _mm256_set1_ps(h[b]);
  for (int64_t grp = 0; grp < groups; ++grp) {
    float* o = a.acc + grp * GROUP;
    __m256 acc[4] = {_mm256_loadu_ps(o), _mm256_loadu_ps(o + 8), _mm256_loadu_ps(o + 16), _mm256_loadu_ps(o + 24)};
    for (int b = 0; b < B; ++b) {
      __m256 w[4];
      levels8x4(q[b] + 2 * half + grp * HALF, w);
      for (int r = 0; r < 4; ++r) acc[r] = _mm256_fmadd_ps(hv[b], w[r], acc[r]);
    }
    for (int r = 0; r < 4; ++r) _mm256_storeu_ps(o + 8 * r, acc[r]);
  }
  return hsum;
}
#else
// B channels of one block of 32 in lockstep (as the float32 kernel): their gate and up dot products
// (each group's scale applied inside the loop, partial sums kept in HALF lanes, the offsets added once
// through xsum), then their down columns added to acc with one load and store of acc per B channels.
template <int B, bool GIVEN>
inline float channels_q4(const Q4Args& a, const int64_t* j) {
  const int64_t d = a.d, groups = d / GROUP, half = d / 2;
  const uint8_t* q[B];
  const uint16_t* sm[B];
  for (int b = 0; b < B; ++b) {
    q[b] = a.q + j[b] * a.q_stride;
    sm[b] = a.sm + j[b] * a.sm_stride;
  }
  float g[B][HALF] = {}, u[B][HALF] = {};
  for (int64_t grp = 0; grp < groups; ++grp) {
    const float* x = a.x + grp * GROUP;
    for (int b = 0; b < B; ++b) {
      const uint8_t* qu = q[b] + half + grp * HALF;
      const float su = bf16(sm[b][2 * groups + grp]);
      for (int v = 0; v < HALF; ++v)
        u[b][v] += su * (static_cast<float>(qu[v] & 15) * x[v] + static_cast<float>(qu[v] >> 4) * x[v + HALF]);
      if (!GIVEN) {
        const uint8_t* qg = q[b] + grp * HALF;
        const float sg = bf16(sm[b][grp]);
        for (int v = 0; v < HALF; ++v)
          g[b][v] += sg * (static_cast<float>(qg[v] & 15) * x[v] + static_cast<float>(qg[v] >> 4) * x[v + HALF]);
      }
    }
  }
  float h[B];
  float hsum = 0.f;
  for (int b = 0; b < B; ++b) {
    float us = 0.f, gs = 0.f;
    for (int v = 0; v < HALF; ++v) {
      us += u[b][v];
      gs += g[b][v];
    }
    h[b] = channel_output<GIVEN>(a, sm[b], j[b], us, gs);
    hsum += h[b];
  }
  const uint8_t* dq[B];
  for (int b = 0; b < B; ++b) dq[b] = q[b] + 2 * half;
  for (int64_t grp = 0; grp < groups; ++grp) {
    float* o = a.acc + grp * GROUP;
    for (int v = 0; v < HALF; ++v) {
      float lo = o[v], hi = o[v + HALF];
      for (int b = 0; b < B; ++b) {
        const uint8_t byte = dq[b][grp * HALF + v];
        lo += h[b] * static_cast<float>(byte & 15);
        hi += h[b] * static_cast<float>(byte >> 4);
      }
      o[v] = lo;
      o[v + HALF] = hi;
    }
  }
  return hsum;
}
#endif  // AVX2 and FMA

// A kept channel's run is under 1 KB (d = 576: 864 bytes of levels, 144 of scales), too short for the
// hardware prefetcher to lock on before it ends: the next LOCKSTEP channels' runs are asked for
// while the current ones are computed.
inline void prefetch_q4(const Q4Args& a, int64_t from, int64_t k) {
  const int64_t to = from + LOCKSTEP < k ? from + LOCKSTEP : k;
  const int64_t q_bytes = 3 * a.d / 2, sm_bytes = 4 * (a.d / GROUP) * 2;
  for (int64_t i = from; i < to; ++i) {
    const char* q = reinterpret_cast<const char*>(a.q + a.idx[i] * a.q_stride);
    for (int64_t o = 0; o < q_bytes; o += 64) __builtin_prefetch(q + o);
    const char* sm = reinterpret_cast<const char*>(a.sm + a.idx[i] * a.sm_stride);
    for (int64_t o = 0; o < sm_bytes; o += 64) __builtin_prefetch(sm + o);
  }
}

template <bool GIVEN>
void run_q4(const Q4Args& a, int64_t k) {
  const int64_t d = a.d;
  for (int64_t t = 0; t < d; ++t) a.out[t] = 0.f;
  int64_t i = 0;
  while (i < k) {
    const int64_t block = a.idx[i] / GROUP;
    int64_t end = i;
    while (end < k && a.idx[end] / GROUP == block) ++end;
    for (int64_t t = 0; t < d; ++t) a.acc[t] = 0.f;
    float hsum = 0.f;
    for (; i + LOCKSTEP <= end; i += LOCKSTEP) {
      prefetch_q4(a, i + LOCKSTEP, k);
      hsum += channels_q4<LOCKSTEP, GIVEN>(a, a.idx + i);
    }
    for (; i < end; ++i) {
      prefetch_q4(a, i + 1, k);
      hsum += channels_q4<1, GIVEN>(a, a.idx + i);
    }
    const uint16_t* scale = a.dsm + block * 2 * d;
    const uint16_t* offset = scale + d;
    for (int64_t t = 0; t < d; ++t) a.out[t] += bf16(scale[t]) * a.acc[t] + bf16(offset[t]) * hsum;
  }
}

void check_matrix(const at::Tensor& t, const char* name, at::ScalarType type, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.dim() == 2 && t.size(0) == rows &&
                  t.size(1) == cols && t.stride(1) == 1,
              name, " must be a ", type, " CPU matrix [", rows, ", ", cols, "] with contiguous rows, got ",
              t.sizes(), " ", t.scalar_type(), " on ", t.device());
}

void gathered_ffn_q4(const at::Tensor& q3, const at::Tensor& sm, const at::Tensor& dsm, const at::Tensor& x,
                     const at::Tensor& idx, at::Tensor& out, at::Tensor& scratch,
                     const std::optional<at::Tensor>& gate_act, const std::optional<at::Tensor>& gate_bias,
                     const std::optional<at::Tensor>& up_bias) {
  const int64_t d = x.numel();
  TORCH_CHECK(d % GROUP == 0, "the hidden size must be a multiple of ", GROUP, ", got ", d);
  check_vector(x, "x", d);
  check_vector(out, "out", d);
  TORCH_CHECK(scratch.device().is_cpu() && scratch.scalar_type() == at::kFloat && scratch.is_contiguous() &&
                  scratch.numel() >= d + d / GROUP,
              "scratch must be a contiguous float32 CPU buffer of at least ", d + d / GROUP, " entries");
  const int64_t n_channels = q3.size(0);
  TORCH_CHECK(n_channels % GROUP == 0, "the channel count must be a multiple of ", GROUP, ", got ", n_channels);
  check_matrix(q3, "q3", at::kByte, n_channels, 3 * d / 2);
  check_matrix(sm, "sm", at::kBFloat16, n_channels, 4 * d / GROUP);
  TORCH_CHECK(dsm.device().is_cpu() && dsm.scalar_type() == at::kBFloat16 && dsm.is_contiguous() &&
                  dsm.dim() == 3 && dsm.size(0) == n_channels / GROUP && dsm.size(1) == 2 && dsm.size(2) == d,
              "dsm must be a contiguous bf16 CPU tensor [", n_channels / GROUP, ", 2, ", d, "], got ", dsm.sizes());
  TORCH_CHECK(idx.device().is_cpu() && idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.is_contiguous(),
              "idx must be a contiguous int64 CPU vector, got ", idx.sizes(), " ", idx.scalar_type());
  const int64_t k = idx.size(0);
  const int64_t* I = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(I[i] >= 0 && I[i] < n_channels, "idx[", i, "] = ", I[i], " is outside [0, ", n_channels, ")");
    TORCH_CHECK(i == 0 || I[i] > I[i - 1], "idx must be strictly increasing (idx[", i, "] = ", I[i],
                " after ", I[i > 0 ? i - 1 : 0], ")");
  }
  float* xsum = scratch.data_ptr<float>() + d;
  const float* X = x.data_ptr<float>();
  for (int64_t g = 0; g < d / GROUP; ++g) {
    float s = 0.f;
    for (int v = 0; v < GROUP; ++v) s += X[g * GROUP + v];
    xsum[g] = s;
  }
  Q4Args a{q3.data_ptr<uint8_t>(),
           q3.stride(0),
           reinterpret_cast<const uint16_t*>(sm.data_ptr()),
           sm.stride(0),
           reinterpret_cast<const uint16_t*>(dsm.data_ptr()),
           d,
           X,
           xsum,
           I,
           optional_vector(gate_act, "gate_act", n_channels),
           optional_vector(gate_bias, "gate_bias", n_channels),
           optional_vector(up_bias, "up_bias", n_channels),
           scratch.data_ptr<float>(),
           out.data_ptr<float>()};
  pybind11::gil_scoped_release released;
  if (a.gate_act)
    run_q4<true>(a, k);
  else
    run_q4<false>(a, k);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Batch-1 decode FFN over kept channels of an interleaved channel-major layout, float32 or 4-bit (SiLU gate).";
  m.def("gathered_ffn", &gathered_ffn, "out[d] = sum over kept j of act_j * <up_j, x> * down_j",
        pybind11::arg("w3"), pybind11::arg("x"), pybind11::arg("idx"), pybind11::arg("out"),
        pybind11::arg("gate_act") = pybind11::none(), pybind11::arg("gate_bias") = pybind11::none(),
        pybind11::arg("up_bias") = pybind11::none());
  m.def("gathered_ffn_q4", &gathered_ffn_q4,
        "gathered_ffn over a channel-major 4-bit copy: q3 [F, 3d/2] levels, sm [F, 4d/32] and dsm [F/32, 2, d] "
        "bf16 scales and offsets; idx sorted; scratch >= d + d/32 floats",
        pybind11::arg("q3"), pybind11::arg("sm"), pybind11::arg("dsm"), pybind11::arg("x"), pybind11::arg("idx"),
        pybind11::arg("out"), pybind11::arg("scratch"), pybind11::arg("gate_act") = pybind11::none(),
        pybind11::arg("gate_bias") = pybind11::none(), pybind11::arg("up_bias") = pybind11::none());
}
