// gloo::Context, declared only as far as ProcessGroupGloo.hpp needs (its inline
// setTimeout calls Context::setTimeout). libtorch holds the real definition;
// transplant never makes or touches one. See README.md in this folder.
#pragma once

#include <chrono>

namespace gloo {

class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};

}  // namespace gloo
