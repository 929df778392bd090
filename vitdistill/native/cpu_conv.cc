// Grouped k x k convolutions (NHWC input, HWIO kernel, zero padding) for XLA:CPU as an XLA FFI custom call:
// the forward pass of RegNetY's grouped 3x3 convolutions, the DeiT teacher's hot spot.
//
// Built into one library with cpu_gemm.cc by vitdistill/cpu_gemm.py (which says why and when it is used).
// Work items are (group, kTile output pixels of the batch), group-major; each item copies its pixels' receptive fields
// (k * k * group_in inputs each, zeros outside the image) into contiguous rows, then for each 16 output
// channels of the group runs one register-blocked AVX-512 kernel: kTile accumulators, one weight vector and
// kTile broadcast-FMAs per input (tap, channel). Items are split into as many blocks as XLA's intra-op pool
// has threads. Needs AVX-512F, or AVX2 with FMA (vd_native_isa; on those CPUs the same layouts are computed
// by a 6 x 16 register tile, two 8-lane vectors a row), k * k * group_in <= kRow and 16 | group_out. The products
// of two matrices further down (VdMatmul) need AVX-512F.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 28;    // output pixels per kernel call: 28 accumulators + 1 weight vector of 32 registers
constexpr int64_t kRow = 1152;  // the deepest receptive field taken: k * k * group_in at most (3 x 3 x 128)
constexpr int kLanes = 16;

// The kernels this CPU runs: AVX-512F's where it has it, else AVX2 with FMA's (8-lane vectors, 16 registers), else
// none (vd_native_isa is 0). VITDISTILL_NATIVE_ISA=avx2 picks the AVX2 kernels on an AVX-512 CPU too (tests).
enum class Isa { kNone = 0, kAvx2 = 2, kAvx512 = 512 };

Isa CurrentIsa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const char* asked = std::getenv("VITDISTILL_NATIVE_ISA");
    if (asked != nullptr && std::strcmp(asked, "avx2") == 0) return avx2 ? Isa::kAvx2 : Isa::kNone;
    return __builtin_cpu_supports("avx512f") ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kNone;
  }();
  return isa;
}

bool Wide() { return CurrentIsa() == Isa::kAvx512; }

struct Conv {
  const float* x;
  const float* w;
  float* y;
  int64_t height, width, channels, out_height, out_width, out_channels, kernel, stride, pad, group_in, group_out,
      groups;
};

// n rounded up to a multiple of 16 (whole vectors).
constexpr int64_t RoundUp16(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// n floats, 64-byte aligned (the size rounded up to whole vectors, as aligned_alloc asks), freed with the object.
struct Floats {
  explicit Floats(int64_t n) : data(static_cast<float*>(std::aligned_alloc(64, sizeof(float) * RoundUp16(n)))) {}
  ~Floats() { std::free(data); }
  Floats(const Floats&) = delete;
  Floats& operator=(const Floats&) = delete;
  float* data;
};

// The first n (at most 16) lanes of a vector.
inline __mmask16 LaneMask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }

// y[p, lanes] (+)= sum_k a(p, k) * w[k * 16 + lanes] for p < P, over depth (a multiple of 16) inputs, for the
// lanes of 16 set in `mask`, added to y's values where `accumulate`: a(p, k) is a[(k / 16) * kTile * 16 +
// p * 16 + k % 16], so each 16 inputs of the tile's pixels lie in one block. y's rows are prefetched (for writing)
// at the start and y's values added at the end: loading them first, from L3 after an earlier block of the depth,
// stalled each call (products 2-5 % slower at 788 x 384 x 1536, 784 x 1232 x 1232, 3136 x 448 x 448).
template <int P>
__attribute__((target("avx512f"))) void Tile(const float* a, const float* w, int64_t depth, float* y, int64_t ldy,
                                             bool accumulate, __mmask16 mask) {
  __m512 acc[P];
#pragma GCC unroll 32
  for (int p = 0; p < P; ++p) __builtin_prefetch(y + p * ldy, 1, 3), acc[p] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < depth; k0 += kLanes, a += kTile * kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      __m512 wv = _mm512_loadu_ps(w + (k0 + k) * kLanes);
#pragma GCC unroll 32
      for (int p = 0; p < P; ++p) acc[p] = _mm512_fmadd_ps(_mm512_set1_ps(a[p * kLanes + k]), wv, acc[p]);
    }
  }
