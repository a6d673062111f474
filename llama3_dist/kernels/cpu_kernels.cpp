// CPU kernels for bfloat16 models, loaded by llama3_dist/kernels/cpu.py through ctypes.
//
// Why: on a CPU, a decode step of a small model is a few hundred tiny torch ops (each 3-20 us of
// dispatch) around GEMVs that torch runs below the memory's speed on CPUs without bfloat16
// arithmetic. Here each kernel of the model's decode path (kernels/__init__.py) is one call,
// with the arithmetic of the torch reference (kernels/reference.py): float32 math, rounded to
// bfloat16 where the reference's bfloat16 tensors round, so results agree to float32 summation
// order.
//
// bf16_gemv: decode is bound by reading the weight once per step. torch's bfloat16 GEMV on such
// CPUs streams the weight at 12-15 GB/s; here each 32-byte load of 16 bfloat16 weights is widened
// to float32 in registers (a 16-bit shift, exact) and fused-multiply-added into float32
// accumulators, with software prefetch, so the loop runs near the memory's speed. Several output
// rows are done at once so that their FMA chains overlap and each loaded x chunk serves all of
// them. The result is rounded to bfloat16 (nearest, ties to even) once, as a bfloat16 GEMM with
// float32 accumulation does.
//
// Built at first use by cpu.py with -fopenmp: torch has already loaded its own libgomp.so.1, so
// this library's parallel loops share torch's OpenMP threads.
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#include <algorithm>
#include <vector>

namespace {

// Measured on a 2-core KVM Xeon over the 284M benchmark model's weights: 8-24 KiB ahead are alike
// and ~1.4x faster than no software prefetch; 4 rows per tile beat 2 and 8 for one x row.
constexpr int PREFETCH_BYTES = 16384;

inline __m512 widen(const uint16_t* p, __mmask16 mask) {
    __m256i h = _mm256_maskz_loadu_epi16(mask, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Lanes for the last `left` elements of a loop over 16 at a time.
inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
}

inline float bf16_to_float(uint16_t h) {
    uint32_t bits = uint32_t(h) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);  // quiet NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return uint16_t(bits >> 16);
}

// A float32 value rounded to bfloat16 and back: what storing it in a bfloat16 tensor does.
inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

// exp of 16 floats: Cephes' polynomial on x - k*ln2, then scaled by 2^k (scalef gives inf and 0
// past the float range, and NaN stays NaN). Within 2 float32 ulps of expf.
inline __m512 exp16(__m512 x) {
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, k);
}

// 16 floats rounded to bfloat16 (nearest, ties to even; NaN kept quiet), as 16 bit patterns.
inline __m256i to_bf16(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_or_epi32(rounded, nan, bits, _mm512_set1_epi32(0x400000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

inline __m512 round_bf16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}

inline void store_bf16(uint16_t* p, __mmask16 mask, __m512 v) { _mm256_mask_storeu_epi16(p, mask, to_bf16(v)); }

// Sum over d of widened k[j] * q[j], q already float32.
inline float dot(const uint16_t* k, const float* q, int64_t d) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; j += 16) {
        const __mmask16 mask = tail_mask(d - j);
        acc = _mm512_fmadd_ps(widen(k + j, mask), _mm512_maskz_loadu_ps(mask, q + j), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// acc[j] += p * widened v[j].
inline void axpy(float p, const uint16_t* v, float* acc, int64_t d) {
    const __m512 pv = _mm512_set1_ps(p);
    for (int64_t j = 0; j < d; j += 16) {
        const __mmask16 mask = tail_mask(d - j);
        __m512 a = _mm512_maskz_loadu_ps(mask, acc + j);
        _mm512_mask_storeu_ps(acc + j, mask, _mm512_fmadd_ps(pv, widen(v + j, mask), a));
    }
}

// Rotates the first 2 * half features of one head in place, as reference.rotary_embedding does
// on bfloat16 tensors: c and s are cos and sin already rounded to bfloat16, and every product
// and sum is rounded.
inline void rotate(uint16_t* x, const float* c, const float* s, int64_t half, bool interleaved) {
    if (interleaved) {  // pairs (2j, 2j+1): no Hugging Face checkpoint uses it, kept scalar
        for (int64_t j = 0; j < half; ++j) {
            const float x1 = bf16_to_float(x[2 * j]), x2 = bf16_to_float(x[2 * j + 1]);
            x[2 * j] = float_to_bf16(round_bf16(x1 * c[j]) - round_bf16(x2 * s[j]));
            x[2 * j + 1] = float_to_bf16(round_bf16(x2 * c[j]) + round_bf16(x1 * s[j]));
        }
        return;
    }
    for (int64_t j = 0; j < half; j += 16) {  // j pairs with j + half
        const __mmask16 mask = tail_mask(half - j);
        const __m512 x1 = widen(x + j, mask), x2 = widen(x + half + j, mask);
        const __m512 cv = _mm512_maskz_loadu_ps(mask, c + j), sv = _mm512_maskz_loadu_ps(mask, s + j);
        store_bf16(x + j, mask, _mm512_sub_ps(round_bf16(_mm512_mul_ps(x1, cv)), round_bf16(_mm512_mul_ps(x2, sv))));
        store_bf16(x + half + j, mask,
                   _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, cv)), round_bf16(_mm512_mul_ps(x1, sv))));
    }
}

