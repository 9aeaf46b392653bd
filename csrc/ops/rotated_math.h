#pragma once
// Rotated boxes, shared by the CPU and CUDA kernels of box_iou_rotated and the rotated NMS family, so both backends
// evaluate every pair with the same arithmetic.
//
// A rotated box is (cx, cy, w, h, angle): centre, width, height and an angle in degrees, counter-clockwise in the image
// plane (y pointing down), as torchvision's 'cxcywhr'. Its corners, in torchvision's 'xyxyxyxy' order (top-left,
// top-right, bottom-right, bottom-left of the unrotated box), are
//   (cx + dx cos(t) + dy sin(t), cy - dx sin(t) + dy cos(t))   for (dx, dy) = (-w/2, -h/2), (w/2, -h/2), ...
// The intersection of two boxes is the exact intersection of two convex polygons: one rectangle clipped by the four
// edge half-planes of the other (Sutherland-Hodgman), its area by the shoelace formula. Each pair is evaluated in a
// frame centred on the midpoint of the two centres, so coordinates stay small and the products lose little precision.
//
// T is the computation type: float (for float16/bfloat16/float32 boxes) or double. The CPU and CUDA kernels agree to
// rounding, not bitwise: the device's sin/cos differ from the host's by an ulp or two, and nvcc may contract products
// and sums into fused multiply-adds. Both stay within a few ulps of the exact IoU of the given boxes.
#include <torch/headeronly/macros/Macros.h>

#include <cmath>

