// The only C++ of transplant: a thin layer over torch::jit::Module.
// Every entry point catches every exception and returns its message (see shim.h).
#include "shim.h"

#include <torch/script.h>

#include <cstdlib>
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

const void *tp_tensor_impl(const tp_tensor *tensor) {
  return static_cast<const at::Tensor *>(tensor)->unsafeGetTensorImpl();
}

}  // extern "C"
