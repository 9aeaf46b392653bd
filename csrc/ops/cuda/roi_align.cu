// CUDA kernels of roi_align and multi_scale_roi_align. A single-level call is a one-entry level table, so both ops
// share every kernel; the per-level feature pointers, shapes, strides and scales travel to the kernel by value, and a
// multi-scale call pools all levels in one launch with no host synchronisation.
//
// Forward: one thread per (RoI, bin, block of kChannels channels). The thread walks the bin's samples once and, for
// each sample, computes its two pixel rows/columns and four bilinear weights once and applies them to its kChannels
// channels (kept in registers), so the position and weight arithmetic is shared across channels. Features are read
// through their strides: for channels-last maps consecutive threads take consecutive channel blocks (the four corner
// reads of a warp are then contiguous runs), for NCHW maps consecutive threads take consecutive bins.
//
// Backward, two modes:
//   * default: the same thread layout scatters with atomicAdd into a float32 (float64) gradient buffer; fast, but the
//     order of additions, and therefore the rounding, varies from run to run.
//   * deterministic (the backward op's argument, torch.are_deterministic_algorithms_enabled() from fastdet.ops.roi):
//     a gather. One thread owns one row y of one (level, image, channel) gradient plane and visits the RoIs of that
//     image in index order, then bins, samples and corners in the CPU kernel's order, adding only the contributions
//     that land in its row. Nothing is shared between threads, so no atomics and no extra memory (torchvision's
//     deterministic fallback materialises per-sample gradients, ~30 GB for a 400x400 input); a RoI is skipped after
//     one bounding test when its samples cannot reach the row. Consecutive threads own consecutive channels of the
//     same row, so a warp follows one identical control path. Every element receives its contributions in the CPU
//     kernel's order, so results are bitwise reproducible across runs (they can differ from the CPU in the last bits
//     only through FMA contraction of the weight products).
//
// Invalid batch indices (outside [0, N)) and level indices cannot be reported without a host synchronisation here;
// such RoIs pool to 0 and pass no gradient (see fastdet.ops.roi.check_rois). All offsets are 64-bit.
#include <cstdint>
#include <optional>
#include <vector>

#include "ops/cuda/cuda_utils.cuh"
#include "ops/roi_align.h"
#include "ops/roi_align_math.h"

