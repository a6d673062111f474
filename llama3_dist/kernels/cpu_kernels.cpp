// CPU kernels for bfloat16 and float32 models, loaded by llama3_dist/kernels/cpu.py through ctypes.
//
// Why: on a CPU, a decode step of a small model is a few hundred tiny torch ops (each 3-20 us of
// dispatch) around GEMVs that torch runs below the memory's speed. Here each kernel of the
// model's decode path (kernels/__init__.py) is one call, with the arithmetic of the torch
// reference (kernels/reference.py): float32 math, rounded to bfloat16 where the reference's
// bfloat16 tensors round, so results agree to float32 summation order.
//
// One source for every CPU: the code is written with GCC/Clang vector extensions, vectors of
// VECTOR_BYTES, which cpu.py sets per instruction set (64 for AVX-512, 32 for AVX2, 16 for
// SSE2 and NEON) together with the matching -m flags, so each algorithm exists once and the
// compiler picks the instructions. Loops run over whole vectors and end with one partial
// vector (load_partial/store_partial), never with a scalar copy of the loop.
//
// gemv: decode is bound by reading the weight once per step. Each weight vector is widened to
// float32 in registers (bfloat16: a 16-bit shift, exact) and multiplied-added into float32
// accumulators; whole cache lines of each row per iteration, with a software prefetch ahead, so
// the loop runs near the memory's speed. With 64-byte vectors several output rows are
// done at once so that each loaded x vector serves all of them (elsewhere one row at a time read
// faster: GEMV_TILE_ROWS); several rows of x share each weight vector. A bfloat16 result is
// rounded once (nearest, ties to even), as a bfloat16 GEMM with float32 accumulation does.
//
// Built by cpu.py with -fopenmp where the compiler has it: torch has already loaded its own
// libgomp, so this library's parallel loops share torch's OpenMP threads.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

#ifndef VECTOR_BYTES
#error "cpu.py builds this file with -DVECTOR_BYTES=64|32|16 for the target instruction set"
#endif

namespace {

constexpr int LANES = VECTOR_BYTES / 4;  // float32 lanes per vector
typedef float Floats __attribute__((vector_size(VECTOR_BYTES)));
typedef int32_t Ints __attribute__((vector_size(VECTOR_BYTES)));
typedef uint32_t Words __attribute__((vector_size(VECTOR_BYTES)));
typedef uint16_t Halves __attribute__((vector_size(VECTOR_BYTES / 2)));
typedef uint8_t LaneBytes __attribute__((vector_size(LANES)));  // a byte per float32 lane
typedef uint32_t Quad __attribute__((vector_size(16)));  // 16 bytes on every instruction set

// bfloat16 values are stored as their bit patterns.
typedef uint16_t bfloat16;

// Measured on a 2-core KVM Xeon over the 284M benchmark model's weights: 8-24 KiB ahead are
// alike and ~1.4x faster than no software prefetch.
constexpr int PREFETCH_BYTES = 16384;
constexpr int CACHE_LINE = 64;

inline Floats splat(float f) { return Floats{} + f; }

// Threads of the enclosing parallel region (1 outside one, or built without OpenMP).
inline int64_t omp_threads() {
#if defined(_OPENMP)
    return omp_get_num_threads();
#else
    return 1;
#endif
}

// Asks for bytes [0, size) from p into this core's L2 cache (prefetcht1), a line at a time.
inline void prefetch_lines(const void* p, int64_t size) {
    for (int64_t line = 0; line < size; line += CACHE_LINE) __builtin_prefetch(static_cast<const char*>(p) + line, 0, 2);
}

// Lanes Offset .. Offset + sizeof...(I) - 1 of v, as a vector of that many.
template <int Offset, typename V, size_t... I>
inline auto lanes_of(V v, std::index_sequence<I...>) {
    return __builtin_shufflevector(v, v, (Offset + int(I))...);
}

// The sum of v's lanes pairwise, halving the vector each time: log2(LANES) dependent additions
// instead of LANES - 1 (a decode step does one per key and head), in the same order on every
// instruction set. Shuffles in registers: a trip through memory would keep the vector's
// producers (the accumulators) on the stack.
template <typename V>
inline float pairwise_vector_sum(V v) {
    constexpr int N = sizeof(V) / sizeof(float);
    if constexpr (N == 2) {
        return v[0] + v[1];
    } else {
        constexpr auto half = std::make_index_sequence<N / 2>{};
        return pairwise_vector_sum(lanes_of<0>(v, half) + lanes_of<N / 2>(v, half));
    }
}

inline float horizontal_sum(Floats v) { return pairwise_vector_sum(v); }

// Lane o of the fold of vectors a and b that each hold W / S sums' partials in segments of S
// lanes (b's after a's): from the first (Second: the second) half of its sum's segment.
template <int W, int S, bool Second>
constexpr int fold_lane(int o) {
    const int half = S / 2, sum = o / half, per_vector = W / S;
    const int lane = (sum % per_vector) * S + (Second ? half : 0) + o % half;
    return sum < per_vector ? lane : W + lane;
}

template <int S, typename V, size_t... O>
inline V fold_pair(V a, V b, std::index_sequence<O...>) {
    constexpr int W = sizeof...(O);
    return __builtin_shufflevector(a, b, fold_lane<W, S, false>(int(O))...) +
           __builtin_shufflevector(a, b, fold_lane<W, S, true>(int(O))...);
}

// v: S vectors of LANES / S sums' partials each, in segments of S lanes; folds pairs of them
// until one vector holds LANES sums.
template <int S>
inline Floats fold_sums(Floats* v) {
    if constexpr (S == 1) {
        return v[0];
    } else {
#pragma GCC unroll 16
        for (int i = 0; i < S / 2; ++i) v[i] = fold_pair<S>(v[2 * i], v[2 * i + 1], std::make_index_sequence<LANES>{});
        return fold_sums<S / 2>(v);
    }
}

// Lane i = the sum of v[i]'s lanes for LANES vectors (v is overwritten): LANES - 1 folds of two
// shuffles and an addition, against log2(LANES) of them per vector with horizontal_sum, in the
// same pairwise order (each sum bit-identical to horizontal_sum's).
inline Floats transpose_sums(Floats* v) { return fold_sums<LANES>(v); }

// The largest lane (comparisons only: exact in any order).
template <typename V>
inline float largest_lane(V v) {
    constexpr int N = sizeof(V) / sizeof(float);
    if constexpr (N == 1) {
        return v[0];
    } else {
        constexpr auto half = std::make_index_sequence<N / 2>{};
        const auto low = lanes_of<0>(v, half), high = lanes_of<N / 2>(v, half);
        return largest_lane(low > high ? low : high);
    }
}

inline Floats bits_to_floats(Words w) {
    Floats f;
    memcpy(&f, &w, sizeof f);
    return f;
}

inline Words floats_to_bits(Floats f) {
    Words w;
    memcpy(&w, &f, sizeof w);
    return w;
}

// Lane i of a where lane i of mask is all ones (a vector comparison's true), else lane i of b.
inline Floats select(Ints mask, Floats a, Floats b) {
    const Words m = (Words)mask;
    return bits_to_floats((floats_to_bits(a) & m) | (floats_to_bits(b) & ~m));
}

inline Ints lane_indices() {
    Ints v;
    for (int i = 0; i < LANES; ++i) v[i] = i;
    return v;
}

// Loads and stores of one element type, widened to / rounded from float32 vectors. round()
// is what storing a float32 value into a tensor of that type does (identity for float32).
template <typename T>
struct Element;

template <>
struct Element<float> {
    static Floats load(const float* p) {
        Floats v;
        memcpy(&v, p, sizeof v);
        return v;
    }
    static void store(float* p, Floats v) { memcpy(p, &v, sizeof v); }
    static Floats round(Floats v) { return v; }
    static float to_float(float x) { return x; }
    static float from_float(float x) { return x; }
};

template <>
struct Element<bfloat16> {
    static Floats widen(Halves h) { return bits_to_floats(__builtin_convertvector(h, Words) << 16); }
    // Nearest, ties to even; a NaN stays a (quiet) NaN.
    static Halves narrow(Floats v) {
        const Words bits = floats_to_bits(v);
        const Words rounded = bits + 0x7fffu + ((bits >> 16) & 1u);
        const Words nan = (Words)(v != v);
        return __builtin_convertvector(((rounded & ~nan) | ((bits | 0x400000u) & nan)) >> 16, Halves);
    }
    static Floats load(const bfloat16* p) {
        Halves h;
        memcpy(&h, p, sizeof h);
        return widen(h);
    }
    static void store(bfloat16* p, Floats v) {
        const Halves h = narrow(v);
        memcpy(p, &h, sizeof h);
    }
    static Floats round(Floats v) { return widen(narrow(v)); }
    static float to_float(bfloat16 h) {
        const uint32_t bits = uint32_t(h) << 16;
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    static bfloat16 from_float(float f) {
        uint32_t bits;
        memcpy(&bits, &f, sizeof bits);
        if ((bits & 0x7fffffffu) > 0x7f800000u) return bfloat16((bits >> 16) | 0x40);  // quiet NaN
        bits += 0x7fffu + ((bits >> 16) & 1u);
        return bfloat16(bits >> 16);
    }
};

// The first `count` (< LANES) elements of p as a vector, zero beyond; and the store of as many.
template <typename T>
inline Floats load_partial(const T* p, int64_t count) {
    T buffer[LANES] = {};
    memcpy(buffer, p, count * sizeof(T));
    return Element<T>::load(buffer);
}

template <typename T>
inline void store_partial(T* p, Floats v, int64_t count) {
    T buffer[LANES];
    Element<T>::store(buffer, v);
    memcpy(p, buffer, count * sizeof(T));
}

template <typename T>
inline Floats load(const T* p, int64_t count) {
    return count >= LANES ? Element<T>::load(p) : load_partial(p, count);
}

template <typename T>
inline void store(T* p, Floats v, int64_t count) {
    if (count >= LANES)
        Element<T>::store(p, v);
    else
        store_partial(p, v, count);
}

// body(j, count) over [0, n) a vector at a time: whole vectors (count == LANES, a constant once
// inlined, so their loads and stores are plain) and then, if n is no multiple of LANES, the
// partial rest. Every loop over features goes through here: one loop, no scalar tail copy.
template <typename Body>
inline void over_vectors(int64_t n, Body&& body) {
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) body(j, int64_t(LANES));
    if (j < n) body(j, n - j);
}

// exp of each lane: Cephes' polynomial on x - k*ln2, scaled by 2^k in two halves so that
// results below the float range flush to zero and above it overflow to inf. Within 2 float32
// ulps of expf; NaN stays NaN.
inline Floats exp_lanes(Floats x) {
    x = select(x < splat(-104.0f), splat(-104.0f), x);  // exp(-104) is below the smallest denormal
    x = select(x > splat(89.0f), splat(89.0f), x);      // exp(89) overflows float32
    // Rounds to the nearest integer (|x * log2e| < 2^22): adding and removing 1.5 * 2^23.
    const Floats k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    Floats r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    Floats p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + (r + 1.0f);
    const Ints ki = __builtin_convertvector(k, Ints);
    const Ints half = ki >> 1;
    const Floats scale_a = bits_to_floats((Words)((half + 127) << 23));
    const Floats scale_b = bits_to_floats((Words)((ki - half + 127) << 23));
    return p * scale_a * scale_b;
}

// Rotates the first 2 * half features of one head in place, as reference.rotary_embedding does:
// c and s are cos and sin already rounded to T, and every product and sum is rounded to T.
template <typename T>
inline void rotate(T* x, const float* c, const float* s, int64_t half, bool interleaved) {
    using E = Element<T>;
    if (interleaved) {  // pairs (2j, 2j+1): no Hugging Face checkpoint uses it, kept scalar
        for (int64_t j = 0; j < half; ++j) {
            const float x1 = E::to_float(x[2 * j]), x2 = E::to_float(x[2 * j + 1]);
            const float a = E::to_float(E::from_float(x1 * c[j])), b = E::to_float(E::from_float(x2 * s[j]));
            const float e = E::to_float(E::from_float(x2 * c[j])), f = E::to_float(E::from_float(x1 * s[j]));
            x[2 * j] = E::from_float(a - b);
            x[2 * j + 1] = E::from_float(e + f);
        }
        return;
    }
    over_vectors(half, [&](int64_t j, int64_t count) {  // j pairs with j + half
        const Floats x1 = load(x + j, count), x2 = load(x + half + j, count);
        const Floats cv = load(c + j, count), sv = load(s + j, count);
        store(x + j, E::round(x1 * cv) - E::round(x2 * sv), count);
        store(x + half + j, E::round(x2 * cv) + E::round(x1 * sv), count);
    });
}

// The GEMV reads weights in blocks of VECTORS * LANES elements, as VECTORS float32 vectors, and
// x is stored in the same order so that each product pairs the right elements. For bfloat16 a
// block is one full-width load of 32-bit words: the even elements are the words shifted left by
// 16 and the odd ones the words with the low half cleared (two cheap ops, where widening LANES
// elements with a conversion costs a shuffle each). For float32 the vectors are consecutive.
template <typename T>
struct Block;

template <>
struct Block<float> {
    static constexpr int VECTORS = 2;
    static void load(const float* p, Floats* v) {
        v[0] = Element<float>::load(p);
        v[1] = Element<float>::load(p + LANES);
    }
    static int64_t x_index(int64_t j) { return j; }  // x in its own order
};

template <>
struct Block<bfloat16> {
    static constexpr int VECTORS = 2;
    static void load(const bfloat16* p, Floats* v) {
        Words words;
        memcpy(&words, p, sizeof words);
        v[0] = bits_to_floats(words << 16);
        v[1] = bits_to_floats(words & 0xffff0000u);
    }
    // Where element j of x goes: the evens of each block first, then its odds.
    static int64_t x_index(int64_t j) {
        const int64_t block = j / (2 * LANES), within = j % (2 * LANES);
        return block * 2 * LANES + (within % 2) * LANES + within / 2;
    }
};

// int8 weights (weight-only quantization; a float32 scale per row multiplies the row's sum): a
// block is one full-width load of LANES 32-bit words, 4 * LANES bytes; byte b of every word,
// sign-extended in place by two shifts and converted, is vector b. (Compilers turn a plain
// int8 -> int32 vector conversion into scalar code; these are a few vector instructions.)
template <>
struct Block<int8_t> {
    static constexpr int VECTORS = 4;
    static void load(const int8_t* p, Floats* v) {
        Ints words;
        memcpy(&words, p, sizeof words);
        v[0] = __builtin_convertvector((words << 24) >> 24, Floats);
        v[1] = __builtin_convertvector((words << 16) >> 24, Floats);
        v[2] = __builtin_convertvector((words << 8) >> 24, Floats);
        v[3] = __builtin_convertvector(words >> 24, Floats);
    }
    // Within a block, byte b of word w sits at b * LANES + w.
    static int64_t x_index(int64_t j) {
        const int64_t block = j / (4 * LANES), within = j % (4 * LANES);
        return block * 4 * LANES + (within % 4) * LANES + within / 4;
    }
};

// The widest block (4-bit group-quantized weights: 8 elements in each of LANES words): rows of x
// are padded to a multiple of it, so every weight type's blocks fit.
constexpr int MAX_BLOCK = 8 * LANES;

// Accumulator vectors that fit in the registers beside the x and w vectors: 32 vector
// registers on AVX-512 and NEON, 16 on AVX2 and SSE.
constexpr int ACCUMULATORS = VECTOR_BYTES == 64 ? 16 : 8;

// How a thread walks the weights: rows at once (each its own stream of reads) and cache lines of
// each row per iteration. Measured on a 2-core AVX2 Zen 3 VM over SmolLM2's bfloat16 projections
// and LM head, in alternation: one row and two lines ran the GEMVs in 0.78x the time of four rows
// and one line (0.82-0.98x with 2-8 rows of x; int8 rows 0.96x), where one row alone gave 0.95x
// and two lines alone 1.0x: fewer read streams a thread, more of each in flight. Independent
// accumulator chains changed nothing there, so one chain keeps the summation order. AVX-512
// keeps four rows and one line (64-byte vectors: a block is a line), the walk measured on the
// Sapphire Rapids hosts; the one-row walk is unmeasured there.
//
// Long rows are the exception: from LONG_ROW_BYTES a row, two rows at once ran 1.17-1.33x faster
// on that Zen 3 VM (bfloat16 [1024, 3584], [4096, 4096], [2048, 5632]: the down projections of
// 1B-class models and up), 1.0-1.03x at 1536-2048 features, and 0.83-0.89x on rows of 576-1024
// features, which keep one: each row's sum is the same either way (the rows' chains are apart).
// 16-byte vectors (SSE2, NEON) take two rows at any length: on that VM the SSE2 build's one row
// was bound by its one chain of multiply-adds, and two ran 1.15-1.38x faster on rows of 576-2048
// features (four: no better). Measured on SSE2 only; NEON runs the same walk, unmeasured.
constexpr int GEMV_TILE_ROWS = VECTOR_BYTES == 64 ? 4 : VECTOR_BYTES == 32 ? 1 : 2;
constexpr int64_t LONG_ROW_BYTES = 6144;
constexpr int LONG_ROW_TILE_ROWS = VECTOR_BYTES == 64 ? 4 : 2;
constexpr int LINES_PER_ITERATION = VECTOR_BYTES == 64 ? 1 : 2;

// out[i] = the sum of sums[i]'s lanes for a tile's N accumulators: LANES of them at a time by
// transpose_sums (bit-identical to horizontal_sum, a fraction of its shuffles: at SmolLM2's
// 576-wide rows the sums of a tile of 16 accumulators cost a third as much as its products).
template <int N>
inline void tile_sums(Floats* sums, float* out) {
    int i = 0;
    for (; i + LANES <= N; i += LANES) store(out + i, transpose_sums(sums + i), LANES);
    if constexpr (N % LANES >= LANES / 2) {  // the rest padded with zero vectors: still fewer shuffles
        Floats rest[LANES] = {};
        for (int j = 0; i + j < N; ++j) rest[j] = sums[i + j];
        store(out + i, transpose_sums(rest), N - i);
    } else {
        for (; i < N; ++i) out[i] = horizontal_sum(sums[i]);
    }
}

// bfloat16 weights on CPUs with AVX-512 BF16 (Zen 4, Sapphire Rapids and later): vdpbf16ps
// multiplies 32 bfloat16 pairs of a weight row and a row of x and adds them into 16 float32 sums,
// one instruction where the widening path (Block<bfloat16>) takes two widening operations and
// two multiply-adds per row of x. x is a bfloat16 model's own activations, so its products are
// exact either way (each product of two bfloat16 values is exact in float32, each sum rounded
// to nearest; the instruction flushes denormals, far below any value that counts): a row's
// result is the same dot product summed in another order. It pays where the GEMV is bound by
// these operations rather than by memory: SmolLM2's 30 layers of bf16 GEMVs on Zen 4, widening
// against this (one process, best of 9): 5 rows of x 15.0 / 12.3 ms, 6: 17.0 / 9.3, 8: 20.7 /
// 11.0; at 1-4 rows (memory-bound) it streamed the weights 3-14% slower, so those keep widening.
// Which form x takes (widen_rows) follows the same row count.
constexpr int BF16_DOT_MIN_ROWS = 5;
#if VECTOR_BYTES == 64 && defined(__AVX512BF16__)
constexpr bool BF16_DOT_GEMV = true;
template <int R, int M>
inline void bf16_dot_tile(const bfloat16* x, int64_t k_pad, const bfloat16* w, int64_t k, float* out /* M x R */) {
    constexpr int CHUNK = 2 * LANES;  // bfloat16 values a vector holds: one cache line
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j += CHUNK) {
        __m512bh weights[R];
        if (j + CHUNK <= k) {
            for (int r = 0; r < R; ++r) {
                __builtin_prefetch((const char*)(w + r * k + j) + PREFETCH_BYTES, 0, 2);
                weights[r] = (__m512bh)_mm512_loadu_si512(w + r * k + j);
            }
        } else {  // the last, partial chunk: zero beyond k (x is zero there too)
            const __mmask32 mask = (__mmask32)((1ull << (k - j)) - 1);
            for (int r = 0; r < R; ++r) weights[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * k + j);
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
            const __m512bh row = (__m512bh)_mm512_loadu_si512(x + m * k_pad + j);
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], weights[r], row);
        }
    }
    Floats sums[R * M];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) sums[m * R + r] = (Floats)acc[r][m];
    tile_sums<R * M>(sums, out);
}
#else
constexpr bool BF16_DOT_GEMV = false;
template <int R, int M>
inline void bf16_dot_tile(const bfloat16*, int64_t, const bfloat16*, int64_t, float*) {}
#endif

// Whether tiles of M rows of x against W weights take x as bfloat16 rows (bf16_dot_tile).
template <typename W>
constexpr bool bf16_dot_rows(int64_t rows) {
    return std::is_same_v<W, bfloat16> && BF16_DOT_GEMV && rows >= BF16_DOT_MIN_ROWS;
}

