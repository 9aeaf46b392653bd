// CUDA kernel of soft-NMS: one thread block per segment (an image, or one category of an image), found on the device
// without a host synchronisation (a block per slot; only the slot that starts a segment does work). The block runs
// ensemble-boxes' sequential algorithm (soft_nms_math.h): per step, a block-wide argmax with numpy's order over the
// remaining slots, a swap by thread 0, then every thread decays its share of the later scores. Steps stop once no
// remaining score can pass the threshold. Work is O(n^2) per segment with O(n) block barriers.
#include <algorithm>
#include <tuple>

#include "ops/cuda/cuda_utils.cuh"
#include "ops/soft_nms_math.h"
#include "ops/stable.h"

namespace fastdet {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

struct Params {
  double iou_threshold, sigma, score_threshold;
  int64_t method;
};

template <typename S>
__device__ void block_argmax(const S* score, int64_t from, int64_t n, const Params& p, int64_t* best_idx, S* best_val,
                             int* alive, int64_t& out_best, bool& out_alive) {
  int64_t best = -1;
  S value = S(0);
  int live = 0;
  for (int64_t j = from + threadIdx.x; j < n; j += blockDim.x) {
    if (best < 0 || soft_nms::ranks_before(score[j], j, value, best)) {
      best = j;
      value = score[j];
    }
    live |= soft_nms::can_still_pass(score[j], p.score_threshold, p.method);
  }
  best_idx[threadIdx.x] = best;
  best_val[threadIdx.x] = value;
  alive[threadIdx.x] = live;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const int64_t other = best_idx[threadIdx.x + stride];
      if (other >= 0 && (best_idx[threadIdx.x] < 0 ||
                         soft_nms::ranks_before(best_val[threadIdx.x + stride], other, best_val[threadIdx.x],
                                                best_idx[threadIdx.x]))) {
        best_idx[threadIdx.x] = other;
        best_val[threadIdx.x] = best_val[threadIdx.x + stride];
      }
      alive[threadIdx.x] |= alive[threadIdx.x + stride];
    }
    __syncthreads();
  }
  out_best = best_idx[0];
  out_alive = alive[0] != 0;
  __syncthreads();
}

template <typename S>
__global__ void soft_nms_kernel(double* __restrict__ work, S* __restrict__ score_all, int64_t* __restrict__ perm_all,
                                bool* __restrict__ kept_all, const int64_t* __restrict__ categories, int64_t B,
                                int64_t N, Params p) {
  __shared__ int64_t best_idx[kThreads];
  __shared__ S best_val[kThreads];
  __shared__ int alive[kThreads];
  __shared__ int64_t segment_end;
  for (int64_t start = blockIdx.x; start < B * N; start += gridDim.x) {
    const int64_t image = start / N, begin = start % N;
    const int64_t* cat = categories == nullptr ? nullptr : categories + image * N;
    if (begin != 0 && (cat == nullptr || cat[begin] == cat[begin - 1])) continue;  // not a segment start
    if (threadIdx.x == 0) {
      int64_t end = begin + 1;
      if (cat == nullptr) {
        end = N;
      } else {
        while (end < N && cat[end] == cat[begin]) ++end;
      }
      segment_end = end;
    }
    __syncthreads();
    const int64_t n = segment_end - begin;
    double* box = work + soft_nms::kFields * (image * N + begin);
    S* score = score_all + image * N + begin;
    int64_t* perm = perm_all + image * N + begin;
    bool* kept = kept_all + image * N + begin;
    int64_t best;
    bool live;
    block_argmax<S>(score, 1, n, p, best_idx, best_val, alive, best, live);
    int64_t stop = n;
    for (int64_t i = 0; i < n; ++i) {
      if (p.score_threshold >= 0.0 && !live && !soft_nms::can_still_pass(score[i], p.score_threshold, p.method)) {
        stop = i;
        break;
      }
      if (threadIdx.x == 0 && best >= 0 && score[i] < score[best]) {
        for (int f = 0; f < soft_nms::kFields; ++f) {
          const double t = box[soft_nms::kFields * i + f];
          box[soft_nms::kFields * i + f] = box[soft_nms::kFields * best + f];
          box[soft_nms::kFields * best + f] = t;
        }
        const S ts = score[i];
        score[i] = score[best];
        score[best] = ts;
        const int64_t tp = perm[i];
        perm[i] = perm[best];
        perm[best] = tp;
      }
      __syncthreads();
      const double* a = box + soft_nms::kFields * i;
      for (int64_t j = i + 1 + threadIdx.x; j < n; j += blockDim.x) {
        const double w = soft_nms::weight(soft_nms::iou(a, box + soft_nms::kFields * j), p.method, p.iou_threshold,
                                          p.sigma);
        if (w != 1.0) score[j] = static_cast<S>(w * static_cast<double>(score[j]));
      }
      __syncthreads();
      block_argmax<S>(score, i + 2, n, p, best_idx, best_val, alive, best, live);
    }
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      kept[i] = i < stop && static_cast<double>(score[i]) > p.score_threshold;
    }
    __syncthreads();
  }
}

