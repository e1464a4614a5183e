// Latent shard / gather / regroup / pack: the reference implementation, built with ATen ops so that
// it runs on CPU tensors (the virtual devices) and CUDA tensors alike. Copies between GPUs go
// through Tensor::copy_, which issues peer copies and orders them against both devices' current
// streams. In CUDA builds two hot paths use the kernels of latent_kernels.cu instead: sharding on one
// GPU (copy + zero padding for all shards in one launch) and packing (one launch for all latents).
#include "latent_ops.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "tensor_checks.h"

#ifdef TETRI_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "latent_ops_cuda.h"
#endif

namespace tetri {

at::Device torch_device(const DeviceName& dev) {
  if (!dev.is_cuda) return at::Device(at::kCPU);
  TETRI_CHECK_ARG(at::hasCUDA(), "device ", dev.text,
                  " requested but this torch cannot use CUDA (CPU-only torch, or no GPU visible)");
  const int64_t count = static_cast<int64_t>(at::getNumGPUs());
  TETRI_CHECK_ARG(dev.index < count, "device ", dev.text, " does not exist: this machine has ", count,
                  " CUDA device(s)");
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(dev.index));
}

int64_t shard_length(int64_t length, int64_t k) {
  TETRI_CHECK_ARG(k >= 1, "the number of shards k must be >= 1, got ", k);
  TETRI_CHECK_ARG(length >= 0, "length must be >= 0, got ", length);
  return (length + k - 1) / k;
}

namespace {

void check_latent(const at::Tensor& x, const std::string& what) {
  check_defined(x, what);
  TETRI_CHECK_ARG(x.dim() >= 2, what, " must be [B, L, ...] with the tokens along dim 1, but is ",
                  describe(x));
}

std::vector<at::Device> resolve_devices(const std::vector<std::string>& names, const std::string& what) {
  std::vector<at::Device> out;
  out.reserve(names.size());
  for (const auto& name : names) out.push_back(torch_device(parse_device(name)));
  TETRI_CHECK_ARG(!out.empty(), what, " is empty: give at least one device");
  return out;
}

// Checks a list of shards of one latent of `length` tokens and returns the tokens per shard.
int64_t check_shards(const std::vector<at::Tensor>& shards, int64_t length) {
  TETRI_CHECK_ARG(!shards.empty(), "shards is empty: give at least one shard");
  TETRI_CHECK_ARG(length >= 1, "length must be >= 1 token, got ", length);
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string what = str_cat("shards[", i, "]");
    check_latent(shards[i], what);
    if (i > 0) check_same_layout(shards[i], shards[0], what, "shards[0]");
  }
  const int64_t k = static_cast<int64_t>(shards.size());
  const int64_t expected = shard_length(length, k);
  TETRI_CHECK_ARG(shards[0].size(1) == expected, "shards hold ", shards[0].size(1),
                  " tokens each, but a latent of length ", length, " in ", k,
                  " shards needs ceil(length / k) = ", expected,
                  " (wrong length, or shards missing from the list?)");
  return expected;
}

// Tokens [lo, hi) of the latent that shard `index` of `k` (each `len` long) holds, hi <= length.
std::pair<int64_t, int64_t> token_range(int64_t index, int64_t len, int64_t length) {
  const int64_t lo = std::min(index * len, length);
  return {lo, std::min(lo + len, length)};
}

// Fills `dst` (shard `index` of tokens [lo, lo + dst.size(1))) from the old shards that overlap it,
// then zeros the padding past `length`.
void fill_from_shards(at::Tensor& dst, int64_t lo, const std::vector<at::Tensor>& src_shards,
                      int64_t src_len, int64_t length) {
  const int64_t hi = std::min(lo + dst.size(1), length);
  if (src_len > 0) {
    for (int64_t i = lo / src_len; i < static_cast<int64_t>(src_shards.size()) && i * src_len < hi; ++i) {
      const int64_t a = std::max(lo, i * src_len);
      const int64_t b = std::min(hi, (i + 1) * src_len);
      if (a < b) dst.narrow(1, a - lo, b - a).copy_(src_shards[i].narrow(1, a - i * src_len, b - a));
    }
  }
  const int64_t real = std::max<int64_t>(hi - lo, 0);
  if (real < dst.size(1)) dst.narrow(1, real, dst.size(1) - real).zero_();
}