namespace fastdet {
namespace {

constexpr int kChannels = 8;  // channels per forward/backward thread

template <typename P>
struct LevelTable {
  P* data[roi::kMaxLevels];
  int64_t height[roi::kMaxLevels], width[roi::kMaxLevels];
  int64_t sn[roi::kMaxLevels], sc[roi::kMaxLevels], sh[roi::kMaxLevels], sw[roi::kMaxLevels];
  double scale[roi::kMaxLevels];
  int64_t row_begin[roi::kMaxLevels + 1];  // gather backward: first thread row of each level
  int count;
};

template <typename P>
LevelTable<P> make_table(const std::vector<Tensor>& maps, const std::vector<double>& scales,
                         std::vector<P*> pointers) {
  LevelTable<P> t{};
  t.count = static_cast<int>(maps.size());
  t.row_begin[0] = 0;
  for (int l = 0; l < t.count; ++l) {
    t.data[l] = pointers[l];
    t.height[l] = maps[l].size(2);
    t.width[l] = maps[l].size(3);
    t.sn[l] = maps[l].stride(0);
    t.sc[l] = maps[l].stride(1);
    t.sh[l] = maps[l].stride(2);
    t.sw[l] = maps[l].stride(3);
    t.scale[l] = scales[l];
    t.row_begin[l + 1] = t.row_begin[l] + maps[l].size(0) * maps[l].size(1) * maps[l].size(2);
  }
  return t;
}

// Decomposes a flat work index into (RoI, bin, channel block); see the file comment for the two orders.
struct Work {
  int64_t k, ph, pw, c0;
};

__device__ inline Work decompose(int64_t idx, int64_t PH, int64_t PW, int64_t cblocks, bool channels_inner) {
  const int64_t bins = PH * PW;
  int64_t bin, cb;
  if (channels_inner) {
    cb = idx % cblocks;
    bin = (idx / cblocks) % bins;
  } else {
    bin = idx % bins;
    cb = (idx / bins) % cblocks;
  }
  return {idx / (bins * cblocks), bin / PW, bin % PW, cb * kChannels};
}

template <typename scalar_t>
__global__ void align_forward_kernel(LevelTable<const scalar_t> lv, const opmath_t<scalar_t>* __restrict__ rois,
                                     const int64_t* __restrict__ levels, int64_t K, int64_t N, int64_t C, int64_t PH,
                                     int64_t PW, int64_t sampling_ratio, bool aligned, bool channels_inner,
                                     scalar_t* __restrict__ out, int64_t osn, int64_t osc, int64_t osh,
                                     int64_t osw) {
  using T = opmath_t<scalar_t>;
  const int64_t cblocks = (C + kChannels - 1) / kChannels;
  const int64_t total = K * PH * PW * cblocks;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Work w = decompose(idx, PH, PW, cblocks, channels_inner);
    const int nc = static_cast<int>(C - w.c0 < kChannels ? C - w.c0 : kChannels);
    const T* r = rois + w.k * 5;
    const int64_t n = roi::batch_index(r[0], N);
    const int64_t l = levels == nullptr ? 0 : levels[w.k];
    T acc[kChannels];
#pragma unroll
    for (int c = 0; c < kChannels; ++c) {
      acc[c] = T(0);
    }
    T count = T(1);
    if (n >= 0 && l >= 0 && l < lv.count) {
      const auto g = roi::align_geometry<T>(r + 1, static_cast<T>(lv.scale[l]), PH, PW, sampling_ratio, aligned);
      count = g.count;
      if (g.valid) {
        const int64_t H = lv.height[l], W = lv.width[l], sh = lv.sh[l], sw = lv.sw[l], sc = lv.sc[l];
        const scalar_t* base = lv.data[l] + n * lv.sn[l] + w.c0 * sc;
        int64_t y0, y1, x0, x1;
        roi::sample_range(g.start_h, g.bin_h, w.ph, g.grid_h, H, &y0, &y1);
        roi::sample_range(g.start_w, g.bin_w, w.pw, g.grid_w, W, &x0, &x1);
        for (int64_t iy = y0; iy < y1; ++iy) {
          const auto ys = roi::axis_sample(roi::sample_coord(g.start_h, g.bin_h, w.ph, iy, g.grid_h), H);
          if (!ys.valid) {
            continue;
          }
          for (int64_t ix = x0; ix < x1; ++ix) {
            const auto xs = roi::axis_sample(roi::sample_coord(g.start_w, g.bin_w, w.pw, ix, g.grid_w), W);
            if (!xs.valid) {
              continue;
            }
            const T w1 = ys.h * xs.h, w2 = ys.h * xs.l, w3 = ys.l * xs.h, w4 = ys.l * xs.l;
            const int64_t o1 = ys.low * sh + xs.low * sw, o2 = ys.low * sh + xs.high * sw;
            const int64_t o3 = ys.high * sh + xs.low * sw, o4 = ys.high * sh + xs.high * sw;
#pragma unroll
            for (int c = 0; c < kChannels; ++c) {
              if (c < nc) {
                const scalar_t* p = base + c * sc;
                acc[c] += w1 * static_cast<T>(p[o1]) + w2 * static_cast<T>(p[o2]) + w3 * static_cast<T>(p[o3]) +
                          w4 * static_cast<T>(p[o4]);
              }
            }
          }
        }
      }
    }
    scalar_t* o = out + w.k * osn + w.c0 * osc + w.ph * osh + w.pw * osw;
#pragma unroll
    for (int c = 0; c < kChannels; ++c) {
      if (c < nc) {
        o[c * osc] = static_cast<scalar_t>(acc[c] / count);
      }
    }
  }
}

// Non-deterministic backward: scatter with atomicAdd into the accumulation-dtype buffers.
template <typename scalar_t>
__global__ void align_backward_atomic_kernel(LevelTable<opmath_t<scalar_t>> gl,
                                             const opmath_t<scalar_t>* __restrict__ rois,
                                             const int64_t* __restrict__ levels, const scalar_t* __restrict__ grad,
                                             int64_t gsn, int64_t gsc, int64_t gsh, int64_t gsw, int64_t K, int64_t N,
                                             int64_t C, int64_t PH, int64_t PW, int64_t sampling_ratio, bool aligned,
                                             bool channels_inner) {
  using T = opmath_t<scalar_t>;
  const int64_t cblocks = (C + kChannels - 1) / kChannels;
  const int64_t total = K * PH * PW * cblocks;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Work w = decompose(idx, PH, PW, cblocks, channels_inner);
    const int nc = static_cast<int>(C - w.c0 < kChannels ? C - w.c0 : kChannels);
    const T* r = rois + w.k * 5;
    const int64_t n = roi::batch_index(r[0], N);
    const int64_t l = levels == nullptr ? 0 : levels[w.k];
    if (n < 0 || l < 0 || l >= gl.count) {
      continue;
    }
    const auto g = roi::align_geometry<T>(r + 1, static_cast<T>(gl.scale[l]), PH, PW, sampling_ratio, aligned);
    if (!g.valid) {
      continue;
    }
    T gv[kChannels];
    const scalar_t* gk = grad + w.k * gsn + w.c0 * gsc + w.ph * gsh + w.pw * gsw;
#pragma unroll
    for (int c = 0; c < kChannels; ++c) {
      gv[c] = c < nc ? static_cast<T>(gk[c * gsc]) : T(0);
    }
    const int64_t H = gl.height[l], W = gl.width[l], sh = gl.sh[l], sw = gl.sw[l], sc = gl.sc[l];
    T* base = gl.data[l] + n * gl.sn[l] + w.c0 * sc;
    int64_t y0, y1, x0, x1;
    roi::sample_range(g.start_h, g.bin_h, w.ph, g.grid_h, H, &y0, &y1);
    roi::sample_range(g.start_w, g.bin_w, w.pw, g.grid_w, W, &x0, &x1);
    for (int64_t iy = y0; iy < y1; ++iy) {
      const auto ys = roi::axis_sample(roi::sample_coord(g.start_h, g.bin_h, w.ph, iy, g.grid_h), H);
      if (!ys.valid) {
        continue;
      }
      for (int64_t ix = x0; ix < x1; ++ix) {
        const auto xs = roi::axis_sample(roi::sample_coord(g.start_w, g.bin_w, w.pw, ix, g.grid_w), W);
        if (!xs.valid) {
          continue;
        }
        const T w1 = ys.h * xs.h, w2 = ys.h * xs.l, w3 = ys.l * xs.h, w4 = ys.l * xs.l;
        const int64_t o1 = ys.low * sh + xs.low * sw, o2 = ys.low * sh + xs.high * sw;
        const int64_t o3 = ys.high * sh + xs.low * sw, o4 = ys.high * sh + xs.high * sw;
#pragma unroll
        for (int c = 0; c < kChannels; ++c) {
          if (c < nc) {
            T* p = base + c * sc;
            atomicAdd(p + o1, gv[c] * w1 / g.count);
            atomicAdd(p + o2, gv[c] * w2 / g.count);
            atomicAdd(p + o3, gv[c] * w3 / g.count);
            atomicAdd(p + o4, gv[c] * w4 / g.count);
          }
        }
      }
    }
  }
}

