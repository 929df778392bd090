// Softmax and LayerNorm over the last dimension, forward and backward, for XLA:CPU as XLA FFI custom calls.
//
// Built into one library with cpu_gemm.cc by vitdistill/cpu_gemm.py (which says why). Rows are split into
// as many blocks as XLA's intra-op pool has threads. The row loops are compiled for AVX-512, AVX2 and
// baseline x86-64 (GCC's target_clones picks one when the library loads), with an exp of our own that the
// compiler vectorises: Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial), within 2
// ulp of the exact value on the inputs softmax gives it (x - max <= 0).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using vitdistill::Blocks;
using vitdistill::ParallelFor;

constexpr int64_t kSerialBelow = 1 << 16;  // elements under which one thread is quicker

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VD_CLONES
#endif

// exp(x) for x <= 0 (larger x are clamped to 88.7; NaN stays NaN), Cephes' single-precision expf.
static inline __attribute__((always_inline)) float Exp(float x) {
  x = x > 88.72283f ? 88.72283f : x;
  x = x < -87.33654f ? -87.33654f : x;
  // n = x / ln 2 rounded to the nearest integer: adding and taking away 1.5 * 2^23 rounds (|x / ln 2| < 2^22),
  // and unlike std::floor the compiler vectorises it without -ffast-math.
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// y = softmax(x) over rows of n.
VD_CLONES void SoftmaxRows(const float* x, float* y, int64_t rows, int64_t n) {
  for (int64_t row = 0; row < rows; ++row, x += n, y += n) {
    float top = x[0];
#pragma omp simd reduction(max : top)
    for (int64_t j = 1; j < n; ++j) top = x[j] > top ? x[j] : top;
    float total = 0.0f;  // a NaN among x makes its row NaN through exp, whatever the maximum
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; ++j) {
      float e = Exp(x[j] - top);
      y[j] = e;
      total += e;
    }
    for (int64_t j = 0; j < n; ++j) y[j] /= total;
  }
}

// dx = y (dy - <dy, y>) over rows of n: the vector-Jacobian product of softmax at output y.
VD_CLONES void SoftmaxGradRows(const float* y, const float* dy, float* dx, int64_t rows, int64_t n) {
  for (int64_t row = 0; row < rows; ++row, y += n, dy += n, dx += n) {
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < n; ++j) dot += dy[j] * y[j];
    for (int64_t j = 0; j < n; ++j) dx[j] = y[j] * (dy[j] - dot);
  }
}

// LayerNorm of rows of d: y = (x - mean) rstd scale + bias, rstd = 1 / sqrt(var + eps), var the mean
// squared deviation (two passes, as PyTorch computes it); also writes each row's mean and rstd.
VD_CLONES void LayerNormRows(const float* x, const float* scale, const float* bias, float* y, float* mean,
                             float* rstd, int64_t rows, int64_t d, float eps) {
  float inv_d = 1.0f / static_cast<float>(d);
  for (int64_t row = 0; row < rows; ++row, x += d, y += d) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < d; ++j) sum += x[j];
    float mu = sum * inv_d;
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t j = 0; j < d; ++j) squares += (x[j] - mu) * (x[j] - mu);
    float r = 1.0f / std::sqrt(squares * inv_d + eps);
    for (int64_t j = 0; j < d; ++j) y[j] = (x[j] - mu) * r * scale[j] + bias[j];
    mean[row] = mu;
    rstd[row] = r;
  }
}

// LayerNorm's vector-Jacobian product for rows of d: dx, and this block's sums over its rows of
// dy * xhat (into dscale) and dy (into dbias), which the caller adds over the blocks.
VD_CLONES void LayerNormGradRows(const float* x, const float* scale, const float* mean, const float* rstd,
                                 const float* dy, float* dx, float* dscale, float* dbias, int64_t rows, int64_t d) {
  float inv_d = 1.0f / static_cast<float>(d);
  for (int64_t row = 0; row < rows; ++row, x += d, dy += d, dx += d) {
    float mu = mean[row], r = rstd[row];
    float g_sum = 0.0f, gx_sum = 0.0f;
#pragma omp simd reduction(+ : g_sum, gx_sum)
    for (int64_t j = 0; j < d; ++j) {
      float xhat = (x[j] - mu) * r;
      float g = dy[j] * scale[j];
      g_sum += g;
      gx_sum += g * xhat;
      dscale[j] += dy[j] * xhat;
      dbias[j] += dy[j];
    }
    float g_mean = g_sum * inv_d, gx_mean = gx_sum * inv_d;
    for (int64_t j = 0; j < d; ++j) {
      float xhat = (x[j] - mu) * r;
      dx[j] = r * (dy[j] * scale[j] - g_mean - xhat * gx_mean);
    }
  }
}

// The rows and the last dimension of an array.
void RowsOf(ffi::AnyBuffer::Dimensions dims, int64_t* rows, int64_t* n) {
  *rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) *rows *= dims[i];
  *n = dims.size() == 0 ? 1 : dims[dims.size() - 1];
}

