// Selective search (Uijlings, van de Sande, Gevers and Smeulders, "Selective Search for Object Recognition", IJCV
// 2013) on the CPU. For each strategy (colour space, k, similarity mask):
//
// 1. The RGB image is converted to the strategy's colour space (uint8 channels, see convert()).
// 2. Felzenszwalb-Huttenlocher graph segmentation (IJCV 2004): each channel is smoothed with a Gaussian of `sigma`,
//    the 8-neighbour grid graph gets edge weights = Euclidean distance of the smoothed colours, edges are visited by
//    increasing weight (ties by position: a stable radix sort), and two components merge when the edge weight is at
//    most both internal thresholds Int(C) + k / |C|. Components smaller than min_size are then merged along the
//    sorted edges. Segment labels are numbered in raster order of their first pixel.
// 3. Hierarchical grouping: each region holds a colour histogram (25 bins per channel) and a texture histogram
//    (8 orientations x 10 bins per channel: half-wave-rectified Gaussian derivatives, sigma = 1, binned relative to
//    the image's maximum response per channel and orientation), its size and its box. The similarity of two
//    neighbouring regions (8-connected) is the sum of the selected measures: histogram intersections of the
//    L1-normalised colour / texture histograms, size 1 - (|a| + |b|) / |image| and fill
//    1 - (|box(a u b)| - |a| - |b|) / |image|. The most similar pair merges into a new region (ids grow: initial
//    segments 0..R-1, then one id per merge); ties go to the pair with the smaller (a, b) ids. A max-heap holds the
//    pair similarities; pairs with a merged-away region are skipped when popped (regions never change after
//    creation, so a pair's similarity never goes stale otherwise). The intersections are computed exactly in integers
//    (sum of min(h_a * |b|, h_b * |a|) over (channels * |a| * |b|)), so every similarity is one rounded division and
//    the Python reference reproduces the order bit for bit.
// 4. Ranking: region i of a strategy with T regions (creation order) has hierarchy position T - i (the last merge,
//    the whole image, is 1) and value position * u, u uniform in [0, 1) drawn from a generator seeded by (seed,
//    strategy index). All strategies' regions are sorted by increasing value (ties by strategy, then region), and a
//    box equal to an earlier one is dropped.
//
// Work is parallel over colour spaces (conversion, texture, sorted edges), over (colour space, k) segmentations and
// over strategies (grouping); the results do not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <queue>
#include <unordered_set>
#include <vector>

#include "ops/selective_search.h"
#include "ops/stable.h"

namespace fastdet {
namespace {

namespace ss = selective_search;

// ------------------------------------------------------------------------------------------------ colour spaces
// sRGB (0..255) to linear light, for Lab.
const float* srgb_to_linear_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(256);
    for (int v = 0; v < 256; ++v) {
      const double c = v / 255.0;
      t[v] = static_cast<float>(c <= 0.04045 ? c / 12.92 : std::pow((c + 0.055) / 1.055, 2.4));
    }
    return t;
  }();
  return table.data();
}

inline uint8_t to_byte(float v) { return static_cast<uint8_t>(std::min(255.0f, std::max(0.0f, std::nearbyint(v)))); }

// Hue in [0, 360) of (r, g, b) as 0..255 (0 for greys), the scaling of OpenCV's full-range HSV.
inline uint8_t hue_byte(int r, int g, int b) {
  const int mx = std::max(r, std::max(g, b)), mn = std::min(r, std::min(g, b));
  const float d = static_cast<float>(mx - mn);
  if (d == 0) return 0;
  float h;
  if (mx == r) {
    h = 60.0f * (g - b) / d;
  } else if (mx == g) {
    h = 60.0f * ((b - r) / d + 2.0f);
  } else {
    h = 60.0f * ((r - g) / d + 4.0f);
  }
  if (h < 0) h += 360.0f;
  return static_cast<uint8_t>(std::min(255, static_cast<int>(h * (256.0f / 360.0f))));
}

// CIE L*, a*, b* (D65 white) of an sRGB pixel, as bytes: L * 255 / 100, a + 128, b + 128.
inline void lab_bytes(int r, int g, int b, uint8_t* L, uint8_t* A, uint8_t* B) {
  const float* lin = srgb_to_linear_table();
  const float R = lin[r], G = lin[g], Bl = lin[b];
  const float X = (0.412453f * R + 0.357580f * G + 0.180423f * Bl) / 0.950456f;
  const float Y = 0.212671f * R + 0.715160f * G + 0.072169f * Bl;
  const float Z = (0.019334f * R + 0.119193f * G + 0.950227f * Bl) / 1.088754f;
  auto f = [](float t) { return t > 0.008856f ? std::cbrt(t) : 7.787f * t + 16.0f / 116.0f; };
  const float fx = f(X), fy = f(Y), fz = f(Z);
  const float l = Y > 0.008856f ? 116.0f * fy - 16.0f : 903.3f * Y;
  if (L) *L = to_byte(l * 255.0f / 100.0f);
  if (A) *A = to_byte(500.0f * (fx - fy) + 128.0f);
  if (B) *B = to_byte(200.0f * (fy - fz) + 128.0f);
}

