// The greedy packer (DESIGN §2-§3), C++17 + pybind11, no libtorch.
//
// Input: examples in CSR form, read in place from one or more "sources" (a prepared shard's
// memory-mapped arrays, or arrays built from a list of Example objects):
//     (text_tokens, text_offsets, sum_ids, sum_offsets, pred_ids, pred_offsets)
// plus a list of example references (source, index) and the group boundaries of the
// micro-batches. Output: one dict of numpy arrays per group, exactly the fields and dtypes
// that llara_fast.data.packing.pack_reference produces (int64 everywhere, int32 cu_seqlens).
//
// Work plan: a sequential pass (GIL held) validates every reference, sizes every group and
// allocates its numpy buffers; then the GIL is released and std::threads fill the buffers,
// each example writing only its own disjoint slices, so threads never synchronise.
#include "packer.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace llara {
namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// A 1-D id array of any of the dtypes prepare writes (uint16 / uint32) or tests build (int64).
enum class IdType { U16, I32, U32, I64 };

struct IdView {
  const void* ptr = nullptr;
  IdType type = IdType::I64;
  int64_t size = 0;
};

IdView id_view(const py::array& a, const char* what) {
  if (a.ndim() != 1) throw std::invalid_argument(std::string(what) + ": expected a 1-D array");
  if (!(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(what) + ": expected a contiguous array");
  IdView v;
  v.ptr = a.data();
  v.size = a.shape(0);
  const char kind = a.dtype().kind();
  const auto item = a.itemsize();
  if (kind == 'u' && item == 2) v.type = IdType::U16;
  else if (kind == 'i' && item == 4) v.type = IdType::I32;
  else if (kind == 'u' && item == 4) v.type = IdType::U32;
  else if (kind == 'i' && item == 8) v.type = IdType::I64;
  else
    throw std::invalid_argument(std::string(what) + ": token dtype must be uint16, int32, uint32 or int64, got " +
                                std::string(py::str(a.dtype())));
  return v;
}

template <typename T>
inline void copy_as_i64(const T* src, int64_t n, int64_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<int64_t>(src[i]);
}

inline void copy_ids(const IdView& v, int64_t begin, int64_t n, int64_t* dst) {
  switch (v.type) {
    case IdType::U16: copy_as_i64(static_cast<const uint16_t*>(v.ptr) + begin, n, dst); break;
    case IdType::I32: copy_as_i64(static_cast<const int32_t*>(v.ptr) + begin, n, dst); break;
    case IdType::U32: copy_as_i64(static_cast<const uint32_t*>(v.ptr) + begin, n, dst); break;
    case IdType::I64: copy_as_i64(static_cast<const int64_t*>(v.ptr) + begin, n, dst); break;
  }
}

// One CSR source; `keep` holds the Python arrays alive while raw pointers are in use.
struct Source {
  IdView text, sum, pred;
  const int64_t* text_off = nullptr;
  const int64_t* sum_off = nullptr;
  const int64_t* pred_off = nullptr;
  int64_t n = 0;  // examples
  std::vector<py::object> keep;
};

Source make_source(const py::handle& obj, size_t which) {
  auto t = py::reinterpret_borrow<py::sequence>(obj);
  const std::string where = "source " + std::to_string(which);
  if (t.size() != 6)
    throw std::invalid_argument(where + ": expected (text, text_offsets, sum_ids, sum_offsets, pred_ids, "
                                "pred_offsets)");
  Source s;
  py::array text = py::array::ensure(t[0]), sum = py::array::ensure(t[2]), pred = py::array::ensure(t[4]);
  I64Array to = I64Array::ensure(t[1]), so = I64Array::ensure(t[3]), po = I64Array::ensure(t[5]);
  if (!text || !sum || !pred || !to || !so || !po) throw std::invalid_argument(where + ": arrays expected");
  s.text = id_view(text, (where + " text").c_str());
  s.sum = id_view(sum, (where + " sum_ids").c_str());
  s.pred = id_view(pred, (where + " pred_ids").c_str());
  if (to.ndim() != 1 || so.ndim() != 1 || po.ndim() != 1 || to.shape(0) < 1 || to.shape(0) != so.shape(0) ||
      to.shape(0) != po.shape(0))
    throw std::invalid_argument(where + ": the three offset arrays must be 1-D of equal length >= 1");
  s.n = to.shape(0) - 1;
  s.text_off = to.data();
  s.sum_off = so.data();
  s.pred_off = po.data();
  s.keep = {text, sum, pred, to, so, po};
  return s;
}

// Bounds of one CSR row, checked (offsets of memory-mapped shards are trusted only this far).
inline void row(const int64_t* off, int64_t i, int64_t size, int64_t& b, int64_t& e, const char* what, int64_t ref) {
  b = off[i];
  e = off[i + 1];
  if (b < 0 || e < b || e > size)
    throw std::invalid_argument("example reference " + std::to_string(ref) + ": corrupt " + what +
                                " offsets [" + std::to_string(b) + ", " + std::to_string(e) + ") for an array of " +
                                std::to_string(size));
}

struct Planned {        // one example's place in its group
  const Source* src;
  int64_t text_b, T, sum_b, ns, pred_b, np;
  int64_t group, j;     // group and index inside it
  int64_t tok, key, lm, s, p;  // offsets of its slices in the group's buffers
};

struct GroupOut {       // raw pointers into the group's numpy buffers
  int64_t *input_ids, *position_ids, *k_index, *lm_positions, *lm_targets, *sum_positions, *pred_positions,
      *sum_offsets, *sum_ids, *pred_offsets, *pred_ids;
  int32_t *cu_q, *cu_k;
};

class Packer {
 public:
  Packer(std::vector<int64_t> prefix, std::vector<int64_t> sum_ids, std::vector<int64_t> pred_ids,
         std::vector<int64_t> sum_special, std::vector<int64_t> pred_special, int64_t max_len, int n_threads)
      : prefix_(std::move(prefix)), sum_(std::move(sum_ids)), pred_(std::move(pred_ids)),
        sum_special_(std::move(sum_special)), pred_special_(std::move(pred_special)), max_len_(max_len),
        n_threads_(n_threads) {
    if (prefix_.empty())
      throw std::invalid_argument("template prefix is empty: the LM loss needs a token before the text");
    if (max_len_ < 0) throw std::invalid_argument("max_len must be >= 0");
    if (sum_special_.empty() || sum_special_.size() != pred_special_.size())
      throw std::invalid_argument("sum/pred special offsets must be non-empty and of equal length");
    for (auto o : sum_special_)
      if (o < 0 || o >= static_cast<int64_t>(sum_.size())) throw std::invalid_argument("sum special offset out of range");
    for (auto o : pred_special_)
      if (o < 0 || o >= static_cast<int64_t>(pred_.size())) throw std::invalid_argument("pred special offset out of range");
    if (n_threads_ <= 0) n_threads_ = std::max(1u, std::thread::hardware_concurrency());
  }

  // Tokens one example takes in the stream once its text is cut to max_len.
  int64_t example_tokens(int64_t text_len) const {
    return static_cast<int64_t>(prefix_.size() + sum_.size() + pred_.size()) + std::min(text_len, max_len_);
  }

  py::list pack(const py::sequence& sources, const I64Array& ex_source, const I64Array& ex_index,
                const I64Array& group_offsets) {
    std::vector<Source> srcs;
    srcs.reserve(sources.size());
    for (size_t i = 0; i < sources.size(); ++i) srcs.push_back(make_source(sources[i], i));
    if (ex_source.ndim() != 1 || ex_index.ndim() != 1 || ex_source.shape(0) != ex_index.shape(0))
      throw std::invalid_argument("ex_source and ex_index must be 1-D of equal length");
    if (group_offsets.ndim() != 1 || group_offsets.shape(0) < 1)
      throw std::invalid_argument("group_offsets must be 1-D of length >= 1");
    const int64_t n_refs = ex_source.shape(0);
    const int64_t* gsrc = ex_source.data();
    const int64_t* gidx = ex_index.data();
    const int64_t* go = group_offsets.data();
    const int64_t G = group_offsets.shape(0) - 1;
    if (go[0] < 0 || go[G] > n_refs) throw std::invalid_argument("group_offsets out of range of the references");
    const int64_t P = prefix_.size(), S = sum_.size(), R = pred_.size(), K = sum_special_.size();

    // ---- plan: validate, size every group (GIL held) --------------------------------------------
    std::vector<Planned> plan;
    plan.reserve(go[G] - go[0]);
    py::list out;
    std::vector<GroupOut> bufs(G);
    for (int64_t g = 0; g < G; ++g) {
      if (go[g + 1] <= go[g]) throw std::invalid_argument("group " + std::to_string(g) + " is empty");
      int64_t tok = 0, key = 0, lm = 0, s = 0, p = 0, max_q = 0, max_k = 0;
      for (int64_t r = go[g]; r < go[g + 1]; ++r) {
        if (gsrc[r] < 0 || gsrc[r] >= static_cast<int64_t>(srcs.size()))
          throw std::invalid_argument("example reference " + std::to_string(r) + ": source " +
                                      std::to_string(gsrc[r]) + " out of range");
        const Source& src = srcs[gsrc[r]];
        if (gidx[r] < 0 || gidx[r] >= src.n)
          throw std::invalid_argument("example reference " + std::to_string(r) + ": index " + std::to_string(gidx[r]) +
                                      " out of range for a source of " + std::to_string(src.n) + " examples");
        Planned e;
        e.src = &src;
        int64_t b, en;
        row(src.text_off, gidx[r], src.text.size, b, en, "text", r);
        e.text_b = b;
        e.T = std::min(en - b, max_len_);
        row(src.sum_off, gidx[r], src.sum.size, b, en, "sum_ids", r);
        e.sum_b = b;
        e.ns = en - b;
        row(src.pred_off, gidx[r], src.pred.size, b, en, "pred_ids", r);
        e.pred_b = b;
        e.np = en - b;
        e.group = g;
        e.j = r - go[g];
        e.tok = tok; e.key = key; e.lm = lm; e.s = s; e.p = p;
        tok += P + e.T + S + R;
        key += 2 * P + 2 * e.T + S + R;
        lm += e.T;
        s += e.ns;
        p += e.np;
        max_q = std::max(max_q, std::max(P + e.T + S, R));
        max_k = std::max(max_k, std::max(P + e.T + S, P + e.T + R));
        plan.push_back(e);
      }
      if (key > std::numeric_limits<int32_t>::max())
        throw std::invalid_argument("group " + std::to_string(g) + ": " + std::to_string(key) +
                                    " keys overflow the int32 cu_seqlens");
      const int64_t E = go[g + 1] - go[g];
      auto i64 = [](int64_t n) { return py::array_t<int64_t>(n); };
      auto i32 = [](int64_t n) { return py::array_t<int32_t>(n); };
      py::array_t<int64_t> input_ids = i64(tok), position_ids = i64(tok), k_index = i64(key), lm_positions = i64(lm),
                           lm_targets = i64(lm), sum_offsets = i64(E + 1), sum_ids = i64(s),
                           pred_offsets = i64(E + 1), pred_ids = i64(p);
      py::array_t<int64_t> sum_positions({E, K}), pred_positions({E, K});
      py::array_t<int32_t> cu_q = i32(2 * E + 1), cu_k = i32(2 * E + 1);
      GroupOut& o = bufs[g];
      o.input_ids = input_ids.mutable_data(); o.position_ids = position_ids.mutable_data();
      o.k_index = k_index.mutable_data(); o.lm_positions = lm_positions.mutable_data();
      o.lm_targets = lm_targets.mutable_data(); o.sum_positions = sum_positions.mutable_data();
      o.pred_positions = pred_positions.mutable_data(); o.sum_offsets = sum_offsets.mutable_data();
      o.sum_ids = sum_ids.mutable_data(); o.pred_offsets = pred_offsets.mutable_data();
      o.pred_ids = pred_ids.mutable_data(); o.cu_q = cu_q.mutable_data(); o.cu_k = cu_k.mutable_data();
      o.cu_q[0] = 0; o.cu_k[0] = 0; o.sum_offsets[0] = 0; o.pred_offsets[0] = 0;
      py::dict d;
      d["input_ids"] = input_ids; d["position_ids"] = position_ids;
      d["cu_seqlens_q"] = cu_q; d["cu_seqlens_k"] = cu_k;
      d["max_seqlen_q"] = py::int_(max_q); d["max_seqlen_k"] = py::int_(max_k);
      d["k_index"] = k_index; d["lm_positions"] = lm_positions; d["lm_targets"] = lm_targets;
      d["sum_positions"] = sum_positions; d["pred_positions"] = pred_positions;
      d["sum_offsets"] = sum_offsets; d["sum_ids"] = sum_ids;
      d["pred_offsets"] = pred_offsets; d["pred_ids"] = pred_ids;
      out.append(d);
    }

    // ---- fill: each example writes its own slices (GIL released) ---------------------------------
    {
      py::gil_scoped_release release;
      const int64_t n = plan.size();
      const int64_t T = std::max<int64_t>(1, std::min<int64_t>(n_threads_, n));
      auto work = [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) fill(plan[i], bufs[plan[i].group]);
      };
      if (T == 1) {
        work(0, n);
      } else {
        std::vector<std::thread> pool;
        pool.reserve(T);
        for (int64_t t = 0; t < T; ++t) pool.emplace_back(work, n * t / T, n * (t + 1) / T);
        for (auto& th : pool) th.join();
      }
    }
    return out;
  }

 private:
  void fill(const Planned& e, const GroupOut& o) const {
    const int64_t P = prefix_.size(), S = sum_.size(), R = pred_.size(), K = sum_special_.size();
    const int64_t T = e.T, start = e.tok, main_len = P + T + S, branch = start + main_len;
    int64_t* ids = o.input_ids + start;
    std::copy(prefix_.begin(), prefix_.end(), ids);
    copy_ids(e.src->text, e.text_b, T, ids + P);
    std::copy(sum_.begin(), sum_.end(), ids + P + T);
    std::copy(pred_.begin(), pred_.end(), ids + main_len);
    int64_t* pos = o.position_ids + start;
    for (int64_t i = 0; i < main_len; ++i) pos[i] = i;             // main: 0 .. P+T+S-1
    for (int64_t i = 0; i < R; ++i) pos[main_len + i] = P + T + i;  // PRED restarts after TEXT
    int64_t* k = o.k_index + e.key;
    for (int64_t i = 0; i < main_len; ++i) *k++ = start + i;      // main keys: itself
    for (int64_t i = 0; i < P + T; ++i) *k++ = start + i;         // branch keys: PREFIX..TEXT
    for (int64_t i = 0; i < R; ++i) *k++ = branch + i;            //   then PRED
    o.cu_q[2 * e.j + 1] = static_cast<int32_t>(start + main_len);
    o.cu_q[2 * e.j + 2] = static_cast<int32_t>(branch + R);
    o.cu_k[2 * e.j + 1] = static_cast<int32_t>(e.key + main_len);
    o.cu_k[2 * e.j + 2] = static_cast<int32_t>(e.key + main_len + P + T + R);
    for (int64_t i = 0; i < T; ++i) o.lm_positions[e.lm + i] = start + P - 1 + i;
    std::copy(ids + P, ids + P + T, o.lm_targets + e.lm);
    for (int64_t c = 0; c < K; ++c) {
      o.sum_positions[e.j * K + c] = start + P + T + sum_special_[c];
      o.pred_positions[e.j * K + c] = branch + pred_special_[c];
    }
    copy_ids(e.src->sum, e.sum_b, e.ns, o.sum_ids + e.s);
    o.sum_offsets[e.j + 1] = e.s + e.ns;
    copy_ids(e.src->pred, e.pred_b, e.np, o.pred_ids + e.p);
    o.pred_offsets[e.j + 1] = e.p + e.np;
  }

  std::vector<int64_t> prefix_, sum_, pred_, sum_special_, pred_special_;
  int64_t max_len_;
  int n_threads_;
};

