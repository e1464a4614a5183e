// The native step loop (see step_loop.h): the group's meetings, the device queue and one rank's loop.
// Only DeviceQueue touches CUDA, behind TETRI_WITH_CUDA; the rest is plain C++ and runs in every build.
#include "step_loop.h"

#include <algorithm>

#include "common.h"

#ifdef TETRI_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace tetri {

// ---- StepGroup ---------------------------------------------------------------------------------

StepGroup::StepGroup(int degree) : degree_(degree), parity_(static_cast<size_t>(std::max(degree, 1)), 0) {
  TETRI_CHECK_ARG(degree >= 1, "a group has at least one rank, got degree ", degree);
  slots_[0].resize(static_cast<size_t>(degree));
  slots_[1].resize(static_cast<size_t>(degree));
}

void StepGroup::meet(int rank) {
  TETRI_CHECK_ARG(rank >= 0 && rank < degree_, "rank ", rank, " is out of range for a group of ", degree_);
  std::unique_lock<std::mutex> lock(mu_);
  if (aborted_) throw GroupAborted();
  if (degree_ == 1) return;
  const uint64_t generation = generation_;
  if (++arrived_ == degree_) {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
    return;
  }
  cv_.wait(lock, [&] { return generation_ != generation || aborted_; });
  if (generation_ == generation) throw GroupAborted();  // aborted before everyone arrived
}

void StepGroup::exchange(int rank, const StepReport& mine, std::vector<StepReport>& all) {
  TETRI_CHECK_ARG(rank >= 0 && rank < degree_, "rank ", rank, " is out of range for a group of ", degree_);
  // Double buffered: a rank writes the other set at its next exchange, and cannot write this one
  // again before every rank has passed the next meeting, i.e. has read it.
  const int parity = parity_[static_cast<size_t>(rank)];
  parity_[static_cast<size_t>(rank)] ^= 1;
  slots_[parity][static_cast<size_t>(rank)] = mine;
  meet(rank);
  all.assign(slots_[parity].begin(), slots_[parity].end());
}

void StepGroup::abort() {
  std::lock_guard<std::mutex> lock(mu_);
  aborted_ = true;
  cv_.notify_all();
}

bool StepGroup::aborted() const {
  std::lock_guard<std::mutex> lock(mu_);
  return aborted_;
}

// ---- DeviceQueue -------------------------------------------------------------------------------

#ifdef TETRI_WITH_CUDA
namespace {

void cuda_check(cudaError_t err, const char* what) {
  TETRI_CHECK_STATE(err == cudaSuccess, what, ": ", cudaGetErrorString(err));
}

cudaStream_t current_stream(int device) { return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream(); }

}  // namespace
#endif

DeviceQueue::DeviceQueue(int device_index, int max_queued, bool trace)
    : device_(device_index), max_queued_(std::max(max_queued, 0)), trace_(trace) {
#ifndef TETRI_WITH_CUDA
  TETRI_CHECK_ARG(device_index < 0, "device queue for CUDA device ", device_index,
                  ": this build of tetri_engine._C has no CUDA");
#endif
}

DeviceQueue::~DeviceQueue() {
#ifdef TETRI_WITH_CUDA
  if (device_ < 0) return;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  for (void* e : room_events_) cudaEventDestroy(static_cast<cudaEvent_t>(e));
  for (auto& mark : marks_) cudaEventDestroy(static_cast<cudaEvent_t>(mark.second));
#endif
}

void DeviceQueue::wait_for_room() {
#ifdef TETRI_WITH_CUDA
  if (device_ < 0) return;
  if (trace_) mark("step");
  if (max_queued_ == 0) return;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  if (room_events_.empty()) {
    for (int i = 0; i < max_queued_; ++i) {
      cudaEvent_t e = nullptr;
      // Blocking sync: the waiting thread sleeps instead of spinning (cores stay free for Python).
      cuda_check(cudaEventCreateWithFlags(&e, cudaEventBlockingSync | cudaEventDisableTiming), "cudaEventCreate");
      room_events_.push_back(e);
    }
  }
  const int slot = (room_head_ + room_pending_) % max_queued_;
  cuda_check(cudaEventRecord(static_cast<cudaEvent_t>(room_events_[slot]), current_stream(device_)), "cudaEventRecord");
  ++room_pending_;
  while (room_pending_ > max_queued_ - 1) {
    cuda_check(cudaEventSynchronize(static_cast<cudaEvent_t>(room_events_[room_head_])), "cudaEventSynchronize");
    room_head_ = (room_head_ + 1) % max_queued_;
    --room_pending_;
  }
#endif
}

std::string DeviceQueue::launch_graph(int64_t graph_exec) {
#ifdef TETRI_WITH_CUDA
  if (device_ < 0) return "a CUDA graph step on a CPU device";
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  const cudaError_t err = cudaGraphLaunch(reinterpret_cast<cudaGraphExec_t>(graph_exec), current_stream(device_));
  if (err != cudaSuccess) return str_cat("CUDA graph launch failed: ", cudaGetErrorString(err));
  return "";
#else
  (void)graph_exec;
  return "a CUDA graph step in a build without CUDA";
#endif
}

