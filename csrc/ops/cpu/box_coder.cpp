// CPU kernels of box coding: parallel loops over rows (decode, encode, gather-decode) or over boxes (the box gradient
// of decode, which reduces over the rows that share a box in a fixed order, so the result is deterministic).
//
// The kernels receive prepared arguments (see box_coder.h): contiguous, one device, one dtype, valid weights.
#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ops/box_coder.h"

namespace fastdet {
namespace {

using coder::Params;

constexpr int64_t kGrain = 2048;

// The dtype of accumulation type A, for the intermediate arrays.
template <typename A>
constexpr ScalarType scalar_type_of() {
  return std::is_same_v<A, double> ? kDouble : kFloat;
}

template <typename T, typename A>
inline void load4(const T* p, A v[4]) {
  for (int k = 0; k < 4; ++k) v[k] = static_cast<A>(p[k]);
}

// Decode in three steps so that exp is torch's: (1) the clamped size deltas dw, dh into two [R * C] arrays, (2) torch's
// exp (aten::exp) on each, (3) the corners. torchvision's decode_single applies torch.exp to [R, C] contiguous tensors
// of the same values; the same op on the same sizes runs the same vectorised / scalar-tail split over the same thread
// chunks, so every exp(dw) is torchvision's to the bit (the SLEEF kernels are not correctly rounded, so this matters).
Tensor box_decode_kernel(const Tensor& rel, const Tensor& bx, std::vector<double> weights, double clip) {
  auto out = aten::empty_like(rel);
  const int64_t R = rel.size(0), C = rel.size(1) / 4, Rb = bx.size(0);
  if (out.numel() == 0) return out;
  FASTDET_DISPATCH_FLOATING(rel.scalar_type(), "box_decode_cpu", [&] {
    using A = opmath_t<scalar_t>;
    const auto p = coder::make_params<A>(weights, clip);
    const scalar_t* r = rel.const_data_ptr<scalar_t>();
    const scalar_t* b = bx.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    auto dw = aten::empty({R * C}, scalar_type_of<A>(), rel);
    auto dh = aten::empty({R * C}, scalar_type_of<A>(), rel);
    // (class, box) of element i are stepped, not divided out per element (64-bit division is slow).
    auto for_elements = [&](auto&& body) {
      parallel_for(0, R * C, kGrain, [&](int64_t begin, int64_t end) {
        int64_t c = begin % C, j = (begin / C) % Rb;
        for (int64_t i = begin; i < end; ++i) {
          A rv[4], bv[4];
          load4(r + i * 4, rv);
          load4(b + j * 4, bv);
          body(i, rv, bv);
          if (++c == C) {
            c = 0;
            if (++j == Rb) j = 0;
          }
        }
      });
    };
    A* dwp = dw.mutable_data_ptr<A>();
    A* dhp = dh.mutable_data_ptr<A>();
    for_elements([&](int64_t i, const A* rv, const A* bv) {
      const auto d = coder::decode_prepare<A>(rv, bv, p);
      dwp[i] = d.dw;
      dhp[i] = d.dh;
    });
    const auto ew = aten::exp(dw);
    const auto eh = aten::exp(dh);
    const A* ewp = ew.const_data_ptr<A>();
    const A* ehp = eh.const_data_ptr<A>();
    for_elements([&](int64_t i, const A* rv, const A* bv) {
      auto d = coder::decode_prepare<A>(rv, bv, p);
      d.ew = ewp[i];
      d.eh = ehp[i];
      A ov[4];
      coder::decode_finish<A>(bv, d, ov);
      for (int k = 0; k < 4; ++k) o[i * 4 + k] = static_cast<scalar_t>(ov[k]);
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> box_decode_backward_kernel(const Tensor& g, const Tensor& rel, const Tensor& bx,
                                                      std::vector<double> weights, double clip) {
  auto grad_rel = aten::empty_like(rel);
  auto grad_boxes = aten::empty_like(bx);
  const int64_t R = rel.size(0), C = rel.size(1) / 4, Rb = bx.size(0);
  FASTDET_DISPATCH_FLOATING(rel.scalar_type(), "box_decode_backward_cpu", [&] {
    using A = opmath_t<scalar_t>;
    const auto p = coder::make_params<A>(weights, clip);
    const scalar_t* r = rel.const_data_ptr<scalar_t>();
    const scalar_t* b = bx.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* gr = grad_rel.mutable_data_ptr<scalar_t>();
    scalar_t* gb = grad_boxes.mutable_data_ptr<scalar_t>();
    // One task per box: it owns the box's gradient and the rel_codes gradient of every row using that box (rows
    // j, j + Rb, j + 2 Rb, ...), visited in increasing order.
    parallel_for(0, Rb, std::max<int64_t>(1, kGrain / std::max<int64_t>(C * (R / std::max<int64_t>(Rb, 1)), 1)),
                 [&](int64_t begin, int64_t end) {
                   for (int64_t j = begin; j < end; ++j) {
                     A bv[4], acc[4] = {A(0), A(0), A(0), A(0)};
                     load4(b + j * 4, bv);
                     for (int64_t row = j; row < R; row += Rb) {
                       for (int64_t c = 0; c < C; ++c) {
                         const int64_t i = row * C + c;
                         A rv[4], gv[4], grv[4], gbv[4];
                         load4(r + i * 4, rv);
                         load4(gp + i * 4, gv);
                         coder::decode_one_backward<A>(rv, bv, p, gv, grv, gbv);
                         for (int k = 0; k < 4; ++k) {
                           gr[i * 4 + k] = static_cast<scalar_t>(grv[k]);
                           acc[k] += gbv[k];
                         }
                       }
                     }
                     for (int k = 0; k < 4; ++k) gb[j * 4 + k] = static_cast<scalar_t>(acc[k]);
                   }
                 });
  });
  return {grad_rel, grad_boxes};
}

// Encode around torch's own log, for the reason given at box_decode_kernel: torchvision takes torch.log of [N, 1]
// contiguous ratio tensors, laid out as the [N] arrays here.
Tensor box_encode_kernel(const Tensor& gt, const Tensor& ex, std::vector<double> weights) {
  auto out = aten::empty_like(gt);
  const int64_t N = gt.size(0);
  if (N == 0) return out;
  FASTDET_DISPATCH_FLOATING(gt.scalar_type(), "box_encode_cpu", [&] {
    using A = opmath_t<scalar_t>;
    const auto p = coder::make_params<A>(weights, 0.0);
    const scalar_t* g = gt.const_data_ptr<scalar_t>();
    const scalar_t* e = ex.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    auto ratio_w = aten::empty({N}, scalar_type_of<A>(), gt);
    auto ratio_h = aten::empty({N}, scalar_type_of<A>(), gt);
    A* rw = ratio_w.mutable_data_ptr<A>();
    A* rh = ratio_h.mutable_data_ptr<A>();
    parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        A gv[4], ev[4];
        load4(g + i * 4, gv);
        load4(e + i * 4, ev);
        coder::encode_ratios<A>(gv, ev, rw + i, rh + i);
      }
    });
    const auto log_w = aten::log(ratio_w);
    const auto log_h = aten::log(ratio_h);
    const A* lw = log_w.const_data_ptr<A>();
    const A* lh = log_h.const_data_ptr<A>();
    parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        A gv[4], ev[4], ov[4];
        load4(g + i * 4, gv);
        load4(e + i * 4, ev);
        coder::encode_finish<A>(gv, ev, p, lw[i], lh[i], ov);
        for (int k = 0; k < 4; ++k) o[i * 4 + k] = static_cast<scalar_t>(ov[k]);
      }
    });
  });
  return out;
}

// image_sizes: float64 [B, 2] or absent; the index values are in [-1, N) (checked by the schema file).
Tensor decode_select_boxes_kernel(const Tensor& rel, const Tensor& anc, const Tensor& idx,
                                  const std::optional<Tensor>& image_sizes, std::vector<double> weights,
                                  double clip) {
  const int64_t B = rel.size(0), N = rel.size(1), K = idx.size(1), Ba = anc.size(0);
  auto out = aten::empty({B, K, 4}, rel.scalar_type(), rel);
  if (out.numel() == 0) return out;
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const double* sp = image_sizes.has_value() ? image_sizes->const_data_ptr<double>() : nullptr;
  FASTDET_DISPATCH_FLOATING(rel.scalar_type(), "decode_select_boxes_cpu", [&] {
    using A = opmath_t<scalar_t>;
    const auto p = coder::make_params<A>(weights, clip);
    const scalar_t* r = rel.const_data_ptr<scalar_t>();
    const scalar_t* a = anc.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    parallel_for(0, B * K, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const int64_t b = s / K, n = ip[s];
        A ov[4] = {A(0), A(0), A(0), A(0)};
        if (n >= 0) {
          A rv[4], av[4];
          load4(r + (b * N + n) * 4, rv);
          load4(a + ((Ba == 1 ? 0 : b) * N + n) * 4, av);
          coder::decode_one<A>(rv, av, p, ov);
          if (sp != nullptr) {
            // torchvision's clip_boxes_to_image: clamp(min=0, max=size); NaN stays NaN.
            const A h = static_cast<A>(sp[b * 2]), w = static_cast<A>(sp[b * 2 + 1]);
            for (int k = 0; k < 4; ++k) {
              const A hi = (k % 2 == 0) ? w : h;
              ov[k] = ov[k] < A(0) ? A(0) : (ov[k] > hi ? hi : ov[k]);
            }
          }
        }
        for (int k = 0; k < 4; ++k) o[s * 4 + k] = static_cast<scalar_t>(ov[k]);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_box_decode_kernel", TORCH_BOX(&fastdet::box_decode_kernel));
  m.impl("_box_decode_backward_kernel", TORCH_BOX(&fastdet::box_decode_backward_kernel));
  m.impl("_box_encode_kernel", TORCH_BOX(&fastdet::box_encode_kernel));
  m.impl("_decode_select_boxes_kernel", TORCH_BOX(&fastdet::decode_select_boxes_kernel));
}
