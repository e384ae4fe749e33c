// One cached pass of the main transformer on the CPU, as a single XLA FFI call
// (decode.cpu_kernel=native; built and registered by mtcot_jax/native/__init__.py).
//
// The same arithmetic as `Transformer.__call__` with a cache (model/transformer.py,
// model/layers.py) for T new tokens per sequence, float32 activations, weights in
// the (out, in) layout of `api.to_out_in` (float32 or bfloat16), the unembedding
// (D, V) as stored or the embedding's rows when tied. Why it exists: on XLA:CPU a
// one-token pass is well over a hundred thunks (162 dots alone), each with
// microseconds of dispatch and, for the mat-vecs, a task on XLA's intra-op pool;
// here the pass is 5 phases a layer run by a persistent pool of spinning threads,
// and attention reads each kv head's keys and values once for its G query heads.
//
// Per layer: (A) q/k/v rows, bias, RoPE, the new keys and values written into the
// cache; (B) attention per (sequence, kv head); (C) x += o-projection; (D) gate, up,
// silu(gate) * up; (E) x += down. A phase is split over the threads by output rows
// (A: by head) and ends at a barrier; the RMSNorm a phase reads is computed by every
// thread for itself (D floats a row: cheaper than one more barrier).
//
// Args (in order): tokens (B, T) s32; lengths (B,) s32; cos, sin (B, T, Dh/2) f32
// (RoPE at each new token's position, computed by the caller with the model's own
// frequencies and scaling); embed (V, D) W; final_norm (D,) f32; [unembed (D, V) W
// unless tied]; per layer: attn_norm (D,) f32, q (H Dh, D) W, k (K Dh, D) W, v
// (K Dh, D) W, [q_bias (H, Dh), k_bias (K, Dh), v_bias (K, Dh) W if has_bias], o
// (D, H Dh) W, mlp_norm (D,) f32, gate (F, D) W, up (F, D) W, down (D, F) W; then
// the caches: keys_l (B, K, S, Dh) f32 for every layer, then values_l (B, K, Dh, S).
// W: all float32 or all bfloat16. Results: logits (B, T, V) f32; x (B, T, D) f32
// (the last layer's output); one (B, T, D) f32 per attribute `sources` entry (that
// layer's output); the keys and values again (aliased to the inputs: updated in place).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <sched.h>
#ifdef __AVX__
#include <immintrin.h>
#endif
#include <unistd.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------- thread pool
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// nthreads - 1 workers; the caller is thread 0. A job is published by bumping
// `gen`; workers spin on it for `spin_us` after their last job, then sleep on a
// condition variable (a pass's phases follow each other within microseconds; the
// gap between passes is the decode loop's own work).
class Pool {
 public:
  explicit Pool(int nthreads, int spin_us) : n_(nthreads), spin_us_(spin_us) {
    for (int t = 1; t < n_; ++t) workers_.emplace_back([this, t] { Work(t); });
  }
  int size() const { return n_; }

  // fn(tid, nthreads) on every thread; returns when all are done.
  void Run(const std::function<void(int, int)>& fn) {
    if (n_ == 1) return fn(0, 1);
    job_ = &fn;
    pending_.store(n_ - 1, std::memory_order_relaxed);
    gen_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
    fn(0, n_);
    while (pending_.load(std::memory_order_acquire) != 0) cpu_relax();
  }

 private:
  void Work(int tid) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t g = gen_.load(std::memory_order_acquire);
      if (g == seen) {
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0;; ++i) {
          g = gen_.load(std::memory_order_acquire);
          if (g != seen) break;
          cpu_relax();
          if ((i & 255) == 255 &&
              std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(spin_us_)) {
            std::unique_lock<std::mutex> lk(mu_);
            sleepers_.fetch_add(1, std::memory_order_seq_cst);
            cv_.wait(lk, [&] { return gen_.load(std::memory_order_seq_cst) != seen; });
            sleepers_.fetch_sub(1, std::memory_order_relaxed);
            g = gen_.load(std::memory_order_acquire);
            break;
          }
        }
      }
      seen = g;
      (*job_)(tid, n_);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  const int n_;
  const int spin_us_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};
  const std::function<void(int, int)>* job_ = nullptr;
  std::mutex mu_;
  std::condition_variable cv_;
};

int EnvInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

Pool* MakePool() {
  // MTCOT_NATIVE_THREADS: threads a pass runs on (default: the CPUs this process
  // may run on, at most 32); MTCOT_NATIVE_SPIN_US: how long an idle worker spins.
  int n = EnvInt("MTCOT_NATIVE_THREADS", 0);
  if (n <= 0) {
#ifdef __linux__
    cpu_set_t set;
    n = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 0;
#endif
    if (n <= 0) n = static_cast<int>(std::thread::hardware_concurrency());
    n = std::clamp(n, 1, 32);
  }
  // 50 us: a pass's phases follow each other within microseconds; between passes
  // the decode loop's own XLA ops (0.1-1 ms) get both cores back.
  return new Pool(n, EnvInt("MTCOT_NATIVE_SPIN_US", 50));
}

// The process's pool, never destroyed (its threads end with the process); a
// forked child, which has none of the parent's threads, starts its own.
Pool& GetPool() {
  static std::mutex mu;
  static Pool* pool = nullptr;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> lk(mu);
  if (pool == nullptr || owner != getpid()) {
    pool = MakePool();
    owner = getpid();
  }
  return *pool;
}

inline void Split(int64_t n, int tid, int nt, int64_t* lo, int64_t* hi) {
  *lo = n * tid / nt;
  *hi = n * (tid + 1) / nt;
}

// ---------------------------------------------------------------- arithmetic
// How far ahead attention prefetches the keys and values it streams, in bytes
// (into L2). Measured per pass of the 25M config at 2,048 tokens of context, on a
// 2-core EPYC: no prefetch 1.3-1.7 ms of attention; 4-16 KB ahead 1.0-1.1 ms.
constexpr int64_t kKeysAhead = 8192, kValuesAhead = 8192;
typedef float f8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