// The scratch from its `offset`-th value on, in the form tiles of M rows read it.
template <typename W, int M>
inline const float* x_rows(const float* xf, int64_t offset) {
    if constexpr (bf16_dot_rows<W>(M)) return reinterpret_cast<const float*>(reinterpret_cast<const bfloat16*>(xf) + offset);
    return xf + offset;
}

// R output rows of w against M rows of x (both compile-time, so the R*M accumulators live in
// registers). xf holds x widened to float32 in Block<T> order, M rows of k_pad floats (a
// multiple of MAX_BLOCK), zero beyond k; for bf16_dot_tile, x as bfloat16 rows of k_pad values.
template <typename T, int R, int M>
inline void tile(const float* xf, int64_t k_pad, const T* w, int64_t k, float* out /* M x R */) {
    if constexpr (bf16_dot_rows<T>(M)) {
        bf16_dot_tile<R, M>(reinterpret_cast<const bfloat16*>(xf), k_pad, w, k, out);
        return;
    }
    constexpr int V = Block<T>::VECTORS;
    constexpr int BLOCK = V * LANES;
    // Blocks per row and iteration: at least LINES_PER_ITERATION cache lines of weights.
    constexpr int BLOCKS = std::max<int>(1, LINES_PER_ITERATION * CACHE_LINE / (BLOCK * int(sizeof(T))));
    constexpr int LINES = std::max<int>(1, BLOCKS * BLOCK * int(sizeof(T)) / CACHE_LINE);
    Floats acc[R][M];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) acc[r][m] = Floats{};
    // R weight blocks and one x vector at a time beside the R*M accumulators: loading all M x
    // vectors first would spill registers.
    auto accumulate = [&](const T* const* rows, const float* x) {
        Floats parts[R][V];
        for (int r = 0; r < R; ++r) Block<T>::load(rows[r], parts[r]);
        for (int m = 0; m < M; ++m) {
            for (int v = 0; v < V; ++v) {
                const Floats x_part = Element<float>::load(x + m * k_pad + v * LANES);
                for (int r = 0; r < R; ++r) acc[r][m] += parts[r][v] * x_part;  // fused multiply-adds
            }
        }
    };
    const T* rows[R];
    int64_t j = 0;
    for (; j + BLOCKS * BLOCK <= k; j += BLOCKS * BLOCK) {
        // Hardware prefetch alone leaves one core at ~8 GB/s on the machines measured; asking
        // for the lines 16 KiB ahead into L2 keeps enough reads in flight.
        for (int r = 0; r < R; ++r)
            for (int line = 0; line < LINES; ++line)
                __builtin_prefetch((const char*)(w + r * k + j) + PREFETCH_BYTES + line * CACHE_LINE, 0, 2);
        for (int b = 0; b < BLOCKS; ++b) {
            for (int r = 0; r < R; ++r) rows[r] = w + r * k + j + b * BLOCK;
            accumulate(rows, xf + j + b * BLOCK);
        }
    }
    for (; j < k; j += BLOCK) {  // the last blocks, the very last one partial (zero-padded)
        T padded[R][BLOCK];
        for (int r = 0; r < R; ++r) {
            rows[r] = w + r * k + j;
            if (k - j < BLOCK) {
                memset(padded[r], 0, sizeof padded[r]);
                memcpy(padded[r], rows[r], (k - j) * sizeof(T));
                rows[r] = padded[r];
            }
        }
        accumulate(rows, xf + j);
    }
    Floats sums[R * M];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) sums[m * R + r] = acc[r][m];
    tile_sums<R * M>(sums, out);
}

inline int64_t padded_width(int64_t k) { return (k + MAX_BLOCK - 1) / MAX_BLOCK * MAX_BLOCK; }

constexpr int64_t X_BAND_BYTES = 24576;  // of L1's 32-48 KiB, beside a tile's weights (gemv_tiles)

// The GEMV's work, shared by the threads of an enclosing parallel region (an orphaned `omp for`:
// called outside one, the calling thread does it all). xf: x widened by widen_rows.
// W: the weights' type (T, or int8_t with `scale`, one float per row; nullptr otherwise).
// TILE_ROWS: the rows a thread walks at once, as far as registers allow.
// m rows of x in groups of M (the last one padded: its padding rows' results are dropped): each
// tile of weight rows is read from memory once and multiplied into every group of a band while
// it is in the core's cache, as the panel GEMVs do.
template <typename T, typename W, int M, int TILE_ROWS>
void gemv_tiles(const float* xf, const W* w, const float* scale, const T* bias, T* y, int64_t m, int64_t n,
                int64_t k) {
    using E = Element<T>;
    // Weight vectors held per block: R * VECTORS, at most 8 beside the accumulators.
    constexpr int R = std::max(1, std::min({TILE_ROWS, 8 / Block<W>::VECTORS, ACCUMULATORS / M}));
    const int64_t k_pad = padded_width(k);
    const int64_t tiles = (n + R - 1) / R;
    // Bands of groups whose x stays in L1 beside a tile's weights: a tile multiplied into more
    // groups than that read x from L2 for every multiply-add, slower than reading the weight from
    // memory once per band where the products bound the GEMV (held to AVX2, SmolLM2 bf16, a
    // 24-token prompt's first token: 56-60 ms in passes of 8 rows, 64-69 in one band).
    const int64_t group_bytes = M * k_pad * int64_t(bf16_dot_rows<W>(M) ? sizeof(bfloat16) : sizeof(float));
    const int64_t band = std::max<int64_t>(1, X_BAND_BYTES / group_bytes) * M;
    for (int64_t band_first = 0; band_first < m; band_first += band) {
#pragma omp for schedule(guided)  // ~4% faster than static over the benchmark model
        for (int64_t t = 0; t < tiles; ++t) {
            const int64_t n0 = t * R;
            float out[M * R];
            const int width = n0 + R <= n ? R : 1;  // a last, partial tile goes one row at a time
            for (int64_t r0 = n0; r0 < n0 + R && r0 < n; r0 += width) {
                for (int64_t first = band_first; first < std::min(m, band_first + band); first += M) {
                    const float* x = x_rows<W, M>(xf, first * k_pad);
                    if (width == R)
                        tile<W, R, M>(x, k_pad, w + r0 * k, k, out);
                    else
                        tile<W, 1, M>(x, k_pad, w + r0 * k, k, out);
                    for (int r = 0; r < width; ++r) {
                        const float b = bias ? E::to_float(bias[r0 + r]) : 0.0f;
                        const float s = scale ? scale[r0 + r] : 1.0f;
                        for (int row = 0; row < M && first + row < m; ++row)
                            y[(first + row) * n + r0 + r] = E::from_float(out[row * width + r] * s + b);
                    }
                }
            }
        }
    }
}

// x [m, k] as float32 in Block<W> order (the weights' order), rows padded_width(k) apart and
// zero beyond k; as bfloat16 rows where tiles of group_rows rows take them so (bf16_dot_rows).
template <typename T, typename W>
void widen_rows(const T* x, int64_t m, int64_t k, float* xf, int64_t group_rows = 1) {
    const int64_t k_pad = padded_width(k);
    if (std::is_same_v<T, W> && bf16_dot_rows<W>(group_rows)) {
        // bf16_dot_tile reads x as it is, rows of k_pad values (zero beyond k).
        bfloat16* out = reinterpret_cast<bfloat16*>(xf);
        for (int64_t row = 0; row < m; ++row) {
            memcpy(out + row * k_pad, x + row * k, k * sizeof(T));
            memset(out + row * k_pad + k, 0, (k_pad - k) * sizeof(T));
        }
    } else if constexpr (std::is_same_v<T, W>) {
        // x of the weights' type: Block<W>::load puts a block in that order (a decode step widens
        // x before every GEMV, one thread while the others wait: this was element by element).
        constexpr int V = Block<W>::VECTORS, BLOCK = V * LANES;
        for (int64_t row = 0; row < m; ++row) {
            float* out = xf + row * k_pad;
            for (int64_t j = 0; j < k_pad; j += BLOCK) {
                const T* from = x + row * k + j;
                T padded[BLOCK];
                if (j + BLOCK > k) {  // the last blocks: zero beyond k
                    memset(padded, 0, sizeof padded);
                    if (j < k) memcpy(padded, from, (k - j) * sizeof(T));
                    from = padded;
                }
                Floats parts[V];
                Block<W>::load(from, parts);
                for (int v = 0; v < V; ++v) memcpy(out + j + v * LANES, &parts[v], sizeof(Floats));
            }
        }
    } else if constexpr (std::is_same_v<W, float>) {  // x in its own order, a vector at a time
        for (int64_t row = 0; row < m; ++row)
            over_vectors(k_pad, [&](int64_t j, int64_t count) {
                const Floats values = j < k ? load(x + row * k + j, std::min(count, k - j)) : Floats{};
                store(xf + row * k_pad + j, values, count);
            });
    } else {
        std::fill(xf, xf + m * k_pad, 0.0f);
        for (int64_t row = 0; row < m; ++row)
            for (int64_t j = 0; j < k; ++j)
                xf[row * k_pad + Block<W>::x_index(j)] = Element<T>::to_float(x[row * k + j]);
    }
}

// The most rows of x a tile multiplies at once (gemv_tiles walks more in groups of up to this).
constexpr int GEMV_MAX_ROWS = 8;

// Runs body(std::integral_constant<int, N>) for n from 1 to MAX (MAX for anything larger): a
// count known at run time as a compile-time constant, so that arrays sized by it stay in registers.
template <int MAX, int N = 1, typename Body>
inline void with_constant(int64_t n, Body&& body) {
    if constexpr (N == MAX)
        body(std::integral_constant<int, MAX>{});
    else if (n == N)
        body(std::integral_constant<int, N>{});
    else
        with_constant<MAX, N + 1>(n, body);
}

template <typename T>
void rms_norm(const T* x, const T* residual, const T* weight, float eps, T* out, T* h_out, int64_t n, int64_t d);

// An RMS norm run where the projection after it prepares x, in the same single section (the
// fused decode halves): h = x + residual (stored into residual; x alone when residual is null),
// normed = norm(h). One barrier fewer, and the normed rows stay with the thread that reads them
// next instead of crossing to the other core.
template <typename T>
struct NormFirst {
    const T* x;
    T* residual;
    const void* weight;
    float eps;
    T* normed;
    int64_t hidden;
    void run(int64_t m) const { run_rows(0, m); }
    // Rows [first, first + count) alone (each row's norm depends on that row only).
    void run_rows(int64_t first, int64_t count) const {
        const int64_t at = first * hidden;
        rms_norm<T>(x + at, residual ? residual + at : nullptr, static_cast<const T*>(weight), eps, normed + at,
                    residual ? residual + at : nullptr, count, hidden);
    }
};

// The GEMVs take any number of rows up to GEMV_ANY_MAX_ROWS, in groups of at most GEMV_MAX_ROWS
// (each row's accumulators in registers; see gemv_tiles).
constexpr int64_t GEMV_ANY_MAX_ROWS = 4096;

// The rows of each group for m rows: as even as the groups allow (m = 9: 2 groups of 5, not 8
// and 1), the last one padded with zero rows of x (their products are computed, never stored).
inline int64_t group_rows_of(int64_t m) {
    const int64_t groups = (m + GEMV_MAX_ROWS - 1) / GEMV_MAX_ROWS;
    return (m + groups - 1) / groups;
}

// The dense GEMV's groups: of 5 or 7 rows rounded up to 6 or 8 (bfloat16 tiles of 5 rows ran
// slower than of 6: SmolLM2's layers at 5 rows ~11 ms, 6 ~9, 9 as two groups of 5 ~19).
inline int64_t gemv_group_rows(int64_t m) {
    const int64_t rows = group_rows_of(m);
    return rows > 4 && rows % 2 ? rows + 1 : rows;
}

// m rows padded to whole groups of group_rows: the rows of x a GEMV's scratch holds.
inline int64_t padded_rows(int64_t m, int64_t group_rows) { return (m + group_rows - 1) / group_rows * group_rows; }
inline int64_t gemv_padded_rows(int64_t m) { return padded_rows(m, gemv_group_rows(m)); }

// y [m, n] = x [m, k] @ w [n, k].T + bias, m from 1 to GEMV_ANY_MAX_ROWS, by the threads of the
// enclosing parallel region (or the calling thread). xf: scratch of gemv_padded_rows(m) *
// padded_width(k) floats, shared by the team. Returns -1 if m is out of range.
template <typename T, typename W = T>
int gemv_team(const T* x, int64_t m, const W* w, const T* bias, T* y, int64_t n, int64_t k, float* xf,
              const float* scale = nullptr, const NormFirst<T>* norm = nullptr) {
    if (m < 1 || m > GEMV_ANY_MAX_ROWS) return -1;
    const int64_t group_rows = gemv_group_rows(m);
#pragma omp single
    {
        if (norm) norm->run(m);
        widen_rows<T, W>(x, m, k, xf, group_rows);
    }
    with_constant<GEMV_MAX_ROWS>(group_rows, [&](auto rows) {
        if (k * int64_t(sizeof(W)) >= LONG_ROW_BYTES)
            gemv_tiles<T, W, rows(), LONG_ROW_TILE_ROWS>(xf, w, scale, bias, y, m, n, k);
        else
            gemv_tiles<T, W, rows(), GEMV_TILE_ROWS>(xf, w, scale, bias, y, m, n, k);
    });
    return 0;
}

template <typename T, typename W = T>
int gemv_rows(const T* x, const W* w, const T* bias, T* y, int64_t m, int64_t n, int64_t k,
              const float* scale = nullptr) {
    if (m < 1 || m > GEMV_ANY_MAX_ROWS) return -1;
    std::vector<float> xf(gemv_padded_rows(m) * padded_width(k));
#pragma omp parallel
    gemv_team<T, W>(x, m, w, bias, y, n, k, xf.data(), scale);
    return 0;
}

// --- group-quantized weights ---------------------------------------------------------------------
// Weight-only quantization with a scale (and for 4 bits an offset) per group of `group_size`
// consecutive input features of a row: w = q * scale + offset, scale and offset float16. The
// forms of llama.cpp's Q8_0 (8 bits, symmetric, groups of 32), Q4_0 (4 bits, offset -8 * scale),
// Q4_1 and our int4 (4 bits, offset: the group's minimum) all run here.
//
// Layout (cpu.py's pack_grouped writes it for this library's LANES): a row is blocks of LANES
// 32-bit words; element v (BITS bits at bit v * BITS) of word l holds the block's weight
// v * LANES + l. So vector v of a block, one shift and mask (or two shifts, signed) of the
// words, is LANES consecutive weights: x needs no reordering, and since group_size is a multiple
// of LANES each vector lies in one group and is dequantized with one scale in registers. Rows
// are padded with zero words to whole blocks.

// float16 bits -> float32: one instruction where the compiler has F16C or Arm's __fp16;
// elsewhere exact by shifting the exponent and mantissa into place and scaling by 2^112 (which
// also makes half-precision subnormals normal). Infinities and NaNs do not occur in scales.
inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(__ARM_FP16_FORMAT_IEEE) || defined(__aarch64__)
    __fp16 value;
    memcpy(&value, &h, sizeof value);
    return float(value);
#else
    const uint32_t bits = uint32_t(h & 0x7fffu) << 13;
    float magnitude;
    memcpy(&magnitude, &bits, sizeof magnitude);
    magnitude *= 5.192296858534828e33f;  // 2^112
    return (h & 0x8000u) ? -magnitude : magnitude;
#endif
}

// float16 bits -> float32, a vector at a time (LANES halves): the same exactness as
// half_to_float, in four vector operations on every instruction set.
inline Floats halves_to_floats(const uint16_t* p, int64_t count) {
    Halves halves = {};
    memcpy(&halves, p, std::min<int64_t>(count, LANES) * sizeof(uint16_t));
    const Words h = __builtin_convertvector(halves, Words);
    const Floats magnitude = bits_to_floats((h & 0x7fffu) << 13) * 5.192296858534828e33f;  // 2^112
    return bits_to_floats(floats_to_bits(magnitude) | ((h & 0x8000u) << 16));
}

template <int BITS>
struct Grouped {
    static constexpr int ELEMENTS = 32 / BITS;  // weights per word, vectors per block
    static constexpr int BLOCK = ELEMENTS * LANES;
    static constexpr bool OFFSETS = BITS == 4;  // 4 bits: unsigned with an offset; 8: signed
    static Floats element(Words words, int v) {
        if constexpr (BITS == 4) {
            // Signed: a conversion from unsigned lanes is several instructions below AVX-512.
            return __builtin_convertvector((Ints)((words >> (4 * v)) & 0xfu), Floats);
        } else {
            return __builtin_convertvector(((Ints)words << (24 - 8 * v)) >> 24, Floats);
        }
    }
};

// The per-call data of a grouped GEMV: x widened to float32 (natural order, rows k_pad apart,
// zero beyond k) and, for weights with offsets, each group's sum of x (rows `groups` apart):
// sum over a group of (q * scale + offset) * x = scale * sum(q * x) + offset * sum(x), so the
// offsets cost one product per group, not one per weight.
struct GroupedInput {
    const float* xf;
    const float* group_sums;
    int64_t k_pad, groups;
};

// R rows of grouped weights against M rows of x. The integers times x accumulate per group in
// `partial`; at each group's end it is scaled into `acc` (one multiply-add per group instead of
// dequantizing every weight). The rows' scales are widened first, a vector at a time.
template <int BITS, int GROUP, int R, int M>
inline void grouped_tile(const GroupedInput& in, const uint32_t* w, int64_t row_words, const uint16_t* scales,
                         const uint16_t* offsets, float* out /* M x R */, float* row_scales /* R x groups */) {
    using G = Grouped<BITS>;
    constexpr int VECTORS_PER_GROUP = GROUP / LANES;
    const int64_t groups = in.groups, k_pad = in.k_pad;
    for (int r = 0; r < R; ++r)
        over_vectors(groups, [&](int64_t g, int64_t count) {
            store(row_scales + r * groups + g, halves_to_floats(scales + r * groups + g, count), count);
        });
    Floats acc[R][M], partial[R][M];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) acc[r][m] = partial[r][m] = Floats{};
    auto flush = [&](int64_t group) {
        for (int r = 0; r < R; ++r) {
            const Floats scale = splat(row_scales[r * groups + group]);
            for (int m = 0; m < M; ++m) {
                acc[r][m] += partial[r][m] * scale;
                partial[r][m] = Floats{};
            }
        }
    };
    // Where groups end, known at compile time: after every VECTORS_PER_GROUP vectors of a block,
    // or after every BLOCKS_PER_GROUP blocks when a group spans several. Padding past the last
    // group (x is zero there) is flushed into the last group.
    constexpr int BLOCKS_PER_GROUP = std::max(1, VECTORS_PER_GROUP / G::ELEMENTS);
    for (int64_t j = 0, block = 0; j < k_pad; j += G::BLOCK, ++block) {
        Words words[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const uint32_t* row = w + r * row_words + j / G::ELEMENTS;
            __builtin_prefetch((const char*)row + PREFETCH_BYTES, 0, 2);
            memcpy(&words[r], row, sizeof words[r]);
        }
#pragma GCC unroll 8
        for (int v = 0; v < G::ELEMENTS; ++v) {
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                const Floats q = G::element(words[r], v);
#pragma GCC unroll 8
                for (int m = 0; m < M; ++m) partial[r][m] += q * Element<float>::load(in.xf + m * k_pad + j + v * LANES);
            }
            if constexpr (VECTORS_PER_GROUP <= G::ELEMENTS) {
                if ((v + 1) % VECTORS_PER_GROUP == 0)
                    flush(std::min<int64_t>((j + v * LANES) / GROUP, groups - 1));
            }
        }
        if constexpr (VECTORS_PER_GROUP > G::ELEMENTS) {
            if ((block + 1) % BLOCKS_PER_GROUP == 0 || j + G::BLOCK >= k_pad)
                flush(std::min<int64_t>(j / GROUP, groups - 1));
        }
    }
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) {
            float total = horizontal_sum(acc[r][m]);
            if constexpr (G::OFFSETS) {
                Floats sum = {};
                over_vectors(groups, [&](int64_t g, int64_t count) {
                    sum += halves_to_floats(offsets + r * groups + g, count) *
                           load(in.group_sums + m * groups + g, count);
                });
                total += horizontal_sum(sum);
            }
            out[m * R + r] = total;
        }
}

template <typename T, int BITS, int GROUP, int M>
void grouped_tiles(const GroupedInput& in, const uint32_t* w, const uint16_t* scales, const uint16_t* offsets,
                   const T* bias, T* y, int64_t n, int64_t k) {
    using E = Element<T>;
    constexpr int R = std::max(1, std::min(4, ACCUMULATORS / (2 * M)));  // acc and partial per row and x row
    const int64_t row_words = (k + Grouped<BITS>::BLOCK - 1) / Grouped<BITS>::BLOCK * Grouped<BITS>::BLOCK /
                              Grouped<BITS>::ELEMENTS;
    const int64_t groups = in.groups;
    const int64_t tiles = (n + R - 1) / R;
    std::vector<float> row_scales(R * groups + LANES);
#pragma omp for schedule(guided)
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t n0 = t * R;
        float out[M * R];
        const int width = n0 + R <= n ? R : 1;  // a last, partial tile goes one row at a time
        for (int64_t r0 = n0; r0 < n0 + R && r0 < n; r0 += width) {
            const uint16_t* row_offsets = offsets ? offsets + r0 * groups : nullptr;
            if (width == R)
                grouped_tile<BITS, GROUP, R, M>(in, w + r0 * row_words, row_words, scales + r0 * groups, row_offsets,
                                                out, row_scales.data());
            else
                grouped_tile<BITS, GROUP, 1, M>(in, w + r0 * row_words, row_words, scales + r0 * groups, row_offsets,
                                                out, row_scales.data());
            for (int r = 0; r < width; ++r) {
                const float b = bias ? E::to_float(bias[r0 + r]) : 0.0f;
                for (int m = 0; m < M; ++m) y[m * n + r0 + r] = E::from_float(out[m * width + r] + b);
            }
        }
    }
}

