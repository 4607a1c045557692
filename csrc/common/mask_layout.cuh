// The causal-plus-memory mask of rmt_kernels/layout.py (MemoryLayout), in C++ for the CUDA kernels.
//
// A packed segment has N = R + S + W rows; keys are [prefix (P) | packed (N)], the prefix read from its
// own tensors. With L = segment_lengths[b], packed key j is visible to row i iff
//
//     j < key_end(i)  and  (j < R + L  or  j >= R + S)
//
// and every prefix key is visible to row i iff prefix_visible(i). key_end(i) is non-decreasing in i
// for every mask family, which is what makes the tile questions below O(1): the widest row of a row
// block is its last, the narrowest its first, and the padding hole [R + L, R + S) is one interval.
//
// Tiles: query rows are tiled from packed row 0; prefix and packed keys are tiled separately from
// their own position 0. A tile is judged on its in-range elements only (tails are the kernels' own
// bounds masking), exactly like MemoryLayout.classify_tiles; tests/test_cuda_build.py compiles this
// header as host code and compares every tile of the SPEC section 4 cases with the Python.
//
// Compiles as host C++ (g++) and as CUDA (host and device). No CUDA headers needed.
#pragma once

#if defined(__CUDACC__)
#define RMT_HD __host__ __device__ __forceinline__
#else
#define RMT_HD inline
#endif

namespace rmt {

// Mask families, in the order of rmt_kernels.layout.MASK_FAMILIES.
enum MaskFamily : int { MASK_CAUSAL = 0, MASK_MEMORY_BIDIRECTIONAL = 1, MASK_FULL = 2 };

// Tile classes, with the values of rmt_kernels.layout.TILE_EMPTY / TILE_PARTIAL / TILE_FULL.
enum TileClass : int { TILE_EMPTY = 0, TILE_PARTIAL = 1, TILE_FULL = 2 };

// A half-open range of tile indices [begin, end); empty when end <= begin.
struct TileRange {
  int begin;
  int end;
  RMT_HD int size() const { return end > begin ? end - begin : 0; }
};

RMT_HD int cdiv(int a, int b) { return (a + b - 1) / b; }
RMT_HD int imin(int a, int b) { return a < b ? a : b; }
RMT_HD int imax(int a, int b) { return a > b ? a : b; }

struct MaskLayout {
  int R;           // read-memory rows
  int S;           // segment rows
  int W;           // write-memory rows
  int P;           // prefix keys
  int mask;        // MaskFamily
  int prefix_all;  // 1: every row sees the prefix; 0: only the segment rows

  RMT_HD int N() const { return R + S + W; }

  // Row i sees packed keys j < key_end(i), before padding.
  RMT_HD int key_end(int i) const {
    if (mask == MASK_CAUSAL) return i + 1;
    if (mask == MASK_FULL) return N();
    if (i < R) return R;
    if (i < R + S) return i + 1;
    return N();
  }

  RMT_HD bool prefix_visible(int i) const { return prefix_all != 0 || (i >= R && i < R + S); }

  // Packed key j survives right padding with L valid segment tokens.
  RMT_HD bool key_valid(int j, int L) const { return j < R + L || j >= R + S; }

  // The per-element rule, for in-range i and j.
  RMT_HD bool visible(int i, int j, int L) const { return j < key_end(i) && key_valid(j, L); }

  // Smallest row i with key_end(i) > j (N if none): rows [first_row_seeing(j), N) reach key j.
  RMT_HD int first_row_seeing(int j) const {
    if (j >= N()) return N();
    if (mask == MASK_CAUSAL) return j;
    if (mask == MASK_FULL) return 0;
    if (j < R) return 0;
    if (j < R + S) return j;
    return R + S;
  }

  // Smallest valid packed key in [n0, n1) (n1 if none).
  RMT_HD int first_valid_key(int n0, int n1, int L) const {
    if (n0 >= n1) return n1;
    if (key_valid(n0, L)) return n0;
    return imin(R + S, n1);  // n0 lies in the hole [R + L, R + S)
  }

