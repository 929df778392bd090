// Float32 matrix products (plain or batched) for XLA:CPU through MKL's cblas_sgemm, as XLA FFI custom calls; and
// strided ones, whose operands and result lie anywhere in their buffers at any row and batch strides (attention's
// heads written side by side into its output, and dq, dk, dv into their thirds of the gradient of qkv).
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

// Where one operand of a strided product lies in its buffer: element (i0, i1, r, c) of the [batch0, batch1,
// rows, columns] array it stands for is at offset + i0 * stride0 + i1 * stride1 + r * ld + c.
struct Layout {
  int64_t offset, ld, stride0, stride1;
};

// The strided products' work: c[i0, i1] = alpha op(a[i0, i1]) op(b[i0, i1]) over batch0 x batch1 items, each
// operand read or written in place through its Layout (MKL's lda / ldb / ldc). The work is split into as many
// blocks as XLA's pool has threads: whole products where there are as many, else rows or columns of each.
struct Strided {
  const float* a;
  const float* b;
  float* c;
  int64_t batch1, items, m, n, k;
  Layout la, lb, lc;
  bool ta, tb;
  float alpha;
  int mode;  // kItems: blocks of whole products; kRows / kColumns: blocks of each product's rows / columns
  int64_t block, blocks;

  static constexpr int kItems = 0, kRows = 1, kColumns = 2;

  void One(int64_t item, int64_t lo, int64_t hi) const {
    int64_t i0 = item / batch1, i1 = item % batch1;
    const float* a_item = a + la.offset + i0 * la.stride0 + i1 * la.stride1;
    const float* b_item = b + lb.offset + i0 * lb.stride0 + i1 * lb.stride1;
    float* c_item = c + lc.offset + i0 * lc.stride0 + i1 * lc.stride1;
    int ta_flag = ta ? kTrans : kNoTrans, tb_flag = tb ? kTrans : kNoTrans;
    if (mode == kColumns) {  // columns lo..hi of op(b) and of c
      const float* b_cols = tb ? b_item + lo * lb.ld : b_item + lo;
      sgemm(kRowMajor, ta_flag, tb_flag, m, hi - lo, k, alpha, a_item, la.ld, b_cols, lb.ld, 0.0f, c_item + lo, lc.ld);
    } else {  // rows lo..hi of op(a) and of c
      const float* a_rows = ta ? a_item + lo : a_item + lo * la.ld;
      sgemm(kRowMajor, ta_flag, tb_flag, hi - lo, n, k, alpha, a_rows, la.ld, b_item, lb.ld, 0.0f, c_item + lo * lc.ld,
            lc.ld);
    }
  }

  void Run(int64_t i) const {
    if (mode == kItems) {
      for (int64_t item = i * block; item < std::min(items, (i + 1) * block); ++item) One(item, 0, m);
      return;
    }
    int64_t length = mode == kRows ? m : n;
    int64_t lo = i * block, hi = std::min(length, lo + block);
    for (int64_t item = 0; item < items; ++item) One(item, lo, hi);
  }
};

// Whether every element of a [batch0, batch1, rows, columns] operand laid out as `l` lies in a buffer of `size`
// elements, with rows of at least `columns` elements (MKL's ld >= the row's length).
bool Fits(const Layout& l, int64_t batch0, int64_t batch1, int64_t rows, int64_t columns, int64_t size) {
  if (l.offset < 0 || l.stride0 < 0 || l.stride1 < 0 || l.ld < std::max<int64_t>(1, columns)) return false;
  int64_t last = l.offset + (batch0 - 1) * l.stride0 + (batch1 - 1) * l.stride1 + (rows - 1) * l.ld + columns;
  return last <= static_cast<int64_t>(size);
}