// R output rows of w against M rows of x (both compile-time, so the R*M accumulators live in
// registers). xf holds x widened to float32, M rows of k_pad floats, zero beyond k.
template <int R, int M>
inline void tile(const float* xf, int64_t k_pad, const uint16_t* w, int64_t k, int64_t n0,
                 float* out /* M x R */) {
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j += 16) {
        const __mmask16 mask = tail_mask(k - j);  // xf is zero past k, so only w needs the mask
        __m512 xv[M];
        for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(xf + m * k_pad + j);
        for (int r = 0; r < R; ++r) {
            // Hardware prefetch alone leaves one core at ~8 GB/s on the machines measured;
            // asking for the line 16 KiB ahead into L2 keeps enough reads in flight.
            _mm_prefetch((const char*)(w + (n0 + r) * k + j) + PREFETCH_BYTES, _MM_HINT_T1);
            __m512 wv = widen(w + (n0 + r) * k + j, mask);
            for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) out[m * R + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <int M>
void gemv(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t n,
          int64_t k) {
    constexpr int R = M <= 2 ? 4 : 2;  // R * M <= 16 accumulators of the 32 zmm registers
    const int64_t k_pad = (k + 15) / 16 * 16;
    std::vector<float> xf(M * k_pad, 0.0f);
    for (int m = 0; m < M; ++m)
        for (int64_t j = 0; j < k; ++j) xf[m * k_pad + j] = bf16_to_float(x[m * k + j]);
    const int64_t tiles = (n + R - 1) / R;
#pragma omp parallel for schedule(guided)  // ~4% faster than static over the benchmark model
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t n0 = t * R;
        float out[M * R];
        const int width = n0 + R <= n ? R : 1;  // a last, partial tile goes one row at a time
        for (int64_t r0 = n0; r0 < n0 + R && r0 < n; r0 += width) {
            if (width == R)
                tile<R, M>(xf.data(), k_pad, w, k, r0, out);
            else
                tile<1, M>(xf.data(), k_pad, w, k, r0, out);
            for (int r = 0; r < width; ++r) {
                const float b = bias ? bf16_to_float(bias[r0 + r]) : 0.0f;
                for (int m = 0; m < M; ++m) y[m * n + r0 + r] = float_to_bf16(out[m * width + r] + b);
            }
        }
    }
}

}  // namespace

