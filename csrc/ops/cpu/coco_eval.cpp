// CPU kernels of COCO evaluation: pycocotools' COCOeval.evaluate() and accumulate(), decision for decision.
//
// There is deliberately no CUDA kernel: the inputs are host-side annotations, and the work (a stable sort and a greedy
// match per image and category, run-length mask intersections) is branchy and small per task. Parallelism comes from
// the many independent tasks: evaluation runs one task per (category, image) group, accumulation one per category.
//
// Every comparison below is written the way pycocotools (cocoeval.py and maskApi.c) writes it, including the
// behaviour of NaN (a NaN IoU passes the "iou < threshold -> skip" test, as it does in Python), the threshold
// min(t, 1 - 1e-10), the break on the first ignored ground truth after a match with a regular one, ids of 0 reading
// as "no match", and numpy's sort order (stable, NaN last) and searchsorted(side="left").
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "ops/coco_eval.h"

namespace fastdet {
namespace {

constexpr uint8_t kMatched = 1;    // pycocotools' dtMatches != 0
constexpr uint8_t kIgnored = 2;    // pycocotools' dtIgnore
constexpr uint8_t kEvaluated = 4;  // the detection is within the evaluated max_dets of its group

// Descending score order as numpy's argsort(-score, kind="mergesort") gives it: NaN last, ties by position (the
// caller uses a stable sort).
inline bool score_before(double a, double b) {
  const double ka = -a, kb = -b;
  if (std::isnan(ka)) return false;
  return std::isnan(kb) || ka < kb;
}

// numpy's "a < b" for sorting and searching: NaN is the largest value.
inline bool numpy_less(double a, double b) {
  return a < b || (std::isnan(b) && !std::isnan(a));
}

// maskApi.c's bbIou for one pair of (x, y, w, h) boxes: the union of a crowd ground truth is the detection's area.
// fmin/fmax (not std::min) because that is what maskApi uses, and they differ from std::min when one side is NaN.
inline double box_iou(const double* d, const double* g, bool crowd) {
  const double w = std::fmin(d[2] + d[0], g[2] + g[0]) - std::fmax(d[0], g[0]);
  if (w <= 0) return 0;
  const double h = std::fmin(d[3] + d[1], g[3] + g[1]) - std::fmax(d[1], g[1]);
  if (h <= 0) return 0;
  const double da = d[2] * d[3];
  const double ga = g[2] * g[3];
  const double i = w * h;
  const double u = crowd ? da : da + ga - i;
  return i / u;
}

// A compressed-RLE mask decoded to its run lengths (column-major runs, starting with a background run), plus the
// bounding box and area maskApi derives from them.
struct Rle {
  int64_t begin = 0;  // into the task's count buffer
  int64_t m = 0;
  uint64_t h = 0, w = 0;
  double bb[4] = {0, 0, 0, 0};
  uint32_t area = 0;
};

// maskApi's rleFrString: LEB128-like 6-bit groups (5 value bits, a continuation bit), the last group's top value bit is
// the sign; from the third count on, each value is a delta to the count two places back. Stops at a NUL byte or at
// the end of the range.
void decode_counts(const uint8_t* s, int64_t n, std::vector<uint32_t>& out, int64_t& m_out) {
  const size_t start = out.size();
  int64_t p = 0;
  while (p < n && s[p] != 0) {
    int64_t x = 0;
    int k = 0;
    bool more = true;
    while (more) {
      // A value cut off by the end of the range reads the terminator, as maskApi reads the string's NUL.
      const int byte = p < n ? s[p] : 0;
      const int c = static_cast<signed char>(static_cast<char>(byte - 48));
      if (5 * k < 63) x |= static_cast<int64_t>(c & 0x1f) << (5 * k);
      more = (c & 0x20) != 0;
      ++p;
      ++k;
      if (!more && (c & 0x10) && 5 * k < 63) x |= -(int64_t{1} << (5 * k));
      if (p > n) break;
    }
    const size_t m = out.size() - start;
    if (m > 2) x += static_cast<int64_t>(out[out.size() - 2]);
    out.push_back(static_cast<uint32_t>(x));
  }
  m_out = static_cast<int64_t>(out.size() - start);
}

// maskApi's rleToBbox and rleArea (uint32 arithmetic, as there).
void rle_box_and_area(Rle& r, const uint32_t* cnts) {
  uint32_t area = 0;
  for (int64_t j = 1; j < r.m; j += 2) area += cnts[j];
  r.area = area;
  const int64_t m = (r.m / 2) * 2;
  const auto h = static_cast<uint32_t>(r.h), w = static_cast<uint32_t>(r.w);
  if (m == 0 || h == 0) {
    r.bb[0] = r.bb[1] = r.bb[2] = r.bb[3] = 0;
    return;
  }
  uint32_t xs = w, ys = h, xe = 0, ye = 0, cc = 0, xp = 0;
  for (int64_t j = 0; j < m; ++j) {
    cc += cnts[j];
    const uint32_t t = cc - static_cast<uint32_t>(j % 2);
    const uint32_t y = t % h, x = (t - y) / h;
    if (j % 2 == 0) {
      xp = x;
    } else if (xp < x) {
      ys = 0;
      ye = h - 1;
    }
    xs = std::min(xs, x);
    xe = std::max(xe, x);
    ys = std::min(ys, y);
    ye = std::max(ye, y);
  }
  r.bb[0] = xs;
  r.bb[2] = static_cast<double>(xe) - xs + 1;
  r.bb[1] = ys;
  r.bb[3] = static_cast<double>(ye) - ys + 1;
}

// maskApi's rleIou for one pair: box IoU of the masks' boxes first (0 stays 0), -1 for masks of different sizes,
// otherwise the run-length intersection over the union (over the detection's area for a crowd ground truth).
double mask_iou(const Rle& d, const uint32_t* dc, const Rle& g, const uint32_t* gc, bool crowd) {
  const double o = box_iou(d.bb, g.bb, crowd);
  if (!(o > 0)) return o;
  if (d.h != g.h || d.w != g.w) return -1;
  uint32_t ca = dc[0], cb = gc[0], c, i = 0, u = 0, ct = 1;
  int64_t a = 1, b = 1;
  bool va = false, vb = false;
  while (ct > 0) {
    c = std::min(ca, cb);
    if (va || vb) {
      u += c;
      if (va && vb) i += c;
    }
    ct = 0;
    ca -= c;
    if (!ca && a < d.m) {
      ca = dc[a++];
      va = !va;
    }
    ct += ca;
    cb -= c;
    if (!cb && b < g.m) {
      cb = gc[b++];
      vb = !vb;
    }
    ct += cb;
  }
  if (i == 0) {
    u = 1;
  } else if (crowd) {
    u = d.area;
  }
  return static_cast<double>(i) / static_cast<double>(u);
}

void check_offsets(const int64_t* offsets, int64_t count, int64_t total, const char* name) {
  FASTDET_CHECK(offsets[0] == 0 && offsets[count] == total, name, " must start at 0 and end at ", total,
                ", got ", offsets[0], " and ", offsets[count]);
  for (int64_t s = 0; s < count; ++s) {
    FASTDET_CHECK(offsets[s] <= offsets[s + 1], name, " must be non-decreasing, got ", offsets[s], " then ",
                  offsets[s + 1], " at ", s);
  }
}

void check_rle_index(const int64_t* index, int64_t n, int64_t bytes, const char* name) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* r = index + 4 * i;
    FASTDET_CHECK(0 <= r[0] && r[0] <= r[1] && r[1] <= bytes, name, " row ", i, " has the byte range [", r[0], ", ",
                  r[1], ") outside the ", bytes, " bytes given");
    FASTDET_CHECK(r[2] >= 0 && r[3] >= 0 && r[2] <= UINT32_MAX && r[3] <= UINT32_MAX, name, " row ", i,
                  " has an invalid mask size ", r[2], " x ", r[3]);
  }
}

