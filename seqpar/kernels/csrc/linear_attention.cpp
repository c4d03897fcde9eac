// Chunked causal linear attention with per-head decay on CPU, one fused loop per (batch, head)
// (Lightning Attention-2, Qin et al. 2024; the algorithm and its notation: seqpar/kernels/linear.py).
//
// Why compiled: the PyTorch kernel spends about half its time outside matmuls (copying blocks between the
// [B, L, H, D] layout and batched-matmul buffers, scaling passes, scans, op dispatch). Here every product is
// one BLAS call on the token-major layout itself (a head's rows are a matrix with leading dimension H*D), so
// nothing is copied, the decay scalings are fused into small cache-resident loops, and the state scan is the
// GEMM's own beta (λ^c is one scalar per head). BLAS is the sgemm_/dgemm_ that libtorch_cpu exports (MKL on
// x86 wheels); (batch, head) pairs run in parallel with at::parallel_for, each in its own scratch.
//
// Tensors: q, k [B, H, L, Dk], v, dout [B, H, L, Dv] (any strides with a unit last stride; heads-first views
// of [B, L, H, D] storage are what callers pass), log_decay [H], states [B, H, Dk, Dv] contiguous; float32 or
// float64. Decay factors below the dtype's smallest normal number are flushed to 0 as in linear.py.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*);
}

namespace {

inline void blas(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                 float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

inline void blas(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                 int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// Row-major C[m x n] = op(A) op(B) + beta C; op(A) is m x k (ta: A is stored k x m), op(B) is k x n (tb: B is
// stored n x k). BLAS is column-major, where row-major C is C^T = op(B)^T op(A)^T.
template <typename T>
inline void mm(bool ta, bool tb, int m, int n, int k, const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
               int64_t ldc) {
  blas(tb ? 'T' : 'N', ta ? 'T' : 'N', n, m, k, T(1), B, (int)ldb, A, (int)lda, beta, C, (int)ldc);
}

template <typename T>
inline T decay_pow(T log_decay, double e) {  // λ^e, flushed to 0 below the smallest normal number
  T y = std::exp(log_decay * T(e));
  return y < std::numeric_limits<T>::min() ? T(0) : y;
}

// Decay tables of one head for blocks of c tokens: D_ts = λ^(t-s) (s <= t, else 0), λ^(t+1), λ^(c-1-t), λ^c.
template <typename T>
struct Tables {
  int c = 0;
  std::vector<T> D, qp, kp;
  T lam_c = 1;
  void build(T ld, int c_) {
    c = c_;
    D.assign((size_t)c * c, T(0));
    qp.resize(c);
    kp.resize(c);
    for (int t = 0; t < c; ++t) {
      for (int s = 0; s <= t; ++s) D[(size_t)t * c + s] = decay_pow(ld, t - s);
      qp[t] = decay_pow(ld, t + 1);
      kp[t] = decay_pow(ld, c - 1 - t);
    }
    lam_c = decay_pow(ld, c);
  }
};

// out[t, :] = x[t, :] * w[t] for c rows (x with row stride ldx, out packed with row stride d).
template <typename T>
inline void scale_rows(const T* x, int64_t ldx, const T* w, int c, int d, T* out) {
  for (int t = 0; t < c; ++t) {
    const T* xr = x + t * ldx;
    T* o = out + (int64_t)t * d;
    const T s = w[t];
    for (int i = 0; i < d; ++i) o[i] = xr[i] * s;
  }
}

template <typename T>
inline void mask_scores(T* A, const T* D, int c) {  // A ⊙= D (zero above the diagonal)
  for (int64_t i = 0; i < (int64_t)c * c; ++i) A[i] *= D[i];
}

struct View {  // one (batch, head) slice of a [B, H, L, D] tensor: rows at stride ld
  int64_t sb, sh, ld;
};

View view_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "linear attention kernel: expects [B, H, L, D] with unit last stride");
  return {x.stride(0), x.stride(1), x.stride(2)};
}


// Runs of RUN tokens of every head are computed together (heads inner): a run of a [B, L, H, D] tensor is one
// contiguous stretch of memory that stays in cache while every head's blocks use it (walking one head down
// the whole sequence first was 1.2x slower).
constexpr int RUN = 256;

struct Plan {  // blocks of C tokens grouped into runs; the partial last block is its own size
  int64_t L;
  int C;
  int run_blocks() const { return std::max(1, RUN / C); }
  int blocks() const { return (int)((L + C - 1) / C); }
  int runs() const { return (blocks() + run_blocks() - 1) / run_blocks(); }
  int first(int r) const { return r * run_blocks(); }
  int last(int r) const { return std::min(blocks(), (r + 1) * run_blocks()); }  // one past
  int64_t start(int j) const { return (int64_t)j * C; }
  int size(int j) const { return (int)std::min<int64_t>(C, L - start(j)); }
  int64_t run_end(int r) const { return std::min<int64_t>(L, start(last(r))); }
};


template <typename P>  // P: T or const T
P* at_row(P* base, const View& w, int64_t b, int64_t h, int64_t t) {  // row t of (batch b, head h)
  return base + b * w.sb + h * w.sh + t * w.ld;
}

template <typename T>
std::vector<Tables<T>> head_tables(const T* ld, int64_t H, int C, int tail) {  // [full C, tail] per head
  std::vector<Tables<T>> tabs(2 * H);
  for (int64_t h = 0; h < H; ++h) {
    tabs[2 * h].build(ld[h], C);
    if (tail) tabs[2 * h + 1].build(ld[h], tail);
  }
  return tabs;
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
                  int64_t block, const c10::optional<at::Tensor>& prefix, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), Dk = q.size(3), Dv = v.size(3), SS = Dk * Dv;
  const View vq = view_of(q), vk = view_of(k), vv = view_of(v), vo = view_of(out);
  const Plan plan{L, (int)std::min<int64_t>(block, L)};
  const int C = plan.C;
  const auto tabs = head_tables(log_decay.data_ptr<T>(), H, C, (int)(L % C));
  const T* P = prefix ? prefix->data_ptr<T>() : nullptr;
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> A((size_t)C * C), Xs((size_t)C * std::max(Dk, Dv)), S((size_t)(hi - lo) * SS, T(0));
    if (P) std::copy(P + lo * SS, P + hi * SS, S.begin());
    for (int r = 0; r < plan.runs(); ++r) {
      for (int64_t bh = lo; bh < hi; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        T* Sb = S.data() + (bh - lo) * SS;
        for (int j = plan.first(r); j < plan.last(r); ++j) {
          const int c = plan.size(j);
          const Tables<T>& tb = tabs[2 * h + (c == C ? 0 : 1)];
          const int64_t t0 = plan.start(j);
          const T *Q = at_row(qp, vq, b, h, t0), *K = at_row(kp, vk, b, h, t0), *V = at_row(vp, vv, b, h, t0);
          T* O = at_row(op, vo, b, h, t0);
          mm<T>(false, true, c, c, Dk, Q, vq.ld, K, vk.ld, 0, A.data(), c);  // Q K^T
          mask_scores(A.data(), tb.D.data(), c);
          mm<T>(false, false, c, Dv, c, A.data(), c, V, vv.ld, 0, O, vo.ld);  // intra: ((Q K^T) ⊙ D) V
          scale_rows(Q, vq.ld, tb.qp.data(), c, Dk, Xs.data());
          mm<T>(false, false, c, Dv, Dk, Xs.data(), Dk, Sb, Dv, 1, O, vo.ld);  // inter: (Q ⊙ λ^(t+1)) S
          scale_rows(K, vk.ld, tb.kp.data(), c, Dk, Xs.data());
          mm<T>(true, false, Dk, Dv, c, Xs.data(), Dk, V, vv.ld, tb.lam_c, Sb, Dv);  // S = λ^c S + K~^T V
        }
      }
    }
  });
}

