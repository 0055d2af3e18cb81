// CPU kernel for ACMix's convolution ("shift") branch, forward and backward.
//
// The branch is a grouped, bias-free k x k convolution with zero padding (see
// acmix_mm.ops.cpp_shift): input x (B, G*Ci, H, W), weight (G*Co, Ci, K, K) (fc's and dep_conv's
// product kernel), output (B, G*Co, Ho, Wo) with Ho = ceil(H / s), padding pad = dil * (K / 2):
//   out[b, g*Co+o, y, x] = sum_{j, ty, tx} w[g*Co+o, j, ty, tx]
//                                          * x[b, g*Ci+j, y*s - pad + ty*dil, x*s - pad + tx*dil]
// In ACMix Ci = 3 * head and Co = head (12 -> 4 per group), a shape on which oneDNN's grouped
// convolution is slow: per output element it is only Ci * K * K multiply-adds, so the kernel is
// bound by memory traffic and loop overhead, not arithmetic.
//
// Layout: every inner loop runs over output x, unit stride, in registers. An input row is first
// copied into a zero-padded buffer split into its `s` column phases (phase r holds padded columns
// r, r + s, r + 2s, ...), so that the taps of a strided convolution also read contiguous memory
// and no loop needs a bounds check. Work is split so that each thread owns what it writes:
// forward over (batch, group, output row); backward over (batch, group) planes, each computing
// its plane's input gradient and its own partial weight gradient, summed afterwards in a fixed
// order (deterministic).
#include "shift_conv.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace acmix_mm {
namespace {

constexpr int64_t kBlock = 16;  // x lanes per register block (one AVX-512 / two AVX2 vectors)
// Weight-gradient rows summed in T before they go to the double total (accuracy vs. speed).
constexpr int64_t kRowsPerFlush = 8;

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Calls f(std::integral_constant<int, N>, first) for consecutive chunks [first, first + N) of
// [0, n), N = 4 except for the last chunk. Kernels keep N accumulators of kBlock lanes that
// share every loaded vector: that breaks the FMA latency chain and cuts loads N-fold.
template <typename F>
inline void in_chunks_of_4(int64_t n, F&& f) {
  int64_t first = 0;
  for (; first + 4 <= n; first += 4) f(std::integral_constant<int, 4>{}, first);
  switch (n - first) {
    case 3: f(std::integral_constant<int, 3>{}, first); break;
    case 2: f(std::integral_constant<int, 2>{}, first); break;
    case 1: f(std::integral_constant<int, 1>{}, first); break;
    default: break;
  }
}

struct ShiftGeometry {
  int64_t B, G, Ci, Co, H, W, Ho, Wo, K, K2, dil, s, pad;
  int64_t Wo_r;       // Wo rounded up to kBlock: blocks read (zero) lanes past the row's end
  int64_t phase_len;  // elements of one column phase of a padded input row
  int64_t gpad_len;   // elements of a padded grad_out row (stride-1 input gradient)
  // Batch strides of x and of its gradient: each image's (C, H, W) block is contiguous, but
  // x may be the first channels of a larger map (the fused ACMix op's projection).
  int64_t x_bs, gx_bs;
  // Element offset of group `grp` of image `b` in a map of batch stride bs.
  int64_t plane(int64_t bg, int64_t bs) const { return (bg / G) * bs + (bg % G) * Ci * H * W; }
};

ShiftGeometry make_geometry(const at::Tensor& x, const at::Tensor& weight, int64_t groups,
                            int64_t stride, int64_t dilation) {
  ShiftGeometry g;
  g.B = x.size(0);
  g.G = groups;
  g.Ci = x.size(1) / groups;
  g.Co = weight.size(0) / groups;
  g.H = x.size(2);
  g.W = x.size(3);
  g.K = weight.size(2);
  g.K2 = g.K * g.K;
  g.dil = dilation;
  g.s = stride;
  g.pad = dilation * (g.K / 2);
  g.Ho = (g.H + stride - 1) / stride;
  g.Wo = (g.W + stride - 1) / stride;
  g.Wo_r = round_up(g.Wo, kBlock);
  // Tap tx reads phase (tx*dil) % s from element (tx*dil) / s on, for Wo_r lanes; the map's
  // W columns (from padded column pad on) must fit as well.
  g.phase_len = std::max(g.Wo_r + ((g.K - 1) * g.dil) / g.s, (g.pad + g.W) / g.s + 1);
  g.gpad_len = round_up(g.W, kBlock) + 2 * g.pad;
  g.x_bs = x.stride(0);
  g.gx_bs = g.x_bs;
  return g;
}

void check_operands(const at::Tensor& x, const at::Tensor& weight, int64_t groups,
                    int64_t stride, int64_t dilation) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "acmix cpp shift conv runs on CPU tensors, got ", x.device(), " and ",
              weight.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble,
              "acmix cpp shift conv supports float32 and float64, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt, "acmix cpp shift conv: weight dtype ",
              weight.scalar_type(), " differs from the input's ", dt);
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "x must be (B, C, H, W) and weight "
              "(C_out, C_in / groups, K, K), got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && weight.size(0) % groups == 0 &&
                  weight.size(1) * groups == x.size(1),
              "acmix cpp shift conv: groups ", groups, " do not fit x ", x.sizes(),
              " and weight ", weight.sizes());
  TORCH_CHECK(weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              "acmix cpp shift conv: the kernel must be square and odd, got ", weight.sizes());
  TORCH_CHECK(stride >= 1 && dilation >= 1, "stride and dilation must be >= 1, got ", stride,
              " and ", dilation);
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "empty input map ", x.sizes());
}

