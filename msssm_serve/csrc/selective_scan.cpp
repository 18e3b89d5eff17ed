// Fused selective scan for CPU training: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,  y_t = C_t . h_t.
// One job per (batch, ssm) pair walks time with its whole [D, N] state in a small local buffer, so nothing of size
// [B, L, M, D, N] is ever written: that is what makes eager PyTorch slow here (each elementwise op is a pass over
// such a tensor). The inner loops run over the D*N state entries, contiguous in A and in the state, so they vectorise.
// Shapes: x, dt [B, L, M, D]; A [M, D, N]; Bm, Cm [B, L, M, N]; h0 [B, M, D, N].
#include <torch/extension.h>
#include <cmath>
#include <vector>

namespace {

template <typename T>
struct Dims {
  int64_t B, L, M, D, N;
  int64_t xi(int64_t b, int64_t t, int64_t m) const { return ((b * L + t) * M + m) * D; }  // start of x[b,t,m,:]
  int64_t bi(int64_t b, int64_t t, int64_t m) const { return ((b * L + t) * M + m) * N; }  // start of B[b,t,m,:]
  int64_t hi(int64_t b, int64_t m) const { return (b * M + m) * D * N; }                    // start of h[b,m,:,:]
};

// One time step of one (b, m) job: decay and new state for all D*N entries, and y over d.
template <typename T>
inline void step(const Dims<T>& s, const T* a, const T* dt, const T* x, const T* Bt, const T* Ct, T* h, T* decay,
                 T* y) {
  const int64_t D = s.D, N = s.N;
  for (int64_t d = 0; d < D; ++d) {
    const T dtv = dt[d], dx = dtv * x[d];
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; ++n) {
      const T e = std::exp(dtv * a[d * N + n]);
      decay[d * N + n] = e;
      const T hv = e * h[d * N + n] + dx * Bt[n];
      h[d * N + n] = hv;
      acc += Ct[n] * hv;
    }
    y[d] = acc;
  }
}

template <typename T>
void forward_kernel(const Dims<T> s, const T* x, const T* dt, const T* A, const T* Bm, const T* Cm, const T* h0, T* y,
                    T* hlast) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t m = 0; m < s.M; ++m) {
      const int64_t DN = s.D * s.N;
      std::vector<T> h(h0 + s.hi(b, m), h0 + s.hi(b, m) + DN), decay(DN);
      for (int64_t t = 0; t < s.L; ++t) {
        const int64_t i = s.xi(b, t, m), j = s.bi(b, t, m);
        step(s, A + m * DN, dt + i, x + i, Bm + j, Cm + j, h.data(), decay.data(), y + i);
      }
      std::copy(h.begin(), h.end(), hlast + s.hi(b, m));
    }
  }
}

template <typename T>
void backward_kernel(const Dims<T> s, const T* x, const T* dt, const T* A, const T* Bm, const T* Cm, const T* h0,
                     const T* gy, const T* ghlast, T* gx, T* gdt, T* gA_part, T* gB, T* gC, T* gh0) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t m = 0; m < s.M; ++m) {
      const int64_t D = s.D, N = s.N, DN = D * N, L = s.L;
      const T* a = A + m * DN;
      // Recompute the job's states and decays over time (L*D*N each: a few MB at most, per thread).
      std::vector<T> hs((L + 1) * DN), decays(L * DN), scratch_y(D), g(ghlast + s.hi(b, m), ghlast + s.hi(b, m) + DN);
      std::copy(h0 + s.hi(b, m), h0 + s.hi(b, m) + DN, hs.begin());
      for (int64_t t = 0; t < L; ++t) {
        const int64_t i = s.xi(b, t, m), j = s.bi(b, t, m);
        std::copy(hs.begin() + t * DN, hs.begin() + (t + 1) * DN, hs.begin() + (t + 1) * DN);
        step(s, a, dt + i, x + i, Bm + j, Cm + j, hs.data() + (t + 1) * DN, decays.data() + t * DN, scratch_y.data());
      }
      T* gA = gA_part + s.hi(b, m);  // this job's own slice: summed over the batch afterwards
      for (int64_t t = L - 1; t >= 0; --t) {
        const int64_t i = s.xi(b, t, m), j = s.bi(b, t, m);
        const T *h = hs.data() + (t + 1) * DN, *hprev = hs.data() + t * DN, *decay = decays.data() + t * DN;
        const T *Bt = Bm + j, *Ct = Cm + j;
        for (int64_t d = 0; d < D; ++d) {
          const T dtv = dt[i + d], xv = x[i + d], gyv = gy[i + d];
          T gdt_acc = 0, gx_acc = 0;
          for (int64_t n = 0; n < N; ++n) {
            const int64_t k = d * N + n;
            T gk = g[k] + gyv * Ct[n];  // all gradient reaching h_t
            gC[j + n] += gyv * h[k];
            const T gdecay = gk * hprev[k] * decay[k];
            gdt_acc += gdecay * a[k] + gk * Bt[n] * xv;
            gA[k] += gdecay * dtv;
            gB[j + n] += gk * dtv * xv;
            gx_acc += gk * dtv * Bt[n];
            g[k] = gk * decay[k];  // on to h_{t-1}
          }
          gdt[i + d] = gdt_acc;
          gx[i + d] = gx_acc;
        }
      }
      std::copy(g.begin(), g.end(), gh0 + s.hi(b, m));
    }
  }
}

template <typename T>
Dims<T> dims_of(const torch::Tensor& x, const torch::Tensor& A) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), A.size(2)};
}

}  // namespace

std::vector<torch::Tensor> scan_forward(torch::Tensor x, torch::Tensor dt, torch::Tensor A, torch::Tensor Bm,
                                        torch::Tensor Cm, torch::Tensor h0) {
  auto y = torch::empty_like(x);
  auto hlast = torch::empty_like(h0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scan_forward", [&] {
    forward_kernel<scalar_t>(dims_of<scalar_t>(x, A), x.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(),
                             A.data_ptr<scalar_t>(), Bm.data_ptr<scalar_t>(), Cm.data_ptr<scalar_t>(),
                             h0.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), hlast.data_ptr<scalar_t>());
  });
  return {y, hlast};
}

std::vector<torch::Tensor> scan_backward(torch::Tensor x, torch::Tensor dt, torch::Tensor A, torch::Tensor Bm,
                                         torch::Tensor Cm, torch::Tensor h0, torch::Tensor gy, torch::Tensor ghlast) {
  auto gx = torch::empty_like(x), gdt = torch::empty_like(dt);
  auto gA_part = torch::zeros({x.size(0), A.size(0), A.size(1), A.size(2)}, x.options());
  auto gB = torch::zeros_like(Bm), gC = torch::zeros_like(Cm), gh0 = torch::empty_like(h0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scan_backward", [&] {
    backward_kernel<scalar_t>(dims_of<scalar_t>(x, A), x.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(),
                              A.data_ptr<scalar_t>(), Bm.data_ptr<scalar_t>(), Cm.data_ptr<scalar_t>(),
                              h0.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(), ghlast.data_ptr<scalar_t>(),
                              gx.data_ptr<scalar_t>(), gdt.data_ptr<scalar_t>(), gA_part.data_ptr<scalar_t>(),
                              gB.data_ptr<scalar_t>(), gC.data_ptr<scalar_t>(), gh0.data_ptr<scalar_t>());
  });
  return {gx, gdt, gA_part.sum(0), gB, gC, gh0};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &scan_forward, "fused selective scan (CPU)");
  m.def("backward", &scan_backward, "fused selective scan backward (CPU)");
}