inline f8 Load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline f8 Load8(const uint16_t* p) {   // bfloat16: the high half of a float32
  u16x8 h;
  std::memcpy(&h, p, sizeof(h));
  u32x8 w = __builtin_convertvector(h, u32x8) << 16;
  f8 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
inline float ToF(float x) { return x; }
inline float ToF(uint16_t x) {
  uint32_t w = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}
inline float Sum8(f8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// sum_i w[i] x[i], four vector accumulators (float32 x, w float32 or bfloat16).
// With `pf`, pf[i]'s lines are prefetched alongside w[i]'s (into L2: the caller
// points it at what it reads next; the arithmetic is the same).
template <typename W>
inline float Dot(const W* w, const float* x, int64_t n, const float* pf = nullptr) {
  f8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    if (pf) {
      __builtin_prefetch(pf + i, 0, 2);
      __builtin_prefetch(pf + i + 16, 0, 2);
    }
    a0 += Load8(w + i) * Load8(x + i);
    a1 += Load8(w + i + 8) * Load8(x + i + 8);
    a2 += Load8(w + i + 16) * Load8(x + i + 16);
    a3 += Load8(w + i + 24) * Load8(x + i + 24);
  }
  for (; i + 8 <= n; i += 8) a0 += Load8(w + i) * Load8(x + i);
  float s = Sum8((a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s += ToF(w[i]) * x[i];
  return s;
}

typedef int32_t i32x8 __attribute__((vector_size(32)));

// Lane i of the result: the sum of v[i]'s eight lanes, in the order
// ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)) (three rounds of shuffles and
// adds for all eight; a per-vector horizontal sum would cost as many for each).
// With AVX: hadd(a, b) = (a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7),
// so two rounds of hadd leave (v_i's (0+1)+(2+3) for i < 4 | v_i's (4+5)+(6+7))
// in u0 (u1: i >= 4), and the halves' sum is the result. (Intrinsics, not
// GCC's __builtin_shuffle: clang builds it too.)
inline f8 SumEach8(const f8* v) {
#ifdef __AVX__
  const __m256 t0 = _mm256_hadd_ps((__m256)v[0], (__m256)v[1]);
  const __m256 t1 = _mm256_hadd_ps((__m256)v[2], (__m256)v[3]);
  const __m256 t2 = _mm256_hadd_ps((__m256)v[4], (__m256)v[5]);
  const __m256 t3 = _mm256_hadd_ps((__m256)v[6], (__m256)v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return (f8)_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),    // low halves
                           _mm256_permute2f128_ps(u0, u1, 0x31));   // high halves
#else
  f8 out;
  for (int i = 0; i < 8; ++i)
    out[i] = ((v[i][0] + v[i][1]) + (v[i][2] + v[i][3])) +
             ((v[i][4] + v[i][5]) + (v[i][6] + v[i][7]));
  return out;
#endif
}

// exp on 8 lanes: 2^n e^r with n = round(x log2 e), r = x - n ln 2 (in two parts),
// e^r by Cephes' degree-7 expansion (about 1 ulp in float32); x clamped to
// [-87.3, 88.7], where exp stays a normal float32.
inline f8 Exp8(f8 x) {
  const f8 lo = f8{} - 87.3f, hi = f8{} + 88.7f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const f8 t = x * 1.44269504088896341f + 0.5f;
#ifdef __AVX__
  const f8 n = (f8)_mm256_floor_ps((__m256)t);   // (the loop below: 8 scalar rounds)
#else
  f8 n;
  for (int i = 0; i < 8; ++i) n[i] = __builtin_floorf(t[i]);
#endif
  const f8 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  f8 p = f8{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const i32x8 e = (__builtin_convertvector(n, i32x8) + 127) << 23;
  f8 scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

// p[0, n) = softmax(p[0, n)) in place.
void Softmax(float* p, int64_t n) {
  int64_t i = 0;
  float m = -INFINITY;
  if (n >= 8) {
    f8 mv = Load8(p);
    for (i = 8; i + 8 <= n; i += 8) {
      const f8 v = Load8(p + i);
      mv = v > mv ? v : mv;
    }
    for (int j = 0; j < 8; ++j) m = std::max(m, mv[j]);
  }
  for (; i < n; ++i) m = std::max(m, p[i]);
  f8 sv = {};
  for (i = 0; i + 8 <= n; i += 8) {
    const f8 e = Exp8(Load8(p + i) - m);
    std::memcpy(p + i, &e, sizeof(e));
    sv += e;
  }
  float sum = Sum8(sv);
  for (; i < n; ++i) sum += (p[i] = std::exp(p[i] - m));
  const float inv = 1.f / sum;
  for (i = 0; i < n; ++i) p[i] *= inv;
}

// out[r] = w . x[r, :] for r < R (x rows of n): up to 8 rows at a time, each
// 8 weights loaded once for all of them (a pass of k+1 tokens or a batch reads
// its weights once, as one token's does). `pf` as in Dot.
template <typename W>
void DotRows(const W* w, const float* x, int64_t n, int64_t R, float* out,
             const float* pf = nullptr) {
  if (R == 1) {
    out[0] = Dot(w, x, n, pf);
    return;
  }
  for (int64_t r0 = 0; r0 < R; r0 += 8, pf = nullptr) {
    const int64_t m = std::min<int64_t>(8, R - r0);
    const float* xr = x + r0 * n;
    f8 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = f8{};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      if (pf && (i & 15) == 0) __builtin_prefetch(pf + i, 0, 2);
      const f8 wv = Load8(w + i);
      for (int64_t r = 0; r < m; ++r) acc[r] += wv * Load8(xr + r * n + i);
    }
    if (m == 8) {
      const f8 sums = SumEach8(acc);
      std::memcpy(out + r0, &sums, sizeof(sums));
    } else {
      for (int64_t r = 0; r < m; ++r) out[r0 + r] = Sum8(acc[r]);
    }
    for (; i < n; ++i)
      for (int64_t r = 0; r < m; ++r) out[r0 + r] += ToF(w[i]) * xr[r * n + i];
  }
}

// y[r, o] (row stride ys) = W[o, :] . x[r, :] for o in [o0, o1), r < R; W (O, n).
template <typename W>
void MatVecRows(const W* w, int64_t n, const float* x, int64_t R, float* y, int64_t ys,
                int64_t o0, int64_t o1, bool accumulate) {
  std::vector<float> v(R);
  for (int64_t o = o0; o < o1; ++o) {
    DotRows(w + o * n, x, n, R, v.data());
    for (int64_t r = 0; r < R; ++r) y[r * ys + o] = accumulate ? y[r * ys + o] + v[r] : v[r];
  }
}

// y[r, c] = sum_d x[r, d] W[d, c] for c in [c0, c1): W (n, C) as stored (in, out).
template <typename W>
void MatVecCols(const W* w, int64_t n, int64_t C, const float* x, int64_t R, float* y,
                int64_t c0, int64_t c1) {
  constexpr int64_t kTile = 256;
  std::vector<float> acc(static_cast<size_t>(R * kTile));
  for (int64_t t0 = c0; t0 < c1; t0 += kTile) {
    const int64_t m = std::min(kTile, c1 - t0);
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t d = 0; d < n; ++d) {
      const W* row = w + d * C + t0;
      for (int64_t r = 0; r < R; ++r) {
        const float xv = x[r * n + d];
        float* a = acc.data() + r * kTile;
        for (int64_t c = 0; c < m; ++c) a[c] += xv * ToF(row[c]);
      }
    }
    for (int64_t r = 0; r < R; ++r)
      std::memcpy(y + r * C + t0, acc.data() + r * kTile, m * sizeof(float));
  }
}

void RmsNorm(const float* x, const float* scale, int64_t R, int64_t D, float eps, float* y) {
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * D;
    float ss = 0.f;
    for (int64_t d = 0; d < D; ++d) ss += xr[d] * xr[d];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t d = 0; d < D; ++d) y[r * D + d] = xr[d] * inv * scale[d];
  }
}

