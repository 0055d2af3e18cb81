// ACMix's sliding-window attention on CPU (local_attention.cpp); bound in extension.cpp.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace acmix_mm {

// (out (..., Dv, Ho, Wo), attention weights (..., kernel**2, Ho, Wo)).
std::vector<at::Tensor> local_attention_forward(at::Tensor q, at::Tensor k, at::Tensor v,
                                                at::Tensor q_pos, at::Tensor coord_x,
                                                at::Tensor coord_y, int64_t kernel,
                                                int64_t dilation, int64_t stride, double scale);

// (grad_q, grad_k, grad_v, grad_q_pos); a gradient not asked for is an empty tensor.
std::vector<at::Tensor> local_attention_backward(
    at::Tensor grad_out, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor q_pos,
    at::Tensor coord_x, at::Tensor coord_y, at::Tensor attn, int64_t kernel, int64_t dilation,
    int64_t stride, double scale, bool need_q, bool need_k, bool need_v, bool need_pos);

// Adds alpha * attention into `out` (contiguous, the output's shape) instead of returning it;
// keeps no attention weights (local_attention_weights recomputes them).
void local_attention_forward_add(at::Tensor q, at::Tensor k, at::Tensor v,
                                       at::Tensor q_pos, at::Tensor coord_x, at::Tensor coord_y,
                                       int64_t kernel, int64_t dilation, int64_t stride,
                                       double scale, at::Tensor out, double alpha);

// The attention weights (..., kernel**2, Ho, Wo) alone, exactly as the forward computes them.
at::Tensor local_attention_weights(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor q_pos,
                                   at::Tensor coord_x, at::Tensor coord_y, int64_t kernel,
                                   int64_t dilation, int64_t stride, double scale);

// The backward of out += gscale * attention: adds the q, k, v gradients into grad_q, grad_k,
// grad_v and writes q_pos's into grad_pos (views of any strides, k/v with unit column stride;
// undefined if not needed). Returns sum(grad_out * attention), gscale's gradient. With
// attn_scratch, attn (contiguous, the caller's own) is overwritten as a work buffer.
double local_attention_backward_add(at::Tensor grad_out, at::Tensor q, at::Tensor k,
                                    at::Tensor v, at::Tensor q_pos, at::Tensor coord_x,
                                    at::Tensor coord_y, at::Tensor attn, int64_t kernel,
                                    int64_t dilation, int64_t stride, double scale,
                                    double gscale, at::Tensor grad_q, at::Tensor grad_k,
                                    at::Tensor grad_v, at::Tensor grad_pos, bool attn_scratch);

}  // namespace acmix_mm