#pragma GCC unroll 32
  for (int p = 0; p < P; ++p)
    _mm512_mask_storeu_ps(y + p * ldy, mask,
                          accumulate ? _mm512_add_ps(acc[p], _mm512_maskz_loadu_ps(mask, y + p * ldy)) : acc[p]);
}

// Tile's product on AVX2 for P <= 6 pixels, all 16 lanes (the grouped convolution's; VdMatmul needs AVX-512F): 12
// accumulators (each pixel's 16 lanes as two 8-lane vectors), the weights' two vectors and one broadcast of the 16
// registers. Same layouts, same order of additions. Every loop over the accumulators is unrolled, or GCC keeps
// them in memory (a store each FMA: a third of the speed).
template <int P>
__attribute__((target("avx2,fma"))) void Tile8(const float* a, const float* w, int64_t depth, float* y, int64_t ldy,
                                               bool accumulate) {
  __m256 lo[P], hi[P];
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) __builtin_prefetch(y + p * ldy, 1, 3), lo[p] = hi[p] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < depth; k0 += kLanes, a += kTile * kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const __m256 w0 = _mm256_loadu_ps(w + (k0 + k) * kLanes), w1 = _mm256_loadu_ps(w + (k0 + k) * kLanes + 8);
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) {
        const __m256 s = _mm256_broadcast_ss(a + p * kLanes + k);
        lo[p] = _mm256_fmadd_ps(s, w0, lo[p]), hi[p] = _mm256_fmadd_ps(s, w1, hi[p]);
      }
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) {
    float* out = y + p * ldy;
    _mm256_storeu_ps(out, accumulate ? _mm256_add_ps(lo[p], _mm256_loadu_ps(out)) : lo[p]);
    _mm256_storeu_ps(out + 8, accumulate ? _mm256_add_ps(hi[p], _mm256_loadu_ps(out + 8)) : hi[p]);
  }
}

// The same for any count of pixels: full tiles, then the rest in halves; on AVX2 (all 16 lanes: the mask is
// AVX-512's) in tiles of 6, 4, 2, 1.
void Tiles(int64_t count, const float* a, const float* w, int64_t depth, float* y, int64_t ldy,
           bool accumulate = false, __mmask16 mask = 0xFFFF) {
  if (!Wide()) {
    while (count > 0) {
      const int64_t done = count >= 6 ? 6 : count >= 4 ? 4 : count >= 2 ? 2 : 1;
      if (done == 6) {
        Tile8<6>(a, w, depth, y, ldy, accumulate);
      } else if (done == 4) {
        Tile8<4>(a, w, depth, y, ldy, accumulate);
      } else if (done == 2) {
        Tile8<2>(a, w, depth, y, ldy, accumulate);
      } else {
        Tile8<1>(a, w, depth, y, ldy, accumulate);
      }
      count -= done, a += done * kLanes, y += done * ldy;
    }
    return;
  }
  while (count > 0) {
    int64_t done;
    if (count >= 28) {
      Tile<28>(a, w, depth, y, ldy, accumulate, mask), done = 28;
    } else if (count >= 16) {
      Tile<16>(a, w, depth, y, ldy, accumulate, mask), done = 16;
    } else if (count >= 8) {
      Tile<8>(a, w, depth, y, ldy, accumulate, mask), done = 8;
    } else if (count >= 4) {
      Tile<4>(a, w, depth, y, ldy, accumulate, mask), done = 4;
    } else if (count >= 2) {
      Tile<2>(a, w, depth, y, ldy, accumulate, mask), done = 2;
    } else {
      Tile<1>(a, w, depth, y, ldy, accumulate, mask), done = 1;
    }
    count -= done, a += done * kLanes, y += done * ldy;
  }
}

