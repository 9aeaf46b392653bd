#pragma once
// Shared constants of selective search (Uijlings et al., IJCV 2013): the colour-space and similarity codes that the
// schema file checks and the CPU kernel interprets. A strategy is a triple (colour space, k, similarity mask).
#include <cstdint>

namespace fastdet {
namespace selective_search {

// Colour spaces: the channels the segmentation, the colour histograms and the texture histograms are computed in.
enum ColorSpace : int64_t {
  kRGB = 0,
  kHSV = 1,
  kLab = 2,
  kRGI = 3,        // normalised r, g and intensity I
  kHue = 4,        // H of HSV, one channel
  kIntensity = 5,  // (R + G + B) / 3, one channel
  kLightness = 6,  // L of Lab, one channel
  kNumColorSpaces = 7,
};

// Similarity measures, OR-ed into a mask: the similarity of two regions is the sum of the selected ones.
constexpr int64_t kColour = 1;
constexpr int64_t kTexture = 2;
constexpr int64_t kSize = 4;
constexpr int64_t kFill = 8;
constexpr int64_t kAllSimilarities = kColour | kTexture | kSize | kFill;

constexpr int64_t kColourBins = 25;      // per channel
constexpr int64_t kOrientations = 8;     // Gaussian-derivative directions, every 45 degrees
constexpr int64_t kTextureBins = 10;     // per channel and orientation
// Images above kMaxSide x kMaxSide are refused: a bound on work and memory (per colour space 4 edges of 8 bytes and
// 27 bytes of features per pixel; "quality" holds 5 colour spaces at once: ~1.3 GB at the limit).
constexpr int64_t kMaxSide = 2048;
constexpr int64_t kMaxK = 1000000;       // bound on the segmentation scale k
constexpr int64_t kMaxStrategies = 256;  // bound on the number of strategies of one call

inline int64_t channels_of(int64_t space) {
  return space == kHue || space == kIntensity || space == kLightness ? 1 : 3;
}

}  // namespace selective_search
}  // namespace fastdet
