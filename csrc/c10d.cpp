// The distributed half of the shim: c10d's TCPStore, PrefixStore and Gloo
// process group, as libtorch 2.13.0 ships them. ProcessGroupGloo.hpp needs a
// few gloo declarations the wheel does not ship: csrc/gloo/ has them (see its
// README.md for why and what was checked).
#define USE_C10D_GLOO 1

#include "c10d.h"
#include "guard.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <c10/util/Logging.h>

#include <chrono>
#include <string>
#include <vector>

struct tp_store {
  c10::intrusive_ptr<c10d::Store> store;
  // The TCPStore under the prefixes, for its port.
  c10::intrusive_ptr<c10d::TCPStore> tcp;
};

struct tp_group {
  c10::intrusive_ptr<c10d::ProcessGroupGloo> group;
};

struct tp_work {
  c10::intrusive_ptr<c10d::Work> work;
};

using tp::guarded;

extern "C" {

void tp_c10d_log_level(int level) { FLAGS_caffe2_log_level = level; }

char *tp_store_connect(const char *host, uint16_t port, int is_server, int64_t timeout_ms,
                       const char *prefix, tp_store **out) {
  return guarded([&] {
    c10d::TCPStoreOptions options;
    options.port = port;
    options.isServer = is_server != 0;
    options.numWorkers = std::nullopt;
    options.waitWorkers = false;
    options.timeout = std::chrono::milliseconds(timeout_ms);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
    c10::intrusive_ptr<c10d::Store> store = tcp;
    if (prefix != nullptr && prefix[0] != '\0') {
      store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store);
    }
    *out = new tp_store{store, tcp};
  });
}

char *tp_store_prefixed(const tp_store *store, const char *prefix, tp_store **out) {
  return guarded([&] {
    if (prefix[0] == '\0') {
      *out = new tp_store{store->store, store->tcp};
      return;
    }
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store->store);
    *out = new tp_store{prefixed, store->tcp};
  });
}

void tp_store_free(tp_store *store) { delete store; }

char *tp_store_port(const tp_store *store, int *out) {
  return guarded([&] { *out = static_cast<int>(store->tcp->getPort()); });
}

char *tp_store_set(tp_store *store, const char *key, const uint8_t *data, size_t len) {
  return guarded([&] { store->store->set(std::string(key), std::vector<uint8_t>(data, data + len)); });
}

char *tp_store_wait(tp_store *store, const char *key, int64_t timeout_ms, int *found) {
  return guarded([&] {
    *found = 0;
    std::vector<std::string> keys{std::string(key)};
    try {
      store->store->wait(keys, std::chrono::milliseconds(timeout_ms));
      *found = 1;
    } catch (const c10::DistStoreError &) {
      // TCPStore::wait reports its timeout this way; a lost connection is a
      // DistNetworkError and goes on to the caller.
      *found = 0;
    }
  });
}

char *tp_store_check(tp_store *store, const char *key, int *found) {
  return guarded([&] { *found = store->store->check({std::string(key)}) ? 1 : 0; });
}

char *tp_store_get(tp_store *store, const char *key, void *ctx, tp_bytes_fn f) {
  return guarded([&] {
    std::vector<uint8_t> value = store->store->get(std::string(key));
    f(ctx, value.data(), value.size());
  });
}

char *tp_store_delete(tp_store *store, const char *key) {
  return guarded([&] { store->store->deleteKey(std::string(key)); });
}

char *tp_store_add(tp_store *store, const char *key, int64_t delta, int64_t *out) {
  return guarded([&] { *out = store->store->add(std::string(key), delta); });
}

char *tp_group_gloo(tp_store *store, int rank, int size, int64_t timeout_ms, const char *hostname,
                    tp_group **out) {
  return guarded([&] {
    auto options = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(std::string(hostname)));
    auto group = c10::make_intrusive<c10d::ProcessGroupGloo>(store->store, rank, size, options);
    *out = new tp_group{group};
  });
}

void tp_group_free(tp_group *group) { delete group; }

char *tp_group_broadcast(tp_group *group, void *tensor, int root, tp_work **out) {
  return guarded([&] {
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor *>(tensor)};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    options.rootTensor = 0;
    *out = new tp_work{group->group->broadcast(tensors, options)};
  });
}

char *tp_work_wait(tp_work *work) {
  return guarded([&] { work->work->wait(); });
}

void tp_work_free(tp_work *work) { delete work; }

}  // extern "C"
