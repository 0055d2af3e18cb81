// Python bindings of acmix_mm's CPU kernels, built as one extension by
// acmix_mm/ops/cpp_extension.py. The kernels' translation units include only ATen, so that
// the heavy pybind/torch headers are compiled once, here, in parallel with them.
#include <torch/extension.h>

#include "local_attention.h"
#include "shift_conv.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &acmix_mm::local_attention_forward,
        "local attention forward: (out (..., Dv, Ho, Wo), attn (..., K2, Ho, Wo))");
  m.def("backward", &acmix_mm::local_attention_backward,
        "local attention backward: (grad_q, grad_k, grad_v, grad_q_pos); empty if not needed");
  m.def("forward_add", &acmix_mm::local_attention_forward_add,
        "local attention forward adding alpha * out into a given tensor; keeps no weights");
  m.def("attention_weights", &acmix_mm::local_attention_weights,
        "the forward's attention weights alone (..., K2, Ho, Wo), recomputed bit for bit");
  m.def("backward_add", &acmix_mm::local_attention_backward_add,
        "backward of forward_add into given gradient views: sum(grad_out * out)");
  m.def("shift_conv_forward", &acmix_mm::shift_conv_forward,
        "ACMix conv branch forward: grouped K x K conv, zero padding dilation * (K / 2)");
  m.def("shift_conv_backward", &acmix_mm::shift_conv_backward,
        "ACMix conv branch backward: (grad_x, grad_weight); empty if not needed");
  m.def("shift_conv_backward_into", &acmix_mm::shift_conv_backward_into,
        "ACMix conv branch backward writing grad_x into a given tensor: grad_weight");
}