__global__ void fill_workspace(const double* __restrict__ boxes, double* __restrict__ work, int64_t count) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < count;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double* b = boxes + 4 * k;
    double* w = work + soft_nms::kFields * k;
    w[0] = b[0];
    w[1] = b[1];
    w[2] = b[2];
    w[3] = b[3];
    w[4] = exact::mul_rn(exact::sub_rn(b[2], b[0]), exact::sub_rn(b[3], b[1]));
  }
}

std::tuple<Tensor, Tensor, Tensor> soft_nms_kernel_cuda(const Tensor& boxes, const Tensor& scores,
                                                        const std::optional<Tensor>& categories, double iou_threshold,
                                                        double sigma, double score_threshold, int64_t method) {
  const DeviceGuard device_guard(boxes.get_device_index());
  const int64_t B = boxes.size(0), N = boxes.size(1);
  auto work = aten::empty({B, N, soft_nms::kFields}, kDouble, boxes);
  auto out_scores = torch::stable::clone(scores);
  auto perm = aten::contiguous(aten::expand(aten::unsqueeze(aten::arange(N, boxes), 0), {B, N}));
  auto kept = aten::zeros({B, N}, kBool, boxes);
  if (B == 0 || N == 0) return {perm, out_scores, kept};
  const cudaStream_t stream = current_stream(boxes);
  const int64_t count = B * N;
  const auto fill_grid = static_cast<unsigned int>(std::min<int64_t>((count + kThreads - 1) / kThreads, kMaxBlocks));
  fill_workspace<<<fill_grid, kThreads, 0, stream>>>(boxes.const_data_ptr<double>(), work.mutable_data_ptr<double>(),
                                                     count);
  FASTDET_CUDA_LAUNCH_CHECK();
  const Params params{iou_threshold, sigma, score_threshold, method};
  const int64_t* cat = categories.has_value() ? categories->const_data_ptr<int64_t>() : nullptr;
  const auto grid = static_cast<unsigned int>(std::min<int64_t>(count, kMaxBlocks));
  FASTDET_DISPATCH_FLOAT_DOUBLE(scores.scalar_type(), "soft_nms", [&] {
    soft_nms_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(work.mutable_data_ptr<double>(),
                                                             out_scores.mutable_data_ptr<scalar_t>(),
                                                             perm.mutable_data_ptr<int64_t>(),
                                                             kept.mutable_data_ptr<bool>(), cat, B, N, params);
    FASTDET_CUDA_LAUNCH_CHECK();
  });
  return {perm, out_scores, kept};
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CUDA, m) {
  m.impl("_soft_nms_kernel", TORCH_BOX(&fastdet::soft_nms_kernel_cuda));
}