// Decayed state sums over runs of R tokens by Horner, M <- λ^R M + (X_r ⊙ w)^T Y_r.
// forward (``reverse`` false): the chunk state Σ_s λ^(n-1-s) x_s^T y_s (w_t = λ^(R-1-t)) -> M [B, H, Dk, Dv];
// reverse: runs from the end with w_t = λ^(t+1), giving dP = Σ_t λ^(t+1) q_t^T do_t, and, when ``ends`` is
// given ([runs, B, H, Dk, Dv] for runs of ``R``), the sum over every later run stored at each run's end.
// Factors relative to a run keep products clear of subnormals.
template <typename T>
void state_impl(const at::Tensor& x, const at::Tensor& y, const at::Tensor& log_decay, bool reverse, int64_t R_,
                at::Tensor& M, T* ends) {
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), Dk = x.size(3), Dv = y.size(3), SS = Dk * Dv;
  const View vx = view_of(x), vy = view_of(y);
  const T* ld = log_decay.data_ptr<T>();
  const int R = (int)std::min<int64_t>(R_, std::max<int64_t>(L, 1));
  const int runs = (int)((L + R - 1) / R);
  const T *xp = x.data_ptr<T>(), *yp = y.data_ptr<T>();
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> Xs((size_t)R * Dk), w(R);
    T* Mp = M.data_ptr<T>();
    std::fill(Mp + lo * SS, Mp + hi * SS, T(0));
    for (int i = 0; i < runs; ++i) {
      const int r = reverse ? runs - 1 - i : i;
      const int64_t s0 = (int64_t)r * R;
      const int n = (int)std::min<int64_t>(R, L - s0);
      for (int64_t bh = lo; bh < hi; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        T* Mb = Mp + bh * SS;
        if (ends) std::copy(Mb, Mb + SS, ends + ((int64_t)r * B * H + bh) * SS);
        for (int t = 0; t < n; ++t) w[t] = decay_pow(ld[h], reverse ? t + 1 : n - 1 - t);
        scale_rows(at_row(xp, vx, b, h, s0), vx.ld, w.data(), n, Dk, Xs.data());
        mm<T>(true, false, Dk, Dv, n, Xs.data(), Dk, at_row(yp, vy, b, h, s0), vy.ld, decay_pow(ld[h], n), Mb, Dv);
      }
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& log_decay, int64_t block, const c10::optional<at::Tensor>& prefix,
                   const c10::optional<at::Tensor>& final_grad, const at::Tensor& run_grads, at::Tensor& dq,
                   at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), Dk = q.size(3), Dv = v.size(3), SS = Dk * Dv;
  const View vq = view_of(q), vk = view_of(k), vv = view_of(v), vdo = view_of(dout);
  const View vdq = view_of(dq), vdk = view_of(dk), vdv = view_of(dv);
  const Plan plan{L, (int)std::min<int64_t>(block, L)};
  const int C = plan.C, g = plan.run_blocks();
  const auto tabs = head_tables(log_decay.data_ptr<T>(), H, C, (int)(L % C));
  const T* P = prefix ? prefix->data_ptr<T>() : nullptr;
  const T* Gr = run_grads.data_ptr<T>();  // [runs, B, H, Dk, Dv]: dLoss/d(state at each run's end) from later runs
  const T* dM = final_grad ? final_grad->data_ptr<T>() : nullptr;  // dLoss/d(state after the last token)
  const T* ld = log_decay.data_ptr<T>();
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *dop = dout.data_ptr<T>();
  T *dqp = dq.data_ptr<T>(), *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> A((size_t)C * C), dA((size_t)C * C), Ks((size_t)C * Dk), Vs((size_t)C * Dv), DOs((size_t)C * Dv),
        G((size_t)g * SS), S((size_t)(hi - lo) * SS, T(0));
    if (P) std::copy(P + lo * SS, P + hi * SS, S.begin());
    for (int r = 0; r < plan.runs(); ++r) {
      for (int64_t bh = lo; bh < hi; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        T* Sb = S.data() + (bh - lo) * SS;
        const int j0 = plan.first(r), j1 = plan.last(r);
        // G_j = dLoss/d(state after block j) for the run's blocks, from the run's end backwards:
        // G_end = (later runs' share) + λ^(L - end) dM, then G_(j-1) = λ^c G_j + (Q_j ⊙ λ^(t+1))^T dO_j
        const T* g_end = Gr + ((int64_t)r * B * H + bh) * SS;
        T* G_last = G.data() + (j1 - 1 - j0) * SS;
        const T w = dM ? decay_pow(ld[h], (double)(L - plan.run_end(r))) : T(0);
        for (int64_t i = 0; i < SS; ++i) G_last[i] = g_end[i] + (dM ? w * dM[bh * SS + i] : T(0));
        for (int j = j1 - 1; j > j0; --j) {
          const int c = plan.size(j);
          const Tables<T>& tb = tabs[2 * h + (c == C ? 0 : 1)];
          const int64_t t0 = plan.start(j);
          T* Gj = G.data() + (j - j0) * SS;
          std::copy(Gj, Gj + SS, Gj - SS);
          scale_rows(at_row(dop, vdo, b, h, t0), vdo.ld, tb.qp.data(), c, Dv, DOs.data());
          mm<T>(true, false, Dk, Dv, c, at_row(qp, vq, b, h, t0), vq.ld, DOs.data(), Dv, tb.lam_c, Gj - SS, Dv);
        }
        for (int j = j0; j < j1; ++j) {
          const int c = plan.size(j);
          const Tables<T>& tb = tabs[2 * h + (c == C ? 0 : 1)];
          const int64_t t0 = plan.start(j);
          const T *Q = at_row(qp, vq, b, h, t0), *K = at_row(kp, vk, b, h, t0), *V = at_row(vp, vv, b, h, t0),
                  *dO = at_row(dop, vdo, b, h, t0);
          T *dQ = at_row(dqp, vdq, b, h, t0), *dK = at_row(dkp, vdk, b, h, t0), *dV = at_row(dvp, vdv, b, h, t0);
          const T* Gj = G.data() + (j - j0) * SS;
          mm<T>(false, true, c, c, Dk, Q, vq.ld, K, vk.ld, 0, A.data(), c);      // A = (Q K^T) ⊙ D
          mm<T>(false, true, c, c, Dv, dO, vdo.ld, V, vv.ld, 0, dA.data(), c);  // dA = (dO V^T) ⊙ D
          mask_scores(A.data(), tb.D.data(), c);
          mask_scores(dA.data(), tb.D.data(), c);
          scale_rows(dO, vdo.ld, tb.qp.data(), c, Dv, DOs.data());  // dO ⊙ λ^(t+1)
          scale_rows(V, vv.ld, tb.kp.data(), c, Dv, Vs.data());     // V ⊙ λ^(c-1-t)
          scale_rows(K, vk.ld, tb.kp.data(), c, Dk, Ks.data());     // K ⊙ λ^(c-1-t)
          mm<T>(false, false, c, Dk, c, dA.data(), c, K, vk.ld, 0, dQ, vdq.ld);        // dQ = dA K
          mm<T>(false, true, c, Dk, Dv, DOs.data(), Dv, Sb, Dv, 1, dQ, vdq.ld);         //    + (dO ⊙ λ^(t+1)) S^T
          mm<T>(true, false, c, Dk, c, dA.data(), c, Q, vq.ld, 0, dK, vdk.ld);         // dK = dA^T Q
          mm<T>(false, true, c, Dk, Dv, Vs.data(), Dv, Gj, Dv, 1, dK, vdk.ld);          //    + (V ⊙ λ^(c-1-t)) G^T
          mm<T>(true, false, c, Dv, c, A.data(), c, dO, vdo.ld, 0, dV, vdv.ld);        // dV = A^T dO
          mm<T>(false, false, c, Dv, Dk, Ks.data(), Dk, Gj, Dv, 1, dV, vdv.ld);         //    + (K ⊙ λ^(c-1-t)) G
          mm<T>(true, false, Dk, Dv, c, Ks.data(), Dk, V, vv.ld, tb.lam_c, Sb, Dv);    // S = λ^c S + K~^T V
        }
      }
    }
  });
}

