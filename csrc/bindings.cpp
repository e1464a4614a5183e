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
#include "step_loop.h"

namespace py = pybind11;
using tetri::CommCache;
using tetri::Communicator;

namespace {

// The Python callbacks of a segment, entered with the GIL from the loop that runs without it. They
// hold borrowed references: the Python objects outlive the call of run_segment that uses them.
tetri::SegmentCallbacks segment_callbacks(const py::object& step, const py::object& commit,
                                          const py::object& on_step) {
  tetri::SegmentCallbacks cb;
  if (!step.is_none()) {
    cb.step = [fn = step.ptr()]() -> std::pair<std::optional<std::string>, int64_t> {
      py::gil_scoped_acquire gil;
      const py::tuple result = py::reinterpret_borrow<py::object>(fn)().cast<py::tuple>();  // (error | None, exchanges)
      TETRI_CHECK_STATE(result.size() == 2, "a step callback returns (error or None, exchanges)");
      std::optional<std::string> error;
      if (!result[0].is_none()) error = result[0].cast<std::string>();
      return {error, result[1].cast<int64_t>()};
    };
  }
  if (!commit.is_none()) {
    cb.commit = [fn = commit.ptr()]() {
      py::gil_scoped_acquire gil;
      py::reinterpret_borrow<py::object>(fn)();
    };
  }
  if (!on_step.is_none()) {
    cb.on_step = [fn = on_step.ptr()](int64_t k) {
      py::gil_scoped_acquire gil;
      py::reinterpret_borrow<py::object>(fn)(k);
    };
  }
  return cb;
}

void bind_step_loop(py::module_& m) {
  using release_gil = py::call_guard<py::gil_scoped_release>;
  py::register_exception<tetri::GroupAborted>(m, "GroupAbortedError", PyExc_RuntimeError);

  py::class_<tetri::StopFlag, std::shared_ptr<tetri::StopFlag>>(m, "StopFlag")
      .def(py::init<>())
      .def("set", &tetri::StopFlag::set)
      .def("clear", &tetri::StopFlag::clear)
      .def("is_set", &tetri::StopFlag::is_set);

  py::class_<tetri::StepGroup, std::shared_ptr<tetri::StepGroup>>(m, "StepGroup")
      .def(py::init<int>(), py::arg("degree"))
      .def_property_readonly("degree", &tetri::StepGroup::degree)
      .def_property_readonly("aborted", &tetri::StepGroup::aborted)
      .def("meet", &tetri::StepGroup::meet, py::arg("rank"), release_gil())
      .def("abort", &tetri::StepGroup::abort);

  py::class_<tetri::DeviceQueue, std::shared_ptr<tetri::DeviceQueue>>(m, "DeviceQueue")
      .def(py::init<int, int, bool>(), py::arg("device_index"), py::arg("max_queued"), py::arg("trace") = false)
      .def_property_readonly("device_index", &tetri::DeviceQueue::device_index)
      .def("wait_for_room", &tetri::DeviceQueue::wait_for_room, release_gil())
      .def("launch_graph", &tetri::DeviceQueue::launch_graph, py::arg("graph_exec"), release_gil())
      .def("mark", &tetri::DeviceQueue::mark, py::arg("label"))
      .def("marks_ms", &tetri::DeviceQueue::marks_ms, release_gil());

  py::class_<tetri::SegmentSpec>(m, "SegmentSpec")
      .def(py::init([](int64_t max_steps, std::vector<int64_t> steps_left,
                       std::vector<std::shared_ptr<tetri::StopFlag>> stop_flags,
                       std::shared_ptr<tetri::StopFlag> exit_flag, int64_t graph_exec, int64_t graph_exchanges,
                       std::string first_error, bool trace) {
             tetri::SegmentSpec spec;
             spec.max_steps = max_steps;
             spec.steps_left = std::move(steps_left);
             spec.stop_flags = std::move(stop_flags);
             spec.exit_flag = std::move(exit_flag);
             spec.graph_exec = graph_exec;
             spec.graph_exchanges = graph_exchanges;
             spec.first_error = std::move(first_error);
             spec.trace = trace;
             return spec;
           }),
           py::arg("max_steps"), py::arg("steps_left"), py::arg("stop_flags"), py::arg("exit_flag") = py::none(),
           py::arg("graph_exec") = 0, py::arg("graph_exchanges") = 0, py::arg("first_error") = "",
           py::arg("trace") = false)
      .def_readonly("max_steps", &tetri::SegmentSpec::max_steps)
      .def_readonly("graph_exec", &tetri::SegmentSpec::graph_exec);

  py::class_<tetri::SegmentOutcome>(m, "SegmentOutcome")
      .def_readonly("steps", &tetri::SegmentOutcome::steps)
      .def_readonly("end", &tetri::SegmentOutcome::end)
      .def_readonly("stop_mask", &tetri::SegmentOutcome::stop_mask)
      .def_readonly("errors", &tetri::SegmentOutcome::errors)
      .def_readonly("phases_s", &tetri::SegmentOutcome::phases_s);

  m.def(
      "run_segment",
      [](tetri::StepGroup& group, int rank, tetri::DeviceQueue& queue, const tetri::SegmentSpec& spec,
         const py::object& step, const py::object& commit, const py::object& on_step) {
        const tetri::SegmentCallbacks cb = segment_callbacks(step, commit, on_step);
        py::gil_scoped_release release;  // re-taken before the outcome is converted (or an error raised)
        return tetri::run_segment(group, rank, queue, spec, cb);
      },
      py::arg("group"), py::arg("rank"), py::arg("queue"), py::arg("spec"), py::arg("step") = py::none(),
      py::arg("commit") = py::none(), py::arg("on_step") = py::none());
}

}  // namespace

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
  bind_step_loop(m);

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
