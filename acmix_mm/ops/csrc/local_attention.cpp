// CPU kernel for ACMix's sliding-window (local) attention, forward and backward.
//
// Same function as acmix_mm.ops.local_attention.unfold_local_attention (see that module's
// docstring). Operands ("..." = any leading dims, flattened here to N "planes"):
//   q      (..., D,  Ho, Wo)   queries at the output positions
//   k      (..., D,  H,  W)    keys, unpadded
//   v      (..., Dv, H,  W)    values, unpadded
//   q_pos  (..., 2,  Ho, Wo)   each query's weights on the key coordinates (x, y)
//   coord_x (W,), coord_y (H,) key coordinates
// Padded position p_t = (y*s + ty*dil, x*s + tx*dil) of the map extended by repeated reflection
// (index tables `rows`, `cols`), and
//   logit_t = scale * q . k[p_t] + q_pos[0] * coord_x[p_t] + q_pos[1] * coord_y[p_t]
//   out     = sum_t softmax_t(logit) * v[p_t]
//
// Layout: all inner loops run over x (the last, unit-stride dim) in blocks of kBlock lanes kept in
// registers, so that the compiler vectorises them; per output row the key/value rows a window
// reads are gathered once (with the column reflection applied) into small zero-padded buffers,
// so the hot loops never index through the reflection tables and need no bounds checks.
// The D axis may have any stride (in ACMix q/k/v are views of one (head_dim, 3*head)-ordered
// projection), each row being contiguous. Work is split over (plane, output row) in the forward
// and the q/q_pos backward, and over (plane, *source* row) for the k/v gradients, so that every
// thread owns the rows it writes (no atomics, no per-thread copies of the gradient maps).
#include "local_attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace acmix_mm {
namespace {

constexpr int64_t kBlock = 16;  // x lanes per register block (one AVX-512 / two AVX2 vectors)

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// numpy.pad(..., mode='reflect') source index of padded position i in [-pad, size + pad).
int64_t reflect(int64_t i, int64_t size) {
  if (size == 1) return 0;
  const int64_t period = 2 * (size - 1);
  int64_t r = i % period;
  if (r < 0) r += period;
  return r >= size ? period - r : r;
}

// Element offset of plane n (flattened leading dims) for a tensor with `nlead` leading dims.
std::vector<int64_t> plane_offsets(const at::Tensor& t, int64_t nlead) {
  int64_t n_total = 1;
  for (int64_t i = 0; i < nlead; ++i) n_total *= t.size(i);
  std::vector<int64_t> offsets(n_total);
  for (int64_t n = 0; n < n_total; ++n) {
    int64_t rem = n, off = 0;
    for (int64_t i = nlead - 1; i >= 0; --i) {
      off += (rem % t.size(i)) * t.stride(i);
      rem /= t.size(i);
    }
    offsets[n] = off;
  }
  return offsets;
}

// Rows must be contiguous for the vectorised loops; a strided last dim (e.g. q[..., ::2, ::2])
// is copied once.
at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.stride(-1) == 1 || t.size(-1) == 1 ? t : t.contiguous();
}

struct Geometry {
  int64_t nlead, N, D, Dv, H, W, Ho, Wo, K, K2, dil, s, pad, Hp, Wp;
  int64_t Wo_r;  // Wo rounded up to kBlock
  int64_t KW;    // width of a gathered padded key/value row buffer, covers every block's reads
  std::vector<int64_t> rows, cols;  // reflection tables (Hp,), (Wp,)
};

Geometry make_geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       int64_t kernel, int64_t dilation, int64_t stride) {
  Geometry g;
  g.nlead = q.dim() - 3;
  g.N = 1;
  for (int64_t i = 0; i < g.nlead; ++i) g.N *= q.size(i);
  g.D = k.size(-3);
  g.Dv = v.size(-3);
  g.H = k.size(-2);
  g.W = k.size(-1);
  g.Ho = q.size(-2);
  g.Wo = q.size(-1);
  g.K = kernel;
  g.K2 = kernel * kernel;
  g.dil = dilation;
  g.s = stride;
  g.pad = dilation * (kernel - 1) / 2;
  g.Hp = g.H + 2 * g.pad;
  g.Wp = g.W + 2 * g.pad;
  g.Wo_r = round_up(g.Wo, kBlock);
  g.KW = std::max(g.Wp, (g.Wo_r - 1) * g.s + (g.K - 1) * g.dil + 1);
  g.rows.resize(g.Hp);
  g.cols.resize(g.Wp);
  for (int64_t i = 0; i < g.Hp; ++i) g.rows[i] = reflect(i - g.pad, g.H);
  for (int64_t i = 0; i < g.Wp; ++i) g.cols[i] = reflect(i - g.pad, g.W);
  return g;
}

