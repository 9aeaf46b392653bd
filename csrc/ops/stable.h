#pragma once
// fastdet's window on torch: the LibTorch stable ABI only (torch/csrc/stable + torch/headeronly), so one build of
// fastdet runs on every torch from FASTDET_MIN_TORCH (setup.py's TORCH_TARGET_VERSION) onwards. No op file includes
// ATen, c10 or torch/library.h; everything they need from torch goes through this header.
//
// * fastdet::Tensor and friends are the stable types.
// * FASTDET_CHECK(cond, parts...) throws std::runtime_error with the parts streamed together (the caller sees a
//   RuntimeError naming the argument, as with TORCH_CHECK).
// * fastdet::aten:: wraps the few ATen ops the op files compose, calling them through the stable dispatcher
//   (torch_call_dispatcher). The dispatcher call cannot carry a c10::Scalar, so no wrapper takes one: scalars enter as
//   0-d tensors or through the stable C shims that take doubles.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/Dispatch_v2.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastdet {

using torch::stable::Device;
using torch::stable::Tensor;
using torch::headeronly::ScalarType;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

constexpr ScalarType kHalf = ScalarType::Half;
constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
constexpr ScalarType kFloat = ScalarType::Float;
constexpr ScalarType kDouble = ScalarType::Double;
constexpr ScalarType kLong = ScalarType::Long;
constexpr ScalarType kInt = ScalarType::Int;
constexpr ScalarType kBool = ScalarType::Bool;

// ---------------------------------------------------------------------------------------------------------------------
// Messages and checks

// A tensor's shape as "[2, 3]" when streamed: FASTDET_CHECK(..., "got ", shape_of(t)).
struct Shape {
  std::vector<int64_t> dims;
};
inline Shape shape_of(const Tensor& t) {
  const auto s = t.sizes();
  return Shape{std::vector<int64_t>(s.begin(), s.end())};
}
inline Shape shape_of(IntArrayRef s) {
  return Shape{std::vector<int64_t>(s.begin(), s.end())};
}
inline bool same_shape(IntArrayRef a, IntArrayRef b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}
inline std::ostream& operator<<(std::ostream& os, const Shape& s) {
  os << '[';
  for (size_t i = 0; i < s.dims.size(); ++i) os << (i ? ", " : "") << s.dims[i];
  return os << ']';
}

// A device as torch prints it ("cpu", "cuda:0").
struct DeviceName {
  Device device;
};
inline DeviceName device_of(const Tensor& t) {
  return DeviceName{t.device()};
}
inline std::ostream& operator<<(std::ostream& os, const DeviceName& d) {
  if (d.device.type() == torch::headeronly::DeviceType::CPU) return os << "cpu";
  if (d.device.type() == torch::headeronly::DeviceType::CUDA) {
    os << "cuda";
  } else {
    os << "device type " << static_cast<int>(d.device.type());
  }
  if (d.device.has_index()) os << ':' << static_cast<int>(d.device.index());
  return os;
}

namespace detail {
template <typename... Args>
std::string message(const Args&... args) {
  std::ostringstream os;
  ((os << args), ...);
  return os.str();
}
}  // namespace detail

}  // namespace fastdet

// Argument checks: the message is what the user reads, so it names the argument and what was expected.
#define FASTDET_CHECK(cond, ...)                                           \
  do {                                                                     \
    if (!(cond)) {                                                         \
      throw std::runtime_error(::fastdet::detail::message(__VA_ARGS__));   \
    }                                                                      \
  } while (0)