template <typename T, int BITS, int GROUP>
void grouped_gemv_team(const GroupedInput& in, int64_t m, const uint32_t* w, const uint16_t* scales,
                       const uint16_t* offsets, const T* bias, T* y, int64_t n, int64_t k) {
    switch (m) {
#define LLAMA3_DIST_GROUPED_CASE(M) \
    case M: grouped_tiles<T, BITS, GROUP, M>(in, w, scales, offsets, bias, y, n, k); break;
        LLAMA3_DIST_GROUPED_CASE(1)
        LLAMA3_DIST_GROUPED_CASE(2)
        LLAMA3_DIST_GROUPED_CASE(3)
        LLAMA3_DIST_GROUPED_CASE(4)
        LLAMA3_DIST_GROUPED_CASE(5)
        LLAMA3_DIST_GROUPED_CASE(6)
        LLAMA3_DIST_GROUPED_CASE(7)
        default: grouped_tiles<T, BITS, GROUP, 8>(in, w, scales, offsets, bias, y, n, k);
#undef LLAMA3_DIST_GROUPED_CASE
    }
}

// y [m, n] = x [m, k] @ dequantized(w).T + bias, m from 1 to GEMV_MAX_ROWS, group_size 32 or 128.
// Returns -1 for arguments out of range.
template <typename T, int BITS>
int grouped_gemv(const T* x, const uint32_t* w, const uint16_t* scales, const uint16_t* offsets, const T* bias, T* y,
                 int64_t m, int64_t n, int64_t k, int64_t group_size) {
    if (m < 1 || m > GEMV_MAX_ROWS || (group_size != 32 && group_size != 128) || group_size % LANES) return -1;
    if (Grouped<BITS>::OFFSETS && !offsets) return -1;
    const int64_t k_pad = padded_width(k), groups = (k + group_size - 1) / group_size;
    std::vector<float> xf(m * k_pad), group_sums(m * groups);
    const GroupedInput in{xf.data(), group_sums.data(), k_pad, groups};
#pragma omp parallel
    {
#pragma omp single
        {
            widen_rows<T, float>(x, m, k, xf.data());
            if (Grouped<BITS>::OFFSETS)
                for (int64_t row = 0; row < m; ++row)
                    for (int64_t g = 0; g < groups; ++g) {
                        Floats sum = {};
                        for (int64_t j = g * group_size; j < std::min((g + 1) * group_size, k_pad); j += LANES)
                            sum += Element<float>::load(xf.data() + row * k_pad + j);
                        group_sums[row * groups + g] = horizontal_sum(sum);
                    }
        }
        if (group_size == 32)
            grouped_gemv_team<T, BITS, 32>(in, m, w, scales, offsets, bias, y, n, k);
        else
            grouped_gemv_team<T, BITS, 128>(in, m, w, scales, offsets, bias, y, n, k);
    }
    return 0;
}

// --- 4-bit weights times 8-bit activations (bfloat16 models) -----------------------------------
// Dequantizing each weight to float costs several vector instructions per LANES weights, which
// bounds the float GEMV above by compute, not by memory. As llama.cpp does, x is quantized too,
// to int8 in blocks of 32 (a float scale each), and the integers multiply-add four bytes at a
// time per 32-bit lane (AVX-512 VNNI's vpdpbusd; pmaddubsw + pmaddwd on AVX2 and AVX-512BW;
// NEON's sdot; plain vector code elsewhere), so the float work is per block of 32, not per
// weight. The result differs from the dequantized product by x's rounding (about 2^-8
// relative per block), so float32 models keep the float GEMV above and this one serves
// bfloat16 models, whose own rounding is of that order.
//
// Panel layout (cpu.py's pack_grouped with panels=True): rows in panels of LANES (the last one
// padded with zero rows), k in blocks of 32. For panel p and block b, 4 vectors c = 0..3 of
// LANES words: lane l of vector c is row l's elements 4c..4c+3 (low nibbles of its 4 bytes)
// and 16+4c..16+4c+3 (high nibbles). Scales and offsets as float16 [panels, groups, LANES]; 4-bit
// panels without offsets are symmetric (Q4_0's w = (q - 8) * scale: 2 bytes a group less to read).
//
// Coded 4-bit panels (factors given; our int4, reference.quantize_int4): scales holds a uint16 per
// group and lane, the scale's code (uint8, the low byte) and the offset's (int8, the high byte),
// and factors bfloat16 [panels, factor blocks, 2, LANES] a scale factor and an offset factor per
// FACTOR_GROUPS groups: scale = code * the first, offset = code * the second (each product a
// float16 exactly, the reference's value). bfloat16 factors widen with a shift; float16 ones
// would mostly be subnormal, which x86 CPUs widen through a microcode assist (2x slower decode).
// 2 bytes a group and 4 per 8 groups instead of 4 a group: 4.625 bits a weight instead of 5,
// which is what a decode step reads.
//
// 6-bit panels (the LM head of int4 models: symmetric, w = (u - 32) * scale, u in 0..63, float16
// scales): per panel and block 6 vectors, c = 0..3 the low 4 bits of u as the 4-bit layout's
// nibbles, then 2 of the high 2 bits: lane l of vector 4 + h holds, in bits 2c..2c+1 of byte j,
// those of row l's element 16h + 4c + j (the element of byte j's nibble h in vector c). 6.5
// bits a weight with the scales, against 8.5 for 8 bits.
constexpr int64_t FACTOR_GROUPS = 8;

// A coded group's code pairs for the LANES rows of a panel (see above): lane l holds row l's
// scale code in its low byte and its offset code in the next.
inline Words group_code_words(const uint16_t* codes) {
    Halves packed;
    memcpy(&packed, codes, sizeof packed);
    return __builtin_convertvector(packed, Words);
}

inline Floats offset_codes(Words code) { return __builtin_convertvector(((Ints)(code << 16)) >> 24, Floats); }

// The scale and offset factors of the run of FACTOR_GROUPS groups that group g of a panel starts.
inline void load_run_factors(const uint16_t* factors, int64_t panel, int64_t g, int64_t groups,
                             Floats& scale_factors, Floats& offset_factors) {
    const int64_t factor_blocks = (groups + FACTOR_GROUPS - 1) / FACTOR_GROUPS;
    const uint16_t* run = factors + (panel * factor_blocks + g / FACTOR_GROUPS) * 2 * LANES;
    scale_factors = Element<bfloat16>::load(run);
    offset_factors = Element<bfloat16>::load(run + LANES);
}

// A group's scales and offsets for the LANES rows of a panel.
struct GroupScales {
    Floats scales, offsets;
};

// Each group's scales and offsets as floats, for the panel walk (over_panels): from float16
// scales (and offsets, or none: zero) or from coded ones, whose run's factors are loaded at the
// run's first group (the groups of a panel go in order).
struct PanelScales {
    const uint16_t *scales, *offsets, *factors;
    int64_t groups;
    Floats scale_factors = Floats{}, offset_factors = Floats{};

    __attribute__((always_inline)) GroupScales operator()(int64_t panel, int64_t g) {
        const int64_t at = (panel * groups + g) * LANES;
        if (factors) {
            if (g % FACTOR_GROUPS == 0) load_run_factors(factors, panel, g, groups, scale_factors, offset_factors);
            const Words code = group_code_words(scales + at);
            return {__builtin_convertvector((Ints)(code & 0xffu), Floats) * scale_factors,
                    offset_codes(code) * offset_factors};
        }
        return {halves_to_floats(scales + at, LANES), offsets ? halves_to_floats(offsets + at, LANES) : Floats{}};
    }
};

// acc + the sum of 4 products per 32-bit lane: unsigned bytes of u (at most 63 here) times the
// signed bytes of x4 (the same 4 in every lane).
inline Ints dot4(Ints acc, Words u, int32_t x4) {
#if VECTOR_BYTES == 64 && defined(__AVX512VNNI__)
    return (Ints)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)u, _mm512_set1_epi32(x4));
#elif VECTOR_BYTES == 64 && defined(__AVX512BW__)
    const __m512i pairs = _mm512_maddubs_epi16((__m512i)u, _mm512_set1_epi32(x4));  // no overflow: 2*63*128
    return acc + (Ints)_mm512_madd_epi16(pairs, _mm512_set1_epi16(1));
#elif VECTOR_BYTES == 32 && defined(__AVX2__)
    const __m256i pairs = _mm256_maddubs_epi16((__m256i)u, _mm256_set1_epi32(x4));
    return acc + (Ints)_mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#elif VECTOR_BYTES == 16 && defined(__ARM_FEATURE_DOTPROD)
    return (Ints)vdotq_s32((int32x4_t)acc, (int8x16_t)u, vreinterpretq_s8_s32(vdupq_n_s32(x4)));
#else
    for (int j = 0; j < 4; ++j) acc += (Ints)((u >> (8 * j)) & 0xffu) * int32_t(int8_t(uint32_t(x4) >> (8 * j)));
    return acc;
#endif
}

// AVX2 has no byte dot product into 32 bits: dot4 is pmaddubsw (byte pairs into 16 bits), then
// pmaddwd by ones (into 32) and an add. For 4-bit weights a block's 8 pmaddubsw results fit in 16
// bits together (each pair at most 2 * 15 * 127 = 3810, 8 of them 30480 < 2^15), so they are
// summed as 16-bit lanes and widened once a block: 8 pmaddwd and 7 adds fewer per block, and the
// 4-bit GEMV was bound by these instructions on a Zen 3 core (not by memory: it scaled 2x from
// one thread to two).
#if VECTOR_BYTES == 32 && defined(__AVX2__)
constexpr bool PAIR_SUMS = true;
typedef int16_t Pairs __attribute__((vector_size(VECTOR_BYTES)));
// The 16-bit pair sums of unsigned bytes of u (at most 15) times the signed bytes of x4.
inline Pairs pair_sums(Words u, int32_t x4) {
    return (Pairs)_mm256_maddubs_epi16((__m256i)u, _mm256_set1_epi32(x4));
}
// Each 32-bit lane's two 16-bit sums added.
inline Ints widen_pairs(Pairs p) { return (Ints)_mm256_madd_epi16((__m256i)p, _mm256_set1_epi16(1)); }
// Each 32-bit lane's two 16-bit sums times the lane's two 16-bit factors, added: the same
// instruction as widen_pairs, so a coded group's integer scale multiplies for free.
inline Ints scaled_pairs(Pairs p, Ints factor_pairs) { return (Ints)_mm256_madd_epi16((__m256i)p, (__m256i)factor_pairs); }
#else
constexpr bool PAIR_SUMS = false;
typedef int16_t Pairs __attribute__((vector_size(VECTOR_BYTES)));
inline Pairs pair_sums(Words, int32_t) { return Pairs{}; }
inline Ints widen_pairs(Pairs) { return Ints{}; }
inline Ints scaled_pairs(Pairs, Ints) { return Ints{}; }
#endif

// acc + the sum of 4 products per 32-bit lane of signed bytes of w and x4 (8-bit weights).
// VNNI multiplies unsigned by signed bytes: w + 128 (a flipped sign bit) times x, which counts
// 128 * (x's 4 bytes) too much; SIGNED_DOT4_EXCESS says so, and the caller subtracts 128 times
// the block's sum of x. pmaddubsw takes |w| times x with w's sign (its pair sums stay below
// 2^15 that way).
#if VECTOR_BYTES == 64 && defined(__AVX512VNNI__)
constexpr bool SIGNED_DOT4_EXCESS = true;
#else
constexpr bool SIGNED_DOT4_EXCESS = false;
#endif
inline Ints dot4_signed(Ints acc, Words w, int32_t x4) {
#if VECTOR_BYTES == 64 && defined(__AVX512VNNI__)
    return (Ints)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)(w ^ 0x80808080u), _mm512_set1_epi32(x4));
#elif VECTOR_BYTES == 64 && defined(__AVX512BW__)
    const __m512i x = _mm512_set1_epi32(x4);
    const __m512i signed_x = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask((__m512i)w), _mm512_setzero_si512(), x);
    const __m512i pairs = _mm512_maddubs_epi16(_mm512_abs_epi8((__m512i)w), signed_x);
    return acc + (Ints)_mm512_madd_epi16(pairs, _mm512_set1_epi16(1));
#elif VECTOR_BYTES == 32 && defined(__AVX2__)
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8((__m256i)w), _mm256_sign_epi8(_mm256_set1_epi32(x4), (__m256i)w));
    return acc + (Ints)_mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#elif VECTOR_BYTES == 16 && defined(__ARM_FEATURE_DOTPROD)
    return (Ints)vdotq_s32((int32x4_t)acc, (int8x16_t)w, vreinterpretq_s8_s32(vdupq_n_s32(x4)));
#else
    for (int j = 0; j < 4; ++j)
        acc += (((Ints)w << (24 - 8 * j)) >> 24) * int32_t(int8_t(uint32_t(x4) >> (8 * j)));
    return acc;
#endif
}

// x [m, k] quantized per block of 32: xq (int8, blocks * 32 per row, zero-padded), dx (the
// blocks' scales, max|x| / 127), and each weight group's sum of the quantized x (for the
// offsets: a weight is q * scale + offset, and its error from x's rounding is w times that
// rounding only if both terms see the same x; with the exact sum of x in the offset term, the
// q * scale term's error, up to twice w's, would be left uncancelled).
//
// DIGITS 2 (the LM head, whose logits decide the token): x to 15 bits per block, as two int8
// digits, x = dx * (128 * xq + xq_low) with xq in [-127, 127] and xq_low in [-64, 64]: the
// same byte dot products twice, and x's rounding about 2^-15 of the block's largest value
// instead of 2^-8 (int8 rounding flips near-tied logits; this is below bfloat16's own).
constexpr float DIGIT_RANGE[3] = {0.0f, 127.0f, 127.0f * 128.0f};

// Each lane rounded to the nearest integer, ties to even: nearbyintf's result in the default
// rounding mode, a vector at a time (the conversions below use that mode).
inline Ints round_to_ints(Floats v) {
#if VECTOR_BYTES == 64 && defined(__AVX512F__)
    return (Ints)_mm512_cvtps_epi32((__m512)v);
#elif VECTOR_BYTES == 32 && defined(__AVX2__)
    return (Ints)_mm256_cvtps_epi32((__m256)v);
#elif VECTOR_BYTES == 16 && defined(__ARM_FEATURE_DOTPROD)
    return (Ints)vcvtnq_s32_f32((float32x4_t)v);
#else
    Ints rounded;
    for (int i = 0; i < LANES; ++i) rounded[i] = int32_t(nearbyintf(v[i]));
    return rounded;
#endif
}

typedef int8_t LaneInt8s __attribute__((vector_size(LANES)));  // an int8 per float32 lane

inline int32_t lane_total(Ints v) {
    int32_t total = 0;
    for (int i = 0; i < LANES; ++i) total += v[i];
    return total;
}

// Rows of x laid out for tiles of `group` rows (the GEMVs' groups of rows), each row `length`
// elements, the same element of a group's rows side by side: element e of row i at (i / group *
// length + e) * group + i % group. A tile of the rows from `first` (a multiple of group) reads
// element e of its row m at at(first, e) + m, from one pointer at constant offsets, where a
// pointer a row took the registers and GCC kept them on the stack (350 stack references in the
// integer GEMV's 8-row tile, ~1200 in the 8-bit exact one). A group of one row is row-major.
struct RowGroups {
    int64_t group, length;
    int64_t at(int64_t row, int64_t e) const { return (row / group * length + e) * group + row % group; }
};

// Rows [first_row, first_row + m) of x [*, k] for the integer GEMV's tiles of group_rows rows:
// each block of 32 as 8 runs of 4 bytes (RowGroups of the runs), its scale and sums per block
// (RowGroups of the blocks); group_sums [rows, groups] row-major.
// Runs once per projection of a decode step, so a vector at a time (one thread runs it while
// the others wait): each value's rounding is nearbyintf's, every sum an exact integer one.
template <typename T, int DIGITS>
void quantize_blocks(const T* x, int64_t first_row, int64_t m, int64_t k, int64_t group_rows, int64_t group_size,
                     int8_t* xq, int8_t* xq_low, float* dx, float* group_sums, int32_t* block_sums,
                     int32_t* low_block_sums) {
    constexpr int VECTORS = 32 / LANES;
    const int64_t groups = (k + group_size - 1) / group_size, blocks = (k + 31) / 32;
    const RowGroups runs{group_rows, blocks * 8}, per_block{group_rows, blocks};
    // a vector's LANES bytes, a run of 4 at a time, into their words
    const auto store_runs = [&](int8_t* to, int64_t row, int64_t b, int v, const LaneInt8s& bytes) {
        for (int run = 0; run < LANES / 4; ++run)
            memcpy(to + 4 * runs.at(row, b * 8 + v * LANES / 4 + run), reinterpret_cast<const int8_t*>(&bytes) + 4 * run,
                   4);
    };
    for (int64_t row = first_row; row < first_row + m; ++row) {
        for (int64_t g = 0; g < groups; ++g) group_sums[row * groups + g] = 0.0f;
        for (int64_t b = 0; b < blocks; ++b) {
            Floats values[VECTORS], magnitude = {};  // zero past k
            for (int v = 0; v < VECTORS; ++v) {
                const int64_t first = b * 32 + v * LANES;
                values[v] = first < k ? load(x + row * k + first, k - first) : Floats{};
                const Floats absolute = bits_to_floats(floats_to_bits(values[v]) & 0x7fffffffu);
                magnitude = absolute > magnitude ? absolute : magnitude;
            }
            const float largest = largest_lane(magnitude);
            const float range = DIGIT_RANGE[DIGITS];
            const float scale = largest / range, inverse = largest > 0.0f ? range / largest : 0.0f;
            dx[per_block.at(row, b)] = scale;
            // total: of the quantized x (a block lies in one group: groups are whole blocks);
            // with two digits, high_total and low_total: of each digit.
            Ints total = {}, high_total = {}, low_total = {};
            for (int v = 0; v < VECTORS; ++v) {
                const Ints q = round_to_ints(values[v] * inverse);
                if constexpr (DIGITS == 2) {
                    const Ints high = round_to_ints(__builtin_convertvector(q, Floats) / 128.0f);
                    store_runs(xq, row, b, v, __builtin_convertvector(high, LaneInt8s));
                    store_runs(xq_low, row, b, v, __builtin_convertvector(q - 128 * high, LaneInt8s));
                    high_total += high;
                    low_total += q - 128 * high;
                } else {
                    store_runs(xq, row, b, v, __builtin_convertvector(q, LaneInt8s));
                }
                total += q;
            }
            block_sums[per_block.at(row, b)] = lane_total(DIGITS == 2 ? high_total : total);
            if constexpr (DIGITS == 2) low_block_sums[per_block.at(row, b)] = lane_total(low_total);
            group_sums[row * groups + b * 32 / group_size] += float(lane_total(total)) * scale;
        }
    }
}

// Runs body(std::integral_constant<int, M>) for m rows of x, 1 .. GEMV_MAX_ROWS (M a
// compile-time constant, so each row's accumulators live in registers).
template <typename Body>
inline void with_rows(int64_t m, Body&& body) {
    with_constant<GEMV_MAX_ROWS>(m, body);
}

// The panel GEMVs take any number of rows up to GEMV_ANY_MAX_ROWS, in groups of at most
// GEMV_MAX_ROWS (each row's accumulators in registers): each panel's weights are read from
// memory once and, while they are in the core's cache, multiplied into every group in turn. A
// batch of 64 decode rows read the whole weight from memory 8 times in passes of 8 rows.

// The panel GEMVs' groups: as even as the groups allow (group_rows_of).
inline int64_t panel_group_rows(int64_t m) { return group_rows_of(m); }

// m rows padded to whole groups: the rows of x a panel GEMV's scratch holds.
inline int64_t panel_padded_rows(int64_t m) { return padded_rows(m, panel_group_rows(m)); }

// Whether a panel GEMV takes these arguments: 1 .. GEMV_ANY_MAX_ROWS rows, groups of whole blocks,
// offsets or coded factors (not both) for 4-bit panels only.
template <int BITS>
inline bool panel_arguments(int64_t m, int64_t group_size, const uint16_t* offsets, const uint16_t* factors) {
    return m >= 1 && m <= GEMV_ANY_MAX_ROWS && group_size >= 32 && group_size % 32 == 0 &&
           (BITS == 4 || (!offsets && !factors)) && !(factors && offsets);
}

