// The TorchScript half of the shim: a thin layer over torch::jit::Module (c10d.cpp is the distributed half).
// Every entry point catches every exception and returns its message (see shim.h).
#include "shim.h"
#include "guard.h"

#include <torch/cuda.h>
#include <torch/script.h>
#include <ATen/Parallel.h>
#include <caffe2/core/common.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

struct tp_module {
  torch::jit::Module module;
};

namespace {

using tp::copy_message;
using tp::guarded;

void walk(const torch::jit::Module &module, const std::string &prefix, void *ctx,
          tp_entry_fn f) {
  for (const auto &p : module.named_parameters(/*recurse=*/false)) {
    f(ctx, (prefix + p.name).c_str(), TP_PARAMETER, new at::Tensor(p.value));
  }
  for (const auto &b : module.named_buffers(/*recurse=*/false)) {
    f(ctx, (prefix + b.name).c_str(), TP_BUFFER, new at::Tensor(b.value));
  }
  for (const auto &child : module.named_children()) {
    walk(child.value, prefix + child.name + ".", ctx, f);
  }
}

void flatten(const c10::IValue &value, void *ctx, tp_tensor_fn f) {
  if (value.isTensor()) {
    f(ctx, new at::Tensor(value.toTensor()));
  } else if (value.isTuple()) {
    for (const auto &element : value.toTupleRef().elements()) flatten(element, ctx, f);
  } else if (value.isList()) {
    for (const auto &element : value.toListRef()) flatten(element, ctx, f);
  } else {
    throw std::runtime_error("forward returned a " + value.tagKind() +
                             ", expected a tensor or tuples/lists of tensors");
  }
}

const at::Tensor &as_tensor(tp_tensor *t) { return *static_cast<at::Tensor *>(t); }

// A strided, unquantized tensor: its elements are plain values in its storage.
bool dense(const at::Tensor &t) { return t.layout() == at::kStrided && !t.is_quantized(); }

// Contiguous, same dtype, same element count, both on the CPU: bytes can move as they are.
bool plain_bytes(const at::Tensor &dst, const at::Tensor &src) {
  return dst.device().is_cpu() && src.device().is_cpu() && dst.scalar_type() == src.scalar_type() &&
         dst.numel() == src.numel() && dst.is_contiguous() && src.is_contiguous() && dense(dst) &&
         dense(src);
}

// A transposed 2-D CPU matrix (column-major view) into a row-major one of the
// same dtype, as a rule's `| transpose(0, 1)` makes (GPT-2's Conv1D into
// nn.Linear). PyTorch's copy_ moves these in cache blocks on one thread, and
// at::equal compares them an element at a time: these pairs are copied and
// compared in tiles across threads instead.
bool transposed_2d(const at::Tensor &dst, const at::Tensor &src) {
  return dst.device().is_cpu() && src.device().is_cpu() && dst.scalar_type() == src.scalar_type() &&
         dense(dst) && dense(src) && dst.dim() == 2 && src.dim() == 2 && dst.sizes() == src.sizes() &&
         dst.is_contiguous() && src.stride(0) == 1 && src.size(0) > 1 && src.size(1) > 1;
}

// Tiles of a transposed matrix, one cache line of 4-byte values each way.
constexpr int64_t kTile = 16;

// Visits `out` (rows x cols, row-major) and `in` (the same matrix stored
// column-major, leading dimension ld) tile by tile, across threads: f(out_row,
// in_column_start, count) for each run of one output row within a tile. Reads
// and writes stay within a tile's cache lines and pages.
template <typename T, typename F>
void tiles(int64_t rows, int64_t cols, F f) {
  const int64_t row_tiles = (rows + kTile - 1) / kTile;
  at::parallel_for(0, row_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * kTile, r1 = std::min(rows, r0 + kTile);
      for (int64_t c0 = 0; c0 < cols; c0 += kTile) f(r0, r1, c0, std::min(cols, c0 + kTile));
    }
  });
}

template <typename T>
void transpose_into(T *out, const T *in, int64_t rows, int64_t cols, int64_t ld) {
  tiles<T>(rows, cols, [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    T tile[kTile][kTile];
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t r = r0; r < r1; ++r) tile[c - c0][r - r0] = in[r + c * ld];
    }
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = c0; c < c1; ++c) out[r * cols + c] = tile[c - c0][r - r0];
    }
  });
}

