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
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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

// Gathers rows `src_row` of `rows_count` channels (channel stride `cs`, row starting at
// base + src_row * row_stride) into buf (rows_count, KW), applying the column reflection; the
// tail [Wp, KW) stays zero (set once at allocation).
template <typename T>
inline void gather_row(const T* base, int64_t channels, int64_t cs, const int64_t* cols,
                       int64_t Wp, int64_t KW, T* buf) {
  for (int64_t c = 0; c < channels; ++c) {
    const T* src = base + c * cs;
    T* dst = buf + c * KW;
    for (int64_t xp = 0; xp < Wp; ++xp) dst[xp] = src[cols[xp]];
  }
}

// acc[j] += sum_c a[c][x0 + j] * b[c][off + (x0 + j) * S] over channels; strides in elements.
template <typename T, int S>
inline void dot_block(const T* a, int64_t a_cs, const T* b, int64_t b_cs, int64_t channels,
                      int64_t s_rt, T* __restrict acc) {
  const int64_t s = S > 0 ? S : s_rt;
  for (int64_t c = 0; c < channels; ++c) {
    const T* __restrict ar = a + c * a_cs;
    const T* __restrict br = b + c * b_cs;
#pragma GCC ivdep
    for (int64_t j = 0; j < kBlock; ++j) acc[j] += ar[j] * br[j * s];
  }
}