struct RleSource {
  const uint8_t* bytes = nullptr;
  const int64_t* index = nullptr;
};

// Per-thread scratch of the evaluation tasks, reused across groups.
struct Scratch {
  std::vector<int64_t> order;       // detections of the group in score order (input indices)
  std::vector<double> iou;          // [D, G] in the group's ground-truth input order
  std::vector<int64_t> gt_order;    // ground truth with the regular ones first (pycocotools' gtind)
  std::vector<uint8_t> gt_ignored;  // in gt_order
  std::vector<double> gt_match;     // pycocotools' gtMatches row (the matched detection's id)
  std::vector<uint32_t> counts;
  std::vector<Rle> gt_rle, dt_rle;
};

std::tuple<Tensor, Tensor, Tensor, Tensor> coco_evaluate_cpu(
    const Tensor& gt_boxes, const Tensor& gt_areas, const Tensor& gt_crowd, const Tensor& gt_ids,
    const Tensor& gt_offsets, const Tensor& dt_boxes, const Tensor& dt_areas, const Tensor& dt_scores,
    const Tensor& dt_ids, const Tensor& dt_offsets, const Tensor& iou_thresholds, const Tensor& area_ranges,
    int64_t max_dets, const std::optional<Tensor>& gt_rle_bytes, const std::optional<Tensor>& gt_rle_index,
    const std::optional<Tensor>& dt_rle_bytes, const std::optional<Tensor>& dt_rle_index, bool return_matches) {
  const int64_t G = gt_boxes.size(0), D = dt_boxes.size(0), S = gt_offsets.size(0) - 1;
  const int64_t T = iou_thresholds.size(0), A = area_ranges.size(0);
  const int64_t* go = gt_offsets.const_data_ptr<int64_t>();
  const int64_t* dof = dt_offsets.const_data_ptr<int64_t>();
  check_offsets(go, S, G, "gt_offsets");
  check_offsets(dof, S, D, "dt_offsets");
  const bool segm = gt_rle_bytes.has_value();
  RleSource gsrc, dsrc;
  if (segm) {
    gsrc = {gt_rle_bytes->const_data_ptr<uint8_t>(), gt_rle_index->const_data_ptr<int64_t>()};
    dsrc = {dt_rle_bytes->const_data_ptr<uint8_t>(), dt_rle_index->const_data_ptr<int64_t>()};
    check_rle_index(gsrc.index, G, gt_rle_bytes->size(0), "gt_rle_index");
    check_rle_index(dsrc.index, D, dt_rle_bytes->size(0), "dt_rle_index");
  }

  auto dt_order = aten::empty({D}, kLong, gt_boxes);
  auto codes = aten::zeros({A, T, D}, ScalarType::Byte, gt_boxes);
  auto gt_valid = aten::zeros({A, S}, kLong, gt_boxes);
  // -1 everywhere a detection is unmatched or beyond max_dets; only allocated when asked for (A x T x D int64).
  auto matched_gt = return_matches ? aten::full({A, T, D}, -1.0, kLong, gt_boxes) : aten::empty({0}, kLong, gt_boxes);
  const double* gb = gt_boxes.const_data_ptr<double>();
  const double* ga = gt_areas.const_data_ptr<double>();
  const uint8_t* gc = gt_crowd.const_data_ptr<uint8_t>();
  const double* gid = gt_ids.const_data_ptr<double>();
  const double* db = dt_boxes.const_data_ptr<double>();
  const double* da = dt_areas.const_data_ptr<double>();
  const double* dsc = dt_scores.const_data_ptr<double>();
  const double* did = dt_ids.const_data_ptr<double>();
  const double* thr = iou_thresholds.const_data_ptr<double>();
  const double* rng = area_ranges.const_data_ptr<double>();
  int64_t* order_out = dt_order.mutable_data_ptr<int64_t>();
  uint8_t* code_out = codes.mutable_data_ptr<uint8_t>();
  int64_t* valid_out = gt_valid.mutable_data_ptr<int64_t>();
  int64_t* match_out = return_matches ? matched_gt.mutable_data_ptr<int64_t>() : nullptr;

  auto decode = [](const RleSource& src, int64_t i, Scratch& sc, Rle& r) {
    const int64_t* row = src.index + 4 * i;
    r.begin = static_cast<int64_t>(sc.counts.size());
    decode_counts(src.bytes + row[0], row[1] - row[0], sc.counts, r.m);
    r.h = static_cast<uint64_t>(row[2]);
    r.w = static_cast<uint64_t>(row[3]);
  };

  parallel_for(0, S, 64, [&](int64_t begin, int64_t end) {
    Scratch sc;
    for (int64_t s = begin; s < end; ++s) {
      const int64_t g0 = go[s], ng = go[s + 1] - g0, d0 = dof[s], nd_all = dof[s + 1] - d0;
      sc.order.resize(nd_all);
      std::iota(sc.order.begin(), sc.order.end(), d0);
      std::stable_sort(sc.order.begin(), sc.order.end(),
                       [&](int64_t a, int64_t b) { return score_before(dsc[a], dsc[b]); });
      std::copy(sc.order.begin(), sc.order.end(), order_out + d0);
      const int64_t nd = std::min(nd_all, max_dets);

      sc.iou.resize(nd * ng);
      if (segm && nd > 0 && ng > 0) {
        sc.counts.clear();
        sc.gt_rle.resize(ng);
        sc.dt_rle.resize(nd);
        for (int64_t g = 0; g < ng; ++g) decode(gsrc, g0 + g, sc, sc.gt_rle[g]);
        for (int64_t d = 0; d < nd; ++d) decode(dsrc, sc.order[d], sc, sc.dt_rle[d]);
        // Boxes and areas once the buffer has stopped growing (its data pointer is stable from here on).
        for (auto& r : sc.gt_rle) rle_box_and_area(r, sc.counts.data() + r.begin);
        for (auto& r : sc.dt_rle) rle_box_and_area(r, sc.counts.data() + r.begin);
        const uint32_t* cnt = sc.counts.data();
        for (int64_t d = 0; d < nd; ++d) {
          const Rle& dr = sc.dt_rle[d];
          for (int64_t g = 0; g < ng; ++g) {
            const Rle& gr = sc.gt_rle[g];
            sc.iou[d * ng + g] = mask_iou(dr, cnt + dr.begin, gr, cnt + gr.begin, gc[g0 + g] != 0);
          }
        }
      } else {
        for (int64_t d = 0; d < nd; ++d) {
          const double* box = db + 4 * sc.order[d];
          for (int64_t g = 0; g < ng; ++g) sc.iou[d * ng + g] = box_iou(box, gb + 4 * (g0 + g), gc[g0 + g] != 0);
        }
      }

      for (int64_t a = 0; a < A; ++a) {
        const double lo = rng[2 * a], hi = rng[2 * a + 1];
        // pycocotools' stable argsort of the ignore flags: regular ground truth first, each part in input order.
        sc.gt_order.clear();
        sc.gt_ignored.clear();
        for (int pass = 0; pass < 2; ++pass) {
          for (int64_t g = 0; g < ng; ++g) {
            const double area = ga[g0 + g];
            const bool ignored = gc[g0 + g] != 0 || area < lo || area > hi;
            if (ignored == (pass == 1)) {
              sc.gt_order.push_back(g);
              sc.gt_ignored.push_back(ignored);
            }
          }
          if (pass == 0) valid_out[a * S + s] = static_cast<int64_t>(sc.gt_order.size());
        }
        for (int64_t t = 0; t < T; ++t) {
          uint8_t* out = code_out + (a * T + t) * D + d0;
          int64_t* match_row = match_out ? match_out + (a * T + t) * D + d0 : nullptr;
          sc.gt_match.assign(ng, 0.0);
          const double start = std::min(thr[t], 1 - 1e-10);
          for (int64_t d = 0; d < nd; ++d) {
            const int64_t det = sc.order[d];
            int64_t m = -1;
            double best = start;
            for (int64_t gi = 0; gi < ng; ++gi) {
              const int64_t g = sc.gt_order[gi];
              if (sc.gt_match[gi] > 0 && gc[g0 + g] == 0) continue;
              if (m > -1 && !sc.gt_ignored[m] && sc.gt_ignored[gi]) break;
              const double v = sc.iou[d * ng + g];
              if (v < best) continue;
              best = v;
              m = gi;
            }
            bool matched = false, ignored = false;
            if (m > -1) {
              ignored = sc.gt_ignored[m] != 0;
              matched = gid[g0 + sc.gt_order[m]] != 0;
              sc.gt_match[m] = did[det];
              if (match_row) match_row[d] = g0 + sc.gt_order[m];
            }
            const double area = da[det];
            ignored = ignored || (!matched && (area < lo || area > hi));
            out[d] = kEvaluated | (matched ? kMatched : 0) | (ignored ? kIgnored : 0);
          }
        }
      }
    }
  });
  return {dt_order, codes, gt_valid, matched_gt};
}

