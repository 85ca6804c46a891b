// llara_fast._C: native helpers for the data path (pybind11, no libtorch).
// The greedy packer lives in packer.cpp; this file carries the module definition and the
// attention-pair count used by the FLOP accounting.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "packer.h"

namespace py = pybind11;

namespace {

// Sum over segments of the (query, key) pairs allowed by bottom-right causal masking:
// lq * (lk - lq) + lq * (lq + 1) / 2.
int64_t attn_pairs(py::array_t<int32_t, py::array::c_style | py::array::forcecast> cu_q,
                   py::array_t<int32_t, py::array::c_style | py::array::forcecast> cu_k) {
  if (cu_q.ndim() != 1 || cu_k.ndim() != 1 || cu_q.shape(0) != cu_k.shape(0) || cu_q.shape(0) < 1)
    throw std::invalid_argument("attn_pairs: cu_seqlens_q and cu_seqlens_k must be 1-D of equal length >= 1");
  auto q = cu_q.unchecked<1>();
  auto k = cu_k.unchecked<1>();
  int64_t total = 0;
  for (py::ssize_t s = 0; s + 1 < cu_q.shape(0); ++s) {
    const int64_t lq = q(s + 1) - q(s), lk = k(s + 1) - k(s);
    if (lq < 0 || lk < lq)
      throw std::invalid_argument("attn_pairs: segment " + std::to_string(s) +
                                  " has a negative length or fewer keys than queries");
    total += lq * (lk - lq) + lq * (lq + 1) / 2;
  }
  return total;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "llara_fast native helpers";
  m.def("attn_pairs", &attn_pairs, py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        "Allowed (query, key) pairs of a PackedBatch under bottom-right causal masking.");
  llara::register_packer(m);
}