int64_t PaddedDepth(const Conv& c) { return RoundUp16(c.kernel * c.kernel * c.group_in); }

// Copies group g's kernel into packed: for each 16 output channels, its rows of 16 (zeros past the depth).
void PackWeights(const Conv& c, int64_t g, float* packed) {
  const int64_t depth = c.kernel * c.kernel * c.group_in, padded = PaddedDepth(c);
  for (int64_t v = 0; v < c.group_out; v += kLanes) {
    float* dst = packed + v * padded;
    for (int64_t k = 0; k < depth; ++k)
      std::memcpy(dst + k * kLanes, c.w + k * c.out_channels + g * c.group_out + v, sizeof(float) * kLanes);
    std::memset(dst + depth * kLanes, 0, sizeof(float) * kLanes * (padded - depth));
  }
}

// PutRow's copy in runs that end at whole blocks of 16 (any CPU).
inline void PutRowAny(float* rows, int64_t p, int64_t k0, const float* src, int64_t n) {
  for (int64_t k = k0; k < k0 + n;) {
    int64_t run = std::min(n - (k - k0), kLanes - k % kLanes);
    float* dst = rows + (k / kLanes) * kTile * kLanes + p * kLanes + k % kLanes;
    if (src == nullptr) {
      std::memset(dst, 0, sizeof(float) * run);
    } else {
      std::memcpy(dst, src + (k - k0), sizeof(float) * run);
    }
    k += run;
  }
}

// Copies n elements of one pixel's row from src to its inputs k0.. in Tile's layout (rows at pixel p).
__attribute__((target("avx512f"))) inline void PutRow(float* rows, int64_t p, int64_t k0, const float* src,
                                                      int64_t n) {
  if (k0 % kLanes == 0 && n % kLanes == 0) {  // whole blocks of 16: one vector each
    float* dst = rows + (k0 / kLanes) * kTile * kLanes + p * kLanes;
    for (int64_t k = 0; k < n; k += kLanes, dst += kTile * kLanes)
      _mm512_storeu_ps(dst, src == nullptr ? _mm512_setzero_ps() : _mm512_loadu_ps(src + k));
    return;
  }
  PutRowAny(rows, p, k0, src, n);
}

// The input rows (group g's channels) under each tap of output pixel `pixel` (of the batch's pixels in (image, row,
// column) order) in (kh, kw) order, nullptr outside the image.
inline void TapSources(const Conv& c, int64_t g, int64_t pixel, const float** sources) {
  const int64_t pixels = c.out_height * c.out_width;
  const int64_t n = pixel / pixels, r = pixel % pixels, oh = r / c.out_width, ow = r % c.out_width;
  for (int64_t kh = 0; kh < c.kernel; ++kh) {
    const int64_t ih = oh * c.stride - c.pad + kh;
    for (int64_t kw = 0; kw < c.kernel; ++kw) {
      const int64_t iw = ow * c.stride - c.pad + kw;
      const bool inside = ih >= 0 && ih < c.height && iw >= 0 && iw < c.width;
      sources[kh * c.kernel + kw] =
          inside ? c.x + ((n * c.height + ih) * c.width + iw) * c.channels + g * c.group_in : nullptr;
    }
  }
}

// The receptive fields of output pixels [first, first + count) in group g, in Tile's layout (zeros past the depth):
// whole blocks by AVX-512 vectors.
__attribute__((target("avx512f"))) void FillRowsWide(const Conv& c, float* rows, int64_t g, int64_t first,
                                                     int64_t count) {
  const int64_t depth = c.kernel * c.kernel * c.group_in, padded = PaddedDepth(c);
  const float* sources[kRow];
  for (int64_t p = 0; p < count; ++p) {
    TapSources(c, g, first + p, sources);
    for (int64_t t = 0; t < c.kernel * c.kernel; ++t) PutRow(rows, p, t * c.group_in, sources[t], c.group_in);
    if (padded > depth) PutRow(rows, p, depth, nullptr, padded - depth);
  }
}