// Copies input row `src` (W elements) into `phases` (s, phase_len): padded column c = xi + pad
// goes to phase c % s, element c / s. Everything else is zero.
template <typename T>
inline void split_row(const T* src, const ShiftGeometry& g, T* phases) {
  std::fill(phases, phases + g.s * g.phase_len, T(0));
  if (g.s == 1) {
    std::memcpy(phases + g.pad, src, sizeof(T) * g.W);
    return;
  }
  for (int64_t r = 0; r < g.s; ++r) {
    // phase r, element m holds input column m * s + r - pad
    const int64_t m0 = std::max<int64_t>(0, (g.pad - r + g.s - 1) / g.s);
    const int64_t last = g.W - 1 + g.pad - r;  // m * s of the last column inside the map
    if (last < 0) continue;
    const int64_t m1 = last / g.s;
    T* dst = phases + r * g.phase_len;
    for (int64_t m = m0; m <= m1; ++m) dst[m] = src[m * g.s + r - g.pad];
  }
}

// The Ci * K input rows that output row yo reads, split (zero rows outside the map):
// rows[(j * K + ty) * s * phase_len + ...].
template <typename T>
void split_window_rows(const T* xg, const ShiftGeometry& g, int64_t yo, T* rows) {
  const int64_t row_size = g.s * g.phase_len;
  for (int64_t j = 0; j < g.Ci; ++j) {
    for (int64_t ty = 0; ty < g.K; ++ty) {
      T* dst = rows + (j * g.K + ty) * row_size;
      const int64_t yi = yo * g.s - g.pad + ty * g.dil;
      if (yi < 0 || yi >= g.H) {
        std::fill(dst, dst + row_size, T(0));
      } else {
        split_row(xg + (j * g.H + yi) * g.W, g, dst);
      }
    }
  }
}

// Start of the elements that tap (j, ty, tx) reads for output column 0.
inline int64_t tap_offset(const ShiftGeometry& g, int64_t j, int64_t ty, int64_t tx) {
  const int64_t c = tx * g.dil;
  return (j * g.K + ty) * g.s * g.phase_len + (c % g.s) * g.phase_len + c / g.s;
}

// Forward: one task per output row of one group of one image. Each block of kBlock outputs
// accumulates its Ci * K * K taps in registers and is stored once.
template <typename T>
void forward_impl(const ShiftGeometry& g, const T* x, const T* w, T* out) {
  const int64_t taps = g.Ci * g.K2;
  std::vector<int64_t> offsets(taps);
  for (int64_t j = 0; j < g.Ci; ++j)
    for (int64_t ty = 0; ty < g.K; ++ty)
      for (int64_t tx = 0; tx < g.K; ++tx) offsets[(j * g.K + ty) * g.K + tx] = tap_offset(g, j, ty, tx);
  at::parallel_for(0, g.B * g.G * g.Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> rows(g.Ci * g.K * g.s * g.phase_len);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t yo = task % g.Ho, bg = task / g.Ho, grp = bg % g.G;
      split_window_rows(x + g.plane(bg, g.x_bs), g, yo, rows.data());
      in_chunks_of_4(g.Co, [&](auto chunk, int64_t o0) {
        constexpr int N = decltype(chunk)::value;
        // weights (o, j, ty, tx) of this group, taps in the order of `offsets`
        const T* wo = w + (grp * g.Co + o0) * taps;
        for (int64_t xb = 0; xb < g.Wo; xb += kBlock) {
          T acc[N][kBlock] = {};
          for (int64_t t = 0; t < taps; ++t) {
            const T* __restrict src = rows.data() + offsets[t] + xb;
            for (int n = 0; n < N; ++n) {
              const T wt = wo[n * taps + t];
#pragma omp simd
              for (int64_t l = 0; l < kBlock; ++l) acc[n][l] += wt * src[l];
            }
          }
          const int64_t m = std::min(kBlock, g.Wo - xb);
          for (int n = 0; n < N; ++n)
            std::memcpy(out + ((bg * g.Co + o0 + n) * g.Ho + yo) * g.Wo + xb, acc[n], sizeof(T) * m);
        }
      });
    }
  });
}

