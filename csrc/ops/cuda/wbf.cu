// CUDA kernel of weighted boxes fusion and non-maximum weighted: one thread block per image, the same results as the
// CPU kernel (cpu/wbf.cpp documents the algorithms; wbf_math.h has the shared per-box and per-cluster math). In the
// block:
//  1. every thread prepares its share of the image's boxes (skip, order corners, clip, weight the score);
//  2. each kept box gets its rank in the visit order (labels by first appearance, then decreasing weighted score,
//     ties the later box first) by counting the boxes before it, O(K^2 / threads) per image;
//  3. the boxes are visited in that order: the threads score the current box against the label's clusters in
//     parallel, a block reduction picks the match (largest IoU, first of equals, NaN first), thread 0 fuses;
//  4. clusters are finished (WBF: scores rescaled by conf_type; NMW: weighted mean boxes) and written by decreasing
//     score, again ranked by counting.
// No host synchronisation; the workspace (entries, ranks, clusters) is one byte tensor per call.
#include <algorithm>
#include <tuple>

#include "ops/cuda/cuda_utils.cuh"
#include "ops/stable.h"
#include "ops/wbf_math.h"

namespace fastdet {
namespace {

using wbf::Cluster;
using wbf::Entry;
using wbf::Params;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

// Per image workspace, K = M * N slots each: entries by input position (valid[k] says whether slot k holds one),
// the first position of each entry's label, the visit order and the clusters; images 8-byte aligned.
__host__ __device__ inline int64_t workspace_bytes(int64_t K) {
  const int64_t bytes = K * static_cast<int64_t>(sizeof(Entry) + 2 * sizeof(int64_t) + sizeof(Cluster) + 1);
  return (bytes + 7) / 8 * 8;
}

struct Workspace {
  Entry* entries;
  int64_t* first;
  int64_t* order;
  Cluster* clusters;
  unsigned char* valid;
};

__device__ bool visits_earlier(const Workspace& w, int64_t a, int64_t b) {
  if (w.first[a] != w.first[b]) return w.first[a] < w.first[b];
  return wbf::visits_before(w.entries[a].score, a, w.entries[b].score, b);
}

__global__ void wbf_kernel(const double* __restrict__ boxes, const double* __restrict__ scores,
                           const int64_t* __restrict__ labels, const int64_t* __restrict__ counts,
                           const double* __restrict__ weights, int64_t B, int64_t M, int64_t N, Params p,
                           unsigned char* __restrict__ workspace, double* __restrict__ out_boxes,
                           double* __restrict__ out_scores, int64_t* __restrict__ out_labels,
                           int64_t* __restrict__ out_num) {
  __shared__ double red_iou[kThreads];
  __shared__ int64_t red_index[kThreads];
  __shared__ int64_t num_entries, num_clusters, group_first;
  const int64_t K = M * N;
  const int64_t per_image = workspace_bytes(K);
  for (int64_t image = blockIdx.x; image < B; image += gridDim.x) {
    unsigned char* base = workspace + per_image * image;
    Workspace w;
    w.entries = reinterpret_cast<Entry*>(base);
    w.first = reinterpret_cast<int64_t*>(w.entries + K);
    w.order = w.first + K;
    w.clusters = reinterpret_cast<Cluster*>(w.order + K);
    w.valid = reinterpret_cast<unsigned char*>(w.clusters + K);
    const double* bx = boxes + image * K * 4;
    const double* sc = scores + image * K;
    const int64_t* lb = labels + image * K;
    const int64_t* ct = counts + image * M;
    if (threadIdx.x == 0) {
      num_entries = 0;
      num_clusters = 0;
    }
    // 1. entries
    double weight_total, weight_max;
    wbf::weight_stats(weights, M, weight_total, weight_max);
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const int64_t m = k / N, j = k % N;
      const int64_t count = ct[m] < 0 ? 0 : (ct[m] > N ? N : ct[m]);
      w.valid[k] = j < count && wbf::make_entry(bx + 4 * k, sc[k], lb[k], m,
                                                wbf::model_weight(weights, m, weight_max, p), p.skip_box_threshold,
                                                w.entries[k]);
    }
    __syncthreads();
    // 2. label groups by first appearance, then ranks in the visit order
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      if (!w.valid[k]) continue;
      int64_t f = k;
      for (int64_t u = 0; u < k; ++u) {
        if (w.valid[u] && w.entries[u].label == w.entries[k].label) {
          f = u;
          break;
        }
      }
      w.first[k] = f;
    }
    __syncthreads();
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      if (!w.valid[k]) continue;
      int64_t rank = 0;
      for (int64_t u = 0; u < K; ++u) rank += w.valid[u] && visits_earlier(w, u, k);
      w.order[rank] = k;
      atomicAdd(reinterpret_cast<unsigned long long*>(&num_entries), 1ull);
    }
    __syncthreads();
    // 3. clustering, one box at a time
    const int64_t n = num_entries;
    for (int64_t r = 0; r < n; ++r) {
      const int64_t k = w.order[r];
      const Entry e = w.entries[k];
      if (threadIdx.x == 0 && (r == 0 || w.first[w.order[r - 1]] != w.first[k])) group_first = num_clusters;
      __syncthreads();
      const int64_t lo = group_first, hi = num_clusters;
      int64_t best = -1;
      double best_iou = 0;
      for (int64_t c = lo + threadIdx.x; c < hi; c += blockDim.x) {
        const double iou = wbf::iou_with(w.clusters[c].box, e);
        if (wbf::better_match(iou, c, best_iou, best)) {
          best = c;
          best_iou = iou;
        }
      }
      red_iou[threadIdx.x] = best_iou;
      red_index[threadIdx.x] = best;
      __syncthreads();
      for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride &&
            wbf::better_match(red_iou[threadIdx.x + stride], red_index[threadIdx.x + stride], red_iou[threadIdx.x],
                              red_index[threadIdx.x])) {
          red_iou[threadIdx.x] = red_iou[threadIdx.x + stride];
          red_index[threadIdx.x] = red_index[threadIdx.x + stride];
        }
        __syncthreads();
      }
      if (threadIdx.x == 0) {
        if (wbf::joins(red_index[0], red_iou[0], p.iou_threshold)) {
          wbf::add(w.clusters[red_index[0]], e, p);
        } else {
          w.clusters[num_clusters] = wbf::new_cluster(e);
          num_clusters = num_clusters + 1;
        }
      }
      __syncthreads();
    }
    // 4. finish, then write by decreasing score
    const int64_t C = num_clusters;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      wbf::finish(w.clusters[c], weights, M, weight_total, weight_max, p);
    }
    __syncthreads();
    double* ob = out_boxes + image * K * 4;
    double* os = out_scores + image * K;
    int64_t* ol = out_labels + image * K;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const double s = w.clusters[c].score;
      int64_t rank = 0;
      for (int64_t d = 0; d < C; ++d) rank += wbf::outputs_before(w.clusters[d].score, d, s, c);
      for (int j = 0; j < 4; ++j) ob[4 * rank + j] = w.clusters[c].box[j];
      os[rank] = s;
      ol[rank] = w.clusters[c].label;
    }
    if (threadIdx.x == 0) out_num[image] = C;
    __syncthreads();  // the shared counters are reset for the next image
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> wbf_kernel_cuda(const Tensor& boxes, const Tensor& scores,
                                                           const Tensor& labels, const Tensor& counts,
                                                           const Tensor& weights, double iou_threshold,
                                                           double skip_box_threshold, int64_t conf_type,
                                                           bool allows_overflow, int64_t method) {
  const DeviceGuard device_guard(boxes.get_device_index());
  const int64_t B = boxes.size(0), M = boxes.size(1), N = boxes.size(2);
  const int64_t K = M * N;
  auto out_boxes = aten::zeros({B, K, 4}, kDouble, boxes);
  auto out_scores = aten::zeros({B, K}, kDouble, boxes);
  auto out_labels = aten::full({B, K}, -1.0, kLong, boxes);
  auto num = aten::zeros({B}, kLong, boxes);
  if (B == 0 || K == 0) return {out_boxes, out_scores, out_labels, num};
  auto workspace = aten::empty({B * workspace_bytes(K) / 8}, kLong, boxes);  // 8-byte words
  const Params params{iou_threshold, skip_box_threshold, conf_type, allows_overflow, method};
  const cudaStream_t stream = current_stream(boxes);
  const auto grid = static_cast<unsigned int>(std::min<int64_t>(B, kMaxBlocks));
  wbf_kernel<<<grid, kThreads, 0, stream>>>(
      boxes.const_data_ptr<double>(), scores.const_data_ptr<double>(), labels.const_data_ptr<int64_t>(),
      counts.const_data_ptr<int64_t>(), weights.const_data_ptr<double>(), B, M, N, params,
      reinterpret_cast<unsigned char*>(workspace.mutable_data_ptr<int64_t>()), out_boxes.mutable_data_ptr<double>(),
      out_scores.mutable_data_ptr<double>(), out_labels.mutable_data_ptr<int64_t>(), num.mutable_data_ptr<int64_t>());
  FASTDET_CUDA_LAUNCH_CHECK();
  return {out_boxes, out_scores, out_labels, num};
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CUDA, m) {
  m.impl("_weighted_boxes_fusion_kernel", TORCH_BOX(&fastdet::wbf_kernel_cuda));
}
