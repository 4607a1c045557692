// Host-side probe of csrc/common/mask_layout.cuh for tests/test_cuda_build.py: compiled with g++ (no
// CUDA; csrc/ as the include dir), it reads cases from stdin, one per line,
//
//     R S W P mask prefix_all block_m block_n L
//
// and prints, per case, what the kernels would use: the class of every packed and prefix tile, the
// key-tile ranges each row block visits, and the query-tile ranges each key tile visits. The test
// compares them with rmt_kernels.layout.MemoryLayout.classify_tiles.
//
// Output per case (numbers separated by spaces):
//     packed <row blocks> <key tiles> <class of each tile, row-major>
//     prefix <row blocks> <prefix tiles> <class of each tile, row-major>
//     rows <row blocks> then per row block: lo.begin lo.end hi.begin hi.end pre.begin pre.end
//     cols <key tiles> then per packed key tile: begin end
//     prefix_cols begin end
#include <cstdio>
#include <iostream>

#include "common/mask_layout.cuh"

int main() {
  int R, S, W, P, mask, prefix_all, bm, bn, L;
  while (std::cin >> R >> S >> W >> P >> mask >> prefix_all >> bm >> bn >> L) {
    const rmt::MaskLayout lay{R, S, W, P, mask, prefix_all};
    const int n = lay.N();
    const int mb = rmt::cdiv(n, bm), kb = rmt::cdiv(n, bn), pb = rmt::cdiv(P, bn);
    std::printf("packed %d %d", mb, kb);
    for (int i = 0; i < mb; ++i) {
      for (int j = 0; j < kb; ++j) {
        std::printf(" %d", lay.classify_packed(i * bm, rmt::imin(i * bm + bm, n), j * bn, rmt::imin(j * bn + bn, n), L));
      }
    }
    std::printf("\nprefix %d %d", mb, pb);
    for (int i = 0; i < mb; ++i) {
      for (int j = 0; j < pb; ++j) std::printf(" %d", lay.classify_prefix(i * bm, rmt::imin(i * bm + bm, n)));
    }
    std::printf("\nrows %d", mb);
    for (int i = 0; i < mb; ++i) {
      rmt::TileRange lo, hi;
      lay.packed_key_tiles(i * bm, rmt::imin(i * bm + bm, n), L, bn, &lo, &hi);
      const rmt::TileRange pre = lay.prefix_key_tiles(i * bm, rmt::imin(i * bm + bm, n), bn);
      std::printf(" %d %d %d %d %d %d", lo.begin, lo.end, hi.begin, hi.end, pre.begin, pre.end);
    }
    std::printf("\ncols %d", kb);
    for (int j = 0; j < kb; ++j) {
      const rmt::TileRange r = lay.packed_query_tiles(j * bn, rmt::imin(j * bn + bn, n), L, bm);
      std::printf(" %d %d", r.begin, r.end);
    }
    const rmt::TileRange pc = lay.prefix_query_tiles(bm);
    std::printf("\nprefix_cols %d %d\n", pc.begin, pc.end);
  }
  return 0;
}
