#pragma once
// What a CUDA launcher needs from torch, through the stable ABI: the device guard, the current stream of the tensor's
// device, and the launch-error check; and the launch shape of the elementwise (grid-stride) kernels.
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

// Elementwise kernels: kBlockThreads threads per block, one item per thread, grid-stride loops beyond kMaxGridBlocks
// blocks (plenty to fill any current GPU). At least one block, so that a launch over no items is still valid.
constexpr int kBlockThreads = 256;
constexpr int64_t kMaxGridBlocks = int64_t(1) << 20;

inline unsigned int blocks_for(int64_t items) {
  const int64_t wanted = (items + kBlockThreads - 1) / kBlockThreads;
  return static_cast<unsigned int>(wanted < 1 ? 1 : (wanted > kMaxGridBlocks ? kMaxGridBlocks : wanted));
}

// Throws a RuntimeError with CUDA's message if the last launch failed.
#define FASTDET_CUDA_LAUNCH_CHECK() STD_CUDA_KERNEL_LAUNCH_CHECK()

}  // namespace fastdet