void check_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& q_pos, const at::Tensor& coord_x,
                    const at::Tensor& coord_y, int64_t kernel, int64_t dilation,
                    int64_t stride) {
  TORCH_CHECK(q.device().is_cpu(), "acmix cpp local attention runs on CPU tensors, got ",
              q.device());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble,
              "acmix cpp local attention supports float32 and float64, got ", dt);
  for (const auto* t : {&k, &v, &q_pos, &coord_x, &coord_y}) {
    TORCH_CHECK(t->scalar_type() == dt && t->device().is_cpu(),
                "acmix cpp local attention: all operands must be CPU tensors of dtype ", dt,
                ", got ", t->scalar_type(), " on ", t->device());
  }
  TORCH_CHECK(kernel >= 1 && kernel % 2 == 1, "kernel must be a positive odd int, got ", kernel);
  TORCH_CHECK(dilation >= 1 && stride >= 1, "dilation and stride must be >= 1, got ", dilation,
              " and ", stride);
  TORCH_CHECK(q.dim() >= 3 && k.dim() == q.dim() && v.dim() == q.dim() &&
                  q_pos.dim() == q.dim(),
              "q, k, v, q_pos must be (..., D, H, W) with the same leading dims");
  const int64_t h = k.size(-2), w = k.size(-1);
  TORCH_CHECK(h >= 1 && w >= 1, "empty key map ", k.sizes());
  TORCH_CHECK(q.size(-3) == k.size(-3) && q.size(-2) == (h + stride - 1) / stride &&
                  q.size(-1) == (w + stride - 1) / stride && v.size(-2) == h &&
                  v.size(-1) == w && q_pos.size(-3) == 2 && q_pos.size(-2) == q.size(-2) &&
                  q_pos.size(-1) == q.size(-1),
              "operand shapes do not match: q ", q.sizes(), ", k ", k.sizes(), ", v ",
              v.sizes(), ", q_pos ", q_pos.sizes(), ", stride ", stride);
  for (int64_t i = 0; i < q.dim() - 3; ++i) {
    TORCH_CHECK(k.size(i) == q.size(i) && v.size(i) == q.size(i) && q_pos.size(i) == q.size(i),
                "leading dims differ: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(),
                ", q_pos ", q_pos.sizes());
  }
  TORCH_CHECK(coord_x.dim() == 1 && coord_x.size(0) == w && coord_y.dim() == 1 &&
                  coord_y.size(0) == h,
              "coord_x / coord_y must be (", w, ",) / (", h, ",), got ", coord_x.sizes(),
              " / ", coord_y.sizes());
}

// Copies one row of `channels` channels (channel stride `cs`, each row contiguous from `base`)
// into buf (channels, KW) with the column reflection applied: the W interior columns are one
// memcpy, only the 2 * pad border columns go through the table. The tail [Wp, KW) stays zero
// (set once at allocation).
template <typename T>
inline void gather_row(const T* base, int64_t channels, int64_t cs, const Geometry& g, T* buf) {
  const int64_t* cols = g.cols.data();
  for (int64_t c = 0; c < channels; ++c) {
    const T* src = base + c * cs;
    T* dst = buf + c * g.KW;
    for (int64_t xp = 0; xp < g.pad; ++xp) dst[xp] = src[cols[xp]];
    std::memcpy(dst + g.pad, src, sizeof(T) * g.W);
    for (int64_t xp = g.pad + g.W; xp < g.Wp; ++xp) dst[xp] = src[cols[xp]];
  }
}

