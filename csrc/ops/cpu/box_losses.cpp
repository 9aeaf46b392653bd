// CPU kernels of the aligned-pair IoU losses: one parallel pass over the pairs; reduced losses are summed in fixed
// chunks (see loss_reduction.h), so the value does not depend on the number of threads.
#include <algorithm>
#include <tuple>
#include <vector>

#include "ops/box_loss_math.h"
#include "ops/box_losses.h"
#include "ops/loss_reduction.h"

namespace fastdet {
namespace {

Tensor box_pair_loss_kernel(const Tensor& boxes1, const Tensor& boxes2, int64_t variant, int64_t reduction,
                            double eps) {
  const int64_t P = boxes1.size(0);
  Tensor out = reduction == kReduceNone ? aten::empty({P}, boxes1.scalar_type(), boxes1)
                                        : aten::empty({}, boxes1.scalar_type(), boxes1);
  const int64_t chunks = (P + kLossChunk - 1) / kLossChunk;
  FASTDET_DISPATCH_FLOAT_DOUBLE(out.scalar_type(), "box_pair_loss_cpu", [&] {
    using T = scalar_t;
    const T* b1 = boxes1.const_data_ptr<T>();
    const T* b2 = boxes2.const_data_ptr<T>();
    T* o = out.mutable_data_ptr<T>();
    std::vector<double> partial(chunks, 0.0);
    parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t p1 = std::min(P, (chunk + 1) * kLossChunk);
        double acc = 0.0;
        for (int64_t p = chunk * kLossChunk; p < p1; ++p) {
          const T l = boxloss::pair_loss<T>(b1 + 4 * p, b2 + 4 * p, variant, static_cast<T>(eps));
          if (reduction == kReduceNone) {
            o[p] = l;
          } else {
            acc += static_cast<double>(l);
          }
        }
        partial[chunk] = acc;
      }
    });
    if (reduction != kReduceNone) {
      double total = 0.0;
      for (double v : partial) total += v;
      // torchvision: mean of no pairs is 0 (0.0 * sum), not NaN.
      if (reduction == kReduceMean) total = P > 0 ? total / static_cast<double>(P) : 0.0;
      *o = static_cast<T>(total);
    }
  });
  return out;
}

std::tuple<Tensor, Tensor> box_pair_loss_backward_kernel(const Tensor& grad, const Tensor& boxes1,
                                                         const Tensor& boxes2, int64_t variant, int64_t reduction,
                                                         double eps) {
  const int64_t P = boxes1.size(0);
  auto g1 = aten::empty_like(boxes1);
  auto g2 = aten::empty_like(boxes2);
  FASTDET_DISPATCH_FLOAT_DOUBLE(g1.scalar_type(), "box_pair_loss_backward_cpu", [&] {
    using T = scalar_t;
    const T* b1 = boxes1.const_data_ptr<T>();
    const T* b2 = boxes2.const_data_ptr<T>();
    const T* gp = grad.const_data_ptr<T>();
    T* o1 = g1.mutable_data_ptr<T>();
    T* o2 = g2.mutable_data_ptr<T>();
    // The upstream gradient of a reduced loss reaches every pair once: g for 'sum', g / P for 'mean' (as torch's
    // mean backward divides by the element count).
    const T shared = reduction == kReduceNone ? T(0) : (reduction == kReduceMean ? gp[0] / static_cast<T>(P) : gp[0]);
    parallel_for(0, P, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const T gi = reduction == kReduceNone ? gp[p] : shared;
        boxloss::pair_loss_backward<T>(b1 + 4 * p, b2 + 4 * p, variant, static_cast<T>(eps), gi, o1 + 4 * p,
                                       o2 + 4 * p);
      }
    });
  });
  return {g1, g2};
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_box_pair_loss_kernel", TORCH_BOX(&fastdet::box_pair_loss_kernel));
  m.impl("_box_pair_loss_backward_kernel", TORCH_BOX(&fastdet::box_pair_loss_backward_kernel));
}
