// Products by weights held as small integers per group of 32 inputs, dequantized on the fly
// (genlm_bytes/lm/qgemm.py builds and loads this file; its docstring says why and when).
//
// y[m, n] = sum_k x[m, k] * w[n, k], w[n, k] = q[n, k] * scale[n, k / 32] + offset[n, k / 32],
// the weight made by one fused multiply-add (one rounding: the bits the float32 weight had,
// checked by qgemm.py against the weight itself with `dequantize` below). Each output is summed
// in one fixed order (add_group), whatever the number of rows and the tiling: a row comes out
// bit for bit the same in a product of any number of rows.
//
// Layouts, outputs in blocks of 16 (one AVX-512 register):
//   4 bits: codes[N/16][K/2][16] bytes, byte (j, l) = q[16b + l][2j] | q[16b + l][2j + 1] << 4
//   8 bits: codes[N/16][K][16] signed bytes
//   scale, offset: [N/16][K/32][16] float32
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <vector>

namespace {

constexpr int GROUP = 32;
// From TALL_FROM rows on, a tile's weights are made once into a buffer, then multiplied TALL_ROWS
// rows at a time (SmolLM2's products, 2 threads: 4 rows 0.76-1.02x oneDNN's packed float32 ones
// from 16 to 256 rows; 6 rows 0.90-1.04x, 8 rows 0.86-1.13x)
constexpr int TALL_ROWS = 4;
constexpr int TALL_FROM = 16;

// A block of 16 floats: one AVX-512 register, or two AVX2 ones (the same operations lane by
// lane, so both builds give the same bits). AVX2 has half the registers: smaller tiles.
#ifdef __AVX512F__
typedef __m512 V;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vloada(const float* p) { return _mm512_load_ps(p); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline void vstorea(float* p, V v) { _mm512_store_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vset1(float x) { return _mm512_set1_ps(x); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vfrom_u8(const uint8_t* p, int shift) {  // 16 bytes' nibbles (shift 0: low, 4: high) as floats
    __m512i i = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm512_cvtepi32_ps(shift ? _mm512_srli_epi32(i, 4) : _mm512_and_si512(i, _mm512_set1_epi32(15)));
}
inline V vfrom_i8(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
constexpr int MOST_FEW = 8, MOST_MANY = 4;  // blocks a tile takes, for a few rows and for many
constexpr int rows_for(int nb) { return nb == 8 ? 2 : 4; }
#else
struct V { __m256 a, b; };
inline V vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline V vloada(const float* p) { return {_mm256_load_ps(p), _mm256_load_ps(p + 8)}; }
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v.a), _mm256_storeu_ps(p + 8, v.b); }
inline void vstorea(float* p, V v) { _mm256_store_ps(p, v.a), _mm256_store_ps(p + 8, v.b); }
inline V vfma(V a, V b, V c) { return {_mm256_fmadd_ps(a.a, b.a, c.a), _mm256_fmadd_ps(a.b, b.b, c.b)}; }
inline V vset1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline V vadd(V a, V b) { return {_mm256_add_ps(a.a, b.a), _mm256_add_ps(a.b, b.b)}; }
inline __m256 half_u8(__m128i bytes, int shift) {
    __m256i i = _mm256_cvtepu8_epi32(bytes);
    return _mm256_cvtepi32_ps(shift ? _mm256_srli_epi32(i, 4) : _mm256_and_si256(i, _mm256_set1_epi32(15)));
}
inline V vfrom_u8(const uint8_t* p, int shift) {
    __m128i bytes = _mm_loadu_si128((const __m128i*)p);
    return {half_u8(bytes, shift), half_u8(_mm_srli_si128(bytes, 8), shift)};
}
inline V vfrom_i8(const uint8_t* p) {
    __m128i bytes = _mm_loadu_si128((const __m128i*)p);
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)))};
}
constexpr int MOST_FEW = 2, MOST_MANY = 1;
constexpr int rows_for(int nb) { return nb >= 2 ? 2 : 4; }
#endif

template <int BITS>
inline void weights_at(const uint8_t* codes, int64_t k, V s, V o, V& w0, V& w1) {
    // the weights of inputs k and k + 1 (k even) for one block of 16 outputs
    if (BITS == 4) {
        w0 = vfma(vfrom_u8(codes + (k / 2) * 16, 0), s, o);
        w1 = vfma(vfrom_u8(codes + (k / 2) * 16, 4), s, o);
    } else {
        w0 = vfma(vfrom_i8(codes + k * 16), s, o);
        w1 = vfma(vfrom_i8(codes + (k + 1) * 16), s, o);
    }
}