// exp(x) for the softmax, x <= 0 (logit minus the row maximum). float: Cephes' expf polynomial
// (~1 ulp on the range), branch-free and without float->int conversions (rounding by adding
// 1.5 * 2^23, whose bits then hold n) so that the x loop vectorises, which std::exp (a libm call
// per element) does not. Below -87 it returns ~1e-38 instead of 0, irrelevant next to the
// maximum's exp(0) = 1. double: std::exp (the double path is for checks, not speed).
inline float softmax_exp(float x) {
  x = std::max(x, -87.0f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23
  const float t = x * 1.44269504088896341f + shifter;  // round(x / ln 2) in the low bits
  const float n = t - shifter;
  float r = x - n * 0.693359375f;  // x - n ln 2, ln 2 split in two for precision
  r -= n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n: n = bits(t) - bits(shifter), n in [-126, 0].
  const int32_t bits = (__builtin_bit_cast(int32_t, t) - 0x4B400000 + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}
inline double softmax_exp(double x) { return std::exp(x); }

// One block of kBlock lanes for G independent outputs sharing the "a" operand:
//   out[g * out_gs + j] (+)= sum_c a[c * a_cs + j] * b[g * goff + c * b_cs + j * s]
// G separate accumulators break the FMA latency chain (one accumulator over c would issue one
// FMA per ~4 cycles) and reuse each loaded "a" vector G times.
template <typename T, int S, int G>
inline void dot_group(const T* __restrict a, int64_t a_cs, const T* __restrict b, int64_t b_cs,
                      int64_t goff, int64_t channels, int64_t s_rt, T* __restrict out,
                      int64_t out_gs, bool accumulate) {
  const int64_t s = S > 0 ? S : s_rt;
  T acc[G][kBlock];
  for (int g = 0; g < G; ++g) {
#pragma omp simd
    for (int64_t j = 0; j < kBlock; ++j) acc[g][j] = accumulate ? out[g * out_gs + j] : T(0);
  }
  for (int64_t c = 0; c < channels; ++c) {
    const T* ar = a + c * a_cs;
    const T* br = b + c * b_cs;
    for (int g = 0; g < G; ++g) {
      const T* bg = br + g * goff;
#pragma omp simd
      for (int64_t j = 0; j < kBlock; ++j) acc[g][j] += ar[j] * bg[j * s];
    }
  }
  for (int g = 0; g < G; ++g) {
#pragma omp simd
    for (int64_t j = 0; j < kBlock; ++j) out[g * out_gs + j] = acc[g][j];
  }
}

// dot_group over n outputs, in groups of up to 8.
template <typename T, int S>
inline void dot_groups(const T* a, int64_t a_cs, const T* b, int64_t b_cs, int64_t goff,
                       int64_t channels, int64_t s, T* out, int64_t out_gs, int64_t n,
                       bool accumulate) {
  int64_t g0 = 0;
  for (; g0 + 8 <= n; g0 += 8) {
    dot_group<T, S, 8>(a, a_cs, b + g0 * goff, b_cs, goff, channels, s, out + g0 * out_gs,
                       out_gs, accumulate);
  }
  b += g0 * goff;
  out += g0 * out_gs;
  switch (n - g0) {
#define ACMIX_GROUP_CASE(R)                                                                \
  case R:                                                                                  \
    dot_group<T, S, R>(a, a_cs, b, b_cs, goff, channels, s, out, out_gs, accumulate); \
    break;
    ACMIX_GROUP_CASE(7)
    ACMIX_GROUP_CASE(6)
    ACMIX_GROUP_CASE(5)
    ACMIX_GROUP_CASE(4)
    ACMIX_GROUP_CASE(3)
    ACMIX_GROUP_CASE(2)
    ACMIX_GROUP_CASE(1)
#undef ACMIX_GROUP_CASE
    default:
      break;
  }
}

// The last few padded key/value rows of one plane, gathered (gather_row) into slots: with
// slots = (K - 1) * dil + 1, the K rows of one window land in distinct slots, and successive
// output rows (a thread walks them in order) reuse K - s of them instead of gathering again.
template <typename T>
struct RowCache {
  int64_t slots, channels, KW;
  std::vector<T> data;
  std::vector<int64_t> tag;
  RowCache(const Geometry& g, int64_t channels_)
      : slots((g.K - 1) * g.dil + 1), channels(channels_), KW(g.KW),
        data(slots * channels_ * g.KW, T(0)), tag(slots, -1) {}
  // Row `py` of plane n; `plane` points at the plane's first channel, first row.
  const T* get(int64_t n, int64_t py, const T* plane, int64_t cs, int64_t rs, const Geometry& g) {
    const int64_t slot = py % slots, key = n * g.Hp + py;
    T* dst = data.data() + slot * channels * KW;
    if (tag[slot] != key) {
      gather_row(plane + g.rows[py] * rs, channels, cs, g, dst);
      tag[slot] = key;
    }
    return dst;
  }
};

// out (channels x Wo_r) += sum over the window's rows ty and taps tx of w[ty, tx] * row[ty] (the
// padded rows of `plane`, read through `cache`): the forward's weighted sum of v and the
// backward's gradient of q are both this contraction of per-offset weights with a window.
template <typename T, int S>
inline void accumulate_window(const T* w, RowCache<T>& cache, int64_t n, int64_t y, const T* plane,
                              int64_t cs, int64_t rs, const Geometry& g, int64_t channels, T* out) {
  for (int64_t ty = 0; ty < g.K; ++ty) {
    const T* rows = cache.get(n, y * g.s + ty * g.dil, plane, cs, rs, g);
    for (int64_t x0 = 0; x0 < g.Wo_r; x0 += kBlock) {
      dot_groups<T, S>(w + ty * g.K * g.Wo_r + x0, g.Wo_r, rows + x0 * g.s, g.dil, g.KW, g.K, g.s,
                       out + x0, g.Wo_r, channels, true);
    }
  }
}

template <typename T>
void padded_coordinates(const Geometry& g, const at::Tensor& coord_x, const at::Tensor& coord_y,
                        std::vector<T>& cxp, std::vector<T>& cyp) {
  // cxp is zero beyond Wp so that the tail lanes stay finite.
  cxp.assign(g.KW, T(0));
  cyp.assign(g.Hp, T(0));
  auto cx = coord_x.contiguous();
  auto cy = coord_y.contiguous();
  for (int64_t i = 0; i < g.Wp; ++i) cxp[i] = cx.data_ptr<T>()[g.cols[i]];
  for (int64_t i = 0; i < g.Hp; ++i) cyp[i] = cy.data_ptr<T>()[g.rows[i]];
}

template <typename T, int S>
void forward_impl(const Geometry& g, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& q_pos, const at::Tensor& coord_x,
                  const at::Tensor& coord_y, T scale, at::Tensor& out, at::Tensor& attn,
                  bool accumulate, T alpha) {
  // out undefined: only the attention weights (the fused op's backward recomputes them).
  const bool weights_only = !out.defined();
  const auto q_off = plane_offsets(q, g.nlead), k_off = plane_offsets(k, g.nlead),
             v_off = plane_offsets(v, g.nlead), p_off = plane_offsets(q_pos, g.nlead);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* pp = q_pos.data_ptr<T>();
  T* op = weights_only ? nullptr : out.data_ptr<T>();
  T* ap = attn.defined() ? attn.data_ptr<T>() : nullptr;  // undefined: weights not kept
  const int64_t q_cs = q.stride(-3), q_rs = q.stride(-2);
  const int64_t k_cs = k.stride(-3), k_rs = k.stride(-2);
  const int64_t v_cs = v.stride(-3), v_rs = v.stride(-2);
  const int64_t p_cs = q_pos.stride(-3), p_rs = q_pos.stride(-2);
  const int64_t HoWo = g.Ho * g.Wo, Wo_r = g.Wo_r;
  std::vector<T> cxp, cyp;
  padded_coordinates(g, coord_x, coord_y, cxp, cyp);
  const int64_t s = g.s;

  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
    RowCache<T> kcache(g, g.D), vcache(g, g.Dv);
    std::vector<T> qbuf(g.D * Wo_r, T(0)), logits(g.K2 * Wo_r), obuf(g.Dv * Wo_r),
        posx(Wo_r, T(0)), posy(Wo_r, T(0)), rowmax(Wo_r), rowsum(Wo_r);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t n = idx / g.Ho, y = idx % g.Ho;
      for (int64_t d = 0; d < g.D; ++d) {
        std::copy_n(qp + q_off[n] + d * q_cs + y * q_rs, g.Wo, qbuf.data() + d * Wo_r);
      }
      std::copy_n(pp + p_off[n] + y * p_rs, g.Wo, posx.data());
      std::copy_n(pp + p_off[n] + p_cs + y * p_rs, g.Wo, posy.data());

      // Logits: per window row ty, all K offsets tx at once (they share the q loads).
      for (int64_t ty = 0; ty < g.K; ++ty) {
        const int64_t py = y * s + ty * g.dil;
        const T* krows = kcache.get(n, py, kp + k_off[n], k_cs, k_rs, g);
        T* lrows = logits.data() + ty * g.K * Wo_r;
        for (int64_t x0 = 0; x0 < Wo_r; x0 += kBlock) {
          dot_groups<T, S>(qbuf.data() + x0, Wo_r, krows + x0 * s, g.KW, g.dil, g.D, s,
                           lrows + x0, Wo_r, g.K, false);
        }
        const T cy_t = cyp[py];
        for (int64_t tx = 0; tx < g.K; ++tx) {
          T* __restrict l = lrows + tx * Wo_r;
          const T* __restrict cx = cxp.data() + tx * g.dil;
          const T* __restrict px = posx.data();
          const T* __restrict pyv = posy.data();
#pragma omp simd
          for (int64_t x = 0; x < Wo_r; ++x) {
            l[x] = scale * l[x] + px[x] * cx[x * s] + pyv[x] * cy_t;
          }
        }
      }
      // Softmax over t, vectorised over x.
      {
        T* __restrict mx = rowmax.data();
        T* __restrict sm = rowsum.data();
        std::fill_n(mx, Wo_r, -std::numeric_limits<T>::infinity());
        std::fill_n(sm, Wo_r, T(0));
        for (int64_t t = 0; t < g.K2; ++t) {
          const T* __restrict l = logits.data() + t * Wo_r;
#pragma omp simd
          for (int64_t x = 0; x < Wo_r; ++x) mx[x] = std::max(mx[x], l[x]);
        }
        for (int64_t t = 0; t < g.K2; ++t) {
          T* __restrict l = logits.data() + t * Wo_r;
#pragma omp simd
          for (int64_t x = 0; x < Wo_r; ++x) {
            l[x] = softmax_exp(l[x] - mx[x]);
            sm[x] += l[x];
          }
        }
#pragma omp simd
        for (int64_t x = 0; x < Wo_r; ++x) sm[x] = T(1) / sm[x];
        T* arow = ap == nullptr ? nullptr : ap + n * g.K2 * HoWo + y * g.Wo;
        for (int64_t t = 0; t < g.K2; ++t) {
          T* __restrict l = logits.data() + t * Wo_r;
#pragma omp simd
          for (int64_t x = 0; x < Wo_r; ++x) l[x] *= sm[x];
          if (ap != nullptr) std::copy_n(l, g.Wo, arow + t * HoWo);
        }
      }
      if (weights_only) continue;
      // Weighted sum of the value rows: per ty, all Dv channels in groups sharing the a loads.
      std::fill(obuf.begin(), obuf.end(), T(0));
      accumulate_window<T, S>(logits.data(), vcache, n, y, vp + v_off[n], v_cs, v_rs, g, g.Dv,
                              obuf.data());
      T* out_row = op + n * g.Dv * HoWo + y * g.Wo;
      for (int64_t dv = 0; dv < g.Dv; ++dv) {
        if (accumulate) {
          const T* __restrict src = obuf.data() + dv * Wo_r;
          T* __restrict dst = out_row + dv * HoWo;
#pragma omp simd
          for (int64_t x = 0; x < g.Wo; ++x) dst[x] += alpha * src[x];
        } else {
          std::copy_n(obuf.data() + dv * Wo_r, g.Wo, out_row + dv * HoWo);
        }
      }
    }
  });
}

