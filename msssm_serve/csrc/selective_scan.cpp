// Fused selective scan for the CPU (training, eager inference, the roofline benchmark):
//   h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,  y_t = C_t . h_t
// One job per (batch, ssm) pair walks time with its whole state in a small local buffer, so nothing of size
// [B, L, M, D, N] is ever written: that is what makes eager PyTorch slow here (each elementwise op is a pass over
// such a tensor). Inside a job the state is kept as [N, D], channels innermost, so that every inner loop runs over
// D contiguous channels and vectorises, the exponential included ([D, N] order would leave loops over N = 4).
// Shapes: x, dt [B, L, M, D]; A [M, D, N]; Bm, Cm [B, L, M, N]; h0 [B, M, D, N].
#include <torch/extension.h>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// exp(x) for the decays, x = dt * A <= 0, written so that the compiler vectorises it (std::exp is a scalar call):
// Cephes' range reduction x = k ln2 + r and its degree-6 polynomial for e^r, then 2^k put in the exponent bits.
// Rounding and the integer k come from adding 1.5 * 2^23 (no float-to-int conversion, which GCC will not vectorise
// without -fno-trapping-math). Within 1.2e-7 relative of std::exp over [-87, 0]; below, the decay is 0 in float.
inline float decay_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float shifter = 12582912.0f;
  const float shifted = x * 1.44269504088896341f + shifter;
  const float k = shifted - shifter;  // x / ln2 rounded to the nearest integer
  const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (__builtin_bit_cast(int32_t, shifted) - 0x4B400000 + 127) << 23;  // 2^k
  return e * __builtin_bit_cast(float, bits);
}

inline double decay_exp(double x) { return std::exp(x); }  // float64: the gradient checks, not speed

struct Dims {
  int64_t B, L, M, D, N;
  int64_t xi(int64_t b, int64_t t, int64_t m) const { return ((b * L + t) * M + m) * D; }  // start of x[b,t,m,:]
  int64_t bi(int64_t b, int64_t t, int64_t m) const { return ((b * L + t) * M + m) * N; }  // start of B[b,t,m,:]
  int64_t hi(int64_t b, int64_t m) const { return (b * M + m) * D * N; }                    // start of h[b,m,:,:]
};

// [D, N] (the tensors' order) <-> [N, D] (a job's local order)
template <typename T>
void to_nd(const Dims& s, const T* dn, T* nd) {
  for (int64_t d = 0; d < s.D; ++d)
    for (int64_t n = 0; n < s.N; ++n) nd[n * s.D + d] = dn[d * s.N + n];
}

template <typename T>
void to_dn(const Dims& s, const T* nd, T* dn) {
  for (int64_t d = 0; d < s.D; ++d)
    for (int64_t n = 0; n < s.N; ++n) dn[d * s.N + n] = nd[n * s.D + d];
}

// One step of one state row n over the D channels: h = exp(dt a) h + dx b; acc += c h. Restrict-qualified, so
// that the loop vectorises.
template <typename T>
inline void step_row(int64_t D, const T* __restrict dt, const T* __restrict a, const T* __restrict dx, T b, T c,
                     T* __restrict h, T* __restrict acc) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    const T hv = decay_exp(dt[d] * a[d]) * h[d] + dx[d] * b;
    h[d] = hv;
    acc[d] += c * hv;
  }
}

// One time step of one job, all N rows: the new state in h (in place), y_t in y.
template <typename T>
inline void step(const Dims& s, const T* a, const T* dt, const T* x, const T* Bt, const T* Ct, T* h, T* dx, T* y) {
  const int64_t D = s.D;
  for (int64_t d = 0; d < D; ++d) {
    dx[d] = dt[d] * x[d];
    y[d] = 0;
  }
  for (int64_t n = 0; n < s.N; ++n) step_row(D, dt, a + n * D, dx, Bt[n], Ct[n], h + n * D, y);
}

template <typename T>
void forward_kernel(const Dims s, const T* x, const T* dt, const T* A, const T* Bm, const T* Cm, const T* h0, T* y,
                    T* hlast) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t m = 0; m < s.M; ++m) {
      const int64_t DN = s.D * s.N;
      std::vector<T> h(DN), a(DN), dx(s.D);
      to_nd(s, h0 + s.hi(b, m), h.data());
      to_nd(s, A + m * DN, a.data());
      for (int64_t t = 0; t < s.L; ++t) {
        const int64_t i = s.xi(b, t, m), j = s.bi(b, t, m);
        step(s, a.data(), dt + i, x + i, Bm + j, Cm + j, h.data(), dx.data(), y + i);
      }
      to_dn(s, h.data(), hlast + s.hi(b, m));
    }
  }
}