// Backward of one (image, group) plane: its input gradient rows and its weight gradient
// (added into `gw`, (Co, Ci, K, K), owned by this task).
template <typename T>
void backward_plane(const ShiftGeometry& g, const T* x, const T* w, const T* gout, int64_t bg,
                    bool need_x, bool need_w, T* gx, double* gw, const int64_t* offsets) {
  const int64_t grp = bg % g.G, taps = g.Ci * g.K2;
  const T* wg = w + grp * g.Co * taps;
  const T* go = gout + bg * g.Co * g.Ho * g.Wo;
  if (need_w) {
    std::vector<T> rows(g.Ci * g.K * g.s * g.phase_len);
    std::vector<T> grow(g.Co * g.Wo_r, T(0));  // grad_out rows, zero past Wo
    // Per weight, kBlock lane sums over up to kRowsPerFlush rows, then added to the double
    // total: one horizontal reduction per weight every few rows instead of every row.
    std::vector<T> lanes(g.Co * taps * kBlock, T(0));
    const T* xg = x + g.plane(bg, g.x_bs);
    for (int64_t yo = 0; yo < g.Ho; ++yo) {
      split_window_rows(xg, g, yo, rows.data());
      for (int64_t o = 0; o < g.Co; ++o)
        std::memcpy(grow.data() + o * g.Wo_r, go + (o * g.Ho + yo) * g.Wo, sizeof(T) * g.Wo);
      for (int64_t t = 0; t < taps; ++t) {
        const T* src = rows.data() + offsets[t];
        in_chunks_of_4(g.Co, [&](auto chunk, int64_t o0) {
          constexpr int N = decltype(chunk)::value;
          T acc[N][kBlock];
          for (int n = 0; n < N; ++n)
            std::memcpy(acc[n], lanes.data() + ((o0 + n) * taps + t) * kBlock, sizeof(acc[n]));
          // Zero-padded blocks: lanes past Wo multiply zeros of grow.
          for (int64_t xb = 0; xb < g.Wo_r; xb += kBlock) {
            const T* __restrict a = src + xb;
            for (int n = 0; n < N; ++n) {
              const T* __restrict gr = grow.data() + (o0 + n) * g.Wo_r + xb;
#pragma omp simd
              for (int64_t l = 0; l < kBlock; ++l) acc[n][l] += gr[l] * a[l];
            }
          }
          for (int n = 0; n < N; ++n)
            std::memcpy(lanes.data() + ((o0 + n) * taps + t) * kBlock, acc[n], sizeof(acc[n]));
        });
      }
      if ((yo + 1) % kRowsPerFlush == 0 || yo + 1 == g.Ho) {
        for (int64_t i = 0; i < g.Co * taps; ++i) {
          T* lane = lanes.data() + i * kBlock;
          T sum = 0;
          for (int64_t l = 0; l < kBlock; ++l) sum += lane[l];
          gw[i] += sum;
          std::fill(lane, lane + kBlock, T(0));
        }
      }
    }
  }
  if (!need_x) return;
  T* gxg = gx + g.plane(bg, g.gx_bs);
  if (g.s == 1) {
    // Gather form: gx[j, y, x] = sum_{o, ty, tx} w[o, j, ty, tx] * gout[o, y + pad - ty*dil,
    // x + pad - tx*dil]; grad_out rows are copied into zero-padded buffers (2*pad wider), so
    // gout[.., x + pad - tx*dil] = buffer[x + 2*pad - tx*dil] for every block lane.
    std::vector<T> gpad(g.Co * g.K * g.gpad_len);
    for (int64_t yi = 0; yi < g.H; ++yi) {
      std::fill(gpad.begin(), gpad.end(), T(0));
      for (int64_t ty = 0; ty < g.K; ++ty) {
        const int64_t yo = yi + g.pad - ty * g.dil;
        if (yo < 0 || yo >= g.Ho) continue;
        for (int64_t o = 0; o < g.Co; ++o)
          std::memcpy(gpad.data() + (o * g.K + ty) * g.gpad_len + g.pad,
                      go + (o * g.Ho + yo) * g.Wo, sizeof(T) * g.Wo);
      }
      in_chunks_of_4(g.Ci, [&](auto chunk, int64_t j0) {
        constexpr int N = decltype(chunk)::value;
        for (int64_t xb = 0; xb < g.W; xb += kBlock) {
          T acc[N][kBlock] = {};
          for (int64_t o = 0; o < g.Co; ++o) {
            for (int64_t ty = 0; ty < g.K; ++ty) {
              const T* base = gpad.data() + (o * g.K + ty) * g.gpad_len + xb + 2 * g.pad;
              const T* wrow = wg + (o * g.Ci + j0) * g.K2 + ty * g.K;
              for (int64_t tx = 0; tx < g.K; ++tx) {
                const T* __restrict src = base - tx * g.dil;
                for (int n = 0; n < N; ++n) {
                  const T wt = wrow[n * g.K2 + tx];
#pragma omp simd
                  for (int64_t l = 0; l < kBlock; ++l) acc[n][l] += wt * src[l];
                }
              }
            }
          }
          const int64_t m = std::min(kBlock, g.W - xb);
          for (int n = 0; n < N; ++n)
            std::memcpy(gxg + ((j0 + n) * g.H + yi) * g.W + xb, acc[n], sizeof(T) * m);
        }
      });
    }
    return;
  }
  // Strided: scatter each grad_out row into the padded input-gradient row, held in column
  // phases like the forward's input rows (row_acc (Ci, s, phase_len)).
  std::vector<T> row_acc(g.Ci * g.s * g.phase_len);
  for (int64_t yi = 0; yi < g.H; ++yi) {
    std::fill(row_acc.begin(), row_acc.end(), T(0));
    for (int64_t ty = 0; ty < g.K; ++ty) {
      const int64_t num = yi + g.pad - ty * g.dil;  // = yo * s
      if (num < 0 || num % g.s != 0) continue;
      const int64_t yo = num / g.s;
      if (yo >= g.Ho) continue;
      for (int64_t o = 0; o < g.Co; ++o) {
        const T* __restrict gr = go + (o * g.Ho + yo) * g.Wo;
        for (int64_t tx = 0; tx < g.K; ++tx) {
          const int64_t c = tx * g.dil;
          const int64_t off = (c % g.s) * g.phase_len + c / g.s;
          for (int64_t j = 0; j < g.Ci; ++j) {
            const T wt = wg[(o * g.Ci + j) * g.K2 + ty * g.K + tx];
            T* __restrict dst = row_acc.data() + j * g.s * g.phase_len + off;
            for (int64_t xo = 0; xo < g.Wo; ++xo) dst[xo] += wt * gr[xo];
          }
        }
      }
    }
    for (int64_t j = 0; j < g.Ci; ++j) {
      const T* ph = row_acc.data() + j * g.s * g.phase_len;
      T* dst = gxg + (j * g.H + yi) * g.W;
      for (int64_t r = 0; r < g.s; ++r) {
        const int64_t m0 = std::max<int64_t>(0, (g.pad - r + g.s - 1) / g.s);
        const int64_t last = g.W - 1 + g.pad - r;
        if (last < 0) continue;
        const int64_t m1 = last / g.s;
        const T* src = ph + r * g.phase_len;
        for (int64_t m = m0; m <= m1; ++m) dst[m * g.s + r - g.pad] = src[m];
      }
    }
  }
}