namespace fastdet {

// ---------------------------------------------------------------------------------------------------------------------
// dtypes

inline bool is_floating(ScalarType t) {
  return t == kHalf || t == kBFloat16 || t == kFloat || t == kDouble;
}

inline bool is_integral(ScalarType t, bool include_bool) {
  switch (t) {
    case ScalarType::Byte:
    case ScalarType::Char:
    case ScalarType::Short:
    case ScalarType::Int:
    case ScalarType::Long:
    case ScalarType::UInt16:
    case ScalarType::UInt32:
    case ScalarType::UInt64:
      return true;
    case ScalarType::Bool:
      return include_bool;
    default:
      return false;
  }
}

// The type arithmetic runs in for storage type T (ATen's opmath_type): float for the 16-bit floats, T otherwise.
template <typename T>
struct OpMath {
  using type = T;
};
template <>
struct OpMath<Half> {
  using type = float;
};
template <>
struct OpMath<BFloat16> {
  using type = float;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

// The dtype an op computes in for inputs of dtype t: float64 stays float64, every other floating dtype computes in
// float32 (torchvision's rule for boxes; float16/bfloat16 coordinates are too coarse to compute in).
inline ScalarType accumulation_type(ScalarType t) {
  return t == kDouble ? kDouble : kFloat;
}

// dtype dispatch: runs the lambda-like body with `scalar_t` bound to the C++ type of TYPE. NAME goes in the error.
#define FASTDET_DISPATCH_CASE(ENUM, CTYPE, ...) \
  case ENUM: {                                  \
    using scalar_t = CTYPE;                     \
    __VA_ARGS__();                              \
    break;                                      \
  }

#define FASTDET_DISPATCH_UNSUPPORTED(TYPE, NAME) \
  default:                                       \
    FASTDET_CHECK(false, NAME, ": unsupported dtype ", TYPE);

// float32 and float64.
#define FASTDET_DISPATCH_FLOAT_DOUBLE(TYPE, NAME, ...)                        \
  do {                                                                        \
    switch (TYPE) {                                                           \
      FASTDET_DISPATCH_CASE(::fastdet::kFloat, float, __VA_ARGS__)            \
      FASTDET_DISPATCH_CASE(::fastdet::kDouble, double, __VA_ARGS__)          \
      FASTDET_DISPATCH_UNSUPPORTED(TYPE, NAME)                                \
    }                                                                         \
  } while (0)

// float16, bfloat16, float32 and float64.
#define FASTDET_DISPATCH_FLOATING(TYPE, NAME, ...)                            \
  do {                                                                        \
    switch (TYPE) {                                                           \
      FASTDET_DISPATCH_CASE(::fastdet::kFloat, float, __VA_ARGS__)            \
      FASTDET_DISPATCH_CASE(::fastdet::kDouble, double, __VA_ARGS__)          \
      FASTDET_DISPATCH_CASE(::fastdet::kHalf, ::fastdet::Half, __VA_ARGS__)   \
      FASTDET_DISPATCH_CASE(::fastdet::kBFloat16, ::fastdet::BFloat16, __VA_ARGS__) \
      FASTDET_DISPATCH_UNSUPPORTED(TYPE, NAME)                                \
    }                                                                         \
  } while (0)

// Threads: torch's intra-op pool (at::parallel_for's stable form), f(begin, end) on chunks of at least `grain`.
template <class F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  torch::stable::parallel_for(begin, end, grain, f);
}

// ---------------------------------------------------------------------------------------------------------------------
// ATen ops through the stable dispatcher

namespace aten {
namespace detail {

using torch::stable::detail::from;

// torch keeps the message of an exception caught at its C boundary; torch >= 2.13 hands it out through
// torch_exception_get_what_without_backtrace. Older torch (the 2.11 this build targets) has no such call, so it is
// looked up at run time and the error names only the failed op there.
[[noreturn]] inline void throw_call_error(const char* name, const char* overload) {
  using GetWhat = const char* (*)();
  static const GetWhat get_what = [] {
    void* sym = nullptr;
    if (void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) {
      sym = dlsym(torch_cpu, "torch_exception_get_what_without_backtrace");
      dlclose(torch_cpu);
    }
    if (sym == nullptr) sym = dlsym(RTLD_DEFAULT, "torch_exception_get_what_without_backtrace");
    return reinterpret_cast<GetWhat>(sym);
  }();
  const char* what = get_what != nullptr ? get_what() : nullptr;
  if (what != nullptr && what[0] != '\0') throw std::runtime_error(what);
  throw std::runtime_error(fastdet::detail::message(name, *overload ? "." : "", overload, " failed"));
}

// Calls `name.overload` with args; returns the stack, whose first entries hold the outputs.
template <size_t NumOutputs, typename... Args>
auto call(const char* name, const char* overload, const Args&... args) {
  constexpr size_t n = sizeof...(Args) > NumOutputs ? sizeof...(Args) : NumOutputs;
  std::array<StableIValue, n> stack{from(args)...};
  if (torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION) != TORCH_SUCCESS) {
    throw_call_error(name, overload);
  }
  return stack;
}

template <typename... Args>
Tensor call1(const char* name, const char* overload, const Args&... args) {
  auto stack = call<1>(name, overload, args...);
  return torch::stable::detail::to<Tensor>(stack[0]);
}

template <typename... Args>
std::tuple<Tensor, Tensor> call2(const char* name, const char* overload, const Args&... args) {
  auto stack = call<2>(name, overload, args...);
  return {torch::stable::detail::to<Tensor>(stack[0]), torch::stable::detail::to<Tensor>(stack[1])};
}

}  // namespace detail

// Creation. `like` supplies the device.
inline Tensor empty(IntArrayRef size, ScalarType dtype, const Tensor& like) {
  return torch::stable::empty(size, dtype, std::nullopt, like.device());
}
inline Tensor full(IntArrayRef size, double value, ScalarType dtype, const Tensor& like) {
  return torch::stable::full(size, value, dtype, std::nullopt, like.device());
}
inline Tensor zeros(IntArrayRef size, ScalarType dtype, const Tensor& like) {
  return full(size, 0.0, dtype, like);
}
inline Tensor empty_like(const Tensor& t) {
  return torch::stable::empty_like(t);
}
inline Tensor zeros_like(const Tensor& t) {
  Tensor out = torch::stable::empty_like(t);
  torch::stable::zero_(out);
  return out;
}
// 0, 1, ..., n - 1 as int64 on like's device (aten::arange takes Scalars, which the dispatcher call cannot pass):
// the running sum of 0, 1, 1, ..., 1.
inline Tensor arange(int64_t n, const Tensor& like) {
  auto steps = full({n}, 1.0, kLong, like);
  if (n > 0) {
    auto first = torch::stable::narrow(steps, 0, 0, 1);
    torch::stable::zero_(first);
  }
  return detail::call1("aten::cumsum", "", steps, int64_t{0}, std::optional<ScalarType>());
}

// Conversion and layout.
inline Tensor to(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}
inline Tensor contiguous(const Tensor& t) {
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
}
inline Tensor unsqueeze(const Tensor& t, int64_t dim) {
  return torch::stable::unsqueeze(t, dim);
}
inline Tensor squeeze(const Tensor& t, int64_t dim) {
  return torch::stable::squeeze(t, dim);
}
inline Tensor select(const Tensor& t, int64_t dim, int64_t index) {
  return torch::stable::select(t, dim, index);
}
inline Tensor narrow(const Tensor& t, int64_t dim, int64_t start, int64_t length) {
  return torch::stable::narrow(const_cast<Tensor&>(t), dim, start, length);
}
inline Tensor transpose(const Tensor& t, int64_t dim0, int64_t dim1) {
  return torch::stable::transpose(t, dim0, dim1);
}
inline Tensor reshape(const Tensor& t, IntArrayRef shape) {
  return torch::stable::reshape(t, shape);
}
inline Tensor permute(const Tensor& t, IntArrayRef dims) {
  return detail::call1("aten::permute", "", t, dims);
}
inline Tensor expand(const Tensor& t, IntArrayRef size) {
  return detail::call1("aten::expand", "", t, size, false);
}
inline Tensor cat(const std::vector<Tensor>& tensors, int64_t dim) {
  return detail::call1("aten::cat", "", tensors, dim);
}
inline Tensor stack(const std::vector<Tensor>& tensors, int64_t dim) {
  return detail::call1("aten::stack", "", tensors, dim);
}

// Indexing and sorting.
inline std::tuple<Tensor, Tensor> sort(const Tensor& t, bool stable, int64_t dim, bool descending) {
  return detail::call2("aten::sort", "stable", t, std::optional<bool>(stable), dim, descending);
}
inline Tensor gather(const Tensor& t, int64_t dim, const Tensor& index) {
  return detail::call1("aten::gather", "", t, dim, index, false);
}
inline Tensor scatter(const Tensor& t, int64_t dim, const Tensor& index, const Tensor& src) {
  return detail::call1("aten::scatter", "src", t, dim, index, src);
}
inline Tensor index_select(const Tensor& t, int64_t dim, const Tensor& index) {
  return detail::call1("aten::index_select", "", t, dim, index);
}
inline Tensor masked_select(const Tensor& t, const Tensor& mask) {
  return detail::call1("aten::masked_select", "", t, mask);
}
inline Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b) {
  return detail::call1("aten::where", "self", cond, a, b);
}

