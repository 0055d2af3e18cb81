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

}  // namespace acmix_mm
