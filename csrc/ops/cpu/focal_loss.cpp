// CPU kernels of the sigmoid focal loss: one pass over the logits (and float targets) that writes the loss (or adds it
// to a chunk's partial sum) and, when asked, the gradient. Chunks are fixed ranges of kLossChunk elements (whole rows
// for the label form), so the reduced value does not depend on the number of threads.
#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ops/cpu/focal_loss_avx2.h"

#include "ops/focal_loss.h"
#include "ops/focal_loss_math.h"
#include "ops/loss_reduction.h"

namespace fastdet {
namespace {

template <typename T>
focal::Params<T> cast_params(const focal::Params<double>& p) {
  return focal::Params<T>{static_cast<T>(p.alpha), static_cast<T>(p.gamma), p.gamma_kind};
}

#ifdef FASTDET_FOCAL_AVX2
// One element block (n <= 8 elements from flat index i) of the vectorised path.
template <typename scalar_t, bool Reduce, bool WithGrad>
__attribute__((target("avx2,fma,f16c"))) inline void focal_block_avx2(const scalar_t* x, scalar_t* loss,
                                                                      scalar_t* grad, const focal::Params<float>& prm,
                                                                      __m256 scale8, int64_t i, int n, __m256 t8,
                                                                      __m256d& acc4) {
  __m256 g8;
  const __m256 l8 =
      focal_avx2::element8<WithGrad>(focal_avx2::load8(x + i, n), t8, prm.alpha, prm.gamma, prm.gamma_kind, &g8);
  if constexpr (Reduce) {
    acc4 = focal_avx2::accumulate8(acc4, n == 8 ? l8 : focal_avx2::first_lanes(l8, n));
  } else {
    focal_avx2::store8(loss + i, _mm256_mul_ps(l8, scale8), n);
  }
  if constexpr (WithGrad) focal_avx2::store8(grad + i, _mm256_mul_ps(g8, scale8), n);
}

// Rows [r0, r1) of the vectorised path; returns the chunk's partial sum when Reduce. Loads and stores convert 8
// elements at once, and the sum keeps 4 double lanes added in a fixed order at the end, so it is still independent of
// the thread count (it may differ from the scalar path's sequential sum by double rounding only).
template <typename scalar_t, bool WithLabels, bool Reduce, bool WithGrad>
__attribute__((target("avx2,fma,f16c"))) double focal_rows_avx2(const scalar_t* x, const scalar_t* tf,
                                                                const int64_t* labels, scalar_t* loss,
                                                                scalar_t* grad, const focal::Params<float>& prm,
                                                                int64_t C, int64_t ignore, float s, int64_t r0,
                                                                int64_t r1) {
  const __m256 scale8 = _mm256_set1_ps(s);
  __m256d acc4 = _mm256_setzero_pd();
  if constexpr (WithLabels) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * C;
      const int64_t label = labels[r];
      if (label == ignore) {
        for (int64_t c = 0; c < C; ++c) {
          if (!Reduce) loss[base + c] = scalar_t(0);
          if (WithGrad) grad[base + c] = scalar_t(0);
        }
        continue;
      }
      for (int64_t c0 = 0; c0 < C; c0 += 8) {
        const int n = static_cast<int>(std::min<int64_t>(8, C - c0));
        focal_block_avx2<scalar_t, Reduce, WithGrad>(x, loss, grad, prm, scale8, base + c0, n,
                                                     focal_avx2::one_hot8(label, c0), acc4);
      }
    }
  } else {
    for (int64_t i = r0; i < r1; i += 8) {
      const int n = static_cast<int>(std::min<int64_t>(8, r1 - i));
      focal_block_avx2<scalar_t, Reduce, WithGrad>(x, loss, grad, prm, scale8, i, n, focal_avx2::load8(tf + i, n),
                                                   acc4);
    }
  }
  return Reduce ? focal_avx2::horizontal_sum(acc4) : 0.0;
}
#endif

