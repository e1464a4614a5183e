// Host-side check of the CUDA kernels' index arithmetic and copy-unit choice (latent_kernels.cu), for
// machines without a GPU: the per-element functions are __host__ __device__, so they run here on the
// CPU against a plain loop. Built and run by tests/test_ops_kernels.py when nvcc is installed.
#include <cstdio>
#include <vector>

#include "latent_kernels.cu"

using namespace tetri;

int main() {
  int fails = 0;
  for (int64_t batch : {1, 2, 3}) {
    for (int64_t length : {1, 5, 10, 17, 64}) {
      for (int k : {1, 2, 3, 4, 16}) {
        for (int64_t row : {1, 3, 8}) {
          const int64_t len = (length + k - 1) / k;
          std::vector<uint16_t> x(batch * length * row);
          for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<uint16_t>(i + 1);

          // shard_pad: every shard, padding included, against the definition.
          std::vector<std::vector<uint16_t>> outs(k, std::vector<uint16_t>(batch * len * row, 7777));
          PtrArray ptrs{};
          for (int i = 0; i < k; ++i) ptrs.ptr[i] = outs[i].data();
          for (int64_t e = 0; e < k * batch * len * row; ++e) {
            shard_pad_element<uint16_t>(e, x.data(), ptrs, batch, length, len, row);
          }
          for (int i = 0; i < k; ++i) {
            for (int64_t b = 0; b < batch; ++b) {
              for (int64_t t = 0; t < len; ++t) {
                for (int64_t u = 0; u < row; ++u) {
                  const int64_t token = i * len + t;
                  const uint16_t want = token < length ? x[(b * length + token) * row + u] : 0;
                  fails += outs[i][(b * len + t) * row + u] != want;
                }
              }
            }
          }

          // pack: k copies of x back to back.
          std::vector<uint16_t> packed(k * x.size());
          ConstPtrArray ins{};
          for (int i = 0; i < k; ++i) ins.ptr[i] = x.data();
          for (int64_t e = 0; e < static_cast<int64_t>(packed.size()); ++e) {
            pack_element<uint16_t>(e, ins, packed.data(), static_cast<int64_t>(x.size()));
          }
          for (size_t e = 0; e < packed.size(); ++e) fails += packed[e] != x[e % x.size()];
        }
      }
    }
  }
  const uint64_t aligned[] = {0x1000, 64, 0x2010};
  const uint64_t six_byte_rows[] = {0x1000, 6};
  const uint64_t odd_address[] = {0x1001, 64};
  fails += unit_bytes(aligned, 3) != 16;
  fails += unit_bytes(six_byte_rows, 2) != 2;
  fails += unit_bytes(odd_address, 2) != 1;
  std::printf("%s (%d mismatches)\n", fails ? "FAIL" : "ok", fails);
  return fails != 0;
}
