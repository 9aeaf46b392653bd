// CPU kernel of soft-NMS: each segment (an image, or one category of an image) runs ensemble-boxes' sequential
// algorithm (soft_nms_math.h) step for step, in O(n log n + overlapping pairs) instead of its O(n^2) (see
// SoftNmsSegment), skipping boxes that can no longer be kept; independent segments run in parallel.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "ops/cpu/sleef.h"
#if defined(FASTDET_SLEEF_LOOKUP)
#include <immintrin.h>
#endif
#include "ops/nms.h"
#include "ops/soft_nms_math.h"
#include "ops/stable.h"

namespace fastdet {
namespace {

// exp of x[0..n) in place: SLEEF's 1-ulp AVX2 exp (4 at a time) where this CPU and torch have it, else libm's. The
// vector path is used for every element (a short tail is padded), so a weight never depends on its position.
// FASTDET_SOFT_NMS_SCALAR=1 forces libm's exp (the tests compare the two paths).
#if defined(FASTDET_SLEEF_LOOKUP)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
using vexpd_t = __m256d (*)(__m256d);
__attribute__((target("avx2,fma"))) void exp_sleef(void* fn, double* x, int64_t n) {
  const auto vexp = reinterpret_cast<vexpd_t>(fn);
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) _mm256_storeu_pd(x + k, vexp(_mm256_loadu_pd(x + k)));
  if (k < n) {
    double tail[4] = {0.0, 0.0, 0.0, 0.0};
    std::copy(x + k, x + n, tail);
    _mm256_storeu_pd(tail, vexp(_mm256_loadu_pd(tail)));
    std::copy(tail, tail + (n - k), x + k);
  }
}
#pragma GCC pop_options
#endif

void exp_in_place(double* x, int64_t n) {
#if defined(FASTDET_SLEEF_LOOKUP)
  static void* const fn = sleef::avx2_fma_f16c() && !sleef::scalar_forced("FASTDET_SOFT_NMS_SCALAR")
                              ? sleef::lookup("Sleef_expd4_u10avx2")
                              : nullptr;
  if (fn != nullptr) {
    exp_sleef(fn, x, n);
    return;
  }
#endif
  for (int64_t k = 0; k < n; ++k) x[k] = std::exp(x[k]);
}

struct NeighbourBuffers {
  std::vector<int32_t> forward, backward;
  size_t bytes() const { return (forward.capacity() + backward.capacity()) * sizeof(int32_t); }
};

constexpr size_t kRetainedBytes = size_t{32} << 20;

struct SoftNmsParams {
  double iou_threshold, sigma, score_threshold;
  int64_t method;
};

// One segment of n boxes. Internally a box (an "entry") is named by its position in x order: the ordinary boxes
// sorted by x1 first, then the special ones (see build_graph); entries never move, slots point at them. Slots start in
// index order, so slot k first holds the entry of box k.
//  * The per-step argmax over the remaining slots (numpy's argmax order, soft_nms::ranks_before on slot positions)
//    compares cached per-block bests, kept up to date as scores and slots change.
//  * A box decays only the boxes it overlaps: every other pair has IoU exactly +-0, hence weight exactly 1. The
//    pairs that can have another weight are found once, up front, by a sweep along x (build_graph). Numbering the
//    entries in x order keeps a box's neighbours close to it in memory.
//  * A step first gathers the neighbours that are still decayed (later slot, not pruned), then computes all their
//    weights at once (the gaussian exps as one vector call, see exp_in_place), then applies them. Each neighbour is
//    decayed once per step whatever the order, so the results are those of one-by-one decays.
template <typename S>
class SoftNmsSegment {
 public:
  void run(const double* box, S* score, int64_t* perm, bool* kept, int64_t n, const SoftNmsParams& p) {
    if (n == 0) return;
    build_graph(box, n, p);  // fills order_ (entry -> box) and the entries' boxes
    score_.resize(n);
    for (int64_t e = 0; e < n; ++e) score_[e] = score[order_[e]];
    slot_entry_.resize(n);
    entry_slot_.resize(n);
    for (int64_t k = 0; k < n; ++k) {
      slot_entry_[k] = entry_of_[k];
      entry_slot_[entry_of_[k]] = k;
    }
    // Pruning (see dead_): weights lie in [0, 1] when every box is ordinary, so with score_threshold >= 0 a finite
    // score <= score_threshold stays so whatever decays it later.
    prune_ = num_ordinary_ == n && p.score_threshold >= 0.0;
    dead_.assign(n, 0);
    slot_score_.assign(score, score + n);  // slots start in box order
    slot_dead_.assign(n, 0);
    if (prune_) {
      for (int64_t k = 0; k < n; ++k) dead_[entry_of_[k]] = slot_dead_[k] = is_dead(score[k], p.score_threshold);
    }
    build_tree(n);
    int64_t stop = n;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t best = remove_through(i);
      if (best < 0 && dead_[slot_entry_[i]]) {
        stop = i;  // nothing from slot i on can be kept, nor change what was
        break;
      }
      if (best >= 0 && slot_score_[i] < slot_score_[best]) {
        std::swap(slot_entry_[i], slot_entry_[best]);
        std::swap(slot_score_[i], slot_score_[best]);
        std::swap(slot_dead_[i], slot_dead_[best]);
        entry_slot_[slot_entry_[i]] = i;
        entry_slot_[slot_entry_[best]] = best;
        update_slot(best);
      }
      if (best < 0) continue;  // no later slot left whose score matters
      const int64_t e = slot_entry_[i];
      // 1. the entries this step decays
      targets_.clear();
      auto gather = [&](int64_t c) {
        if (!dead_[c] && entry_slot_[c] > i) targets_.push_back(static_cast<int32_t>(c));
      };
      if (e >= num_ordinary_) {
        for (int64_t j = i + 1; j < n; ++j) gather(slot_entry_[j]);
      } else {
        for (int64_t k = forward_start_[e]; k < forward_start_[e + 1]; ++k) gather(forward_[k]);
        for (int64_t k = backward_start_[e]; k < backward_start_[e + 1]; ++k) gather(backward_[k]);
        for (int64_t c = num_ordinary_; c < n; ++c) gather(c);
      }
      // 2. their weights (gaussian: soft_nms::weight's, with the exps of the step in one vector call)
      const int64_t t = static_cast<int64_t>(targets_.size());
      weights_.resize(t);
      const double* eb = entry_box(e);
      if (p.method == soft_nms::kGaussian) {
        overlaps_.resize(t);
        for (int64_t k = 0; k < t; ++k) {
          const double overlap = soft_nms::iou(eb, entry_box(targets_[k]));
          overlaps_[k] = overlap;
          weights_[k] = soft_nms::gaussian_exponent(overlap, p.sigma);
        }
        exp_in_place(weights_.data(), t);
        for (int64_t k = 0; k < t; ++k) {
          if (overlaps_[k] == 0.0) weights_[k] = 1.0;
        }
      } else {
        for (int64_t k = 0; k < t; ++k) {
          weights_[k] =
              soft_nms::weight(soft_nms::iou(eb, entry_box(targets_[k])), p.method, p.iou_threshold, p.sigma);
        }
      }
      // 3. the decays
      for (int64_t k = 0; k < t; ++k) {
        const double w = weights_[k];
        if (w == 1.0) continue;
        const int64_t c = targets_[k];
        score_[c] = static_cast<S>(w * static_cast<double>(score_[c]));
        const int64_t slot = entry_slot_[c];
        slot_score_[slot] = score_[c];
        if (prune_ && is_dead(score_[c], p.score_threshold)) {
          dead_[c] = 1;
          slot_dead_[slot] = 1;
          if (block_best_[slot / kBlock] == slot) rescan(slot / kBlock);
        } else {
          update_slot(slot);
        }
      }
    }
    for (int64_t k = 0; k < n; ++k) {
      const int64_t e = slot_entry_[k];
      score[k] = score_[e];
      perm_tmp_.push_back(perm[order_[e]]);
      kept[k] = k < stop && static_cast<double>(score_[e]) > p.score_threshold;
    }
    std::copy(perm_tmp_.begin(), perm_tmp_.end(), perm);
    perm_tmp_.clear();
  }