// Row out_row of y [*, n]: a panel's LANES sums plus bias, the lanes past n dropped.
template <typename T>
inline void store_panel_row(const float* sums, int64_t panel, int64_t out_row, int64_t n, const T* bias, T* y) {
    using E = Element<T>;
    const int64_t lanes = std::min<int64_t>(LANES, n - panel * LANES);
    for (int64_t l = 0; l < lanes; ++l) {
        const int64_t row = panel * LANES + l;
        y[out_row * n + row] = E::from_float(sums[l] + (bias ? E::to_float(bias[row]) : 0.0f));
    }
}

// The walk both panel GEMVs share, by the threads of the enclosing parallel region: each panel
// (LANES rows) in turn and, for each group of M rows of x (from row `first`, padded: see
// panel_group_rows), its groups in order, each group's blocks of 32 (prefetched PREFETCH_BYTES
// ahead while the first group of rows reads them from memory). on_group(panel, g) gives group
// g's scales in the form the other two take (PanelScales: floats); on_block(acc, first, b,
// block, group) adds block b of the panel into the M rows' accumulators; on_group_end(acc,
// first, g, group) runs after a group's blocks; then the accumulators (plus bias) are the
// panel's rows of y [m, n] (the padding rows' are dropped).
template <typename T, int VECTORS, int M, typename OnGroup, typename OnBlock, typename OnGroupEnd>
__attribute__((always_inline)) inline void over_panels(const uint32_t* w, const T* bias, T* y, int64_t m, int64_t n,
                                                       int64_t k, int64_t group_size, OnGroup&& on_group,
                                                       OnBlock&& on_block, OnGroupEnd&& on_group_end) {
    const int64_t blocks = (k + 31) / 32, groups = (k + group_size - 1) / group_size;
    const int64_t panels = (n + LANES - 1) / LANES, blocks_per_group = group_size / 32;
#pragma omp for schedule(guided)
    for (int64_t panel = 0; panel < panels; ++panel) {
        const uint32_t* panel_words = w + panel * blocks * VECTORS * LANES;
        for (int64_t first = 0; first < m; first += M) {
            Floats acc[M];
            for (int r = 0; r < M; ++r) acc[r] = Floats{};
            for (int64_t g = 0; g < groups; ++g) {
                const auto group = on_group(panel, g);
                for (int64_t b = g * blocks_per_group; b < std::min(blocks, (g + 1) * blocks_per_group); ++b) {
                    const uint32_t* block = panel_words + b * VECTORS * LANES;
                    if (first == 0)
                        for (int line = 0; line < VECTORS * VECTOR_BYTES; line += CACHE_LINE)
                            __builtin_prefetch((const char*)block + PREFETCH_BYTES + line, 0, 2);
                    on_block(acc, first, b, block, group);
                }
                on_group_end(acc, first, g, group);
            }
            for (int r = 0; r < M && first + r < m; ++r) {
                float sums[LANES];
                memcpy(sums, &acc[r], sizeof sums);
                store_panel_row(sums, panel, first + r, n, bias, y);
            }
        }
    }
}

// Out of line (its callers are big: inlined into them the LM head's GEMV ran 2-5% slower).
template <typename T, int BITS, int DIGITS, int M>
__attribute__((noinline)) void panel_tiles(const int8_t* xq, const int8_t* xq_low, const float* dx, const float* group_sums,
                 const int32_t* block_sums, const int32_t* low_block_sums, const uint32_t* w,
                 const uint16_t* scales, const uint16_t* offsets, const uint16_t* factors, const T* bias, T* y,
                 int64_t rows, int64_t n, int64_t k, int64_t group_size) {
    static_assert(BITS != 6 || DIGITS == 2, "6-bit panels take x in two digits (the LM head's)");
    constexpr int VECTORS = BITS == 4 ? 4 : BITS == 6 ? 6 : 8;  // per block of 32 (see the layouts)
    const int64_t blocks = (k + 31) / 32, groups = (k + group_size - 1) / group_size;
    const bool offset_term = offsets || factors;
    // x as quantize_blocks lays it out for tiles of M rows: a block's per-row values from
    // at(first, b) on, its runs of 4 bytes from runs(first, b) (run s of row m at s * M + m)
    const RowGroups runs_of{M, blocks * 8}, per_block{M, blocks};
    const auto at = [&](int64_t first, int64_t b) { return per_block.at(first, b); };
    const auto runs = [&](const int8_t* bytes, int64_t first, int64_t b) {
        return reinterpret_cast<const int32_t*>(bytes) + runs_of.at(first, b * 8);
    };
    // 4 bits with PAIR_SUMS: each row's 16-bit pair sums of a block (see pair_sums)
    const auto nibble_pair_sums = [&](Pairs (&pairs)[M], int64_t first, int64_t b, const uint32_t* block)
                                      __attribute__((always_inline)) {
        for (int m = 0; m < M; ++m) pairs[m] = Pairs{};
        const int32_t* x4 = runs(xq, first, b);
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
            Words q;
            memcpy(&q, block + c * LANES, sizeof q);
            const Words low = q & 0x0f0f0f0fu, high = (q >> 4) & 0x0f0f0f0fu;
#pragma GCC unroll 8
            for (int m = 0; m < M; ++m) pairs[m] += pair_sums(low, x4[c * M + m]) + pair_sums(high, x4[(4 + c) * M + m]);
        }
    };
    if constexpr (BITS == 4 && PAIR_SUMS) {
        if (factors) {
            // Coded 4-bit panels: a run's products are summed in units of its factors, which
            // multiply once a run (FACTOR_GROUPS groups): the integer sums times the scale codes
            // in the instruction that widens the pair sums (scaled_pairs), the group sums of x
            // times the offset codes. A block then costs one float multiply-add, not a decoded
            // float scale per group and two products per block.
            Floats scale_factors = Floats{}, offset_factors = Floats{}, run_scaled[M], run_offsets[M];
            struct GroupCodes {
                Ints scale_pairs;  // the scale code in both 16-bit halves of each lane
                Floats offsets;    // the offset codes
            };
            const auto on_group = [&](int64_t panel, int64_t g) __attribute__((always_inline)) {
                if (g % FACTOR_GROUPS == 0) {
                    load_run_factors(factors, panel, g, groups, scale_factors, offset_factors);
                    for (int m = 0; m < M; ++m) run_scaled[m] = run_offsets[m] = Floats{};
                }
                const Words code = group_code_words(scales + (panel * groups + g) * LANES);
                const Words scale_code = code & 0xffu;
                return GroupCodes{(Ints)(scale_code | (scale_code << 16)), offset_codes(code)};
            };
            const auto on_block = [&](Floats (&)[M], int64_t first, int64_t b, const uint32_t* block,
                                      const GroupCodes& group) __attribute__((always_inline)) {
                Pairs pairs[M];
                nibble_pair_sums(pairs, first, b, block);
#pragma GCC unroll 8
                for (int m = 0; m < M; ++m)
                    run_scaled[m] += __builtin_convertvector(scaled_pairs(pairs[m], group.scale_pairs), Floats) *
                                     dx[at(first, b) + m];
            };
            const auto on_group_end = [&](Floats (&acc)[M], int64_t first, int64_t g, const GroupCodes& group)
                                          __attribute__((always_inline)) {
                for (int m = 0; m < M; ++m) run_offsets[m] += group.offsets * group_sums[(first + m) * groups + g];
                if ((g + 1) % FACTOR_GROUPS == 0 || g + 1 == groups)
                    for (int m = 0; m < M; ++m) acc[m] += run_scaled[m] * scale_factors + run_offsets[m] * offset_factors;
            };
            over_panels<T, VECTORS, M>(w, bias, y, rows, n, k, group_size, on_group, on_block, on_group_end);
            return;
        }
    }
    const auto on_block = [&](Floats (&acc)[M], int64_t first, int64_t b, const uint32_t* block,
                              const GroupScales& group) __attribute__((always_inline)) {
        const Floats weight_scales = group.scales;
        Ints sums[M], low_sums[M];
        for (int m = 0; m < M; ++m) sums[m] = low_sums[m] = Ints{};
        if constexpr (BITS == 4 && PAIR_SUMS) {
            Pairs pairs[M];
            nibble_pair_sums(pairs, first, b, block);
            for (int m = 0; m < M; ++m) sums[m] = widen_pairs(pairs[m]);
        } else if constexpr (BITS == 6) {
            Words high_bits[2];
            memcpy(&high_bits[0], block + 4 * LANES, sizeof(Words));
            memcpy(&high_bits[1], block + 5 * LANES, sizeof(Words));
            // With PAIR_SUMS, 16-bit pair sums are added up to where they could overflow: a
            // pair of u (at most 63) times x is at most 2 * 63 * 127 = 16002, so two of them
            // (one vector c) fit; times the second digit (at most 64 in size) 8064, so four
            // (two vectors). Exact integer sums either way: the same results.
            Pairs pairs[M], low_pairs[M];
            for (int m = 0; m < M; ++m) pairs[m] = low_pairs[m] = Pairs{};
            const int32_t *x4 = runs(xq, first, b), *low4 = runs(xq_low, first, b);
#pragma GCC unroll 4
            for (int c = 0; c < 4; ++c) {
                Words q;
                memcpy(&q, block + c * LANES, sizeof q);
                // bits 2c..2c+1 of each byte of the high bits, moved to bits 4..5
                const auto bits_45 = [c](Words h) {
                    return (c < 2 ? h << (4 - 2 * c) : h >> (2 * c - 4)) & 0x30303030u;
                };
                const Words low = (q & 0x0f0f0f0fu) | bits_45(high_bits[0]);
                const Words high = ((q >> 4) & 0x0f0f0f0fu) | bits_45(high_bits[1]);
#pragma GCC unroll 8
                for (int m = 0; m < M; ++m) {
                    const int32_t first_run = x4[c * M + m], second_run = x4[(4 + c) * M + m];
                    const int32_t first_low = low4[c * M + m], second_low = low4[(4 + c) * M + m];
                    if constexpr (PAIR_SUMS) {
                        sums[m] += widen_pairs(pair_sums(low, first_run) + pair_sums(high, second_run));
                        if constexpr (DIGITS == 2) {
                            low_pairs[m] += pair_sums(low, first_low) + pair_sums(high, second_low);
                            if (c % 2 == 1) {
                                low_sums[m] += widen_pairs(low_pairs[m]);
                                low_pairs[m] = Pairs{};
                            }
                        }
                    } else {
                        sums[m] = dot4(dot4(sums[m], low, first_run), high, second_run);
                        if constexpr (DIGITS == 2)
                            low_sums[m] = dot4(dot4(low_sums[m], low, first_low), high, second_low);
                    }
                }
            }
            // u - 32: the 32s' share, per digit
            for (int m = 0; m < M; ++m) {
                sums[m] -= 32 * block_sums[at(first, b) + m];
                if constexpr (DIGITS == 2) low_sums[m] -= 32 * low_block_sums[at(first, b) + m];
            }
        } else {
            const int32_t *x4 = runs(xq, first, b), *low4 = runs(xq_low, first, b);
#pragma GCC unroll 8
            for (int c = 0; c < VECTORS; ++c) {
                Words q;
                memcpy(&q, block + c * LANES, sizeof q);
                if constexpr (BITS == 4) {
                    const Words low = q & 0x0f0f0f0fu, high = (q >> 4) & 0x0f0f0f0fu;
#pragma GCC unroll 8
                    for (int m = 0; m < M; ++m) sums[m] = dot4(dot4(sums[m], low, x4[c * M + m]), high, x4[(4 + c) * M + m]);
                } else {
#pragma GCC unroll 8
                    for (int m = 0; m < M; ++m) {
                        sums[m] = dot4_signed(sums[m], q, x4[c * M + m]);
                        if constexpr (DIGITS == 2) low_sums[m] = dot4_signed(low_sums[m], q, low4[c * M + m]);
                    }
                }
            }
        }
        if constexpr (BITS == 8 && SIGNED_DOT4_EXCESS) {
            for (int m = 0; m < M; ++m) {
                sums[m] -= 128 * block_sums[at(first, b) + m];
                if constexpr (DIGITS == 2) low_sums[m] -= 128 * low_block_sums[at(first, b) + m];
            }
        }
        // Symmetric 4 bits (Q4_0: w = (q - 8) * scale, no offsets stored): the 8s' share.
        if constexpr (BITS == 4)
            if (!offset_term)
                for (int m = 0; m < M; ++m) sums[m] -= 8 * block_sums[at(first, b) + m];
        // |high digits' sum| <= 32 * 127 * 127, so 128 times it stays far inside int32.
        if constexpr (DIGITS == 2)
            for (int m = 0; m < M; ++m) sums[m] = sums[m] * 128 + low_sums[m];
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m)
            acc[m] += __builtin_convertvector(sums[m], Floats) * (weight_scales * dx[at(first, b) + m]);
    };
    const auto on_group_end = [&](Floats (&acc)[M], int64_t first, int64_t g, const GroupScales& group)
                                  __attribute__((always_inline)) {
        if (offset_term)
            for (int m = 0; m < M; ++m) acc[m] += group.offsets * group_sums[(first + m) * groups + g];
    };
    over_panels<T, VECTORS, M>(w, bias, y, rows, n, k, group_size, PanelScales{scales, offsets, factors, groups}, on_block,
                               on_group_end);
}

// Scratch of the integer GEMV for m rows of x of up to k features: x in int8 blocks, their
// scales, each group's sum; zero (so are the padding rows of a last group of rows, which
// quantize_blocks never writes).
struct PanelScratch {
    std::vector<int8_t> xq, xq_low;  // xq_low: the second digits (DIGITS 2 only)
    std::vector<float> dx, group_sums;
    std::vector<int32_t> block_sums, low_block_sums;  // each block's sum of xq (of xq_low)
    PanelScratch(int64_t m, int64_t k, int digits = 1)
        : xq(panel_padded_rows(m) * ((k + 31) / 32) * 32),
          xq_low(digits == 2 ? xq.size() : 0),
          dx(panel_padded_rows(m) * ((k + 31) / 32)),
          group_sums(dx.size()),
          block_sums(dx.size()),
          low_block_sums(digits == 2 ? block_sums.size() : 0) {}
};

// The integer GEMV by the threads of an enclosing parallel region (or the calling thread).
template <typename T, int BITS, int DIGITS = 1>
void panel_team(const T* x, int64_t m, const uint32_t* w, const uint16_t* scales, const uint16_t* offsets,
                const uint16_t* factors, const T* bias, T* y, int64_t n, int64_t k, int64_t group_size, PanelScratch& scratch,
                const NormFirst<T>* norm = nullptr) {
    int8_t *xq = scratch.xq.data(), *xq_low = scratch.xq_low.data();
    float *dx = scratch.dx.data(), *group_sums = scratch.group_sums.data();
    int32_t *block_sums = scratch.block_sums.data(), *low_block_sums = scratch.low_block_sums.data();
    const int64_t group_rows = panel_group_rows(m);
    if (m > GEMV_MAX_ROWS) {
        // Many rows: each thread norms and quantizes rows of its own (in one thread's single
        // section, this was ~8% of a 64-row step while the other thread waited).
#pragma omp for schedule(static)
        for (int64_t row = 0; row < m; ++row) {
            if (norm) norm->run_rows(row, 1);
            quantize_blocks<T, DIGITS>(x, row, 1, k, group_rows, group_size, xq, xq_low, dx, group_sums,
                                       block_sums, low_block_sums);
        }
    } else {
#pragma omp single
        {
            if (norm) norm->run(m);
            quantize_blocks<T, DIGITS>(x, 0, m, k, group_rows, group_size, xq, xq_low, dx, group_sums,
                                       block_sums, low_block_sums);
        }
    }
    with_rows(panel_group_rows(m), [&](auto rows) {
        panel_tiles<T, BITS, DIGITS, rows()>(xq, xq_low, dx, group_sums, block_sums, low_block_sums, w, scales,
                                             offsets, factors, bias, y, m, n, k, group_size);
    });
}

// y [m, n] = x [m, k] @ w.T + bias for 4- or 8-bit panel weights, x quantized to int8 per block
// of 32; m from 1 to GEMV_ANY_MAX_ROWS, group_size a multiple of 32. Returns -1 for arguments out of
// range.
template <typename T, int BITS, int DIGITS = 1>
int panel_gemv(const T* x, const uint32_t* w, const uint16_t* scales, const uint16_t* offsets,
               const uint16_t* factors, const T* bias, T* y, int64_t m, int64_t n, int64_t k, int64_t group_size) {
    if (!panel_arguments<BITS>(m, group_size, offsets, factors)) return -1;
    PanelScratch scratch(m, k, DIGITS);
#pragma omp parallel
    panel_team<T, BITS, DIGITS>(x, m, w, scales, offsets, factors, bias, y, n, k, group_size, scratch);
    return 0;
}

// Rows [first, first + count) of x [*, k] widened to float32 for panel_exact_tiles' tiles of
// group_rows rows (RowGroups of padded_width(k) values, zero beyond k).
template <typename T>
void exact_rows(const T* x, int64_t first, int64_t count, int64_t k, int64_t group_rows, float* xf) {
    using E = Element<T>;
    const int64_t k_pad = padded_width(k);
    for (int64_t row = first; row < first + count; ++row) {
        float* to = xf + RowGroups{group_rows, k_pad}.at(row, 0);
        for (int64_t e = 0; e < k_pad; ++e) to[e * group_rows] = e < k ? E::to_float(x[row * k + e]) : 0.0f;
    }
}

// Prompt rows against 4- or 8-bit panels (bfloat16 models): x exact in float32, never rounded
// to int8 (cpu.py's decode_rows says why), and each weight vector dequantized in registers,
// q * scale + offset for the LANES rows of its panel, then multiplied into every row of x. Reads
// the packed weights once per pass of up to GEMV_MAX_ROWS rows, where dequantizing the whole
// weight for a GEMM writes and reads 4 bytes a weight: a prompt of a few tokens (a chat turn
// after a cached prefix) runs at about a decode step's cost.
template <typename T, int BITS, int M>
void panel_exact_tiles(const float* xf, int64_t k_pad, const uint32_t* w, const uint16_t* scales,
                       const uint16_t* offsets, const uint16_t* factors, const T* bias, T* y, int64_t rows, int64_t n,
                       int64_t k, int64_t group_size) {
    constexpr int VECTORS = BITS == 4 ? 4 : 8;  // per block of 32 (see the layouts)
    // Symmetric 4 bits (Q4_0, no offsets stored): w = (q - 8) * scale.
    const bool symmetric = BITS == 4 && !offsets && !factors;
    const auto on_block = [&](Floats (&acc)[M], int64_t first, int64_t b, const uint32_t* block,
                              const GroupScales& group) __attribute__((always_inline)) {
        const Floats weight_scales = group.scales;
        const Floats weight_offsets = symmetric ? weight_scales * -8.0f : group.offsets;
        // exact_rows' layout: the block's element e of the group's row m at e * M + m
        const float* x = xf + RowGroups{M, k_pad}.at(first, b * 32);
#pragma GCC unroll 2
        for (int c = 0; c < VECTORS; ++c) {
            Words q;
            memcpy(&q, block + c * LANES, sizeof q);
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) {
                // byte j of lane l: row l's element 4c + j (4 bits: its low nibble; the high
                // nibble is element 16 + 4c + j)
                if constexpr (BITS == 4) {
                    const Floats low = __builtin_convertvector((Ints)((q >> (8 * j)) & 0xfu), Floats);
                    const Floats high = __builtin_convertvector((Ints)((q >> (8 * j + 4)) & 0xfu), Floats);
                    const Floats low_w = low * weight_scales + weight_offsets;
                    const Floats high_w = high * weight_scales + weight_offsets;
#pragma GCC unroll 8
                    for (int m = 0; m < M; ++m)
                        acc[m] += low_w * x[(4 * c + j) * M + m] + high_w * x[(16 + 4 * c + j) * M + m];
                } else {
                    const Floats value = __builtin_convertvector(((Ints)q << (24 - 8 * j)) >> 24, Floats);
                    const Floats weight = value * weight_scales;
#pragma GCC unroll 8
                    for (int m = 0; m < M; ++m) acc[m] += weight * x[(4 * c + j) * M + m];
                }
            }
        }
    };
    const int64_t groups = (k + group_size - 1) / group_size;
    over_panels<T, VECTORS, M>(w, bias, y, rows, n, k, group_size, PanelScales{scales, offsets, factors, groups},
                               on_block, [](Floats (&)[M], int64_t, int64_t, const GroupScales&) {});
}