// Where a gradient goes: a (..., C, rows, cols) tensor of any strides (a view of a larger
// gradient buffer in the fused ACMix op), written or accumulated into.
struct GradTarget {
  std::vector<int64_t> off;  // per plane
  int64_t cs = 0, rs = 0, xs = 1;
  bool accumulate = false;
};

GradTarget grad_target(const at::Tensor& t, int64_t nlead, bool accumulate) {
  GradTarget gt;
  if (!t.defined() || t.numel() == 0) return gt;
  gt.off = plane_offsets(t, nlead);
  gt.cs = t.stride(-3);
  gt.rs = t.stride(-2);
  gt.xs = t.stride(-1);
  gt.accumulate = accumulate;
  return gt;
}

// Phase 1 of the backward, per (plane, output row): the logits' gradient (softmax backward),
// grad_q and grad_q_pos. grad_logits is written to `glog` (N, K2, Ho, Wo) for phase 2. The
// output's gradient is taken as gscale * grad_out (the fused op's rate1); `rate_rows`, if
// given, receives per (plane, row) sum_x grad_out . out, the gradient of that factor.
template <typename T, int S>
void backward_rows_impl(const Geometry& g, const at::Tensor& grad_out, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& attn, const at::Tensor& coord_x,
                        const at::Tensor& coord_y, T scale, T gscale, bool need_q, bool need_pos,
                        at::Tensor& glog, at::Tensor& grad_q, const GradTarget& tq,
                        at::Tensor& grad_pos, const GradTarget& tp, double* rate_rows) {
  const auto go_off = plane_offsets(grad_out, g.nlead), k_off = plane_offsets(k, g.nlead),
             v_off = plane_offsets(v, g.nlead);
  const T* gop = grad_out.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* ap = attn.data_ptr<T>();
  T* glp = glog.data_ptr<T>();
  T* gqp = need_q ? grad_q.data_ptr<T>() : nullptr;
  T* gpp = need_pos ? grad_pos.data_ptr<T>() : nullptr;
  const int64_t go_cs = grad_out.stride(-3), go_rs = grad_out.stride(-2);
  const int64_t k_cs = k.stride(-3), k_rs = k.stride(-2);
  const int64_t v_cs = v.stride(-3), v_rs = v.stride(-2);
  const int64_t HoWo = g.Ho * g.Wo, Wo_r = g.Wo_r;
  std::vector<T> cxp, cyp;
  padded_coordinates(g, coord_x, coord_y, cxp, cyp);
  const int64_t s = g.s;

  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
    RowCache<T> kcache(g, g.D), vcache(g, g.Dv);
    std::vector<T> gobuf(g.Dv * Wo_r, T(0)), abuf(g.K2 * Wo_r, T(0)), gl(g.K2 * Wo_r),
        gq(g.D * Wo_r), dot(Wo_r), pbuf(2 * Wo_r);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t n = idx / g.Ho, y = idx % g.Ho;
      for (int64_t dv = 0; dv < g.Dv; ++dv) {
        std::copy_n(gop + go_off[n] + dv * go_cs + y * go_rs, g.Wo, gobuf.data() + dv * Wo_r);
      }
      for (int64_t t = 0; t < g.K2; ++t) {
        std::copy_n(ap + (n * g.K2 + t) * HoWo + y * g.Wo, g.Wo, abuf.data() + t * Wo_r);
      }
      // d out / d a_t = grad_out . v[p_t], all tx of a window row at once.
      for (int64_t ty = 0; ty < g.K; ++ty) {
        const int64_t py = y * s + ty * g.dil;
        const T* vrows = vcache.get(n, py, vp + v_off[n], v_cs, v_rs, g);
        for (int64_t x0 = 0; x0 < Wo_r; x0 += kBlock) {
          dot_groups<T, S>(gobuf.data() + x0, Wo_r, vrows + x0 * s, g.KW, g.dil, g.Dv, s,
                           gl.data() + ty * g.K * Wo_r + x0, Wo_r, g.K, false);
        }
      }
      // Softmax backward: gl_t = a_t * (g_t - sum_u a_u g_u).
      {
        T* __restrict dt = dot.data();
        std::fill_n(dt, Wo_r, T(0));
        for (int64_t t = 0; t < g.K2; ++t) {
          const T* __restrict a = abuf.data() + t * Wo_r;
          const T* __restrict gr = gl.data() + t * Wo_r;
#pragma omp simd
          for (int64_t x = 0; x < Wo_r; ++x) dt[x] += a[x] * gr[x];
        }
        // sum_t a_t (grad_out . v_t) = grad_out . out: the gradient of the output's factor.
        if (rate_rows != nullptr) {
          double sum = 0;
          for (int64_t x = 0; x < g.Wo; ++x) sum += dt[x];
          rate_rows[idx] = sum;
        }
        T* glrow = glp + n * g.K2 * HoWo + y * g.Wo;
        for (int64_t t = 0; t < g.K2; ++t) {
          const T* __restrict a = abuf.data() + t * Wo_r;
          T* __restrict gr = gl.data() + t * Wo_r;
#pragma omp simd
          for (int64_t x = 0; x < Wo_r; ++x) gr[x] = gscale * (a[x] * (gr[x] - dt[x]));
          std::copy_n(gr, g.Wo, glrow + t * HoWo);
        }
      }
      if (need_pos) {
        T* __restrict px = pbuf.data();
        T* __restrict pyr = px + Wo_r;
        std::fill_n(px, 2 * Wo_r, T(0));
        for (int64_t ty = 0; ty < g.K; ++ty) {
          const T cy_t = cyp[y * s + ty * g.dil];
          for (int64_t tx = 0; tx < g.K; ++tx) {
            const T* __restrict gr = gl.data() + (ty * g.K + tx) * Wo_r;
            const T* __restrict cx = cxp.data() + tx * g.dil;
#pragma omp simd
            for (int64_t x = 0; x < g.Wo; ++x) {
              px[x] += gr[x] * cx[x * s];
              pyr[x] += gr[x] * cy_t;
            }
          }
        }
        T* dx = gpp + tp.off[n] + y * tp.rs;
        T* dy = dx + tp.cs;
        for (int64_t x = 0; x < g.Wo; ++x) {
          if (tp.accumulate) {
            dx[x * tp.xs] += px[x];
            dy[x * tp.xs] += pyr[x];
          } else {
            dx[x * tp.xs] = px[x];
            dy[x * tp.xs] = pyr[x];
          }
        }
      }
      if (need_q) {
        std::fill(gq.begin(), gq.end(), T(0));
        accumulate_window<T, S>(gl.data(), kcache, n, y, kp + k_off[n], k_cs, k_rs, g, g.D,
                                gq.data());
        T* gq_out = gqp + tq.off[n] + y * tq.rs;
        for (int64_t d = 0; d < g.D; ++d) {
          const T* src = gq.data() + d * Wo_r;
          T* dst = gq_out + d * tq.cs;
          if (tq.accumulate) {
            for (int64_t x = 0; x < g.Wo; ++x) dst[x * tq.xs] += scale * src[x];
          } else {
            for (int64_t x = 0; x < g.Wo; ++x) dst[x * tq.xs] = scale * src[x];
          }
        }
      }
    }
  });
}

