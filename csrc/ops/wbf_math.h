#pragma once
// Per-box and per-cluster math of weighted boxes fusion and of non-maximum weighted, shared by the CPU and CUDA
// kernels (cpu/wbf.cpp documents both algorithms). Every step is ensemble-boxes' float64 arithmetic with its float32
// stores; products that feed a sum go through exact:: so nvcc does not fuse them, and both backends give the same bits.
#include <torch/headeronly/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "ops/exact_math.h"

namespace fastdet {
namespace wbf {

enum ConfType : int64_t { kAvg = 0, kMax = 1, kBoxAndModelAvg = 2, kAbsentModelAwareAvg = 3 };
// kWbf: weighted boxes fusion; kNmw: non-maximum weighted (ensemble-boxes' non_maximum_weighted).
enum Method : int64_t { kWbf = 0, kNmw = 1 };

struct Entry {
  double x1, y1, x2, y2, score, weight;  // score: score * weight[model]
  int64_t label, model;
};

struct Cluster {
  double box[4];  // WBF: the current fused box; NMW: the first member's box until finish()
  double score;   // WBF: its stored score (float32-rounded once the cluster has two members); NMW: the first member's
  double weight;  // its stored weight sum (likewise)
  float acc[4];   // float32 running sum of member weight * corner (member weight: WBF score, NMW score * IoU)
  double conf, weight_sum, max_conf;  // conf: the sum of member weights
  int64_t count, label;
  uint64_t models;
};

struct Params {
  double iou_threshold, skip_box_threshold;
  int64_t conf_type;
  bool allows_overflow;
  int64_t method;
};

// x rounded to float32 and widened back: ensemble-boxes stores these values in a float32 array. On the host through a
// volatile, since the optimiser otherwise drops the double -> float -> double round trip.
C10_HOST_DEVICE inline double float32_rounded(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<double>(__double2float_rn(x));
#else
  volatile float f = static_cast<float>(x);
  return f;
#endif
}

// std::max / std::min as the CPU kernel first used them (NaN in the first argument wins, else the second is ignored
// when NaN), spelled out so that the device gets the same.
C10_HOST_DEVICE inline double max_of(double a, double b) {
  return a < b ? b : a;
}
C10_HOST_DEVICE inline double min_of(double a, double b) {
  return b < a ? b : a;
}

C10_HOST_DEVICE inline double clip01(double v) {
  return v < 0 ? 0.0 : (v > 1 ? 1.0 : v);
}

// Box k of model m as ensemble-boxes prepares it: skipped (false) when its score is NaN or < skip_box_threshold, a
// coordinate is NaN, its area after ordering the corners and clipping to [0, 1] is 0, or its weighted score is NaN.
C10_HOST_DEVICE inline bool make_entry(const double* box, double score, int64_t label, int64_t model, double weight,
                                       double skip_box_threshold, Entry& out) {
  if (score != score || score < skip_box_threshold) return false;
  double x1 = box[0], y1 = box[1], x2 = box[2], y2 = box[3];
  if (x1 != x1 || y1 != y1 || x2 != x2 || y2 != y2) return false;
  if (x2 < x1) {
    const double t = x1;
    x1 = x2;
    x2 = t;
  }
  if (y2 < y1) {
    const double t = y1;
    y1 = y2;
    y2 = t;
  }
  x1 = clip01(x1);
  x2 = clip01(x2);
  y1 = clip01(y1);
  y2 = clip01(y2);
  if (exact::mul_rn(x2 - x1, y2 - y1) == 0.0) return false;
  const double weighted = exact::mul_rn(score, weight);
  if (weighted != weighted) return false;  // an infinite score of a model weighted 0
  out = Entry{x1, y1, x2, y2, weighted, weight, label, model};
  return true;
}

// Visit order within a label: decreasing weighted score, ties the later box first (a stable argsort reversed).
C10_HOST_DEVICE inline bool visits_before(double score_a, int64_t a, double score_b, int64_t b) {
  return score_a > score_b || (score_a == score_b && a > b);
}

C10_HOST_DEVICE inline double iou_with(const double* a, const Entry& b) {
  const double xa = max_of(a[0], b.x1), ya = max_of(a[1], b.y1);
  const double xb = min_of(a[2], b.x2), yb = min_of(a[3], b.y2);
  const double inter = exact::mul_rn(max_of(xb - xa, 0.0), max_of(yb - ya, 0.0));
  const double area_a = exact::mul_rn(a[2] - a[0], a[3] - a[1]);
  const double area_b = exact::mul_rn(b.x2 - b.x1, b.y2 - b.y1);
  return inter / exact::sub_rn(exact::add_rn(area_a, area_b), inter);
}

// Matching: the cluster with the largest IoU, the first of equals; a NaN IoU beats any number (the first NaN).
// Returns whether candidate (iou, index) is a better match than the current (best_iou, best; best < 0: none).
C10_HOST_DEVICE inline bool better_match(double iou, int64_t index, double best_iou, int64_t best) {
  if (index < 0) return false;
  if (best < 0) return true;
  const bool n = iou != iou, bn = best_iou != best_iou;
  if (n != bn) return n;
  if (!n && iou != best_iou) return iou > best_iou;
  return index < best;
}

// A box joins its best match when that IoU is > iou_threshold (or NaN).
C10_HOST_DEVICE inline bool joins(int64_t best, double best_iou, double iou_threshold) {
  return best >= 0 && !(best_iou <= iou_threshold);
}

// member_weight: WBF the entry's score; NMW its score times its IoU with the cluster's first box.
C10_HOST_DEVICE inline void accumulate(Cluster& c, const Entry& e, double member_weight) {
  const double corner[4] = {e.x1, e.y1, e.x2, e.y2};
  for (int j = 0; j < 4; ++j) {
    c.acc[j] = static_cast<float>(
        float32_rounded(exact::add_rn(static_cast<double>(c.acc[j]), exact::mul_rn(member_weight, corner[j]))));
  }
  c.conf = exact::add_rn(c.conf, member_weight);
  c.weight_sum = exact::add_rn(c.weight_sum, e.weight);
  c.max_conf = c.count == 0 ? e.score : max_of(c.max_conf, e.score);
  c.models |= uint64_t{1} << e.model;
  ++c.count;
}

C10_HOST_DEVICE inline Cluster new_cluster(const Entry& e) {
  Cluster c{};
  c.box[0] = e.x1;
  c.box[1] = e.y1;
  c.box[2] = e.x2;
  c.box[3] = e.y2;
  c.score = e.score;
  c.weight = e.weight;
  c.label = e.label;
  accumulate(c, e, e.score);  // NMW: the first member's IoU with itself is exactly 1
  return c;
}

// A new member. WBF: the fused box, score and weight are recomputed as get_weighted_box stores them (float32). NMW:
// the member is weighted by its score times its IoU with the first member (the cluster's box, which stays as is).
C10_HOST_DEVICE inline void add(Cluster& c, const Entry& e, const Params& p) {
  if (p.method == kNmw) {
    accumulate(c, e, exact::mul_rn(e.score, iou_with(c.box, e)));
    return;
  }
  accumulate(c, e, e.score);
  for (int j = 0; j < 4; ++j) c.box[j] = float32_rounded(static_cast<double>(c.acc[j]) / c.conf);
  c.score = float32_rounded(p.conf_type == kMax ? c.max_conf : c.conf / static_cast<double>(c.count));
  c.weight = float32_rounded(c.weight_sum);
}

// The sum and the maximum of the M model weights, summed in model order.
C10_HOST_DEVICE inline void weight_stats(const double* weights, int64_t M, double& total, double& largest) {
  total = 0;
  largest = -INFINITY;
  for (int64_t m = 0; m < M; ++m) {
    total = exact::add_rn(total, weights[m]);
    largest = max_of(largest, weights[m]);
  }
}

// A model's weight as its boxes' scores are multiplied by it: WBF the weight as given, NMW the weight divided by the
// largest one.
C10_HOST_DEVICE inline double model_weight(const double* weights, int64_t m, double weight_max, const Params& p) {
  return p.method == kNmw ? weights[m] / weight_max : weights[m];
}

// The final score by conf_type. weights: the M model weights; weight_total, weight_max: their sum and maximum.
C10_HOST_DEVICE inline double rescaled_score(const Cluster& c, const double* weights, int64_t M, double weight_total,
                                             double weight_max, const Params& p) {
  const double n = static_cast<double>(c.count);
  switch (p.conf_type) {
    case kBoxAndModelAvg: {
      double distinct = 0;
      for (int64_t m = 0; m < M; ++m)
        if (c.models >> m & 1) distinct = exact::add_rn(distinct, weights[m]);
      const double s = exact::mul_rn(c.score, n) / c.weight;
      return exact::mul_rn(s, distinct) / weight_total;
    }
    case kAbsentModelAwareAvg: {
      double absent = 0;
      for (int64_t m = 0; m < M; ++m)
        if (!(c.models >> m & 1)) absent = exact::add_rn(absent, weights[m]);
      return exact::mul_rn(c.score, n) / exact::add_rn(c.weight, absent);
    }
    case kMax:
      return c.score / weight_max;
    default: {
      const double members = p.allows_overflow ? n : (static_cast<double>(M) < n ? static_cast<double>(M) : n);
      return exact::mul_rn(c.score, members) / weight_total;
    }
  }
}

// A cluster's output box and score. WBF: the fused box as it stands, the score rescaled by conf_type. NMW: the
// member-weighted mean box (the float32 sums divided by the float64 weight sum, stored in float32, as ensemble-boxes'
// float32 array divided in place by a numpy float64) and the first member's score in float32.
C10_HOST_DEVICE inline void finish(Cluster& c, const double* weights, int64_t M, double weight_total,
                                   double weight_max, const Params& p) {
  if (p.method == kNmw) {
    for (int j = 0; j < 4; ++j) c.box[j] = float32_rounded(static_cast<double>(c.acc[j]) / c.conf);
    c.score = float32_rounded(c.score);
    return;
  }
  c.score = rescaled_score(c, weights, M, weight_total, weight_max, p);
}

// Output order: decreasing score, NaN first (numpy's argsort puts NaN last; reversed, first), ties the later
// cluster first.
C10_HOST_DEVICE inline bool outputs_before(double sa, int64_t a, double sb, int64_t b) {
  const bool na = sa != sa, nb = sb != sb;
  if (na != nb) return na;
  return sa > sb || ((sa == sb || na) && a > b);
}

}  // namespace wbf
}  // namespace fastdet