// Deterministic backward: one thread per gradient row (level, image n, channel c, row y), channels fastest.
template <typename scalar_t>
__global__ void align_backward_gather_kernel(LevelTable<opmath_t<scalar_t>> gl,
                                             const opmath_t<scalar_t>* __restrict__ rois,
                                             const int64_t* __restrict__ levels, const scalar_t* __restrict__ grad,
                                             int64_t gsn, int64_t gsc, int64_t gsh, int64_t gsw, int64_t K, int64_t N,
                                             int64_t C, int64_t PH, int64_t PW, int64_t sampling_ratio,
                                             bool aligned) {
  using T = opmath_t<scalar_t>;
  const int64_t total = gl.row_begin[gl.count];
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int l = 0;
    while (l + 1 < gl.count && idx >= gl.row_begin[l + 1]) {
      ++l;
    }
    const int64_t H = gl.height[l], W = gl.width[l];
    const int64_t local = idx - gl.row_begin[l];
    const int64_t c = local % C;
    const int64_t y = (local / C) % H;
    const int64_t n = local / (C * H);
    const T ty = static_cast<T>(y);
    T* row = gl.data[l] + n * gl.sn[l] + c * gl.sc[l] + y * gl.sh[l];
    const int64_t sw = gl.sw[l];
    for (int64_t k = 0; k < K; ++k) {
      const T* r = rois + k * 5;
      if (roi::batch_index(r[0], N) != n || (levels == nullptr ? 0 : levels[k]) != l) {
        continue;
      }
      const auto g = roi::align_geometry<T>(r + 1, static_cast<T>(gl.scale[l]), PH, PW, sampling_ratio, aligned);
      if (!g.valid) {
        continue;
      }
      // Samples of this RoI lie between its first and last bin edge (up to rounding); clamping moves them into
      // [0, H - 1] and each touches rows floor(y) and floor(y) + 1. A 2-pixel (plus relative) margin keeps the test
      // conservative, so skipping never drops a contribution.
      const T a = g.start_h, b = g.start_h + static_cast<T>(PH) * g.bin_h;
      const T lo = a < b ? a : b, hi = a < b ? b : a;
      const T slack = T(2) + (::fabs(a) + ::fabs(b)) * T(1e-5);
      if (ty < lo - slack || ty > hi + slack) {
        continue;
      }
      for (int64_t ph = 0; ph < PH; ++ph) {
        int64_t y0, y1;
        roi::sample_range(g.start_h, g.bin_h, ph, g.grid_h, H, &y0, &y1);
        bool touches = false;  // does any sample of bin row ph reach row y? (skips PW bins at once otherwise)
        for (int64_t iy = y0; iy < y1 && !touches; ++iy) {
          const auto ys = roi::axis_sample(roi::sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h), H);
          touches = ys.valid && (ys.low == y || ys.high == y);
        }
        if (!touches) {
          continue;
        }
        for (int64_t pw = 0; pw < PW; ++pw) {
          const T gv = static_cast<T>(grad[k * gsn + c * gsc + ph * gsh + pw * gsw]);
          int64_t x0, x1;
          roi::sample_range(g.start_w, g.bin_w, pw, g.grid_w, W, &x0, &x1);
          for (int64_t iy = y0; iy < y1; ++iy) {
            const auto ys = roi::axis_sample(roi::sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h), H);
            if (!ys.valid || (ys.low != y && ys.high != y)) {
              continue;
            }
            for (int64_t ix = x0; ix < x1; ++ix) {
              const auto xs = roi::axis_sample(roi::sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w), W);
              if (!xs.valid) {
                continue;
              }
              const T w1 = ys.h * xs.h, w2 = ys.h * xs.l, w3 = ys.l * xs.h, w4 = ys.l * xs.l;
              // Corner order 1..4 as in the CPU kernel, restricted to this row.
              if (ys.low == y) {
                row[xs.low * sw] += gv * w1 / g.count;
                row[xs.high * sw] += gv * w2 / g.count;
              }
              if (ys.high == y) {
                row[xs.low * sw] += gv * w3 / g.count;
                row[xs.high * sw] += gv * w4 / g.count;
              }
            }
          }
        }
      }
    }
  }
}

