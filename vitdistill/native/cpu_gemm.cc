// Float32 matrix products (plain or batched) for XLA:CPU through MKL's cblas_sgemm, as an XLA FFI custom call.
//
// Built and loaded by vitdistill/cpu_gemm.py (which says why). MKL is opened with dlopen at
// vd_gemm_init, so this library links against nothing but libc and libdl. MKL runs sequentially; the
// work is split into as many blocks as XLA's intra-op pool has threads (whole products of a batch, else
// rows or columns of each), run by pool.h's ParallelFor.
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Sgemm = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha, const float* a,
                       int lda, const float* b, int ldb, float beta, float* c, int ldc);
using SetThreadingLayer = int (*)(int);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kSequential = 1;
constexpr int64_t kSplitBelow = 1 << 18;  // m*n*k under which one call on the caller's thread is quicker

Sgemm sgemm = nullptr;

struct Product {
  const float* a;
  const float* b;
  float* c;
  int64_t batch, m, n, k, lda, ldb;
  bool ta, tb;
  int mode;  // kItems: blocks of whole products; kRows / kColumns: blocks of each product's rows / columns
  int64_t block, blocks;

  static constexpr int kItems = 0, kRows = 1, kColumns = 2;

  void One(int64_t item, int64_t lo, int64_t hi) const {
    const float* a_item = a + item * m * k;
    const float* b_item = b + item * k * n;
    float* c_item = c + item * m * n;
    int ta_flag = ta ? kTrans : kNoTrans, tb_flag = tb ? kTrans : kNoTrans;
    if (mode == kColumns) {  // columns lo..hi of op(b) and of c
      const float* b_cols = tb ? b_item + lo * ldb : b_item + lo;
      sgemm(kRowMajor, ta_flag, tb_flag, m, hi - lo, k, 1.0f, a_item, lda, b_cols, ldb, 0.0f, c_item + lo, n);
    } else {  // rows lo..hi of op(a) and of c
      const float* a_rows = ta ? a_item + lo : a_item + lo * lda;
      sgemm(kRowMajor, ta_flag, tb_flag, hi - lo, n, k, 1.0f, a_rows, lda, b_item, ldb, 0.0f, c_item + lo * n, n);
    }
  }

  void Run(int64_t i) const {
    if (mode == kItems) {
      for (int64_t item = i * block; item < std::min(batch, (i + 1) * block); ++item) One(item, 0, m);
      return;
    }
    int64_t length = mode == kRows ? m : n;
    int64_t lo = i * block, hi = std::min(length, lo + block);
    for (int64_t item = 0; item < batch; ++item) One(item, lo, hi);
  }
};

// c[i] = op(a[i]) op(b[i]) for each i of the leading dimensions (none for a plain product): op(a) is [m, k]
// (a is [k, m] when ta), op(b) is [k, n] (b is [n, k] when tb).
ffi::Error Gemm(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> c, bool ta,
                bool tb) {
  if (sgemm == nullptr) return ffi::Error::Internal("vitdistill cpu_gemm: MKL was not loaded (vd_gemm_init)");
  if (a.element_type() != ffi::F32 || b.element_type() != ffi::F32 || c->element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("vitdistill cpu_gemm: float32 operands only");
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  size_t rank = ad.size();
  if (rank < 2 || bd.size() != rank) return ffi::Error::InvalidArgument("vitdistill cpu_gemm: operand ranks");
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (ad[i] != bd[i]) return ffi::Error::InvalidArgument("vitdistill cpu_gemm: batch dimensions differ");
    batch *= ad[i];
  }
  int64_t a0 = ad[rank - 2], a1 = ad[rank - 1], b0 = bd[rank - 2], b1 = bd[rank - 1];
  int64_t m = ta ? a1 : a0, k = ta ? a0 : a1;
  int64_t k_b = tb ? b1 : b0, n = tb ? b0 : b1;
  if (k != k_b) return ffi::Error::InvalidArgument("vitdistill cpu_gemm: contracting sizes differ");
  float* out = static_cast<float*>(c->untyped_data());
  if (batch == 0 || m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(out, 0, sizeof(float) * batch * m * n);
    return ffi::Error::Success();
  }
  Product p;
  p.a = static_cast<const float*>(a.untyped_data());
  p.b = static_cast<const float*>(b.untyped_data());
  p.c = out;
  p.batch = batch, p.m = m, p.n = n, p.k = k, p.lda = a1, p.ldb = b1, p.ta = ta, p.tb = tb;
  int64_t threads = batch * m * n * k < kSplitBelow ? 1 : std::max<int64_t>(1, pool.num_threads());
  int64_t length;
  if (batch >= threads) {
    p.mode = Product::kItems, length = batch;
  } else {
    p.mode = m >= n ? Product::kRows : Product::kColumns, length = m >= n ? m : n;
  }
  p.blocks = std::min(threads, length);
  p.block = (length + p.blocks - 1) / p.blocks;
  p.blocks = (length + p.block - 1) / p.block;
  vitdistill::ParallelFor(pool, p.blocks, [&p](int64_t i) { p.Run(i); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("ta")
                                  .Attr<bool>("tb"));

// Opens MKL at `path` and makes it sequential; 0 on success, else 1 (the library or cblas_sgemm not found).
extern "C" int vd_gemm_init(const char* path) {
  void* mkl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (mkl == nullptr) return 1;
  auto set_layer = reinterpret_cast<SetThreadingLayer>(dlsym(mkl, "MKL_Set_Threading_Layer"));
  auto found = reinterpret_cast<Sgemm>(dlsym(mkl, "cblas_sgemm"));
  if (found == nullptr) return 1;
  if (set_layer != nullptr) set_layer(kSequential);
  sgemm = found;
  return 0;
}
