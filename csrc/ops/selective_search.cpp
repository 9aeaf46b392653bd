// Schemas of selective search (Uijlings et al., IJCV 2013) and its argument checks, written once here; the CPU kernel
// (cpu/selective_search.cpp) documents the algorithm. CPU only by design: the segmentation and the greedy grouping
// are sequential per strategy (the kernel runs strategies in parallel), so a CUDA image is refused with a message.
#include "ops/selective_search.h"

#include <cmath>
#include <tuple>

#include "ops/checks.h"

namespace fastdet {
namespace {

namespace ss = selective_search;

// image: [3, H, W] RGB, uint8 (0..255) or floating (0..1), on the CPU, at most kMaxSide per side. Returns the
// kernel's layout: contiguous uint8, or contiguous float32 (values are clamped to [0, 1] and quantised there).
Tensor prepared_image(const Tensor& image) {
  FASTDET_CHECK(image.device().type() == torch::headeronly::DeviceType::CPU,
                "image must be a CPU tensor (selective search runs on the CPU only), got ", device_of(image),
                ": move it with .cpu()");
  const auto dtype = image.scalar_type();
  FASTDET_CHECK(dtype == ScalarType::Byte || is_floating(dtype),
                "image must be a uint8 tensor (0..255) or a floating-point tensor (0..1), got ", dtype);
  FASTDET_CHECK(image.dim() == 3 && image.size(0) == 3, "image must have shape [3, H, W] (RGB channels first), got ",
                shape_of(image));
  FASTDET_CHECK(image.size(1) <= ss::kMaxSide && image.size(2) <= ss::kMaxSide, "image must be at most ",
                ss::kMaxSide, " x ", ss::kMaxSide, " pixels (resize it first), got ", shape_of(image));
  return aten::contiguous(dtype == ScalarType::Byte ? image : aten::to(image, kFloat));
}

void check_strategies(IntArrayRef strategies) {
  const int64_t n = static_cast<int64_t>(strategies.size());
  FASTDET_CHECK(n > 0 && n % 3 == 0 && n / 3 <= ss::kMaxStrategies,
                "strategies must hold 1 to ", ss::kMaxStrategies, " triples (colour space, k, similarity mask), got ",
                n, " numbers");
  for (int64_t s = 0; s < n / 3; ++s) {
    const int64_t space = strategies[3 * s], k = strategies[3 * s + 1], mask = strategies[3 * s + 2];
    FASTDET_CHECK(space >= 0 && space < ss::kNumColorSpaces, "strategies[", s, "]: colour space must be in [0, ",
                  ss::kNumColorSpaces, "), got ", space);
    FASTDET_CHECK(k >= 1 && k <= ss::kMaxK, "strategies[", s, "]: k must be in [1, ", ss::kMaxK, "], got ", k);
    FASTDET_CHECK(mask >= 1 && mask <= ss::kAllSimilarities, "strategies[", s,
                  "]: the similarity mask must be a non-empty OR of colour=1, texture=2, size=4, fill=8, got ", mask);
  }
}

void check_segmentation(int64_t min_size, double sigma) {
  FASTDET_CHECK(min_size >= 0 && min_size <= ss::kMaxSide * ss::kMaxSide,
                "min_size must be in [0, ", ss::kMaxSide * ss::kMaxSide, "] (0: each strategy's k), got ", min_size);
  FASTDET_CHECK(std::isfinite(sigma) && sigma >= 0.0 && sigma <= 10.0, "sigma must be in [0, 10], got ", sigma);
}

Tensor selective_search_impl(const Tensor& image, IntArrayRef strategies, int64_t min_size, double sigma,
                             int64_t max_proposals, int64_t seed) {
  auto prepared = prepared_image(image);
  check_strategies(strategies);
  check_segmentation(min_size, sigma);
  FASTDET_CHECK(max_proposals >= -1, "max_proposals must be >= 0, or -1 for no limit, got ", max_proposals);
  return call_op<Tensor>("fastdet::_selective_search_kernel", prepared, strategies, min_size, sigma, max_proposals,
                         seed);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> selective_search_regions_impl(const Tensor& image, IntArrayRef strategy,
                                                                        int64_t min_size, double sigma) {
  auto prepared = prepared_image(image);
  FASTDET_CHECK(strategy.size() == 3, "strategy must be one triple (colour space, k, similarity mask), got ",
                strategy.size(), " numbers");
  check_strategies(strategy);
  check_segmentation(min_size, sigma);
  return call_op<std::tuple<Tensor, Tensor, Tensor, Tensor>>("fastdet::_selective_search_regions_kernel", prepared,
                                                             strategy, min_size, sigma);
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  m.def("selective_search(Tensor image, int[] strategies, int min_size, float sigma, int max_proposals, int seed) "
        "-> Tensor");
  // Kernel: image [3, H, W] contiguous uint8 or float32 on the CPU, strategies checked above. Returns the ranked,
  // deduplicated proposals [K, 4] float32 (x1, y1, x2, y2), x2 / y2 exclusive.
  m.def("_selective_search_kernel(Tensor image, int[] strategies, int min_size, float sigma, int max_proposals, "
        "int seed) -> Tensor");
  // One strategy's hierarchy, for tests: every region's box in creation order (the initial segments by label, then
  // one region per merge), the initial segmentation [H, W] int64, and each pixel's colour-histogram bin [C, H, W]
  // and texture-histogram bins [C * 8, H, W] (int64 indices into the region histograms).
  m.def("_selective_search_regions(Tensor image, int[] strategy, int min_size, float sigma) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_selective_search_regions_kernel(Tensor image, int[] strategy, int min_size, float sigma) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(fastdet, CompositeExplicitAutograd, m) {
  m.impl("selective_search", TORCH_BOX(&fastdet::selective_search_impl));
  m.impl("_selective_search_regions", TORCH_BOX(&fastdet::selective_search_regions_impl));
}