  void swap_buffers(NeighbourBuffers& buffers) {
    forward_.swap(buffers.forward);
    backward_.swap(buffers.backward);
  }

 private:
  const double* entry_box(int64_t e) const { return boxes_.data() + soft_nms::kFields * e; }

  // Entries and neighbour lists. Ordinary boxes (finite coordinates, positive sides, finite positive area) come first,
  // sorted by x1 (ties by index); special boxes (everything else) follow in index order and are paired with every box
  // by the step loop itself. Neighbours: the pairs of ordinary boxes whose decay weight may differ from 1. Ordinary
  // boxes with disjoint interiors have IoU +-0 and weight exactly 1, so a sweep along x finds every candidate pair;
  // for the linear method the (cheap) weight itself filters them further. Entry a's neighbours after it in x order
  // are forward_[forward_start_[a] ...], those before it backward_[backward_start_[a] ...]. Weights are computed when
  // applied.
  void build_graph(const double* box, int64_t n, const SoftNmsParams& p) {
    order_.clear();
    special_.clear();
    for (int64_t k = 0; k < n; ++k) {
      const double* b = box + soft_nms::kFields * k;
      const bool ordinary = std::isfinite(b[0]) && std::isfinite(b[1]) && std::isfinite(b[2]) &&
                            std::isfinite(b[3]) && b[0] < b[2] && b[1] < b[3] && std::isfinite(b[4]) && b[4] > 0;
      (ordinary ? order_ : special_).push_back(k);
    }
    std::sort(order_.begin(), order_.end(), [&](int64_t a, int64_t b) {
      const double xa = box[soft_nms::kFields * a], xb = box[soft_nms::kFields * b];
      return xa < xb || (xa == xb && a < b);
    });
    const int64_t m = static_cast<int64_t>(order_.size());
    num_ordinary_ = m;
    order_.insert(order_.end(), special_.begin(), special_.end());
    entry_of_.resize(n);
    boxes_.resize(soft_nms::kFields * n);
    for (int64_t e = 0; e < n; ++e) {
      entry_of_[order_[e]] = e;
      std::copy_n(box + soft_nms::kFields * order_[e], soft_nms::kFields, boxes_.data() + soft_nms::kFields * e);
    }
    sorted_.resize(4 * m);
    double* sx1 = sorted_.data();
    double* sx2 = sx1 + m;
    double* sy1 = sx2 + m;
    double* sy2 = sy1 + m;
    for (int64_t a = 0; a < m; ++a) {
      const double* b = entry_box(a);
      sx1[a] = b[0];
      sy1[a] = b[1];
      sx2[a] = b[2];
      sy2[a] = b[3];
    }
    const bool linear = p.method == soft_nms::kLinear;
    // forward_ and backward_ only grow (the per-thread buffers are reused between calls): resizing them to each
    // call's size would zero-fill them every time.
    int64_t used = 0;
    forward_start_.assign(m + 1, 0);
    backward_start_.assign(m + 1, 0);  // degrees first, prefix sums below
    for (int64_t a = 0; a < m; ++a) {
      // sx1[a] <= sx1[b] < sx2[b] for every later b, so the x interiors meet exactly while sx1[b] < sx2[a]
      const int64_t end = std::lower_bound(sx1 + a + 1, sx1 + m, sx2[a]) - sx1;
      const int64_t window = std::max<int64_t>(end - a - 1, 0);
      if (static_cast<int64_t>(forward_.size()) < used + window) {
        forward_.resize(std::max<size_t>(used + window, 2 * forward_.size()));
      }
      int32_t* out = forward_.data() + used;
      // branch-free compaction of the y-overlapping ones, two at a time where SSE2 is there
      const double top = sy1[a], bottom = sy2[a];
      int64_t count = 0, b = a + 1;
#if defined(__SSE2__)
      const __m128d top2 = _mm_set1_pd(top), bottom2 = _mm_set1_pd(bottom);
      for (; b + 2 <= end; b += 2) {
        const int meets = _mm_movemask_pd(
            _mm_and_pd(_mm_cmplt_pd(_mm_loadu_pd(sy1 + b), bottom2), _mm_cmplt_pd(top2, _mm_loadu_pd(sy2 + b))));
        out[count] = static_cast<int32_t>(b);
        count += meets & 1;
        out[count] = static_cast<int32_t>(b + 1);
        count += meets >> 1;
      }
#endif
      for (; b < end; ++b) {
        out[count] = static_cast<int32_t>(b);
        count += (sy1[b] < bottom) & (top < sy2[b]);
      }
      if (linear) {
        int64_t kept = 0;
        for (int64_t h = 0; h < count; ++h) {
          if (soft_nms::weight(soft_nms::iou(entry_box(a), entry_box(out[h])), p.method, p.iou_threshold,
                               p.sigma) != 1.0) {
            out[kept++] = out[h];
          }
        }
        count = kept;
      }
      used += count;
      forward_start_[a + 1] = used;
      for (int64_t h = 0; h < count; ++h) ++backward_start_[out[h] + 1];
    }
    for (int64_t a = 0; a < m; ++a) backward_start_[a + 1] += backward_start_[a];
    if (static_cast<int64_t>(backward_.size()) < backward_start_[m]) backward_.resize(backward_start_[m]);
    cursor_.assign(backward_start_.begin(), backward_start_.end() - 1);
    for (int64_t a = 0; a < m; ++a) {
      for (int64_t k = forward_start_[a]; k < forward_start_[a + 1]; ++k) {
        backward_[cursor_[forward_[k]]++] = static_cast<int32_t>(a);
      }
    }
  }