template <typename T>
bool transposed_equal(const T *out, const T *in, int64_t rows, int64_t cols, int64_t ld) {
  std::atomic<bool> same{true};
  tiles<T>(rows, cols, [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    if (!same) return;
    T tile[kTile][kTile];
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t r = r0; r < r1; ++r) tile[c - c0][r - r0] = in[r + c * ld];
    }
    bool ok = true;
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = c0; c < c1; ++c) ok &= out[r * cols + c] == tile[c - c0][r - r0];
    }
    if (!ok) same = false;
  });
  return same;
}

// copy (or compare, with `compare`) a transposed_2d pair, by element width.
bool transposed_pair(const at::Tensor &d, const at::Tensor &s, bool compare) {
  const int64_t rows = d.size(0), cols = d.size(1), ld = s.stride(1);
  auto run = [&](auto zero) -> bool {
    using T = decltype(zero);
    const T *in = static_cast<const T *>(s.const_data_ptr());
    if (compare) return transposed_equal(static_cast<const T *>(d.const_data_ptr()), in, rows, cols, ld);
    transpose_into(static_cast<T *>(d.data_ptr()), in, rows, cols, ld);
    return true;
  };
  switch (d.element_size()) {
    case 1: return run(uint8_t{});
    case 2: return run(uint16_t{});
    case 4: return run(uint32_t{});
    case 8: return run(uint64_t{});
    default: return compare ? at::equal(d, s) : (d.copy_(s), true);
  }
}

// Pairs of at most this many bytes are memmoved in parallel; larger ones use
// copy_, which parallelises within the tensor.
constexpr int64_t kSmall = 1 << 20;

// Two CPU tensors of one dtype and shape whose last dimension is contiguous
// (the views a rule's narrow, split or cat make): comparable row by row.
bool rows_contiguous(const at::Tensor &a, const at::Tensor &b) {
  return a.device().is_cpu() && b.device().is_cpu() && a.scalar_type() == b.scalar_type() && dense(a) &&
         dense(b) && a.dim() >= 1 && a.sizes() == b.sizes() && a.stride(-1) == 1 && b.stride(-1) == 1 &&
         !a.is_conj() && !b.is_conj() && !a.is_neg() && !b.is_neg();
}

// Whether a and b (see rows_contiguous) hold the same bytes, rows compared
// across threads: at::equal walks strided views an element at a time.
bool rows_equal(const at::Tensor &a, const at::Tensor &b) {
  const int64_t dims = a.dim(), width = a.size(-1), size = a.element_size();
  if (a.numel() == 0) return true;
  const int64_t rows = a.numel() / width, row_bytes = width * size;
  const char *pa = static_cast<const char *>(a.const_data_ptr());
  const char *pb = static_cast<const char *>(b.const_data_ptr());
  std::atomic<bool> same{true};
  at::parallel_for(0, rows, std::max<int64_t>(1, kSmall / std::max<int64_t>(1, row_bytes)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end && same; ++r) {
      int64_t rest = r, at_a = 0, at_b = 0;
      for (int64_t k = dims - 2; k >= 0; --k) {
        const int64_t i = rest % a.size(k);
        rest /= a.size(k);
        at_a += i * a.stride(k);
        at_b += i * b.stride(k);
      }
      if (std::memcmp(pa + at_a * size, pb + at_b * size, static_cast<size_t>(row_bytes)) != 0) same = false;
    }
  });
  return same;
}


// How many pairs ahead the byte copies and comparisons prefetch (2 to 4
// measured best on many small tensors).
constexpr int64_t kAhead = 4;

// Asks for the first lines of a small plain pair's bytes before they are needed.
void prefetch_pair(const tp_move &m, bool for_writing) {
  if (m.kind != TP_MOVE_SMALL) return;
  for (int64_t at = 0; at < std::min<int64_t>(m.nbytes, 4 * 64); at += 64) {
    __builtin_prefetch(static_cast<const char *>(m.from) + at, 0);
    if (for_writing) {
      __builtin_prefetch(static_cast<char *>(m.to) + at, 1);
    } else {
      __builtin_prefetch(static_cast<const char *>(m.to) + at, 0);
    }
  }
}

