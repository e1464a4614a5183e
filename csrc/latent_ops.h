// Latent scatter/gather for sequence parallelism: split a request's token sequence [B, L, ...]
// into k contiguous shards along dim 1 (the tokens, i.e. image rows), gather it back, move it
// between device groups (regroup), and pack same-shape latents into one batch.
//
// Shard i of k holds tokens [i*s, min((i+1)*s, L)) with s = ceil(L/k); positions past L are zeros
// (only the last shards can hold padding). Gather drops the padding again.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

namespace tetri {

int64_t shard_length(int64_t length, int64_t k);

// k new contiguous shards [B, s, ...]; shard i on devices[i] (default: x's device).
std::vector<at::Tensor> shard(const at::Tensor& x, int64_t k,
                              const std::optional<std::vector<std::string>>& devices);

// [B, length, ...] on `device` (default: the first shard's device); always new memory.
at::Tensor gather(const std::vector<at::Tensor>& shards, int64_t length,
                  const std::optional<std::string>& device);

// len(new_devices) shards on new_devices. A shard whose token range and torch device do not
// change is returned as is (same tensor); everything else is copied straight from the old shards
// that overlap it (peer copies between GPUs), never through a gathered copy of the whole latent.
std::vector<at::Tensor> regroup(const std::vector<at::Tensor>& shards, int64_t length,
                                const std::vector<std::string>& new_devices);

// Same-shape, same-device latents -> one batch along dim 0 (new memory).
at::Tensor pack(const std::vector<at::Tensor>& latents);

// The batch split back into n equal parts along dim 0 (views into the batch, no copy).
std::vector<at::Tensor> unpack(const at::Tensor& batch, int64_t n);

// Bytes a regroup copies (not counting shards reused as they are); for benchmarks.
int64_t regroup_bytes_moved(const std::vector<at::Tensor>& shards, int64_t length,
                            const std::vector<std::string>& new_devices);

}  // namespace tetri