  // Argmax over the remaining slots in numpy's order: slots in blocks of kBlock, each block caching its best
  // remaining slot; a step compares the blocks' bests. A changed score or slot re-ranks against its block's best, and
  // rescans the block only when it was that best.
  static constexpr int64_t kBlock = 32;
  bool before(int64_t a, int64_t b) const {
    return soft_nms::ranks_before(slot_score_[a], a, slot_score_[b], b);
  }
  void rescan(int64_t block) {
    const int64_t lo = std::max(block * kBlock, first_), hi = std::min((block + 1) * kBlock, n_);
    int64_t best = -1;
    for (int64_t k = lo; k < hi; ++k) {
      if (!slot_dead_[k] && (best < 0 || before(k, best))) best = k;
    }
    block_best_[block] = best;
  }
  void build_tree(int64_t n) {
    n_ = n;
    first_ = 0;
    block_best_.assign((n + kBlock - 1) / kBlock, -1);
    for (int64_t b = 0; b < static_cast<int64_t>(block_best_.size()); ++b) rescan(b);
  }
  void update_slot(int64_t slot) {
    const int64_t block = slot / kBlock;
    const int64_t best = block_best_[block];
    if (best == slot) {
      rescan(block);
    } else if (!slot_dead_[slot] && (best < 0 || before(slot, best))) {
      block_best_[block] = slot;
    }
  }
  // Slots before `slot` are visited; slot itself is removed too. Returns the best remaining slot or -1.
  int64_t remove_through(int64_t slot) {
    first_ = slot + 1;
    if (block_best_[slot / kBlock] == slot) rescan(slot / kBlock);
    int64_t best = -1;
    for (int64_t b = slot / kBlock; b < static_cast<int64_t>(block_best_.size()); ++b) {
      const int64_t k = block_best_[b];
      if (k >= 0 && (best < 0 || before(k, best))) best = k;
    }
    return best;
  }