// 4-bit panels against bfloat16 prompt rows on CPUs with AVX-512 BF16 (Zen 4, Sapphire Rapids
// and later): vdpbf16ps multiplies a lane's pair of weights by a pair of x's values and adds both
// products into the lane's float32 sum. A weight goes in as 16 + q, which bfloat16 holds exactly
// (its 8 significant bits hold every integer up to 256) and which a shuffle and an or make of q
// (bfloat16 16.0 is 0x4180, 16 + q is 0x4180 | q << 3); x is the model's own bfloat16 values, so
// every product is exact in float32, as in the float path. A group's sum D = sum (16 + q) x then
// gives sum w x = scale * D + (offset - 16 * scale) * sum x (Q4_0's offset: -8 * scale). Where
// the float path spends a widening, a conversion and a multiply-add to dequantize each weight
// and a multiply-add per row of x, this spends a shuffle and an or per two weights and one
// instruction per row of x for both. The sums are float32 ones in another order; their terms
// are up to 31 |x| where the float path's are up to 15 |x| (times the scale): rounding far
// below the outputs' bfloat16 one. The instruction flushes denormal x to zero (~1e-38).
#if VECTOR_BYTES == 64 && defined(__AVX512BF16__)
constexpr bool BF16_DOT_PANELS = true;
#else
constexpr bool BF16_DOT_PANELS = false;
#endif

// Whether the exact-x panel GEMV of BITS-bit panels against rows of T takes the dot products.
template <typename T, int BITS>
constexpr bool exact_panels_by_dot() {
    return BF16_DOT_PANELS && BITS == 4 && std::is_same_v<T, bfloat16>;
}

// Rows [first, first + count) of x [m, k] for panel_dot_tiles' tiles of group_rows rows: as
// pairs of bfloat16 values (32 bits each; RowGroups of padded_width(k) / 2 pairs), zero beyond k;
// and each row's sum of each group of group_size values (sums [m, groups]).
template <typename T>
void bf16_pairs_with_sums(const T* x, int64_t first, int64_t count, int64_t k, int64_t group_rows,
                          int64_t group_size, uint32_t* pairs, float* sums) {
    const int64_t k_pad = padded_width(k), groups = (k + group_size - 1) / group_size;
    for (int64_t row = first; row < first + count; ++row) {
        const T* from = x + row * k;
        uint32_t* to = pairs + RowGroups{group_rows, k_pad / 2}.at(row, 0);
        for (int64_t t = 0; t < k_pad / 2; ++t) {
            const uint32_t low = 2 * t < k ? from[2 * t] : 0, high = 2 * t + 1 < k ? from[2 * t + 1] : 0;
            to[t * group_rows] = low | high << 16;
        }
        for (int64_t g = 0; g < groups; ++g) {
            Floats total = Floats{};
            over_vectors(std::min(group_size, k - g * group_size), [&](int64_t j, int64_t n) {
                total += load(from + g * group_size + j, n);
            });
            sums[row * groups + g] = horizontal_sum(total);
        }
    }
}

#if VECTOR_BYTES == 64 && defined(__AVX512BF16__)
// Rows [first, first + M) of x against P panels from `panel` on: each broadcast pair of x feeds
// the P panels' products (1536 x 576, 8 rows: one panel a step 72 us, two 67; x's pairs laid out
// for the tile then 57, the sums over groups in memory 52).
template <typename T, int M, int P>
__attribute__((always_inline)) inline void dot_panels(const uint32_t* xp, const float* x_sums, int64_t k_pad,
                                                      const uint32_t* w, PanelScales (&scales_of)[2], bool symmetric,
                                                      const T* bias, T* y, int64_t first, int64_t rows, int64_t panel,
                                                      int64_t n, int64_t k, int64_t group_size) {
    const int64_t blocks = (k + 31) / 32, groups = (k + group_size - 1) / group_size;
    const int64_t blocks_per_group = group_size / 32;
    // Bytes 2p and 2p + 1 of each 32-bit lane (a row's values 4c + 2p and 4c + 2p + 1, or 16 more
    // for the high nibbles), each into the low byte of a 16-bit half whose high byte is zeroed.
    const __m512i spread[2] = {_mm512_set4_epi32(0x800d800c, 0x80098008, 0x80058004, 0x80018000),
                               _mm512_set4_epi32(0x800f800e, 0x800b800a, 0x80078006, 0x80038002)};
    const __m512i nibble_bits = _mm512_set1_epi8(0x78), sixteen = _mm512_set1_epi16(0x4180);
    // The panels' sums over the groups so far, in memory: with the products' sums in registers
    // they would take every vector register (GCC then moves values between them).
    alignas(64) float acc[P][M][LANES] = {};
    for (int64_t g = 0; g < groups; ++g) {
        GroupScales group[P];
        for (int j = 0; j < P; ++j) group[j] = scales_of[j](panel + j, g);
        __m512 dots[P][M];
        for (int j = 0; j < P; ++j)
            for (int m = 0; m < M; ++m) dots[j][m] = _mm512_setzero_ps();
        for (int64_t b = g * blocks_per_group; b < std::min(blocks, (g + 1) * blocks_per_group); ++b) {
            const uint32_t* block[P];
            for (int j = 0; j < P; ++j) {
                block[j] = w + ((panel + j) * blocks + b) * 4 * LANES;
                if (first == 0)
                    for (int line = 0; line < 4 * VECTOR_BYTES; line += CACHE_LINE)
                        __builtin_prefetch((const char*)block[j] + PREFETCH_BYTES + line, 0, 2);
            }
            const uint32_t* x = xp + RowGroups{M, k_pad / 2}.at(first, b * 16);  // the block's 16 pairs
#pragma GCC unroll 4
            for (int c = 0; c < 4; ++c) {
                __m512i low[P], high[P];
                for (int j = 0; j < P; ++j) {
                    const __m512i q = _mm512_loadu_si512(block[j] + c * LANES);
                    // byte i of lane l: row l's values 4c + i (low nibble) and 16 + 4c + i, as q << 3
                    low[j] = _mm512_and_si512(_mm512_slli_epi32(q, 3), nibble_bits);
                    high[j] = _mm512_and_si512(_mm512_srli_epi32(q, 1), nibble_bits);
                }
#pragma GCC unroll 2
                for (int p = 0; p < 2; ++p) {
#pragma GCC unroll 2
                    for (int half = 0; half < 2; ++half) {
                        __m512bh weights[P];
                        for (int j = 0; j < P; ++j)
                            weights[j] = (__m512bh)_mm512_or_si512(
                                _mm512_shuffle_epi8(half ? high[j] : low[j], spread[p]), sixteen);
                        const int at = (half * 8 + 2 * c + p) * M;  // the pair of x's values they multiply
#pragma GCC unroll 8
                        for (int m = 0; m < M; ++m) {
                            const __m512bh xs = (__m512bh)_mm512_set1_epi32(int32_t(x[at + m]));
                            for (int j = 0; j < P; ++j) dots[j][m] = _mm512_dpbf16_ps(dots[j][m], weights[j], xs);
                        }
                    }
                }
            }
        }
        for (int j = 0; j < P; ++j) {
            const Floats scale = group[j].scales;
            const Floats offsets_less_16 = (symmetric ? scale * -8.0f : group[j].offsets) - 16.0f * scale;
#pragma GCC unroll 8
            for (int m = 0; m < M; ++m) {
                Floats sum;
                memcpy(&sum, acc[j][m], sizeof sum);
                sum += (Floats)dots[j][m] * scale + offsets_less_16 * x_sums[(first + m) * groups + g];
                memcpy(acc[j][m], &sum, sizeof sum);
            }
        }
    }
    for (int j = 0; j < P; ++j)
        for (int m = 0; m < M && first + m < rows; ++m) store_panel_row(acc[j][m], panel + j, first + m, n, bias, y);
}

template <typename T, int M>
void panel_dot_tiles(const uint32_t* xp, const float* x_sums, int64_t k_pad, const uint32_t* w,
                     const uint16_t* scales, const uint16_t* offsets, const uint16_t* factors, const T* bias, T* y,
                     int64_t rows, int64_t n, int64_t k, int64_t group_size) {
    const bool symmetric = !offsets && !factors;  // Q4_0: w = (q - 8) * scale
    const int64_t groups = (k + group_size - 1) / group_size, panels = (n + LANES - 1) / LANES;
    // Two panels a step, the last one alone where their number is odd.
#pragma omp for schedule(guided)
    for (int64_t pair = 0; pair < (panels + 1) / 2; ++pair) {
        const int64_t panel = 2 * pair;
        for (int64_t first = 0; first < rows; first += M) {
            // Each panel's own (coded scales keep their run's factors)
            PanelScales scales_of[2] = {{scales, offsets, factors, groups}, {scales, offsets, factors, groups}};
            if (panel + 1 < panels)
                dot_panels<T, M, 2>(xp, x_sums, k_pad, w, scales_of, symmetric, bias, y, first, rows, panel, n, k,
                                    group_size);
            else
                dot_panels<T, M, 1>(xp, x_sums, k_pad, w, scales_of, symmetric, bias, y, first, rows, panel, n, k,
                                    group_size);
        }
    }
}
#else
template <typename T, int M>
void panel_dot_tiles(const uint32_t*, const float*, int64_t, const uint32_t*, const uint16_t*, const uint16_t*,
                     const uint16_t*, const T*, T*, int64_t, int64_t, int64_t, int64_t) {}
#endif

// The exact-x panel GEMV by the threads of an enclosing parallel region, after norm where there
// is one (x is then its output): x widened to float32 once (exact_rows; xf: panel_padded_rows(m)
// rows of padded_width(k)), or for panel_dot_tiles as pairs of bfloat16 values there, each row's
// group sums after them (bf16_pairs_with_sums). Past GEMV_MAX_ROWS rows each thread prepares
// rows of its own.
template <typename T, int BITS>
void panel_exact_team(const T* x, int64_t m, const uint32_t* w, const uint16_t* scales, const uint16_t* offsets,
                      const uint16_t* factors, const T* bias, T* y, int64_t n, int64_t k, int64_t group_size,
                      float* xf, const NormFirst<T>* norm = nullptr) {
    constexpr bool by_dot = exact_panels_by_dot<T, BITS>();
    const int64_t k_pad = padded_width(k), groups = (k + group_size - 1) / group_size;
    uint32_t* xp = reinterpret_cast<uint32_t*>(xf);
    float* x_sums = xf + panel_padded_rows(m) * k_pad / 2;  // past the pairs
    const auto prepare = [&](int64_t first, int64_t count) {
        if (norm) norm->run_rows(first, count);
        if constexpr (by_dot)
            bf16_pairs_with_sums<T>(x, first, count, k, panel_group_rows(m), group_size, xp, x_sums);
        else
            exact_rows<T>(x, first, count, k, panel_group_rows(m), xf);
    };
    if (m > GEMV_MAX_ROWS) {
#pragma omp for schedule(static)
        for (int64_t row = 0; row < m; ++row) prepare(row, 1);
    } else {
#pragma omp single
        prepare(0, m);
    }
    with_rows(panel_group_rows(m), [&](auto rows) {
        if constexpr (by_dot)
            panel_dot_tiles<T, rows()>(xp, x_sums, k_pad, w, scales, offsets, factors, bias, y, m, n, k, group_size);
        else
            panel_exact_tiles<T, BITS, rows()>(xf, k_pad, w, scales, offsets, factors, bias, y, m, n, k, group_size);
    });
}

// y [m, n] = x [m, k] @ dequantized(w).T + bias, x exact (above); m from 1 to GEMV_ANY_MAX_ROWS.
// Returns -1 for arguments out of range.
template <typename T, int BITS>
int panel_exact_gemv(const T* x, const uint32_t* w, const uint16_t* scales, const uint16_t* offsets,
                     const uint16_t* factors, const T* bias, T* y, int64_t m, int64_t n, int64_t k,
                     int64_t group_size) {
    if (!panel_arguments<BITS>(m, group_size, offsets, factors)) return -1;
    std::vector<float> xf(panel_padded_rows(m) * padded_width(k));  // whole blocks of 32, zero past k and m
#pragma omp parallel
    panel_exact_team<T, BITS>(x, m, w, scales, offsets, factors, bias, y, n, k, group_size, xf.data());
    return 0;
}

// The dequantized weight [n, k] in T of panel weights, for products of many rows (prefill and
// batches past the GEMV's reach run it as a GEMM); each value q * scale + offset in float32,
// rounded once, as the reference's dequantize. A row's 32 weights of a block lie in VECTORS words
// LANES apart: their bytes, in the element order of the 8-bit form and, for 4 bits, elements
// 0-15 in the low nibbles and 16-31 in the high ones. So each row takes its block's bytes, and
// the arithmetic and the stores run over contiguous elements of the row (vectorised), the
// reads staying within the block's cache lines.
template <typename T, int BITS>
int panel_dequantize(const uint32_t* w, const uint16_t* scales, const uint16_t* offsets, const uint16_t* factors,
                     T* out, int64_t n, int64_t k, int64_t group_size) {
    constexpr int VECTORS = BITS == 4 ? 4 : 8;
    if (group_size < 32 || group_size % 32 || (factors && (offsets || BITS != 4))) return -1;
    const int64_t blocks = (k + 31) / 32, groups = (k + group_size - 1) / group_size;
    const int64_t factor_blocks = (groups + FACTOR_GROUPS - 1) / FACTOR_GROUPS;
    const int64_t panels = (n + LANES - 1) / LANES;
#pragma omp parallel for schedule(static)
    for (int64_t panel = 0; panel < panels; ++panel) {
        for (int64_t b = 0; b < blocks; ++b) {
            const uint32_t* block = w + (panel * blocks + b) * VECTORS * LANES;
            const int64_t g = b * 32 / group_size, first = b * 32, count = std::min<int64_t>(32, k - first);
            for (int lane = 0; lane < LANES && panel * LANES + lane < n; ++lane) {
                const int64_t row = panel * LANES + lane;
                const int64_t at = (panel * groups + g) * LANES + lane;
                float scale, offset;
                if (factors) {  // coded (see the layout above)
                    const uint16_t* factor = factors + (panel * factor_blocks + g / FACTOR_GROUPS) * 2 * LANES + lane;
                    scale = float(scales[at] & 0xffu) * Element<bfloat16>::to_float(factor[0]);
                    offset = float(int8_t(scales[at] >> 8)) * Element<bfloat16>::to_float(factor[LANES]);
                } else {
                    scale = half_to_float(scales[at]);
                    // Symmetric 4 bits (no offsets stored) are offset by -8 scales, as the reference's.
                    offset = offsets ? half_to_float(offsets[at]) : (BITS == 4 ? -8.0f * scale : 0.0f);
                }
                // The row's bytes of the block, 16 at a time, gathered into a register (the
                // words are LANES apart): 4 bits, elements 0-15 and 16-31 from the nibbles of one
                // such quad; 8 bits, elements 0-15 and 16-31 from two.
                const auto quad = [&](int h) {
                    const uint32_t* at = block + 4 * h * LANES + lane;
                    return Quad{at[0], at[LANES], at[2 * LANES], at[3 * LANES]};
                };
                const Quad first_quad = quad(0);
                for (int half = 0; half < 2; ++half) {
                    const Quad bytes = BITS == 4 || half == 0 ? first_quad : quad(1);
                    for (int u = 0; u < 16 && half * 16 + u < count; u += LANES) {  // LANES elements
                        const int64_t v = half * 16 + u;
                        Floats value;
                        LaneBytes q;
                        if constexpr (BITS == 4) {
                            // The high nibbles shifted down in 32-bit lanes: AVX2 has no byte shift,
                            // and GCC 12 turns one on LaneBytes into a scalar loop (2x slower a
                            // weight); the mask on the bytes keeps the widening one vpmovzxbd.
                            const Quad shifted = half == 0 ? bytes : bytes >> 4;
                            memcpy(&q, reinterpret_cast<const uint8_t*>(&shifted) + u, sizeof q);
                            q &= 0xf;
                            value = __builtin_convertvector(__builtin_convertvector(q, Ints), Floats) * scale + offset;
                        } else {
                            memcpy(&q, reinterpret_cast<const uint8_t*>(&bytes) + u, sizeof q);
                            // Signed bytes offset to unsigned (a flipped sign bit), widened, and the
                            // offset taken back: GCC 12 turns the conversion of the bytes as loaded
                            // into 16 scalar extractions (this loop ran 5x slower per weight than
                            // the 4-bit one); after a vector operation it is one vpmovzxbd.
                            const Ints widened = __builtin_convertvector(q ^ 0x80, Ints) - 128;
                            value = __builtin_convertvector(widened, Floats) * scale;
                        }
                        store(out + row * k + first + v, value, std::min<int64_t>(LANES, count - v));
                    }
                }
            }
        }
    }
    return 0;
}

// The dequantized weight [n, k] in T of 6-bit panels (the LM head: products of many rows, rare),
// each value (u - 32) * scale in float32 rounded once, as the reference's dequantize.
template <typename T>
int panel_dequantize6(const uint32_t* w, const uint16_t* scales, T* out, int64_t n, int64_t k, int64_t group_size) {
    if (group_size < 32 || group_size % 32) return -1;
    const int64_t blocks = (k + 31) / 32, groups = (k + group_size - 1) / group_size;
    const int64_t panels = (n + LANES - 1) / LANES;
#pragma omp parallel for schedule(static)
    for (int64_t panel = 0; panel < panels; ++panel) {
        for (int64_t b = 0; b < blocks; ++b) {
            const uint32_t* block = w + (panel * blocks + b) * 6 * LANES;
            const int64_t g = b * 32 / group_size;
            for (int lane = 0; lane < LANES && panel * LANES + lane < n; ++lane) {
                const int64_t row = panel * LANES + lane;
                const float scale = half_to_float(scales[(panel * groups + g) * LANES + lane]);
                for (int j = 0; j < 32 && b * 32 + j < k; ++j) {
                    const int half = j / 16, c = j % 16 / 4, byte = j % 4;
                    const uint32_t nibble = (block[c * LANES + lane] >> (8 * byte + 4 * half)) & 0xfu;
                    const uint32_t high = (block[(4 + half) * LANES + lane] >> (8 * byte + 2 * c)) & 0x3u;
                    out[row * k + b * 32 + j] = Element<T>::from_float(float(int32_t(nibble | high << 4) - 32) * scale);
                }
            }
        }
    }
    return 0;
}

// The dequantized weight [n, k] in T (each value computed in float32 and rounded once, as the
// reference's dequantize), for products of many rows (prefill), which run as a GEMM.
template <typename T, int BITS>
int grouped_dequantize(const uint32_t* w, const uint16_t* scales, const uint16_t* offsets, T* out, int64_t n, int64_t k,
                       int64_t group_size) {
    using G = Grouped<BITS>;
    if (group_size < LANES || group_size % LANES || (G::OFFSETS && !offsets)) return -1;
    const int64_t row_words = (k + G::BLOCK - 1) / G::BLOCK * G::BLOCK / G::ELEMENTS;
    const int64_t groups = (k + group_size - 1) / group_size;
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < n; ++row) {
        for (int64_t j = 0; j < k; j += G::BLOCK) {
            Words words;
            memcpy(&words, w + row * row_words + j / G::ELEMENTS, sizeof words);
            for (int v = 0; v < G::ELEMENTS && j + v * LANES < k; ++v) {
                const int64_t group = (j + v * LANES) / group_size;
                Floats weight = G::element(words, v) * half_to_float(scales[row * groups + group]);
                if constexpr (G::OFFSETS) weight += half_to_float(offsets[row * groups + group]);
                store(out + row * k + j + v * LANES, weight, std::min<int64_t>(LANES, k - j - v * LANES));
            }
        }
    }
    return 0;
}

// out = norm(h) (times weight), h = x + residual (or x); float32 statistics, h and the
// normalised value rounded to T before the weight multiplies, as transformers' LlamaRMSNorm.
template <typename T>
void rms_norm(const T* x, const T* residual, const T* weight, float eps, T* out, T* h_out, int64_t n,
              int64_t d) {
    using E = Element<T>;
#pragma omp parallel for schedule(static) if (n >= 16)
    for (int64_t i = 0; i < n; ++i) {
        const T* h = x + i * d;
        if (residual) {  // h = x + residual, rounded to T as the reference's add
            over_vectors(d, [&](int64_t j, int64_t count) {
                store(h_out + i * d + j, load(x + i * d + j, count) + load(residual + i * d + j, count), count);
            });
            h = h_out + i * d;
        }
        Floats sum = {};
        over_vectors(d, [&](int64_t j, int64_t count) {
            const Floats v = load(h + j, count);
            sum += v * v;
        });
        const float inverse = 1.0f / sqrtf(horizontal_sum(sum) / float(d) + eps);
        over_vectors(d, [&](int64_t j, int64_t count) {
            Floats v = E::round(load(h + j, count) * inverse);
            if (weight) v = load(weight + j, count) * v;
            store(out + i * d + j, v, count);
        });
    }
}

// Rotary embedding in place on q [n, hq, d] and k [n, hk, d] (rows q_stride / k_stride apart,
// heads contiguous), cos|sin from cos_sin [max_pos, rot] float32.
template <typename T>
void rotary(const int64_t* positions, T* q, int64_t q_stride, int64_t hq, T* k, int64_t k_stride, int64_t hk,
            int64_t d, const float* cos_sin, int64_t rot, int interleaved, int64_t n) {
    using E = Element<T>;
    const int64_t half = rot / 2;
#pragma omp parallel for schedule(static) if (n >= 16)
    for (int64_t i = 0; i < n; ++i) {
        std::vector<float> c(half), s(half);  // this position's cos and sin, rounded once
        const float* cs = cos_sin + positions[i] * rot;
        for (int64_t j = 0; j < half; ++j) {
            c[j] = E::to_float(E::from_float(cs[j]));
            s[j] = E::to_float(E::from_float(cs[half + j]));
        }
        for (int64_t h = 0; h < hq; ++h) rotate(q + i * q_stride + h * d, c.data(), s.data(), half, interleaved);
        for (int64_t h = 0; h < hk; ++h) rotate(k + i * k_stride + h * d, c.data(), s.data(), half, interleaved);
    }
}

