// The NCCL communicator (CUDA builds only): ncclCommInitAll over the group's GPUs, one NCCL
// communicator per rank, all owned by this object. Each rank's thread calls the collectives with
// its own rank; the work is queued on torch's current stream of that rank's GPU, so it is ordered
// with the model's kernels like any torch op (the host does not wait, except in barrier).
//
// The Python bindings release the GIL around every call: the first exchange between two GPUs
// connects them, and ncclGroupEnd of one rank blocks until the peer's thread joins. With the GIL
// held the peer's thread can never get there (seen on 2xH200).
//
// NCCL is not thread-safe per communicator (hence the per-rank lock below), and communicators that
// share a GPU must be used in the same order on every rank: NCCL kernels wait on their peers, so two
// groups queued in opposite orders on two GPUs deadlock. The engine satisfies both by construction:
// one executor thread per GPU issues everything on that GPU's current stream, and the groups of one
// round are disjoint.
//
// The payload of every collective here is moved, never reduced, so tensors travel as bytes
// (ncclUint8) whatever their dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include "comm.h"
#include "tensor_checks.h"

namespace tetri {
namespace {

void nccl_check(ncclResult_t result, ncclComm_t comm, const std::string& what) {
  if (result == ncclSuccess || result == ncclInProgress) return;
  std::string detail = comm != nullptr ? ncclGetLastError(comm) : "";
  throw std::runtime_error(str_cat(what, " failed: ", ncclGetErrorString(result),
                                   detail.empty() ? std::string() : str_cat(" (", detail, ")")));
}

void cuda_check(cudaError_t result, const std::string& what) {
  if (result != cudaSuccess) throw std::runtime_error(str_cat(what, " failed: ", cudaGetErrorString(result)));
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(std::vector<std::string> devices, std::vector<int> cuda_indices)
      : Communicator(std::move(devices)),
        cuda_indices_(std::move(cuda_indices)),
        comms_(cuda_indices_.size(), nullptr),
        rank_busy_(new std::mutex[cuda_indices_.size()]) {
    // ncclCommInitAll switches the calling thread's current device; put it back afterwards.
    int previous = 0;
    cuda_check(cudaGetDevice(&previous), "cudaGetDevice");
    const ncclResult_t result = ncclCommInitAll(comms_.data(), size(), cuda_indices_.data());
    cudaSetDevice(previous);
    nccl_check(result, nullptr, str_cat("ncclCommInitAll over ", join_devices(this->devices())));
  }

  ~NcclCommunicator() override {
    // Destroying waits for this rank's queued work; the object is only destroyed once unused.
    for (ncclComm_t comm : comms_) {
      if (comm != nullptr) ncclCommDestroy(comm);
    }
  }

  std::string backend() const override { return "nccl"; }

  at::Tensor all_to_all(int rank, const at::Tensor& x_in) override {
    Call call(*this, rank, x_in, "all_to_all");
    const at::Tensor& x = call.x;
    TETRI_CHECK_ARG(x.size(0) % size() == 0, "all_to_all: dim 0 of x (", x.size(0),
                    ") is not divisible by the group size ", size(),
                    " (Ulysses: the number of heads must be divisible by the SP degree)");
    at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
    const size_t chunk_bytes = x.nbytes() / size();
    if (chunk_bytes == 0) return out;
    const char* src = static_cast<const char*>(x.const_data_ptr());
    char* dst = static_cast<char*>(out.data_ptr());
    // The chunk a rank keeps never leaves its GPU.
    cuda_check(cudaMemcpyAsync(dst + rank * chunk_bytes, src + rank * chunk_bytes, chunk_bytes,
                               cudaMemcpyDeviceToDevice, call.stream),
               "all_to_all: local copy");
    if (size() == 1) return out;
    ncclComm_t comm = comms_[rank];
    nccl_check(ncclGroupStart(), comm, "ncclGroupStart");
    ncclResult_t result = ncclSuccess;
    for (int peer = 0; peer < size() && result == ncclSuccess; ++peer) {
      if (peer == rank) continue;
      result = ncclSend(src + peer * chunk_bytes, chunk_bytes, ncclUint8, peer, comm, call.stream);
      if (result == ncclSuccess) {
        result = ncclRecv(dst + peer * chunk_bytes, chunk_bytes, ncclUint8, peer, comm, call.stream);
      }
    }
    const ncclResult_t end = ncclGroupEnd();  // always close the group, even after a failed call
    nccl_check(result, comm, "all_to_all: ncclSend/ncclRecv");
    nccl_check(end, comm, "all_to_all: ncclGroupEnd");
    return out;
  }

  at::Tensor all_gather(int rank, const at::Tensor& x_in) override {
    Call call(*this, rank, x_in, "all_gather");
    const at::Tensor& x = call.x;
    auto sizes = x.sizes().vec();
    sizes[0] *= size();
    at::Tensor out = at::empty(sizes, x.options().memory_format(at::MemoryFormat::Contiguous));
    if (x.nbytes() == 0) return out;
    nccl_check(ncclAllGather(x.const_data_ptr(), out.data_ptr(), x.nbytes(), ncclUint8, comms_[rank], call.stream),
               comms_[rank], "ncclAllGather");
    return out;
  }

  at::Tensor broadcast(int rank, const at::Tensor& x_in, int root) override {
    TETRI_CHECK_ARG(root >= 0 && root < size(), "broadcast: root ", root, " is out of range for a group of ", size(),
                    " ranks ", join_devices(devices()));
    Call call(*this, rank, x_in, "broadcast");
    // The root sends its tensor as it is (in place); the others receive into new memory.
    at::Tensor out = rank == root ? call.x : at::empty_like(call.x, at::MemoryFormat::Contiguous);
    if (out.nbytes() == 0) return out;
    nccl_check(ncclBroadcast(call.x.const_data_ptr(), out.data_ptr(), out.nbytes(), ncclUint8, root, comms_[rank],
                             call.stream),
               comms_[rank], "ncclBroadcast");
    return out;
  }

  void barrier(int rank) override {
    check_rank(rank, "barrier");
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(cuda_indices_[rank]));
    at::Tensor token = at::zeros({1}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, cuda_indices_[rank]));
    Call call(*this, rank, token, "barrier");
    nccl_check(ncclAllReduce(token.const_data_ptr(), token.data_ptr(), 1, ncclFloat32, ncclSum, comms_[rank],
                             call.stream),
               comms_[rank], "barrier: ncclAllReduce");
    // The all-reduce completes only once every rank has queued it; wait for it on the host.
    cuda_check(cudaStreamSynchronize(call.stream), "barrier: cudaStreamSynchronize");
  }