extern "C" {

// x: m x k (m from 1 to 8; callers split bigger inputs), w: n x k, bias: n or null, y: m x n, all contiguous bfloat16 (as uint16).
// Returns 0, or -1 if m is out of range.
int bf16_gemv(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t m,
              int64_t n, int64_t k) {
    switch (m) {
        case 1: gemv<1>(x, w, bias, y, n, k); return 0;
        case 2: gemv<2>(x, w, bias, y, n, k); return 0;
        case 3: gemv<3>(x, w, bias, y, n, k); return 0;
        case 4: gemv<4>(x, w, bias, y, n, k); return 0;
        case 5: gemv<5>(x, w, bias, y, n, k); return 0;
        case 6: gemv<6>(x, w, bias, y, n, k); return 0;
        case 7: gemv<7>(x, w, bias, y, n, k); return 0;
        case 8: gemv<8>(x, w, bias, y, n, k); return 0;
        default: return -1;
    }
}

// out = norm(h) (times weight), h = x + residual (or x); float32 statistics, h and the normalised
// value rounded to bfloat16 before the weight multiplies, as transformers' LlamaRMSNorm.
// residual, weight and h_out may be null (no residual: h is x).
void bf16_rms_norm(const uint16_t* x, const uint16_t* residual, const uint16_t* weight, float eps,
                   uint16_t* out, uint16_t* h_out, int64_t n, int64_t d) {
#pragma omp parallel for schedule(static) if (n >= 16)
    for (int64_t i = 0; i < n; ++i) {
        const uint16_t* h = x + i * d;
        if (residual) {  // h = x + residual, rounded to bfloat16 as the reference's add
            for (int64_t j = 0; j < d; j += 16) {
                const __mmask16 mask = tail_mask(d - j);
                store_bf16(h_out + i * d + j, mask,
                           _mm512_add_ps(widen(x + i * d + j, mask), widen(residual + i * d + j, mask)));
            }
            h = h_out + i * d;
        }
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < d; j += 16) {
            const __m512 v = widen(h + j, tail_mask(d - j));
            sum = _mm512_fmadd_ps(v, v, sum);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(sum) / float(d) + eps));
        for (int64_t j = 0; j < d; j += 16) {
            const __mmask16 mask = tail_mask(d - j);
            __m512 v = round_bf16(_mm512_mul_ps(widen(h + j, mask), inv));
            if (weight) v = _mm512_mul_ps(widen(weight + j, mask), v);
            store_bf16(out + i * d + j, mask, v);
        }
    }
}

// Rotary embedding in place on q [n, hq, d] and k [n, hk, d] (rows q_stride / k_stride apart,
// heads contiguous), cos|sin from cos_sin [max_pos, rot] float32.
void bf16_rotary(const int64_t* positions, uint16_t* q, int64_t q_stride, int64_t hq, uint16_t* k,
                 int64_t k_stride, int64_t hk, int64_t d, const float* cos_sin, int64_t rot,
                 int interleaved, int64_t n) {
    const int64_t half = rot / 2;
#pragma omp parallel for schedule(static) if (n >= 16)
    for (int64_t i = 0; i < n; ++i) {
        std::vector<float> c(half), s(half);  // this position's cos and sin, rounded once
        const float* cs = cos_sin + positions[i] * rot;
        for (int64_t j = 0; j < half; ++j) {
            c[j] = round_bf16(cs[j]);
            s[j] = round_bf16(cs[half + j]);
        }
        for (int64_t h = 0; h < hq; ++h) rotate(q + i * q_stride + h * d, c.data(), s.data(), half, interleaved);
        for (int64_t h = 0; h < hk; ++h) rotate(k + i * k_stride + h * d, c.data(), s.data(), half, interleaved);
    }
}

// k, v [n, width] (rows k_stride / v_stride apart) into the paged caches [slots, width] at
// slots[i]; slot -1 is skipped.
void bf16_store_kv(const uint16_t* k, int64_t k_stride, const uint16_t* v, int64_t v_stride,
                   uint16_t* k_cache, uint16_t* v_cache, const int64_t* slots, int64_t n,
                   int64_t width) {
    for (int64_t i = 0; i < n; ++i) {
        if (slots[i] < 0) continue;
        memcpy(k_cache + slots[i] * width, k + i * k_stride, width * sizeof(uint16_t));
        memcpy(v_cache + slots[i] * width, v + i * v_stride, width * sizeof(uint16_t));
    }
}