// k, v [n, width] (rows k_stride / v_stride apart) into the paged caches [slots, width] at
// slots[i]; slot -1 is skipped.
template <typename T>
void store_kv(const T* k, int64_t k_stride, const T* v, int64_t v_stride, T* k_cache, T* v_cache,
              const int64_t* slots, int64_t n, int64_t width) {
    for (int64_t i = 0; i < n; ++i) {
        if (slots[i] < 0) continue;
        memcpy(k_cache + slots[i] * width, k + i * k_stride, width * sizeof(T));
        memcpy(v_cache + slots[i] * width, v + i * v_stride, width * sizeof(T));
    }
}

// Decode attention of one (sequence, KV head): the G query heads sharing that KV head, a chunk
// of at most MAX_CHUNK of them at a time (G a compile-time constant, so each head's accumulators
// live in registers). Each key is widened once per chunk and serves every head of it; each
// value likewise. Per head and element the sums run in the same order as a plain loop: a score
// is the lane-wise multiply-add over the head's vectors, then horizontal_sum; an output feature
// sums weight * value key by key.
constexpr int MAX_CHUNK = 4;
constexpr int64_t ATTENTION_PREFETCH_BLOCKS = 2;

// The keys (or values) first .. first+length-1 of one sequence and KV head, block by block: cache
// row t is (block, offset) without a division per key. visit(t, row).
template <typename T, typename Visit>
inline void over_cached(const T* cache, const int32_t* table, int64_t first, int64_t length, int64_t block_size,
                        int64_t kv_stride, int64_t head_offset, int64_t row_bytes, Visit&& visit) {
    int64_t t = 0;
    const int64_t last_block = (first + length - 1) / block_size;
    for (int64_t block_index = first / block_size; t < length; ++block_index) {
        const T* block = cache + int64_t(table[block_index]) * block_size * kv_stride + head_offset;
        // A later block lies anywhere in the cache: the hardware prefetchers would find its rows
        // only after several misses, so the rows' row_bytes of the block ATTENTION_PREFETCH_BLOCKS
        // ahead are asked for while this one runs, into L2 (prefetcht2: far more of those can be
        // under way than of prefetches into L1). One block ahead into L1 left a thread waiting on
        // memory: 64 sequences of 1000 cached tokens (49 MB a layer, SmolLM2's heads), a Zen 4
        // host, 5.4 -> 14 GB/s on one thread and 10 -> 28 on two (its streaming read ~30).
        if (block_index + ATTENTION_PREFETCH_BLOCKS <= last_block) {
            const char* ahead = reinterpret_cast<const char*>(
                cache + int64_t(table[block_index + ATTENTION_PREFETCH_BLOCKS]) * block_size * kv_stride + head_offset);
            for (int64_t row = 0; row < block_size; ++row)
                for (int64_t line = 0; line < row_bytes; line += CACHE_LINE)
                    __builtin_prefetch(ahead + row * kv_stride * int64_t(sizeof(T)) + line, 0, 1);
        }
        for (int64_t offset = t == 0 ? first % block_size : 0; offset < block_size && t < length; ++offset, ++t)
            visit(t, block + offset * kv_stride);
    }
}

// The keys first .. first+length-1 of one sequence and KV head (d features each) LANES at a time:
// score(keys, count, t0, full) for the count keys from key t0 on (count LANES and full
// std::true_type but in the last group, std::false_type there).
template <typename T, typename Score>
inline void over_key_groups(const T* k_cache, const int32_t* table, int64_t first, int64_t length, int64_t block_size,
                            int64_t kv_stride, int64_t head_offset, int64_t d, Score&& score) {
    const T* keys[LANES];
    int64_t gathered = 0, t0 = 0;
    over_cached(k_cache, table, first, length, block_size, kv_stride, head_offset, d * int64_t(sizeof(T)),
                [&](int64_t t, const T* key) {
        if (gathered == 0) t0 = t;
        keys[gathered++] = key;
        if (gathered == LANES) {
            score(static_cast<const T* const*>(keys), gathered, t0, std::true_type{});
            gathered = 0;
        }
    });
    if (gathered) score(static_cast<const T* const*>(keys), gathered, t0, std::false_type{});
}

// scores[c * length + t] = key t . query c (queries: G rows of d floats, already scaled). One
// query (G 1): keys LANES at a time, each dot product an independent vector sum and their lanes
// summed together (transpose_sums) instead of a horizontal sum per key (SmolLM2-shaped heads,
// 512 keys: ~1.3x faster). Several: each key widened once for all G (which, with two or more,
// outweighs the horizontal sums).
template <typename T, int G>
void chunk_scores(const float* query, const T* k_cache, const int32_t* table, int64_t first, int64_t length,
                  int64_t block_size, int64_t kv_stride, int64_t head_offset, int64_t d, float* scores) {
    if constexpr (G == 1) {
        over_key_groups(k_cache, table, first, length, block_size, kv_stride, head_offset, d,
                        [&](const T* const* keys, int64_t gathered, int64_t t0, auto full) {
            Floats acc[LANES] = {};
            over_vectors(d, [&](int64_t j, int64_t count) {
                const Floats q = load(query + j, count);
#pragma GCC unroll 16
                for (int i = 0; i < LANES; ++i)
                    if (decltype(full)::value || i < gathered) acc[i] += load(keys[i] + j, count) * q;
            });
            store(scores + t0, transpose_sums(acc), gathered);
        });
    } else {
        over_cached(k_cache, table, first, length, block_size, kv_stride, head_offset, d * int64_t(sizeof(T)),
                    [&](int64_t t, const T* key) {
            Floats acc[G] = {};
            over_vectors(d, [&](int64_t j, int64_t count) {
                const Floats k = load(key + j, count);
                for (int c = 0; c < G; ++c) acc[c] += k * load(query + c * d + j, count);
            });
            for (int c = 0; c < G; ++c) scores[c * length + t] = horizontal_sum(acc[c]);
        });
    }
}

// out[c * d + j] = sum over t of weights[c * length + t] * value t [j]: VALUE_VECTORS vectors of
// features a pass over the values, so that G * VALUE_VECTORS sums (not G) are under way at once
// and the additions of one sum, each waiting for the previous, overlap with the others'.
template <typename T, int G>
void chunk_values(const float* weights, const T* v_cache, const int32_t* table, int64_t first, int64_t length,
                  int64_t block_size, int64_t kv_stride, int64_t head_offset, int64_t d, float* out) {
    constexpr int VALUE_VECTORS = G >= 4 ? 2 : G >= 2 ? 4 : 8;  // ~8 sums in registers
    for (int64_t j0 = 0; j0 < d; j0 += VALUE_VECTORS * LANES) {
        const int64_t width = std::min<int64_t>(VALUE_VECTORS * LANES, d - j0);
        Floats acc[G][VALUE_VECTORS] = {};
        over_cached(v_cache, table, first, length, block_size, kv_stride, head_offset + j0, width * int64_t(sizeof(T)),
                    [&](int64_t t, const T* value) {
#pragma GCC unroll 8
                        for (int v = 0; v < VALUE_VECTORS; ++v) {
                            if (v * LANES >= width) break;
                            const Floats x = load(value + v * LANES, std::min<int64_t>(LANES, width - v * LANES));
                            for (int c = 0; c < G; ++c) acc[c][v] += weights[c * length + t] * x;
                        }
                    });
        for (int c = 0; c < G; ++c)
            for (int v = 0; v < VALUE_VECTORS && v * LANES < width; ++v)
                store(out + c * d + j0 + v * LANES, acc[c][v], std::min<int64_t>(LANES, width - v * LANES));
    }
}

// The same sums over heads of d features, d a multiple of FEATURE_BLOCK, a Block<T> of features at
// a time: one full-width load gives two vectors in the block's order (bfloat16: its even features,
// then its odd ones, each by one shift or mask), against a conversion per vector that GCC splits
// into two half-width ones. SmolLM2's heads (d 64), 512 warm keys, one thread, ns per key and
// head, AVX2: scores 9.3-11.2 -> 4.7-6.1 (one head), 6.7-7.5 -> 4.3-5.5 (two); values 7.9-8.1 ->
// 3.8-4.2 (one), 4.8-5.3 -> 3.2-3.5 (two). The queries come in the same order (Block<T>::x_index), so a
// score sums the same products in another order; each value feature's sum over keys runs as in
// chunk_values (same order, same roundings).
constexpr int64_t FEATURE_BLOCK = 2 * LANES;

template <typename T>
constexpr bool blocked_features(int64_t d) {
    return Block<T>::VECTORS == 2 && d % FEATURE_BLOCK == 0;
}

// Keys LANES at a time, and for each query head their LANES sums transposed together (as
// chunk_scores does for one head), the keys loaded again for each head from L1: with a key's two
// vectors a load and two operations, this ran as fast as one load per key and a horizontal sum
// per key and head (2-4 heads), and serves every G.
template <typename T, int G>
void block_scores(const float* query, const T* k_cache, const int32_t* table, int64_t first, int64_t length,
                  int64_t block_size, int64_t kv_stride, int64_t head_offset, int64_t d, float* scores) {
    over_key_groups(k_cache, table, first, length, block_size, kv_stride, head_offset, d,
                    [&](const T* const* keys, int64_t gathered, int64_t t0, auto full) {
        for (int c = 0; c < G; ++c) {
            Floats acc[LANES] = {};
            for (int64_t b = 0; b < d; b += FEATURE_BLOCK) {
                const Floats q0 = Element<float>::load(query + c * d + b);
                const Floats q1 = Element<float>::load(query + c * d + b + LANES);
#pragma GCC unroll 16
                for (int i = 0; i < LANES; ++i)
                    if (decltype(full)::value || i < gathered) {
                        Floats k[2];
                        Block<T>::load(keys[i] + b, k);
                        acc[i] += k[0] * q0 + k[1] * q1;
                    }
            }
            store(scores + c * length + t0, transpose_sums(acc), gathered);
        }
    });
}

// bfloat16 keys on CPUs with AVX-512 BF16 (Zen 4, Sapphire Rapids and later): vdpbf16ps multiplies
// 32 bfloat16 pairs and adds them into 16 float32 sums in one instruction, against a load, two
// widening operations and three float operations per 16 features in block_scores. Each product
// of two bfloat16 values is exact in float32 and every sum float32 (rounded to nearest; the
// instruction flushes denormals, far below any score that counts), so a score is the same dot
// product summed in another order; the query stays as the model gave it (bfloat16, unscaled) and
// the scale multiplies each score. Zen 4 runs 512-bit operations in two halves, so there it is
// the instruction count that bounds the scores (SmolLM2's heads, 1000 cached keys, one thread:
// ~3.7 of the ~6.5 ns per key and query head before).
#if VECTOR_BYTES == 64 && defined(__AVX512BF16__)
constexpr bool BF16_DOT_SCORES = true;
template <int G>
void bf16_dot_scores(const bfloat16* query, const bfloat16* k_cache, const int32_t* table, int64_t first,
                     int64_t length, int64_t block_size, int64_t kv_stride, int64_t head_offset, int64_t d,
                     float scale, float* scores) {
    over_key_groups(k_cache, table, first, length, block_size, kv_stride, head_offset, d,
                    [&](const bfloat16* const* keys, int64_t gathered, int64_t t0, auto full) {
        for (int c = 0; c < G; ++c) {
            Floats acc[LANES] = {};
            for (int64_t b = 0; b < d; b += 2 * LANES) {
                const __m512bh q = (__m512bh)_mm512_loadu_si512(query + c * d + b);
#pragma GCC unroll 16
                for (int i = 0; i < LANES; ++i)
                    if (decltype(full)::value || i < gathered)
                        acc[i] = (Floats)_mm512_dpbf16_ps((__m512)acc[i], (__m512bh)_mm512_loadu_si512(keys[i] + b), q);
            }
            store(scores + c * length + t0, transpose_sums(acc) * scale, gathered);
        }
    });
}
#else
constexpr bool BF16_DOT_SCORES = false;
template <int G>
void bf16_dot_scores(const bfloat16*, const bfloat16*, const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t,
                     int64_t, float, float*) {}
#endif

template <typename T, int G>
void block_values(const float* weights, const T* v_cache, const int32_t* table, int64_t first, int64_t length,
                  int64_t block_size, int64_t kv_stride, int64_t head_offset, int64_t d, float* out) {
    constexpr int BLOCKS = G >= 4 ? 1 : G >= 2 ? 2 : 4;  // ~8 sums (two vectors a block) in registers
    for (int64_t j0 = 0; j0 < d; j0 += BLOCKS * FEATURE_BLOCK) {
        const int64_t blocks = std::min<int64_t>(BLOCKS, (d - j0) / FEATURE_BLOCK);
        Floats acc[G][BLOCKS][2] = {};
        over_cached(v_cache, table, first, length, block_size, kv_stride, head_offset + j0,
                    blocks * FEATURE_BLOCK * int64_t(sizeof(T)), [&](int64_t t, const T* value) {
#pragma GCC unroll 4
                        for (int b = 0; b < BLOCKS; ++b) {
                            if (b >= blocks) break;
                            Floats v[2];
                            Block<T>::load(value + b * FEATURE_BLOCK, v);
                            for (int c = 0; c < G; ++c) {
                                acc[c][b][0] += weights[c * length + t] * v[0];
                                acc[c][b][1] += weights[c * length + t] * v[1];
                            }
                        }
                    });
        for (int c = 0; c < G; ++c)
            for (int64_t b = 0; b < blocks; ++b) {  // back to feature order
                float sums[FEATURE_BLOCK];
                memcpy(sums, &acc[c][b][0], sizeof(Floats));
                memcpy(sums + LANES, &acc[c][b][1], sizeof(Floats));
                for (int64_t j = 0; j < FEATURE_BLOCK; ++j)
                    out[c * d + j0 + b * FEATURE_BLOCK + j] = sums[Block<T>::x_index(j)];
            }
    }
}

// Runs body(std::integral_constant<int, G>) for the chunk size chunk (1 .. MAX_CHUNK).
template <typename Body>
inline void with_chunk(int64_t chunk, Body&& body) {
    with_constant<MAX_CHUNK>(chunk, body);
}

// The (sequence, KV head) tasks of decode_attention, shared by the threads of an enclosing
// parallel region (or all done by the calling thread).
template <typename T>
void decode_attention_team(const T* q, int64_t q_stride, const T* k_cache, const T* v_cache, const int32_t* block_tables,
                           int64_t max_blocks, const int32_t* context_lens, T* out, int64_t b, int64_t hq, int64_t hk,
                           int64_t d, int64_t block_size, float scale, int64_t window) {
    using E = Element<T>;
    const int64_t group_size = hq / hk, kv_stride = hk * d;
    // A task is a sequence, a KV head and its query heads, or with fewer of those than two per
    // thread (a decode step of one sequence of a model with 3 KV heads on 2 threads: 2 tasks on
    // one thread, 1 on the other) a part of the query heads: each query head's sums are the
    // same either way, and the key and value rows are read once per part.
    const int64_t threads = omp_threads();
    const int64_t wanted = std::min(group_size, std::max<int64_t>(1, (2 * threads + b * hk - 1) / (b * hk)));
    const int64_t per_part = (group_size + wanted - 1) / wanted;
    const int64_t parts = (group_size + per_part - 1) / per_part;  // none empty (5 heads in 4 wanted: 2, 2, 1)
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < b * hk * parts; ++task) {
        const int64_t s = task / (hk * parts), h = task / parts % hk, part = task % parts;
        const int64_t head0 = h * group_size + part * per_part;  // the part's first query head
        const int64_t g = std::min(per_part, group_size - part * per_part);
        const int64_t context = context_lens[s];
        const int64_t first = window > 0 ? std::max<int64_t>(0, context - window) : 0;
        const int64_t length = context - first;
        const int32_t* table = block_tables + s * max_blocks;
        std::vector<float> query(g * d), scores(g * length), acc(g * d);
        const bool blocked = blocked_features<T>(d);
        // bfloat16 dot products: the query heads as given, side by side (see bf16_dot_scores)
        const bool bf16_dot = BF16_DOT_SCORES && std::is_same_v<T, bfloat16> && d % (2 * LANES) == 0;
        if (!bf16_dot)
            for (int64_t group = 0; group < g; ++group)
                for (int64_t j = 0; j < d; ++j)
                    query[group * d + (blocked ? Block<T>::x_index(j) : j)] =
                        E::to_float(q[s * q_stride + (head0 + group) * d + j]) * scale;
        std::vector<T> query_as_given(bf16_dot ? g * d : 0);
        if (bf16_dot)
            for (int64_t group = 0; group < g; ++group)
                memcpy(&query_as_given[group * d], q + s * q_stride + (head0 + group) * d, d * sizeof(T));
        for (int64_t c0 = 0; c0 < g; c0 += MAX_CHUNK)
            with_chunk(std::min<int64_t>(MAX_CHUNK, g - c0), [&](auto chunk) {
                constexpr int G = decltype(chunk)::value;
                if constexpr (std::is_same_v<T, bfloat16>)
                    if (bf16_dot) {
                        bf16_dot_scores<G>(&query_as_given[c0 * d], k_cache, table, first, length, block_size,
                                           kv_stride, h * d, d, scale, &scores[c0 * length]);
                        return;
                    }
                if (blocked)
                    block_scores<T, G>(&query[c0 * d], k_cache, table, first, length, block_size, kv_stride, h * d, d,
                                       &scores[c0 * length]);
                else
                    chunk_scores<T, G>(&query[c0 * d], k_cache, table, first, length, block_size, kv_stride, h * d, d,
                                       &scores[c0 * length]);
            });
        for (int64_t group = 0; group < g; ++group) {
            float* row = &scores[group * length];
            Floats tops = splat(-INFINITY);
            over_vectors(length, [&](int64_t t, int64_t count) {
                const Floats v = select(lane_indices() < Ints{} + int32_t(count), load(row + t, count), splat(-INFINITY));
                tops = v > tops ? v : tops;
            });
            const Floats top = splat(largest_lane(tops));
            Floats total = {};
            over_vectors(length, [&](int64_t t, int64_t count) {
                // Lanes past the row (zeros from a partial load) must not count in the total.
                const Floats e = select(lane_indices() < Ints{} + int32_t(count), exp_lanes(load(row + t, count) - top),
                                        Floats{});
                store(row + t, e, count);
                total += e;
            });
            const float inverse_total = 1.0f / horizontal_sum(total);
            over_vectors(length, [&](int64_t t, int64_t count) { store(row + t, load(row + t, count) * inverse_total, count); });
        }
        for (int64_t c0 = 0; c0 < g; c0 += MAX_CHUNK)
            with_chunk(std::min<int64_t>(MAX_CHUNK, g - c0), [&](auto chunk) {
                constexpr int G = decltype(chunk)::value;
                if (blocked)
                    block_values<T, G>(&scores[c0 * length], v_cache, table, first, length, block_size, kv_stride,
                                       h * d, d, &acc[c0 * d]);
                else
                    chunk_values<T, G>(&scores[c0 * length], v_cache, table, first, length, block_size, kv_stride,
                                       h * d, d, &acc[c0 * d]);
            });
        for (int64_t group = 0; group < g; ++group)
            for (int64_t j = 0; j < d; ++j) out[(s * hq + head0 + group) * d + j] = E::from_float(acc[group * d + j]);
    }
}

// One query token per sequence (q [b, hq, d], rows q_stride apart) against its paged K/V
// ([blocks, block_size, hk, d]); out [b, hq, d] contiguous. Query heads h*g .. h*g+g-1 share KV
// head h. Float32 scores, softmax and sums; window > 0 keeps the last `window` keys.
template <typename T>
void decode_attention(const T* q, int64_t q_stride, const T* k_cache, const T* v_cache, const int32_t* block_tables,
                      int64_t max_blocks, const int32_t* context_lens, T* out, int64_t b, int64_t hq, int64_t hk,
                      int64_t d, int64_t block_size, float scale, int64_t window) {
    int64_t keys = 0;
    for (int64_t s = 0; s < b; ++s) keys += context_lens[s];
    // Threads only pay off past a few thousand keys: waking them costs more than short contexts.
#pragma omp parallel if (keys * hk >= 8192)
    decode_attention_team(q, q_stride, k_cache, v_cache, block_tables, max_blocks, context_lens, out, b, hq, hk, d,
                          block_size, scale, window);
}

// x [n, 2 * inter] laid out [gate | up] -> SiLU(gate) * up [n, inter], each rounded as the
// reference's silu and mul round; here features [begin, end) of row i.
template <typename T>
inline void silu_and_mul_range(const T* x, T* out, int64_t i, int64_t begin, int64_t end, int64_t inter) {
    using E = Element<T>;
    const T* gate = x + i * 2 * inter + begin;
    const T* up = gate + inter;
    over_vectors(end - begin, [&](int64_t j, int64_t count) {
        const Floats g = load(gate + j, count);
        const Floats silu = E::round(g / (1.0f + exp_lanes(-g)));
        store(out + i * inter + begin + j, silu * load(up + j, count), count);
    });
}

