// CUDA kernels for the latent ops, on raw bytes so that one kernel serves every dtype.
//   shard_pad: all k shards of a latent in one launch, padding zeroed in the same pass
//              (instead of k slice copies plus k memsets);
//   pack:      N same-shape latents into one batch in one launch.
// Both copy in the widest unit (16, 8, 4, 2 or 1 bytes) that every address and row size allows.
#include <cuda_runtime.h>

#include <cstdint>

#include "latent_ops_cuda.h"

namespace tetri {
namespace {

struct PtrArray {
  void* ptr[kMaxKernelTensors];
};

struct ConstPtrArray {
  const void* ptr[kMaxKernelTensors];
};

constexpr int kThreads = 256;

// Element e of the concatenated shards (shard, batch row, token, unit of the row); tokens past
// `length` read as 0. Host-callable too, so the index arithmetic can be checked without a GPU.
template <typename Unit>
__host__ __device__ inline void shard_pad_element(int64_t e, const Unit* __restrict__ x, const PtrArray& outs,
                                                  int64_t batch, int64_t length, int64_t shard_len,
                                                  int64_t row_units) {
  const int64_t per_shard = batch * shard_len * row_units;
  const int64_t shard = e / per_shard;
  const int64_t in_shard = e - shard * per_shard;
  const int64_t unit = in_shard % row_units;
  const int64_t row = in_shard / row_units;  // b * shard_len + t
  const int64_t t = row % shard_len;
  const int64_t b = row / shard_len;
  const int64_t token = shard * shard_len + t;
  Unit value{};
  if (token < length) value = x[(b * length + token) * row_units + unit];
  static_cast<Unit*>(outs.ptr[shard])[in_shard] = value;
}

template <typename Unit>
__host__ __device__ inline void pack_element(int64_t e, const ConstPtrArray& ins, Unit* __restrict__ out,
                                             int64_t units_each) {
  const int64_t i = e / units_each;
  out[e] = static_cast<const Unit*>(ins.ptr[i])[e - i * units_each];
}

template <typename Unit>
__global__ void shard_pad_kernel(const Unit* __restrict__ x, PtrArray outs, int64_t batch, int64_t length,
                                 int64_t shard_len, int64_t row_units, int64_t total) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    shard_pad_element(e, x, outs, batch, length, shard_len, row_units);
  }
}

template <typename Unit>
__global__ void pack_kernel(ConstPtrArray ins, Unit* __restrict__ out, int64_t units_each, int64_t total) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    pack_element(e, ins, out, units_each);
  }
}

// Largest power-of-two unit (<= 16 bytes) dividing every value in `values`.
int unit_bytes(const uint64_t* values, int n) {
  uint64_t bits = 16;
  for (int i = 0; i < n; ++i) bits |= values[i];
  int unit = 1;
  while (unit < 16 && (bits & static_cast<uint64_t>(unit)) == 0) unit *= 2;
  return unit;
}

int num_blocks(int64_t total) {
  // Enough blocks to fill any current GPU; the grid-stride loop covers the rest.
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

std::string last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

template <typename Unit>
std::string run_shard_pad(const void* x, void* const* outs, int num_shards, int64_t batch, int64_t length,
                          int64_t shard_len, int64_t row_bytes, cudaStream_t stream) {
  PtrArray ptrs{};
  for (int i = 0; i < num_shards; ++i) ptrs.ptr[i] = outs[i];
  const int64_t row_units = row_bytes / static_cast<int64_t>(sizeof(Unit));
  const int64_t total = num_shards * batch * shard_len * row_units;
  if (total == 0) return "";
  shard_pad_kernel<Unit><<<num_blocks(total), kThreads, 0, stream>>>(static_cast<const Unit*>(x), ptrs, batch, length,
                                                                      shard_len, row_units, total);
  return last_error();
}

template <typename Unit>
std::string run_pack(const void* const* ins, int num_inputs, int64_t bytes_each, void* out, cudaStream_t stream) {
  ConstPtrArray ptrs{};
  for (int i = 0; i < num_inputs; ++i) ptrs.ptr[i] = ins[i];
  const int64_t units_each = bytes_each / static_cast<int64_t>(sizeof(Unit));
  const int64_t total = num_inputs * units_each;
  if (total == 0) return "";
  pack_kernel<Unit><<<num_blocks(total), kThreads, 0, stream>>>(ptrs, static_cast<Unit*>(out), units_each, total);
  return last_error();
}

}  // namespace

std::string launch_shard_pad(const void* x, void* const* outs, int num_shards, int64_t batch, int64_t length,
                             int64_t shard_len, int64_t row_bytes, void* stream_ptr) {
  if (num_shards < 1 || num_shards > kMaxKernelTensors) return "launch_shard_pad: bad number of shards";
  uint64_t values[kMaxKernelTensors + 2];
  int n = 0;
  values[n++] = reinterpret_cast<uintptr_t>(x);
  values[n++] = static_cast<uint64_t>(row_bytes);
  for (int i = 0; i < num_shards; ++i) values[n++] = reinterpret_cast<uintptr_t>(outs[i]);
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  switch (unit_bytes(values, n)) {
    case 16: return run_shard_pad<uint4>(x, outs, num_shards, batch, length, shard_len, row_bytes, stream);
    case 8: return run_shard_pad<uint2>(x, outs, num_shards, batch, length, shard_len, row_bytes, stream);
    case 4: return run_shard_pad<uint32_t>(x, outs, num_shards, batch, length, shard_len, row_bytes, stream);
    case 2: return run_shard_pad<uint16_t>(x, outs, num_shards, batch, length, shard_len, row_bytes, stream);
    default: return run_shard_pad<uint8_t>(x, outs, num_shards, batch, length, shard_len, row_bytes, stream);
  }
}

std::string launch_pack(const void* const* ins, int num_inputs, int64_t bytes_each, void* out, void* stream_ptr) {
  if (num_inputs < 1 || num_inputs > kMaxKernelTensors) return "launch_pack: bad number of inputs";
  uint64_t values[kMaxKernelTensors + 2];
  int n = 0;
  values[n++] = reinterpret_cast<uintptr_t>(out);
  values[n++] = static_cast<uint64_t>(bytes_each);
  for (int i = 0; i < num_inputs; ++i) values[n++] = reinterpret_cast<uintptr_t>(ins[i]);
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  switch (unit_bytes(values, n)) {
    case 16: return run_pack<uint4>(ins, num_inputs, bytes_each, out, stream);
    case 8: return run_pack<uint2>(ins, num_inputs, bytes_each, out, stream);
    case 4: return run_pack<uint32_t>(ins, num_inputs, bytes_each, out, stream);
    case 2: return run_pack<uint16_t>(ins, num_inputs, bytes_each, out, stream);
    default: return run_pack<uint8_t>(ins, num_inputs, bytes_each, out, stream);
  }
}

}  // namespace tetri