// Arithmetic and logic (tensor-tensor, broadcasting; a scalar operand is a 0-d tensor).
inline Tensor cumsum(const Tensor& t, int64_t dim, std::optional<ScalarType> dtype = std::nullopt) {
  return detail::call1("aten::cumsum", "", t, dim, dtype);
}
inline Tensor sum(const Tensor& t, int64_t dim, bool keepdim = false) {
  return detail::call1("aten::sum", "dim_IntList", t, std::optional<std::vector<int64_t>>(std::vector<int64_t>{dim}),
                       keepdim, std::optional<ScalarType>());
}
// a + b for any dtype (aten::add carries a Scalar alpha, which the dispatcher call cannot pass).
inline Tensor add(const Tensor& a, const Tensor& b) {
  return sum(stack({a, b}, 0), 0);
}
inline Tensor neg(const Tensor& t) {
  return detail::call1("aten::neg", "", t);
}
inline Tensor mul(const Tensor& a, const Tensor& b) {
  return detail::call1("aten::mul", "Tensor", a, b);
}
inline Tensor minimum(const Tensor& a, const Tensor& b) {
  return detail::call1("aten::minimum", "", a, b);
}
inline Tensor maximum(const Tensor& a, const Tensor& b) {
  return detail::call1("aten::maximum", "", a, b);
}
inline Tensor logical_and(const Tensor& a, const Tensor& b) {
  return detail::call1("aten::logical_and", "", a, b);
}
inline Tensor le(const Tensor& a, const Tensor& b) {
  return detail::call1("aten::le", "Tensor", a, b);
}
inline Tensor lt(const Tensor& a, const Tensor& b) {
  return detail::call1("aten::lt", "Tensor", a, b);
}
inline Tensor eq(const Tensor& a, const Tensor& b) {
  return detail::call1("aten::eq", "Tensor", a, b);
}
inline Tensor ne(const Tensor& a, const Tensor& b) {
  return detail::call1("aten::ne", "Tensor", a, b);
}
inline Tensor exp(const Tensor& t) {
  return detail::call1("aten::exp", "", t);
}
inline Tensor log(const Tensor& t) {
  return detail::call1("aten::log", "", t);
}
inline Tensor reciprocal(const Tensor& t) {
  return detail::call1("aten::reciprocal", "", t);
}

