// tetri_engine._C: the pybind11 module, and nothing else. The Python face with the documentation
// users read is tetri_engine/ops/__init__.py.
//
// Every function that touches tensor data or waits on other ranks runs with the GIL released
// (py::call_guard<py::gil_scoped_release>): arguments are converted before and results after, with
// the GIL held. A collective entered with the GIL held could never be joined by the other ranks'
// threads, so this is what keeps two executor threads in one exchange from deadlocking.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include "comm.h"
#include "latent_ops.h"

namespace py = pybind11;
using tetri::CommCache;
using tetri::Communicator;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native core of tetri-engine: latent shard/gather/regroup/pack and communicators. "
            "Use it through tetri_engine.ops.";
  using release_gil = py::call_guard<py::gil_scoped_release>;

  py::register_exception<tetri::CommTimeout>(m, "CommTimeoutError", PyExc_RuntimeError);

  m.def("shard_length", &tetri::shard_length, py::arg("length"), py::arg("k"));
  m.def("shard", &tetri::shard, py::arg("x"), py::arg("k"), py::arg("devices") = py::none(), release_gil());
  m.def("gather", &tetri::gather, py::arg("shards"), py::arg("length"), py::arg("device") = py::none(), release_gil());
  m.def("regroup", &tetri::regroup, py::arg("shards"), py::arg("length"), py::arg("new_devices"), release_gil());
  m.def("regroup_bytes_moved", &tetri::regroup_bytes_moved, py::arg("shards"), py::arg("length"),
        py::arg("new_devices"));
  m.def("pack", &tetri::pack, py::arg("latents"), release_gil());
  m.def("unpack", &tetri::unpack, py::arg("batch"), py::arg("n"));
  m.def("built_with_cuda", &tetri::built_with_cuda);
  m.def("nccl_version", &tetri::nccl_version);

  py::class_<Communicator, std::shared_ptr<Communicator>>(m, "Communicator")
      .def_property_readonly("size", &Communicator::size)
      .def_property_readonly("devices",
                             [](const Communicator& c) {
                               py::tuple out(c.devices().size());
                               for (size_t i = 0; i < c.devices().size(); ++i) out[i] = py::str(c.devices()[i]);
                               return out;
                             })
      .def_property_readonly("backend", &Communicator::backend)
      .def_property_readonly("active_calls", &Communicator::active_calls)
      .def("rank_of", &Communicator::rank_of, py::arg("device"))
      .def("all_to_all", &Communicator::all_to_all, py::arg("rank"), py::arg("x"), release_gil())
      .def("all_gather", &Communicator::all_gather, py::arg("rank"), py::arg("x"), release_gil())
      .def("broadcast", &Communicator::broadcast, py::arg("rank"), py::arg("x"), py::arg("root") = 0, release_gil())
      .def("barrier", &Communicator::barrier, py::arg("rank"), release_gil())
      .def("__repr__", [](const Communicator& c) {
        return tetri::str_cat("Communicator(", c.backend(), ", ", tetri::join_devices(c.devices()), ")");
      });

  py::class_<CommCache, std::shared_ptr<CommCache>>(m, "CommCache")
      .def(py::init<int64_t, double>(), py::arg("capacity") = 64, py::arg("timeout_s") = 60.0)
      .def("get", &CommCache::get, py::arg("devices"), release_gil())
      .def("warmup", &CommCache::warmup, py::arg("groups"), release_gil())
      .def("__contains__", &CommCache::contains, py::arg("devices"))
      .def("clear", &CommCache::clear, release_gil())
      .def_property_readonly("timeout_s", &CommCache::timeout_s)
      .def("stats", [](const CommCache& cache) {
        const tetri::CommCacheStats s = cache.stats();
        py::dict out;
        out["created"] = s.created;
        out["hits"] = s.hits;
        out["misses"] = s.misses;
        out["evicted"] = s.evicted;
        out["creation_s"] = s.creation_s;
        out["size"] = s.size;
        out["capacity"] = s.capacity;
        return out;
      })
      .def("__len__", [](const CommCache& cache) { return cache.stats().size; });
}