// Rotate-half RoPE on one head vector of length Dh.
void Rope(float* v, const float* cos, const float* sin, int64_t Dh) {
  const int64_t h = Dh / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = v[i], b = v[i + h];
    v[i] = a * cos[i] - b * sin[i];
    v[i + h] = b * cos[i] + a * sin[i];
  }
}

struct Layer {
  const float* attn_norm;
  const void *q, *k, *v, *qb, *kb, *vb, *o;
  const float* mlp_norm;
  const void *gate, *up, *down;
  float* keys;    // (B, K, S, Dh)
  float* values;  // (B, K, Dh, S)
};

struct Dims {
  int64_t B, T, R, D, H, K, G, Dh, F, V, S;
  float eps;
};

template <typename W>
void Pass(Pool& pool, const Dims& d, const int32_t* tokens, const int32_t* lengths,
          const float* cos, const float* sin, const W* embed, const float* final_norm,
          const W* unembed, const std::vector<Layer>& layers, const std::vector<int64_t>& sources,
          float* logits, float* x_out, const std::vector<float*>& source_out) {
  const int64_t R = d.R, D = d.D, H = d.H, K = d.K, G = d.G, Dh = d.Dh, F = d.F, S = d.S;
  const int64_t half = Dh / 2;
  const float scale = 1.f / std::sqrt(static_cast<float>(Dh));
  std::vector<float> x(R * D), q(R * H * Dh), att(R * H * Dh), h(R * F);
  const int nt = pool.size();
  std::vector<std::vector<float>> xn(nt, std::vector<float>(R * D));
  std::vector<std::vector<float>> scratch(nt);

  for (int64_t r = 0; r < R; ++r) {   // the embedding rows
    const int64_t tok = std::clamp<int64_t>(tokens[r], 0, d.V - 1);
    for (int64_t i = 0; i < D; ++i) x[r * D + i] = ToF(embed[tok * D + i]);
  }
  auto slot_of = [&](int64_t r) { return static_cast<int64_t>(lengths[r / d.T]) + r % d.T; };

  for (size_t l = 0; l < layers.size(); ++l) {
    const Layer& L = layers[l];
    // (A) q, k, v by head: units [0, H) q heads, [H, H+K) k heads, [H+K, H+2K) v heads.
    pool.Run([&](int tid, int n) {
      int64_t u0, u1;
      Split(H + 2 * K, tid, n, &u0, &u1);
      if (u0 == u1) return;
      float* xt = xn[tid].data();
      RmsNorm(x.data(), L.attn_norm, R, D, d.eps, xt);
      std::vector<float> vals(Dh * R), col(R);
      for (int64_t u = u0; u < u1; ++u) {
        const bool is_q = u < H, is_k = !is_q && u < H + K;
        const int64_t head = is_q ? u : (is_k ? u - H : u - H - K);
        const W* w = static_cast<const W*>(is_q ? L.q : (is_k ? L.k : L.v)) + head * Dh * D;
        const W* bias = static_cast<const W*>(is_q ? L.qb : (is_k ? L.kb : L.vb));
        for (int64_t j = 0; j < Dh; ++j) {
          DotRows(w + j * D, xt, D, R, col.data());
          for (int64_t r = 0; r < R; ++r) vals[r * Dh + j] = col[r];
        }
        for (int64_t r = 0; r < R; ++r) {
          float* tmp = vals.data() + r * Dh;
          if (bias)
            for (int64_t j = 0; j < Dh; ++j) tmp[j] += ToF(bias[head * Dh + j]);
          if (is_q || is_k) Rope(tmp, cos + r * half, sin + r * half, Dh);
          if (is_q) {
            for (int64_t j = 0; j < Dh; ++j) q[(r * H + head) * Dh + j] = tmp[j] * scale;
            continue;
          }
          const int64_t b = r / d.T, slot = slot_of(r);
          if (slot >= S) continue;   // past the capacity: dropped, as XLA's scatter does
          if (is_k) {
            std::memcpy(L.keys + ((b * K + head) * S + slot) * Dh, tmp, Dh * sizeof(float));
          } else {
            float* vb = L.values + (b * K + head) * Dh * S + slot;
            for (int64_t j = 0; j < Dh; ++j) vb[j * S] = tmp[j];
          }
        }
      }
    });
    // (B) attention: per (sequence, kv head), keys and values read once for G x T queries.
    pool.Run([&](int tid, int n) {
      int64_t i0, i1;
      Split(d.B * K, tid, n, &i0, &i1);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / K, kh = i % K, T = d.T;
        const int64_t last = std::min<int64_t>(lengths[b] + T - 1, S - 1);
        const int64_t n_s = last + 1;
        const float* keys = L.keys + (b * K + kh) * S * Dh;
        const float* vals = L.values + (b * K + kh) * Dh * S;
        std::vector<float>& sc = scratch[tid];
        sc.resize(static_cast<size_t>(T * G * (n_s + 1)));
        auto qrow = [&](int64_t t, int64_t g) { return q.data() + ((b * T + t) * H + kh * G + g) * Dh; };
        int64_t s = 0;
        if (Dh % 8 == 0) {   // 8 slots at a time: their keys read once for the T x G queries
          f8 acc[8];
          // Keys are prefetched kKeysAhead bytes ahead of the block read, up to the last
          // slot read (the first kKeysAhead bytes up front): the 8 slots' keys are read
          // a few floats of each at a time, a pattern the hardware prefetcher alone
          // left at about half the weights' streaming rate.
          const int64_t ahead = kKeysAhead / 4, end = n_s * Dh;
          for (int64_t c = 0; c < std::min(ahead, end); c += 16) __builtin_prefetch(keys + c, 0, 2);
          for (; s + 8 <= n_s; s += 8) {
            const float* kb = keys + s * Dh;
            for (int64_t c = s * Dh + ahead; c < std::min(s * Dh + ahead + 8 * Dh, end); c += 16)
              __builtin_prefetch(keys + c, 0, 2);
            for (int64_t t = 0; t < T; ++t)
              for (int64_t g = 0; g < G; ++g) {
                const float* qv = qrow(t, g);
                for (int i = 0; i < 8; ++i) acc[i] = f8{};
                for (int64_t c = 0; c < Dh; c += 8) {
                  const f8 qc = Load8(qv + c);
                  for (int i = 0; i < 8; ++i) acc[i] += qc * Load8(kb + i * Dh + c);
                }
                const f8 out = SumEach8(acc);
                std::memcpy(sc.data() + (t * G + g) * n_s + s, &out, sizeof(out));
              }
          }
        }
        for (; s < n_s; ++s)
          for (int64_t t = 0; t < T; ++t)
            for (int64_t g = 0; g < G; ++g)
              sc[(t * G + g) * n_s + s] = Dot(keys + s * Dh, qrow(t, g), Dh);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t upto = std::min<int64_t>(lengths[b] + t, S - 1) + 1;   // slots <= position
          for (int64_t g = 0; g < G; ++g) {
            float* p = sc.data() + (t * G + g) * n_s;
            Softmax(p, upto);
            std::fill(p + upto, p + n_s, 0.f);
          }
        }
        // The values: Dh rows of n_s floats, S apart, each read once for the T x G
        // queries. A row is a short stream the hardware prefetcher meets cold (and,
        // S * 4 bytes apart, on a new page), so the row `ahead` rows on (about
        // kValuesAhead bytes on) is prefetched while one is read.
        const int64_t ahead = std::max<int64_t>(1, kValuesAhead / (n_s * 4 + 1) + 1);
        for (int64_t j = 0; j < std::min(ahead, Dh); ++j)
          for (int64_t c = 0; c < n_s; c += 16) __builtin_prefetch(vals + j * S + c, 0, 2);
        float* outs = sc.data() + T * G * n_s;   // T x G results of one row
        for (int64_t j = 0; j < Dh; ++j) {
          DotRows(vals + j * S, sc.data(), n_s, T * G, outs,
                  j + ahead < Dh ? vals + (j + ahead) * S : nullptr);
          for (int64_t t = 0; t < T; ++t)
            for (int64_t g = 0; g < G; ++g)
              att[((b * T + t) * H + kh * G + g) * Dh + j] = outs[t * G + g];
        }
      }
    });
    // (C) x += o-projection.
    pool.Run([&](int tid, int n) {
      int64_t o0, o1;
      Split(D, tid, n, &o0, &o1);
      MatVecRows(static_cast<const W*>(L.o), H * Dh, att.data(), R, x.data(), D, o0, o1, true);
    });
    // (D) h = silu(gate) * up.
    pool.Run([&](int tid, int n) {
      int64_t f0, f1;
      Split(F, tid, n, &f0, &f1);
      if (f0 == f1) return;
      float* xt = xn[tid].data();
      RmsNorm(x.data(), L.mlp_norm, R, D, d.eps, xt);
      const W* wg = static_cast<const W*>(L.gate);
      const W* wu = static_cast<const W*>(L.up);
      std::vector<float> g(R), u(R);
      for (int64_t f = f0; f < f1; ++f) {
        DotRows(wg + f * D, xt, D, R, g.data());
        DotRows(wu + f * D, xt, D, R, u.data());
        for (int64_t r = 0; r < R; ++r) h[r * F + f] = g[r] / (1.f + std::exp(-g[r])) * u[r];
      }
    });
    // (E) x += down.
    pool.Run([&](int tid, int n) {
      int64_t o0, o1;
      Split(D, tid, n, &o0, &o1);
      MatVecRows(static_cast<const W*>(L.down), F, h.data(), R, x.data(), D, o0, o1, true);
    });
    for (size_t i = 0; i < sources.size(); ++i)
      if (sources[i] == static_cast<int64_t>(l))
        std::memcpy(source_out[i], x.data(), R * D * sizeof(float));
  }
  std::memcpy(x_out, x.data(), R * D * sizeof(float));
  pool.Run([&](int tid, int n) {   // logits = final_norm(x) @ unembed
    int64_t c0, c1;
    Split(d.V, tid, n, &c0, &c1);
    if (c0 == c1) return;
    float* xt = xn[tid].data();
    RmsNorm(x.data(), final_norm, R, D, d.eps, xt);
    if (unembed)
      MatVecCols(unembed, D, d.V, xt, R, logits, c0, c1);
    else
      MatVecRows(embed, D, xt, R, logits, d.V, c0, c1, false);
  });
}