// Phase 2 of the backward, per (plane, source row r): grad_k and grad_v of row r, summed over
// every padded row p that reflects onto r and every output row y whose window reads p.
// `weights` is (N, K2, Ho, Wo) (grad_logits for k, attn for v), `src` the per-query rows
// (scale * q for k, grad_out for v): grad[r][cols[xp]] += sum weights_t[y][x] * src[y][x] over
// (t, y, x) with x*s + tx*dil == xp.
template <typename T, int S>
void backward_kv_impl(const Geometry& g, const at::Tensor& weights, const at::Tensor& src,
                      T factor, at::Tensor& grad, const GradTarget& tg) {
  const auto s_off = plane_offsets(src, g.nlead);
  const T* wp = weights.data_ptr<T>();
  const T* sp = src.data_ptr<T>();
  T* gp = grad.data_ptr<T>();
  const int64_t C = src.size(-3);
  const int64_t s_cs = src.stride(-3), s_rs = src.stride(-2);
  const int64_t HoWo = g.Ho * g.Wo;
  // Padded rows of each source row (CSR): row r is read as padded rows pr_list[pr_start[r]..].
  std::vector<int64_t> pr_start(g.H + 1, 0), pr_list(g.Hp);
  for (int64_t p = 0; p < g.Hp; ++p) ++pr_start[g.rows[p] + 1];
  for (int64_t r = 0; r < g.H; ++r) pr_start[r + 1] += pr_start[r];
  {
    std::vector<int64_t> fill(pr_start.begin(), pr_start.end() - 1);
    for (int64_t p = 0; p < g.Hp; ++p) pr_list[fill[g.rows[p]]++] = p;
  }
  const int64_t s = g.s;
  // Stride 1: grad[xp] = sum_tx w_tx[xp - tx*dil] * src[xp - tx*dil], a register-blocked
  // dot_groups over tx per block of padded columns xp (shifted reads, so the per-query rows
  // get L zeros on the left); no read-modify-write of the accumulator per offset. Other
  // strides scatter, x*s + tx*dil == xp.
  const int64_t L = S == 1 ? (g.K - 1) * g.dil : 0;
  const int64_t Wp_r = round_up(g.Wp, kBlock);
  const int64_t AW = std::max(Wp_r, g.KW);              // accumulator row width
  const int64_t WB = L + std::max(g.Wo_r, Wp_r);        // per-query row buffer width
  const int64_t slots = (g.K - 1) * g.dil + 1;          // distinct output rows of one padded row

  at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
    // src rows are each used by K padded rows: cached by output row (key n * Ho + y).
    std::vector<T> acc_buf(C * AW), scache(slots * C * WB, T(0)), wbuf(g.K * WB, T(0));
    std::vector<int64_t> stag(slots, -1);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t n = idx / g.H, r = idx % g.H;
      std::fill(acc_buf.begin(), acc_buf.end(), T(0));
      for (int64_t i = pr_start[r]; i < pr_start[r + 1]; ++i) {
        const int64_t p = pr_list[i];
        for (int64_t ty = 0; ty < g.K; ++ty) {
          const int64_t rel = p - ty * g.dil;
          if (rel < 0 || rel % s != 0) continue;
          const int64_t y = rel / s;
          if (y >= g.Ho) continue;
          const int64_t slot = y % slots;
          T* srows = scache.data() + slot * C * WB;
          if (stag[slot] != n * g.Ho + y) {
            for (int64_t c = 0; c < C; ++c) {
              std::copy_n(sp + s_off[n] + c * s_cs + y * s_rs, g.Wo, srows + c * WB + L);
            }
            stag[slot] = n * g.Ho + y;
          }
          for (int64_t tx = 0; tx < g.K; ++tx) {
            std::copy_n(wp + (n * g.K2 + ty * g.K + tx) * HoWo + y * g.Wo, g.Wo,
                        wbuf.data() + tx * WB + L);
          }
          if (S == 1) {
            for (int64_t x0 = 0; x0 < Wp_r; x0 += kBlock) {
              dot_groups<T, 1>(wbuf.data() + L + x0, WB - g.dil, srows + L + x0, -g.dil, WB,
                               g.K, 1, acc_buf.data() + x0, AW, C, true);
            }
          } else {
            for (int64_t c = 0; c < C; ++c) {
              const T* srow = srows + c * WB;
              T* arow = acc_buf.data() + c * AW;
              for (int64_t tx = 0; tx < g.K; ++tx) {
                const T* wrow = wbuf.data() + tx * WB;
                T* dst = arow + tx * g.dil;
                for (int64_t x = 0; x < g.Wo; ++x) dst[x * s] += wrow[x] * srow[x];
              }
            }
          }
        }
      }
      // Fold the padded columns back onto their source columns.
      T* grow = gp + tg.off[n] + r * tg.rs;
      for (int64_t c = 0; c < C; ++c) {
        T* dst = grow + c * tg.cs;
        const T* a = acc_buf.data() + c * AW;
        if (tg.accumulate) {
          for (int64_t x = 0; x < g.W; ++x) dst[x] += factor * a[g.pad + x];
        } else {
          for (int64_t x = 0; x < g.W; ++x) dst[x] = factor * a[g.pad + x];  // interior
        }
        for (int64_t xp = 0; xp < g.pad; ++xp) dst[g.cols[xp]] += factor * a[xp];
        for (int64_t xp = g.pad + g.W; xp < g.Wp; ++xp) dst[g.cols[xp]] += factor * a[xp];
      }
    }
  });
}

}  // namespace