template <typename T>
void silu_and_mul(const T* x, T* out, int64_t n, int64_t inter) {
#pragma omp parallel for schedule(static) if (n * inter >= 65536)
    for (int64_t i = 0; i < n; ++i) silu_and_mul_range(x, out, i, 0, inter, inter);
}

// The same, shared by the threads of an enclosing parallel region in pieces of SILU_PIECE
// features: a decode step's few rows are too few to split by row.
constexpr int64_t SILU_PIECE = 256;

template <typename T>
void silu_and_mul_team(const T* x, T* out, int64_t n, int64_t inter) {
    const int64_t pieces = (inter + SILU_PIECE - 1) / SILU_PIECE;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < n * pieces; ++task) {
        const int64_t i = task / pieces, begin = task % pieces * SILU_PIECE;
        silu_and_mul_range(x, out, i, begin, std::min(inter, begin + SILU_PIECE), inter);
    }
}

// --- fused decode blocks ------------------------------------------------------------------------
// A decode step of a small model is dozens of GEMVs with small kernels between them; called one
// by one from Python, each costs a few microseconds of dispatch and its own parallel region, and
// the threads idle between them. A decoder layer's two halves (attention, MLP) run here each in
// one call and one parallel region instead: the same kernels, in the same order, on the same
// roundings as the per-kernel path, so the results are bit-identical. The halves stay apart
// because tensor parallelism all-reduces each half's output in between.

// One decode step: `batch` sequences of one new token each (the AttentionMetadata tensors).
struct DecodeStep {
    const int64_t* positions;     // [batch]
    const int64_t* slots;         // [batch]
    const int32_t* block_tables;  // [batch, max_blocks]
    const int32_t* context_lens;  // [batch], cached tokens including this step's
    int64_t batch;
    int64_t max_blocks;
    const float* cos_sin;  // [max_positions, rotary_dim]
};

// A projection's weight in the fused halves: dense rows of T (bits 0), or 4- or 8-bit panels
// (the integer GEMV's layout, bfloat16 models), with x in one int8 digit; or, for the LM head
// (digits 2: x in 15 bits), 6- or 8-bit panels.
struct Weight {
    const void* dense;  // [n, k] of T
    const uint32_t* words;
    const uint16_t* scales;
    const uint16_t* offsets;
    const uint16_t* factors;  // coded 4-bit panels' factors, or null
    int64_t bits, group_size, digits;
};

// y = x @ w.T + bias by the team: the dense GEMV or the integer one (the scratch's panels sized
// for w's digits); with norm, x is that norm's output, computed first. exact (prompt rows, which
// are never rounded to int8: cpu.py's decode_rows says why): 4- and 8-bit panels multiply x exact
// in float32, dequantized in registers, as the per-kernel path's prompt GEMV (panel_exact_gemv).
template <typename T>
void project_team(const T* x, int64_t m, const Weight& w, const T* bias, T* y, int64_t n, int64_t k, float* xf,
                  PanelScratch& scratch, const NormFirst<T>* norm = nullptr, bool exact = false) {
    if (exact && w.bits == 4 && w.digits == 1)
        panel_exact_team<T, 4>(x, m, w.words, w.scales, w.offsets, w.factors, bias, y, n, k, w.group_size, xf, norm);
    else if (exact && w.bits == 8 && w.digits == 1)
        panel_exact_team<T, 8>(x, m, w.words, w.scales, w.offsets, w.factors, bias, y, n, k, w.group_size, xf, norm);
    else if (w.bits == 4)
        panel_team<T, 4>(x, m, w.words, w.scales, w.offsets, w.factors, bias, y, n, k, w.group_size, scratch, norm);
    else if (w.bits == 8 && w.digits == 2)
        panel_team<T, 8, 2>(x, m, w.words, w.scales, w.offsets, nullptr, bias, y, n, k, w.group_size, scratch, norm);
    else if (w.bits == 8)
        panel_team<T, 8>(x, m, w.words, w.scales, w.offsets, nullptr, bias, y, n, k, w.group_size, scratch, norm);
    else if (w.bits == 6)
        panel_team<T, 6, 2>(x, m, w.words, w.scales, nullptr, nullptr, bias, y, n, k, w.group_size, scratch, norm);
    else
        gemv_team(x, m, static_cast<const T*>(w.dense), bias, y, n, k, xf, static_cast<const float*>(nullptr), norm);
}

// One layer's attention half on this rank: norm, q/k/v, rotary, KV store, attention, o_proj.
struct AttentionBlock {
    const void* norm_weight;  // [hidden] or null (no learned weight)
    Weight qkv_weight;        // [(heads + 2 * kv_heads) * head_dim, hidden]
    const void* qkv_bias;     // or null
    Weight o_weight;          // [hidden, heads * head_dim]
    int64_t hidden, heads, kv_heads, head_dim, rotary_dim, block_size, window;
    float eps, scale;
    int32_t interleaved;
};

// One layer's MLP half on this rank: norm, gate|up, SiLU * up, down.
struct MlpBlock {
    const void* norm_weight;  // [hidden] or null
    Weight gate_up_weight;    // [2 * intermediate, hidden]
    const void* gate_up_bias;  // or null
    Weight down_weight;        // [hidden, intermediate]
    int64_t hidden, intermediate;
    float eps;
};

// The buffers between the kernels of the fused halves, for m rows: the normed input, the wide
// projection's output (q|k|v or gate|up), the narrow one's input (attention or SiLU * up
// output), x widened for the dense GEMV and x quantized for the integer one. Sized by the
// caller for the widest layer it runs.
template <typename T>
struct HalfScratch {
    std::vector<T> normed, wide, narrow;
    std::vector<float> xf;
    PanelScratch panels;
    HalfScratch(int64_t m, int64_t hidden, int64_t wide_width, int64_t narrow_width, int digits = 1)
        : normed(m * hidden),
          wide(m * wide_width),
          narrow(m * narrow_width),
          // whole groups of rows, for the dense GEMV's or the prompt rows' panel GEMV
          xf(std::max(gemv_padded_rows(m), panel_padded_rows(m)) * padded_width(std::max(hidden, narrow_width))),
          panels(m, std::max(hidden, narrow_width), digits) {}
};

inline int64_t qkv_width(const AttentionBlock& layer) { return (layer.heads + 2 * layer.kv_heads) * layer.head_dim; }

// out [batch, hidden] = the attention half's output (before any all-reduce) for input x, by the
// threads of the enclosing parallel region.
template <typename T>
void attention_team(const AttentionBlock& layer, const DecodeStep& step, const T* x, T* residual, T* out, T* k_cache,
                    T* v_cache, HalfScratch<T>& scratch, bool exact = false) {
    const int64_t m = step.batch, d = layer.head_dim;
    const int64_t q_width = layer.heads * d, kv_width = layer.kv_heads * d, width = qkv_width(layer);
    T *normed = scratch.normed.data(), *qkv = scratch.wide.data(), *attended = scratch.narrow.data();
    // What rotary and the KV store read and write after the q|k|v GEMV (this step's cos|sin rows
    // and cache slots, last touched a step or more ago), asked for now to arrive during it.
    for (int64_t i = 0; i < m; ++i) {
        prefetch_lines(step.cos_sin + step.positions[i] * layer.rotary_dim, layer.rotary_dim * int64_t(sizeof(float)));
        if (step.slots[i] < 0) continue;
        prefetch_lines(k_cache + step.slots[i] * kv_width, kv_width * int64_t(sizeof(T)));
        prefetch_lines(v_cache + step.slots[i] * kv_width, kv_width * int64_t(sizeof(T)));
    }
    const NormFirst<T> norm{x, residual, layer.norm_weight, layer.eps, normed, layer.hidden};
    project_team(normed, m, layer.qkv_weight, static_cast<const T*>(layer.qkv_bias), qkv, width, layer.hidden,
                 scratch.xf.data(), scratch.panels, &norm, exact);
#pragma omp single
    {
        T* q = qkv;
        T* k = q + q_width;
        rotary<T>(step.positions, q, width, layer.heads, k, width, layer.kv_heads, d, step.cos_sin, layer.rotary_dim,
                  layer.interleaved, m);
        store_kv<T>(k, width, k + kv_width, width, k_cache, v_cache, step.slots, m, kv_width);
    }
    decode_attention_team<T>(qkv, width, k_cache, v_cache, step.block_tables, step.max_blocks, step.context_lens,
                             attended, m, layer.heads, layer.kv_heads, d, layer.block_size, layer.scale, layer.window);
    project_team(attended, m, layer.o_weight, static_cast<const T*>(nullptr), out, layer.hidden, q_width,
                 scratch.xf.data(), scratch.panels, static_cast<const NormFirst<T>*>(nullptr), exact);
}

// out [m, hidden] = the MLP half's output (before any all-reduce) for input x, by the team.
template <typename T>
void mlp_team(const MlpBlock& layer, int64_t m, const T* x, T* residual, T* out, HalfScratch<T>& scratch,
              bool exact = false) {
    const int64_t inter = layer.intermediate;
    T *normed = scratch.normed.data(), *gate_up = scratch.wide.data(), *activated = scratch.narrow.data();
    const NormFirst<T> norm{x, residual, layer.norm_weight, layer.eps, normed, layer.hidden};
    project_team(normed, m, layer.gate_up_weight, static_cast<const T*>(layer.gate_up_bias), gate_up, 2 * inter,
                 layer.hidden, scratch.xf.data(), scratch.panels, &norm, exact);
    silu_and_mul_team<T>(gate_up, activated, m, inter);
    project_team(activated, m, layer.down_weight, static_cast<const T*>(nullptr), out, layer.hidden, inter,
                 scratch.xf.data(), scratch.panels, static_cast<const NormFirst<T>*>(nullptr), exact);
}

// One attention half in its own parallel region (tensor parallelism all-reduces between halves).
template <typename T>
int attention_block(const AttentionBlock& layer, const DecodeStep& step, const T* x, T* residual, T* out,
                    T* k_cache, T* v_cache) {
    const int64_t m = step.batch;
    if (m < 1 || m > GEMV_MAX_ROWS) return -1;
    HalfScratch<T> scratch(m, layer.hidden, qkv_width(layer), layer.heads * layer.head_dim);
#pragma omp parallel
    attention_team(layer, step, x, residual, out, k_cache, v_cache, scratch);
    return 0;
}

template <typename T>
int mlp_block(const MlpBlock& layer, int64_t m, const T* x, T* residual, T* out) {
    if (m < 1 || m > GEMV_MAX_ROWS) return -1;
    HalfScratch<T> scratch(m, layer.hidden, 2 * layer.intermediate, layer.intermediate);
#pragma omp parallel
    mlp_team(layer, m, x, residual, out, scratch);
    return 0;
}

// Every decoder layer of a decode step in one call and one parallel region (a model on one rank:
// nothing to all-reduce between the halves). The same halves in the same order as one call per
// half, so bit-identical to them, without the per-half returns to Python and thread wake-ups.
// x [m, hidden] is the embedded input, or, with tokens [m], null: the call looks the rows up in
// embedding [embedding_rows, hidden] itself (one torch call a step fewer: ~50 us of Python from
// cold caches; a token outside [0, embedding_rows) returns -2 before anything runs). out is
// the last layer's output and residual the residual stream beside it (as the per-half calls
// leave them, for the final norm). With `normed`, the
// model's final RMS norm runs in the same region: residual becomes the hidden state (out +
// residual) and normed its norm, as rms_norm would leave them (one call from Python fewer).
// With a head too (and normed), the LM head's GEMV: its T outputs [m, head_rows] into head_out,
// then the first `vocab` of each row widened into logits [m, vocab] (float32), as the separate
// head's GEMV and a float() would leave them. After the layers have streamed their weights
// through the caches, every tensor operation in Python costs several times its warm time (its
// code and data come back from memory): a step saves far more than the calls themselves.
// exact: the rows are prompt tokens (each with its own position, slot, block table row and
// context length: a prompt's rows attend causally, its keys and values stored before any row
// attends), whose x the projections take exact (project_team); the head is then left out.
template <typename T>
int decode_layers(const AttentionBlock* attention, const MlpBlock* mlp, T* const* k_caches, T* const* v_caches,
                  int64_t layers, const DecodeStep& step, const T* x, T* residual, T* out,
                  const void* final_norm_weight, float final_eps, T* normed, const Weight* head, int64_t head_rows,
                  T* head_out, float* logits, int64_t vocab, const int64_t* tokens, const T* embedding,
                  int64_t embedding_rows, int64_t exact) {
    const int64_t m = step.batch;
    // The GEMVs take any number of rows (each weight read once for all of them).
    if (m < 1 || m > GEMV_ANY_MAX_ROWS || layers < 1) return -1;
    if (head && (!normed || vocab < 1 || vocab > head_rows || exact)) return -1;
    if (!x == !tokens || (tokens && !embedding)) return -1;
    for (int64_t i = 0; tokens && i < m; ++i)
        if (tokens[i] < 0 || tokens[i] >= embedding_rows) return -2;
    int64_t hidden = 0, wide = 0, narrow = 0;
    for (int64_t i = 0; i < layers; ++i) {
        if (attention[i].hidden != mlp[i].hidden || attention[i].hidden != attention[0].hidden) return -1;
        hidden = attention[i].hidden;
        wide = std::max({wide, qkv_width(attention[i]), 2 * mlp[i].intermediate});
        narrow = std::max({narrow, attention[i].heads * attention[i].head_dim, mlp[i].intermediate});
    }
    HalfScratch<T> scratch(m, hidden, wide, narrow, head ? int(head->digits) : 1);
    std::vector<T> attended(m * hidden), embedded(tokens ? m * hidden : 0);
    if (tokens) {
        for (int64_t i = 0; i < m; ++i)
            memcpy(embedded.data() + i * hidden, embedding + tokens[i] * hidden, hidden * sizeof(T));
        x = embedded.data();
    }
#pragma omp parallel
    {
        for (int64_t i = 0; i < layers; ++i) {
            // The next two norms' weights (this layer's MLP norm, then the next layer's or the
            // final norm), last read a step ago: asked for now, they arrive during this layer's
            // GEMVs instead of being waited for by the single thread that norms.
            prefetch_lines(mlp[i].norm_weight, mlp[i].norm_weight ? hidden * int64_t(sizeof(T)) : 0);
            const void* next_norm = i + 1 < layers ? attention[i + 1].norm_weight : final_norm_weight;
            prefetch_lines(next_norm, next_norm ? hidden * int64_t(sizeof(T)) : 0);
            // The first layer's residual stream is x itself (NormFirst stores nothing without one).
            attention_team(attention[i], step, i == 0 ? x : out, i == 0 ? nullptr : residual, attended.data(),
                           k_caches[i], v_caches[i], scratch, exact != 0);
            if (i == 0) {
#pragma omp single
                memcpy(residual, x, m * hidden * sizeof(T));
            }
            mlp_team(mlp[i], m, attended.data(), residual, out, scratch, exact != 0);
        }
        const NormFirst<T> final_norm{out, residual, final_norm_weight, final_eps, normed, hidden};
        if (head) {
            project_team(normed, m, *head, static_cast<const T*>(nullptr), head_out, head_rows, hidden,
                         scratch.xf.data(), scratch.panels, &final_norm);
            constexpr int64_t PIECE = 4096;
            const int64_t pieces = (vocab + PIECE - 1) / PIECE;
#pragma omp for schedule(static)
            for (int64_t task = 0; task < m * pieces; ++task) {
                const int64_t row = task / pieces, begin = task % pieces * PIECE;
                const T* from = head_out + row * head_rows;
                float* to = logits + row * vocab;
                over_vectors(std::min(PIECE, vocab - begin), [&](int64_t j, int64_t count) {
                    store(to + begin + j, load(from + begin + j, count), count);
                });
            }
        } else if (normed) {
#pragma omp single
            final_norm.run(m);
        }
    }
    return 0;
}

// --- sampling (model/sampler.py) --------------------------------------------------------------
// top_k / top_p / min_p keep a prefix of a row's weights sorted descending. Sorting a whole row
// (49152 or 128256 floats) for each draw cost sampler.py 2-4 ms a row; here each row's weights
// go into a histogram by their top bits (one pass), which places any sorted position in one bin,
// and only that bin's values are gathered and sorted.

constexpr int WEIGHT_BINS = 2048;  // a weight in [0, 1] by its top 12 bits: sign, exponent, 3 mantissa

inline int weight_bin(float w) {
    uint32_t bits;
    memcpy(&bits, &w, sizeof bits);
    return int(std::min<uint32_t>(bits >> 19, WEIGHT_BINS - 1));  // ascending with w (w >= 0)
}

// One row's weights w [v] (>= 0, the largest 1), binned. at(n): the weight at position n of the
// row sorted descending, and the mass of positions [0, n) (in double).
struct SortedWeights {
    const float* w = nullptr;
    int64_t v = 0;
    std::vector<int64_t> count = std::vector<int64_t>(WEIGHT_BINS);
    std::vector<double> mass = std::vector<double>(WEIGHT_BINS);
    std::vector<float> values;  // the gathered bin, descending
    int gathered = -1;
    double total = 0.0;

    void bin(const float* row, int64_t n) {
        w = row, v = n, gathered = -1, total = 0.0;
        std::fill(count.begin(), count.end(), 0);
        std::fill(mass.begin(), mass.end(), 0.0);
        for (int64_t i = 0; i < v; ++i) {
            const int b = weight_bin(w[i]);
            ++count[b];
            mass[b] += w[i];
        }
        for (int b = 0; b < WEIGHT_BINS; ++b) total += mass[b];
    }

    const std::vector<float>& gather(int b) {
        if (gathered != b) {
            values.clear();
            for (int64_t i = 0; i < v; ++i)
                if (weight_bin(w[i]) == b) values.push_back(w[i]);
            std::sort(values.begin(), values.end(), std::greater<float>());
            gathered = b;
        }
        return values;
    }

    // How many weights are >= `value`, and their sum.
    std::pair<int64_t, double> at_least(float value) {
        const int b = weight_bin(value);
        int64_t n = 0;
        double total_above = 0.0;
        for (int above = WEIGHT_BINS - 1; above > b; --above) n += count[above], total_above += mass[above];
        for (const float in_bin : gather(b)) {
            if (in_bin < value) break;
            ++n, total_above += in_bin;
        }
        return {n, total_above};
    }

    std::pair<float, double> at(int64_t n) {
        int64_t above = 0;
        double mass_above = 0.0;
        for (int b = WEIGHT_BINS - 1; b >= 0; --b) {
            if (above + count[b] > n) {
                const std::vector<float>& in_bin = gather(b);
                double before = mass_above;
                for (int64_t j = 0; j < n - above; ++j) before += in_bin[j];
                return {in_bin[n - above], before};
            }
            above += count[b];
            mass_above += mass[b];
        }
        return {0.0f, mass_above};  // n >= v: not asked
    }

    // How many positions the predecessors of which weigh less than `limit` together (top_p).
    int64_t positions_below(double limit) {
        int64_t above = 0;
        double mass_above = 0.0;
        for (int b = WEIGHT_BINS - 1; b >= 0; --b) {
            if (count[b] && mass_above + mass[b] >= limit) {
                int64_t kept = 0;
                double before = mass_above;
                for (const float value : gather(b)) {
                    if (!(before < limit)) break;
                    before += value;
                    ++kept;
                }
                return above + kept;
            }
            above += count[b];
            mass_above += mass[b];
        }
        return v;  // the limit is past the whole row's mass (top_p rounding)
    }
};

// The largest of x [v] (NaN ignored; -inf for none).
inline float row_max(const float* x, int64_t v) {
    Floats top = splat(-INFINITY);
    over_vectors(v, [&](int64_t j, int64_t count) {
        const Floats values = select(lane_indices() < Ints{} + int32_t(count), load(x + j, count), splat(-INFINITY));
        top = select(values > top, values, top);
    });
    float largest = top[0];
    for (int lane = 1; lane < LANES; ++lane) largest = std::max(largest, float(top[lane]));
    return largest;
}

// w [v] = exp((x - max) / T) for one row of logits x [v], as sampler.py's _weights makes them:
// the largest exactly 1, weights of 2e-38 or less (masked -inf tokens, NaN ones) exactly 0; exp
// within 2 float32 ulps of torch's. w may be x itself. Returns false for a row with no finite
// logit (every token masked).
inline bool row_weights(const float* x, int64_t v, float temperature, float* w) {
    const float largest = row_max(x, v);
    if (!(largest > -INFINITY && largest < INFINITY)) return false;
    const float inverse = 1.0f / temperature;  // sampler.py multiplies by 1 / T in float32 too
    over_vectors(v, [&](int64_t j, int64_t count) {
        const Floats e = exp_lanes((load(x + j, count) - largest) * inverse);
        store(w + j, select(e > splat(2e-38f), e, splat(0.0f)), count);
    });
    return true;
}

