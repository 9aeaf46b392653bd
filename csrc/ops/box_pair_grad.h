#pragma once
// The last step of every per-pair box gradient: from the gradients of the building blocks a pair formula is made of
// (intersection sides, enclosure sides, centre offsets, box sides) back to the eight coordinates. Shared by the
// pairwise IoU family (box_iou_math.h) and the aligned box losses (box_loss_math.h), whose formulas differ (eps
// placement, masks) but whose building blocks are the same.
#include <torch/headeronly/macros/Macros.h>

namespace fastdet {

// Gradients with respect to the building blocks, after each formula applied its own clamp or mask rule.
template <typename T>
struct PairGrads {
  T iw, ih;          // intersection sides: min(x2) - max(x1), min(y2) - max(y1)
  T cw, ch;          // enclosure sides: max(x2) - min(x1), max(y2) - min(y1)
  T dx, dy;          // centre offsets, box a minus box b
  T wa, ha, wb, hb;  // box sides x2 - x1 and y2 - y1 (besides their use in the blocks above)
};

// Elementwise min/max as torch's autograd differentiates it: the gradient goes to the chosen argument and is split
// evenly on a tie.
template <typename T>
C10_HOST_DEVICE inline void route_min_max(T va, T vb, bool pick_larger, T grad, T& to_a, T& to_b) {
  if (va == vb) {
    to_a += grad / T(2);
    to_b += grad / T(2);
  } else if ((va > vb) == pick_larger) {
    to_a += grad;
  } else {
    to_b += grad;
  }
}

// a, b: (x1, y1, x2, y2). Writes ga and gb (they need no initialisation).
template <typename T>
C10_HOST_DEVICE inline void route_pair_grads(const T a[4], const T b[4], const PairGrads<T>& g, T ga[4], T gb[4]) {
  for (int k = 0; k < 4; ++k) {
    ga[k] = T(0);
    gb[k] = T(0);
  }
  route_min_max(a[2], b[2], false, g.iw, ga[2], gb[2]);
  route_min_max(a[0], b[0], true, -g.iw, ga[0], gb[0]);
  route_min_max(a[3], b[3], false, g.ih, ga[3], gb[3]);
  route_min_max(a[1], b[1], true, -g.ih, ga[1], gb[1]);
  route_min_max(a[2], b[2], true, g.cw, ga[2], gb[2]);
  route_min_max(a[0], b[0], false, -g.cw, ga[0], gb[0]);
  route_min_max(a[3], b[3], true, g.ch, ga[3], gb[3]);
  route_min_max(a[1], b[1], false, -g.ch, ga[1], gb[1]);
  // centres: dx = (a.x1 + a.x2) / 2 - (b.x1 + b.x2) / 2
  ga[0] += g.dx / T(2);
  ga[2] += g.dx / T(2);
  gb[0] -= g.dx / T(2);
  gb[2] -= g.dx / T(2);
  ga[1] += g.dy / T(2);
  ga[3] += g.dy / T(2);
  gb[1] -= g.dy / T(2);
  gb[3] -= g.dy / T(2);
  // sides
  ga[2] += g.wa;
  ga[0] -= g.wa;
  ga[3] += g.ha;
  ga[1] -= g.ha;
  gb[2] += g.wb;
  gb[0] -= g.wb;
  gb[3] += g.hb;
  gb[1] -= g.hb;
}

}  // namespace fastdet