// The lowest index offered by any thread: which pair of many a parallel pass
// reports, whatever order the threads found them in. `none` until one is offered.
class LowestIndex {
 public:
  explicit LowestIndex(int64_t none) : none_(none), lowest_(none) {}
  void offer(int64_t i) {
    int64_t seen = lowest_.load();
    while (i < seen && !lowest_.compare_exchange_weak(seen, i)) {
    }
  }
  int64_t get() const { return lowest_.load(); }
  bool found() const { return get() != none_; }

 private:
  const int64_t none_;
  std::atomic<int64_t> lowest_;
};

// The same bytes, as integers of the same width: for bit-for-bit comparison.
at::Tensor bits(const at::Tensor &t) {
  switch (t.element_size()) {
    case 1: return t.scalar_type() == at::kByte ? t : t.view(at::kByte);
    case 2: return t.view(at::kShort);
    case 4: return t.view(at::kInt);
    case 8: return t.view(at::kLong);
    default: return t;
  }
}

// libtorch's CUDA backend (libtorch_cuda, ~1 GB of code whose relocations
// cost ~400 MB of memory at start) is not linked: a process maps it only where
// a CUDA driver is installed, loading it here, before main and before any tch
// call, as linking it would. ATen registers the CUDA backend when the library
// loads and settles, at its first CUDA query, whether CUDA exists for the
// rest of the process; loading before main keeps tch::Cuda::is_available()
// right whatever a program asks first. Without a driver CUDA cannot be
// available, so nothing is lost by not loading it. TRANSPLANT_CUDA=0 skips it
// on a GPU machine (a CPU-only run).
const char *cuda_backend = "not loaded";

__attribute__((constructor)) void load_cuda_backend() {
  const char *setting = std::getenv("TRANSPLANT_CUDA");
  if (setting != nullptr && std::strcmp(setting, "0") == 0) {
    cuda_backend = "not loaded: TRANSPLANT_CUDA=0";
    return;
  }
  void *driver = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_GLOBAL);
  if (driver == nullptr) {
    cuda_backend = "not loaded: no CUDA driver (libcuda.so.1)";
    return;
  }
  // libtorch_cuda lives beside the libtorch_cpu this process runs.
  Dl_info info;
  std::string path = "libtorch_cuda.so";
  if (dladdr(reinterpret_cast<void *>(&at::globalContext), &info) != 0 && info.dli_fname != nullptr) {
    std::string cpu = info.dli_fname;
    size_t slash = cpu.rfind('/');
    if (slash != std::string::npos) path = cpu.substr(0, slash + 1) + "libtorch_cuda.so";
  }
  if (dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) != nullptr) {
    cuda_backend = "loaded";
  } else {
    cuda_backend = "not loaded: libtorch_cuda.so did not load (a CPU-only libtorch?)";
  }
}

}  // namespace

