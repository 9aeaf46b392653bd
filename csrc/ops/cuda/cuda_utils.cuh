#pragma once
// What a CUDA launcher needs from torch, through the stable ABI: the device guard, the current stream of the tensor's
// device, and the launch-error check.
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>

#include "ops/stable.h"

namespace fastdet {

// RAII: makes t's device current for the launcher's scope.
using DeviceGuard = torch::stable::accelerator::DeviceGuard;

inline cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

// Throws a RuntimeError with CUDA's message if the last launch failed.
#define FASTDET_CUDA_LAUNCH_CHECK() STD_CUDA_KERNEL_LAUNCH_CHECK()

}  // namespace fastdet