// rgb: planar [3][n] bytes. Returns planar [C][n] bytes of the colour space.
std::vector<uint8_t> convert(const uint8_t* rgb, int64_t n, int64_t space) {
  const int64_t C = ss::channels_of(space);
  std::vector<uint8_t> out(C * n);
  const uint8_t *R = rgb, *G = rgb + n, *B = rgb + 2 * n;
  uint8_t *o0 = out.data(), *o1 = C == 3 ? o0 + n : nullptr, *o2 = C == 3 ? o0 + 2 * n : nullptr;
  for (int64_t p = 0; p < n; ++p) {
    const int r = R[p], g = G[p], b = B[p];
    switch (space) {
      case ss::kRGB:
        o0[p] = r, o1[p] = g, o2[p] = b;
        break;
      case ss::kHSV: {
        const int mx = std::max(r, std::max(g, b)), mn = std::min(r, std::min(g, b));
        o0[p] = hue_byte(r, g, b);
        o1[p] = mx == 0 ? 0 : static_cast<uint8_t>(((mx - mn) * 255 + mx / 2) / mx);
        o2[p] = static_cast<uint8_t>(mx);
        break;
      }
      case ss::kLab:
        lab_bytes(r, g, b, &o0[p], &o1[p], &o2[p]);
        break;
      case ss::kRGI: {
        const int s = r + g + b;
        o0[p] = s == 0 ? 0 : static_cast<uint8_t>((255 * r + s / 2) / s);
        o1[p] = s == 0 ? 0 : static_cast<uint8_t>((255 * g + s / 2) / s);
        o2[p] = static_cast<uint8_t>((s + 1) / 3);
        break;
      }
      case ss::kHue:
        o0[p] = hue_byte(r, g, b);
        break;
      case ss::kIntensity:
        o0[p] = static_cast<uint8_t>((r + g + b + 1) / 3);
        break;
      default:  // kLightness
        lab_bytes(r, g, b, &o0[p], nullptr, nullptr);
        break;
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------------------ image filters
// Separable Gaussian blur of one float plane (borders replicated); sigma ~ 0 copies.
void gaussian_blur(const float* src, float* dst, int64_t H, int64_t W, double sigma) {
  if (sigma < 0.01) {
    std::copy(src, src + H * W, dst);
    return;
  }
  const int64_t radius = static_cast<int64_t>(std::ceil(4.0 * sigma));
  std::vector<float> kernel(2 * radius + 1);
  double total = 0;
  for (int64_t i = -radius; i <= radius; ++i) total += std::exp(-0.5 * (i * i) / (sigma * sigma));
  for (int64_t i = -radius; i <= radius; ++i) {
    kernel[i + radius] = static_cast<float>(std::exp(-0.5 * (i * i) / (sigma * sigma)) / total);
  }
  std::vector<float> tmp(H * W), padded(W + 2 * radius);
  for (int64_t y = 0; y < H; ++y) {
    // the row with its border pixels replicated radius times on each side, so the taps need no clamping
    const float* row = src + y * W;
    std::fill(padded.begin(), padded.begin() + radius, row[0]);
    std::copy(row, row + W, padded.begin() + radius);
    std::fill(padded.begin() + radius + W, padded.end(), row[W - 1]);
    for (int64_t x = 0; x < W; ++x) {
      const float* taps = padded.data() + x;
      float acc = 0;
      for (int64_t i = 0; i <= 2 * radius; ++i) acc += kernel[i] * taps[i];
      tmp[y * W + x] = acc;
    }
  }
  for (int64_t y = 0; y < H; ++y) {
    for (int64_t x = 0; x < W; ++x) dst[y * W + x] = 0;
    for (int64_t i = -radius; i <= radius; ++i) {
      const float w = kernel[i + radius];
      const float* row = tmp.data() + std::min(H - 1, std::max<int64_t>(0, y + i)) * W;
      float* out = dst + y * W;
      for (int64_t x = 0; x < W; ++x) out[x] += w * row[x];
    }
  }
}

// Texture bins [C * 8][n]: for each channel and orientation theta = o * 45 degrees, the positive part of the
// directional derivative of the channel smoothed with sigma = 1, as 0..9 relative to its maximum over the image.
std::vector<uint8_t> texture_bins(const std::vector<uint8_t>& planes, int64_t C, int64_t H, int64_t W) {
  const int64_t n = H * W;
  std::vector<uint8_t> bins(C * ss::kOrientations * n, 0);
  std::vector<float> plane(n), smooth(n), gx(n), gy(n), response(n);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t p = 0; p < n; ++p) plane[p] = planes[c * n + p];
    gaussian_blur(plane.data(), smooth.data(), H, W, 1.0);
    for (int64_t y = 0; y < H; ++y) {
      const int64_t up = std::max<int64_t>(0, y - 1), down = std::min(H - 1, y + 1);
      for (int64_t x = 0; x < W; ++x) {
        const int64_t left = std::max<int64_t>(0, x - 1), right = std::min(W - 1, x + 1);
        gx[y * W + x] = 0.5f * (smooth[y * W + right] - smooth[y * W + left]);
        gy[y * W + x] = 0.5f * (smooth[down * W + x] - smooth[up * W + x]);
      }
    }
    for (int64_t o = 0; o < ss::kOrientations; ++o) {
      const double angle = o * M_PI / 4.0;
      const float ca = static_cast<float>(std::cos(angle)), sa = static_cast<float>(std::sin(angle));
      float peak = 0;
      for (int64_t p = 0; p < n; ++p) {
        response[p] = std::max(0.0f, ca * gx[p] + sa * gy[p]);
        peak = std::max(peak, response[p]);
      }
      uint8_t* out = bins.data() + (c * ss::kOrientations + o) * n;
      if (peak <= 0) continue;
      const float scale = static_cast<float>(ss::kTextureBins) / peak;
      for (int64_t p = 0; p < n; ++p) {
        const int64_t bin = static_cast<int64_t>(response[p] * scale);
        out[p] = static_cast<uint8_t>(std::min<int64_t>(ss::kTextureBins - 1, bin));
      }
    }
  }
  return bins;
}

// ------------------------------------------------------------------------------------------------ segmentation
// A graph edge: weight (the bits of a non-negative float, which order as the floats do) and pixel * 4 + direction,
// the direction naming the other end: 0 right, 1 down, 2 down-right, 3 up-right (8 bytes an edge: 4 per pixel).
struct Edge {
  uint32_t key;
  uint32_t code;
};

// The other-end offsets of an image W pixels wide, by direction.
struct EdgeEnds {
  int64_t offset[4];
  explicit EdgeEnds(int64_t W) : offset{1, W, W + 1, 1 - W} {}
  int32_t first(const Edge& e) const { return static_cast<int32_t>(e.code >> 2); }
  int32_t second(const Edge& e) const { return static_cast<int32_t>((e.code >> 2) + offset[e.code & 3]); }
};

// The 8-neighbour grid graph of the smoothed colour planes, sorted by weight; ties keep generation order (a stable
// LSD radix sort on the weight bits), so the order is fully determined by the image.
std::vector<Edge> sorted_edges(const std::vector<uint8_t>& planes, int64_t C, int64_t H, int64_t W, double sigma) {
  const int64_t n = H * W;
  std::vector<float> smooth(C * n), plane(n);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t p = 0; p < n; ++p) plane[p] = planes[c * n + p];
    gaussian_blur(plane.data(), smooth.data() + c * n, H, W, sigma);
  }
  std::vector<Edge> edges;
  edges.reserve(4 * n);
  auto add = [&](int64_t p, int64_t q, uint32_t direction) {
    float d = 0;
    for (int64_t c = 0; c < C; ++c) {
      const float diff = smooth[c * n + p] - smooth[c * n + q];
      d += diff * diff;
    }
    const float w = std::sqrt(d);
    uint32_t key;
    std::memcpy(&key, &w, sizeof(key));
    edges.push_back({key, static_cast<uint32_t>(p) * 4 + direction});
  };
  for (int64_t y = 0; y < H; ++y) {
    for (int64_t x = 0; x < W; ++x) {
      const int64_t p = y * W + x;
      if (x + 1 < W) add(p, p + 1, 0);
      if (y + 1 < H) add(p, p + W, 1);
      if (x + 1 < W && y + 1 < H) add(p, p + W + 1, 2);
      if (x + 1 < W && y > 0) add(p, p - W + 1, 3);
    }
  }
  std::vector<Edge> buffer(edges.size());
  for (int shift = 0; shift < 32; shift += 8) {
    size_t count[257] = {0};
    for (const Edge& e : edges) ++count[((e.key >> shift) & 0xFF) + 1];
    if (count[((edges.empty() ? 0 : edges[0].key) >> shift & 0xFF) + 1] == edges.size()) continue;  // one digit
    for (int d = 0; d < 256; ++d) count[d + 1] += count[d];
    for (const Edge& e : edges) buffer[count[(e.key >> shift) & 0xFF]++] = e;
    edges.swap(buffer);
  }
  return edges;
}

