// A LLaMA decoder layer of a pass, in three calls (genlm_bytes/lm/fused.py says when it runs):
// everything but the cache's update, around the products by the weights' codes (qgemm_product,
// qgemm.cpp; built into the same library).
//
//   lean_attn_in:  y = rms_norm(x); q, k, v = y by (q, k, v); q, k rotated
//   (the caller's cache takes k and v, and gives back the layer's keys and values)
//   lean_attend:   o = attention(q, keys, values, mask), row by row
//   lean_attn_out: x += o by o_proj; z = rms_norm(x); x += (silu(z by gate) * (z by up)) by down
//
// Each step is the operation transformers' modules (and lean.py's torch calls) compute, in float32,
// with the same roundings where they are one operation each (the rotation: two products and a
// sum; silu: x / (1 + exp(-x)), then the product); sums are in another order.
//
// A layer's weights come as a row of int64 (pointers and shapes: fused.py, FusedLayers.table).
#include <immintrin.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <vector>

extern "C" int qgemm_product(const float* x, int64_t M, int64_t K, const uint8_t* codes, const float* scale,
                             const float* offset, int64_t N, int bits, float* y, int64_t ldy, int threads);

namespace {

// The table of one layer (fused.py writes it in this order).
enum {
    NORM1, QKV_CODES, QKV_SCALE, QKV_OFFSET, QKV_N, QKV_BITS,
    O_CODES, O_SCALE, O_OFFSET, O_BITS,
    NORM2, GU_CODES, GU_SCALE, GU_OFFSET, GU_N, GU_BITS,
    DOWN_CODES, DOWN_SCALE, DOWN_OFFSET, DOWN_BITS,
    TABLE_SIZE
};

template <class T>
inline T* ptr(const int64_t* tab, int i) { return reinterpret_cast<T*>(tab[i]); }

int product(const int64_t* tab, int at, const float* x, int64_t M, int64_t K, int64_t N, float* y, int threads) {
    // x (M, K) by the matrix whose codes start at entry ``at`` of the table (codes, scale, offset[, N], bits)
    const int bits = (int)tab[at == QKV_CODES || at == GU_CODES ? at + 4 : at + 3];
    return qgemm_product(x, M, K, ptr<const uint8_t>(tab, at), ptr<const float>(tab, at + 1),
                         ptr<const float>(tab, at + 2), N, bits, y, N, threads);
}

// exp of 8 lanes: 2^n * p(r), r = x - n ln 2 (Cephes' polynomial); 0 below -87.3
// (a hidden key's score: its weight is exactly 0), infinity above 88.7.
inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.7f);
    __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    // 2^n in two halves (n down to -126 and up to 128 stays a normal float in each)
    __m256i ni = _mm256_cvtps_epi32(n);
    __m256i h1 = _mm256_srai_epi32(ni, 1), h2 = _mm256_sub_epi32(ni, h1);
    const __m256i bias = _mm256_set1_epi32(127);
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h1, bias), 23)));
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h2, bias), 23)));
    p = _mm256_blendv_ps(p, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
    return _mm256_blendv_ps(p, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
}

inline float hsum8(__m256 v) {  // (lanes i and i + 4, then i and i + 2, then the two left)
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

void rms_norm(const float* x, int64_t T, int64_t H, const float* w, float eps, float* y) {
    // y = x / sqrt(mean(x^2) + eps) * w, row by row (H a multiple of 8)
    for (int64_t t = 0; t < T; t++) {
        const float* xr = x + t * H;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < H; i += 8) {
            __m256 v = _mm256_loadu_ps(xr + i);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        const float r = 1.0f / std::sqrt(hsum8(acc) / (float)H + eps);
        for (int64_t i = 0; i < H; i++) y[t * H + i] = (xr[i] * r) * w[i];
    }
}

void rotate(const float* src, const float* cos, const float* sin, int64_t d, float* out) {
    // the "rotate half" rotary embedding of one head: x * cos + [-x2, x1] * sin
    const int64_t half = d / 2;
    for (int64_t j = 0; j < half; j++) {
        const float a = src[j] * cos[j], b = -src[j + half] * sin[j];
        out[j] = a + b;
    }
    for (int64_t j = half; j < d; j++) {
        const float a = src[j] * cos[j], b = src[j - half] * sin[j];
        out[j] = a + b;
    }
}

void attend(const float* q, int64_t T, int64_t h, int64_t hk, int64_t d, const float* K, int64_t ksh,
            int64_t ksl, const float* V, int64_t vsh, int64_t vsl, int64_t L, const float* mask, float scaling,
            int64_t hq, float* o) {
    // o (T, h * d), query head hq of one row: per token, softmax(q . keys * scaling + mask) by the
    // values of its key/value head (hq / (h / hk)); d a multiple of 8; no key seen: zeros
    static thread_local std::vector<float> s;
    if ((int64_t)s.size() < L + 8) s.resize(L + 8);
    const float* Kh = K + (hq / (h / hk)) * ksh;
    const float* Vh = V + (hq / (h / hk)) * vsh;
    for (int64_t t = 0; t < T; t++) {
        const float* qt = q + (hq * T + t) * d;
        const float* mt = mask ? mask + t * L : nullptr;
        float top = -INFINITY;
        for (int64_t l = 0; l < L; l++) {
            const float* kl = Kh + l * ksl;
            __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(qt), _mm256_loadu_ps(kl));
            for (int64_t j = 8; j < d; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qt + j), _mm256_loadu_ps(kl + j), acc);
            float v = hsum8(acc) * scaling;
            if (mt) v += mt[l];
            s[l] = v;
            top = v > top ? v : top;
        }
        float* ot = o + t * h * d + hq * d;
        for (int64_t j = 0; j < d; j++) ot[j] = 0.0f;
        if (!(top > -1e30f)) continue;  // (a padding token that sees no key)
        int64_t l = 0;
        __m256 tot = _mm256_setzero_ps();
        for (; l + 8 <= L; l += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(&s[l]), _mm256_set1_ps(top)));
            _mm256_storeu_ps(&s[l], e);
            tot = _mm256_add_ps(tot, e);
        }
        float sum = hsum8(tot);
        if (l < L) {  // (the last keys, padded with hidden ones)
            alignas(32) float tail[8];
            for (int i = 0; i < 8; i++) tail[i] = l + i < L ? s[l + i] - top : -INFINITY;
            __m256 e = exp8(_mm256_load_ps(tail));
            _mm256_store_ps(tail, e);
            for (int i = 0; l + i < L; i++) s[l + i] = tail[i], sum += tail[i];
        }
        for (l = 0; l < L; l++) {
            const float p = s[l] / sum;
            if (p == 0.0f) continue;
            const float* vl = Vh + l * vsl;
            const __m256 pb = _mm256_set1_ps(p);
            for (int64_t j = 0; j < d; j += 8)
                _mm256_storeu_ps(ot + j, _mm256_fmadd_ps(pb, _mm256_loadu_ps(vl + j), _mm256_loadu_ps(ot + j)));
        }
    }
}

