// The step loop of one rank of a group: runs the steps of one unchanged batch ("a segment") with the
// GIL released, and agrees every step with the group's other ranks. Python is entered only where the
// step itself is Python (an eager forward: the `step` and `commit` callbacks) and for the optional
// per-step progress callback of rank 0; a step that is a captured CUDA graph is launched from here.
//
// Protocol of one step on every rank (the executor's, executor/steps.py):
//   1. (CUDA) wait until at most max_queued - 1 earlier steps are still to run on the device;
//   2. run the step: launch the graph, or call `step()` -> (error or None, exchanges completed);
//   3. report (failed?, error, exchanges, and on rank 0 the batch's stop flags as a mask) and meet
//      the other ranks (`StepGroup::exchange`); every rank reads every report and takes the same
//      verdict: all fine -> commit; a failure with the same exchanges everywhere -> "failed"; the
//      ranks completed different exchanges -> "out_of_step" (the communicator cannot be trusted);
//   4. commit (`commit()`; a graph commits by itself), progress (`on_step(k)` on rank 0);
//   5. the segment ends when its step budget is spent, a request reached its last step, the group
//      agreed to stop a request (rank 0's mask), or a step failed: the batch changes, Python rebuilds it.
//
// No heap allocation per step except in trace mode (per-phase timings) and when a step fails.
// Builds without CUDA run the same loop; a DeviceQueue there is for the CPU (no waiting, no graphs).
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace tetri {

// A flag set from any thread and read without a lock (a request's cancel, the executor's exit).
class StopFlag {
 public:
  void set() { value_.store(true, std::memory_order_release); }
  void clear() { value_.store(false, std::memory_order_release); }
  bool is_set() const { return value_.load(std::memory_order_acquire); }

 private:
  std::atomic<bool> value_{false};
};

// Raised in every rank waiting in (or arriving at) a meeting of a group that was aborted (a rank
// failed outside the protocol). Python: tetri_engine.ops.GroupAbortedError (a RuntimeError).
class GroupAborted : public std::runtime_error {
 public:
  GroupAborted() : std::runtime_error("a rank of this group failed outside the step protocol (the group was aborted)") {}
};

// What one rank says about one step.
struct StepReport {
  bool failed = false;
  std::string error;       // when failed
  int64_t exchanges = 0;   // collectives this rank completed in the step
  uint64_t stop_mask = 0;  // rank 0: the batch's requests to stop after this step (bit i = request i)
};

// The ranks of one job: a reusable barrier with abort, and double-buffered report slots. Both the
// Python votes (tetri_engine.executor.agreement.RankAgreement: Python values, `meet` here) and the
// native loop (`exchange`) meet through the same barrier, so one job has one meeting sequence.
class StepGroup {
 public:
  explicit StepGroup(int degree);
  int degree() const { return degree_; }
  // Returns once every rank has called meet (at once at degree 1). GroupAborted if aborted.
  void meet(int rank);
  // Every rank's report of this step, in rank order, into `all` (its capacity is reused).
  void exchange(int rank, const StepReport& mine, std::vector<StepReport>& all);
  // Wakes every waiting rank with GroupAborted; later meetings raise it at once.
  void abort();
  bool aborted() const;

 private:
  const int degree_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  bool aborted_ = false;
  std::vector<StepReport> slots_[2];
  std::vector<int> parity_;  // per rank: the slot set of its next exchange
};

// A rank's device as the loop sees it. CUDA: bounds the steps queued ahead on the device's current
// stream (events with blocking sync: the waiting thread sleeps), launches graphs there, and in trace
// mode records timing events. CPU (device_index < 0): every call is a no-op.
class DeviceQueue {
 public:
  DeviceQueue(int device_index, int max_queued, bool trace);
  ~DeviceQueue();
  DeviceQueue(const DeviceQueue&) = delete;
  DeviceQueue& operator=(const DeviceQueue&) = delete;

  int device_index() const { return device_; }
  // Marks the end of the work queued so far; waits until at most max_queued - 1 marks are pending.
  void wait_for_room();
  // cudaGraphLaunch of a cudaGraphExec_t on the current stream -> "" or the CUDA error text.
  std::string launch_graph(int64_t graph_exec);
  // Trace mode: a timing event on the current stream, labelled (no-op otherwise).
  void mark(const std::string& label);
  // Trace mode, once the device is synchronised: (label, ms since the previous mark) per mark after
  // the first; the marks are then cleared.
  std::vector<std::pair<std::string, double>> marks_ms();

 private:
  const int device_;
  const int max_queued_;
  const bool trace_;
  std::vector<void*> room_events_;  // cudaEvent_t ring of max_queued events
  int room_head_ = 0;
  int room_pending_ = 0;
  std::vector<std::pair<std::string, void*>> marks_;  // trace: (label, cudaEvent_t)
};

// One segment: the steps of one batch on one rank (see the top of this file).
struct SegmentSpec {
  int64_t max_steps = 0;
  std::vector<int64_t> steps_left;                 // per request of the batch
  std::vector<std::shared_ptr<StopFlag>> stop_flags;  // per request; read by rank 0
  std::shared_ptr<StopFlag> exit_flag;              // set: stop every request (may be null)
  int64_t graph_exec = 0;                           // cudaGraphExec_t of the step, 0: `step()` callback
  int64_t graph_exchanges = 0;                      // collectives one graph launch completes
  std::string first_error;                          // reported by this rank at its first step (graph inputs it could not copy)
  bool trace = false;                               // record host time per phase of each step
};

struct SegmentOutcome {
  int64_t steps = 0;          // steps committed
  std::string end;            // "budget" | "finished" | "stopped" | "failed" | "out_of_step"
  uint64_t stop_mask = 0;     // requests the group agreed to stop (their last step is committed)
  std::vector<std::string> errors;  // "failed" / "out_of_step": per rank, "" for a rank that was fine
  // trace: per step, host seconds of (wait for room, step, meet, commit + progress)
  std::vector<std::array<double, 4>> phases_s;
};

struct SegmentCallbacks {
  // The eager step: (error or nullopt, exchanges completed). Unset: the spec's graph is launched.
  std::function<std::pair<std::optional<std::string>, int64_t>()> step;
  std::function<void()> commit;          // eager: apply the step agreed on (unset for graphs)
  std::function<void(int64_t)> on_step;  // rank 0, after step k committed (may be unset)
};

// The verdict of a step from every rank's report: "" (commit), "failed" or "out_of_step".
std::string step_verdict(const std::vector<StepReport>& reports);

// Runs a segment on `rank` (see the top of this file). A callback that throws aborts the group
// (the other ranks get GroupAborted) and the exception propagates.
SegmentOutcome run_segment(StepGroup& group, int rank, DeviceQueue& queue, const SegmentSpec& spec,
                           const SegmentCallbacks& callbacks);

}  // namespace tetri