// The same on any CPU.
void FillRowsAny(const Conv& c, float* rows, int64_t g, int64_t first, int64_t count) {
  const int64_t depth = c.kernel * c.kernel * c.group_in, padded = PaddedDepth(c);
  const float* sources[kRow];
  for (int64_t p = 0; p < count; ++p) {
    TapSources(c, g, first + p, sources);
    for (int64_t t = 0; t < c.kernel * c.kernel; ++t) PutRowAny(rows, p, t * c.group_in, sources[t], c.group_in);
    if (padded > depth) PutRowAny(rows, p, depth, nullptr, padded - depth);
  }
}

// One item: group g, output pixels [first, first + count).
void Item(const Conv& c, const float* packed, float* rows, int64_t g, int64_t first, int64_t count) {
  if (Wide()) {
    FillRowsWide(c, rows, g, first, count);
  } else {
    FillRowsAny(c, rows, g, first, count);
  }
  const int64_t padded = PaddedDepth(c);
  float* out = c.y + first * c.out_channels + g * c.group_out;
  for (int64_t v = 0; v < c.group_out; v += kLanes)
    Tiles(count, rows, packed + v * padded, padded, out + v, c.out_channels);
}

ffi::Error GroupedConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t stride, int64_t pad) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4 || wd[0] != wd[1])
    return ffi::Error::InvalidArgument("vitdistill grouped_conv: NHWC input, square HWIO kernel, NHWC output");
  Conv c;
  c.x = x.typed_data(), c.w = w.typed_data(), c.y = y->typed_data();
  c.height = xd[1], c.width = xd[2], c.channels = xd[3];
  c.kernel = wd[0], c.group_in = wd[2], c.out_channels = wd[3];
  c.out_height = yd[1], c.out_width = yd[2], c.stride = stride, c.pad = pad;
  if (c.group_in <= 0 || c.channels % c.group_in != 0)
    return ffi::Error::InvalidArgument("vitdistill grouped_conv: input channels not a multiple of the kernel's");
  c.groups = c.channels / c.group_in;
  if (c.out_channels % c.groups != 0 || yd[0] != xd[0] || yd[3] != c.out_channels ||
      c.out_height != (c.height + 2 * pad - c.kernel) / stride + 1 ||
      c.out_width != (c.width + 2 * pad - c.kernel) / stride + 1)
    return ffi::Error::InvalidArgument("vitdistill grouped_conv: output shape");
  c.group_out = c.out_channels / c.groups;
  if (c.group_out % kLanes != 0 || c.kernel * c.kernel * c.group_in > kRow)
    return ffi::Error::InvalidArgument("vitdistill grouped_conv: needs 16 | group_out and k*k*group_in <= 1152");
  int64_t pixels = c.out_height * c.out_width, images = xd[0];
  if (images == 0 || pixels == 0 || c.out_channels == 0) return ffi::Error::Success();
  const int64_t depth = c.kernel * c.kernel * c.group_in, total = images * pixels;
  const int64_t tiles = (total + kTile - 1) / kTile;
  int64_t items = c.groups * tiles;  // group-major, so that a block packs each group's kernel once
  int64_t blocks = vitdistill::Blocks(pool, items, kTile * c.group_out * depth, 1 << 16);
  int64_t per_block = (items + blocks - 1) / blocks;
  vitdistill::ParallelFor(pool, blocks, [&](int64_t b) {
    Floats rows(kTile * PaddedDepth(c)), packed(c.group_out * PaddedDepth(c));
    int64_t packed_group = -1;
    for (int64_t i = b * per_block; i < std::min(items, (b + 1) * per_block); ++i) {
      int64_t tile = i % tiles, g = i / tiles, first = tile * kTile;
      if (g != packed_group) PackWeights(c, g, packed.data), packed_group = g;
      Item(c, packed.data, rows.data, g, first, std::min<int64_t>(kTile, total - first));
    }
  });
  return ffi::Error::Success();
}