// Greedy packing in order (as llara_fast.data.packing.greedy_groups): a new micro-batch starts
// when the next example would overflow the budget. Stops after `max_groups` complete groups
// (<= 0: no limit); when the examples run out first, the last (possibly partial) group is
// included, so the caller knows it reached the end when offsets[-1] == len(token_counts).
py::array_t<int64_t> greedy_groups(const I64Array& token_counts, int64_t token_budget, int64_t max_groups) {
  if (token_counts.ndim() != 1) throw std::invalid_argument("token_counts must be 1-D");
  const int64_t n = token_counts.shape(0);
  const int64_t* c = token_counts.data();
  std::vector<int64_t> off{0};
  int64_t used = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (c[i] > token_budget)
      throw std::invalid_argument("example " + std::to_string(i) + " needs " + std::to_string(c[i]) +
                                  " tokens, more than the token budget " + std::to_string(token_budget) +
                                  "; raise the budget or lower max_len");
    if (i > off.back() && used + c[i] > token_budget) {
      off.push_back(i);
      used = 0;
      if (max_groups > 0 && static_cast<int64_t>(off.size()) - 1 == max_groups) break;
    }
    used += c[i];
  }
  if (n > off.back() && (max_groups <= 0 || static_cast<int64_t>(off.size()) - 1 < max_groups)) off.push_back(n);
  py::array_t<int64_t> res(off.size());
  std::copy(off.begin(), off.end(), res.mutable_data());
  return res;
}

}  // namespace

void register_packer(py::module_& m) {
  py::class_<Packer>(m, "Packer", "Greedy LLaRA packer: CSR examples -> PackedBatch numpy arrays (DESIGN §3).")
      .def(py::init<std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                    std::vector<int64_t>, int64_t, int>(),
           py::arg("prefix_ids"), py::arg("sum_ids"), py::arg("pred_ids"), py::arg("sum_special_offsets"),
           py::arg("pred_special_offsets"), py::arg("max_len"), py::arg("n_threads") = 0)
      .def("example_tokens", &Packer::example_tokens, py::arg("text_len"))
      .def("pack", &Packer::pack, py::arg("sources"), py::arg("ex_source"), py::arg("ex_index"),
           py::arg("group_offsets"),
           "One dict of numpy arrays per group; group g packs references group_offsets[g]..[g+1].");
  m.def("greedy_groups", &greedy_groups, py::arg("token_counts"), py::arg("token_budget"), py::arg("max_groups") = 0,
        "Greedy group boundaries (int64, starting at 0) under a token budget.");
}

}  // namespace llara