// _roi_align_kernel: features share N, C, dtype and device; rois are contiguous in the accumulation dtype; levels
// (None for a single level) is contiguous int64.
Tensor roi_align_kernel(const std::vector<Tensor>& features, const Tensor& rois, const std::optional<Tensor>& levels,
                        const std::vector<double>& scales, int64_t PH, int64_t PW, int64_t sampling_ratio,
                        bool aligned, bool channels_last) {
  const Tensor& f0 = features[0];
  const DeviceGuard device_guard(f0.get_device_index());
  const cudaStream_t stream = current_stream(f0);
  const int64_t K = rois.size(0), N = f0.size(0), C = f0.size(1);
  auto out = roi_empty({K, C, PH, PW}, f0.scalar_type(), f0, channels_last);
  if (out.numel() == 0) {
    return out;
  }
  const int64_t work = K * PH * PW * ((C + kChannels - 1) / kChannels);
  FASTDET_DISPATCH_FLOATING(f0.scalar_type(), "roi_align_cuda", [&] {
    using T = opmath_t<scalar_t>;
    std::vector<const scalar_t*> ptrs;
    for (const auto& f : features) {
      ptrs.push_back(f.const_data_ptr<scalar_t>());
    }
    const auto table = make_table<const scalar_t>(features, scales, ptrs);
    align_forward_kernel<scalar_t><<<blocks_for(work), kBlockThreads, 0, stream>>>(
        table, rois.const_data_ptr<T>(), levels.has_value() ? levels->const_data_ptr<int64_t>() : nullptr, K, N, C,
        PH, PW, sampling_ratio, aligned, channels_last, out.mutable_data_ptr<scalar_t>(), out.stride(0),
        out.stride(1), out.stride(2), out.stride(3));
    FASTDET_CUDA_LAUNCH_CHECK();
  });
  return out;
}