// c [m, n] = op(a) [m, k] @ op(b) [k, n], row-major (a stored [k, m] where ta, b [n, k] where tb; such
// operands are packed through 16 x 16 register transposes), in BLIS's order: each thread takes a range of rows (or of
// columns, where the rows are few) and, for each block of up to kGemmDepth inputs, packs kRowBlock tiles of its
// rows at a time (Tile's layout), then for each kGemmCols of its columns packs that block of b (16 columns at a
// time, zeros past n) and adds the tiles' products into c. Rows, columns and depth split evenly, in multiples of 16.
// Packing b once for many rows matters: a block of b read afresh from a large weight matrix for each 112 rows
// cost 15-25 % of the time (784 x 1232 x 1232: 166 -> 204 GFLOP/s on 2 cores).
constexpr int64_t kGemmDepth = 256, kGemmCols = 128, kRowBlock = 16;

struct Matmul {
  const float* a;
  const float* b;
  float* c;
  int64_t m, n, k;
  int64_t lda, ldb;  // the stored rows' lengths: a is [k, m] where ta, b [n, k] where tb
  bool ta, tb;
  int64_t cols, depth;  // columns a block of b takes, inputs a block of the depth
};

// The smallest multiple of 16 that splits total into as few parts of at most `most` as possible.
int64_t EvenSplit(int64_t total, int64_t most) {
  int64_t parts = (total + most - 1) / most;
  return RoundUp16((total + parts - 1) / parts);
}

// r[i][j] -> r[j][i]: a 16 x 16 transpose in registers (pairs, then quads, then 128-bit lanes twice).
__attribute__((target("avx512f"))) inline void Transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
}

// b's inputs k0 .. k0 + depth (padded with zeros to `padded`), columns n0 .. n0 + width: for each 16 columns,
// its rows of 16.
__attribute__((target("avx512f"))) void PackColumns(const Matmul& mm, int64_t k0, int64_t depth, int64_t padded,
                                                    int64_t n0, int64_t width, float* packed) {
  for (int64_t v = 0; v < width; v += kLanes) {
    int64_t lanes = std::min<int64_t>(kLanes, width - v);
    float* dst = packed + v * padded;
    if (mm.tb) {  // b stored [n, k]: 16 stored rows (the columns) by 16 inputs at a time, transposed
      for (int64_t kk = 0; kk < padded; kk += kLanes) {
        const int64_t run = std::max<int64_t>(0, std::min<int64_t>(kLanes, depth - kk));
        const __mmask16 in = LaneMask(run);
        __m512 r[16];
        for (int64_t j = 0; j < kLanes; ++j)
          r[j] = j < lanes ? _mm512_maskz_loadu_ps(in, mm.b + (n0 + v + j) * mm.ldb + k0 + kk) : _mm512_setzero_ps();
        Transpose16(r);
        for (int64_t k = 0; k < kLanes; ++k) _mm512_storeu_ps(dst + (kk + k) * kLanes, r[k]);
      }
      continue;
    }
    for (int64_t k = 0; k < depth; ++k)
      _mm512_storeu_ps(dst + k * kLanes, _mm512_maskz_loadu_ps(LaneMask(lanes), mm.b + (k0 + k) * mm.ldb + n0 + v));
    std::memset(dst + depth * kLanes, 0, sizeof(float) * kLanes * (padded - depth));
  }
}