template <typename T>
void backward_impl(const ShiftGeometry& g, const T* x, const T* w, const T* gout, bool need_x,
                   bool need_w, T* gx, T* gw) {
  const int64_t wsize = g.Co * g.Ci * g.K2;  // per group
  std::vector<int64_t> offsets(g.Ci * g.K2);
  for (int64_t j = 0; j < g.Ci; ++j)
    for (int64_t ty = 0; ty < g.K; ++ty)
      for (int64_t tx = 0; tx < g.K; ++tx) offsets[(j * g.K + ty) * g.K + tx] = tap_offset(g, j, ty, tx);
  // One double partial per (image, group); each task owns its slot.
  std::vector<double> partial(need_w ? g.B * g.G * wsize : 0, 0.0);
  at::parallel_for(0, g.B * g.G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      backward_plane(g, x, w, gout, bg, need_x, need_w, gx,
                     need_w ? partial.data() + bg * wsize : nullptr, offsets.data());
    }
  });
  if (need_w) {
    for (int64_t grp = 0; grp < g.G; ++grp) {
      for (int64_t i = 0; i < wsize; ++i) {
        double sum = 0;
        for (int64_t b = 0; b < g.B; ++b) sum += partial[(b * g.G + grp) * wsize + i];
        gw[grp * wsize + i] = T(sum);
      }
    }
  }
}