std::vector<int64_t> with_tokens(at::IntArrayRef sizes, int64_t tokens) {
  auto out = sizes.vec();
  out[1] = tokens;
  return out;
}

}  // namespace

std::vector<at::Tensor> shard(const at::Tensor& x, int64_t k,
                              const std::optional<std::vector<std::string>>& devices) {
  check_latent(x, "x");
  TETRI_CHECK_ARG(k >= 1, "the number of shards k must be >= 1, got ", k);
  const int64_t length = x.size(1);
  TETRI_CHECK_ARG(length >= 1, "x has no tokens (dim 1 is 0): ", describe(x));
  std::vector<at::Device> targets(static_cast<size_t>(k), x.device());
  if (devices.has_value()) {
    TETRI_CHECK_ARG(static_cast<int64_t>(devices->size()) == k, "devices names ", devices->size(),
                    " device(s) ", join_devices(*devices), " but k is ", k, ": give one device per shard");
    targets = resolve_devices(*devices, "devices");
  }
  const int64_t len = shard_length(length, k);
  const auto sizes = with_tokens(x.sizes(), len);
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) out.push_back(at::empty(sizes, x.options().device(targets[i])));

#ifdef TETRI_WITH_CUDA
  const bool one_gpu = x.is_cuda() && k <= kMaxKernelTensors &&
                       std::all_of(targets.begin(), targets.end(), [&](const at::Device& d) { return d == x.device(); });
  if (one_gpu) {
    const at::Tensor xc = x.contiguous();
    const c10::cuda::CUDAGuard guard(x.device());
    void* ptrs[kMaxKernelTensors];
    for (int64_t i = 0; i < k; ++i) ptrs[i] = out[i].data_ptr();
    const int64_t batch = x.size(0);
    const int64_t row_bytes = batch * length == 0 ? 0 : x.numel() / (batch * length) * x.element_size();
    const std::string err = launch_shard_pad(xc.const_data_ptr(), ptrs, static_cast<int>(k), batch, length, len,
                                             row_bytes, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    TETRI_CHECK_STATE(err.empty(), "shard: CUDA kernel failed: ", err);
    return out;
  }
#endif
  const std::vector<at::Tensor> whole{x};
  for (int64_t i = 0; i < k; ++i) fill_from_shards(out[i], token_range(i, len, length).first, whole, length, length);
  return out;
}

at::Tensor gather(const std::vector<at::Tensor>& shards, int64_t length, const std::optional<std::string>& device) {
  const int64_t len = check_shards(shards, length);
  const at::Device target = device.has_value() ? torch_device(parse_device(*device)) : shards[0].device();
  at::Tensor out = at::empty(with_tokens(shards[0].sizes(), length), shards[0].options().device(target));
  for (size_t i = 0; i < shards.size(); ++i) {
    const auto [lo, hi] = token_range(static_cast<int64_t>(i), len, length);
    if (lo < hi) out.narrow(1, lo, hi - lo).copy_(shards[i].narrow(1, 0, hi - lo));
  }
  return out;
}

std::vector<at::Tensor> regroup(const std::vector<at::Tensor>& shards, int64_t length,
                                const std::vector<std::string>& new_devices) {
  const int64_t old_len = check_shards(shards, length);
  const std::vector<at::Device> targets = resolve_devices(new_devices, "new_devices");
  const size_t k_new = targets.size();
  const int64_t new_len = shard_length(length, static_cast<int64_t>(k_new));
  const auto sizes = with_tokens(shards[0].sizes(), new_len);
  std::vector<at::Tensor> out;
  out.reserve(k_new);
  for (size_t j = 0; j < k_new; ++j) {
    // Same k: shard j keeps its token range, so it only moves if its device changes.
    if (k_new == shards.size() && shards[j].device() == targets[j]) {
      out.push_back(shards[j]);
      continue;
    }
    at::Tensor dst = at::empty(sizes, shards[0].options().device(targets[j]));
    fill_from_shards(dst, token_range(static_cast<int64_t>(j), new_len, length).first, shards, old_len, length);
    out.push_back(std::move(dst));
  }
  return out;
}