// Union-find over pixels; parent, size and internal threshold of a node side by side (one cache line per visit).
struct DisjointSets {
  struct Node {
    int32_t parent, size;
    float threshold;
  };
  std::vector<Node> nodes;
  DisjointSets(int64_t n, float k) : nodes(n) {
    for (int64_t i = 0; i < n; ++i) nodes[i] = {static_cast<int32_t>(i), 1, k};
  }
  int32_t find(int32_t x) {
    while (nodes[x].parent != x) {
      nodes[x].parent = nodes[nodes[x].parent].parent;
      x = nodes[x].parent;
    }
    return x;
  }
  // Joins roots a and b; returns the new root (the larger component, a on ties).
  int32_t join(int32_t a, int32_t b) {
    if (nodes[a].size < nodes[b].size) std::swap(a, b);
    nodes[b].parent = a;
    nodes[a].size += nodes[b].size;
    return a;
  }
};

// Segment labels [n] numbered 0..R-1 in raster order of each segment's first pixel; returns R.
int32_t segment(const std::vector<Edge>& edges, int64_t n, int64_t W, double k, int64_t min_size,
                std::vector<int32_t>& labels) {
  DisjointSets sets(n, static_cast<float>(k));
  const EdgeEnds ends(W);
  // Edges in weight order visit pixels in random order: fetch the nodes of an edge a few edges ahead.
  constexpr size_t kAhead = 16;
  const size_t num_edges = edges.size();
  for (size_t i = 0; i < num_edges; ++i) {
    if (i + kAhead < num_edges) {
      __builtin_prefetch(&sets.nodes[ends.first(edges[i + kAhead])]);
      __builtin_prefetch(&sets.nodes[ends.second(edges[i + kAhead])]);
    }
    const Edge& e = edges[i];
    int32_t a = sets.find(ends.first(e)), b = sets.find(ends.second(e));
    if (a == b) continue;
    float w;
    std::memcpy(&w, &e.key, sizeof(w));
    if (w <= sets.nodes[a].threshold && w <= sets.nodes[b].threshold) {
      const int32_t root = sets.join(a, b);
      sets.nodes[root].threshold = w + static_cast<float>(k / sets.nodes[root].size);
    }
  }
  for (const Edge& e : edges) {
    int32_t a = sets.find(ends.first(e)), b = sets.find(ends.second(e));
    if (a != b && (sets.nodes[a].size < min_size || sets.nodes[b].size < min_size)) sets.join(a, b);
  }
  labels.assign(n, -1);
  std::vector<int32_t> id_of_root(n, -1);
  int32_t count = 0;
  for (int64_t p = 0; p < n; ++p) {
    const int32_t root = sets.find(static_cast<int32_t>(p));
    if (id_of_root[root] < 0) id_of_root[root] = count++;
    labels[p] = id_of_root[root];
  }
  return count;
}