// Rows block .. block_end of op(a), inputs k0 .. k0 + depth (zeros to `padded`), as tiles in Tile's layout.
__attribute__((target("avx512f"))) void PackRows(const Matmul& mm, int64_t k0, int64_t depth, int64_t padded, int64_t block, int64_t block_end,
              float* rows) {
  if (mm.ta) {  // a stored [k, m]: 16 inputs (stored rows) by 16 rows of op(a) at a time, transposed
    for (int64_t r = block; r < block_end; r += kLanes) {
      const int64_t count = std::min<int64_t>(kLanes, block_end - r);
      const __mmask16 in = LaneMask(count);
      for (int64_t kk = 0; kk < padded; kk += kLanes) {
        __m512 t[16];
        for (int64_t i = 0; i < kLanes; ++i)
          t[i] = kk + i < depth ? _mm512_maskz_loadu_ps(in, mm.a + (k0 + kk + i) * mm.lda + r) : _mm512_setzero_ps();
        Transpose16(t);
        for (int64_t p = 0; p < count; ++p) {
          const int64_t row = r - block + p;
          _mm512_storeu_ps(rows + (row / kTile) * kTile * padded + (kk / kLanes) * kTile * kLanes + (row % kTile) * kLanes,
                           t[p]);
        }
      }
    }
    return;
  }
  for (int64_t r = block; r < block_end; ++r) {  // a row's inputs 16 at a time, the last 16 masked (zeros past depth)
    float* dst = rows + ((r - block) / kTile) * kTile * padded + ((r - block) % kTile) * kLanes;
    const float* src = mm.a + r * mm.lda + k0;
    for (int64_t kk = 0; kk < padded; kk += kLanes, dst += kTile * kLanes)
      _mm512_storeu_ps(dst, _mm512_maskz_loadu_ps(LaneMask(std::min<int64_t>(kLanes, depth - kk)), src + kk));
  }
}

// One thread's buffers for MatmulPart: its packed rows and its packed block of b.
struct PartBuffers {
  Floats rows{kRowBlock * kTile * kGemmDepth}, packed{kGemmCols * kGemmDepth};
};

// c's rows r0 .. r1 and columns c0 .. c1 on this thread.
void MatmulPart(const Matmul& mm, PartBuffers& buffers, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  float* rows = buffers.rows.data;
  float* packed = buffers.packed.data;
  for (int64_t k0 = 0; k0 < mm.k; k0 += mm.depth) {
    const int64_t depth = std::min(mm.depth, mm.k - k0), padded = RoundUp16(depth);
    for (int64_t block = r0; block < r1; block += kRowBlock * kTile) {
      const int64_t block_end = std::min(r1, block + kRowBlock * kTile);
      PackRows(mm, k0, depth, padded, block, block_end, rows);
      for (int64_t n0 = c0; n0 < c1; n0 += mm.cols) {
        const int64_t width = std::min(mm.cols, c1 - n0);
        PackColumns(mm, k0, depth, padded, n0, width, packed);
        for (int64_t r = block; r < block_end; r += kTile) {
          const float* tile = rows + ((r - block) / kTile) * kTile * padded;
          for (int64_t v = 0; v < width; v += kLanes)
            Tiles(std::min<int64_t>(kTile, block_end - r), tile, packed + v * padded, padded,
                  mm.c + r * mm.n + n0 + v, mm.n, k0 > 0, LaneMask(std::min<int64_t>(kLanes, width - v)));
        }
      }
    }
  }
}

// One product split across `threads` threads: by rows where they are many, else by columns.
void SplitProduct(ffi::ThreadPool& pool, const Matmul& mm, int64_t threads) {
  const int64_t tiles = (mm.m + kTile - 1) / kTile, vectors = (mm.n + kLanes - 1) / kLanes;
  const bool by_rows = tiles >= 4 * threads || tiles >= vectors;  // else each thread takes some columns
  const int64_t parts = std::min(threads, by_rows ? tiles : vectors);
  const int64_t per_part = (vectors + parts - 1) / parts;  // vectors a part takes where split by columns
  vitdistill::ParallelFor(pool, parts, [&](int64_t part) {
    PartBuffers buffers;
    if (by_rows) {  // equal shares of rows in multiples of 16 (whole tiles each had left one thread idle 1/15 of
                    // the time at 788 rows: 29 tiles in 15 + 14); a share's last rows take Tiles' smaller tiles
      const int64_t share = RoundUp16((mm.m + parts - 1) / parts);
      MatmulPart(mm, buffers, std::min(mm.m, part * share), std::min(mm.m, (part + 1) * share), 0, mm.n);
    } else {
      MatmulPart(mm, buffers, 0, mm.m, std::min(mm.n, part * per_part * kLanes),
                 std::min(mm.n, (part + 1) * per_part * kLanes));
    }
  });
}

