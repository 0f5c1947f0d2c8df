// How every entry point of the shim turns C++ exceptions into messages (see
// shim.h's conventions): shared by shim.cpp and c10d.cpp.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>

namespace tp {

inline char *copy_message(const char *message) {
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

}  // namespace tp
