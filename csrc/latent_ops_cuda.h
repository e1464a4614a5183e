// CUDA kernels behind the latent ops (latent_kernels.cu). Plain pointers and byte counts only, so
// that nvcc never parses torch headers; latent_ops.cpp does the tensor bookkeeping.
#pragma once

#include <cstdint>
#include <string>

namespace tetri {

// Most shards / latents one kernel launch handles; beyond this latent_ops.cpp falls back to ATen.
constexpr int kMaxKernelTensors = 16;

// x: [batch, length, row_bytes] bytes on one GPU. outs[i]: [batch, shard_len, row_bytes] on the
// same GPU. Writes shard i = tokens [i*shard_len, (i+1)*shard_len) of x, zeros past `length`.
// stream is a cudaStream_t. Returns an empty string or the CUDA error.
std::string launch_shard_pad(const void* x, void* const* outs, int num_shards, int64_t batch,
                             int64_t length, int64_t shard_len, int64_t row_bytes, void* stream);

// out = concat(ins) where every ins[i] has `bytes_each` bytes; all on one GPU.
std::string launch_pack(const void* const* ins, int num_inputs, int64_t bytes_each, void* out,
                        void* stream);

}  // namespace tetri