ffi::Error StridedImpl(ffi::ThreadPool pool, const ffi::AnyBuffer& a, const ffi::AnyBuffer& b, ffi::AnyBuffer& c,
                       int64_t batch0, int64_t batch1, int64_t m, int64_t n, int64_t k, bool ta, bool tb, float alpha,
                       Layout la, Layout lb, Layout lc) {
  if (sgemm == nullptr) return ffi::Error::Internal("vitdistill cpu_gemm: MKL was not loaded (vd_gemm_init)");
  if (a.element_type() != ffi::F32 || b.element_type() != ffi::F32 || c.element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("vitdistill strided gemm: float32 operands only");
  if (batch0 <= 0 || batch1 <= 0 || m <= 0 || n <= 0 || k <= 0)
    return ffi::Error::InvalidArgument("vitdistill strided gemm: sizes must be positive");
  if (!Fits(la, batch0, batch1, ta ? k : m, ta ? m : k, a.element_count()) ||
      !Fits(lb, batch0, batch1, tb ? n : k, tb ? k : n, b.element_count()) ||
      !Fits(lc, batch0, batch1, m, n, c.element_count()))
    return ffi::Error::InvalidArgument("vitdistill strided gemm: a layout reaches outside its buffer");
  Strided p;
  p.a = static_cast<const float*>(a.untyped_data());
  p.b = static_cast<const float*>(b.untyped_data());
  p.c = static_cast<float*>(c.untyped_data());
  p.batch1 = batch1, p.items = batch0 * batch1, p.m = m, p.n = n, p.k = k;
  p.la = la, p.lb = lb, p.lc = lc, p.ta = ta, p.tb = tb, p.alpha = alpha;
  int64_t threads = p.items * m * n * k < kSplitBelow ? 1 : std::max<int64_t>(1, pool.num_threads());
  int64_t length;
  if (p.items >= threads) {
    p.mode = Strided::kItems, length = p.items;
  } else {
    p.mode = m >= n ? Strided::kRows : Strided::kColumns, length = m >= n ? m : n;
  }
  p.blocks = std::min(threads, length);
  p.block = (length + p.blocks - 1) / p.blocks;
  p.blocks = (length + p.block - 1) / p.block;
  vitdistill::ParallelFor(pool, p.blocks, [&p](int64_t i) { p.Run(i); });
  return ffi::Error::Success();
}

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
  return StridedImpl(pool, a, b, *c, batch, 1, m, n, k, ta, tb, 1.0f, {0, a1, a0 * a1, 0}, {0, b1, b0 * b1, 0},
                     {0, n, m * n, 0});
}

// The layouts of a, b and c from `layouts`' 12 elements (offset, ld, stride0, stride1 of each) and the sizes from
// `sizes`' 5 (batch0, batch1, m, n, k): the strided product into `c`.
ffi::Error StridedAttrs(ffi::ThreadPool pool, const ffi::AnyBuffer& a, const ffi::AnyBuffer& b, ffi::AnyBuffer& c,
                        ffi::Span<const int64_t> sizes, ffi::Span<const int64_t> layouts, bool ta, bool tb, float alpha) {
  if (sizes.size() != 5 || layouts.size() != 12)
    return ffi::Error::InvalidArgument("vitdistill strided gemm: 5 sizes and 12 layout numbers");
  const int64_t* l = layouts.begin();
  return StridedImpl(pool, a, b, c, sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], ta, tb, alpha,
                     {l[0], l[1], l[2], l[3]}, {l[4], l[5], l[6], l[7]}, {l[8], l[9], l[10], l[11]});
}

// The strided product into a fresh buffer (only the elements c's layout reaches are written).
ffi::Error StridedGemm(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> c,
                       ffi::Span<const int64_t> sizes, ffi::Span<const int64_t> layouts, bool ta, bool tb, float alpha) {
  return StridedAttrs(pool, a, b, *c, sizes, layouts, ta, tb, alpha);
}

// The same into the buffer of a third argument that XLA aliases to the result: its other elements are kept.
ffi::Error StridedGemmInto(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer into,
                           ffi::Result<ffi::AnyBuffer> c, ffi::Span<const int64_t> sizes,
                           ffi::Span<const int64_t> layouts, bool ta, bool tb, float alpha) {
  if (into.untyped_data() != c->untyped_data())
    return ffi::Error::Internal("vitdistill strided gemm: the result is not the aliased buffer");
  return StridedAttrs(pool, a, b, *c, sizes, layouts, ta, tb, alpha);
}

}  // namespace

// The strided products' attributes, after their buffers.
#define VD_STRIDED_ATTRS \
  .Attr<ffi::Span<const int64_t>>("sizes").Attr<ffi::Span<const int64_t>>("layouts").Attr<bool>("ta").Attr<bool>("tb") \
      .Attr<float>("alpha")

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdStridedGemm, StridedGemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() VD_STRIDED_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdStridedGemmInto, StridedGemmInto,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() VD_STRIDED_ATTRS);

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