// ------------------------------------------------------------------------------------------------ grouping
// A channel value's bin of the 25-bin colour histogram.
inline int64_t colour_bin(uint8_t value) { return (value * ss::kColourBins) >> 8; }

struct Box {
  int32_t x0, y0, x1, y1;  // inclusive pixel bounds
};

struct PairEntry {
  double similarity;
  int32_t a, b;  // a < b
};

// Max-heap order: higher similarity first, then smaller a, then smaller b.
struct PairAfter {
  bool operator()(const PairEntry& x, const PairEntry& y) const {
    if (x.similarity != y.similarity) return x.similarity < y.similarity;
    if (x.a != y.a) return x.a > y.a;
    return x.b > y.b;
  }
};

// The initial segments of one segmentation, shared by every strategy grouping them: full colour and texture
// histograms (25 C + 80 C bins a segment), sizes, boxes and the deduplicated 8-connected neighbour pairs (a < b).
struct InitialRegions {
  int32_t count = 0;
  int64_t colour_bins = 0, texture_bins = 0;
  std::vector<int32_t> hist;
  std::vector<int64_t> size;
  std::vector<Box> boxes;
  std::vector<uint64_t> pairs;
};

InitialRegions initial_regions(const std::vector<int32_t>& labels, int32_t count, const uint8_t* colour_planes,
                               const uint8_t* texture, int64_t C, int64_t H, int64_t W) {
  const int64_t n = H * W;
  InitialRegions init;
  init.count = count;
  init.colour_bins = ss::kColourBins * C;
  init.texture_bins = ss::kOrientations * ss::kTextureBins * C;
  const int64_t stride = init.colour_bins + init.texture_bins;
  init.hist.assign(count * stride, 0);
  init.size.assign(count, 0);
  init.boxes.assign(count, Box{INT32_MAX, INT32_MAX, -1, -1});
  for (int64_t y = 0; y < H; ++y) {
    for (int64_t x = 0; x < W; ++x) {
      const int64_t p = y * W + x;
      const int32_t r = labels[p];
      ++init.size[r];
      Box& box = init.boxes[r];
      box.x0 = std::min<int32_t>(box.x0, x), box.y0 = std::min<int32_t>(box.y0, y);
      box.x1 = std::max<int32_t>(box.x1, x), box.y1 = std::max<int32_t>(box.y1, y);
      int32_t* h = init.hist.data() + r * stride;
      for (int64_t c = 0; c < C; ++c) ++h[c * ss::kColourBins + colour_bin(colour_planes[c * n + p])];
      int32_t* t = h + init.colour_bins;
      for (int64_t co = 0; co < C * ss::kOrientations; ++co) ++t[co * ss::kTextureBins + texture[co * n + p]];
    }
  }
  std::vector<uint64_t>& pairs = init.pairs;
  auto touch = [&](int32_t a, int32_t b) {
    if (a == b) return;
    if (a > b) std::swap(a, b);
    const uint64_t key = (static_cast<uint64_t>(a) << 32) | static_cast<uint32_t>(b);
    if (pairs.empty() || pairs.back() != key) pairs.push_back(key);
  };
  for (int64_t y = 0; y < H; ++y) {
    for (int64_t x = 0; x < W; ++x) {
      const int32_t r = labels[y * W + x];
      if (x + 1 < W) touch(r, labels[y * W + x + 1]);
      if (y + 1 < H) {
        touch(r, labels[(y + 1) * W + x]);
        if (x + 1 < W) touch(r, labels[(y + 1) * W + x + 1]);
        if (x > 0) touch(r, labels[(y + 1) * W + x - 1]);
      }
    }
  }
  std::sort(pairs.begin(), pairs.end());
  pairs.erase(std::unique(pairs.begin(), pairs.end()), pairs.end());
  return init;
}