template <typename T, int S>
void forward_impl(const Geometry& g, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& q_pos, const at::Tensor& coord_x,
                  const at::Tensor& coord_y, T scale, at::Tensor& out, at::Tensor& attn) {
  const auto q_off = plane_offsets(q, g.nlead), k_off = plane_offsets(k, g.nlead),
             v_off = plane_offsets(v, g.nlead), p_off = plane_offsets(q_pos, g.nlead);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* pp = q_pos.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* ap = attn.data_ptr<T>();
  const int64_t q_cs = q.stride(-3), q_rs = q.stride(-2);
  const int64_t k_cs = k.stride(-3), k_rs = k.stride(-2);
  const int64_t v_cs = v.stride(-3), v_rs = v.stride(-2);
  const int64_t p_cs = q_pos.stride(-3), p_rs = q_pos.stride(-2);
  const int64_t HoWo = g.Ho * g.Wo;
  // Padded coordinates; cxp is zero beyond Wp so that the tail lanes stay finite.
  std::vector<T> cxp(g.KW, T(0)), cyp(g.Hp);
  {
    auto cx = coord_x.contiguous();
    auto cy = coord_y.contiguous();
    for (int64_t i = 0; i < g.Wp; ++i) cxp[i] = cx.data_ptr<T>()[g.cols[i]];
    for (int64_t i = 0; i < g.Hp; ++i) cyp[i] = cy.data_ptr<T>()[g.rows[i]];
  }
  const int64_t s = g.s;

  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
    const int64_t Dmax = std::max(g.D, g.Dv);
    std::vector<T> qbuf(g.D * g.Wo_r, T(0)), kbuf(Dmax * g.KW, T(0)),
        logits(g.K2 * g.Wo_r), obuf(g.Dv * g.Wo_r), posx(g.Wo_r, T(0)), posy(g.Wo_r, T(0)),
        rowmax(g.Wo_r), rowsum(g.Wo_r);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t n = idx / g.Ho, y = idx % g.Ho;
      for (int64_t d = 0; d < g.D; ++d) {
        std::copy_n(qp + q_off[n] + d * q_cs + y * q_rs, g.Wo, qbuf.data() + d * g.Wo_r);
      }
      std::copy_n(pp + p_off[n] + y * p_rs, g.Wo, posx.data());
      std::copy_n(pp + p_off[n] + p_cs + y * p_rs, g.Wo, posy.data());

      // Logits, one gathered key row per window row ty.
      for (int64_t ty = 0; ty < g.K; ++ty) {
        const int64_t py = y * s + ty * g.dil;
        gather_row(kp + k_off[n] + g.rows[py] * k_rs, g.D, k_cs, g.cols.data(), g.Wp, g.KW,
                   kbuf.data());
        const T cy_t = cyp[py];
        for (int64_t tx = 0; tx < g.K; ++tx) {
          const int64_t off = tx * g.dil;
          T* lrow = logits.data() + (ty * g.K + tx) * g.Wo_r;
          for (int64_t x0 = 0; x0 < g.Wo_r; x0 += kBlock) {
            T acc[kBlock] = {};
            dot_block<T, S>(qbuf.data() + x0, g.Wo_r, kbuf.data() + off + x0 * s, g.KW, g.D, s,
                            acc);
            for (int64_t j = 0; j < kBlock; ++j) {
              const int64_t x = x0 + j;
              lrow[x] = scale * acc[j] + posx[x] * cxp[off + x * s] + posy[x] * cy_t;
            }
          }
        }
      }
      // Softmax over t, vectorised over x.
      std::fill(rowmax.begin(), rowmax.end(), -std::numeric_limits<T>::infinity());
      std::fill(rowsum.begin(), rowsum.end(), T(0));
      for (int64_t t = 0; t < g.K2; ++t) {
        const T* l = logits.data() + t * g.Wo_r;
        for (int64_t x = 0; x < g.Wo_r; ++x) rowmax[x] = std::max(rowmax[x], l[x]);
      }
      for (int64_t t = 0; t < g.K2; ++t) {
        T* l = logits.data() + t * g.Wo_r;
        for (int64_t x = 0; x < g.Wo_r; ++x) {
          l[x] = std::exp(l[x] - rowmax[x]);
          rowsum[x] += l[x];
        }
      }
      for (int64_t x = 0; x < g.Wo_r; ++x) rowsum[x] = T(1) / rowsum[x];
      T* arow = ap + n * g.K2 * HoWo + y * g.Wo;
      for (int64_t t = 0; t < g.K2; ++t) {
        T* l = logits.data() + t * g.Wo_r;
        for (int64_t x = 0; x < g.Wo_r; ++x) l[x] *= rowsum[x];
        std::copy_n(l, g.Wo, arow + t * HoWo);
      }
      // Weighted sum of the gathered value rows.
      std::fill(obuf.begin(), obuf.end(), T(0));
      for (int64_t ty = 0; ty < g.K; ++ty) {
        const int64_t py = y * s + ty * g.dil;
        gather_row(vp + v_off[n] + g.rows[py] * v_rs, g.Dv, v_cs, g.cols.data(), g.Wp, g.KW,
                   kbuf.data());
        for (int64_t dv = 0; dv < g.Dv; ++dv) {
          const T* vrow = kbuf.data() + dv * g.KW;
          T* orow = obuf.data() + dv * g.Wo_r;
          for (int64_t x0 = 0; x0 < g.Wo_r; x0 += kBlock) {
            T acc[kBlock];
            for (int64_t j = 0; j < kBlock; ++j) acc[j] = orow[x0 + j];
            // a_t[x] * v[off + x*s] summed over tx: the same dot_block with a stride-K2 "a".
            dot_block<T, S>(logits.data() + ty * g.K * g.Wo_r + x0, g.Wo_r, vrow + x0 * s,
                            g.dil, g.K, s, acc);
            for (int64_t j = 0; j < kBlock; ++j) orow[x0 + j] = acc[j];
          }
        }
      }
      T* out_row = op + n * g.Dv * HoWo + y * g.Wo;
      for (int64_t dv = 0; dv < g.Dv; ++dv) {
        std::copy_n(obuf.data() + dv * g.Wo_r, g.Wo, out_row + dv * HoWo);
      }
    }
  });
}

