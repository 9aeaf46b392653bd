// CPU kernels of roi_align and multi_scale_roi_align (one implementation; a single-level call is a one-level table).
//
// Forward: one task per (RoI, block of channels), block by block for planar maps (roi_cpu::task_roi). A task first
// tabulates the bilinear samples of its RoI separably: for every bin row ph the valid y-samples (row offsets and
// weights), for every bin column pw the valid x-samples. A sample of bin (ph, pw) is one y entry times one x entry, so
// the tables cost O(PH * grid_h + PW * grid_w) and are computed once per task, never per channel. Planar (NCHW) maps
// then get the RoI's full sample list (offsets and weights, as torchvision precomputes it) and are swept one channel
// plane at a time; channels-last maps (and RoIs with huge sample counts) use the tables directly with the channel loop
// innermost, a contiguous sweep for channels-last. Either way each channel sums its samples in torchvision's order, so
// float32/float64 results are bitwise torchvision's.
//
// Backward: one task per (image, block of channels). A task visits the RoIs of its image in index order and scatters
// into the gradient planes of its own channels only, so no two threads ever write the same element, no atomics are
// needed, and every gradient element receives its contributions in one fixed order (RoI, bin, sample, corner) -- the
// order of torchvision's sequential CPU loop. The result is deterministic for any thread count.
#include <algorithm>
#include <optional>
#include <vector>

#include "ops/cpu/roi_tasks.h"
#include "ops/roi_align.h"
#include "ops/roi_align_math.h"
#include "ops/cpu/roi_axis_table.h"