  // Whether some key in [n0, n1) is valid.
  RMT_HD bool any_valid(int n0, int n1, int L) const { return first_valid_key(n0, n1, L) < n1; }

  // Class of the packed tile rows [m0, m1) x keys [n0, n1), extents already clipped to N.
  RMT_HD int classify_packed(int m0, int m1, int n0, int n1, int L) const {
    if (m1 <= m0 || n1 <= n0) return TILE_EMPTY;
    // Rows are monotone in key_end: the last row sees the most, the first the least.
    if (!any_valid(n0, imin(n1, key_end(m1 - 1)), L)) return TILE_EMPTY;
    const bool no_hole = n1 <= R + L || n0 >= R + S || L == S;
    if (no_hole && key_end(m0) >= n1) return TILE_FULL;
    return TILE_PARTIAL;
  }

  // Class of the prefix tile rows [m0, m1) x any non-empty prefix key range.
  RMT_HD int classify_prefix(int m0, int m1) const {
    if (m1 <= m0) return TILE_EMPTY;
    if (prefix_all) return TILE_FULL;
    const int lo = imax(m0, R), hi = imin(m1, R + S);
    if (hi <= lo) return TILE_EMPTY;
    return (lo == m0 && hi == m1) ? TILE_FULL : TILE_PARTIAL;
  }

  // Key tiles (of block_n) that the row block [m0, m1) must visit, in two ranges: exactly the
  // non-empty packed tiles. `lo` ends where the padding hole starts covering whole tiles, `hi`
  // resumes after it.
  RMT_HD void packed_key_tiles(int m0, int m1, int L, int block_n, TileRange* lo, TileRange* hi) const {
    lo->begin = lo->end = hi->begin = hi->end = 0;
    if (m1 <= m0) return;
    const int reach = imin(key_end(m1 - 1), N());  // keys [0, reach) before padding
    const int last = cdiv(reach, block_n);
    const int hole_lo = R + L, hole_hi = R + S;
    if (hole_lo >= hole_hi || hole_lo >= reach) {
      lo->end = last;
      return;
    }
    // Tiles entirely inside [hole_lo, min(hole_hi, reach)) are empty; the rest are not.
    const int skip_begin = cdiv(hole_lo, block_n);                  // first tile starting in the hole
    const int skip_end_key = imin(hole_hi, reach);                 // the hole as seen by these rows
    const int skip_end = skip_end_key >= reach ? last : skip_end_key / block_n;  // tile holding it
    lo->end = skip_begin;
    hi->begin = imax(skip_end, skip_begin);
    hi->end = last;
    if (hi->begin >= hi->end) hi->begin = hi->end = 0;
  }

  // Prefix key tiles of the row block [m0, m1): all of them if a row of the block sees the prefix.
  RMT_HD TileRange prefix_key_tiles(int m0, int m1, int block_n) const {
    TileRange r{0, 0};
    if (classify_prefix(m0, m1) != TILE_EMPTY) r.end = cdiv(P, block_n);
    return r;
  }

  // Query tiles (of block_m) that reach the packed key tile [n0, n1): exactly the non-empty tiles of
  // that key column.
  RMT_HD TileRange packed_query_tiles(int n0, int n1, int L, int block_m) const {
    TileRange r{0, 0};
    const int j = first_valid_key(n0, imin(n1, N()), L);
    if (j >= imin(n1, N())) return r;
    const int first = first_row_seeing(j);
    if (first >= N()) return r;
    r.begin = first / block_m;
    r.end = cdiv(N(), block_m);
    return r;
  }

  // Query tiles that see the prefix.
  RMT_HD TileRange prefix_query_tiles(int block_m) const {
    TileRange r{0, 0};
    if (P == 0) return r;
    if (prefix_all) {
      r.end = cdiv(N(), block_m);
    } else if (S > 0) {
      r.begin = R / block_m;
      r.end = cdiv(R + S, block_m);
    }
    return r;
  }
};

}  // namespace rmt
