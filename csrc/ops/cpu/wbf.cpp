// CPU kernel of weighted boxes fusion, ensemble-boxes' weighted_boxes_fusion step for step, images in parallel.
//
// Per image: every box of every model with score >= skip_box_threshold (NaN scores and NaN coordinates are skipped)
// has its corners swapped into order and clipped to [0, 1], and is dropped if its area is 0; its score becomes
// score * weight[model]. Boxes are grouped by label (labels in order of first appearance) and visited by decreasing
// weighted score (ties: the later box first, as a stable argsort reversed). A box joins the cluster whose current
// fused box overlaps it most (the first of equal IoUs) when that IoU is > iou_threshold, else starts a cluster. A
// cluster's fused box is the score-weighted mean of its members, accumulated in member order into float32 (as
// ensemble-boxes' get_weighted_box does: float32 array, float64 arithmetic) and divided by the score sum; its score
// is the mean (or max) of the member scores, also stored in float32; a one-member cluster keeps its box as is.
// Scores are then rescaled by conf_type, and the clusters of all labels are ordered by decreasing score (ties: the
// later cluster first).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "ops/stable.h"

namespace fastdet {
namespace {

enum ConfType : int64_t { kAvg = 0, kMax = 1, kBoxAndModelAvg = 2, kAbsentModelAwareAvg = 3 };

struct Entry {
  double x1, y1, x2, y2, score, weight;  // score: score * weight[model]
  int64_t label, model, order;           // order: insertion position (model-major)
};

struct Cluster {
  double box[4];   // the current fused box
  double score;    // its stored score (float32-rounded once the cluster has two members)
  double weight;   // its stored weight sum (likewise)
  float acc[4];    // float32 running sum of score * corner
  double conf, weight_sum, max_conf;
  int64_t count, label;
  uint64_t models;
  int64_t position;  // order of creation within the image, across labels
};

struct Params {
  double iou_threshold, skip_box_threshold;
  int64_t conf_type;
  bool allows_overflow;
};

// x rounded to float32 and widened back: ensemble-boxes stores these values in a float32 array. Through a volatile,
// since the optimiser otherwise drops the double -> float -> double round trip.
inline double float32_rounded(double x) {
  volatile float f = static_cast<float>(x);
  return f;
}

inline double iou_with(const double* a, const Entry& b) {
  const double xa = std::max(a[0], b.x1), ya = std::max(a[1], b.y1);
  const double xb = std::min(a[2], b.x2), yb = std::min(a[3], b.y2);
  const double inter = std::max(xb - xa, 0.0) * std::max(yb - ya, 0.0);
  const double area_a = (a[2] - a[0]) * (a[3] - a[1]);
  const double area_b = (b.x2 - b.x1) * (b.y2 - b.y1);
  return inter / (area_a + area_b - inter);
}

class Fuser {
 public:
  // Returns the number of fused boxes written.
  int64_t run(const double* boxes, const double* scores, const int64_t* labels, const int64_t* counts,
              const double* weights, int64_t M, int64_t N, const Params& p, double* out_boxes, double* out_scores,
              int64_t* out_labels) {
    entries_.clear();
    group_of_.clear();
    groups_.clear();
    for (int64_t m = 0; m < M; ++m) {
      const int64_t count = std::min(std::max<int64_t>(counts[m], 0), N);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t k = m * N + j;
        const double s = scores[k];
        if (std::isnan(s) || s < p.skip_box_threshold) continue;
        double x1 = boxes[4 * k], y1 = boxes[4 * k + 1], x2 = boxes[4 * k + 2], y2 = boxes[4 * k + 3];
        if (std::isnan(x1) || std::isnan(y1) || std::isnan(x2) || std::isnan(y2)) continue;
        if (x2 < x1) std::swap(x1, x2);
        if (y2 < y1) std::swap(y1, y2);
        auto clip = [](double v) { return v < 0 ? 0.0 : (v > 1 ? 1.0 : v); };
        x1 = clip(x1);
        x2 = clip(x2);
        y1 = clip(y1);
        y2 = clip(y2);
        if ((x2 - x1) * (y2 - y1) == 0.0) continue;
        const int64_t label = labels[k];
        auto it = group_of_.find(label);
        if (it == group_of_.end()) {
          it = group_of_.emplace(label, static_cast<int64_t>(groups_.size())).first;
          groups_.emplace_back();
        }
        groups_[it->second].push_back(static_cast<int64_t>(entries_.size()));
        entries_.push_back({x1, y1, x2, y2, s * weights[m], weights[m], label, m,
                            static_cast<int64_t>(entries_.size())});
      }
    }
    double weight_total = 0, weight_max = -INFINITY;
    for (int64_t m = 0; m < M; ++m) {
      weight_total += weights[m];
      weight_max = std::max(weight_max, weights[m]);
    }
    clusters_.clear();
    for (auto& group : groups_) {
      std::sort(group.begin(), group.end(), [&](int64_t a, int64_t b) {
        const double sa = entries_[a].score, sb = entries_[b].score;
        return sa > sb || (sa == sb && a > b);
      });
      const size_t first = clusters_.size();
      for (int64_t index : group) {
        const Entry& e = entries_[index];
        int64_t best = -1;
        double best_iou = 0;
        for (size_t c = first; c < clusters_.size(); ++c) {
          const double iou = iou_with(clusters_[c].box, e);
          if (best < 0 || iou > best_iou || (std::isnan(iou) && !std::isnan(best_iou))) {
            best = static_cast<int64_t>(c);
            best_iou = iou;
          }
        }
        if (best >= 0 && !(best_iou <= p.iou_threshold)) {
          add(clusters_[best], e, p.conf_type);
        } else {
          Cluster c{};
          c.box[0] = e.x1;
          c.box[1] = e.y1;
          c.box[2] = e.x2;
          c.box[3] = e.y2;
          c.score = e.score;
          c.weight = e.weight;
          c.label = e.label;
          c.position = static_cast<int64_t>(clusters_.size());
          accumulate(c, e);
          clusters_.push_back(c);
        }
      }
    }
    // Rescale by conf_type, then order all clusters by decreasing score (ties: the later one first).
    for (Cluster& c : clusters_) {
      const double n = static_cast<double>(c.count);
      switch (p.conf_type) {
        case kBoxAndModelAvg: {
          double distinct = 0;
          for (int64_t m = 0; m < M; ++m)
            if (c.models >> m & 1) distinct += weights[m];
          c.score = c.score * n / c.weight;
          c.score = c.score * distinct / weight_total;
          break;
        }
        case kAbsentModelAwareAvg: {
          double absent = 0;
          for (int64_t m = 0; m < M; ++m)
            if (!(c.models >> m & 1)) absent += weights[m];
          c.score = c.score * n / (c.weight + absent);
          break;
        }
        case kMax:
          c.score = c.score / weight_max;
          break;
        default:
          c.score = p.allows_overflow ? c.score * n / weight_total
                                      : c.score * std::min(static_cast<double>(M), n) / weight_total;
      }
    }
    order_.resize(clusters_.size());
    std::iota(order_.begin(), order_.end(), 0);
    std::sort(order_.begin(), order_.end(), [&](int64_t a, int64_t b) {
      const double sa = clusters_[a].score, sb = clusters_[b].score;
      const bool na = std::isnan(sa), nb = std::isnan(sb);
      if (na != nb) return na;  // numpy's argsort puts NaN last; reversed, first
      return sa > sb || ((sa == sb || na) && a > b);
    });
    for (size_t k = 0; k < order_.size(); ++k) {
      const Cluster& c = clusters_[order_[k]];
      for (int j = 0; j < 4; ++j) out_boxes[4 * k + j] = c.box[j];
      out_scores[k] = c.score;
      out_labels[k] = c.label;
    }
    return static_cast<int64_t>(order_.size());
  }