// The sums of group g (of 32 inputs) added to the outputs' (y, which group 0 sets): each output
// is a sum of its groups' sums, each of those summed in order from zero (a float32 sum of 32
// terms, then of K/32; summing all K in one went 2-4x as far from a float64 product).
template <int MT, int NB>
inline void add_group(const V (&acc)[MT][NB], int64_t g, float* y, int64_t ldy) {
    for (int m = 0; m < MT; m++)
        for (int j = 0; j < NB; j++) {
            float* at = y + m * ldy + j * 16;
            vstore(at, g == 0 ? acc[m][j] : vadd(vload(at), acc[m][j]));
        }
}

// MT rows of x by NB blocks of 16 outputs starting at block b0.
template <int BITS, int MT, int NB>
void tile(const float* x, int64_t K, const uint8_t* codes, const float* scale, const float* offset,
          int64_t b0, float* y, int64_t ldy) {
    const int64_t cstride = BITS == 4 ? K / 2 * 16 : K * 16;  // bytes of codes per block
    const int64_t sstride = K / GROUP * 16;                     // floats of scales per block
    V acc[MT][NB];
    for (int64_t g = 0; g < K / GROUP; g++) {
        for (int m = 0; m < MT; m++)
            for (int j = 0; j < NB; j++) acc[m][j] = vzero();
        for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k += 2) {
            for (int j = 0; j < NB; j++) {
                const int64_t b = b0 + j;
                V s = vload(scale + b * sstride + g * 16);
                V o = vload(offset + b * sstride + g * 16);
                V w0, w1;
                weights_at<BITS>(codes + b * cstride, k, s, o, w0, w1);
                for (int m = 0; m < MT; m++) {
                    acc[m][j] = vfma(vset1(x[m * K + k]), w0, acc[m][j]);
                    acc[m][j] = vfma(vset1(x[m * K + k + 1]), w1, acc[m][j]);
                }
            }
        }
        add_group<MT, NB>(acc, g, y + b0 * 16, ldy);
    }
}

template <int BITS, int MT, int NB>
void rows(const float* x, int64_t M, int64_t K, const uint8_t* codes, const float* scale,
          const float* offset, int64_t b0, float* y, int64_t ldy) {
    // every row of x, in tiles of MT rows, by the NB blocks from b0; the last 2 or 3 rows in one
    // tile too (a tile makes each weight once for all its rows), else one by one
    int64_t m = 0;
    for (; m + MT <= M; m += MT) tile<BITS, MT, NB>(x + m * K, K, codes, scale, offset, b0, y + m * ldy, ldy);
    if constexpr (MT > 3)
        if (M - m == 3) return tile<BITS, 3, NB>(x + m * K, K, codes, scale, offset, b0, y + m * ldy, ldy);
    if constexpr (MT > 2)
        if (M - m == 2) return tile<BITS, 2, NB>(x + m * K, K, codes, scale, offset, b0, y + m * ldy, ldy);
    for (; m < M; m++) tile<BITS, 1, NB>(x + m * K, K, codes, scale, offset, b0, y + m * ldy, ldy);
}

// Many rows: the NB blocks' weights made once into a buffer (K x NB*16 floats, in L2), then MT
// rows at a time by them, each sum in the same order as tile's (bit for bit the same outputs).
template <int BITS, int NB>
void make_weights(int64_t K, const uint8_t* codes, const float* scale, const float* offset, int64_t b0,
                  float* wb) {
    const int64_t cstride = BITS == 4 ? K / 2 * 16 : K * 16;
    const int64_t sstride = K / GROUP * 16;
    for (int j = 0; j < NB; j++) {
        const int64_t b = b0 + j;
        for (int64_t k = 0; k < K; k += 2) {
            V s = vload(scale + b * sstride + (k / GROUP) * 16);
            V o = vload(offset + b * sstride + (k / GROUP) * 16);
            V w0, w1;
            weights_at<BITS>(codes + b * cstride, k, s, o, w0, w1);
            vstorea(wb + k * NB * 16 + j * 16, w0);
            vstorea(wb + (k + 1) * NB * 16 + j * 16, w1);
        }
    }
}

template <int MT, int NB>
void tall_tile(const float* x, int64_t K, const float* wb, float* y, int64_t ldy, int64_t b0) {
    V acc[MT][NB];
    for (int64_t g = 0; g < K / GROUP; g++) {
        for (int m = 0; m < MT; m++)
            for (int j = 0; j < NB; j++) acc[m][j] = vzero();
        for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k++) {
            V xb[MT];
            for (int m = 0; m < MT; m++) xb[m] = vset1(x[m * K + k]);
            for (int j = 0; j < NB; j++) {
                V w = vloada(wb + k * NB * 16 + j * 16);
                for (int m = 0; m < MT; m++) acc[m][j] = vfma(xb[m], w, acc[m][j]);
            }
        }
        add_group<MT, NB>(acc, g, y + b0 * 16, ldy);
    }
}