int64_t regroup_bytes_moved(const std::vector<at::Tensor>& shards, int64_t length,
                            const std::vector<std::string>& new_devices) {
  check_shards(shards, length);
  const std::vector<at::Device> targets = resolve_devices(new_devices, "new_devices");
  const int64_t k_new = static_cast<int64_t>(targets.size());
  const int64_t new_len = shard_length(length, k_new);
  const int64_t bytes_per_token = shards[0].numel() / std::max<int64_t>(shards[0].size(1), 1) * shards[0].element_size();
  int64_t bytes = 0;
  for (int64_t j = 0; j < k_new; ++j) {
    if (k_new == static_cast<int64_t>(shards.size()) && shards[j].device() == targets[j]) continue;
    const auto [lo, hi] = token_range(j, new_len, length);
    bytes += (hi - lo) * bytes_per_token;
  }
  return bytes;
}

at::Tensor pack(const std::vector<at::Tensor>& latents) {
  TETRI_CHECK_ARG(!latents.empty(), "pack needs at least one latent");
  for (size_t i = 0; i < latents.size(); ++i) {
    const std::string what = str_cat("latents[", i, "]");
    check_defined(latents[i], what);
    TETRI_CHECK_ARG(latents[i].dim() >= 1, what, " is a 0-dim tensor: pack concatenates along dim 0");
    if (i == 0) continue;
    check_same_layout(latents[i], latents[0], what, "latents[0]");
    TETRI_CHECK_ARG(latents[i].device() == latents[0].device(), what, " is on ", latents[i].device(),
                    " but latents[0] is on ", latents[0].device(), ": pack needs latents on one device");
  }
#ifdef TETRI_WITH_CUDA
  if (latents[0].is_cuda() && latents.size() <= static_cast<size_t>(kMaxKernelTensors)) {
    const c10::cuda::CUDAGuard guard(latents[0].device());
    auto sizes = latents[0].sizes().vec();
    sizes[0] *= static_cast<int64_t>(latents.size());
    at::Tensor out = at::empty(sizes, latents[0].options());
    std::vector<at::Tensor> contiguous;  // keeps temporaries alive until the launch is queued
    const void* ptrs[kMaxKernelTensors];
    for (size_t i = 0; i < latents.size(); ++i) {
      contiguous.push_back(latents[i].contiguous());
      ptrs[i] = contiguous.back().const_data_ptr();
    }
    const std::string err = launch_pack(ptrs, static_cast<int>(latents.size()), latents[0].nbytes(), out.data_ptr(),
                                        c10::cuda::getCurrentCUDAStream(latents[0].device().index()).stream());
    TETRI_CHECK_STATE(err.empty(), "pack: CUDA kernel failed: ", err);
    return out;
  }
#endif
  return at::cat(latents, 0);
}

std::vector<at::Tensor> unpack(const at::Tensor& batch, int64_t n) {
  check_defined(batch, "batch");
  TETRI_CHECK_ARG(batch.dim() >= 1, "batch is a 0-dim tensor: unpack splits along dim 0");
  TETRI_CHECK_ARG(n >= 1, "n must be >= 1, got ", n);
  TETRI_CHECK_ARG(batch.size(0) % n == 0, "batch has ", batch.size(0), " rows along dim 0, which do not split into ",
                  n, " equal parts");
  const int64_t each = batch.size(0) / n;
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out.push_back(batch.narrow(0, i * each, each));
  return out;
}

}  // namespace tetri