// c[i] = op(a[i]) op(b[i]) for each i of the leading dimensions (none for a plain product). A batch of at
// least as many products as threads (attention's, a product per image and head) is split into whole products;
// a smaller one runs its products one after another, each split.
ffi::Error NativeMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                        ffi::Result<ffi::Buffer<ffi::F32>> c, bool ta, bool tb) {
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  const size_t rank = ad.size();
  bool shapes = rank >= 2 && bd.size() == rank;
  int64_t batch = 1;
  for (size_t i = 0; shapes && i + 2 < rank; ++i) shapes = ad[i] == bd[i], batch *= ad[i];
  if (!shapes || (ta ? ad[rank - 2] : ad[rank - 1]) != (tb ? bd[rank - 1] : bd[rank - 2]))
    return ffi::Error::InvalidArgument("vitdistill matmul: op(a) [..., m, k] @ op(b) [..., k, n], equal leading dims");
  if (!Wide())  // on AVX2 MKL's products and XLA's own were faster than the 6 x 16 tile (vitdistill/cpu_gemm.py)
    return ffi::Error::InvalidArgument("vitdistill matmul: needs AVX-512F");
  Matmul mm;
  mm.a = a.typed_data(), mm.b = b.typed_data(), mm.c = c->typed_data();
  mm.m = ta ? ad[rank - 1] : ad[rank - 2], mm.k = ta ? ad[rank - 2] : ad[rank - 1], mm.n = tb ? bd[rank - 2] : bd[rank - 1];
  mm.lda = ad[rank - 1], mm.ldb = bd[rank - 1], mm.ta = ta, mm.tb = tb;
  if (batch == 0 || mm.m == 0 || mm.n == 0) return ffi::Error::Success();
  if (mm.k == 0) {
    std::memset(mm.c, 0, sizeof(float) * batch * mm.m * mm.n);
    return ffi::Error::Success();
  }
  mm.cols = EvenSplit(mm.n, kGemmCols), mm.depth = EvenSplit(mm.k, kGemmDepth);
  const int64_t threads = 2 * batch * mm.m * mm.n * mm.k < (1 << 18) ? 1 : std::max<int64_t>(1, pool.num_threads());
  auto item = [&mm](int64_t i) {
    Matmul one = mm;
    one.a += i * mm.m * mm.k, one.b += i * mm.k * mm.n, one.c += i * mm.m * mm.n;
    return one;
  };
  if (batch < threads) {
    for (int64_t i = 0; i < batch; ++i) SplitProduct(pool, item(i), threads);
    return ffi::Error::Success();
  }
  const int64_t per_part = (batch + threads - 1) / threads;
  vitdistill::ParallelFor(pool, (batch + per_part - 1) / per_part, [&](int64_t part) {
    PartBuffers buffers;
    for (int64_t i = part * per_part; i < std::min(batch, (part + 1) * per_part); ++i)
      MatmulPart(item(i), buffers, 0, mm.m, 0, mm.n);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdGroupedConv, GroupedConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdMatmul, NativeMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("ta")
                                  .Attr<bool>("tb"));

// The kernels that run: 512 (AVX-512F), 2 (AVX2 with FMA) or 0 (none: no grouped convolution). VdMatmul needs
// AVX-512F.
extern "C" int vd_native_isa() { return static_cast<int>(CurrentIsa()); }