 private:
  // One collective of one rank: checks, device guard, current stream, and a per-rank lock
  // (an NCCL communicator must not be used by two threads at once).
  struct Call {
    Call(NcclCommunicator& owner, int rank, const at::Tensor& x_in, const char* op)
        : active(owner), busy(check_and_lock(owner, rank, x_in, op)), guard(x_in.device()) {
      x = x_in.contiguous();
      stream = c10::cuda::getCurrentCUDAStream(x_in.device().index()).stream();
    }

    static std::unique_lock<std::mutex> check_and_lock(NcclCommunicator& owner, int rank, const at::Tensor& x,
                                                       const char* op) {
      owner.check_rank(rank, op);
      check_defined(x, str_cat(op, ": x"));
      const std::string& expected = owner.devices()[rank];
      TETRI_CHECK_ARG(x.is_cuda() && x.device().index() == owner.cuda_indices_[rank], op, ": rank ", rank,
                      " of ", join_devices(owner.devices()), " runs on ", expected, " but x is ", describe(x));
      TETRI_CHECK_ARG(x.dim() >= 1, op, ": x must have at least one dimension, got a 0-dim tensor");
      std::unique_lock<std::mutex> lock(owner.rank_busy_[rank], std::try_to_lock);
      TETRI_CHECK_ARG(lock.owns_lock(), op, ": rank ", rank, " (", expected,
                      ") is already in a collective on another thread; one thread per rank");
      return lock;
    }

    ActiveCall active;
    std::unique_lock<std::mutex> busy;
    c10::cuda::CUDAGuard guard;
    at::Tensor x;
    cudaStream_t stream = nullptr;
  };

  std::vector<int> cuda_indices_;
  std::vector<ncclComm_t> comms_;  // comms_[rank] drives devices()[rank]
  std::unique_ptr<std::mutex[]> rank_busy_;
};

}  // namespace

std::shared_ptr<Communicator> make_nccl_communicator(const std::vector<std::string>& devices) {
  std::vector<int> indices;
  const int count = static_cast<int>(c10::cuda::device_count());
  for (const auto& name : devices) {
    const DeviceName dev = parse_device(name);
    TETRI_CHECK_ARG(dev.is_cuda, "device ", name, " is not a CUDA device; NCCL groups are all 'cuda:N'");
    TETRI_CHECK_ARG(dev.index < count, "device ", name, " does not exist: this machine has ", count, " CUDA device(s)");
    indices.push_back(dev.index);
  }
  return std::make_shared<NcclCommunicator>(devices, std::move(indices));
}

bool built_with_cuda() { return true; }

std::string nccl_version() {
  int code = 0;
  if (ncclGetVersion(&code) != ncclSuccess) return "unknown";
  // NCCL >= 2.9 encodes major*10000 + minor*100 + patch.
  return str_cat(code / 10000, ".", (code % 10000) / 100, ".", code % 100);
}

}  // namespace tetri