extern "C" {

const char *tp_cuda_backend(void) { return cuda_backend; }

const char *tp_libtorch(void) {
  // Made once; asks the loaded library, never the headers this was built with.
  static const std::string described = []() -> std::string {
    try {
      std::string version;
      const auto &options = caffe2::GetBuildOptions();
      auto found = options.find("TORCH_VERSION");
      if (found != options.end()) version = found->second;
      std::string path;
      Dl_info info;
      if (dladdr(reinterpret_cast<void *>(&at::globalContext), &info) != 0 && info.dli_fname != nullptr) {
        path = info.dli_fname;
      }
      return version + "\n" + path;
    } catch (...) {
      return "\n";
    }
  }();
  return described.c_str();
}

void tp_error_free(char *error) { std::free(error); }

char *tp_module_load(const char *path, const char *device, tp_module **out) {
  *out = nullptr;
  return guarded([&] {
    c10::Device dev(device);
    *out = new tp_module{torch::jit::load(path, dev)};
  });
}

void tp_module_free(tp_module *module) { delete module; }

char *tp_module_deepcopy(const tp_module *module, tp_module **out) {
  *out = nullptr;
  return guarded([&] { *out = new tp_module{module->module.deepcopy()}; });
}

char *tp_module_entries(const tp_module *module, void *ctx, tp_entry_fn f) {
  return guarded([&] { walk(module->module, "", ctx, f); });
}

char *tp_module_save(const tp_module *module, const char *path) {
  return guarded([&] { module->module.save(path); });
}

char *tp_module_set_training(tp_module *module, int training) {
  return guarded([&] { module->module.train(training != 0); });
}

char *tp_module_is_training(const tp_module *module, int *out) {
  return guarded([&] { *out = module->module.is_training() ? 1 : 0; });
}

char *tp_module_to(tp_module *module, const char *device, int dtype) {
  return guarded([&] {
    c10::Device dev(device);
    // Module::to would convert integer buffers too (num_batches_tracked to
    // float); like PyTorch's nn.Module.to, only floating tensors change dtype.
    auto convert = [&](const at::Tensor &t) {
      at::NoGradGuard no_grad;
      bool cast = dtype >= 0 && t.is_floating_point();
      at::Tensor moved = cast ? t.to(dev, static_cast<c10::ScalarType>(dtype)) : t.to(dev);
      const_cast<at::Tensor &>(t).set_data(moved);
    };
    for (const auto &p : module->module.parameters(/*recurse=*/true)) convert(p);
    for (const auto &b : module->module.buffers(/*recurse=*/true)) convert(b);
  });
}

char *tp_module_forward(tp_module *module, tp_tensor *const *inputs, size_t n_inputs,
                        void *ctx, tp_tensor_fn f) {
  return guarded([&] {
    std::vector<c10::IValue> args;
    args.reserve(n_inputs);
    for (size_t i = 0; i < n_inputs; ++i) {
      args.emplace_back(*static_cast<const at::Tensor *>(inputs[i]));
    }
    flatten(module->module.forward(std::move(args)), ctx, f);
  });
}

char *tp_tensor_from_borrowed_bytes(void *data, int64_t nbytes, void *ctx, tp_release_fn release,
                                    tp_tensor **out) {
  *out = nullptr;
  return guarded([&] {
    auto options = at::TensorOptions().dtype(at::kByte).device(at::kCPU);
    at::Tensor tensor = torch::from_blob(
        data, {nbytes}, [ctx, release](void *) { release(ctx); }, options);
    *out = new at::Tensor(std::move(tensor));
  });
}

char *tp_describe_pairs(tp_tensor *const *dst, tp_tensor *const *src, size_t n, int for_writing,
                        tp_move *moves, int64_t *failed) {
  *failed = -1;
  return guarded([&] {
    // In parallel, reading only: every pair agrees in shape (never broadcast),
    // and what each is (see tp_move) is written down.
    LowestIndex mismatch(static_cast<int64_t>(n));
    at::parallel_for(0, static_cast<int64_t>(n), 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const at::Tensor &d = as_tensor(dst[i]), &s = as_tensor(src[i]);
        tp_move &m = moves[i];
        m = {nullptr, nullptr, nullptr, 0, TP_MOVE_OTHER};
        if (d.sizes() != s.sizes()) {
          mismatch.offer(i);
          continue;
        }
        m.nbytes = static_cast<int64_t>(d.nbytes());
        // Where the bytes are, for every contiguous strided tensor: plain pairs
        // are moved and compared through these, and the caller finds targets
        // that share memory. A target about to be written is asked for its data
        // as writable (which gives a copy-on-write storage its own bytes first).
        if (m.nbytes > 0 && dense(d) && d.is_contiguous()) {
          m.to = for_writing ? d.data_ptr() : const_cast<void *>(d.const_data_ptr());
        }
        if (s.nbytes() > 0 && dense(s) && s.is_contiguous()) m.from = s.const_data_ptr();
        if (!plain_bytes(d, s)) continue;
        m.kind = m.nbytes <= kSmall ? TP_MOVE_SMALL : TP_MOVE_LARGE;
        m.target = d.unsafeGetTensorImpl();
      }
    });
    if (mismatch.found()) {
      const int64_t i = mismatch.get();
      *failed = i;
      throw std::invalid_argument("shape mismatch: " + c10::str(as_tensor(src[i]).sizes()) + " into " +
                                  c10::str(as_tensor(dst[i]).sizes()) + " (nothing was written)");
    }
  });
}

