// Communicators: one object per ordered device tuple; rank i is the i-th device of the tuple.
// Two backends with one interface:
//   - ThreadCommunicator (thread_comm.cpp): CPU tensors; the participants are threads of this
//     process that meet in shared buffers behind a barrier with a timeout.
//   - NcclCommunicator (nccl_comm.cpp, CUDA builds): ncclCommInitAll over the tuple's GPUs, one
//     NCCL communicator per rank, collectives on torch's current stream of each GPU.
// And the CommCache (comm_cache.cpp): get-or-create per device tuple, LRU-capped.
//
// Every collective may wait on other ranks, so the Python bindings release the GIL around them.
// This header names at::Tensor without including torch so that comm_cache.cpp compiles quickly.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"

namespace at {
class Tensor;
}

namespace tetri {

class Communicator {
 public:
  explicit Communicator(std::vector<std::string> devices);
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int size() const { return static_cast<int>(devices_.size()); }
  const std::vector<std::string>& devices() const { return devices_; }
  // Rank of a device in this group; ValueError if it is not a member.
  int rank_of(const std::string& device) const;
  // Collectives running right now (the cache never evicts a communicator that is in use).
  int active_calls() const { return active_calls_.load(); }

  virtual std::string backend() const = 0;
  // x is split into size() equal chunks along dim 0; chunk j goes to rank j. Output chunk j came
  // from rank j. Every rank passes the same shape and dtype.
  virtual at::Tensor all_to_all(int rank, const at::Tensor& x) = 0;
  // Concatenation of every rank's x along dim 0, in rank order.
  virtual at::Tensor all_gather(int rank, const at::Tensor& x) = 0;
  // Root's x on every rank: the root gets its x back, the others a new tensor.
  virtual at::Tensor broadcast(int rank, const at::Tensor& x, int root) = 0;
  // Returns when every rank has called barrier.
  virtual void barrier(int rank) = 0;

 protected:
  void check_rank(int rank, const char* op) const;

  // Counts a collective as running for the lifetime of the object.
  class ActiveCall {
   public:
    explicit ActiveCall(const Communicator& comm) : comm_(comm) { comm_.active_calls_.fetch_add(1); }
    ~ActiveCall() { comm_.active_calls_.fetch_sub(1); }

   private:
    const Communicator& comm_;
  };

 private:
  std::vector<std::string> devices_;  // canonical names, rank order
  mutable std::atomic<int> active_calls_{0};
};

// Factories; `devices` are canonical names ("cpu:0" / "cuda:1"), distinct, non-empty.
std::shared_ptr<Communicator> make_thread_communicator(const std::vector<std::string>& devices, double timeout_s);
// Throws a RuntimeError in builds without CUDA.
std::shared_ptr<Communicator> make_nccl_communicator(const std::vector<std::string>& devices);
bool built_with_cuda();
std::string nccl_version();  // "" in CPU builds

struct CommCacheStats {
  int64_t created = 0;
  int64_t hits = 0;
  int64_t misses = 0;
  int64_t evicted = 0;
  double creation_s = 0.0;
  int64_t size = 0;
  int64_t capacity = 0;
};

// One communicator per ordered device tuple, created on first use and reused afterwards. Beyond
// `capacity` entries the least recently used communicator that is not in a collective is dropped
// from the cache; it is destroyed when its last user (a Python reference, a running collective)
// lets go of it, so eviction never destroys a communicator under a running exchange.
class CommCache {
 public:
  CommCache(int64_t capacity, double timeout_s);

  std::shared_ptr<Communicator> get(const std::vector<std::string>& devices);
  void warmup(const std::vector<std::vector<std::string>>& groups);
  bool contains(const std::vector<std::string>& devices) const;
  // Drops every cached communicator (each destroyed once unused); stats are kept.
  void clear();
  CommCacheStats stats() const;
  double timeout_s() const { return timeout_s_; }

 private:
  struct Slot {
    std::mutex create_mu;  // held while the communicator is created: one creation per tuple
    std::shared_ptr<Communicator> comm;
  };
  using Key = std::vector<std::string>;
  struct Entry {
    std::shared_ptr<Slot> slot;
    std::list<Key>::iterator lru_pos;
  };

  static Key canonical_key(const std::vector<std::string>& devices);
  std::shared_ptr<Communicator> create(const Key& key) const;
  // Called with mu_ held; moves evicted communicators to `dropped` so they die after unlocking.
  void evict_over_capacity(const Key& keep, std::vector<std::shared_ptr<Communicator>>& dropped);

  const int64_t capacity_;
  const double timeout_s_;
  mutable std::mutex mu_;
  std::map<Key, Entry> entries_;
  std::list<Key> lru_;  // front = most recently used
  CommCacheStats stats_;
};

}  // namespace tetri
