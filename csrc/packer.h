// The greedy packer of llara_fast (DESIGN §2-§3): examples -> PackedBatch arrays.
#pragma once

#include <pybind11/pybind11.h>

namespace llara {

// Adds `Packer` and `greedy_groups` to the extension module.
void register_packer(pybind11::module_& m);

}  // namespace llara