namespace {

// Runs the forward into `out` (undefined: none) and returns the attention weights, or an
// undefined tensor when `keep_weights` is false.
at::Tensor forward_common(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor q_pos,
                          const at::Tensor& coord_x, const at::Tensor& coord_y, int64_t kernel,
                          int64_t dilation, int64_t stride, double scale, at::Tensor& out,
                          bool accumulate, double alpha, bool keep_weights = true) {
  q = unit_last_stride(q);
  k = unit_last_stride(k);
  v = unit_last_stride(v);
  q_pos = unit_last_stride(q_pos);
  const Geometry g = make_geometry(q, k, v, kernel, dilation, stride);
  auto lead = q.sizes().slice(0, g.nlead).vec();
  auto attn_shape = lead;
  attn_shape.insert(attn_shape.end(), {g.K2, g.Ho, g.Wo});
  auto attn = keep_weights ? at::empty(attn_shape, q.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "acmix_local_attention_forward", [&] {
    if (stride == 1) {
      forward_impl<scalar_t, 1>(g, q, k, v, q_pos, coord_x, coord_y, scalar_t(scale), out, attn,
                                accumulate, scalar_t(alpha));
    } else {
      forward_impl<scalar_t, 0>(g, q, k, v, q_pos, coord_x, coord_y, scalar_t(scale), out, attn,
                                accumulate, scalar_t(alpha));
    }
  });
  return attn;
}

// The backward into given gradient tensors (undefined = not needed); q/k/v gradients are
// accumulated when `accumulate`, q_pos's is written. Returns sum grad_out . out (double) when
// `want_rate`, else 0. With `attn_scratch` (attn is the caller's own recomputed copy) the
// logits' gradient overwrites attn row by row instead of going to a buffer of its own: the v
// gradient, which needs the weights, runs first.
double backward_common(at::Tensor grad_out, at::Tensor q, at::Tensor k, at::Tensor v,
                       const at::Tensor& q_pos, const at::Tensor& coord_x,
                       const at::Tensor& coord_y, at::Tensor attn, int64_t kernel,
                       int64_t dilation, int64_t stride, double scale, double gscale,
                       at::Tensor grad_q, at::Tensor grad_k, at::Tensor grad_v,
                       at::Tensor grad_pos, bool accumulate, bool want_rate,
                       bool attn_scratch) {
  q = unit_last_stride(q);
  k = unit_last_stride(k);
  v = unit_last_stride(v);
  grad_out = unit_last_stride(grad_out.to(q.scalar_type()));
  attn = attn.contiguous();
  const Geometry g = make_geometry(q, k, v, kernel, dilation, stride);
  TORCH_CHECK(grad_out.sizes().slice(0, g.nlead) == q.sizes().slice(0, g.nlead) &&
                  grad_out.size(-3) == g.Dv && grad_out.size(-2) == g.Ho &&
                  grad_out.size(-1) == g.Wo,
              "grad_out has shape ", grad_out.sizes(), ", expected the output's");
  TORCH_CHECK(attn.numel() == g.N * g.K2 * g.Ho * g.Wo, "attn has shape ", attn.sizes());
  const bool need_q = grad_q.defined(), need_k = grad_k.defined(), need_v = grad_v.defined(),
             need_pos = grad_pos.defined();
  for (const auto* t : {&grad_k, &grad_v}) {
    TORCH_CHECK(!t->defined() || t->stride(-1) == 1, "k/v gradients need unit column stride");
  }
  const GradTarget tq = grad_target(grad_q, g.nlead, accumulate),
                   tk = grad_target(grad_k, g.nlead, accumulate),
                   tv = grad_target(grad_v, g.nlead, accumulate),
                   tp = grad_target(grad_pos, g.nlead, false);
  std::vector<double> rate_rows(want_rate ? g.N * g.Ho : 0, 0.0);
  if (!(need_q || need_k || need_v || need_pos || want_rate)) return 0.0;
  TORCH_CHECK(!attn_scratch || attn.is_contiguous(), "a scratch attn must be contiguous");
  auto glog = attn_scratch ? attn : at::empty(attn.sizes(), attn.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "acmix_local_attention_backward", [&] {
    const scalar_t sc = scalar_t(scale), gs = scalar_t(gscale);
    const bool unit = stride == 1;
    double* rr = want_rate ? rate_rows.data() : nullptr;
    auto v_grad = [&] {
      if (unit) {
        backward_kv_impl<scalar_t, 1>(g, attn, grad_out, gs, grad_v, tv);
      } else {
        backward_kv_impl<scalar_t, 0>(g, attn, grad_out, gs, grad_v, tv);
      }
    };
    if (need_v && attn_scratch) v_grad();
    if (need_q || need_k || need_pos || want_rate) {
      if (unit) {
        backward_rows_impl<scalar_t, 1>(g, grad_out, k, v, attn, coord_x, coord_y, sc, gs,
                                        need_q, need_pos, glog, grad_q, tq, grad_pos, tp, rr);
      } else {
        backward_rows_impl<scalar_t, 0>(g, grad_out, k, v, attn, coord_x, coord_y, sc, gs,
                                        need_q, need_pos, glog, grad_q, tq, grad_pos, tp, rr);
      }
    }
    if (need_k) {
      if (unit) {
        backward_kv_impl<scalar_t, 1>(g, glog, q, sc, grad_k, tk);
      } else {
        backward_kv_impl<scalar_t, 0>(g, glog, q, sc, grad_k, tk);
      }
    }
    if (need_v && !attn_scratch) v_grad();
  });
  double rate = 0.0;  // summed in a fixed order: deterministic
  for (double r : rate_rows) rate += r;
  return rate;
}

}  // namespace

