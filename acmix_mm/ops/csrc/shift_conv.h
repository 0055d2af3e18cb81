// ACMix's convolution ("shift") branch on CPU (shift_conv.cpp); bound in extension.cpp.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace acmix_mm {

// Grouped, bias-free convolution with zero padding dilation * (K / 2): x (B, G*Ci, H, W),
// weight (G*Co, Ci, K, K) -> (B, G*Co, ceil(H / stride), ceil(W / stride)).
at::Tensor shift_conv_forward(at::Tensor x, at::Tensor weight, int64_t groups, int64_t stride,
                              int64_t dilation);

// (grad_x, grad_weight); a gradient not asked for is an empty tensor.
std::vector<at::Tensor> shift_conv_backward(at::Tensor grad_out, at::Tensor x, at::Tensor weight,
                                            int64_t groups, int64_t stride, int64_t dilation,
                                            bool need_x, bool need_w);

// The backward with grad_x written into `grad_x` (x's shape, each image a contiguous block, any
// batch stride; undefined if not needed). Returns grad_weight (empty if not needed).
at::Tensor shift_conv_backward_into(at::Tensor grad_out, at::Tensor x, at::Tensor weight,
                                    int64_t groups, int64_t stride, int64_t dilation,
                                    at::Tensor grad_x, bool need_w);

}  // namespace acmix_mm