  std::vector<int64_t> block_best_;
  int64_t n_ = 0, first_ = 0, num_ordinary_ = 0;
  std::vector<int32_t> forward_, backward_, targets_;
  std::vector<int64_t> forward_start_, backward_start_, cursor_;
  std::vector<double> weights_, overlaps_;
  // Pruned entries (only when prune_): a finite score <= score_threshold. Such a box can never be kept and ranks below
  // every box that can (or that has a NaN score, which ranks first), so it leaves the argmax and is no longer
  // decayed; the run stops once only such boxes remain. Kept boxes, their order and scores are unchanged.
  std::vector<char> dead_;
  bool prune_ = false;
  template <typename T>
  static bool is_dead(T score, double score_threshold) {
    const double s = static_cast<double>(score);
    return std::isfinite(s) && s <= score_threshold;
  }
  std::vector<double> boxes_;  // per entry: x1, y1, x2, y2, area
  std::vector<S> score_;       // per entry
  // The same scores and dead flags per slot, kept in step, so that the argmax reads them without an indirection.
  std::vector<S> slot_score_;
  std::vector<char> slot_dead_;
  // order_: entry -> box index; entry_of_: box index -> entry
  std::vector<int64_t> slot_entry_, entry_slot_, special_, order_, entry_of_, perm_tmp_;
  std::vector<double> sorted_;
};