void DeviceQueue::mark(const std::string& label) {
#ifdef TETRI_WITH_CUDA
  if (device_ < 0 || !trace_) return;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  cudaEvent_t e = nullptr;
  cuda_check(cudaEventCreate(&e), "cudaEventCreate");
  cuda_check(cudaEventRecord(e, current_stream(device_)), "cudaEventRecord");
  marks_.emplace_back(label, e);
#else
  (void)label;
#endif
}

std::vector<std::pair<std::string, double>> DeviceQueue::marks_ms() {
  std::vector<std::pair<std::string, double>> out;
#ifdef TETRI_WITH_CUDA
  if (device_ < 0) return out;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  for (size_t i = 0; i < marks_.size(); ++i) {
    auto* e = static_cast<cudaEvent_t>(marks_[i].second);
    cuda_check(cudaEventSynchronize(e), "cudaEventSynchronize");
    if (i > 0) {
      float ms = 0.0f;
      cuda_check(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(marks_[i - 1].second), e), "cudaEventElapsedTime");
      out.emplace_back(marks_[i].first, static_cast<double>(ms));
    }
  }
  for (auto& mark : marks_) cudaEventDestroy(static_cast<cudaEvent_t>(mark.second));
  marks_.clear();
#endif
  return out;
}

// ---- the loop ----------------------------------------------------------------------------------

std::string step_verdict(const std::vector<StepReport>& reports) {
  bool failed = false;
  for (const auto& r : reports) failed = failed || r.failed;
  if (!failed) return "";
  for (const auto& r : reports) {
    if (r.exchanges != reports.front().exchanges) return "out_of_step";
  }
  return "failed";
}

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point& mark) {
  const Clock::time_point now = Clock::now();
  const double s = std::chrono::duration<double>(now - mark).count();
  mark = now;
  return s;
}

// Rank 0's reading of the batch's stop flags (the executor exiting stops every request).
uint64_t stop_mask(const SegmentSpec& spec) {
  const bool exiting = spec.exit_flag != nullptr && spec.exit_flag->is_set();
  uint64_t mask = 0;
  for (size_t i = 0; i < spec.stop_flags.size(); ++i) {
    if (exiting || (spec.stop_flags[i] != nullptr && spec.stop_flags[i]->is_set())) mask |= uint64_t{1} << i;
  }
  return mask;
}

// Runs this rank's step k -> its report (stop mask not yet set).
StepReport run_step(DeviceQueue& queue, const SegmentSpec& spec, const SegmentCallbacks& callbacks, int64_t k) {
  StepReport report;
  if (spec.graph_exec != 0) {
    std::string error = queue.launch_graph(spec.graph_exec);
    if (!error.empty()) {  // nothing ran: no exchanges
      report.failed = true;
      report.error = std::move(error);
      return report;
    }
    report.exchanges = spec.graph_exchanges;
    if (k == 0 && !spec.first_error.empty()) {  // launched anyway: the peers' exchanges need it
      report.failed = true;
      report.error = spec.first_error;
    }
    return report;
  }
  auto [error, exchanges] = callbacks.step();
  report.exchanges = exchanges;
  if (error.has_value()) {
    report.failed = true;
    report.error = std::move(*error);
  }
  return report;
}

}  // namespace

SegmentOutcome run_segment(StepGroup& group, int rank, DeviceQueue& queue, const SegmentSpec& spec,
                           const SegmentCallbacks& callbacks) {
  SegmentOutcome out;
  std::vector<int64_t> left = spec.steps_left;
  std::vector<StepReport> reports;
  reports.reserve(static_cast<size_t>(group.degree()));
  Clock::time_point mark = Clock::now();
  try {
    TETRI_CHECK_ARG(spec.stop_flags.size() == spec.steps_left.size(), "a segment needs one stop flag per request");
    TETRI_CHECK_ARG(spec.steps_left.size() <= 64, "a segment runs at most 64 requests, got ", spec.steps_left.size());
    TETRI_CHECK_ARG(spec.graph_exec != 0 || callbacks.step, "a segment needs a graph or a step callback");
    for (int64_t k = 0; k < spec.max_steps; ++k) {
      std::array<double, 4> phases{};
      if (spec.trace) seconds_since(mark);
      queue.wait_for_room();
      if (spec.trace) phases[0] = seconds_since(mark);
      StepReport mine = run_step(queue, spec, callbacks, k);
      if (spec.trace) phases[1] = seconds_since(mark);
      if (rank == 0) mine.stop_mask = stop_mask(spec);
      group.exchange(rank, mine, reports);
      if (spec.trace) phases[2] = seconds_since(mark);
      out.stop_mask |= reports.front().stop_mask;
      const std::string verdict = step_verdict(reports);
      if (!verdict.empty()) {
        out.end = verdict;
        for (const auto& r : reports) out.errors.push_back(r.failed ? r.error : std::string());
        return out;
      }
      if (callbacks.commit) callbacks.commit();
      ++out.steps;
      if (rank == 0 && callbacks.on_step) callbacks.on_step(k);
      if (spec.trace) {
        phases[3] = seconds_since(mark);
        out.phases_s.push_back(phases);
      }
      bool finished = false;
      for (auto& n : left) finished = (--n <= 0) || finished;
      if (finished || out.stop_mask != 0) {
        out.end = finished ? "finished" : "stopped";
        return out;
      }
    }
  } catch (...) {
    group.abort();  // the other ranks must not wait for this one at the next meeting
    throw;
  }
  out.end = "budget";
  return out;
}

}  // namespace tetri
