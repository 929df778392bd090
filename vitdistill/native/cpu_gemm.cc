// Float32 matrix products for XLA:CPU through MKL's cblas_sgemm, as an XLA FFI custom call.
//
// Built and loaded by vitdistill/cpu_gemm.py (which says why). MKL is opened with dlopen at
// vd_gemm_init, so this library links against nothing but libc and libdl. MKL runs sequentially; a
// product is split into as many row (or column) blocks as XLA's intra-op pool has threads, and the
// blocks are claimed by the calling thread and by tasks on that pool, so a pool busy with other work
// leaves them to the caller rather than making it wait.
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

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
  int64_t m, n, k, lda, ldb;
  bool ta, tb, split_rows;
  int64_t block, blocks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run(int64_t i) const {
    int64_t length = split_rows ? m : n;
    int64_t lo = i * block, hi = std::min(length, lo + block);
    int ta_flag = ta ? kTrans : kNoTrans, tb_flag = tb ? kTrans : kNoTrans;
    if (split_rows) {  // rows lo..hi of op(a) and of c
      const float* a_rows = ta ? a + lo : a + lo * lda;
      sgemm(kRowMajor, ta_flag, tb_flag, hi - lo, n, k, 1.0f, a_rows, lda, b, ldb, 0.0f, c + lo * n, n);
    } else {  // columns lo..hi of op(b) and of c
      const float* b_cols = tb ? b + lo * ldb : b + lo;
      sgemm(kRowMajor, ta_flag, tb_flag, m, hi - lo, k, 1.0f, a, lda, b_cols, ldb, 0.0f, c + lo, n);
    }
  }

  void Claim() {
    for (int64_t i; (i = next.fetch_add(1)) < blocks;) {
      Run(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// c = op(a) op(b): op(a) is [m, k] (a is [k, m] when ta), op(b) is [k, n] (b is [n, k] when tb).
ffi::Error Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                ffi::ResultBuffer<ffi::F32> c, bool ta, bool tb) {
  if (sgemm == nullptr) return ffi::Error::Internal("vitdistill cpu_gemm: MKL was not loaded (vd_gemm_init)");
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) return ffi::Error::InvalidArgument("vitdistill cpu_gemm: 2-D operands only");
  int64_t m = ta ? ad[1] : ad[0], k = ta ? ad[0] : ad[1];
  int64_t k_b = tb ? bd[1] : bd[0], n = tb ? bd[0] : bd[1];
  if (k != k_b) return ffi::Error::InvalidArgument("vitdistill cpu_gemm: contracting sizes differ");
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(c->typed_data(), 0, sizeof(float) * m * n);
    return ffi::Error::Success();
  }
  auto product = std::make_shared<Product>();
  Product& p = *product;
  p.a = a.typed_data();
  p.b = b.typed_data();
  p.c = c->typed_data();
  p.m = m, p.n = n, p.k = k, p.lda = ad[1], p.ldb = bd[1], p.ta = ta, p.tb = tb;
  p.split_rows = m >= n;
  int64_t length = p.split_rows ? m : n;
  int64_t threads = m * n * k < kSplitBelow ? 1 : std::max<int64_t>(1, pool.num_threads());
  p.blocks = std::min(threads, length);
  p.block = (length + p.blocks - 1) / p.blocks;
  p.blocks = (length + p.block - 1) / p.block;
  for (int64_t t = 1; t < p.blocks; ++t) pool.Schedule([product] { product->Claim(); });
  p.Claim();
  while (p.done.load(std::memory_order_acquire) < p.blocks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
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
