// Shared by every translation unit of tetri_engine._C: argument checks that become Python
// exceptions, and the device names ("cpu:3", "cuda:1") used everywhere above the executor.
//
// Deliberately free of torch headers so that the communicator cache compiles quickly; the
// tensor checks live in tensor_checks.h.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace tetri {

template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

// pybind11 turns std::invalid_argument into ValueError and std::runtime_error into RuntimeError,
// so a bad argument reaches Python as a clear exception instead of an abort.
#define TETRI_CHECK_ARG(cond, ...)                                    \
  do {                                                                \
    if (!(cond)) throw std::invalid_argument(::tetri::str_cat(__VA_ARGS__)); \
  } while (0)

#define TETRI_CHECK_STATE(cond, ...)                                  \
  do {                                                                \
    if (!(cond)) throw std::runtime_error(::tetri::str_cat(__VA_ARGS__)); \
  } while (0)

// Raised when a participant of a collective never arrives (Python: tetri_engine.ops.CommTimeoutError,
// a RuntimeError).
class CommTimeout : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A device named the way the engine names it. CPU "virtual devices" cpu:0..cpu:N-1 are all the host
// CPU; the index only says which executor thread / communicator rank owns a shard.
struct DeviceName {
  bool is_cuda = false;
  int index = 0;
  std::string text;  // canonical: "cpu:0", "cuda:1"
};

// Parses "cpu", "cpu:N" or "cuda:N". "cuda" without an index is refused: torch would read it as
// "the current device", which differs between threads.
DeviceName parse_device(const std::string& name);

// "(cuda:0, cuda:1)"
std::string join_devices(const std::vector<std::string>& devices);

}  // namespace tetri
