// CPU kernel of weighted boxes fusion (WBF) and non-maximum weighted (NMW): ensemble-boxes' weighted_boxes_fusion
// and non_maximum_weighted step for step, images in parallel.
//
// Per image: every box of every model with score >= skip_box_threshold (NaN scores, NaN coordinates and NaN weighted
// scores, i.e. an infinite score times a weight of 0, are skipped)
// has its corners swapped into order and clipped to [0, 1], and is dropped if its area is 0; its score becomes
// score * weight[model] (NMW: weight[model] / max(weight)). Boxes are grouped by label (labels in order of first
// appearance) and visited by decreasing weighted score (ties: the later box first, as a stable argsort reversed).
// WBF: a box joins the cluster whose current fused box overlaps it most (the first of equal IoUs) when that IoU is
// > iou_threshold, else starts a cluster. A cluster's fused box is the score-weighted mean of its members,
// accumulated in member order into float32 (as ensemble-boxes' get_weighted_box does: float32 array, float64
// arithmetic) and divided by the score sum; its score is the mean (or max) of the member scores, also stored in
// float32; a one-member cluster keeps its box as is. Scores are then rescaled by conf_type.
// NMW: the same, except that a box is matched against each cluster's first box (which never changes), a member's
// weight is its score times its IoU with that first box, every output box is the weighted mean divided in float32,
// and a cluster's score is its first box's, in float32.
// The clusters of all labels are then ordered by decreasing score (ties: the later cluster first).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "ops/stable.h"
#include "ops/wbf_math.h"

namespace fastdet {
namespace {

using wbf::Cluster;
using wbf::Entry;
using wbf::Params;

class Fuser {
 public:
  // Returns the number of fused boxes written.
  int64_t run(const double* boxes, const double* scores, const int64_t* labels, const int64_t* counts,
              const double* weights, int64_t M, int64_t N, const Params& p, double* out_boxes, double* out_scores,
              int64_t* out_labels) {
    entries_.clear();
    group_of_.clear();
    groups_.clear();
    double weight_total, weight_max;
    wbf::weight_stats(weights, M, weight_total, weight_max);
    for (int64_t m = 0; m < M; ++m) {
      const double weight = wbf::model_weight(weights, m, weight_max, p);
      const int64_t count = std::min(std::max<int64_t>(counts[m], 0), N);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t k = m * N + j;
        Entry entry;
        if (!wbf::make_entry(boxes + 4 * k, scores[k], labels[k], m, weight, p.skip_box_threshold, entry)) {
          continue;
        }
        const int64_t label = labels[k];
        auto it = group_of_.find(label);
        if (it == group_of_.end()) {
          it = group_of_.emplace(label, static_cast<int64_t>(groups_.size())).first;
          groups_.emplace_back();
        }
        groups_[it->second].push_back(static_cast<int64_t>(entries_.size()));
        entries_.push_back(entry);
      }
    }
    clusters_.clear();
    for (auto& group : groups_) {
      std::sort(group.begin(), group.end(), [&](int64_t a, int64_t b) {
        return wbf::visits_before(entries_[a].score, a, entries_[b].score, b);
      });
      const size_t first = clusters_.size();
      for (int64_t index : group) {
        const Entry& e = entries_[index];
        int64_t best = -1;
        double best_iou = 0;
        for (size_t c = first; c < clusters_.size(); ++c) {
          const double iou = wbf::iou_with(clusters_[c].box, e);
          if (wbf::better_match(iou, static_cast<int64_t>(c), best_iou, best)) {
            best = static_cast<int64_t>(c);
            best_iou = iou;
          }
        }
        if (wbf::joins(best, best_iou, p.iou_threshold)) {
          wbf::add(clusters_[best], e, p);
        } else {
          clusters_.push_back(wbf::new_cluster(e));
        }
      }
    }
    // Final boxes and scores, then all clusters by decreasing score (ties: the later one first).
    for (Cluster& c : clusters_) wbf::finish(c, weights, M, weight_total, weight_max, p);
    order_.resize(clusters_.size());
    std::iota(order_.begin(), order_.end(), 0);
    std::sort(order_.begin(), order_.end(), [&](int64_t a, int64_t b) {
      return wbf::outputs_before(clusters_[a].score, a, clusters_[b].score, b);
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
                                                          bool allows_overflow, int64_t method) {
  const int64_t B = boxes.size(0), M = boxes.size(1), N = boxes.size(2);
  const int64_t K = M * N;
  auto out_boxes = aten::zeros({B, K, 4}, kDouble, boxes);
  auto out_scores = aten::zeros({B, K}, kDouble, boxes);
  auto out_labels = aten::full({B, K}, -1.0, kLong, boxes);
  auto num = aten::zeros({B}, kLong, boxes);
  if (B == 0 || K == 0) return {out_boxes, out_scores, out_labels, num};
  const Params params{iou_threshold, skip_box_threshold, conf_type, allows_overflow, method};
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