template <int BITS, int NB>
void tall_rows(const float* x, int64_t M, int64_t K, const uint8_t* codes, const float* scale,
               const float* offset, int64_t b0, float* y, int64_t ldy) {
    static thread_local std::vector<float, std::allocator<float>> buffer;
    if ((int64_t)buffer.size() < K * NB * 16 + 16) buffer.resize(K * NB * 16 + 16);
    float* wb = (float*)(((uintptr_t)buffer.data() + 63) & ~(uintptr_t)63);
    make_weights<BITS, NB>(K, codes, scale, offset, b0, wb);
    int64_t m = 0;
    for (; m + TALL_ROWS <= M; m += TALL_ROWS) tall_tile<TALL_ROWS, NB>(x + m * K, K, wb, y + m * ldy, ldy, b0);
    for (; m < M; m++) tall_tile<1, NB>(x + m * K, K, wb, y + m * ldy, ldy, b0);
}

template <int BITS>
void product(const float* x, int64_t M, int64_t K, const uint8_t* codes, const float* scale,
             const float* offset, int64_t N, float* y, int64_t ldy, int threads) {
    const int64_t blocks = N / 16;
    // blocks per tile: the largest of 8, 4, 2, 1 dividing the blocks that leaves each thread
    // several tiles (the last tiles of a thread are what the other waits on); 8 blocks for one
    // row (more sums at once), else 4 by 4 (a block's weights made once for 4 rows, the last 1-3
    // rows in one tile too; 16 sums in registers: 6 rows spilled, 1.2-1.5x slower from 16 rows
    // on). 8 by 2 then 1 took 1.35-1.5x the time of three rows this way (benchmarks/README.md, session 27)
    const int most = M >= 2 ? MOST_MANY : MOST_FEW;
    int nb = 1;
    for (int c : {8, 4, 2}) {
        if (c <= most && blocks % c == 0 && blocks / c >= 4 * threads) { nb = c; break; }
    }
    const int64_t tiles = blocks / nb;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t b0 = t * nb;
        if (M >= TALL_FROM) {
            switch (nb) {
                case 4: tall_rows<BITS, 4>(x, M, K, codes, scale, offset, b0, y, ldy); break;
                case 2: tall_rows<BITS, 2>(x, M, K, codes, scale, offset, b0, y, ldy); break;
                default: tall_rows<BITS, 1>(x, M, K, codes, scale, offset, b0, y, ldy); break;
            }
            continue;
        }
        switch (nb) {
            case 8: rows<BITS, rows_for(8), 8>(x, M, K, codes, scale, offset, b0, y, ldy); break;
            case 4: rows<BITS, rows_for(4), 4>(x, M, K, codes, scale, offset, b0, y, ldy); break;
            case 2: rows<BITS, rows_for(2), 2>(x, M, K, codes, scale, offset, b0, y, ldy); break;
            default: rows<BITS, rows_for(1), 1>(x, M, K, codes, scale, offset, b0, y, ldy); break;
        }
    }
}

}  // namespace

extern "C" {

// y (M rows of ldy floats, the first N written) = x (M, K) by the weights; K a multiple of 32,
// N of 16. Returns 0, or -1 for shapes it does not take.
int qgemm_product(const float* x, int64_t M, int64_t K, const uint8_t* codes, const float* scale,
                  const float* offset, int64_t N, int bits, float* y, int64_t ldy, int threads) {
    if (K % GROUP || N % 16 || M < 0 || ldy < N || (bits != 4 && bits != 8)) return -1;
    if (threads < 1) threads = 1;
    if (bits == 4)
        product<4>(x, M, K, codes, scale, offset, N, y, ldy, threads);
    else
        product<8>(x, M, K, codes, scale, offset, N, y, ldy, threads);
    return 0;
}

// w (N, K) = the weights as the product makes them (to check them against the float32 ones).
int qgemm_dequantize(int64_t K, const uint8_t* codes, const float* scale, const float* offset,
                     int64_t N, int bits, float* w, int threads) {
    if (K % GROUP || N % 16 || (bits != 4 && bits != 8)) return -1;
    const int64_t cstride = bits == 4 ? K / 2 * 16 : K * 16;
    const int64_t sstride = K / GROUP * 16;
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static)
    for (int64_t b = 0; b < N / 16; b++) {
        for (int64_t k = 0; k < K; k += 2) {
            const int64_t g = k / GROUP;
            V s = vload(scale + b * sstride + g * 16);
            V o = vload(offset + b * sstride + g * 16);
            V w0, w1;
            if (bits == 4)
                weights_at<4>(codes + b * cstride, k, s, o, w0, w1);
            else
                weights_at<8>(codes + b * cstride, k, s, o, w0, w1);
            alignas(64) float a[16], c[16];
            vstorea(a, w0);
            vstorea(c, w1);
            for (int l = 0; l < 16; l++) {
                w[(b * 16 + l) * K + k] = a[l];
                w[(b * 16 + l) * K + k + 1] = c[l];
            }
        }
    }
    return 0;
}

}  // extern "C"

