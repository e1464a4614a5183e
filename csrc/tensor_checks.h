// Tensor argument checks (CHECK_DEVICE / CHECK_SHAPE style) that raise ValueError with a message
// naming the argument and what was wrong, and the mapping from engine device names to torch devices.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "common.h"

namespace tetri {

inline std::string describe(const at::Tensor& t) {
  return str_cat(t.sizes(), " ", t.scalar_type(), " on ", t.device());
}

// The torch device behind an engine device name; refuses CUDA devices a CPU-only torch cannot use.
at::Device torch_device(const DeviceName& dev);

inline void check_defined(const at::Tensor& t, const std::string& what) {
  TETRI_CHECK_ARG(t.defined(), what, " is None / an undefined tensor");
}

inline void check_same_layout(const at::Tensor& t, const at::Tensor& ref, const std::string& what,
                              const std::string& ref_what) {
  TETRI_CHECK_ARG(t.sizes() == ref.sizes() && t.scalar_type() == ref.scalar_type(), what, " is ",
                  describe(t), " but ", ref_what, " is ", describe(ref),
                  ": they must have the same shape and dtype");
}

}  // namespace tetri
