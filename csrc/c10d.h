// The C ABI between Rust (src/c10d.rs) and torch.distributed's c10d in
// libtorch: a TCPStore (with key prefixes) and a Gloo process group. The
// conventions are shim.h's: NULL on success or a malloc'd message freed with
// tp_error_free; opaque handles freed with their *_free function; tensors are
// tch's `at::Tensor*`, borrowed for the call (a started operation keeps its own
// reference to the tensor until its work is freed).
#ifndef TRANSPLANT_C10D_H
#define TRANSPLANT_C10D_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Sets c10's log level for the process (0 info, 1 warning, 2 error, 3 fatal):
 * c10d logs every timed-out wait and lost connection to stderr. */
void tp_c10d_log_level(int level);

typedef struct tp_store tp_store;
typedef struct tp_group tp_group;
typedef struct tp_work tp_work;

/* Receives a value read from a store; `data` is valid during the call. */
typedef void (*tp_bytes_fn)(void *ctx, const uint8_t *data, size_t len);

/* Connects to the TCPStore at host:port (serving it from this process when
 * `is_server`), waiting up to `timeout_ms` for the server; every key is then
 * prefixed by `prefix`. */
char *tp_store_connect(const char *host, uint16_t port, int is_server, int64_t timeout_ms,
                       const char *prefix, tp_store **out);
/* The same store with `prefix` and a `/` added to the keys (c10d's PrefixStore);
 * the same store when `prefix` is empty. */
char *tp_store_prefixed(const tp_store *store, const char *prefix, tp_store **out);
void tp_store_free(tp_store *store);
/* The port a server store listens on (useful when asked for port 0). */
char *tp_store_port(const tp_store *store, int *out);
char *tp_store_set(tp_store *store, const char *key, const uint8_t *data, size_t len);
/* Waits up to `timeout_ms` for `key`; `*found` says whether it appeared. */
char *tp_store_wait(tp_store *store, const char *key, int64_t timeout_ms, int *found);
/* Whether `key` exists now (does not wait). */
char *tp_store_check(tp_store *store, const char *key, int *found);
/* The value of `key` (which must exist or appear within the store's timeout). */
char *tp_store_get(tp_store *store, const char *key, void *ctx, tp_bytes_fn f);
/* Deletes `key` (no error when absent). */
char *tp_store_delete(tp_store *store, const char *key);
/* Adds `delta` to the integer at `key` (0 when absent); `*out` is the sum. */
char *tp_store_add(tp_store *store, const char *key, int64_t delta, int64_t *out);

/* A Gloo process group of `size` ranks, this one `rank`, that meets through
 * `store`, its sockets bound to `hostname`; every operation fails after
 * `timeout_ms` without progress. Blocks until every rank joined (or timeout). */
char *tp_group_gloo(tp_store *store, int rank, int size, int64_t timeout_ms, const char *hostname,
                    tp_group **out);
void tp_group_free(tp_group *group);
/* Starts broadcasting `tensor` (CPU, contiguous) from rank `root`. */
char *tp_group_broadcast(tp_group *group, void *tensor, int root, tp_work **out);
/* Waits for a started operation; its error, if it failed. */
char *tp_work_wait(tp_work *work);
void tp_work_free(tp_work *work);

#ifdef __cplusplus
}
#endif

#endif