// How many blocks `rows` rows of n elements are split into (one below kSerialBelow elements in all; none for
// no rows).
int64_t RowBlocks(ffi::ThreadPool& pool, int64_t rows, int64_t n) { return Blocks(pool, rows, n, kSerialBelow); }

// run(block, lo, hi) for each of `blocks` equal ranges [lo, hi) of the rows that is not empty, over the pool.
template <typename Run>
void ForRowBlocks(ffi::ThreadPool& pool, int64_t rows, int64_t blocks, const Run& run) {
  if (blocks <= 0) return;
  int64_t per = (rows + blocks - 1) / blocks;
  ParallelFor(pool, blocks, [&](int64_t i) {
    int64_t lo = i * per, hi = std::min(rows, lo + per);
    if (lo < hi) run(i, lo, hi);
  });
}

ffi::Error Softmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  int64_t rows, n;
  RowsOf(x.dimensions(), &rows, &n);
  if (n == 0) return ffi::Error::Success();
  const float* in = x.typed_data();
  float* out = y->typed_data();
  ForRowBlocks(pool, rows, RowBlocks(pool, rows, n), [&](int64_t, int64_t lo, int64_t hi) {
    SoftmaxRows(in + lo * n, out + lo * n, hi - lo, n);
  });
  return ffi::Error::Success();
}

ffi::Error SoftmaxGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> dy,
                       ffi::ResultBuffer<ffi::F32> dx) {
  int64_t rows, n;
  RowsOf(y.dimensions(), &rows, &n);
  if (n == 0) return ffi::Error::Success();
  ForRowBlocks(pool, rows, RowBlocks(pool, rows, n), [&](int64_t, int64_t lo, int64_t hi) {
    SoftmaxGradRows(y.typed_data() + lo * n, dy.typed_data() + lo * n, dx->typed_data() + lo * n, hi - lo, n);
  });
  return ffi::Error::Success();
}

ffi::Error LayerNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                     ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                     ffi::ResultBuffer<ffi::F32> rstd, float eps) {
  int64_t rows, d;
  RowsOf(x.dimensions(), &rows, &d);
  if (scale.element_count() != static_cast<size_t>(d) || bias.element_count() != static_cast<size_t>(d))
    return ffi::Error::InvalidArgument("vitdistill cpu_rows: LayerNorm scale and bias must match the last dimension");
  if (d == 0) return ffi::Error::Success();
  ForRowBlocks(pool, rows, RowBlocks(pool, rows, d), [&](int64_t, int64_t lo, int64_t hi) {
    LayerNormRows(x.typed_data() + lo * d, scale.typed_data(), bias.typed_data(), y->typed_data() + lo * d,
                  mean->typed_data() + lo, rstd->typed_data() + lo, hi - lo, d, eps);
  });
  return ffi::Error::Success();
}

ffi::Error LayerNormGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                         ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                         ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                         ffi::ResultBuffer<ffi::F32> dbias) {
  int64_t rows, d;
  RowsOf(x.dimensions(), &rows, &d);
  float* ds = dscale->typed_data();
  float* db = dbias->typed_data();
  std::fill(ds, ds + d, 0.0f);
  std::fill(db, db + d, 0.0f);
  if (d == 0 || rows == 0) return ffi::Error::Success();
  int64_t blocks = RowBlocks(pool, rows, d);
  std::vector<float> partial(static_cast<size_t>(blocks) * 2 * d, 0.0f);
  ForRowBlocks(pool, rows, blocks, [&](int64_t i, int64_t lo, int64_t hi) {
    float* sums = partial.data() + i * 2 * d;
    LayerNormGradRows(x.typed_data() + lo * d, scale.typed_data(), mean.typed_data() + lo, rstd.typed_data() + lo,
                      dy.typed_data() + lo * d, dx->typed_data() + lo * d, sums, sums + d, hi - lo, d);
  });
  for (int64_t i = 0; i < blocks; ++i) {  // in block order: the same sums whichever thread ran which block
    const float* sums = partial.data() + i * 2 * d;
    for (int64_t j = 0; j < d; ++j) ds[j] += sums[j], db[j] += sums[d + j];
  }
  return ffi::Error::Success();
}

// y = x, with y given x's buffer (`input_output_aliases`), so nothing moves; a copy where XLA gave y another.
// A fusion barrier: XLA:CPU cannot fuse into a custom call, so x's producer is computed once and stored.
ffi::Error Store(ffi::Buffer<ffi::F32> x, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  if (y->typed_data() != x.typed_data()) std::memcpy(y->typed_data(), x.typed_data(), x.size_bytes());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdStore, Store, ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(VdSoftmax, Softmax,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(VdSoftmaxGrad, SoftmaxGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(VdLayerNorm, LayerNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(VdLayerNormGrad, LayerNormGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