// Gradients of one step of one state row n over the D channels (see backward_kernel for the algebra).
template <typename T>
inline void backward_row(int64_t D, const T* __restrict dt, const T* __restrict x, const T* __restrict a,
                         const T* __restrict gy, const T* __restrict h, const T* __restrict hprev, T b, T c,
                         T* __restrict g, T* __restrict gA, T* __restrict gdt, T* __restrict gx, T* gb, T* gc) {
  T gb_acc = 0, gc_acc = 0;
#pragma omp simd reduction(+ : gb_acc, gc_acc)
  for (int64_t d = 0; d < D; ++d) {
    const T decay = decay_exp(dt[d] * a[d]);
    const T gk = g[d] + gy[d] * c;  // all gradient reaching h_t
    gc_acc += gy[d] * h[d];
    const T gdecay = gk * hprev[d] * decay;
    gdt[d] += gdecay * a[d] + gk * b * x[d];
    gA[d] += gdecay * dt[d];
    gb_acc += gk * dt[d] * x[d];
    gx[d] += gk * dt[d] * b;
    g[d] = gk * decay;  // on to h_{t-1}
  }
  *gb += gb_acc;
  *gc += gc_acc;
}

template <typename T>
void backward_kernel(const Dims s, const T* x, const T* dt, const T* A, const T* Bm, const T* Cm, const T* h0,
                     const T* gy, const T* ghlast, T* gx, T* gdt, T* gA_part, T* gB, T* gC, T* gh0) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t m = 0; m < s.M; ++m) {
      const int64_t D = s.D, N = s.N, DN = D * N, L = s.L;
      // Recompute the job's states over time (L*D*N: a few MB at most, per thread); decays are recomputed where
      // they are needed, which costs less than storing them.
      std::vector<T> hs((L + 1) * DN), a(DN), dx(D), scratch_y(D), g(DN), gA(DN, T(0));
      to_nd(s, h0 + s.hi(b, m), hs.data());
      to_nd(s, A + m * DN, a.data());
      to_nd(s, ghlast + s.hi(b, m), g.data());
      for (int64_t t = 0; t < L; ++t) {
        const int64_t i = s.xi(b, t, m), j = s.bi(b, t, m);
        std::copy(hs.begin() + t * DN, hs.begin() + (t + 1) * DN, hs.begin() + (t + 1) * DN);
        step(s, a.data(), dt + i, x + i, Bm + j, Cm + j, hs.data() + (t + 1) * DN, dx.data(), scratch_y.data());
      }
      for (int64_t t = L - 1; t >= 0; --t) {
        const int64_t i = s.xi(b, t, m), j = s.bi(b, t, m);
        std::fill(gdt + i, gdt + i + D, T(0));
        std::fill(gx + i, gx + i + D, T(0));
        for (int64_t n = 0; n < N; ++n) {
          const int64_t k = n * D;
          backward_row(D, dt + i, x + i, a.data() + k, gy + i, hs.data() + (t + 1) * DN + k, hs.data() + t * DN + k,
                       Bm[j + n], Cm[j + n], g.data() + k, gA.data() + k, gdt + i, gx + i, gB + j + n, gC + j + n);
        }
      }
      to_dn(s, gA.data(), gA_part + s.hi(b, m));  // this job's own slice: summed over the batch afterwards
      to_dn(s, g.data(), gh0 + s.hi(b, m));
    }
  }
}

Dims dims_of(const torch::Tensor& x, const torch::Tensor& A) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), A.size(2)};
}

}  // namespace

std::vector<torch::Tensor> scan_forward(torch::Tensor x, torch::Tensor dt, torch::Tensor A, torch::Tensor Bm,
                                        torch::Tensor Cm, torch::Tensor h0) {
  auto y = torch::empty_like(x);
  auto hlast = torch::empty_like(h0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scan_forward", [&] {
    forward_kernel<scalar_t>(dims_of(x, A), x.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                             Bm.data_ptr<scalar_t>(), Cm.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(),
                             y.data_ptr<scalar_t>(), hlast.data_ptr<scalar_t>());
  });
  return {y, hlast};
}

std::vector<torch::Tensor> scan_backward(torch::Tensor x, torch::Tensor dt, torch::Tensor A, torch::Tensor Bm,
                                         torch::Tensor Cm, torch::Tensor h0, torch::Tensor gy, torch::Tensor ghlast) {
  auto gx = torch::empty_like(x), gdt = torch::empty_like(dt);
  auto gA_part = torch::zeros({x.size(0), A.size(0), A.size(1), A.size(2)}, x.options());
  auto gB = torch::zeros_like(Bm), gC = torch::zeros_like(Cm), gh0 = torch::empty_like(h0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scan_backward", [&] {
    backward_kernel<scalar_t>(dims_of(x, A), x.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                              Bm.data_ptr<scalar_t>(), Cm.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(),
                              gy.data_ptr<scalar_t>(), ghlast.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
                              gdt.data_ptr<scalar_t>(), gA_part.data_ptr<scalar_t>(), gB.data_ptr<scalar_t>(),
                              gC.data_ptr<scalar_t>(), gh0.data_ptr<scalar_t>());
  });
  return {gx, gdt, gA_part.sum(0), gB, gC, gh0};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &scan_forward, "fused selective scan (CPU)");
  m.def("backward", &scan_backward, "fused selective scan backward (CPU)");
}