class Grouping {
 public:
  // Keeps only the histogram parts the similarity mask uses.
  Grouping(const InitialRegions& init, int64_t C, int64_t H, int64_t W, int64_t mask)
      : C_(C), H_(H), W_(W), mask_(mask) {
    const int32_t num_segments = init.count;
    colour_bins_ = (mask & ss::kColour) ? init.colour_bins : 0;
    texture_bins_ = (mask & ss::kTexture) ? init.texture_bins : 0;
    stride_ = colour_bins_ + texture_bins_;
    const int64_t total = 2 * static_cast<int64_t>(num_segments) - 1;
    hist_.assign(total * stride_, 0);
    size_.assign(total, 0);
    boxes_.assign(total, Box{0, 0, 0, 0});
    std::copy(init.size.begin(), init.size.end(), size_.begin());
    std::copy(init.boxes.begin(), init.boxes.end(), boxes_.begin());
    const int64_t full = init.colour_bins + init.texture_bins;
    for (int32_t r = 0; r < num_segments; ++r) {
      const int32_t* src = init.hist.data() + r * full;
      int32_t* dst = hist_.data() + r * stride_;
      if (colour_bins_) std::copy(src, src + colour_bins_, dst);
      if (texture_bins_) std::copy(src + init.colour_bins, src + full, dst + colour_bins_);
    }
    neighbours_.assign(total, {});
    alive_.assign(total, 0);
    std::fill(alive_.begin(), alive_.begin() + num_segments, 1);
    mark_.assign(total, -1);
    std::vector<PairEntry> initial;
    initial.reserve(init.pairs.size());
    for (uint64_t key : init.pairs) {
      const int32_t a = static_cast<int32_t>(key >> 32), b = static_cast<int32_t>(key & 0xFFFFFFFFu);
      neighbours_[a].push_back(b);
      neighbours_[b].push_back(a);
      initial.push_back({similarity(a, b), a, b});
    }
    heap_ = std::priority_queue<PairEntry, std::vector<PairEntry>, PairAfter>(PairAfter(), std::move(initial));
    count_ = num_segments;
  }

