// The C ABI between Rust (src/ffi.rs) and libtorch's TorchScript module API.
//
// Conventions, for every function here:
// - the return value is NULL on success, or an error message allocated with
//   malloc that the caller frees with tp_error_free; no C++ exception ever
//   crosses this boundary;
// - tensors handed out are `at::Tensor*` allocated with `new`, the same layout
//   tch uses for its `C_tensor`, so Rust wraps them with `tch::Tensor::from_ptr`
//   and tch frees them; they share storage with the module;
// - a module handle is an opaque pointer freed with tp_module_free.
#ifndef TRANSPLANT_SHIM_H
#define TRANSPLANT_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tp_module tp_module;
typedef void tp_tensor; /* at::Tensor */

/* Role of a named tensor, as passed to tp_entry_fn. */
enum { TP_PARAMETER = 0, TP_BUFFER = 1 };

/* Receives one named tensor; takes ownership of `tensor`. */
typedef void (*tp_entry_fn)(void *ctx, const char *name, int role, tp_tensor *tensor);
/* Receives one output tensor; takes ownership of `tensor`. */
typedef void (*tp_tensor_fn)(void *ctx, tp_tensor *tensor);
/* Called once when libtorch no longer needs borrowed memory. */
typedef void (*tp_release_fn)(void *ctx);

void tp_error_free(char *error);

/* Whether libtorch's CUDA backend was loaded at start, and why not if not
 * (a static string). */
const char *tp_cuda_backend(void);

/* The libtorch this process runs on, as "VERSION\nPATH" (a static string):
 * the version the loaded library reports (TORCH_VERSION among its build
 * options) and the libtorch_cpu file the loader mapped; either is empty where
 * unknown. */
const char *tp_libtorch(void);

/* Loads a module saved by torch.jit.save onto `device` ("cpu", "cuda:0", ...). */
char *tp_module_load(const char *path, const char *device, tp_module **out);
void tp_module_free(tp_module *module);
/* A deep copy: same code, its own tensors. */
char *tp_module_deepcopy(const tp_module *module, tp_module **out);
/* Every parameter and buffer, recursively, with dotted names, in the order
 * PyTorch's state_dict() lists them: per module its parameters, then its
 * buffers, then its children in registration order. */
char *tp_module_entries(const tp_module *module, void *ctx, tp_entry_fn f);
char *tp_module_save(const tp_module *module, const char *path);
char *tp_module_set_training(tp_module *module, int training);
char *tp_module_is_training(const tp_module *module, int *out);
/* Moves the module's parameters and buffers to `device` ("cpu", "cuda:0") and,
 * when `dtype` >= 0 (a c10::ScalarType), converts its floating ones to it. */
char *tp_module_to(tp_module *module, const char *device, int dtype);
/* Runs forward(*inputs); the output (a tensor, or tuples/lists of tensors,
 * flattened depth first) goes to `f`. */
char *tp_module_forward(tp_module *module, tp_tensor *const *inputs, size_t n_inputs,
                        void *ctx, tp_tensor_fn f);

/* A 1-D uint8 CPU tensor over `nbytes` bytes at `data`, which the caller keeps
 * alive until libtorch calls `release(ctx)` (when the last tensor sharing that
 * storage is gone). If this fails, `release` is not called. */
char *tp_tensor_from_borrowed_bytes(void *data, int64_t nbytes, void *ctx, tp_release_fn release,
                                    tp_tensor **out);

/* What a pair of tensors is, for tp_copy_described and tp_verify_described. */
enum { TP_MOVE_OTHER = 0, TP_MOVE_SMALL = 1, TP_MOVE_LARGE = 2 };
typedef struct tp_move {
  void *to;         /* a contiguous strided target's first byte (a GPU address for a GPU
                       tensor), else null */
  const void *from; /* a contiguous strided source's first byte, likewise */
  void *target;     /* plain pairs: the target's TensorImpl (its version counter is bumped) */
  int64_t nbytes;   /* bytes the target holds */
  int32_t kind;     /* SMALL: same dtype, contiguous, CPU, at most 1 MB: moved as bytes, many
                       pairs in parallel; LARGE: the same but larger, copy_ parallelises within;
                       OTHER: converted or on a GPU, through copy_ */
} tp_move;

/* Checks that src[i] and dst[i] agree in shape for every i (else an error,
 * *failed the lowest such index, and nothing written anywhere) and describes
 * each pair in moves[i]. With for_writing, targets' data is asked for as
 * writable. The moves stay valid while no tensor is reallocated or resized:
 * the caller holds the tensors for the whole copy. */
char *tp_describe_pairs(tp_tensor *const *dst, tp_tensor *const *src, size_t n, int for_writing,
                        tp_move *moves, int64_t *failed);
/* Copies src[i] into dst[i] for i in 0..n, as described, in place: dst keeps
 * its storage, dtype and device (values are converted on the way). SMALL pairs
 * are moved with memmove in parallel and their version counters bumped like
 * copy_ does; the others go through copy_, non-blocking where CUDA takes part,
 * CPU sources staged through pinned memory, and one CUDA synchronize at the
 * end. On failure *failed is the pair's index. */
char *tp_copy_described(tp_tensor *const *dst, tp_tensor *const *src, const tp_move *moves, size_t n,
                        int64_t *failed);
/* *mismatch: index of the first pair whose dst is not bit for bit src
 * converted to dst's dtype and device, or -1 when all are. */
char *tp_verify_described(tp_tensor *const *dst, tp_tensor *const *src, const tp_move *moves, size_t n,
                          int64_t *mismatch);

/* Runs body(ctx, begin, end) over ranges covering 0..n, at least `grain` long,
 * on libtorch's intra-op threads (at::parallel_for): work of the caller's
 * that runs there finds those threads awake rather than competing with them. */
typedef void (*tp_range_fn)(void *ctx, int64_t begin, int64_t end);
char *tp_parallel_for(int64_t n, int64_t grain, void *ctx, tp_range_fn body);

/* The TensorImpl behind a tensor handle: equal for handles of one tensor. */
const void *tp_tensor_impl(const tp_tensor *tensor);

/* A tensor of `dtype` (a c10::ScalarType) over `base`'s storage: `ndim`
 * sizes and strides, `offset` elements (of `dtype`) from the storage's start.
 * Made directly (no dispatcher): reading many tensors of one file costs
 * little. The view must lie within the storage (checked). */
char *tp_strided_view(const tp_tensor *base, int dtype, int64_t ndim, const int64_t *sizes,
                      const int64_t *strides, int64_t offset, tp_tensor **out);

/* Where a tensor's storage lies: its first byte and size (null and 0 without one). */
void tp_storage_bytes(const tp_tensor *tensor, const void **data, size_t *nbytes);

#ifdef __cplusplus
}
#endif

#endif
