// An experiment, not part of mtcot_jax: one-token grouped-query attention over a
// KV cache as an XLA FFI custom call on the CPU, reading each kv head's keys and
// values once for all G query heads of its group (XLA's path reads them G times,
// as one mat-vec per query head). Built and timed by benchmarks/attention_ffi.py.
//
// q (B, K, G, Dh), keys (B, K, S, Dh), values (B, K, Dh, S), mask (B, S) -> (B, K, G, Dh):
// softmax(where(mask, q . keys, -1e30)) . values per query head. The B*K groups are
// split over NTHREADS threads: the caller's and tasks on XLA's intra-op pool.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static void one_group(const float* q, const float* keys, const float* vals, const bool* mask,
                      float* out, int64_t G, int64_t S, int64_t Dh, float* sc) {
  // sc: G x S scores
  for (int64_t s = 0; s < S; ++s) {
    const float* kr = keys + s * Dh;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * Dh;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t d = 0; d < Dh; d += 8)
        for (int j = 0; j < 8; ++j) acc[j] += qg[d + j] * kr[d + j];
      float t = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
      sc[g * S + s] = mask[s] ? t : -1e30f;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* r = sc + g * S;
    float m = -INFINITY;
    for (int64_t s = 0; s < S; ++s) m = std::max(m, r[s]);
    float sum = 0.f;
    for (int64_t s = 0; s < S; ++s) { r[s] = std::exp(r[s] - m); sum += r[s]; }
    float inv = 1.f / sum;
    for (int64_t s = 0; s < S; ++s) r[s] *= inv;
  }
  for (int64_t d = 0; d < Dh; ++d) {
    const float* vr = vals + d * S;
    for (int64_t g = 0; g < G; ++g) {
      const float* p = sc + g * S;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t s = 0;
      for (; s + 8 <= S; s += 8)
        for (int j = 0; j < 8; ++j) acc[j] += p[s + j] * vr[s + j];
      float t = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
      for (; s < S; ++s) t += p[s] * vr[s];
      out[g * Dh + d] = t;
    }
  }
}

static ffi::Error GqaImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> keys,
                          ffi::Buffer<ffi::F32> vals, ffi::Buffer<ffi::PRED> mask,
                          ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions();      // B K G Dh
  auto kd = keys.dimensions();   // B K S Dh
  int64_t B = qd[0], K = qd[1], G = qd[2], Dh = qd[3], S = kd[2];
  if (Dh % 8) return ffi::Error::InvalidArgument("head_dim must be a multiple of 8");
  const float* qp = q.typed_data(); const float* kp = keys.typed_data();
  const float* vp = vals.typed_data(); const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  int64_t n = B * K;
  auto work = [=](int64_t lo, int64_t hi) {
    std::vector<float> sc(G * S);
    for (int64_t i = lo; i < hi; ++i) {
      int64_t b = i / K;
      one_group(qp + i * G * Dh, kp + i * S * Dh, vp + i * Dh * S, mp + b * S, op + i * G * Dh,
                G, S, Dh, sc.data());
    }
  };
  int64_t nt = std::min<int64_t>(NTHREADS, n);
  if (nt <= 1) { work(0, n); return ffi::Error::Success(); }
  std::atomic<int64_t> left(nt - 1);
  for (int64_t t = 1; t < nt; ++t) {
    int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
    pool.Schedule([=, &left]() { work(lo, hi); left.fetch_sub(1, std::memory_order_release); });
  }
  work(0, n / nt);
  while (left.load(std::memory_order_acquire) > 0) std::this_thread::yield();
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(GqaDecode, GqaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