std::vector<at::Tensor> local_attention_forward(at::Tensor q, at::Tensor k, at::Tensor v,
                                                at::Tensor q_pos, at::Tensor coord_x,
                                                at::Tensor coord_y, int64_t kernel,
                                                int64_t dilation, int64_t stride, double scale) {
  check_operands(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride);
  auto out_shape = q.sizes().vec();
  out_shape[out_shape.size() - 3] = v.size(-3);
  auto out = at::empty(out_shape, q.options());
  auto attn = forward_common(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride, scale,
                             out, false, 1.0);
  return {out, attn};
}

void local_attention_forward_add(at::Tensor q, at::Tensor k, at::Tensor v,
                                       at::Tensor q_pos, at::Tensor coord_x, at::Tensor coord_y,
                                       int64_t kernel, int64_t dilation, int64_t stride,
                                       double scale, at::Tensor out, double alpha) {
  check_operands(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride);
  auto expected = q.sizes().vec();
  expected[expected.size() - 3] = v.size(-3);
  TORCH_CHECK(out.is_contiguous() && out.sizes() == at::IntArrayRef(expected) &&
                  out.scalar_type() == q.scalar_type(),
              "out must be a contiguous ", q.scalar_type(), " tensor of shape ",
              at::IntArrayRef(expected), ", got ", out.sizes());
  forward_common(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride, scale, out, true,
                 alpha, false);
}