std::tuple<Tensor, Tensor, Tensor> coco_accumulate_cpu(const Tensor& dt_scores, const Tensor& dt_order,
                                                       const Tensor& codes, const Tensor& dt_offsets,
                                                       const Tensor& category_offsets, const Tensor& gt_valid,
                                                       const Tensor& max_dets, const Tensor& recall_thresholds) {
  const int64_t D = dt_scores.size(0), A = codes.size(0), T = codes.size(1), S = dt_offsets.size(0) - 1;
  const int64_t K = category_offsets.size(0) - 1, M = max_dets.size(0), R = recall_thresholds.size(0);
  const int64_t* dof = dt_offsets.const_data_ptr<int64_t>();
  const int64_t* cof = category_offsets.const_data_ptr<int64_t>();
  const int64_t* md = max_dets.const_data_ptr<int64_t>();
  const int64_t* order = dt_order.const_data_ptr<int64_t>();
  check_offsets(dof, S, D, "dt_offsets");
  check_offsets(cof, K, S, "category_offsets");
  for (int64_t m = 0; m < M; ++m) {
    FASTDET_CHECK(md[m] >= 0 && (m == 0 || md[m - 1] <= md[m]), "max_dets must be non-negative and ascending, got ",
                  md[m], " at ", m);
  }
  for (int64_t p = 0; p < D; ++p) {
    FASTDET_CHECK(order[p] >= 0 && order[p] < D, "dt_order must hold indices in [0, ", D, "), got ", order[p]);
  }

  auto precision = aten::full({T, R, K, A, M}, -1.0, kDouble, dt_scores);
  auto recall = aten::full({T, K, A, M}, -1.0, kDouble, dt_scores);
  auto scores = aten::full({T, R, K, A, M}, -1.0, kDouble, dt_scores);
  const double* dsc = dt_scores.const_data_ptr<double>();
  const uint8_t* cd = codes.const_data_ptr<uint8_t>();
  const int64_t* valid = gt_valid.const_data_ptr<int64_t>();
  const double* rt = recall_thresholds.const_data_ptr<double>();
  double* prec_out = precision.mutable_data_ptr<double>();
  double* rec_out = recall.mutable_data_ptr<double>();
  double* score_out = scores.mutable_data_ptr<double>();
  const int64_t max_all = M > 0 ? md[M - 1] : 0;
  if (A == 0 || T == 0 || M == 0 || K == 0) return {precision, recall, scores};

  parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    struct Entry {
      double score;
      int64_t position;
      int64_t rank;
    };
    std::vector<Entry> entries;
    std::vector<uint8_t> gathered;
    std::vector<int64_t> tps, counted, tp_at;
    std::vector<double> suffix_max;
    std::vector<std::vector<int64_t>> kept_by_limit(M);
    for (int64_t k = begin; k < end; ++k) {
      // The category's detections in pycocotools' concatenation order (image order, then rank), limited to the
      // largest max_dets, then one stable sort by score: restricting it to a smaller max_dets keeps the order.
      entries.clear();
      for (int64_t s = cof[k]; s < cof[k + 1]; ++s) {
        const int64_t n = std::min(dof[s + 1] - dof[s], max_all);
        for (int64_t r = 0; r < n; ++r) {
          const int64_t p = dof[s] + r;
          if (!(cd[p] & kEvaluated)) break;
          entries.push_back({dsc[order[p]], p, r});
        }
      }
      std::stable_sort(entries.begin(), entries.end(),
                       [](const Entry& a, const Entry& b) { return score_before(a.score, b.score); });
      const auto n = static_cast<int64_t>(entries.size());
      // The detections each max_dets limit keeps, in score order (the same for every area and threshold).
      for (int64_t m = 0; m < M; ++m) {
        kept_by_limit[m].clear();
        for (int64_t i = 0; i < n; ++i) {
          if (entries[i].rank < md[m]) kept_by_limit[m].push_back(i);
        }
      }
      for (int64_t a = 0; a < A; ++a) {
        int64_t npig = 0;
        for (int64_t s = cof[k]; s < cof[k + 1]; ++s) npig += valid[a * S + s];
        if (npig == 0) continue;
        for (int64_t t = 0; t < T; ++t) {
          // This (area, threshold)'s codes in score order, read once from their scattered positions.
          const uint8_t* row = cd + (a * T + t) * D;
          gathered.resize(n);
          for (int64_t i = 0; i < n; ++i) gathered[i] = row[entries[i].position];
          for (int64_t m = 0; m < M; ++m) {
            // One pass keeps integer counts only: tp and the non-ignored count at each kept detection, and the
            // positions of true positives. pycocotools' recall (tp / npig) and precision (tp / (fp + tp + eps))
            // are then evaluated only where they are read, with the same double operations, so they are bitwise
            // the same values.
            const std::vector<int64_t>& kept = kept_by_limit[m];
            const auto nd = static_cast<int64_t>(kept.size());
            if (m > 0 && kept_by_limit[m - 1].size() == kept.size()) {
              // A larger limit that keeps nothing more (nested sets of equal size are equal): same results.
              rec_out[((t * K + k) * A + a) * M + m] = rec_out[((t * K + k) * A + a) * M + m - 1];
              for (int64_t r = 0; r < R; ++r) {
                const int64_t at = (((t * R + r) * K + k) * A + a) * M + m;
                prec_out[at] = prec_out[at - 1];
                score_out[at] = score_out[at - 1];
              }
              continue;
            }
            tps.resize(nd);
            counted.resize(nd);
            tp_at.clear();
            int64_t tp = 0, nonignored = 0;
            for (int64_t j = 0; j < nd; ++j) {
              const uint8_t c = gathered[kept[j]];
              const bool regular = !(c & kIgnored);
              const bool hit = regular && (c & kMatched);
              nonignored += regular;
              tp += hit;
              if (hit) tp_at.push_back(j);
              tps[j] = tp;
              counted[j] = nonignored;
            }
            auto recall_at = [&](int64_t i) { return static_cast<double>(tps[i]) / static_cast<double>(npig); };
            auto precision_at = [&](int64_t i) {
              const double tpd = static_cast<double>(tps[i]), fpd = static_cast<double>(counted[i] - tps[i]);
              return tpd / (fpd + tpd + 2.220446049250313e-16);  // np.spacing(1)
            };
            rec_out[((t * K + k) * A + a) * M + m] = nd ? recall_at(nd - 1) : 0.0;
            // pycocotools' envelope makes precision[i] the maximum of precision[i:]. Past a false positive or an
            // ignored detection precision never rises (tp is unchanged and the rounded denominator does not
            // shrink), so that maximum is precision[i] or the precision at a later true positive: a suffix
            // maximum over the true positives suffices.
            suffix_max.resize(tp_at.size());
            for (int64_t j = static_cast<int64_t>(tp_at.size()) - 1; j >= 0; --j) {
              const double v = precision_at(tp_at[j]);
              suffix_max[j] = j + 1 < static_cast<int64_t>(tp_at.size()) ? std::max(v, suffix_max[j + 1]) : v;
            }
            for (int64_t r = 0; r < R; ++r) {
              const int64_t at = (((t * R + r) * K + k) * A + a) * M + m;
              prec_out[at] = 0.0;
              score_out[at] = 0.0;
            }
            // searchsorted(rc, recThrs, side="left"); pycocotools stops at the first threshold past the end.
            for (int64_t r = 0; r < R; ++r) {
              int64_t lo = 0, hi = nd;
              while (lo < hi) {
                const int64_t mid = lo + (hi - lo) / 2;
                if (numpy_less(recall_at(mid), rt[r])) {
                  lo = mid + 1;
                } else {
                  hi = mid;
                }
              }
              const int64_t pi = lo;
              if (pi >= nd) break;
              double value = precision_at(pi);
              const auto later = std::upper_bound(tp_at.begin(), tp_at.end(), pi) - tp_at.begin();
              if (later < static_cast<int64_t>(tp_at.size()) && suffix_max[later] > value) value = suffix_max[later];
              const int64_t at = (((t * R + r) * K + k) * A + a) * M + m;
              prec_out[at] = value;
              score_out[at] = entries[kept[pi]].score;
            }
          }
        }
      }
    }
  });
  return {precision, recall, scores};
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_coco_evaluate_kernel", TORCH_BOX(&fastdet::coco_evaluate_cpu));
  m.impl("_coco_accumulate_kernel", TORCH_BOX(&fastdet::coco_accumulate_cpu));
}
