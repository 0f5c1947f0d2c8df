// gloo::rendezvous::Store, the abstract class that ProcessGroupGloo's nested
// GlooStore derives from (gloo built without GLOO_STORE_HAS_STORE_V2, as
// ProcessGroupGloo.hpp is compiled here). See README.md in the gloo folder.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace gloo {
namespace rendezvous {

class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) = 0;
};

}  // namespace rendezvous
}  // namespace gloo
