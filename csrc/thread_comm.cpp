// The thread communicator: collectives between threads of this process on CPU tensors, with the
// same interface as the NCCL backend so that every parallel code path runs on a CPU-only machine.
//
// Each collective is a "round": ranks deposit their input tensor in the round and wait until all
// have arrived (phase 1); then each rank builds its own output by copying from the others' inputs
// without any lock, and waits until every rank has finished reading (phase 2) so that a caller may
// overwrite its input as soon as the call returns. A rank that times out in phase 1 withdraws its
// input, so the round stays consistent and late arrivals simply wait (and time out) in turn.
#include <ATen/ATen.h>

#include <condition_variable>

#include "comm.h"
#include "tensor_checks.h"

namespace tetri {
namespace {

class ThreadCommunicator final : public Communicator {
 public:
  ThreadCommunicator(std::vector<std::string> devices, double timeout_s)
      : Communicator(std::move(devices)), timeout_s_(timeout_s), current_(std::make_shared<Round>(size())) {}

  std::string backend() const override { return "thread"; }

  at::Tensor all_to_all(int rank, const at::Tensor& x) override {
    check_input(rank, x, "all_to_all");
    TETRI_CHECK_ARG(x.size(0) % size() == 0, "all_to_all: dim 0 of x (", x.size(0),
                    ") is not divisible by the group size ", size(),
                    " (Ulysses: the number of heads must be divisible by the SP degree)");
    return exchange(rank, "all_to_all", x, -1, [this](const Round& round, int me) {
      const at::Tensor& mine = round.inputs[me];
      const int64_t chunk = mine.size(0) / size();
      at::Tensor out = at::empty(mine.sizes(), mine.options().memory_format(at::MemoryFormat::Contiguous));
      for (int j = 0; j < size(); ++j) {
        out.narrow(0, j * chunk, chunk).copy_(round.inputs[j].narrow(0, me * chunk, chunk));
      }
      return out;
    });
  }

  at::Tensor all_gather(int rank, const at::Tensor& x) override {
    check_input(rank, x, "all_gather");
    return exchange(rank, "all_gather", x, -1, [this](const Round& round, int me) {
      const at::Tensor& mine = round.inputs[me];
      auto sizes = mine.sizes().vec();
      const int64_t rows = sizes[0];
      sizes[0] = rows * size();
      at::Tensor out = at::empty(sizes, mine.options().memory_format(at::MemoryFormat::Contiguous));
      for (int j = 0; j < size(); ++j) out.narrow(0, j * rows, rows).copy_(round.inputs[j]);
      return out;
    });
  }

  at::Tensor broadcast(int rank, const at::Tensor& x, int root) override {
    check_input(rank, x, "broadcast");
    TETRI_CHECK_ARG(root >= 0 && root < size(), "broadcast: root ", root, " is out of range for a group of ", size(),
                    " ranks ", join_devices(devices()));
    return exchange(rank, "broadcast", x, root, [](const Round& round, int me) {
      if (me == round.root) return round.inputs[me];
      const at::Tensor& src = round.inputs[round.root];
      return at::empty(src.sizes(), src.options().memory_format(at::MemoryFormat::Contiguous)).copy_(src);
    });
  }

  void barrier(int rank) override {
    check_rank(rank, "barrier");
    exchange(rank, "barrier", at::Tensor(), -1, [](const Round&, int) { return at::Tensor(); });
  }

 private:
  struct Round {
    explicit Round(int n) : inputs(n), present(n, false) {}
    std::string op;  // the collective the ranks in this round are in
    int root = -1;
    std::vector<at::Tensor> inputs;
    std::vector<bool> present;
    int arrived = 0;
    int finished = 0;
    bool complete = false;  // every rank arrived
    std::string error;      // inputs that do not fit together: every rank raises it
  };

  void check_input(int rank, const at::Tensor& x, const char* op) const {
    check_rank(rank, op);
    check_defined(x, str_cat(op, ": x"));
    TETRI_CHECK_ARG(x.device().is_cpu(), op, ": the thread communicator ", join_devices(devices()),
                    " exchanges CPU tensors, but x is ", describe(x));
    TETRI_CHECK_ARG(x.dim() >= 1, op, ": x must have at least one dimension, got a 0-dim tensor");
  }