char *tp_copy_described(tp_tensor *const *dst, tp_tensor *const *src, const tp_move *moves, size_t n,
                        int64_t *failed) {
  *failed = -1;
  return guarded([&] {
    // Small plain pairs, in parallel: bytes moved, version counters bumped as
    // copy_ would. Small copies wait on memory rather than on bandwidth, so the
    // first lines of the pair a few ahead are asked for early.
    at::parallel_for(0, static_cast<int64_t>(n), 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (i + kAhead < end) prefetch_pair(moves[i + kAhead], /*for_writing=*/true);
        const tp_move &m = moves[i];
        if (m.kind != TP_MOVE_SMALL) continue;
        if (m.nbytes > 0) std::memmove(m.to, m.from, static_cast<size_t>(m.nbytes));
        auto *impl = static_cast<c10::TensorImpl *>(m.target);
        if (!impl->is_inference()) impl->bump_version();
      }
    });
    // The rest through copy_ (which parallelises within a tensor). CPU sources
    // bound for CUDA go through one pinned staging buffer, so that the
    // host-to-device copies run asynchronously; one synchronize at the end.
    std::vector<int64_t> other;
    bool cuda = false;
    int64_t pinned_bytes = 0;
    for (size_t i = 0; i < n; ++i) {
      if (moves[i].kind == TP_MOVE_SMALL) continue;
      const at::Tensor &d = as_tensor(dst[i]), &s = as_tensor(src[i]);
      other.push_back(static_cast<int64_t>(i));
      cuda = cuda || d.is_cuda() || s.is_cuda();
      if (d.is_cuda() && s.device().is_cpu() && !s.is_pinned()) {
        pinned_bytes += static_cast<int64_t>(s.nbytes());
      }
    }
    at::Tensor staging;
    int64_t offset = 0;
    std::vector<int64_t> transposed;
    if (pinned_bytes > 0) staging = at::empty({pinned_bytes}, at::kByte).pin_memory();
    for (int64_t i : other) {
      *failed = i;
      at::Tensor d = as_tensor(dst[i]);
      at::Tensor s = as_tensor(src[i]);
      if (staging.defined() && d.is_cuda() && s.device().is_cpu() && !s.is_pinned()) {
        at::Tensor contiguous = s.contiguous();
        at::Tensor slot = staging.narrow(0, offset, static_cast<int64_t>(contiguous.nbytes()));
        if (contiguous.nbytes() > 0) std::memcpy(slot.data_ptr(), contiguous.data_ptr(), contiguous.nbytes());
        offset += static_cast<int64_t>(contiguous.nbytes());
        s = slot.view(contiguous.scalar_type()).view(contiguous.sizes());
      }
      if (transposed_2d(d, s)) {
        transposed.push_back(i);
        continue;
      }
      d.copy_(s, /*non_blocking=*/cuda);
    }
    // Transposed pairs (see transposed_2d), tile by tile across threads;
    // version counters bumped as copy_ would.
    for (int64_t i : transposed) {
      *failed = i;
      const at::Tensor &d = as_tensor(dst[i]);
      transposed_pair(d, as_tensor(src[i]), /*compare=*/false);
      if (!d.is_inference()) d.unsafeGetTensorImpl()->bump_version();
    }
    if (cuda) torch::cuda::synchronize();
    *failed = -1;
  });
}