at::Tensor local_attention_weights(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor q_pos,
                                   at::Tensor coord_x, at::Tensor coord_y, int64_t kernel,
                                   int64_t dilation, int64_t stride, double scale) {
  check_operands(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride);
  at::Tensor none;
  return forward_common(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride, scale, none,
                        false, 1.0);
}

// Returns (grad_q, grad_k, grad_v, grad_q_pos); a gradient not asked for is an empty tensor.
std::vector<at::Tensor> local_attention_backward(
    at::Tensor grad_out, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor q_pos,
    at::Tensor coord_x, at::Tensor coord_y, at::Tensor attn, int64_t kernel, int64_t dilation,
    int64_t stride, double scale, bool need_q, bool need_k, bool need_v, bool need_pos) {
  check_operands(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride);
  // Distinct (0,) tensors for the gradients not asked for: custom ops' outputs must not alias.
  auto grad_q = at::empty(need_q ? q.sizes() : at::IntArrayRef{0}, q.options());
  auto grad_k = at::empty(need_k ? k.sizes() : at::IntArrayRef{0}, k.options());
  auto grad_v = at::empty(need_v ? v.sizes() : at::IntArrayRef{0}, v.options());
  auto grad_pos = at::empty(need_pos ? q_pos.sizes() : at::IntArrayRef{0}, q_pos.options());
  backward_common(grad_out, q, k, v, q_pos, coord_x, coord_y, attn, kernel, dilation, stride,
                  scale, 1.0, need_q ? grad_q : at::Tensor(), need_k ? grad_k : at::Tensor(),
                  need_v ? grad_v : at::Tensor(), need_pos ? grad_pos : at::Tensor(), false,
                  false, false);
  return {grad_q, grad_k, grad_v, grad_pos};
}

double local_attention_backward_add(at::Tensor grad_out, at::Tensor q, at::Tensor k,
                                    at::Tensor v, at::Tensor q_pos, at::Tensor coord_x,
                                    at::Tensor coord_y, at::Tensor attn, int64_t kernel,
                                    int64_t dilation, int64_t stride, double scale,
                                    double gscale, at::Tensor grad_q, at::Tensor grad_k,
                                    at::Tensor grad_v, at::Tensor grad_pos, bool attn_scratch) {
  check_operands(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride);
  const std::pair<const at::Tensor*, const at::Tensor*> pairs[] = {
      {&grad_q, &q}, {&grad_k, &k}, {&grad_v, &v}, {&grad_pos, &q_pos}};
  for (const auto& [grad, like] : pairs) {
    TORCH_CHECK(!grad->defined() || grad->sizes() == like->sizes() && grad->scalar_type() == like->scalar_type(),
                "gradient target has shape ", grad->sizes(), " and dtype ", grad->scalar_type(),
                ", expected ", like->sizes(), " and ", like->scalar_type());
  }
  return backward_common(grad_out, q, k, v, q_pos, coord_x, coord_y, attn, kernel, dilation,
                         stride, scale, gscale, grad_q, grad_k, grad_v, grad_pos, true, true,
                         attn_scratch);
}

}  // namespace acmix_mm
