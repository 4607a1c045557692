// Prints the launch resources of the attention kernels
// (csrc/segment_attention/segment_attention_config.h), one per line: "<kernel name> <head dim>
// <block_m> <block_n> <threads> <dynamic shared memory bytes>". Compiled with g++ by
// rmt_kernels/tools/aot_cuda.py (csrc/ as the include dir), which adds the dynamic shared memory to
// what cuobjdump reports.
#include <cstdio>

#include "segment_attention/segment_attention_config.h"

int main() {
  rmt::KernelResources table[rmt::kAttnKernelCount];
  const int n = rmt::attention_kernel_table(table);
  for (int i = 0; i < n; ++i) {
    const rmt::KernelResources& k = table[i];
    std::printf("%s %d %d %d %d %d\n", k.name, k.head_dim, k.block_m, k.block_n, k.threads, k.smem_bytes);
  }
  return 0;
}