namespace {

inline float half_of(float x) { return _cvtsh_ss(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT)); }

// The codes of a group's weights v at scale s and offset o (into q), and whether they make every
// weight as the product does (one fused multiply-add; the sign of a zero aside).
inline bool fits(const float* v, float s, float o, int qlo, int qhi, float* q) {
    bool ok = true;
    for (int i = 0; i < GROUP; i++) {
        float c = s > 0 ? std::nearbyint((v[i] - o) / s) : 0.0f;
        c = c < qlo ? qlo : (c > qhi ? qhi : c);
        q[i] = c;
        ok = ok && std::fma(c, s, o) == v[i];
    }
    return ok;
}

// The least positive difference between two of a group's weights (0 where all are equal).
inline double least_gap(const float* v) {
    double u[GROUP];
    for (int i = 0; i < GROUP; i++) u[i] = v[i];
    std::sort(u, u + GROUP);
    double gap = 0;
    for (int i = 1; i < GROUP; i++) {
        const double d = u[i] - u[i - 1];
        if (d > 0 && (gap == 0 || d < gap)) gap = d;
    }
    return gap;
}

}  // namespace

extern "C" {

// The codes of w (N, K) in the layouts above, per group the first candidate scale that makes its
// weights as the product does (the candidates: 4 bits, offset the group's least
// weight and scale the span over 15 levels, as float16 or not; 8 bits, offset 0 and scale the
// largest magnitude over 127, as float32 or float16; then the least gap between two weights, as
// float16, as it is (4 bits), halved). Returns the groups no candidate made (0: every weight
// made), or -1 for shapes it does not take.
int64_t qgemm_find(const float* w, int64_t N, int64_t K, int bits, uint8_t* codes, float* scale,
                   float* offset, int threads) {
    if (K % GROUP || N % 16 || (bits != 4 && bits != 8)) return -1;
    const int64_t cstride = bits == 4 ? K / 2 * 16 : K * 16;
    const int64_t sstride = K / GROUP * 16;
    int64_t missed = 0;
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static) reduction(+ : missed)
    for (int64_t n = 0; n < N; n++) {
        const int64_t b = n / 16, l = n % 16;
        for (int64_t g = 0; g < K / GROUP; g++) {
            const float* v = w + n * K + g * GROUP;
            float lo = v[0], hi = v[0], amax = std::fabs(v[0]);
            for (int i = 1; i < GROUP; i++) {
                lo = v[i] < lo ? v[i] : lo;
                hi = v[i] > hi ? v[i] : hi;
                amax = std::fabs(v[i]) > amax ? std::fabs(v[i]) : amax;
            }
            // candidate scales, in order (the least gap only if needed)
            const double span = (double)hi - (double)lo;
            const float o = bits == 4 ? lo : 0.0f;
            const int qlo = bits == 4 ? 0 : -128, qhi = bits == 4 ? 15 : 127;
            float cands[5];
            int ncand = 0;
            if (bits == 4) {
                cands[ncand++] = half_of((float)(span / 15.0));
                cands[ncand++] = (float)(span / 15.0);
            } else {
                cands[ncand++] = (float)((double)amax / 127.0);
                cands[ncand++] = half_of((float)((double)amax / 127.0));
            }
            float q[GROUP], s = cands[0];
            bool ok = fits(v, cands[0], o, qlo, qhi, q), gaps = false;
            for (int c = 1; !ok; c++) {
                if (c == ncand) {  // (then the least gap between two weights, as float16, as it is, halved)
                    if (gaps) break;
                    gaps = true;
                    const double gap = least_gap(v);
                    cands[ncand++] = half_of((float)gap);
                    if (bits == 4) cands[ncand++] = (float)gap;
                    cands[ncand++] = half_of((float)(gap / 2));
                }
                s = cands[c];
                ok = fits(v, s, o, qlo, qhi, q);
            }
            if (!ok) s = cands[0], fits(v, s, o, qlo, qhi, q);
            for (int i = 0; i < GROUP; i++) {
                const int64_t k = g * GROUP + i;
                if (bits == 4) {
                    uint8_t* at = codes + b * cstride + (k / 2) * 16 + l;
                    *at = (uint8_t)((k % 2) ? ((*at & 15) | ((int)q[i] << 4)) : (int)q[i]);
                } else {
                    codes[b * cstride + k * 16 + l] = (uint8_t)(int8_t)(int)q[i];
                }
            }
            scale[b * sstride + g * 16 + l] = s;
            offset[b * sstride + g * 16 + l] = o;
            missed += ok ? 0 : 1;
        }
    }
    return missed;
}

}