char *tp_verify_described(tp_tensor *const *dst, tp_tensor *const *src, const tp_move *moves, size_t n,
                          int64_t *mismatch) {
  *mismatch = -1;
  return guarded([&] {
    LowestIndex first(static_cast<int64_t>(n));
    at::parallel_for(0, static_cast<int64_t>(n), 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (i + kAhead < end) prefetch_pair(moves[i + kAhead], /*for_writing=*/false);
        const tp_move &m = moves[i];
        if (m.kind == TP_MOVE_SMALL && m.nbytes > 0 &&
            std::memcmp(m.to, m.from, static_cast<size_t>(m.nbytes)) != 0) {
          first.offer(i);
        }
      }
    });
    // Large plain pairs: compared in chunks across threads.
    for (size_t i = 0; i < n; ++i) {
      const tp_move &m = moves[i];
      if (m.kind != TP_MOVE_LARGE || m.nbytes == 0) continue;
      const char *a = static_cast<const char *>(m.to), *b = static_cast<const char *>(m.from);
      at::parallel_for(0, m.nbytes, kSmall, [&](int64_t begin, int64_t end) {
        if (std::memcmp(a + begin, b + begin, static_cast<size_t>(end - begin)) != 0) {
          first.offer(static_cast<int64_t>(i));
        }
      });
    }
    // The rest: converted like copy_ converts, then compared bit for bit;
    // transposed pairs (see transposed_2d) and row-contiguous views (see
    // rows_contiguous) as bytes, across threads.
    std::vector<int64_t> transposed;
    for (size_t k = 0; k < n && static_cast<int64_t>(k) < first.get(); ++k) {
      if (moves[k].kind != TP_MOVE_OTHER) continue;
      const at::Tensor &d = as_tensor(dst[k]);
      const at::Tensor &s = as_tensor(src[k]);
      if (transposed_2d(d, s)) {
        transposed.push_back(static_cast<int64_t>(k));
        continue;
      }
      if (rows_contiguous(d, s)) {
        if (!rows_equal(d, s)) {
          first.offer(static_cast<int64_t>(k));
          break;
        }
        continue;
      }
      at::Tensor expected = s.to(d.device(), d.scalar_type());
      if (!at::equal(bits(d), bits(expected))) {  // shapes were checked by tp_describe_pairs
        first.offer(static_cast<int64_t>(k));
        break;
      }
    }
    for (int64_t k : transposed) {
      if (k < first.get() && !transposed_pair(as_tensor(dst[k]), as_tensor(src[k]), /*compare=*/true)) {
        first.offer(k);
      }
    }
    *mismatch = first.found() ? first.get() : -1;
  });
}

char *tp_parallel_for(int64_t n, int64_t grain, void *ctx, tp_range_fn body) {
  return guarded([&] { at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { body(ctx, begin, end); }); });
}

const void *tp_tensor_impl(const tp_tensor *tensor) {
  return static_cast<const at::Tensor *>(tensor)->unsafeGetTensorImpl();
}

char *tp_strided_view(const tp_tensor *base, int dtype, int64_t ndim, const int64_t *sizes,
                      const int64_t *strides, int64_t offset, tp_tensor **out) {
  *out = nullptr;
  return guarded([&] {
    const at::Tensor &b = *static_cast<const at::Tensor *>(base);
    TORCH_CHECK(b.defined() && b.has_storage(), "no storage to view");
    auto type = caffe2::TypeMeta::fromScalarType(static_cast<c10::ScalarType>(dtype));
    const int64_t element = static_cast<int64_t>(type.itemsize());
    // The last byte reached lies inside the storage (the caller checked; so
    // does this, as the view is made without libtorch's own checks).
    int64_t last = offset;
    bool empty = false;
    for (int64_t d = 0; d < ndim; ++d) {
      TORCH_CHECK(sizes[d] >= 0 && strides[d] >= 0, "negative size or stride");
      if (sizes[d] == 0) empty = true;
      else last += (sizes[d] - 1) * strides[d];
    }
    TORCH_CHECK(offset >= 0, "negative offset");
    const int64_t nbytes = static_cast<int64_t>(b.storage().nbytes());
    TORCH_CHECK(empty || (last + 1) * element <= nbytes, "the view reaches past its storage");
    auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(b.storage()), b.key_set(), type);
    impl->set_sizes_and_strides(c10::IntArrayRef(sizes, ndim), c10::IntArrayRef(strides, ndim), offset);
    *out = new at::Tensor(std::move(impl));
  });
}

void tp_storage_bytes(const tp_tensor *tensor, const void **data, size_t *nbytes) {
  const at::Tensor &t = *static_cast<const at::Tensor *>(tensor);
  *data = nullptr;
  *nbytes = 0;
  if (!t.defined() || !t.has_storage()) return;
  const c10::Storage &storage = t.storage();
  *data = storage.data();
  *nbytes = storage.nbytes();
}

}  // extern "C"