// The sum of the weights of w [n] that are > 0 and >= threshold, in double (four chains, so
// that the additions overlap).
inline double kept_sum(const float* w, int64_t n, float threshold) {
    double chains[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int c = 0; c < 4; ++c) chains[c] += (w[i + c] > 0.0f && w[i + c] >= threshold) ? w[i + c] : 0.0f;
    for (; i < n; ++i) chains[0] += (w[i] > 0.0f && w[i] >= threshold) ? w[i] : 0.0f;
    return (chains[0] + chains[1]) + (chains[2] + chains[3]);
}

// One draw from the row of weights w [v]: the kept set as sampler.py's _draw_top defines it,
// then the first token in id order whose cumulative kept weight exceeds u * the kept weight
// (block sums first, then the one block that holds the target, token by token).
inline int64_t sample_row(const float* w, int64_t v, int64_t top_k, float top_p, float min_p, double u,
                          SortedWeights& sorted) {
    constexpr int64_t BLOCK = 512;
    const bool by_k = top_k > 0 && top_k < v, by_p = top_p < 1.0f, by_min = min_p > 0.0f;
    float threshold = 0.0f;
    double kept_mass;
    if (!by_k && !by_p) {
        // min_p alone (or nothing) keeps exactly the weights >= min_p (the largest, 1, among them):
        // no position needs finding.
        threshold = by_min ? min_p : 0.0f;
        kept_mass = kept_sum(w, v, threshold);
    } else {
        sorted.bin(w, v);
        // min_p keeps the weights >= min_p times the largest (1); top_k the first k positions.
        const int64_t first = std::min(by_k ? top_k : v, by_min ? sorted.at_least(min_p).first : v);
        // top_p is a fraction of what min_p and top_k keep (the whole row when both are off).
        const double mass = first == v ? sorted.total : sorted.at(first).second;
        const int64_t kept = std::max<int64_t>(1, std::min(first, by_p ? sorted.positions_below(double(top_p) * mass) : v));
        // Every weight >= the last kept position's is kept (ties too), as _draw_top's mask keeps them.
        threshold = sorted.at(kept - 1).first;
        kept_mass = sorted.at_least(threshold).second;
    }
    const double target = u * kept_mass;
    double cumulative = 0.0;
    int64_t last = -1;
    for (int64_t start = 0; start < v; start += BLOCK) {
        const int64_t n = std::min(BLOCK, v - start);
        const double block = kept_sum(w + start, n, threshold);
        if (block <= 0.0) continue;
        if (cumulative + block <= target) {
            cumulative += block;
            last = start + n;  // a kept token lies in this block: found below if the target is past all
            continue;
        }
        for (int64_t i = start; i < start + n; ++i) {
            if (w[i] > 0.0f && w[i] >= threshold) {
                cumulative += w[i];
                if (cumulative > target) return i;
                last = i + 1;
            }
        }
    }
    // Rounding put the target at or past the kept weight: the last kept token.
    for (int64_t i = std::min(last, v) - 1; i >= 0; --i)
        if (w[i] > 0.0f && w[i] >= threshold) return i;
    return 0;  // no weight kept (not reached: the largest weight is 1)
}

// Log-probabilities of one row of logits x [v] (raw: no temperature), as sampler.py's
// compute_logprobs defines them: x - logsumexp(x) for the chosen token and the k largest logits
// (descending; a tie keeps the lower id first), and the chosen token's rank, 1 + the number of
// logits above its own. Sums of exp in float32 lanes, each lane's exp within 2 ulps of torch's.
inline void row_logprobs(const float* x, int64_t v, int64_t token, int64_t k, float* chosen, int64_t* rank,
                         int64_t* top_ids, float* top_logprobs) {
    const float largest = row_max(x, v);
    const float own = x[token];
    Floats sums = Floats{};
    Ints above = Ints{};
    over_vectors(v, [&](int64_t j, int64_t count) {
        const Ints live = lane_indices() < Ints{} + int32_t(count);
        const Floats values = load(x + j, count);
        sums += select(live, exp_lanes(values - largest), splat(0.0f));
        above -= (live & (values > splat(own)));  // true lanes are -1
    });
    const float lse = largest + logf(horizontal_sum(sums));
    int64_t count_above = 0;
    for (int lane = 0; lane < LANES; ++lane) count_above += above[lane];
    *chosen = own - lse;
    *rank = count_above + 1;
    // The k largest: a sorted list, entered only by values above its smallest (few, after the
    // first k: the vector test skips the rest).
    int64_t filled = 0;
    for (int64_t j = 0; j < v && k > 0; j += LANES) {
        const int64_t count = std::min<int64_t>(LANES, v - j);
        const float floor = filled < k ? -INFINITY : top_logprobs[k - 1];
        const Ints live = lane_indices() < Ints{} + int32_t(count);
        const Ints enter = live & ((load(x + j, count) > splat(floor)) | (Ints{} + int32_t(filled < k ? -1 : 0)));
        bool any = false;
        for (int lane = 0; lane < LANES; ++lane) any |= enter[lane] != 0;
        if (!any) continue;
        for (int64_t i = j; i < j + count; ++i) {
            const float value = x[i];
            if (filled == k && !(value > top_logprobs[k - 1])) continue;
            int64_t at = filled < k ? filled++ : k - 1;
            while (at > 0 && top_logprobs[at - 1] < value) {  // after equal values: lower ids first
                top_logprobs[at] = top_logprobs[at - 1];
                top_ids[at] = top_ids[at - 1];
                --at;
            }
            top_logprobs[at] = value;
            top_ids[at] = i;
        }
    }
    for (int64_t i = 0; i < filled; ++i) top_logprobs[i] -= lse;
    for (int64_t i = filled; i < k; ++i) top_ids[i] = -1, top_logprobs[i] = -INFINITY;
}

}  // namespace

// A panel GEMV's entry point gemv_LAYOUT_SUFFIX (every layout takes the same arguments).
#define LLAMA3_DIST_PANEL_GEMV(T, LAYOUT, SUFFIX, GEMV)                                                              \
    int gemv_##LAYOUT##_##SUFFIX(const T* x, const uint32_t* w, const uint16_t* scales, const uint16_t* offsets,     \
                                 const uint16_t* factors, const T* bias, T* y, int64_t m, int64_t n, int64_t k,      \
                                 int64_t group_size) {                                                               \
        return GEMV(x, w, scales, offsets, factors, bias, y, m, n, k, group_size);                                   \
    }

// The C entry points, one set per element type: NAME_bf16 and NAME_f32, in three groups (see
// LLAMA3_DIST_PART below): the kernels one by one, the panel GEMVs, the fused decode.
#define LLAMA3_DIST_EXPORT_KERNELS(T, SUFFIX)                                                                              \
    int gemv_##SUFFIX(const T* x, const T* w, const T* bias, T* y, int64_t m, int64_t n, int64_t k) {                \
        return gemv_rows<T>(x, w, bias, y, m, n, k);                                                                 \
    }                                                                                                                \
    int gemv_int8_##SUFFIX(const T* x, const int8_t* w, const float* scale, const T* bias, T* y, int64_t m,         \
                           int64_t n, int64_t k) {                                                                   \
        return gemv_rows<T, int8_t>(x, w, bias, y, m, n, k, scale);                                                  \
    }                                                                                                                \
    int gemv_q4_##SUFFIX(const T* x, const uint32_t* w, const uint16_t* scales, const uint16_t* offsets,           \
                         const T* bias, T* y, int64_t m, int64_t n, int64_t k, int64_t group_size) {                \
        return grouped_gemv<T, 4>(x, w, scales, offsets, bias, y, m, n, k, group_size);                             \
    }                                                                                                                \
    int gemv_q8_##SUFFIX(const T* x, const uint32_t* w, const uint16_t* scales, const uint16_t* offsets,           \
                         const T* bias, T* y, int64_t m, int64_t n, int64_t k, int64_t group_size) {                \
        return grouped_gemv<T, 8>(x, w, scales, offsets, bias, y, m, n, k, group_size);                             \
    }                                                                                                                \
    int dequantize_q4_##SUFFIX(const uint32_t* w, const uint16_t* scales, const uint16_t* offsets, T* out,         \
                               int64_t n, int64_t k, int64_t group_size) {                                          \
        return grouped_dequantize<T, 4>(w, scales, offsets, out, n, k, group_size);                                 \
    }                                                                                                                \
    int dequantize_q8_##SUFFIX(const uint32_t* w, const uint16_t* scales, const uint16_t* offsets, T* out,         \
                               int64_t n, int64_t k, int64_t group_size) {                                          \
        return grouped_dequantize<T, 8>(w, scales, offsets, out, n, k, group_size);                                 \
    }                                                                                                                \
    void rms_norm_##SUFFIX(const T* x, const T* residual, const T* weight, float eps, T* out, T* h_out, int64_t n,  \
                           int64_t d) {                                                                              \
        rms_norm<T>(x, residual, weight, eps, out, h_out, n, d);                                                     \
    }                                                                                                                \
    void rotary_##SUFFIX(const int64_t* positions, T* q, int64_t q_stride, int64_t hq, T* k, int64_t k_stride,     \
                         int64_t hk, int64_t d, const float* cos_sin, int64_t rot, int interleaved, int64_t n) {     \
        rotary<T>(positions, q, q_stride, hq, k, k_stride, hk, d, cos_sin, rot, interleaved, n);                     \
    }                                                                                                                \
    void store_kv_##SUFFIX(const T* k, int64_t k_stride, const T* v, int64_t v_stride, T* k_cache, T* v_cache,      \
                           const int64_t* slots, int64_t n, int64_t width) {                                         \
        store_kv<T>(k, k_stride, v, v_stride, k_cache, v_cache, slots, n, width);                                    \
    }                                                                                                                \
    void decode_attention_##SUFFIX(const T* q, int64_t q_stride, const T* k_cache, const T* v_cache,                \
                                   const int32_t* block_tables, int64_t max_blocks, const int32_t* context_lens,      \
                                   T* out, int64_t b, int64_t hq, int64_t hk, int64_t d, int64_t block_size,          \
                                   float scale, int64_t window) {                                                    \
        decode_attention<T>(q, q_stride, k_cache, v_cache, block_tables, max_blocks, context_lens, out, b, hq, hk,   \
                            d, block_size, scale, window);                                                            \
    }                                                                                                                \
    void silu_and_mul_##SUFFIX(const T* x, T* out, int64_t n, int64_t inter) { silu_and_mul<T>(x, out, n, inter); }

#define LLAMA3_DIST_EXPORT_PANELS(T, SUFFIX)                                                                      \
    LLAMA3_DIST_PANEL_GEMV(T, panels4, SUFFIX, (panel_gemv<T, 4>))                                                  \
    LLAMA3_DIST_PANEL_GEMV(T, panels8, SUFFIX, (panel_gemv<T, 8>))                                                  \
    LLAMA3_DIST_PANEL_GEMV(T, panels4_exact, SUFFIX, (panel_exact_gemv<T, 4>))                                      \
    LLAMA3_DIST_PANEL_GEMV(T, panels8_exact, SUFFIX, (panel_exact_gemv<T, 8>))                                      \
    LLAMA3_DIST_PANEL_GEMV(T, panels8x15, SUFFIX, (panel_gemv<T, 8, 2>))                                            \
    LLAMA3_DIST_PANEL_GEMV(T, panels6x15, SUFFIX, (panel_gemv<T, 6, 2>))                                            \
    int dequantize_panels6_##SUFFIX(const uint32_t* w, const uint16_t* scales, const uint16_t* offsets,              \
                                    const uint16_t* factors, T* out, int64_t n, int64_t k, int64_t group_size) {     \
        if (offsets || factors) return -1;                                                                           \
        return panel_dequantize6<T>(w, scales, out, n, k, group_size);                                               \
    }                                                                                                                \
    int dequantize_panels4_##SUFFIX(const uint32_t* w, const uint16_t* scales, const uint16_t* offsets,              \
                                const uint16_t* factors, T* out, int64_t n, int64_t k, int64_t group_size) {         \
        return panel_dequantize<T, 4>(w, scales, offsets, factors, out, n, k, group_size);                           \
    }                                                                                                                \
    int dequantize_panels8_##SUFFIX(const uint32_t* w, const uint16_t* scales, const uint16_t* offsets,              \
                                const uint16_t* factors, T* out, int64_t n, int64_t k, int64_t group_size) {         \
        return panel_dequantize<T, 8>(w, scales, offsets, factors, out, n, k, group_size);                           \
    }

#define LLAMA3_DIST_EXPORT_FUSED(T, SUFFIX)                                                                       \
    int attention_block_##SUFFIX(const AttentionBlock* layer, const DecodeStep* step, const T* x, T* residual,     \
                                 T* out, T* k_cache, T* v_cache) {                                                   \
        return attention_block<T>(*layer, *step, x, residual, out, k_cache, v_cache);                                \
    }                                                                                                                \
    int mlp_block_##SUFFIX(const MlpBlock* layer, int64_t m, const T* x, T* residual, T* out) {                     \
        return mlp_block<T>(*layer, m, x, residual, out);                                                            \
    }                                                                                                                \
    int decode_layers_##SUFFIX(const AttentionBlock* attention, const MlpBlock* mlp, T* const* k_caches,           \
                               T* const* v_caches, int64_t layers, const DecodeStep* step, const T* x, T* residual, \
                               T* out, const T* final_norm_weight, float final_eps, T* normed, const Weight* head, \
                               int64_t head_rows, T* head_out, float* logits, int64_t vocab, const int64_t* tokens, \
                               const T* embedding, int64_t embedding_rows, int64_t exact) {                          \
        return decode_layers<T>(attention, mlp, k_caches, v_caches, layers, *step, x, residual, out,                \
                                final_norm_weight, final_eps, normed, head, head_rows, head_out, logits, vocab,      \
                                tokens, embedding, embedding_rows, exact);                                           \
    }

// Compiling this file takes a minute on one core, nearly all of it optimizing the instantiated
// templates (each entry point, element type and row count). cpu.py builds it as PARTS translation
// units in parallel instead (-DLLAMA3_DIST_PART=0 .. PARTS - 1) and links them into one library:
// each part defines one group of entry points, so it instantiates only what those use: per
// element type, the kernels one by one, and the panel GEMVs with the fused decode (which runs the
// same panel templates: apart, both units would optimize them). On a 2-core host the parts take
// 11-22 s each, 63 s in all, as the one unit did. Without LLAMA3_DIST_PART the file is the whole
// library in one unit.
#define LLAMA3_DIST_PARTS 4  // cpu.py reads this line
#if defined(LLAMA3_DIST_PART)
#define LLAMA3_DIST_IN_PART(part) (LLAMA3_DIST_PART == (part))
#else
#define LLAMA3_DIST_IN_PART(part) 1
#endif

extern "C" {

#if LLAMA3_DIST_IN_PART(0)
LLAMA3_DIST_EXPORT_KERNELS(bfloat16, bf16)
#endif
#if LLAMA3_DIST_IN_PART(1)
LLAMA3_DIST_EXPORT_KERNELS(float, f32)
#endif
#if LLAMA3_DIST_IN_PART(2)
LLAMA3_DIST_EXPORT_PANELS(bfloat16, bf16)
LLAMA3_DIST_EXPORT_FUSED(bfloat16, bf16)
#endif
#if LLAMA3_DIST_IN_PART(3)
LLAMA3_DIST_EXPORT_PANELS(float, f32)
LLAMA3_DIST_EXPORT_FUSED(float, f32)
#endif
#if LLAMA3_DIST_IN_PART(0)

// The vector width this library was built for, in bytes (cpu.py checks it against the ISA).
int vector_bytes() { return VECTOR_BYTES; }

// Whether dot4 has byte dot-product instructions here; where it does not (the plain vector
// code), the integer GEMV is slower than the float one and cpu.py packs for the float one.
int native_dot4() {
#if (VECTOR_BYTES == 64 && defined(__AVX512BW__)) || (VECTOR_BYTES == 32 && defined(__AVX2__)) || \
    (VECTOR_BYTES == 16 && defined(__ARM_FEATURE_DOTPROD))
    return 1;
#else
    return 0;
#endif
}

// Whether prompt rows (x exact) meet 4-bit panels by AVX-512 BF16 dot products here
// (panel_dot_tiles): cpu.py keeps more of them in the panels than the float path's.
int bf16_dot_panels() { return BF16_DOT_PANELS; }

// Structured outputs (model/sampler.py): a grammar's allowed tokens come as a packed bitmask,
// bit t % 32 of 32-bit word t / 32 set when token t is allowed. Unpacking it into a [rows, vocab]
// array and scattering -inf costs ~10 ms a step for 64 rows of a 128k vocabulary in numpy;
// reading the words here costs a few microseconds a row (whole words are skipped or filled).

// In place on float32 logits: in row rows[r] (row_stride floats apart), every token whose bit
// is clear in words[r] becomes -inf, as does every token at or past num_words * 32.
void apply_token_bitmask(float* logits, int64_t row_stride, int64_t vocab, const int64_t* rows,
                         const uint32_t* words, int64_t num_rows, int64_t num_words) {
    const int64_t width = std::min(vocab, num_words * 32);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < num_rows; ++r) {
        float* x = logits + rows[r] * row_stride;
        const uint32_t* allowed = words + r * num_words;
        for (int64_t word = 0; word * 32 < width; ++word) {
            const int64_t base = word * 32;
            uint32_t refused = ~allowed[word];
            if (width - base < 32) refused &= (1u << (width - base)) - 1;  // bits past the vocabulary
            if (refused == 0xFFFFFFFFu) {
                for (int j = 0; j < 32; ++j) x[base + j] = -INFINITY;
                continue;
            }
            for (; refused != 0; refused &= refused - 1) x[base + __builtin_ctz(refused)] = -INFINITY;
        }
        for (int64_t t = width; t < vocab; ++t) x[t] = -INFINITY;
    }
}

// The ids of the tokens a row of the bitmask allows (below vocab), ascending, into ids (room
// for `capacity`); returns how many there are (more than capacity: only the first ones written).
int64_t token_bitmask_ids(const uint32_t* words, int64_t num_words, int64_t vocab, int64_t* ids, int64_t capacity) {
    int64_t count = 0;
    for (int64_t word = 0; word < num_words && word * 32 < vocab; ++word)
        for (uint32_t allowed = words[word]; allowed != 0; allowed &= allowed - 1) {
            const int64_t token = word * 32 + __builtin_ctz(allowed);
            if (token >= vocab) break;
            if (count < capacity) ids[count] = token;
            ++count;
        }
    return count;
}

// One draw per row of float32 logits x [rows, v] (row r at x + r * ld): the weights
// exp((x - max) / T) into weights [rows, v] (may be x itself), then the tokens min_p, top_k (0 or
// >= v: off) and top_p (>= 1: off) keep, as sampler.py's _draw_top keeps them, and the first
// kept token in id order whose cumulative weight exceeds u[r] times the kept weight; masses in
// double. A row with no finite logit draws token 0 (as an argmax of it would). Rows in parallel.
void sample_logits(const float* x, int64_t rows, int64_t v, int64_t ld, const float* temperature, const int64_t* top_k,
                   const float* top_p, const float* min_p, const double* u, float* weights, int64_t* out) {
#pragma omp parallel if (rows > 1)
    {
        SortedWeights sorted;
#pragma omp for schedule(dynamic)
        for (int64_t r = 0; r < rows; ++r) {
            float* w = weights + r * v;
            out[r] = row_weights(x + r * ld, v, temperature[r], w)
                         ? sample_row(w, v, top_k[r], top_p[r], min_p[r], u[r], sorted)
                         : 0;
        }
    }
}

// compute_logprobs for rows of float32 logits x [rows, v] (row r at x + r * ld): per row the
// chosen token tokens[r]'s log-probability and rank, and the k most likely tokens' ids and
// log-probabilities ([rows, k], descending). Rows in parallel.
void logprobs_rows(const float* x, int64_t rows, int64_t v, int64_t ld, const int64_t* tokens, int64_t k,
                   float* chosen, int64_t* ranks, int64_t* top_ids, float* top_logprobs) {
#pragma omp parallel for schedule(dynamic) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r)
        row_logprobs(x + r * ld, v, tokens[r], k, chosen + r, ranks + r, top_ids + r * k, top_logprobs + r * k);
}

// Sum of n floats, read once by all threads: the benchmarks' measure of the memory's streaming
// read speed (the floor for a decode step is the weight bytes over it).
float sum_floats(const float* p, int64_t n) {
    constexpr int CHAINS = 4;  // independent accumulators, so that additions overlap
    const int64_t blocks = n / (CHAINS * LANES);
    float total = 0.0f;
#pragma omp parallel reduction(+ : total)
    {
        Floats acc[CHAINS] = {};
#pragma omp for schedule(static)
        for (int64_t block = 0; block < blocks; ++block)
            for (int c = 0; c < CHAINS; ++c) acc[c] += Element<float>::load(p + (block * CHAINS + c) * LANES);
        for (int c = 0; c < CHAINS; ++c) total += horizontal_sum(acc[c]);
    }
    for (int64_t i = blocks * CHAINS * LANES; i < n; ++i) total += p[i];
    return total;
}
#endif
}