  // Called by the last rank to arrive, with mu_ held: do the inputs fit together?
  static std::string validate(const Round& round) {
    if (round.op == "barrier") return "";
    const int ref = round.op == "broadcast" ? round.root : 0;
    const at::Tensor& a = round.inputs[ref];
    for (size_t j = 0; j < round.inputs.size(); ++j) {
      const at::Tensor& b = round.inputs[j];
      if (b.sizes() != a.sizes() || b.scalar_type() != a.scalar_type()) {
        return str_cat(round.op, ": rank ", j, " passed ", b.sizes(), " ", b.scalar_type(), " but rank ", ref,
                       " passed ", a.sizes(), " ", a.scalar_type(), "; every rank must pass the same shape and dtype");
      }
    }
    return "";
  }

  std::string missing_ranks(const Round& round) const {
    std::string out;
    for (int j = 0; j < size(); ++j) {
      if (!round.present[j]) out += str_cat(out.empty() ? "" : ", ", j, " (", devices()[j], ")");
    }
    return out;
  }

  template <typename Compute>
  at::Tensor exchange(int rank, const std::string& op, const at::Tensor& x, int root, Compute compute) {
    const ActiveCall active(*this);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s_);
    std::unique_lock<std::mutex> lock(mu_);
    std::shared_ptr<Round> round = current_;
    if (round->arrived > 0) {
      TETRI_CHECK_ARG(round->op == op && round->root == root, op, ": rank ", rank, " called ", op,
                      root >= 0 ? str_cat("(root=", root, ")") : std::string(), " while other ranks wait in ", round->op,
                      round->root >= 0 ? str_cat("(root=", round->root, ")") : std::string(),
                      "; every rank must call the same collectives in the same order");
    }
    TETRI_CHECK_ARG(!round->present[rank], op, ": rank ", rank, " (", devices()[rank],
                    ") is already waiting in this collective; is one rank used by two threads?");
    round->op = op;
    round->root = root;
    round->inputs[rank] = x;
    round->present[rank] = true;
    round->arrived += 1;

    // Phase 1: wait for every rank.
    if (round->arrived == size()) {
      round->complete = true;
      round->error = validate(*round);
      current_ = std::make_shared<Round>(size());
      cv_.notify_all();
    } else if (!cv_.wait_until(lock, deadline, [&] { return round->complete; })) {
      const std::string missing = missing_ranks(*round);
      round->present[rank] = false;
      round->inputs[rank] = at::Tensor();
      round->arrived -= 1;
      throw CommTimeout(str_cat(op, ": rank ", rank, " (", devices()[rank], ") of ", join_devices(devices()),
                                " waited ", timeout_s_, " s for rank(s) ", missing, " that never arrived"));
    }
    lock.unlock();

    at::Tensor out;
    std::exception_ptr failure;
    if (round->error.empty()) {
      try {
        out = compute(*round, rank);
      } catch (...) {
        failure = std::current_exception();
      }
    }

    // Phase 2: nobody returns (and may overwrite its input) while another rank still reads it.
    lock.lock();
    round->finished += 1;
    if (round->finished == size()) {
      cv_.notify_all();
    } else if (!cv_.wait_until(lock, std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s_), [&] { return round->finished == size(); })) {
      throw CommTimeout(str_cat(op, ": rank ", rank, " (", devices()[rank], ") of ", join_devices(devices()),
                                " waited ", timeout_s_, " s for the other ranks to finish copying"));
    }
    lock.unlock();
    if (!round->error.empty()) throw std::invalid_argument(round->error);
    if (failure) std::rethrow_exception(failure);
    return out;
  }

  const double timeout_s_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<Round> current_;  // the round new arrivals join
};

}  // namespace

std::shared_ptr<Communicator> make_thread_communicator(const std::vector<std::string>& devices, double timeout_s) {
  return std::make_shared<ThreadCommunicator>(devices, timeout_s);
}

}  // namespace tetri
