// The only C++ of transplant: a thin layer over torch::jit::Module.
// Every entry point catches every exception and returns its message (see shim.h).
#include "shim.h"

#include <torch/cuda.h>
#include <torch/script.h>
#include <ATen/Parallel.h>

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

char *copy_message(const char *message) {
  size_t len = std::strlen(message);
  char *out = static_cast<char *>(std::malloc(len + 1));
  if (out != nullptr) std::memcpy(out, message, len + 1);
  return out;
}

// c10 errors carry a C++ backtrace in what(); users want the first line.
template <typename F>
char *guarded(F &&body) {
  try {
    body();
    return nullptr;
  } catch (const c10::Error &e) {
    return copy_message(e.what_without_backtrace());
  } catch (const std::exception &e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message("unknown C++ exception");
  }
}

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

// Pairs of at most this many bytes are memmoved in parallel; larger ones use
// copy_, which parallelises within the tensor.
constexpr int64_t kSmall = 1 << 20;

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

}  // namespace

extern "C" {

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
      d.copy_(s, /*non_blocking=*/cuda);
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
    // The rest: converted like copy_ converts, then compared bit for bit.
    for (size_t k = 0; k < n && static_cast<int64_t>(k) < first.get(); ++k) {
      if (moves[k].kind != TP_MOVE_OTHER) continue;
      const at::Tensor &d = as_tensor(dst[k]);
      at::Tensor expected = as_tensor(src[k]).to(d.device(), d.scalar_type());
      if (!at::equal(bits(d), bits(expected))) {  // shapes were checked by tp_describe_pairs
        first.offer(static_cast<int64_t>(k));
        break;
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

}  // extern "C"