// One query token per sequence (q [b, hq, d], rows q_stride apart) against its paged K/V
// ([pages, page_size, hk, d]); out [b, hq, d] contiguous. Query heads h*g .. h*g+g-1 share KV
// head h. Float32 scores, softmax and sums; window > 0 keeps the last `window` keys.
void bf16_decode_attention(const uint16_t* q, int64_t q_stride, const uint16_t* k_cache,
                           const uint16_t* v_cache, const int32_t* block_tables, int64_t max_pages,
                           const int32_t* context_lens, uint16_t* out, int64_t b, int64_t hq,
                           int64_t hk, int64_t d, int64_t page_size, float scale, int64_t window) {
    const int64_t g = hq / hk;
    int64_t keys = 0;
    for (int64_t s = 0; s < b; ++s) keys += context_lens[s];
    // Threads only pay off past a few thousand keys: waking them costs more than short contexts.
#pragma omp parallel for schedule(dynamic) if (keys * hk >= 8192)
    for (int64_t task = 0; task < b * hk; ++task) {
        const int64_t s = task / hk, h = task % hk;
        const int64_t ctx = context_lens[s];
        const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
        const int64_t len = ctx - first;
        std::vector<float> qf(g * d), scores(g * len), acc(g * d, 0.0f);
        for (int64_t gi = 0; gi < g; ++gi)
            for (int64_t j = 0; j < d; ++j)
                qf[gi * d + j] = bf16_to_float(q[s * q_stride + (h * g + gi) * d + j]) * scale;
        auto slot = [&](int64_t t) {
            return (int64_t(block_tables[s * max_pages + t / page_size]) * page_size + t % page_size) * hk + h;
        };
        for (int64_t t = 0; t < len; ++t) {
            const uint16_t* kp = k_cache + slot(first + t) * d;
            for (int64_t gi = 0; gi < g; ++gi) scores[gi * len + t] = dot(kp, &qf[gi * d], d);
        }
        for (int64_t gi = 0; gi < g; ++gi) {
            float* sc = &scores[gi * len];
            const __m512 top = _mm512_set1_ps(*std::max_element(sc, sc + len));
            __m512 total = _mm512_setzero_ps();
            for (int64_t t = 0; t < len; t += 16) {
                const __mmask16 mask = tail_mask(len - t);
                const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sc + t), top));
                _mm512_mask_storeu_ps(sc + t, mask, e);
                total = _mm512_add_ps(total, _mm512_maskz_mov_ps(mask, e));
            }
            const __m512 inv_total = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
            for (int64_t t = 0; t < len; t += 16) {
                const __mmask16 mask = tail_mask(len - t);
                _mm512_mask_storeu_ps(sc + t, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, sc + t), inv_total));
            }
        }
        for (int64_t t = 0; t < len; ++t) {
            const uint16_t* vp = v_cache + slot(first + t) * d;
            for (int64_t gi = 0; gi < g; ++gi) axpy(scores[gi * len + t], vp, &acc[gi * d], d);
        }
        for (int64_t gi = 0; gi < g; ++gi)
            for (int64_t j = 0; j < d; ++j)
                out[(s * hq + h * g + gi) * d + j] = float_to_bf16(acc[gi * d + j]);
    }
}

// x [n, 2 * inter] laid out [gate | up] -> SiLU(gate) * up [n, inter], each rounded as torch's
// bfloat16 silu and mul round.
void bf16_silu_and_mul(const uint16_t* x, uint16_t* out, int64_t n, int64_t inter) {
#pragma omp parallel for schedule(static) if (n * inter >= 65536)
    for (int64_t i = 0; i < n; ++i) {
        const uint16_t* gate = x + i * 2 * inter;
        const uint16_t* up = gate + inter;
        for (int64_t j = 0; j < inter; j += 16) {
            const __mmask16 mask = tail_mask(inter - j);
            const __m512 g = widen(gate + j, mask);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            const __m512 silu = round_bf16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
            store_bf16(out + i * inter + j, mask, _mm512_mul_ps(silu, widen(up + j, mask)));
        }
    }
}
}