  // Merges until one region is left (the grid graph is connected); returns every region's box in creation order.
  const std::vector<Box>& run() {
    while (!heap_.empty()) {
      const PairEntry top = heap_.top();
      heap_.pop();
      if (!alive_[top.a] || !alive_[top.b]) continue;
      merge(top.a, top.b);
    }
    boxes_.resize(count_);
    return boxes_;
  }

 private:
  // sum over bins of min(h_a * |b|, h_b * |a|): |a| |b| times the intersection of the L1-normalised histograms.
  static int64_t scaled_intersection(const int32_t* ha, const int32_t* hb, int64_t bins, int64_t na, int64_t nb) {
    int64_t total = 0;
    for (int64_t i = 0; i < bins; ++i) total += std::min<int64_t>(ha[i] * nb, hb[i] * na);
    return total;
  }

  double similarity(int32_t a, int32_t b) const {
    const int64_t na = size_[a], nb = size_[b];
    const double image = static_cast<double>(H_ * W_);
    const int32_t* ha = hist_.data() + a * stride_;
    const int32_t* hb = hist_.data() + b * stride_;
    double s = 0.0;
    if (mask_ & ss::kColour) {
      s += static_cast<double>(scaled_intersection(ha, hb, colour_bins_, na, nb)) / static_cast<double>(C_ * na * nb);
    }
    if (mask_ & ss::kTexture) {
      s += static_cast<double>(scaled_intersection(ha + colour_bins_, hb + colour_bins_, texture_bins_, na, nb)) /
           static_cast<double>(ss::kOrientations * C_ * na * nb);
    }
    if (mask_ & ss::kSize) s += 1.0 - static_cast<double>(na + nb) / image;
    if (mask_ & ss::kFill) {
      const Box &p = boxes_[a], &q = boxes_[b];
      const int64_t w = std::max(p.x1, q.x1) - std::min(p.x0, q.x0) + 1;
      const int64_t h = std::max(p.y1, q.y1) - std::min(p.y0, q.y0) + 1;
      s += 1.0 - static_cast<double>(w * h - na - nb) / image;
    }
    return s;
  }

  void merge(int32_t a, int32_t b) {
    const int32_t c = count_++;
    size_[c] = size_[a] + size_[b];
    const Box &p = boxes_[a], &q = boxes_[b];
    boxes_[c] = {std::min(p.x0, q.x0), std::min(p.y0, q.y0), std::max(p.x1, q.x1), std::max(p.y1, q.y1)};
    int32_t* hc = hist_.data() + c * stride_;
    const int32_t* ha = hist_.data() + a * stride_;
    const int32_t* hb = hist_.data() + b * stride_;
    for (int64_t i = 0; i < stride_; ++i) hc[i] = ha[i] + hb[i];
    alive_[a] = alive_[b] = 0;
    alive_[c] = 1;
    std::vector<int32_t>& mine = neighbours_[c];
    for (int32_t r : {a, b}) {
      for (int32_t other : neighbours_[r]) {
        if (alive_[other] && mark_[other] != c) {
          mark_[other] = c;
          mine.push_back(other);
        }
      }
      std::vector<int32_t>().swap(neighbours_[r]);
    }
    for (int32_t other : mine) {
      neighbours_[other].push_back(c);
      heap_.push({similarity(other, c), other, c});
    }
  }

  int64_t C_, H_, W_, mask_;
  int64_t colour_bins_ = 0, texture_bins_ = 0, stride_ = 0;
  std::vector<int32_t> hist_;
  std::vector<int64_t> size_;
  std::vector<Box> boxes_;
  std::vector<std::vector<int32_t>> neighbours_;
  std::vector<char> alive_;
  std::vector<int32_t> mark_;
  std::priority_queue<PairEntry, std::vector<PairEntry>, PairAfter> heap_;
  int32_t count_ = 0;
};

// ------------------------------------------------------------------------------------------------ pipeline
// RGB bytes, planar [3][H * W], from the prepared image (uint8, or float32 clamped to [0, 1] and rounded).
std::vector<uint8_t> rgb_bytes(const Tensor& image) {
  const int64_t count = image.numel();
  std::vector<uint8_t> out(count);
  if (image.scalar_type() == ScalarType::Byte) {
    const uint8_t* src = image.const_data_ptr<uint8_t>();
    std::copy(src, src + count, out.data());
    return out;
  }
  FASTDET_CHECK(image.scalar_type() == kFloat, "_selective_search_kernel: image must be uint8 or float32");
  const float* src = image.const_data_ptr<float>();
  for (int64_t i = 0; i < count; ++i) {
    FASTDET_CHECK(!std::isnan(src[i]), "image must not contain NaN");
    out[i] = to_byte(std::min(1.0f, std::max(0.0f, src[i])) * 255.0f);
  }
  return out;
}

