// Schemas of the COCO evaluation ops and their argument checks (see coco_eval.h for the layout). The public ops
// coco_evaluate and coco_accumulate check names, dtypes, shapes and devices once, make every tensor contiguous and
// call the private kernels, which check only what depends on the data (offsets and byte ranges in bounds).
// CPU only by design: there is no CUDA kernel (the inputs come from host-side annotation dicts and the work is
// branchy per-image matching); a CUDA tensor is refused with a message saying so.
#include "ops/coco_eval.h"

#include <optional>
#include <tuple>

namespace fastdet {
namespace {

void check_cpu(const Tensor& t, const char* name) {
  FASTDET_CHECK(t.device().type() == torch::headeronly::DeviceType::CPU, name,
                " must be a CPU tensor (COCO evaluation runs on the CPU only), got ", device_of(t));
}

// A contiguous tensor of dtype `dtype` and rank `rank` (and trailing size `last` when last >= 0).
Tensor prepared(const Tensor& t, const char* name, ScalarType dtype, const char* dtype_name, int64_t rank,
                int64_t last = -1) {
  check_cpu(t, name);
  FASTDET_CHECK(t.scalar_type() == dtype, name, " must be a ", dtype_name, " tensor, got ", t.scalar_type());
  FASTDET_CHECK(t.dim() == rank && (last < 0 || t.size(-1) == last), name, " must have rank ", rank,
                last >= 0 ? " with a last dimension of " : "", last >= 0 ? std::to_string(last) : std::string(),
                ", got shape ", shape_of(t));
  return aten::contiguous(t);
}

Tensor f64(const Tensor& t, const char* name, int64_t rank, int64_t last = -1) {
  return prepared(t, name, kDouble, "float64", rank, last);
}
Tensor i64(const Tensor& t, const char* name, int64_t rank, int64_t last = -1) {
  return prepared(t, name, kLong, "int64", rank, last);
}
Tensor u8(const Tensor& t, const char* name, int64_t rank) {
  return prepared(t, name, ScalarType::Byte, "uint8", rank);
}

void check_length(const Tensor& t, const char* name, int64_t n, const char* what) {
  FASTDET_CHECK(t.size(0) == n, name, " must have ", n, " entries (", what, "), got shape ", shape_of(t));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> coco_evaluate_impl(
    const Tensor& gt_boxes, const Tensor& gt_areas, const Tensor& gt_crowd, const Tensor& gt_ids,
    const Tensor& gt_offsets, const Tensor& dt_boxes, const Tensor& dt_areas, const Tensor& dt_scores,
    const Tensor& dt_ids, const Tensor& dt_offsets, const Tensor& iou_thresholds, const Tensor& area_ranges,
    int64_t max_dets, const std::optional<Tensor>& gt_rle_bytes, const std::optional<Tensor>& gt_rle_index,
    const std::optional<Tensor>& dt_rle_bytes, const std::optional<Tensor>& dt_rle_index, bool return_matches) {
  auto gb = f64(gt_boxes, "gt_boxes", 2, 4);
  const int64_t G = gb.size(0);
  auto ga = f64(gt_areas, "gt_areas", 1);
  check_length(ga, "gt_areas", G, "one per ground-truth box");
  auto gc = u8(gt_crowd, "gt_crowd", 1);
  check_length(gc, "gt_crowd", G, "one per ground-truth box");
  auto gi = f64(gt_ids, "gt_ids", 1);
  check_length(gi, "gt_ids", G, "one per ground-truth box");
  auto go = i64(gt_offsets, "gt_offsets", 1);
  auto db = f64(dt_boxes, "dt_boxes", 2, 4);
  const int64_t D = db.size(0);
  auto da = f64(dt_areas, "dt_areas", 1);
  check_length(da, "dt_areas", D, "one per detection");
  auto ds = f64(dt_scores, "dt_scores", 1);
  check_length(ds, "dt_scores", D, "one per detection");
  auto di = f64(dt_ids, "dt_ids", 1);
  check_length(di, "dt_ids", D, "one per detection");
  auto dof = i64(dt_offsets, "dt_offsets", 1);
  FASTDET_CHECK(go.size(0) >= 1 && go.size(0) == dof.size(0), "gt_offsets and dt_offsets must both have S + 1 "
                "entries (S groups), got shapes ", shape_of(go), " and ", shape_of(dof));
  auto thr = f64(iou_thresholds, "iou_thresholds", 1);
  auto ar = f64(area_ranges, "area_ranges", 2, 2);
  FASTDET_CHECK(max_dets >= 0, "max_dets must be non-negative, got ", max_dets);
  const int present = gt_rle_bytes.has_value() + gt_rle_index.has_value() + dt_rle_bytes.has_value() +
                      dt_rle_index.has_value();
  FASTDET_CHECK(present == 0 || present == 4, "gt_rle_bytes, gt_rle_index, dt_rle_bytes and dt_rle_index must be "
                "given together (segm) or not at all (bbox)");
  std::optional<Tensor> grb, gri, drb, dri;
  if (present == 4) {
    grb = u8(*gt_rle_bytes, "gt_rle_bytes", 1);
    gri = i64(*gt_rle_index, "gt_rle_index", 2, 4);
    check_length(*gri, "gt_rle_index", G, "one row per ground-truth mask");
    drb = u8(*dt_rle_bytes, "dt_rle_bytes", 1);
    dri = i64(*dt_rle_index, "dt_rle_index", 2, 4);
    check_length(*dri, "dt_rle_index", D, "one row per detected mask");
  }
  return call_op<std::tuple<Tensor, Tensor, Tensor, Tensor>>("fastdet::_coco_evaluate_kernel", gb, ga, gc, gi, go, db,
                                                              da, ds, di, dof, thr, ar, max_dets, grb, gri, drb, dri,
                                                              return_matches);
}

std::tuple<Tensor, Tensor, Tensor> coco_accumulate_impl(const Tensor& dt_scores, const Tensor& dt_order,
                                                        const Tensor& codes, const Tensor& dt_offsets,
                                                        const Tensor& category_offsets, const Tensor& gt_valid,
                                                        const Tensor& max_dets, const Tensor& recall_thresholds) {
  auto ds = f64(dt_scores, "dt_scores", 1);
  const int64_t D = ds.size(0);
  auto order = i64(dt_order, "dt_order", 1);
  check_length(order, "dt_order", D, "one per detection");
  auto c = u8(codes, "codes", 3);
  FASTDET_CHECK(c.size(2) == D, "codes must have shape [A, T, ", D, "] (one column per detection), got ",
                shape_of(c));
  auto dof = i64(dt_offsets, "dt_offsets", 1);
  FASTDET_CHECK(dof.size(0) >= 1, "dt_offsets must have S + 1 >= 1 entries, got shape ", shape_of(dof));
  auto cof = i64(category_offsets, "category_offsets", 1);
  FASTDET_CHECK(cof.size(0) >= 1, "category_offsets must have K + 1 >= 1 entries, got shape ", shape_of(cof));
  auto valid = i64(gt_valid, "gt_valid", 2);
  FASTDET_CHECK(valid.size(0) == c.size(0) && valid.size(1) == dof.size(0) - 1, "gt_valid must have shape [",
                c.size(0), ", ", dof.size(0) - 1, "] (area ranges x groups), got ", shape_of(valid));
  auto md = i64(max_dets, "max_dets", 1);
  auto rt = f64(recall_thresholds, "recall_thresholds", 1);
  return call_op<std::tuple<Tensor, Tensor, Tensor>>("fastdet::_coco_accumulate_kernel", ds, order, c, dof, cof,
                                                      valid, md, rt);
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  m.def("coco_evaluate(Tensor gt_boxes, Tensor gt_areas, Tensor gt_crowd, Tensor gt_ids, Tensor gt_offsets, "
        "Tensor dt_boxes, Tensor dt_areas, Tensor dt_scores, Tensor dt_ids, Tensor dt_offsets, "
        "Tensor iou_thresholds, Tensor area_ranges, int max_dets, Tensor? gt_rle_bytes=None, "
        "Tensor? gt_rle_index=None, Tensor? dt_rle_bytes=None, Tensor? dt_rle_index=None, "
        "bool return_matches=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("coco_accumulate(Tensor dt_scores, Tensor dt_order, Tensor codes, Tensor dt_offsets, "
        "Tensor category_offsets, Tensor gt_valid, Tensor max_dets, Tensor recall_thresholds) "
        "-> (Tensor, Tensor, Tensor)");
  // Backend kernels: arguments already checked and contiguous (see coco_eval.h); registered for CPU only.
  m.def("_coco_evaluate_kernel(Tensor gt_boxes, Tensor gt_areas, Tensor gt_crowd, Tensor gt_ids, "
        "Tensor gt_offsets, Tensor dt_boxes, Tensor dt_areas, Tensor dt_scores, Tensor dt_ids, Tensor dt_offsets, "
        "Tensor iou_thresholds, Tensor area_ranges, int max_dets, Tensor? gt_rle_bytes, Tensor? gt_rle_index, "
        "Tensor? dt_rle_bytes, Tensor? dt_rle_index, bool return_matches) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_coco_accumulate_kernel(Tensor dt_scores, Tensor dt_order, Tensor codes, Tensor dt_offsets, "
        "Tensor category_offsets, Tensor gt_valid, Tensor max_dets, Tensor recall_thresholds) "
        "-> (Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(fastdet, CompositeExplicitAutograd, m) {
  m.impl("coco_evaluate", TORCH_BOX(&fastdet::coco_evaluate_impl));
  m.impl("coco_accumulate", TORCH_BOX(&fastdet::coco_accumulate_impl));
}
