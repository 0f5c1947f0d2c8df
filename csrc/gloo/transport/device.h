// gloo's transport types, seen by ProcessGroupGloo.hpp only behind
// std::shared_ptr / std::unique_ptr. See README.md in the gloo folder.
#pragma once

namespace gloo {
namespace transport {

class Device;
class UnboundBuffer;

}  // namespace transport
}  // namespace gloo