struct SpaceData {
  int64_t space = 0, C = 0;
  std::vector<uint8_t> planes, texture;
  std::vector<Edge> edges;
};

struct SegmentationData {
  size_t space_slot = 0;
  int64_t k = 0, min_size = 0;
  std::vector<int32_t> labels;
  int32_t count = 0;
  InitialRegions initial;
};

int64_t effective_min_size(int64_t min_size, int64_t k) { return min_size > 0 ? min_size : k; }

// Runs every strategy; returns each strategy's region boxes in creation order. segmentations/spaces are filled too.
std::vector<std::vector<Box>> run_strategies(const std::vector<uint8_t>& rgb, int64_t H, int64_t W,
                                             IntArrayRef strategies, int64_t min_size, double sigma,
                                             std::vector<SpaceData>& spaces,
                                             std::vector<SegmentationData>& segmentations) {
  const int64_t n = H * W;
  const int64_t S = static_cast<int64_t>(strategies.size() / 3);
  std::vector<size_t> space_of(S), segmentation_of(S);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t space = strategies[3 * s], k = strategies[3 * s + 1];
    size_t i = 0;
    while (i < spaces.size() && spaces[i].space != space) ++i;
    if (i == spaces.size()) {
      spaces.emplace_back();
      spaces.back().space = space;
      spaces.back().C = ss::channels_of(space);
    }
    space_of[s] = i;
    const int64_t ms = effective_min_size(min_size, k);
    size_t j = 0;
    while (j < segmentations.size() &&
           !(segmentations[j].space_slot == i && segmentations[j].k == k && segmentations[j].min_size == ms)) {
      ++j;
    }
    if (j == segmentations.size()) {
      segmentations.emplace_back();
      segmentations.back().space_slot = i;
      segmentations.back().k = k;
      segmentations.back().min_size = ms;
    }
    segmentation_of[s] = j;
  }
  parallel_for(0, static_cast<int64_t>(spaces.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      SpaceData& d = spaces[i];
      d.planes = convert(rgb.data(), n, d.space);
      d.texture = texture_bins(d.planes, d.C, H, W);
      d.edges = sorted_edges(d.planes, d.C, H, W, sigma);
    }
  });
  parallel_for(0, static_cast<int64_t>(segmentations.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      SegmentationData& g = segmentations[j];
      g.count = segment(spaces[g.space_slot].edges, n, W, static_cast<double>(g.k), g.min_size, g.labels);
      const SpaceData& d = spaces[g.space_slot];
      g.initial = initial_regions(g.labels, g.count, d.planes.data(), d.texture.data(), d.C, H, W);
    }
  });
  for (SpaceData& d : spaces) std::vector<Edge>().swap(d.edges);
  std::vector<std::vector<Box>> regions(S);
  parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const SegmentationData& g = segmentations[segmentation_of[s]];
      Grouping grouping(g.initial, spaces[space_of[s]].C, H, W, strategies[3 * s + 2]);
      regions[s] = grouping.run();
    }
  });
  return regions;
}

// splitmix64: a small, well-mixed generator, seeded per strategy so the draw does not depend on threading.
struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
};

struct Ranked {
  double value;
  int32_t strategy, region;
};