// _roi_align_backward_kernel: one zero-initialised accumulation-dtype gradient per level; deterministic selects the
// gather kernel.
std::vector<Tensor> roi_align_backward_kernel(const Tensor& grad, const Tensor& rois,
                                              const std::optional<Tensor>& levels, const std::vector<double>& scales,
                                              int64_t PH, int64_t PW, int64_t N, int64_t C,
                                              const std::vector<int64_t>& heights, const std::vector<int64_t>& widths,
                                              int64_t sampling_ratio, bool aligned, bool channels_last,
                                              bool deterministic) {
  const DeviceGuard device_guard(grad.get_device_index());
  const cudaStream_t stream = current_stream(grad);
  const auto acc = accumulation_type(grad.scalar_type());
  const int64_t K = rois.size(0);
  const int64_t L = static_cast<int64_t>(heights.size());
  std::vector<Tensor> bufs;
  for (int64_t l = 0; l < L; ++l) {
    bufs.push_back(roi_zeros({N, C, heights[l], widths[l]}, acc, grad, channels_last));
  }
  if (K > 0 && C > 0 && N > 0) {
    FASTDET_DISPATCH_FLOATING(grad.scalar_type(), "roi_align_backward_cuda", [&] {
      using T = opmath_t<scalar_t>;
      std::vector<T*> ptrs;
      for (auto& b : bufs) {
        ptrs.push_back(b.mutable_data_ptr<T>());
      }
      const auto table = make_table<T>(bufs, scales, ptrs);
      const int64_t* lv = levels.has_value() ? levels->const_data_ptr<int64_t>() : nullptr;
      if (deterministic) {
        const int64_t work = table.row_begin[L];
        if (work > 0) {
          align_backward_gather_kernel<scalar_t><<<blocks_for(work), kBlockThreads, 0, stream>>>(
              table, rois.const_data_ptr<T>(), lv, grad.const_data_ptr<scalar_t>(), grad.stride(0), grad.stride(1),
              grad.stride(2), grad.stride(3), K, N, C, PH, PW, sampling_ratio, aligned);
          FASTDET_CUDA_LAUNCH_CHECK();
        }
      } else {
        const int64_t work = K * PH * PW * ((C + kChannels - 1) / kChannels);
        align_backward_atomic_kernel<scalar_t><<<blocks_for(work), kBlockThreads, 0, stream>>>(
            table, rois.const_data_ptr<T>(), lv, grad.const_data_ptr<scalar_t>(), grad.stride(0), grad.stride(1),
            grad.stride(2), grad.stride(3), K, N, C, PH, PW, sampling_ratio, aligned, channels_last);
        FASTDET_CUDA_LAUNCH_CHECK();
      }
    });
  }
  return bufs;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CUDA, m) {
  m.impl("_roi_align_kernel", TORCH_BOX(&fastdet::roi_align_kernel));
  m.impl("_roi_align_backward_kernel", TORCH_BOX(&fastdet::roi_align_backward_kernel));
}