// Phase 1 of the backward, per (plane, output row): the logits' gradient (softmax backward),
// grad_q and grad_q_pos. grad_logits is written to `glog` (N, K2, Ho, Wo) for phase 2.
template <typename T, int S>
void backward_rows_impl(const Geometry& g, const at::Tensor& grad_out, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& attn, const at::Tensor& coord_x,
                        const at::Tensor& coord_y, T scale, bool need_q, bool need_pos,
                        at::Tensor& glog, at::Tensor& grad_q, at::Tensor& grad_pos) {
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
  const int64_t HoWo = g.Ho * g.Wo;
  std::vector<T> cxp(g.KW, T(0)), cyp(g.Hp);
  {
    auto cx = coord_x.contiguous();
    auto cy = coord_y.contiguous();
    for (int64_t i = 0; i < g.Wp; ++i) cxp[i] = cx.data_ptr<T>()[g.cols[i]];
    for (int64_t i = 0; i < g.Hp; ++i) cyp[i] = cy.data_ptr<T>()[g.rows[i]];
  }
  const int64_t s = g.s;

  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
    const int64_t Dmax = std::max(g.D, g.Dv);
    std::vector<T> gobuf(g.Dv * g.Wo_r, T(0)), buf(Dmax * g.KW, T(0)),
        abuf(g.K2 * g.Wo_r, T(0)), gl(g.K2 * g.Wo_r), gq(g.D * g.Wo_r), dot(g.Wo_r);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t n = idx / g.Ho, y = idx % g.Ho;
      for (int64_t dv = 0; dv < g.Dv; ++dv) {
        std::copy_n(gop + go_off[n] + dv * go_cs + y * go_rs, g.Wo, gobuf.data() + dv * g.Wo_r);
      }
      for (int64_t t = 0; t < g.K2; ++t) {
        std::copy_n(ap + (n * g.K2 + t) * HoWo + y * g.Wo, g.Wo, abuf.data() + t * g.Wo_r);
      }
      // d out / d a_t = grad_out . v[p_t]
      for (int64_t ty = 0; ty < g.K; ++ty) {
        const int64_t py = y * s + ty * g.dil;
        gather_row(vp + v_off[n] + g.rows[py] * v_rs, g.Dv, v_cs, g.cols.data(), g.Wp, g.KW,
                   buf.data());
        for (int64_t tx = 0; tx < g.K; ++tx) {
          const int64_t off = tx * g.dil;
          T* grow = gl.data() + (ty * g.K + tx) * g.Wo_r;
          for (int64_t x0 = 0; x0 < g.Wo_r; x0 += kBlock) {
            T acc[kBlock] = {};
            dot_block<T, S>(gobuf.data() + x0, g.Wo_r, buf.data() + off + x0 * s, g.KW, g.Dv, s,
                            acc);
            std::copy_n(acc, kBlock, grow + x0);
          }
        }
      }
      // Softmax backward: gl_t = a_t * (g_t - sum_u a_u g_u).
      std::fill(dot.begin(), dot.end(), T(0));
      for (int64_t t = 0; t < g.K2; ++t) {
        const T* a = abuf.data() + t * g.Wo_r;
        const T* gr = gl.data() + t * g.Wo_r;
        for (int64_t x = 0; x < g.Wo_r; ++x) dot[x] += a[x] * gr[x];
      }
      T* glrow = glp + n * g.K2 * HoWo + y * g.Wo;
      for (int64_t t = 0; t < g.K2; ++t) {
        const T* a = abuf.data() + t * g.Wo_r;
        T* gr = gl.data() + t * g.Wo_r;
        for (int64_t x = 0; x < g.Wo_r; ++x) gr[x] = a[x] * (gr[x] - dot[x]);
        std::copy_n(gr, g.Wo, glrow + t * HoWo);
      }
      if (need_pos) {
        T* px = gpp + n * 2 * HoWo + y * g.Wo;
        T* pyr = px + HoWo;
        std::fill_n(px, g.Wo, T(0));
        std::fill_n(pyr, g.Wo, T(0));
        for (int64_t ty = 0; ty < g.K; ++ty) {
          const T cy_t = cyp[y * s + ty * g.dil];
          for (int64_t tx = 0; tx < g.K; ++tx) {
            const T* gr = gl.data() + (ty * g.K + tx) * g.Wo_r;
            const T* cx = cxp.data() + tx * g.dil;
            for (int64_t x = 0; x < g.Wo; ++x) {
              px[x] += gr[x] * cx[x * s];
              pyr[x] += gr[x] * cy_t;
            }
          }
        }
      }
      if (need_q) {
        std::fill(gq.begin(), gq.end(), T(0));
        for (int64_t ty = 0; ty < g.K; ++ty) {
          const int64_t py = y * s + ty * g.dil;
          gather_row(kp + k_off[n] + g.rows[py] * k_rs, g.D, k_cs, g.cols.data(), g.Wp, g.KW,
                     buf.data());
          for (int64_t d = 0; d < g.D; ++d) {
            T* gqrow = gq.data() + d * g.Wo_r;
            for (int64_t x0 = 0; x0 < g.Wo_r; x0 += kBlock) {
              T acc[kBlock];
              std::copy_n(gqrow + x0, kBlock, acc);
              dot_block<T, S>(gl.data() + ty * g.K * g.Wo_r + x0, g.Wo_r,
                              buf.data() + d * g.KW + x0 * s, g.dil, g.K, s, acc);
              std::copy_n(acc, kBlock, gqrow + x0);
            }
          }
        }
        T* gq_out = gqp + n * g.D * HoWo + y * g.Wo;
        for (int64_t d = 0; d < g.D; ++d) {
          const T* src = gq.data() + d * g.Wo_r;
          T* dst = gq_out + d * HoWo;
          for (int64_t x = 0; x < g.Wo; ++x) dst[x] = scale * src[x];
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
                      T factor, at::Tensor& grad) {
  const auto s_off = plane_offsets(src, g.nlead);
  const T* wp = weights.data_ptr<T>();
  const T* sp = src.data_ptr<T>();
  T* gp = grad.data_ptr<T>();
  const int64_t C = src.size(-3);
  const int64_t s_cs = src.stride(-3), s_rs = src.stride(-2);
  const int64_t HoWo = g.Ho * g.Wo, HW = g.H * g.W;
  // Padded rows of each source row (CSR): row r is read as padded rows pr_list[pr_start[r]..].
  std::vector<int64_t> pr_start(g.H + 1, 0), pr_list(g.Hp);
  for (int64_t p = 0; p < g.Hp; ++p) ++pr_start[g.rows[p] + 1];
  for (int64_t r = 0; r < g.H; ++r) pr_start[r + 1] += pr_start[r];
  {
    std::vector<int64_t> fill(pr_start.begin(), pr_start.end() - 1);
    for (int64_t p = 0; p < g.Hp; ++p) pr_list[fill[g.rows[p]]++] = p;
  }
  const int64_t s = g.s;

  at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc_buf(C * g.KW), sbuf(C * g.Wo_r, T(0)), wbuf(g.K * g.Wo_r, T(0));
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
          for (int64_t c = 0; c < C; ++c) {
            std::copy_n(sp + s_off[n] + c * s_cs + y * s_rs, g.Wo, sbuf.data() + c * g.Wo_r);
          }
          for (int64_t tx = 0; tx < g.K; ++tx) {
            std::copy_n(wp + (n * g.K2 + ty * g.K + tx) * HoWo + y * g.Wo, g.Wo,
                        wbuf.data() + tx * g.Wo_r);
          }
          for (int64_t c = 0; c < C; ++c) {
            const T* srow = sbuf.data() + c * g.Wo_r;
            T* arow = acc_buf.data() + c * g.KW;
            for (int64_t tx = 0; tx < g.K; ++tx) {
              const T* wrow = wbuf.data() + tx * g.Wo_r;
              T* dst = arow + tx * g.dil;
              if (S == 1) {
#pragma GCC ivdep
                for (int64_t x = 0; x < g.Wo_r; ++x) dst[x] += wrow[x] * srow[x];
              } else {
                for (int64_t x = 0; x < g.Wo; ++x) dst[x * s] += wrow[x] * srow[x];
              }
            }
          }
        }
      }
      // Fold the padded columns back onto their source columns.
      T* grow = gp + n * C * HW + r * g.W;
      for (int64_t c = 0; c < C; ++c) {
        T* dst = grow + c * HW;
        const T* a = acc_buf.data() + c * g.KW;
        std::fill_n(dst, g.W, T(0));
        for (int64_t xp = 0; xp < g.Wp; ++xp) dst[g.cols[xp]] += factor * a[xp];
      }
    }
  });
}