// a / b (true division, tensor-tensor).
inline Tensor div(const Tensor& a, const Tensor& b) {
  return detail::call1("aten::div", "Tensor", a, b);
}

}  // namespace aten

// ---------------------------------------------------------------------------------------------------------------------
// Calling fastdet's own ops (a public op's composite calls its private per-backend kernel this way).

template <typename Ret, typename... Args>
Ret call_op(const char* name, const Args&... args);

namespace detail {
template <typename T>
struct OpResult {
  template <size_t N>
  static T unpack(std::array<StableIValue, N>& stack) {
    return torch::stable::detail::to<T>(stack[0]);
  }
  static constexpr size_t count = 1;
};
// A tuple of any arity: output i is stack[i].
template <typename... Ts>
struct OpResult<std::tuple<Ts...>> {
  template <size_t N>
  static std::tuple<Ts...> unpack(std::array<StableIValue, N>& stack) {
    return unpack_each<N>(stack, std::index_sequence_for<Ts...>{});
  }
  template <size_t N, size_t... I>
  static std::tuple<Ts...> unpack_each(std::array<StableIValue, N>& stack, std::index_sequence<I...>) {
    return {torch::stable::detail::to<Ts>(stack[I])...};
  }
  static constexpr size_t count = sizeof...(Ts);
};
template <typename A, typename B, typename C, typename D>
struct OpResult<std::tuple<A, B, C, D>> {
  template <size_t N>
  static std::tuple<A, B, C, D> unpack(std::array<StableIValue, N>& stack) {
    return {torch::stable::detail::to<A>(stack[0]), torch::stable::detail::to<B>(stack[1]),
            torch::stable::detail::to<C>(stack[2]), torch::stable::detail::to<D>(stack[3])};
  }
  static constexpr size_t count = 4;
};
}  // namespace detail

// call_op<Tensor>("fastdet::_nms_keep_flags", boxes, categories, threshold, sync_free): the overload name is "".
template <typename Ret, typename... Args>
Ret call_op(const char* name, const Args&... args) {
  auto stack = aten::detail::call<detail::OpResult<Ret>::count>(name, "", args...);
  return detail::OpResult<Ret>::unpack(stack);
}

}  // namespace fastdet