// The label form's row r covers elements [r * C, (r + 1) * C); its target for class c is 1 iff label == c.
// Rows per chunk are chosen so a chunk is ~kLossChunk elements; the float form is the label form's special case with
// C = 1 and the target read from memory.
template <typename scalar_t, bool WithLabels, bool Reduce, bool WithGrad>
void focal_kernel(const FocalKernelArgs& a, double scale) {
  using T = opmath_t<scalar_t>;
  const scalar_t* x = a.inputs.const_data_ptr<scalar_t>();
  const scalar_t* tf = WithLabels ? nullptr : a.targets.const_data_ptr<scalar_t>();
  const int64_t* labels = WithLabels ? a.targets.const_data_ptr<int64_t>() : nullptr;
  scalar_t* loss = Reduce ? nullptr : a.loss.mutable_data_ptr<scalar_t>();
  scalar_t* grad = WithGrad ? a.grad.mutable_data_ptr<scalar_t>() : nullptr;
  const auto prm = cast_params<T>(a.params);
  const int64_t C = a.classes;
  const int64_t rows = a.rows;
  const int64_t ignore = a.ignore_index;
  const T s = static_cast<T>(scale);
  const int64_t rows_per_chunk = std::max<int64_t>(1, kLossChunk / std::max<int64_t>(C, 1));
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  std::vector<double> partial(Reduce ? chunks : 0, 0.0);
#ifdef FASTDET_FOCAL_AVX2
  // float32/float16/bfloat16 go through the 8-wide AVX2 path where available (several times the scalar path on this
  // machine): loads and stores convert 8 elements at once, and the reduction keeps 4 double lanes per chunk, summed
  // in a fixed order at the chunk's end (so the result is still independent of the thread count).
  const bool vectorised = std::is_same_v<T, float> && focal_avx2::sleef().ok;
#else
  [[maybe_unused]] const bool vectorised = false;
#endif
  parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t r0 = chunk * rows_per_chunk;
      const int64_t r1 = std::min(rows, r0 + rows_per_chunk);
      double acc = 0.0;
#ifdef FASTDET_FOCAL_AVX2
      if constexpr (std::is_same_v<T, float>) {
        if (vectorised) {
          const double sum = focal_rows_avx2<scalar_t, WithLabels, Reduce, WithGrad>(x, tf, labels, loss, grad, prm, C,
                                                                                       ignore, s, r0, r1);
          if (Reduce) partial[chunk] = sum;
          continue;
        }
      }
#endif
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t base = r * C;
        int64_t label = -1;
        if (WithLabels) {
          label = labels[r];
          if (label == ignore) {
            for (int64_t c = 0; c < C; ++c) {
              if (!Reduce) loss[base + c] = scalar_t(0);
              if (WithGrad) grad[base + c] = scalar_t(0);
            }
            continue;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = base + c;
          const T t = WithLabels ? T(label == c ? 1 : 0) : static_cast<T>(tf[i]);
          T g;
          const T l = focal::element<T, WithGrad>(static_cast<T>(x[i]), t, prm, &g);
          if (Reduce) {
            acc += static_cast<double>(l);
          } else {
            loss[i] = static_cast<scalar_t>(l * s);
          }
          if (WithGrad) grad[i] = static_cast<scalar_t>(g * s);
        }
      }
      if (Reduce) partial[chunk] = acc;
    }
  });
  if (Reduce) {
    double total = 0.0;
    for (double v : partial) total += v;  // index order: deterministic
    *a.loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(total * scale);
  }
}

template <typename scalar_t, bool WithLabels>
void dispatch_flags(const FocalKernelArgs& a, double scale) {
  const bool reduce = a.reduction != kReduceNone;
  const bool with_grad = a.grad.numel() > 0;
  if (reduce && with_grad) focal_kernel<scalar_t, WithLabels, true, true>(a, scale);
  else if (reduce) focal_kernel<scalar_t, WithLabels, true, false>(a, scale);
  else if (with_grad) focal_kernel<scalar_t, WithLabels, false, true>(a, scale);
  else focal_kernel<scalar_t, WithLabels, false, false>(a, scale);
}

// The value of the 0-dim scale tensor. On the CPU it can be read directly: there is no device to synchronise with.
double read_scale(const Tensor& t) {
  return t.scalar_type() == kDouble ? *t.const_data_ptr<double>() : static_cast<double>(*t.const_data_ptr<float>());
}

std::tuple<Tensor, Tensor> sigmoid_focal_loss_kernel(const Tensor& inputs, const Tensor& targets,
                                                     const std::optional<Tensor>& scale, double scale_host,
                                                     int64_t ignore_index, double alpha, double gamma,
                                                     int64_t reduction, bool need_grad) {
  const auto a =
      focal_kernel_args(inputs, targets, scale, scale_host, ignore_index, alpha, gamma, reduction, need_grad);
  const double s = a.scale_tensor.has_value() ? read_scale(*a.scale_tensor) : a.scale;
  FASTDET_DISPATCH_FLOATING(a.inputs.scalar_type(), "sigmoid_focal_loss_cpu", [&] {
    if (a.with_labels) dispatch_flags<scalar_t, true>(a, s);
    else dispatch_flags<scalar_t, false>(a, s);
  });
  return {a.loss, a.grad};
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_sigmoid_focal_loss_kernel", TORCH_BOX(&fastdet::sigmoid_focal_loss_kernel));
}