// Whether each image's (C, H, W) block of x is contiguous (any batch stride): the layout the
// kernels index, where x may be the first channels of a larger map.
bool images_dense(const at::Tensor& x) {
  return x.size(0) >= 1 && x.select(0, 0).is_contiguous() &&
         (x.size(0) == 1 || x.stride(0) >= x.size(1) * x.size(2) * x.size(3));
}

// x itself if its images are dense, else a contiguous copy.
at::Tensor images_contiguous(const at::Tensor& x) { return images_dense(x) ? x : x.contiguous(); }

}  // namespace

at::Tensor shift_conv_forward(at::Tensor x, at::Tensor weight, int64_t groups, int64_t stride,
                              int64_t dilation) {
  check_operands(x, weight, groups, stride, dilation);
  x = images_contiguous(x);
  weight = weight.contiguous();
  const ShiftGeometry g = make_geometry(x, weight, groups, stride, dilation);
  auto out = at::empty({g.B, g.G * g.Co, g.Ho, g.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "acmix_shift_conv_forward", [&] {
    forward_impl<scalar_t>(g, x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>());
  });
  return out;
}

namespace {

// The backward with grad_x written into `gx` (undefined: not needed), a tensor of x's shape
// whose images are contiguous blocks (any batch stride). Returns grad_weight (empty if not
// needed).
at::Tensor backward_common(at::Tensor grad_out, at::Tensor x, at::Tensor weight, int64_t groups,
                           int64_t stride, int64_t dilation, at::Tensor gx, bool need_w) {
  check_operands(x, weight, groups, stride, dilation);
  x = images_contiguous(x);
  weight = weight.contiguous();
  ShiftGeometry g = make_geometry(x, weight, groups, stride, dilation);
  grad_out = grad_out.to(x.scalar_type()).contiguous();
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == g.B && grad_out.size(1) == g.G * g.Co &&
                  grad_out.size(2) == g.Ho && grad_out.size(3) == g.Wo,
              "grad_out has shape ", grad_out.sizes(), ", expected the output's (", g.B, ", ",
              g.G * g.Co, ", ", g.Ho, ", ", g.Wo, ")");
  const bool need_x = gx.defined();
  if (need_x) {
    TORCH_CHECK(gx.sizes() == x.sizes() && gx.scalar_type() == x.scalar_type() &&
                    images_dense(gx),
                "grad_x target must have x's shape ", x.sizes(), " and dtype, with contiguous "
                "images; got ", gx.sizes(), " strides ", gx.strides());
    g.gx_bs = gx.stride(0);
  }
  // Distinct (0,) tensor when not asked for: custom ops' outputs must not alias.
  auto gw = at::empty(need_w ? weight.sizes() : at::IntArrayRef{0}, weight.options());
  if (!(need_x || need_w)) return gw;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "acmix_shift_conv_backward", [&] {
    backward_impl<scalar_t>(g, x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                            grad_out.data_ptr<scalar_t>(), need_x, need_w,
                            need_x ? gx.data_ptr<scalar_t>() : nullptr,
                            need_w ? gw.data_ptr<scalar_t>() : nullptr);
  });
  return gw;
}

}  // namespace

std::vector<at::Tensor> shift_conv_backward(at::Tensor grad_out, at::Tensor x, at::Tensor weight,
                                            int64_t groups, int64_t stride, int64_t dilation,
                                            bool need_x, bool need_w) {
  auto gx = at::empty(need_x ? x.sizes() : at::IntArrayRef{0}, x.options());
  auto gw = backward_common(grad_out, x, weight, groups, stride, dilation,
                            need_x ? gx : at::Tensor(), need_w);
  return {gx, gw};
}

at::Tensor shift_conv_backward_into(at::Tensor grad_out, at::Tensor x, at::Tensor weight,
                                    int64_t groups, int64_t stride, int64_t dilation,
                                    at::Tensor grad_x, bool need_w) {
  return backward_common(grad_out, x, weight, groups, stride, dilation, grad_x, need_w);
}

}  // namespace acmix_mm
