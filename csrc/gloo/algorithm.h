// Empty: ProcessGroupGloo.hpp includes this gloo header but uses nothing from
// it. See README.md in this folder.
#pragma once