std::vector<at::Tensor> local_attention_forward(at::Tensor q, at::Tensor k, at::Tensor v,
                                                at::Tensor q_pos, at::Tensor coord_x,
                                                at::Tensor coord_y, int64_t kernel,
                                                int64_t dilation, int64_t stride, double scale) {
  check_operands(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride);
  q = unit_last_stride(q);
  k = unit_last_stride(k);
  v = unit_last_stride(v);
  q_pos = unit_last_stride(q_pos);
  const Geometry g = make_geometry(q, k, v, kernel, dilation, stride);
  auto lead = q.sizes().slice(0, g.nlead).vec();
  auto out_shape = lead, attn_shape = lead;
  out_shape.insert(out_shape.end(), {g.Dv, g.Ho, g.Wo});
  attn_shape.insert(attn_shape.end(), {g.K2, g.Ho, g.Wo});
  auto out = at::empty(out_shape, q.options());
  auto attn = at::empty(attn_shape, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "acmix_local_attention_forward", [&] {
    if (stride == 1) {
      forward_impl<scalar_t, 1>(g, q, k, v, q_pos, coord_x, coord_y, scalar_t(scale), out, attn);
    } else {
      forward_impl<scalar_t, 0>(g, q, k, v, q_pos, coord_x, coord_y, scalar_t(scale), out, attn);
    }
  });
  return {out, attn};
}