void check(const at::Tensor& x, const at::Tensor& like, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == like.scalar_type(), name, ": CPU, dtype of q");
}

at::Tensor token_major(int64_t B, int64_t H, int64_t L, int64_t D, const at::Tensor& like) {
  return at::empty({B, L, H, D}, like.options()).transpose(1, 2);
}

at::Tensor forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor log_decay, int64_t block,
                   c10::optional<at::Tensor> prefix) {
  for (auto* t : {&k, &v, &log_decay}) check(*t, q, "linear attention kernel");
  at::Tensor out = token_major(q.size(0), q.size(1), q.size(2), v.size(3), q);
  if (prefix) prefix = prefix->contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "seqpar_linear_fwd",
                             [&] { forward_impl<scalar_t>(q, k, v, log_decay.contiguous(), block, prefix, out); });
  return out;
}

at::Tensor state(at::Tensor x, at::Tensor y, at::Tensor log_decay) {
  check(y, x, "linear attention state");
  at::Tensor M = at::empty({x.size(0), x.size(1), x.size(3), y.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqpar_linear_state", [&] {
    state_impl<scalar_t>(x, y, log_decay.contiguous(), false, 1024, M, nullptr);
  });
  return M;
}

std::vector<at::Tensor> state_grads(at::Tensor q, at::Tensor dout, at::Tensor log_decay, int64_t block) {
  check(dout, q, "linear attention state grads");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), C = std::min<int64_t>(block, L);
  const int64_t R = std::max<int64_t>(1, RUN / C) * C;
  at::Tensor dP = at::empty({B, H, q.size(3), dout.size(3)}, q.options());
  at::Tensor ends = at::empty({(L + R - 1) / R, B, H, q.size(3), dout.size(3)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "seqpar_linear_state_grads", [&] {
    state_impl<scalar_t>(q, dout, log_decay.contiguous(), true, R, dP, ends.data_ptr<scalar_t>());
  });
  return {ends, dP};
}

std::vector<at::Tensor> backward(at::Tensor dout, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor log_decay,
                                 int64_t block, c10::optional<at::Tensor> prefix,
                                 c10::optional<at::Tensor> final_grad, at::Tensor run_grads) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2);
  at::Tensor dq = token_major(B, H, L, q.size(3), q), dk = token_major(B, H, L, k.size(3), q),
             dv = token_major(B, H, L, v.size(3), q);
  if (prefix) prefix = prefix->contiguous();
  if (final_grad) final_grad = final_grad->contiguous();
  run_grads = run_grads.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "seqpar_linear_bwd", [&] {
    backward_impl<scalar_t>(dout, q, k, v, log_decay.contiguous(), block, prefix, final_grad, run_grads, dq, dk,
                            dv);
  });
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "causal decayed linear attention of one chunk");
  m.def("backward", &backward, "its gradients (dq, dk, dv)");
  m.def("state", &state, "the chunk state Σ_s λ^(n-1-s) k_s^T v_s");
  m.def("state_grads", &state_grads, "(state gradient at each run's end, dP) of the backward's first pass");
}