std::vector<float>& scratch(int i, int64_t n) {
    static thread_local std::vector<float> bufs[4];
    if ((int64_t)bufs[i].size() < n) bufs[i].resize(n);
    return bufs[i];
}

}  // namespace

extern "C" {

// x (B * T, H) -> q (B, h, T, d), k and v (B, hk, T, d); cos, sin (B, T, d). Returns 0, or -1 for
// shapes it does not take.
int lean_attn_in(const int64_t* tab, const float* x, int64_t B, int64_t T, int64_t H, float eps, const float* cos,
                 const float* sin, int64_t h, int64_t hk, int64_t d, float* q, float* k, float* v, int threads) {
    const int64_t N = tab[QKV_N], M = B * T;
    if (H % 32 || d % 8 || N != (h + 2 * hk) * d || M < 1) return -1;
    float* y = scratch(0, M * H).data();
    float* qkv = scratch(1, M * N).data();
    rms_norm(x, M, H, ptr<const float>(tab, NORM1), eps, y);
    if (product(tab, QKV_CODES, y, M, H, N, qkv, threads)) return -1;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            const float* row = qkv + (b * T + t) * N;
            const float *c = cos + (b * T + t) * d, *sn = sin + (b * T + t) * d;
            for (int64_t i = 0; i < h; i++) rotate(row + i * d, c, sn, d, q + ((b * h + i) * T + t) * d);
            for (int64_t i = 0; i < hk; i++) {
                rotate(row + (h + i) * d, c, sn, d, k + ((b * hk + i) * T + t) * d);
                const float* src = row + (h + hk + i) * d;
                std::copy(src, src + d, v + ((b * hk + i) * T + t) * d);
            }
        }
    return 0;
}

// Attention of B rows: q (B, h, T, d); keys and values L per row and key/value head, at strides
// (row, head, position) in floats, the last dimension contiguous; mask (B, T, L) added to the
// scores, or null (every key seen); o (B, T, h * d).
int lean_attend(const float* q, int64_t B, int64_t T, int64_t h, int64_t hk, int64_t d, const float* K,
                int64_t ksb, int64_t ksh, int64_t ksl, const float* V, int64_t vsb, int64_t vsh, int64_t vsl,
                int64_t L, const float* mask, float scaling, float* o, int threads) {
    if (d % 8 || h % hk || B < 1 || T < 1) return -1;
    const int64_t jobs = B * h;
    const bool many = jobs > 1 && jobs * T * L * d > (1 << 18);  // (worth a parallel region)
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static) if (many)
    for (int64_t j = 0; j < jobs; j++) {
        const int64_t b = j / h;
        attend(q + b * h * T * d, T, h, hk, d, K + b * ksb, ksh, ksl, V + b * vsb, vsh, vsl, L,
               mask ? mask + b * T * L : nullptr, scaling, j % h, o + b * T * h * d);
    }
    return 0;
}

// The rest of the layer on x (M, H), in place, from the attention's output o (M, h * d): the output
// product and residual, the norm, the MLP (width I) and residual.
int lean_attn_out(const int64_t* tab, float* x, int64_t M, int64_t H, float eps, const float* o, int64_t hd,
                  int64_t I, int threads) {
    if (H % 32 || I % 32 || hd % 32 || tab[GU_N] != 2 * I || M < 1) return -1;
    float* tmp = scratch(1, M * (H > 2 * I ? H : 2 * I)).data();
    if (product(tab, O_CODES, o, M, hd, H, tmp, threads)) return -1;
    for (int64_t i = 0; i < M * H; i++) x[i] += tmp[i];
    float* z = scratch(2, M * H).data();
    rms_norm(x, M, H, ptr<const float>(tab, NORM2), eps, z);
    if (product(tab, GU_CODES, z, M, H, 2 * I, tmp, threads)) return -1;
    float* a = scratch(3, M * I).data();
    for (int64_t r = 0; r < M; r++) {
        const float* gt = tmp + r * 2 * I;
        for (int64_t j = 0; j < I; j += 8) {
            __m256 gv = _mm256_loadu_ps(gt + j);
            __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
            _mm256_storeu_ps(a + r * I + j, _mm256_mul_ps(silu, _mm256_loadu_ps(gt + I + j)));
        }
    }
    if (product(tab, DOWN_CODES, a, M, I, H, tmp, threads)) return -1;
    for (int64_t i = 0; i < M * H; i++) x[i] += tmp[i];
    return 0;
}

}  // extern "C"
