// Fused selective scan for CPU training: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,  y_t = C_t . h_t.
// One job per (batch, ssm) pair holds its N-vector state in registers; nothing of size [B, L, M, D, N] is ever
// written, which is what makes eager PyTorch slow here (every elementwise op is a pass over that tensor).
// Shapes: x, dt [B, L, M, D]; A [M, D, N]; Bm, Cm [B, L, M, N]; h0 [B, M, D, N].
#include <torch/extension.h>
#include <cmath>
#include <vector>

template <typename T>
static void forward_kernel(const T* x, const T* dt, const T* A, const T* Bm, const T* Cm, const T* h0, T* y,
                           T* hlast, int64_t B, int64_t L, int64_t M, int64_t D, int64_t N) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t m = 0; m < M; ++m) {
      std::vector<T> h(N);
      for (int64_t d = 0; d < D; ++d) {
        const T* a = A + (m * D + d) * N;
        for (int64_t n = 0; n < N; ++n) h[n] = h0[((b * M + m) * D + d) * N + n];
        for (int64_t t = 0; t < L; ++t) {
          const int64_t i = ((b * L + t) * M + m) * D + d;
          const int64_t j = ((b * L + t) * M + m) * N;
          const T dtv = dt[i], dx = dtv * x[i];
          T acc = 0;
          for (int64_t n = 0; n < N; ++n) {
            h[n] = std::exp(dtv * a[n]) * h[n] + dx * Bm[j + n];
            acc += Cm[j + n] * h[n];
          }
          y[i] = acc;
        }
        for (int64_t n = 0; n < N; ++n) hlast[((b * M + m) * D + d) * N + n] = h[n];
      }
    }
  }
}

template <typename T>
static void backward_kernel(const T* x, const T* dt, const T* A, const T* Bm, const T* Cm, const T* h0,
                            const T* gy, const T* ghlast, T* gx, T* gdt, T* gA_part, T* gB, T* gC, T* gh0,
                            int64_t B, int64_t L, int64_t M, int64_t D, int64_t N) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t m = 0; m < M; ++m) {
      // States of one channel over time, recomputed: L*N values, small enough to stay in cache.
      std::vector<T> hs((L + 1) * N), g(N);
      for (int64_t d = 0; d < D; ++d) {
        const T* a = A + (m * D + d) * N;
        const int64_t s = ((b * M + m) * D + d) * N;
        for (int64_t n = 0; n < N; ++n) hs[n] = h0[s + n];
        for (int64_t t = 0; t < L; ++t) {
          const int64_t i = ((b * L + t) * M + m) * D + d;
          const int64_t j = ((b * L + t) * M + m) * N;
          const T dtv = dt[i], dx = dtv * x[i];
          for (int64_t n = 0; n < N; ++n)
            hs[(t + 1) * N + n] = std::exp(dtv * a[n]) * hs[t * N + n] + dx * Bm[j + n];
        }
        T* gA = gA_part + s;  // this job's own slice: summed over the batch afterwards
        for (int64_t n = 0; n < N; ++n) g[n] = ghlast[s + n];
        for (int64_t t = L - 1; t >= 0; --t) {
          const int64_t i = ((b * L + t) * M + m) * D + d;
          const int64_t j = ((b * L + t) * M + m) * N;
          const T dtv = dt[i], xv = x[i], gyv = gy[i];
          T gdt_acc = 0, gx_acc = 0;
          for (int64_t n = 0; n < N; ++n) {
            const T h = hs[(t + 1) * N + n], hprev = hs[t * N + n];
            const T decay = std::exp(dtv * a[n]);
            g[n] += gyv * Cm[j + n];
            gC[j + n] += gyv * h;
            const T gdecay = g[n] * hprev * decay;
            gdt_acc += gdecay * a[n] + g[n] * Bm[j + n] * xv;
            gA[n] += gdecay * dtv;
            gB[j + n] += g[n] * dtv * xv;
            gx_acc += g[n] * dtv * Bm[j + n];
            g[n] *= decay;
          }
          gdt[i] = gdt_acc;
          gx[i] = gx_acc;
        }
        for (int64_t n = 0; n < N; ++n) gh0[s + n] = g[n];
      }
    }
  }
}

std::vector<torch::Tensor> scan_forward(torch::Tensor x, torch::Tensor dt, torch::Tensor A, torch::Tensor Bm,
                                        torch::Tensor Cm, torch::Tensor h0) {
  const int64_t B = x.size(0), L = x.size(1), M = x.size(2), D = x.size(3), N = A.size(2);
  auto y = torch::empty_like(x);
  auto hlast = torch::empty({B, M, D, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scan_forward", [&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                             Bm.data_ptr<scalar_t>(), Cm.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(),
                             y.data_ptr<scalar_t>(), hlast.data_ptr<scalar_t>(), B, L, M, D, N);
  });
  return {y, hlast};
}

std::vector<torch::Tensor> scan_backward(torch::Tensor x, torch::Tensor dt, torch::Tensor A, torch::Tensor Bm,
                                         torch::Tensor Cm, torch::Tensor h0, torch::Tensor gy, torch::Tensor ghlast) {
  const int64_t B = x.size(0), L = x.size(1), M = x.size(2), D = x.size(3), N = A.size(2);
  auto gx = torch::empty_like(x), gdt = torch::empty_like(dt);
  auto gA_part = torch::zeros({B, M, D, N}, x.options());
  auto gB = torch::zeros_like(Bm), gC = torch::zeros_like(Cm), gh0 = torch::empty_like(h0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scan_backward", [&] {
    backward_kernel<scalar_t>(x.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                              Bm.data_ptr<scalar_t>(), Cm.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(),
                              gy.data_ptr<scalar_t>(), ghlast.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
                              gdt.data_ptr<scalar_t>(), gA_part.data_ptr<scalar_t>(), gB.data_ptr<scalar_t>(),
                              gC.data_ptr<scalar_t>(), gh0.data_ptr<scalar_t>(), B, L, M, D, N);
  });
  return {gx, gdt, gA_part.sum(0), gB, gC, gh0};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &scan_forward, "fused selective scan (CPU)");
  m.def("backward", &scan_backward, "fused selective scan backward (CPU)");
}
