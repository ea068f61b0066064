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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Batch-1 decode FFN over kept channels of an interleaved [F, 3d] layout (SiLU gate).";
  m.def("gathered_ffn", &gathered_ffn, "out[d] = sum over kept j of act_j * <up_j, x> * down_j",
        pybind11::arg("w3"), pybind11::arg("x"), pybind11::arg("idx"), pybind11::arg("out"),
        pybind11::arg("gate_act") = pybind11::none(), pybind11::arg("gate_bias") = pybind11::none(),
        pybind11::arg("up_bias") = pybind11::none());
}