 private:
  static void accumulate(Cluster& c, const Entry& e) {
    const double corner[4] = {e.x1, e.y1, e.x2, e.y2};
    for (int j = 0; j < 4; ++j) c.acc[j] = float32_rounded(static_cast<double>(c.acc[j]) + e.score * corner[j]);
    c.conf += e.score;
    c.weight_sum += e.weight;
    c.max_conf = c.count == 0 ? e.score : std::max(c.max_conf, e.score);
    c.models |= uint64_t{1} << e.model;
    ++c.count;
  }

  // A new member: the fused box, score and weight are recomputed as get_weighted_box stores them (float32).
  static void add(Cluster& c, const Entry& e, int64_t conf_type) {
    accumulate(c, e);
    for (int j = 0; j < 4; ++j) c.box[j] = float32_rounded(static_cast<double>(c.acc[j]) / c.conf);
    c.score = float32_rounded(conf_type == kMax ? c.max_conf : c.conf / static_cast<double>(c.count));
    c.weight = float32_rounded(c.weight_sum);
  }

  std::vector<Entry> entries_;
  std::unordered_map<int64_t, int64_t> group_of_;
  std::vector<std::vector<int64_t>> groups_;
  std::vector<Cluster> clusters_;
  std::vector<int64_t> order_;
};

std::tuple<Tensor, Tensor, Tensor, Tensor> wbf_kernel_cpu(const Tensor& boxes, const Tensor& scores,
                                                          const Tensor& labels, const Tensor& counts,
                                                          const Tensor& weights, double iou_threshold,
                                                          double skip_box_threshold, int64_t conf_type,
                                                          bool allows_overflow) {
  const int64_t B = boxes.size(0), M = boxes.size(1), N = boxes.size(2);
  const int64_t K = M * N;
  auto out_boxes = aten::zeros({B, K, 4}, kDouble, boxes);
  auto out_scores = aten::zeros({B, K}, kDouble, boxes);
  auto out_labels = aten::full({B, K}, -1.0, kLong, boxes);
  auto num = aten::zeros({B}, kLong, boxes);
  if (B == 0 || K == 0) return {out_boxes, out_scores, out_labels, num};
  const Params params{iou_threshold, skip_box_threshold, conf_type, allows_overflow};
  const double* bx = boxes.const_data_ptr<double>();
  const double* sc = scores.const_data_ptr<double>();
  const int64_t* lb = labels.const_data_ptr<int64_t>();
  const int64_t* ct = counts.const_data_ptr<int64_t>();
  const double* wt = weights.const_data_ptr<double>();
  double* ob = out_boxes.mutable_data_ptr<double>();
  double* os = out_scores.mutable_data_ptr<double>();
  int64_t* ol = out_labels.mutable_data_ptr<int64_t>();
  int64_t* on = num.mutable_data_ptr<int64_t>();
  parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    Fuser fuser;
    for (int64_t b = b0; b < b1; ++b) {
      on[b] = fuser.run(bx + b * K * 4, sc + b * K, lb + b * K, ct + b * M, wt, M, N, params, ob + b * K * 4,
                        os + b * K, ol + b * K);
    }
  });
  return {out_boxes, out_scores, out_labels, num};
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_weighted_boxes_fusion_kernel", TORCH_BOX(&fastdet::wbf_kernel_cpu));
}