// Returns (grad_q, grad_k, grad_v, grad_q_pos); a gradient not asked for is an empty tensor.
std::vector<at::Tensor> local_attention_backward(
    at::Tensor grad_out, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor q_pos,
    at::Tensor coord_x, at::Tensor coord_y, at::Tensor attn, int64_t kernel, int64_t dilation,
    int64_t stride, double scale, bool need_q, bool need_k, bool need_v, bool need_pos) {
  check_operands(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride);
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
  auto empty = at::empty({0}, q.options());
  auto grad_q = need_q ? at::empty(q.sizes(), q.options()) : empty;
  auto grad_k = need_k ? at::empty(k.sizes(), k.options()) : empty;
  auto grad_v = need_v ? at::empty(v.sizes(), v.options()) : empty;
  auto grad_pos = need_pos ? at::empty(q_pos.sizes(), q_pos.options()) : empty;
  if (!(need_q || need_k || need_v || need_pos)) return {grad_q, grad_k, grad_v, grad_pos};
  auto glog = at::empty(attn.sizes(), attn.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "acmix_local_attention_backward", [&] {
    const scalar_t sc = scalar_t(scale);
    const bool unit = stride == 1;
    if (need_q || need_k || need_pos) {
      if (unit) {
        backward_rows_impl<scalar_t, 1>(g, grad_out, k, v, attn, coord_x, coord_y, sc, need_q,
                                        need_pos, glog, grad_q, grad_pos);
      } else {
        backward_rows_impl<scalar_t, 0>(g, grad_out, k, v, attn, coord_x, coord_y, sc, need_q,
                                        need_pos, glog, grad_q, grad_pos);
      }
    }
    if (need_k) {
      if (unit) {
        backward_kv_impl<scalar_t, 1>(g, glog, q, sc, grad_k);
      } else {
        backward_kv_impl<scalar_t, 0>(g, glog, q, sc, grad_k);
      }
    }
    if (need_v) {
      if (unit) {
        backward_kv_impl<scalar_t, 1>(g, attn, grad_out, scalar_t(1), grad_v);
      } else {
        backward_kv_impl<scalar_t, 0>(g, attn, grad_out, scalar_t(1), grad_v);
      }
    }
  });
  return {grad_q, grad_k, grad_v, grad_pos};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &local_attention_forward,
        "local attention forward: (out (..., Dv, Ho, Wo), attn (..., K2, Ho, Wo))");
  m.def("backward", &local_attention_backward,
        "local attention backward: (grad_q, grad_k, grad_v, grad_q_pos); empty if not needed");
}