namespace fastdet {
namespace rotated {

template <typename T>
struct Point {
  T x, y;
};

// A box prepared for pairwise tests: centre, area w * h, radius of its circumscribed circle (half its diagonal), and
// the corner offsets from the centre.
template <typename T>
struct Rect {
  T cx, cy, area, radius;
  Point<T> offset[4];
};

C10_HOST_DEVICE inline float cos_of(float x) {
  return cosf(x);
}
C10_HOST_DEVICE inline double cos_of(double x) {
  return cos(x);
}
C10_HOST_DEVICE inline float sin_of(float x) {
  return sinf(x);
}
C10_HOST_DEVICE inline double sin_of(double x) {
  return sin(x);
}

// Degrees to radians as torchvision's box_convert: r * pi / 180.
template <typename T>
C10_HOST_DEVICE inline T radians(T degrees) {
  return degrees * static_cast<T>(3.14159265358979323846) / T(180);
}

template <typename T>
C10_HOST_DEVICE inline Rect<T> make_rect(T cx, T cy, T w, T h, T angle) {
  const T theta = radians(angle);
  const T c = cos_of(theta), s = sin_of(theta);
  const T hw = w / T(2), hh = h / T(2);
  const T dx[4] = {-hw, hw, hw, -hw};
  const T dy[4] = {-hh, -hh, hh, hh};
  Rect<T> r;
  r.cx = cx;
  r.cy = cy;
  r.area = w * h;
  r.radius = sqrt(w * w + h * h) / T(2);
  for (int k = 0; k < 4; ++k) {
    r.offset[k] = Point<T>{dx[k] * c + dy[k] * s, dy[k] * c - dx[k] * s};
  }
  return r;
}

// Room for the clipped polygon: a convex polygon clipped by a half-plane gains at most one vertex (4 + 4 = 8 in exact
// arithmetic); the extra room absorbs near-collinear vertices whose side rounding puts on both sides. Vertices past
// the capacity are dropped (never an out-of-bounds write).
constexpr int kMaxVertices = 24;

// Area of the intersection of rectangles a and b (corners relative to the same origin). b's corners must not be
// collinear (callers reject boxes of tiny area first).
template <typename T>
C10_HOST_DEVICE inline T intersection_area(const Point<T> (&a)[4], const Point<T> (&b)[4]) {
  Point<T> buffer0[kMaxVertices], buffer1[kMaxVertices];
  Point<T>* in = buffer0;
  Point<T>* out = buffer1;
  for (int k = 0; k < 4; ++k) in[k] = a[k];
  int n = 4;
  // b's orientation (the sign of its signed area): the inside of each edge is on the same side for all four edges.
  const T turn = (b[1].x - b[0].x) * (b[2].y - b[1].y) - (b[1].y - b[0].y) * (b[2].x - b[1].x);
  const T sign = turn >= T(0) ? T(1) : T(-1);
  for (int e = 0; e < 4 && n > 0; ++e) {
    const Point<T> p = b[e];
    const Point<T> q = b[(e + 1) & 3];
    const T ex = q.x - p.x, ey = q.y - p.y;
    int m = 0;
    T du = sign * (ex * (in[0].y - p.y) - ey * (in[0].x - p.x));
    for (int i = 0; i < n; ++i) {
      const Point<T> u = in[i];
      const Point<T> v = in[i + 1 < n ? i + 1 : 0];
      const T dv = sign * (ex * (v.y - p.y) - ey * (v.x - p.x));
      if (du >= T(0) && m < kMaxVertices) out[m++] = u;
      // Strict sign change: the edge u -> v crosses the line inside its span.
      if (((du > T(0) && dv < T(0)) || (du < T(0) && dv > T(0))) && m < kMaxVertices) {
        const T t = du / (du - dv);
        out[m++] = Point<T>{u.x + t * (v.x - u.x), u.y + t * (v.y - u.y)};
      }
      du = dv;
    }
    Point<T>* tmp = in;
    in = out;
    out = tmp;
    n = m;
  }
  if (n < 3) return T(0);
  T twice = T(0);
  for (int i = 0; i < n; ++i) {
    const Point<T> u = in[i];
    const Point<T> v = in[i + 1 < n ? i + 1 : 0];
    twice += u.x * v.y - u.y * v.x;
  }
  const T area = twice / T(2);
  return area >= T(0) ? area : -area;
}

// Boxes of area below this have IoU 0 with everything (torchvision's rule; it also covers zero-size and negative-size
// boxes, whose corners are collinear).
template <typename T>
C10_HOST_DEVICE inline bool too_small(T area) {
  return area < static_cast<T>(1e-14);
}

// IoU of a and b: intersection / (area_a + area_b - intersection), in [0, 1]; 0 if either box is (nearly) empty.
// Not exactly symmetric in rounding: callers that need reproducible decisions always pass the boxes in the same order.
template <typename T>
C10_HOST_DEVICE inline T iou(const Rect<T>& a, const Rect<T>& b) {
  if (too_small(a.area) || too_small(b.area)) return T(0);
  // Boxes whose circumscribed circles are apart (with a margin far above rounding) cannot intersect: the clipping
  // would return an empty polygon, so this shortcut changes no result. NaN compares false and takes the full path.
  const T dx = a.cx - b.cx, dy = a.cy - b.cy;
  const T reach = (a.radius + b.radius) * static_cast<T>(1.001);
  if (dx * dx + dy * dy > reach * reach) return T(0);
  const T ox = (a.cx + b.cx) / T(2), oy = (a.cy + b.cy) / T(2);
  const T ax = a.cx - ox, ay = a.cy - oy, bx = b.cx - ox, by = b.cy - oy;
  Point<T> pa[4], pb[4];
  for (int k = 0; k < 4; ++k) {
    pa[k] = Point<T>{ax + a.offset[k].x, ay + a.offset[k].y};
    pb[k] = Point<T>{bx + b.offset[k].x, by + b.offset[k].y};
  }
  // The exact intersection never exceeds the smaller box; clamping its rounding keeps every IoU <= 1 (an IoU
  // threshold of 1 then never suppresses, even for two copies of one box).
  const T smaller = a.area < b.area ? a.area : b.area;
  T inter = intersection_area(pa, pb);
  inter = inter > smaller ? smaller : inter;
  return inter / (a.area + b.area - inter);
}

}  // namespace rotated
}  // namespace fastdet