ffi::Error Impl(ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t num_layers,
                int64_t num_heads, int64_t num_kv_heads, bool tied, bool has_bias, float eps,
                ffi::Span<const int64_t> sources) {
  size_t a = 0;
  auto arg = [&]() { return args.get<ffi::AnyBuffer>(a++).value(); };
  const int64_t L = num_layers, H = num_heads, K = num_kv_heads;
  ffi::AnyBuffer tokens = arg(), lengths = arg(), cos = arg(), sin = arg(), embed = arg(),
                 final_norm = arg();
  const void* unembed = tied ? nullptr : arg().untyped_data();
  const ffi::DataType wt = embed.element_type();
  if (wt != ffi::DataType::F32 && wt != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("weights must be float32 or bfloat16");
  Dims d;
  d.B = tokens.dimensions()[0];
  d.T = tokens.dimensions()[1];
  d.R = d.B * d.T;
  d.V = embed.dimensions()[0];
  d.D = embed.dimensions()[1];
  d.H = H;
  d.K = K;
  d.G = H / K;
  d.Dh = cos.dimensions()[2] * 2;
  d.eps = eps;
  std::vector<Layer> layers(L);
  for (auto& ly : layers) {
    ly.attn_norm = static_cast<const float*>(arg().untyped_data());
    ly.q = arg().untyped_data();
    ly.k = arg().untyped_data();
    ly.v = arg().untyped_data();
    ly.qb = ly.kb = ly.vb = nullptr;
    if (has_bias) {
      ly.qb = arg().untyped_data();
      ly.kb = arg().untyped_data();
      ly.vb = arg().untyped_data();
    }
    ly.o = arg().untyped_data();
    ly.mlp_norm = static_cast<const float*>(arg().untyped_data());
    ffi::AnyBuffer gate = arg();
    d.F = gate.dimensions()[0];
    ly.gate = gate.untyped_data();
    ly.up = arg().untyped_data();
    ly.down = arg().untyped_data();
  }
  // Results: logits, x, sources, then the caches (aliased to the cache arguments,
  // which follow the weights in the same order).
  size_t rr = 0;
  auto ret = [&]() { return rets.get<ffi::AnyBuffer>(rr++).value(); };
  float* logits = static_cast<float*>(ret()->untyped_data());
  float* x_out = static_cast<float*>(ret()->untyped_data());
  std::vector<int64_t> src(sources.begin(), sources.end());
  std::vector<float*> src_out;
  for (size_t i = 0; i < src.size(); ++i) src_out.push_back(static_cast<float*>(ret()->untyped_data()));
  for (auto& ly : layers) {
    ffi::AnyBuffer in = arg();
    auto out = ret();
    d.S = in.dimensions()[2];
    if (out->untyped_data() != in.untyped_data())   // not aliased: start from the input
      std::memcpy(out->untyped_data(), in.untyped_data(), in.size_bytes());
    ly.keys = static_cast<float*>(out->untyped_data());
  }
  for (auto& ly : layers) {
    ffi::AnyBuffer in = arg();
    auto out = ret();
    if (out->untyped_data() != in.untyped_data())
      std::memcpy(out->untyped_data(), in.untyped_data(), in.size_bytes());
    ly.values = static_cast<float*>(out->untyped_data());
  }
  const auto* tok = static_cast<const int32_t*>(tokens.untyped_data());
  const auto* len = static_cast<const int32_t*>(lengths.untyped_data());
  const auto* c = static_cast<const float*>(cos.untyped_data());
  const auto* s = static_cast<const float*>(sin.untyped_data());
  const auto* fn = static_cast<const float*>(final_norm.untyped_data());
  // One pass at a time on the pool (XLA may run two executions concurrently).
  static std::mutex pass_mu;
  std::lock_guard<std::mutex> lk(pass_mu);
  Pool& pool = GetPool();
  if (wt == ffi::DataType::F32)
    Pass<float>(pool, d, tok, len, c, s, static_cast<const float*>(embed.untyped_data()), fn,
                static_cast<const float*>(unembed), layers, src, logits, x_out, src_out);
  else
    Pass<uint16_t>(pool, d, tok, len, c, s, static_cast<const uint16_t*>(embed.untyped_data()),
                   fn, static_cast<const uint16_t*>(unembed), layers, src, logits, x_out, src_out);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtcotDecodeStep, Impl,
                              ffi::Ffi::Bind()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("num_layers")
                                  .Attr<int64_t>("num_heads")
                                  .Attr<int64_t>("num_kv_heads")
                                  .Attr<bool>("tied")
                                  .Attr<bool>("has_bias")
                                  .Attr<float>("eps")
                                  .Attr<ffi::Span<const int64_t>>("sources"));

// The number of threads a pass runs on (starts the pool).
extern "C" int MtcotNativeThreads() { return GetPool().size(); }