// boxes [B, N, 4] float64 contiguous (grouped by category when categories are given), scores [B, N] float32/float64
// contiguous, categories [B, N] int64 grouped or None. Returns (perm, scores, kept), each [B, N], in slot order.
std::tuple<Tensor, Tensor, Tensor> soft_nms_kernel_cpu(const Tensor& boxes, const Tensor& scores,
                                                       const std::optional<Tensor>& categories, double iou_threshold,
                                                       double sigma, double score_threshold, int64_t method) {
  const int64_t B = boxes.size(0), N = boxes.size(1);
  FASTDET_CHECK(N <= INT32_MAX, "soft_nms: at most 2^31 - 1 boxes per image, got ", N);
  auto work = aten::empty({B, N, soft_nms::kFields}, kDouble, boxes);
  auto out_scores = torch::stable::clone(scores);
  auto perm = aten::contiguous(aten::expand(aten::unsqueeze(aten::arange(N, boxes), 0), {B, N}));
  auto kept = aten::zeros({B, N}, kBool, boxes);
  if (B == 0 || N == 0) return {perm, out_scores, kept};
  const double* src = boxes.const_data_ptr<double>();
  double* dst = work.mutable_data_ptr<double>();
  for (int64_t k = 0; k < B * N; ++k) {
    const double* b = src + 4 * k;
    double* w = dst + soft_nms::kFields * k;
    w[0] = b[0];
    w[1] = b[1];
    w[2] = b[2];
    w[3] = b[3];
    w[4] = (b[2] - b[0]) * (b[3] - b[1]);
  }
  const auto segments =
      nms::find_segments(categories.has_value() ? categories->const_data_ptr<int64_t>() : nullptr, B, N);
  const SoftNmsParams params{iou_threshold, sigma, score_threshold, method};
  int64_t* perm_ptr = perm.mutable_data_ptr<int64_t>();
  bool* kept_ptr = kept.mutable_data_ptr<bool>();
  FASTDET_DISPATCH_FLOAT_DOUBLE(scores.scalar_type(), "soft_nms", [&] {
    scalar_t* score_ptr = out_scores.mutable_data_ptr<scalar_t>();
    parallel_for(0, static_cast<int64_t>(segments.size() / 3), 1, [&](int64_t s0, int64_t s1) {
      // The neighbour lists are the only large buffers: reused between calls by each thread (fresh ones cost more
      // in page faults than a few thousand boxes take to run), released once they grew past kRetainedBytes.
      thread_local NeighbourBuffers buffers;
      SoftNmsSegment<scalar_t> segment;
      segment.swap_buffers(buffers);
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t begin = segments[3 * s] * N + segments[3 * s + 1];
        const int64_t n = segments[3 * s + 2] - segments[3 * s + 1];
        segment.run(dst + soft_nms::kFields * begin, score_ptr + begin, perm_ptr + begin, kept_ptr + begin, n,
                    params);
      }
      segment.swap_buffers(buffers);
      if (buffers.bytes() > kRetainedBytes) buffers = NeighbourBuffers();
    });
  });
  return {perm, out_scores, kept};
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_soft_nms_kernel", TORCH_BOX(&fastdet::soft_nms_kernel_cpu));
}