Tensor selective_search_cpu(const Tensor& image, IntArrayRef strategies, int64_t min_size, double sigma,
                            int64_t max_proposals, int64_t seed) {
  FASTDET_CHECK(image.dim() == 3 && image.size(0) == 3 && image.is_contiguous(),
                "_selective_search_kernel: image must be a contiguous [3, H, W] tensor");
  const int64_t H = image.size(1), W = image.size(2);
  if (H == 0 || W == 0 || max_proposals == 0) return aten::zeros({0, 4}, kFloat, image);
  const auto rgb = rgb_bytes(image);
  std::vector<SpaceData> spaces;
  std::vector<SegmentationData> segmentations;
  const auto regions = run_strategies(rgb, H, W, strategies, min_size, sigma, spaces, segmentations);
  std::vector<Ranked> ranked;
  for (size_t s = 0; s < regions.size(); ++s) {
    SplitMix64 rng{static_cast<uint64_t>(seed) * 0xD1B54A32D192ED03ull + (s + 1) * 0x9E3779B97F4A7C15ull};
    const int64_t T = static_cast<int64_t>(regions[s].size());
    for (int64_t i = 0; i < T; ++i) {
      ranked.push_back({static_cast<double>(T - i) * rng.uniform(), static_cast<int32_t>(s), static_cast<int32_t>(i)});
    }
  }
  std::sort(ranked.begin(), ranked.end(), [](const Ranked& x, const Ranked& y) {
    if (x.value != y.value) return x.value < y.value;
    if (x.strategy != y.strategy) return x.strategy < y.strategy;
    return x.region < y.region;
  });
  const size_t limit = max_proposals < 0 ? ranked.size() : static_cast<size_t>(max_proposals);
  std::vector<Box> kept;
  std::unordered_set<uint64_t> seen;
  seen.reserve(ranked.size());
  for (const Ranked& r : ranked) {
    if (kept.size() >= limit) break;
    const Box& b = regions[r.strategy][r.region];
    const uint64_t key = (static_cast<uint64_t>(b.x0) << 48) | (static_cast<uint64_t>(b.y0) << 32) |
                         (static_cast<uint64_t>(b.x1) << 16) | static_cast<uint64_t>(b.y1);
    if (seen.insert(key).second) kept.push_back(b);
  }
  auto out = aten::empty({static_cast<int64_t>(kept.size()), 4}, kFloat, image);
  float* dst = out.mutable_data_ptr<float>();
  for (size_t i = 0; i < kept.size(); ++i) {
    // Inclusive pixel bounds to (x1, y1, x2, y2) with x2, y2 exclusive: a region on columns 3..5 spans [3, 6).
    dst[4 * i] = static_cast<float>(kept[i].x0);
    dst[4 * i + 1] = static_cast<float>(kept[i].y0);
    dst[4 * i + 2] = static_cast<float>(kept[i].x1 + 1);
    dst[4 * i + 3] = static_cast<float>(kept[i].y1 + 1);
  }
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> selective_search_regions_cpu(const Tensor& image, IntArrayRef strategy,
                                                                       int64_t min_size, double sigma) {
  FASTDET_CHECK(image.dim() == 3 && image.size(0) == 3 && image.is_contiguous() && strategy.size() == 3,
                "_selective_search_regions_kernel: image must be a contiguous [3, H, W] tensor and strategy a triple");
  const int64_t H = image.size(1), W = image.size(2), n = H * W;
  const int64_t C = ss::channels_of(strategy[0]);
  if (n == 0) {
    return {aten::zeros({0, 4}, kFloat, image), aten::zeros({H, W}, kLong, image),
            aten::zeros({C, H, W}, kLong, image), aten::zeros({C * ss::kOrientations, H, W}, kLong, image)};
  }
  const auto rgb = rgb_bytes(image);
  std::vector<SpaceData> spaces;
  std::vector<SegmentationData> segmentations;
  const auto regions = run_strategies(rgb, H, W, strategy, min_size, sigma, spaces, segmentations);
  const auto& boxes = regions[0];
  auto out_boxes = aten::empty({static_cast<int64_t>(boxes.size()), 4}, kFloat, image);
  float* b = out_boxes.mutable_data_ptr<float>();
  for (size_t i = 0; i < boxes.size(); ++i) {
    b[4 * i] = static_cast<float>(boxes[i].x0);
    b[4 * i + 1] = static_cast<float>(boxes[i].y0);
    b[4 * i + 2] = static_cast<float>(boxes[i].x1 + 1);
    b[4 * i + 3] = static_cast<float>(boxes[i].y1 + 1);
  }
  auto labels = aten::empty({H, W}, kLong, image);
  std::copy(segmentations[0].labels.begin(), segmentations[0].labels.end(), labels.mutable_data_ptr<int64_t>());
  const SpaceData& d = spaces[0];
  auto colour = aten::empty({C, H, W}, kLong, image);
  int64_t* cb = colour.mutable_data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t p = 0; p < n; ++p) cb[c * n + p] = c * ss::kColourBins + colour_bin(d.planes[c * n + p]);
  }
  auto texture = aten::empty({C * ss::kOrientations, H, W}, kLong, image);
  int64_t* tb = texture.mutable_data_ptr<int64_t>();
  for (int64_t co = 0; co < C * ss::kOrientations; ++co) {
    for (int64_t p = 0; p < n; ++p) tb[co * n + p] = co * ss::kTextureBins + d.texture[co * n + p];
  }
  return {out_boxes, labels, colour, texture};
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_selective_search_kernel", TORCH_BOX(&fastdet::selective_search_cpu));
  m.impl("_selective_search_regions_kernel", TORCH_BOX(&fastdet::selective_search_regions_cpu));
}
