// The communicator cache: one communicator per ordered device tuple, created once (even when
// several threads ask at the same moment) and reused, with LRU eviction past a capacity.
// Creation runs outside the cache lock, so a slow NCCL initialisation for one tuple never
// delays a cache hit for another.
#include <algorithm>
#include <set>

#include "comm.h"

namespace tetri {

Communicator::Communicator(std::vector<std::string> devices) : devices_(std::move(devices)) {}

int Communicator::rank_of(const std::string& device) const {
  const std::string name = parse_device(device).text;
  const auto it = std::find(devices_.begin(), devices_.end(), name);
  TETRI_CHECK_ARG(it != devices_.end(), "device ", name, " is not in this communicator's group ", join_devices(devices_));
  return static_cast<int>(it - devices_.begin());
}

void Communicator::check_rank(int rank, const char* op) const {
  TETRI_CHECK_ARG(rank >= 0 && rank < size(), op, ": rank ", rank, " is out of range for the group ",
                  join_devices(devices_), " of ", size(), " rank(s)");
}

CommCache::CommCache(int64_t capacity, double timeout_s) : capacity_(capacity), timeout_s_(timeout_s) {
  TETRI_CHECK_ARG(capacity >= 1, "CommCache capacity must be >= 1, got ", capacity);
  TETRI_CHECK_ARG(timeout_s > 0, "CommCache timeout_s must be > 0, got ", timeout_s);
  stats_.capacity = capacity;
}

CommCache::Key CommCache::canonical_key(const std::vector<std::string>& devices) {
  TETRI_CHECK_ARG(!devices.empty(), "a communicator needs at least one device, got an empty group");
  Key key;
  std::set<std::string> seen;
  int num_cuda = 0;
  for (const auto& name : devices) {
    const DeviceName dev = parse_device(name);
    TETRI_CHECK_ARG(seen.insert(dev.text).second, "device ", dev.text, " appears twice in the group ",
                    join_devices(devices), ": each device is one rank");
    num_cuda += dev.is_cuda ? 1 : 0;
    key.push_back(dev.text);
  }
  TETRI_CHECK_ARG(num_cuda == 0 || num_cuda == static_cast<int>(key.size()), "the group ", join_devices(devices),
                  " mixes CPU and CUDA devices; a communicator is all 'cpu:N' (threads) or all 'cuda:N' (NCCL)");
  return key;
}

std::shared_ptr<Communicator> CommCache::create(const Key& key) const {
  if (parse_device(key[0]).is_cuda) return make_nccl_communicator(key);
  return make_thread_communicator(key, timeout_s_);
}

void CommCache::evict_over_capacity(const Key& keep, std::vector<std::shared_ptr<Communicator>>& dropped) {
  auto it = lru_.end();
  while (static_cast<int64_t>(entries_.size()) > capacity_ && it != lru_.begin()) {
    --it;
    if (*it == keep) continue;
    const auto entry = entries_.find(*it);
    Slot& slot = *entry->second.slot;
    // A slot being created holds create_mu; a communicator in a collective counts active calls.
    std::unique_lock<std::mutex> creating(slot.create_mu, std::try_to_lock);
    if (!creating.owns_lock() || (slot.comm && slot.comm->active_calls() > 0)) continue;
    if (slot.comm) dropped.push_back(std::move(slot.comm));
    creating.unlock();
    entries_.erase(entry);
    it = lru_.erase(it);
    stats_.evicted += 1;
  }
}

std::shared_ptr<Communicator> CommCache::get(const std::vector<std::string>& devices) {
  const Key key = canonical_key(devices);
  std::shared_ptr<Slot> slot;
  std::vector<std::shared_ptr<Communicator>> dropped;  // destroyed after mu_ is released
  {
    const std::lock_guard<std::mutex> lock(mu_);
    auto found = entries_.find(key);
    if (found != entries_.end()) {
      lru_.splice(lru_.begin(), lru_, found->second.lru_pos);
      slot = found->second.slot;
      if (slot->comm) {  // fast path; comm is only written under both mu_ and create_mu
        stats_.hits += 1;
        return slot->comm;
      }
    } else {
      slot = std::make_shared<Slot>();
      lru_.push_front(key);
      entries_.emplace(key, Entry{slot, lru_.begin()});
      evict_over_capacity(key, dropped);
    }
  }
  dropped.clear();

  const std::lock_guard<std::mutex> creating(slot->create_mu);
  {
    const std::lock_guard<std::mutex> lock(mu_);
    if (slot->comm) {  // another thread created it while we waited
      stats_.hits += 1;
      return slot->comm;
    }
  }
  const auto start = std::chrono::steady_clock::now();
  std::shared_ptr<Communicator> comm;
  try {
    comm = create(key);
  } catch (...) {
    const std::lock_guard<std::mutex> lock(mu_);
    const auto found = entries_.find(key);
    if (found != entries_.end() && found->second.slot == slot) {
      lru_.erase(found->second.lru_pos);
      entries_.erase(found);
    }
    throw;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const std::lock_guard<std::mutex> lock(mu_);
  slot->comm = comm;
  stats_.created += 1;
  stats_.misses += 1;
  stats_.creation_s += seconds;
  return comm;
}

void CommCache::warmup(const std::vector<std::vector<std::string>>& groups) {
  for (const auto& group : groups) get(group);
}

bool CommCache::contains(const std::vector<std::string>& devices) const {
  const Key key = canonical_key(devices);
  const std::lock_guard<std::mutex> lock(mu_);
  return entries_.count(key) > 0;
}

void CommCache::clear() {
  std::vector<std::shared_ptr<Communicator>> dropped;
  {
    const std::lock_guard<std::mutex> lock(mu_);
    for (auto& [key, entry] : entries_) {
      if (entry.slot->comm) dropped.push_back(entry.slot->comm);
    }
    entries_.clear();
    lru_.clear();
  }
}

CommCacheStats CommCache::stats() const {
  const std::lock_guard<std::mutex> lock(mu_);
  CommCacheStats out = stats_;
  out.size = static_cast<int64_t>(entries_.size());
  return out;
}

}  // namespace tetri

#ifndef TETRI_WITH_CUDA
// CPU builds: nccl_comm.cpp is not compiled.
namespace tetri {

std::shared_ptr<Communicator> make_nccl_communicator(const std::vector<std::string>& devices) {
  throw std::runtime_error(str_cat("cannot create a communicator for ", join_devices(devices),
                                   ": this build of tetri_engine._C has no CUDA/NCCL (built without nvcc, a CUDA "
                                   "torch, or with TETRI_FORCE_CPU=1); see setup.py"));
}

bool built_with_cuda() { return false; }

std::string nccl_version() { return ""; }

}  // namespace tetri
#endif