namespace fastdet {
namespace {

using roi_cpu::batch_indices;
using roi_cpu::grain_for;

constexpr int64_t kForwardBlock = 32;   // channels per forward task
constexpr int64_t kBackwardBlock = 16;  // channels per backward task

struct Strides {
  int64_t n, c, h, w;
};

Strides strides_of(const Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename P>
struct Level {
  P* data;
  int64_t height, width;
  Strides s;
  double scale;
};

// One bilinear sample with its four pixel offsets and weights (the layout torchvision precomputes per RoI).
template <typename T>
struct Sample {
  int64_t o1, o2, o3, o4;
  T w1, w2, w3, w4;
};

// Lists every sample of a RoI, bin by bin in (iy, ix) order; false when the list would exceed kMaxListedSamples
// (huge adaptive grids), in which case the caller uses the table-driven loop that needs no list.
constexpr int64_t kMaxListedSamples = int64_t(1) << 16;

template <typename T>
bool planar_samples(const roi::AxisTable<T>& ytab, const roi::AxisTable<T>& xtab, int64_t PH, int64_t PW,
                    std::vector<Sample<T>>& samples, std::vector<int64_t>& bin_begin) {
  int64_t total = 0;
  for (int64_t ph = 0; ph < PH; ++ph) {
    for (int64_t pw = 0; pw < PW; ++pw) {
      total += (ytab.begin[ph + 1] - ytab.begin[ph]) * (xtab.begin[pw + 1] - xtab.begin[pw]);
    }
  }
  if (total > kMaxListedSamples) {
    return false;
  }
  samples.clear();
  bin_begin.assign(PH * PW + 1, 0);
  for (int64_t ph = 0; ph < PH; ++ph) {
    for (int64_t pw = 0; pw < PW; ++pw) {
      bin_begin[ph * PW + pw] = static_cast<int64_t>(samples.size());
      for (int64_t iy = ytab.begin[ph]; iy < ytab.begin[ph + 1]; ++iy) {
        const auto& ey = ytab.entries[iy];
        for (int64_t ix = xtab.begin[pw]; ix < xtab.begin[pw + 1]; ++ix) {
          const auto& ex = xtab.entries[ix];
          samples.push_back({ey.off_low + ex.off_low, ey.off_low + ex.off_high, ey.off_high + ex.off_low,
                             ey.off_high + ex.off_high, ey.h * ex.h, ey.h * ex.l, ey.l * ex.h, ey.l * ex.l});
        }
      }
    }
  }
  bin_begin[PH * PW] = static_cast<int64_t>(samples.size());
  return true;
}

std::vector<int64_t> level_indices(const std::optional<Tensor>& levels, int64_t K, int64_t L) {
  std::vector<int64_t> out(K, 0);
  if (levels.has_value()) {
    const auto* lv = levels->const_data_ptr<int64_t>();
    for (int64_t k = 0; k < K; ++k) {
      out[k] = lv[k] >= 0 && lv[k] < L ? lv[k] : -1;
    }
  }
  return out;
}

template <typename scalar_t>
void align_forward_kernel(const std::vector<Level<const scalar_t>>& levels, const Tensor& rois,
                          const std::vector<int64_t>& batch, const std::vector<int64_t>& level_of, int64_t C,
                          int64_t PH, int64_t PW, int64_t sampling_ratio, bool aligned, scalar_t* out,
                          Strides os) {
  using T = opmath_t<scalar_t>;
  const T* rois_ptr = rois.const_data_ptr<T>();
  const int64_t K = rois.size(0);
  const int64_t blocks = (C + kForwardBlock - 1) / kForwardBlock;
  const bool planar = !levels.empty() && levels[0].s.c != 1;  // every level has the input's memory format
  parallel_for(0, K * blocks, grain_for(kForwardBlock * PH * PW), [&](int64_t begin, int64_t end) {
    roi::AxisTable<T> ytab, xtab;
    std::vector<Sample<T>> samples;
    std::vector<int64_t> bin_begin;
    T acc[kForwardBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = roi_cpu::task_roi(item, K, blocks, planar);
      const int64_t c0 = roi_cpu::task_block(item, K, blocks, planar) * kForwardBlock;
      const int64_t nc = std::min(kForwardBlock, C - c0);
      const bool known = batch[k] >= 0 && level_of[k] >= 0;  // else pooled to 0, as a non-finite box
      const auto& lv = levels[known ? level_of[k] : 0];
      auto g = roi::align_geometry<T>(rois_ptr + k * 5 + 1, static_cast<T>(lv.scale), PH, PW, sampling_ratio,
                                      aligned);
      if (!known) {
        g.valid = false;
        g.count = T(1);
      }
      scalar_t* out_k = out + k * os.n + c0 * os.c;
      if (g.valid) {
        ytab.build(g.start_h, g.bin_h, PH, g.grid_h, lv.height, lv.s.h);
        xtab.build(g.start_w, g.bin_w, PW, g.grid_w, lv.width, lv.s.w);
      }
      const scalar_t* base = lv.data + (known ? batch[k] : 0) * lv.s.n + c0 * lv.s.c;
      const int64_t sc = lv.s.c;
      if (g.valid && sc != 1 && planar_samples(ytab, xtab, PH, PW, samples, bin_begin)) {
        // Planar (NCHW-like) layout: the RoI's samples are listed once, then each channel plane is swept bin by bin
        // with the list, so consecutive reads stay inside one plane.
        for (int64_t c = 0; c < nc; ++c) {
          const scalar_t* p = base + c * sc;
          for (int64_t bin = 0; bin < PH * PW; ++bin) {
            T sum = T(0);
            for (int64_t j = bin_begin[bin]; j < bin_begin[bin + 1]; ++j) {
              const auto& e = samples[j];
              sum += e.w1 * static_cast<T>(p[e.o1]) + e.w2 * static_cast<T>(p[e.o2]) +
                     e.w3 * static_cast<T>(p[e.o3]) + e.w4 * static_cast<T>(p[e.o4]);
            }
            out_k[c * os.c + (bin / PW) * os.h + (bin % PW) * os.w] = static_cast<scalar_t>(sum / g.count);
          }
        }
        continue;
      }
      for (int64_t ph = 0; ph < PH; ++ph) {
        for (int64_t pw = 0; pw < PW; ++pw) {
          for (int64_t c = 0; c < nc; ++c) {
            acc[c] = T(0);
          }
          if (g.valid) {
            for (int64_t iy = ytab.begin[ph]; iy < ytab.begin[ph + 1]; ++iy) {
              const auto& ey = ytab.entries[iy];
              for (int64_t ix = xtab.begin[pw]; ix < xtab.begin[pw + 1]; ++ix) {
                const auto& ex = xtab.entries[ix];
                const T w1 = ey.h * ex.h, w2 = ey.h * ex.l, w3 = ey.l * ex.h, w4 = ey.l * ex.l;
                const int64_t o1 = ey.off_low + ex.off_low, o2 = ey.off_low + ex.off_high;
                const int64_t o3 = ey.off_high + ex.off_low, o4 = ey.off_high + ex.off_high;
                const scalar_t* p = base;
                for (int64_t c = 0; c < nc; ++c, p += sc) {
                  acc[c] += w1 * static_cast<T>(p[o1]) + w2 * static_cast<T>(p[o2]) + w3 * static_cast<T>(p[o3]) +
                            w4 * static_cast<T>(p[o4]);
                }
              }
            }
          }
          scalar_t* o = out_k + ph * os.h + pw * os.w;
          for (int64_t c = 0; c < nc; ++c) {
            o[c * os.c] = static_cast<scalar_t>(acc[c] / g.count);
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void align_backward_kernel(const std::vector<Level<opmath_t<scalar_t>>>& grads, const Tensor& grad,
                           const Tensor& rois, const std::vector<int64_t>& batch,
                           const std::vector<int64_t>& level_of, int64_t N, int64_t C, int64_t PH, int64_t PW,
                           int64_t sampling_ratio, bool aligned) {
  using T = opmath_t<scalar_t>;
  const T* rois_ptr = rois.const_data_ptr<T>();
  const scalar_t* grad_ptr = grad.const_data_ptr<scalar_t>();
  const Strides gs = strides_of(grad);
  const int64_t K = rois.size(0);
  // RoIs of each image, in index order; RoIs with an invalid batch index or level pass no gradient and are left out.
  std::vector<int64_t> usable(batch);
  for (int64_t k = 0; k < K; ++k) {
    if (level_of[k] < 0) usable[k] = -1;
  }
  const roi_cpu::RoisByImage groups = roi_cpu::rois_by_image(usable, N);
  const std::vector<int64_t>& first = groups.first;
  const std::vector<int64_t>& order = groups.order;
  const int64_t blocks = (C + kBackwardBlock - 1) / kBackwardBlock;
  const int64_t rois_per_image = (K + N - 1) / std::max<int64_t>(N, 1);
  parallel_for(0, N * blocks, grain_for(rois_per_image * kBackwardBlock * PH * PW),
                   [&](int64_t begin, int64_t end) {
    roi::AxisTable<T> ytab, xtab;
    T gv[kBackwardBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks;
      const int64_t c0 = (item % blocks) * kBackwardBlock;
      const int64_t nc = std::min(kBackwardBlock, C - c0);
      for (int64_t j = first[n]; j < first[n + 1]; ++j) {
        const int64_t k = order[j];
        const auto& lv = grads[level_of[k]];
        const auto g = roi::align_geometry<T>(rois_ptr + k * 5 + 1, static_cast<T>(lv.scale), PH, PW,
                                              sampling_ratio, aligned);
        if (!g.valid) {
          continue;
        }
        ytab.build(g.start_h, g.bin_h, PH, g.grid_h, lv.height, lv.s.h);
        xtab.build(g.start_w, g.bin_w, PW, g.grid_w, lv.width, lv.s.w);
        T* base = lv.data + n * lv.s.n + c0 * lv.s.c;
        const int64_t sc = lv.s.c;
        for (int64_t ph = 0; ph < PH; ++ph) {
          for (int64_t pw = 0; pw < PW; ++pw) {
            const scalar_t* gk = grad_ptr + k * gs.n + c0 * gs.c + ph * gs.h + pw * gs.w;
            for (int64_t c = 0; c < nc; ++c) {
              gv[c] = static_cast<T>(gk[c * gs.c]);
            }
            for (int64_t iy = ytab.begin[ph]; iy < ytab.begin[ph + 1]; ++iy) {
              const auto& ey = ytab.entries[iy];
              for (int64_t ix = xtab.begin[pw]; ix < xtab.begin[pw + 1]; ++ix) {
                const auto& ex = xtab.entries[ix];
                const T w1 = ey.h * ex.h, w2 = ey.h * ex.l, w3 = ey.l * ex.h, w4 = ey.l * ex.l;
                const int64_t o1 = ey.off_low + ex.off_low, o2 = ey.off_low + ex.off_high;
                const int64_t o3 = ey.off_high + ex.off_low, o4 = ey.off_high + ex.off_high;
                T* p = base;
                for (int64_t c = 0; c < nc; ++c, p += sc) {
                  // (grad * w) / count, torchvision's association
                  const T gc = gv[c];
                  const T g1 = gc * w1 / g.count, g2 = gc * w2 / g.count;
                  const T g3 = gc * w3 / g.count, g4 = gc * w4 / g.count;
                  p[o1] += g1;
                  p[o2] += g2;
                  p[o3] += g3;
                  p[o4] += g4;
                }
              }
            }
          }
        }
      }
    }
  });
}

// _roi_align_kernel: features share N, C, dtype and device; rois are contiguous in the accumulation dtype.
Tensor roi_align_kernel(const std::vector<Tensor>& features, const Tensor& rois, const std::optional<Tensor>& levels,
                        const std::vector<double>& scales, int64_t PH, int64_t PW, int64_t sampling_ratio,
                        bool aligned, bool channels_last) {
  const Tensor& f0 = features[0];
  const int64_t K = rois.size(0), N = f0.size(0), C = f0.size(1);
  auto out = roi_empty({K, C, PH, PW}, f0.scalar_type(), f0, channels_last);
  if (out.numel() == 0) {
    return out;
  }
  const auto batch = batch_indices(rois, N);
  const auto level_of = level_indices(levels, K, static_cast<int64_t>(features.size()));
  FASTDET_DISPATCH_FLOATING(f0.scalar_type(), "roi_align_cpu", [&] {
    std::vector<Level<const scalar_t>> lv;
    for (size_t l = 0; l < features.size(); ++l) {
      const auto& f = features[l];
      lv.push_back({f.const_data_ptr<scalar_t>(), f.size(2), f.size(3), strides_of(f), scales[l]});
    }
    align_forward_kernel<scalar_t>(lv, rois, batch, level_of, C, PH, PW, sampling_ratio, aligned,
                                   out.mutable_data_ptr<scalar_t>(), strides_of(out));
  });
  return out;
}

// _roi_align_backward_kernel: one zero-initialised accumulation-dtype gradient per level, scattered into.
std::vector<Tensor> roi_align_backward_kernel(const Tensor& grad, const Tensor& rois,
                                              const std::optional<Tensor>& levels, const std::vector<double>& scales,
                                              int64_t PH, int64_t PW, int64_t N, int64_t C,
                                              const std::vector<int64_t>& heights, const std::vector<int64_t>& widths,
                                              int64_t sampling_ratio, bool aligned, bool channels_last,
                                              bool /*deterministic: the CPU kernel always is*/) {
  const int64_t K = rois.size(0);
  const int64_t L = static_cast<int64_t>(heights.size());
  const auto acc = accumulation_type(grad.scalar_type());
  std::vector<Tensor> bufs;
  for (int64_t l = 0; l < L; ++l) {
    bufs.push_back(roi_zeros({N, C, heights[l], widths[l]}, acc, grad, channels_last));
  }
  if (K > 0 && C > 0) {
    const auto batch = batch_indices(rois, N);
    const auto level_of = level_indices(levels, K, L);
    FASTDET_DISPATCH_FLOATING(grad.scalar_type(), "roi_align_backward_cpu", [&] {
      using T = opmath_t<scalar_t>;
      std::vector<Level<T>> lv;
      for (int64_t l = 0; l < L; ++l) {
        lv.push_back({bufs[l].mutable_data_ptr<T>(), heights[l], widths[l], strides_of(bufs[l]), scales[l]});
      }
      align_backward_kernel<scalar_t>(lv, grad, rois, batch, level_of, N, C, PH, PW, sampling_ratio, aligned);
    });
  }
  return bufs;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_roi_align_kernel", TORCH_BOX(&fastdet::roi_align_kernel));
  m.impl("_roi_align_backward_kernel", TORCH_BOX(&fastdet::roi_align_backward_kernel));
}
