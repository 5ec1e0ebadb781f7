"""Native row-wise top-k routines for the fast attention kernels, compiled on first use with the system C compiler.

Why: top-k over a (queries × past) score matrix is the single largest cost of a memory lookup on CPU.
`torch.topk` copies every row into (value, index) pairs before selecting (measured: 0.2 s for 4,608 rows of
16K scores with k=128, twice the matmul that produced them). Here one pass takes block maxima, whose k-th best
bounds the row's k-th best from below; only the few entries above that bound are candidates, and the exact k-th
best among them is found by counting (branch-free) rather than by a heap or a quickselect.
Ties go to the earlier index, exactly (`kernels.stable_topk`'s rule). `select_exact` is the second routine:
LongCache's exact top-k from approximate bf16 scores (AMX), re-scoring in fp32 only the keys the bf16 error bound
cannot rule out (`select_exact_amx`: int8 scores from AMX tiles inside the kernel). For decoding with memory:
`lookup_bf16` (the same exact top-k through a bf16 copy of the keys) and `decode_attend` (the memory layer's softmax
and weighted sums). The rest are small per-chunk routines that replace runs of small torch ops (`bf16_copy_append`,
`candidate_copies`, `key_flags`).

The C source below is compiled once into the infinictx cache (keyed by its hash and the compiler flags) and
called through ctypes (which releases the GIL). Built with OpenMP where torch runs on one OpenMP runtime, each
call splits its rows over torch's own intra-op threads; otherwise large calls are split over a thread pool.
Without a C compiler, or if the build fails, `available()` is False and callers use torch's path: the results
are the same, only slower. `INFINICTX_NATIVE=0` switches it off, `INFINICTX_NATIVE_OPENMP=0` its OpenMP."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#if defined(_OPENMP)
#include <omp.h>
#else   /* built without OpenMP: one thread */
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* The exported routines take a range of rows (keys) and `threads`: the range is split over that many threads of
   the OpenMP runtime torch itself runs on (its workers wait, spinning, right after each torch op: no second
   pool competes with them for the cores), each part handled by the routine's `_range` body. Return codes: the
   lowest negative one (out of memory), else the highest (1: NaN scores), else 0. */
#define PARALLEL_RANGE(threads, r0, r1, lo, hi, CALL)                                                        \
    int lowest = 0, highest = 0;                                                                             \
    _Pragma("omp parallel num_threads(threads) reduction(min:lowest) reduction(max:highest)")                 \
    {                                                                                                        \
        int64_t part_ = omp_get_thread_num(), parts_ = omp_get_num_threads();                               \
        int64_t lo = (r0) + ((r1) - (r0)) * part_ / parts_, hi = (r0) + ((r1) - (r0)) * (part_ + 1) / parts_; \
        int code_ = (CALL);                                                                                  \
        lowest = code_;                                                                                      \
        highest = code_;                                                                                     \
    }                                                                                                        \
    return lowest < 0 ? lowest : highest;

/* 1 when built with OpenMP (the routines then split their work over `threads` threads), else 0 */
int has_openmp(void) {
#if defined(_OPENMP)
    return 1;
#else
    return 0;
#endif
}

/* heap order: a is "below" b when its value is smaller, or equal with a later index (evicted first) */
static inline int below(float av, int64_t ai, float bv, int64_t bi) {
    return av < bv || (av == bv && ai > bi);
}

static void sift_down(float *v, int64_t *ix, int64_t k, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < k && below(v[l], ix[l], v[m], ix[m])) m = l;
        if (r < k && below(v[r], ix[r], v[m], ix[m])) m = r;
        if (m == i) return;
        float tv = v[i]; v[i] = v[m]; v[m] = tv;
        int64_t ti = ix[i]; ix[i] = ix[m]; ix[m] = ti;
        i = m;
    }
}

/* the k largest of x[0..n-1] (k <= n) into a min-heap (v, ix), ties to the earlier index; positions are
   reported through pos[] (pos == NULL: the index itself) */
static void heap_topk(const float *x, const int64_t *pos, int64_t n, int64_t k, float *v, int64_t *ix) {
    for (int64_t j = 0; j < k; j++) { v[j] = x[j]; ix[j] = pos ? pos[j] : j; }
    for (int64_t i = k / 2 - 1; i >= 0; i--) sift_down(v, ix, k, i);
    float floor = v[0];
    for (int64_t j = k; j < n; j++) {
        if (x[j] > floor) {   /* strictly: an equal later score never displaces an earlier one */
            v[0] = x[j]; ix[0] = pos ? pos[j] : j;
            sift_down(v, ix, k, 0);
            floor = v[0];
        }
    }
}


/* floats as unsigned keys in the same order (NaN: 0, below every number, so it is passed over) */
static inline uint32_t order_key(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0;
    if (u == 0x80000000u) u = 0;   /* −0 = +0: equal floats, equal keys */
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static inline float from_order_key(uint32_t key) {
    uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* the largest key t with at least k of keys[0..n-1] >= t: the k-th largest key (0 when fewer than k are above
   0, i.e. fewer than k numbers), built bit by bit from the top, each bit kept when at least k keys reach the
   prefix: 32 branch-free counting passes (vectorised by the compiler) instead of a quickselect, whose
   data-dependent branches mispredicted on about every other comparison (k = 128 over 512 block maxima: ~2/3 of a
   memory lookup's selection time) */
static uint32_t kth_key(const uint32_t *keys, int64_t n, int64_t k) {
    uint32_t t = 0;
    for (int bit = 31; bit >= 0; bit--) {
        uint32_t c = t | (1u << bit);
        int64_t count = 0;
        for (int64_t i = 0; i < n; i++) count += keys[i] >= c;
        if (count >= k) t = c;
    }
    return t;
}

/* the k-th largest of x[0..n-1] (1 <= k), NaN entries passed over (−inf when fewer than k numbers), x unchanged
   (keys: room for n) */
static float kth_largest(const float *x, uint32_t *keys, int64_t n, int64_t k) {
    for (int64_t i = 0; i < n; i++) keys[i] = order_key(x[i]);
    uint32_t t = kth_key(keys, n, k);
    return t == 0 ? -INFINITY : from_order_key(t);
}

/* the k largest of x[0..n-1] (1 <= k <= n), ties to the earlier entry, into (v, ix) in index order; ix gets
   pos[i] (pos == NULL: i). keys: room for n. No heap: the k-th largest key exactly (`kth_key`), then one pass
   takes every entry above it and the first ties. Returns 1 (nothing written) when fewer than k entries are
   numbers (NaN), else 0. */
static int select_k(const float *x, const int64_t *pos, int64_t n, int64_t k, uint32_t *keys, float *v,
                    int64_t *ix) {
    for (int64_t i = 0; i < n; i++) keys[i] = order_key(x[i]);
    uint32_t t = kth_key(keys, n, k);
    if (t == 0) return 1;
    int64_t above = 0;
    for (int64_t i = 0; i < n; i++) above += keys[i] > t;
    int64_t ties = k - above, m = 0;
    for (int64_t i = 0; i < n && m < k; i++) {
        if (keys[i] > t || (keys[i] == t && ties-- > 0)) {
            v[m] = x[i];
            ix[m] = pos ? pos[i] : i;
            m++;
        }
    }
    return 0;
}

/* the k-th largest of x[0..n-1] (1 <= k <= n), x unchanged (work: room for n): for a small k a sorted list of the
   k best so far, rarely touched after the first entries (the bf16 selection's scan of 1,152 rows × 16K keys took
   5 ms instead of 15 for LongCache's k = 4), else `kth_largest`; NaN entries are passed over */
static float kth_best(const float *x, uint32_t *work, int64_t n, int64_t k) {
    if (k <= 16) {
        float best[16];
        for (int64_t i = 0; i < k; i++) best[i] = -INFINITY;
        for (int64_t b = 0; b < n; b++) {
            float v = x[b];
            if (v > best[k - 1]) {
                int64_t i = k - 1;
                for (; i > 0 && best[i - 1] < v; i--) best[i] = best[i - 1];
                best[i] = v;
            }
        }
        return best[k - 1];
    }
    return kth_largest(x, work, n, k);
}

/* For rows r0..r1-1 of a row-major matrix s (row stride ld, n columns): the k largest entries of each row,
   ties to the earlier index, into out_v / out_i (row stride k), in index order (heap order for a row with NaN
   scores). Requires 1 <= k <= n. The k-th largest block maximum is a lower bound on the row's k-th largest entry
   (the k best blocks each hold an entry at least that large), so only entries at or above it can be among the
   k largest: one pass for the block maxima, one to collect those few candidates (in index order), then
   `select_k` over the candidates. */
static int topk_rows_range(const float *s, int64_t ld, int64_t n, int64_t k, int64_t r0, int64_t r1,
                           float *out_v, int64_t *out_i) {
    /* blocks of 8, 16 or 32: at least 4k blocks where the row is long enough, so that the k best blocks are a
       small part of it; under 2k blocks (too few to prune) the row is selected whole */
    const int64_t BLOCK = n >= 128 * k ? 32 : (n >= 64 * k ? 16 : 8);
    int64_t nb = (n + BLOCK - 1) / BLOCK;
    float *maxima = malloc(sizeof(float) * nb), *cand = malloc(sizeof(float) * n);
    uint32_t *work = malloc(sizeof(uint32_t) * n);
    int64_t *pos = malloc(sizeof(int64_t) * n);
    if (!maxima || !cand || !work || !pos) {
        free(maxima); free(cand); free(work); free(pos);
        return -1;
    }
    for (int64_t r = r0; r < r1; r++) {
        const float *row = s + r * ld;
        float *v = out_v + r * k;
        int64_t *ix = out_i + r * k;
        if (nb < 2 * k) {   /* too few blocks to prune much: the whole row */
            if (select_k(row, 0, n, k, work, v, ix))
                heap_topk(row, 0, n, k, v, ix);   /* NaN scores: the plain heap */
            continue;
        }
        int64_t full = n / BLOCK, b0 = 0;
#if defined(__AVX512F__)
        if (BLOCK == 32)   /* the compiler does not vectorise the loop below: explicit AVX-512 (4x faster) */
            for (; b0 < full; b0++) {
                const float *p = row + b0 * BLOCK;
                maxima[b0] = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(p + 16)));
            }
#endif
        for (int64_t b = b0; b < full; b++) {
            const float *p = row + b * BLOCK;
            float acc[8];
            for (int i = 0; i < 8; i++) acc[i] = p[i];
            for (int j = 8; j < BLOCK; j += 8)
                for (int i = 0; i < 8; i++) acc[i] = acc[i] > p[j + i] ? acc[i] : p[j + i];
            float m = acc[0];
            for (int i = 1; i < 8; i++) m = acc[i] > m ? acc[i] : m;
            maxima[b] = m;
        }
        if (full < nb) {   /* the short last block */
            float m = row[full * BLOCK];
            for (int64_t j = full * BLOCK + 1; j < n; j++) m = row[j] > m ? row[j] : m;
            maxima[full] = m;
        }
        float tau = kth_best(maxima, work, nb, k);
        int64_t c = 0;
        for (int64_t b = 0; b < nb; b++) {   /* only blocks whose maximum reaches tau hold candidates */
            if (!(maxima[b] >= tau)) continue;
            int64_t j = b * BLOCK, e = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
#if defined(__AVX512F__)
            /* 16 entries per compare, the passing ones compress-stored (a scalar loop mispredicts its branch on
               about every other entry of these blocks) */
            const __m512 vtau = _mm512_set1_ps(tau);
            const __m512i lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
            for (; j + 16 <= e; j += 16) {
                __m512 x = _mm512_loadu_ps(row + j);
                __mmask16 m = _mm512_cmp_ps_mask(x, vtau, _CMP_GE_OQ);
                if (!m) continue;
                _mm512_mask_compressstoreu_ps(cand + c, m, x);
                __mmask8 lo = (__mmask8)(m & 0xFF), hi8 = (__mmask8)(m >> 8);
                _mm512_mask_compressstoreu_epi64(pos + c, lo, _mm512_add_epi64(_mm512_set1_epi64(j), lanes));
                int64_t c_lo = c + __builtin_popcount((unsigned)lo);
                _mm512_mask_compressstoreu_epi64(pos + c_lo, hi8, _mm512_add_epi64(_mm512_set1_epi64(j + 8), lanes));
                c += __builtin_popcount((unsigned)m);
            }
#endif
            for (; j < e; j++) {
                if (row[j] >= tau) { cand[c] = row[j]; pos[c] = j; c++; }
            }
        }
        /* c >= k unless there are NaN scores (fewer than k comparable entries): then the plain heap over the row */
        if (c < k || select_k(cand, pos, c, k, work, v, ix))
            heap_topk(row, 0, n, k, v, ix);
    }
    free(maxima); free(cand); free(work); free(pos);
    return 0;
}

int topk_rows(const float *s, int64_t ld, int64_t n, int64_t k, int64_t r0, int64_t r1,
              float *out_v, int64_t *out_i, int64_t threads) {
    PARALLEL_RANGE(threads, r0, r1, lo, hi, topk_rows_range(s, ld, n, k, lo, hi, out_v, out_i))
}


static inline float bf16_value(uint16_t h) {
    union { uint32_t u; float f; } x;
    x.u = (uint32_t)h << 16;
    return x.f;
}

/* the largest of 32 bf16 values as a float: with AVX-512 one load, each 32-bit lane's two halves widened in
   place (a bf16 is the top half of a float), one max, one reduction */
#if defined(__AVX512F__)
static inline float block32_max_bf16(const uint16_t *p) {
    __m512i v = _mm512_loadu_si512((const void *)p);
    __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
    return _mm512_reduce_max_ps(_mm512_max_ps(even, odd));
}
#else
static inline float block32_max_bf16(const uint16_t *p) {
    float m = bf16_value(p[0]);
    for (int i = 1; i < 32; i++) { float f = bf16_value(p[i]); m = f > m ? f : m; }
    return m;
}
#endif

/* fp32 dot product of q and k (D values), in one fixed summation order for every key (identical keys score
   identically) */
static inline float dot_fixed(const float *q, const float *kj, int64_t D) {
#if defined(__AVX512F__)
    if (D % 16 == 0) {
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(kj));
        for (int64_t i = 16; i < D; i += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(kj + i), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= D; i += 8)
        for (int l8 = 0; l8 < 8; l8++) acc[l8] += q[i + l8] * kj[i + l8];
    for (; i < D; i++) acc[i % 8] += q[i] * kj[i];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* cs[i] = q·key[ci[i]] in fp32 (`dot_fixed`) for the c candidates, pos[i] = ci[i]; the next keys' cache lines are
   prefetched (the loads are independent: no heap work between them) */
static void rescore(const float *qr, const float *kh, int64_t k_rs, int64_t D, const int32_t *ci, int64_t c,
                    float *cs, int64_t *pos) {
    const int64_t AHEAD = 6;
    for (int64_t i = 0; i < c; i++) {
        if (i + AHEAD < c) {
            const char *p = (const char *)(kh + (int64_t)ci[i + AHEAD] * k_rs);
            for (int64_t l = 0; l < D * 4; l += 64) __builtin_prefetch(p + l);
        }
        cs[i] = dot_fixed(qr, kh + (int64_t)ci[i] * k_rs, D);
        pos[i] = ci[i];
    }
}

/* Exact top-k by fp32 q·k from bf16 scores that are only close to it. For each row t in r0..r1-1 of a set of
   H heads × R rows (head t / R, row t % R): s holds the row's bf16 scores of n keys, and
   d(j) = eps[t]·kn[j] + eps2[t]·kn2[j] + rel·|s_j| + slack[t] bounds |bf16 score − exact score| of key j (kn,
   kn2: two per-key weights, e.g. norms; bn, bn2: their maxima over blocks of 32). s ± rel·|s| grows with s, so
   a block's best bf16 score m gives m ± (eps·bn + eps2·bn2 + rel·|m| + slack): a lower bound on the exact
   score of its best key and an upper bound on every key's; every key whose exact score can reach the k-th
   largest lower bound (the k blocks holding those are k distinct keys) is a candidate. Keys marked in `excl` (NULL:
   none) are never candidates: each has at least k earlier keys bit-identical to it, which score exactly as it does
   and win the tie, so it cannot be among the k best (and the bound above still holds: those twins score at least
   what it scores). The candidates are collected first (AVX-512: 16 keys per compare, compress-stored), then
   re-scored in fp32 from q and the fp32 keys with the next ones' cache lines prefetched (the loads are independent:
   no heap work between them), and a heap keeps the k best, ties to the earlier index. out_i gets the k indices
   (heap order), ncand the count re-scored. Returns 0, or 1 when a row had fewer than k candidates (only with NaN
   scores: the caller falls back). */
static int select_exact_range(const uint16_t *s, int64_t s_hs, int64_t s_rs,
                              const float *q, int64_t q_hs, int64_t q_rs,
                              const float *keys, int64_t k_hs, int64_t k_rs,
                              const float *kn, int64_t kn_hs, const float *bn, int64_t bn_hs, const float *eps,
                              const float *kn2, int64_t kn2_hs, const float *bn2, int64_t bn2_hs, const float *eps2,
                              float rel, const float *slack, const uint8_t *excl, int64_t ex_hs,
                              int64_t R, int64_t D, int64_t n, int64_t k, int64_t r0, int64_t r1,
                              int64_t *out_i, int64_t *ncand) {
    const int64_t BLOCK = 32;
    int64_t nb = (n + BLOCK - 1) / BLOCK, full = n / BLOCK, status = 0;
    float *ub = malloc(sizeof(float) * nb), *lb = malloc(sizeof(float) * nb);
    uint32_t *work = malloc(sizeof(uint32_t) * nb);
    float *hv = malloc(sizeof(float) * k), *cs = malloc(sizeof(float) * n);
    int32_t *ci = malloc(sizeof(int32_t) * (n + 16));
    int64_t *pos = malloc(sizeof(int64_t) * n);
    if (!ub || !lb || !work || !hv || !cs || !ci || !pos) {
        free(ub); free(lb); free(work); free(hv); free(cs); free(ci); free(pos);
        return -1;
    }
    for (int64_t t = r0; t < r1; t++) {
        int64_t h = t / R, r = t % R;
        const uint16_t *row = s + h * s_hs + r * s_rs;
        const float *qr = q + h * q_hs + r * q_rs, *kh = keys + h * k_hs, *norm = kn + h * kn_hs;
        const float *bnorm = bn + h * bn_hs, *norm2 = kn2 + h * kn2_hs, *bnorm2 = bn2 + h * bn2_hs;
        const uint8_t *ex = excl ? excl + h * ex_hs : 0;
        const float e = eps[t], e2 = eps2[t], sl = slack[t];
        int64_t *ix = out_i + t * k;
        for (int64_t b = 0; b < full; b++) ub[b] = block32_max_bf16(row + b * BLOCK);
        if (full < nb) {   /* the short last block */
            float m = bf16_value(row[full * BLOCK]);
            for (int64_t j = full * BLOCK + 1; j < n; j++) { float f = bf16_value(row[j]); m = f > m ? f : m; }
            ub[full] = m;
        }
        for (int64_t b = 0; b < nb; b++) {
            float d = e * bnorm[b] + e2 * bnorm2[b] + rel * fabsf(ub[b]) + sl;
            lb[b] = ub[b] - d;
            ub[b] += d;
        }
        /* the k blocks with the best lower bounds hold k distinct keys scoring at least tau exactly */
        float tau = kth_best(lb, work, nb, k);
        int64_t c = 0;
        for (int64_t b = 0; b < nb; b++) {
            if (!(ub[b] >= tau)) continue;
            int64_t j = b * BLOCK, j1 = j + BLOCK < n ? j + BLOCK : n;
#if defined(__AVX512F__)
            const __m512 ve = _mm512_set1_ps(e), ve2 = _mm512_set1_ps(e2), vrel = _mm512_set1_ps(rel);
            const __m512 vsl = _mm512_set1_ps(sl), vtau = _mm512_set1_ps(tau);
            const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            for (; j + 16 <= j1; j += 16) {   /* key j passes when bf16 score + its bound >= tau */
                __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + j)));
                __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
                __m512 w = _mm512_fmadd_ps(ve2, _mm512_loadu_ps(norm2 + j),
                                           _mm512_mul_ps(ve, _mm512_loadu_ps(norm + j)));
                __m512 up = _mm512_add_ps(_mm512_add_ps(w, sc), _mm512_fmadd_ps(vrel, _mm512_abs_ps(sc), vsl));
                __mmask16 m = _mm512_cmp_ps_mask(up, vtau, _CMP_GE_OQ);
                if (ex) m &= _mm512_cmpeq_epi32_mask(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ex + j))),
                                                     _mm512_setzero_si512());
                if (m) {
                    __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int)j), lanes);
                    _mm512_mask_compressstoreu_epi32(ci + c, m, idx);
                    c += __builtin_popcount((unsigned)m);
                }
            }
#endif
            for (; j < j1; j++) {
                float sc = bf16_value(row[j]);
                float w = e2 * norm2[j] + e * norm[j];
                if ((w + sc) + (rel * fabsf(sc) + sl) >= tau && !(ex && ex[j])) ci[c++] = (int32_t)j;
            }
        }
        /* exact scores of the candidates, in index order (the heap's tie rule relies on it) */
        rescore(qr, kh, k_rs, D, ci, c, cs, pos);
        ncand[t] = c;
        if (c < k) { status = 1; continue; }
        heap_topk(cs, pos, c, k, hv, ix);
    }
    free(ub); free(lb); free(work); free(hv); free(cs); free(ci); free(pos);
    return (int)status;
}

int select_exact_rows(const uint16_t *s, int64_t s_hs, int64_t s_rs,
                      const float *q, int64_t q_hs, int64_t q_rs,
                      const float *keys, int64_t k_hs, int64_t k_rs,
                      const float *kn, int64_t kn_hs, const float *bn, int64_t bn_hs, const float *eps,
                      const float *kn2, int64_t kn2_hs, const float *bn2, int64_t bn2_hs, const float *eps2,
                      float rel, const float *slack, const uint8_t *excl, int64_t ex_hs,
                      int64_t R, int64_t D, int64_t n, int64_t k, int64_t r0, int64_t r1,
                      int64_t *out_i, int64_t *ncand, int64_t threads) {
    PARALLEL_RANGE(threads, r0, r1, lo, hi,
                   select_exact_range(s, s_hs, s_rs, q, q_hs, q_rs, keys, k_hs, k_rs, kn, kn_hs, bn, bn_hs, eps,
                                      kn2, kn2_hs, bn2, bn2_hs, eps2, rel, slack, excl, ex_hs, R, D, n, k, lo, hi,
                                      out_i, ncand))
}

/* 1 when compiled with AVX-512 (the kernels below then run vectorised), else 0 */
int has_avx512(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* Scores of R query rows against bf16 keys stored in blocks of 16: kb[h] holds, for block b, D rows of 16 keys
   (key 16b + l, component i at kb[h][(b·D + i)·16 + l]), so 16 keys are scored by D multiply-adds of a broadcast
   query component, with no horizontal sums, each key's terms summed in order i = 0..D−1 in fp32 (the bf16 key
   components are exact in fp32: the only rounding of the keys is their storage in bf16). For heads h < H, keys
   j0..j1−1 (j0 a multiple of 16; j1 ≤ the keys held, whole blocks read: lanes past the last key are junk and not
   written), out[h·o_hs + r·o_rs + j] for rows r < R. Threads split the key range. */
#if defined(__AVX512F__)
/* NR (a constant at each call site: the accumulators stay in registers) rows against one block of 16 keys */
static inline __attribute__((always_inline)) void block_rows(const uint16_t *blk, const float *qr, int64_t q_rs,
                                                             int64_t D, const int NR, __m512 *acc) {
    for (int r = 0; r < NR; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i++) {
        __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(blk + i * 16)));
        __m512 kv = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        for (int r = 0; r < NR; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(qr[r * q_rs + i]), kv, acc[r]);
    }
}

/* the same for two consecutive blocks at once (acc[r], acc[NR + r]): two independent chains of D multiply-adds per
   row, so the FMA latency of one hides behind the other (one chain per row ran at ~2/3 of the memory bandwidth a
   decode lookup is bound by); the blocks PREFETCH_BLOCKS ahead are requested as these are read */
#define PREFETCH_BLOCKS 4
static inline __attribute__((always_inline)) void block_rows2(const uint16_t *blk, const float *qr, int64_t q_rs,
                                                              int64_t D, const int NR, __m512 *acc) {
    const uint16_t *blk2 = blk + D * 16;
    for (int r = 0; r < 2 * NR; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i++) {
        if (!(i & 1)) {
            _mm_prefetch((const char *)(blk + PREFETCH_BLOCKS * D * 16 + i * 16), _MM_HINT_T0);
            _mm_prefetch((const char *)(blk2 + PREFETCH_BLOCKS * D * 16 + i * 16), _MM_HINT_T0);
        }
        __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(blk + i * 16)));
        __m512i w2 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(blk2 + i * 16)));
        __m512 kv = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        __m512 kv2 = _mm512_castsi512_ps(_mm512_slli_epi32(w2, 16));
        for (int r = 0; r < NR; r++) {
            __m512 qv = _mm512_set1_ps(qr[r * q_rs + i]);
            acc[r] = _mm512_fmadd_ps(qv, kv, acc[r]);
            acc[NR + r] = _mm512_fmadd_ps(qv, kv2, acc[NR + r]);
        }
    }
}
#endif

/* Besides the scores, each row's block maxima of the lower bounds s − e·kn − slack that `select_bounded_range` starts
   from (row t = h·R + r: e = eps[t], slack[t], kn[h·kn_hs + j]) into bmax[t·nb + block], taken from the scores still
   in registers (no second pass over them). */
#if defined(__AVX512F__)
static inline void block_bound_max(__m512 s, const float *kn, float e, float sl, int64_t n, float *dst) {
    __mmask16 m = (__mmask16)(n == 16 ? 0xffffu : (1u << n) - 1);
    __m512 lb = _mm512_fnmadd_ps(_mm512_set1_ps(e), _mm512_maskz_loadu_ps(m, kn), s);
    *dst = _mm512_mask_reduce_max_ps(m, lb) - sl;
}

/* fn(blk, qr, q_rs, D, NR, acc) with the row count nr (1..4) as a constant NR: the accumulators stay in registers */
#define ROWS_CONSTANT(fn, nr)                                    \
    switch (nr) {                                                \
        case 4: fn(blk, qr, q_rs, D, 4, acc); break;             \
        case 3: fn(blk, qr, q_rs, D, 3, acc); break;             \
        case 2: fn(blk, qr, q_rs, D, 2, acc); break;             \
        default: fn(blk, qr, q_rs, D, 1, acc); break;            \
    }

/* one block's scores acc[0..nr−1] (n ≤ 16 keys) of rows t0..t0+nr−1 to o (rows o_rs apart), and their bound's
   block maxima (block b of each row; eps, slack from the first of the rows) */
static inline void store_block(const __m512 *acc, int64_t nr, int64_t n, float *o, int64_t o_rs, const float *kn,
                               const float *eps, const float *slack, float *bmax, int64_t t0, int64_t nb, int64_t b) {
    __mmask16 m = (__mmask16)(n == 16 ? 0xffffu : (1u << n) - 1);
    for (int64_t r = 0; r < nr; r++) {
        _mm512_mask_storeu_ps(o + r * o_rs, m, acc[r]);
        block_bound_max(acc[r], kn, eps[r], slack[r], n, bmax + (t0 + r) * nb + b);
    }
}
#endif

static int score_blocked_range(const uint16_t *kb, int64_t k_hs, const float *q, int64_t q_hs, int64_t q_rs,
                               int64_t H, int64_t R, int64_t D, int64_t j0, int64_t j1,
                               float *out, int64_t o_hs, int64_t o_rs,
                               const float *kn, int64_t kn_hs, const float *eps, const float *slack,
                               float *bmax, int64_t nb) {
    for (int64_t h = 0; h < H; h++) {
        const uint16_t *kh = kb + h * k_hs;
        for (int64_t j = j0; j < j1; j += 16) {
            const uint16_t *blk = kh + (j / 16) * D * 16;
            int64_t n = j1 - j < 16 ? j1 - j : 16;
#if defined(__AVX512F__)
            if (j + 32 <= j1) {   /* two whole blocks */
                for (int64_t r0 = 0; r0 < R; r0 += 4) {
                    int64_t nr = R - r0 < 4 ? R - r0 : 4;
                    const float *qr = q + h * q_hs + r0 * q_rs;
                    __m512 acc[8];
                    ROWS_CONSTANT(block_rows2, nr);
                    store_block(acc, nr, 16, out + h * o_hs + r0 * o_rs + j, o_rs, kn + h * kn_hs + j,
                                eps + h * R + r0, slack + h * R + r0, bmax, h * R + r0, nb, j / 16);
                    store_block(acc + nr, nr, 16, out + h * o_hs + r0 * o_rs + j + 16, o_rs, kn + h * kn_hs + j + 16,
                                eps + h * R + r0, slack + h * R + r0, bmax, h * R + r0, nb, j / 16 + 1);
                }
                j += 16;
                continue;
            }
#endif
            for (int64_t r0 = 0; r0 < R; r0 += 4) {   /* up to 4 rows at once: each key row converted once */
                int64_t nr = R - r0 < 4 ? R - r0 : 4;
                const float *qr = q + h * q_hs + r0 * q_rs;
#if defined(__AVX512F__)
                __m512 acc[4];
                ROWS_CONSTANT(block_rows, nr);
                store_block(acc, nr, n, out + h * o_hs + r0 * o_rs + j, o_rs, kn + h * kn_hs + j, eps + h * R + r0,
                            slack + h * R + r0, bmax, h * R + r0, nb, j / 16);
#else
                for (int64_t r = 0; r < nr; r++) {
                    float acc[16] = {0};
                    for (int64_t i = 0; i < D; i++)
                        for (int l = 0; l < 16; l++)
                            acc[l] = fmaf(qr[r * q_rs + i], bf16_value(blk[i * 16 + l]), acc[l]);
                    float *o = out + h * o_hs + (r0 + r) * o_rs + j;
                    for (int64_t l = 0; l < n; l++) o[l] = acc[l];
                    int64_t t = h * R + r0 + r;
                    float m = -INFINITY;
                    for (int64_t l = 0; l < n; l++) {
                        float v = acc[l] - eps[t] * kn[h * kn_hs + j + l];
                        m = v > m ? v : m;
                    }
                    bmax[t * nb + j / 16] = m - slack[t];
                }
#endif
            }
        }
    }
    return 0;
}

/* Exact top-k by fp32 q·k from approximate scores s with |s_j − exact_j| ≤ eps[t]·kn[j] + slack[t]: the k-th
   largest lower bound tau is found exactly (maxima of the lower bounds over blocks of 16 give a value at or
   below it, the few lower bounds at or above that one give it), every key whose upper bound reaches tau is
   re-scored in fp32 from q and the fp32 keys (`dot_fixed`), and the k best are kept by counting (`select_k`), ties
   to the earlier index. For rows t in r0..r1-1 of H heads × R rows: out_v / out_i (row stride k, index order) get
   the exact scores and indices, ncand the count re-scored. bmax: the block maxima of the lower bounds, taken by the
   scoring pass (row t's at bmax + t·ceil(n/16)). Returns 0, 1 when a row had fewer than k candidates
   (NaN scores: the caller falls back), −1 out of memory. Requires 1 <= k <= n. */
static int select_bounded_range(const float *s, int64_t s_hs, int64_t s_rs,
                                const float *q, int64_t q_hs, int64_t q_rs,
                                const float *keys, int64_t k_hs, int64_t k_rs,
                                const float *kn, int64_t kn_hs, const float *eps, const float *slack,
                                const float *bmax, int64_t R, int64_t D, int64_t n, int64_t k,
                                int64_t r0, int64_t r1, float *out_v, int64_t *out_i, int64_t *ncand) {
    int64_t nb = (n + 15) / 16, status = 0;
    float *work = malloc(sizeof(float) * (nb > n ? nb : n));
    uint32_t *keys32 = malloc(sizeof(uint32_t) * (nb > n ? nb : n));
    float *cs = malloc(sizeof(float) * n);
    int32_t *ci = malloc(sizeof(int32_t) * (n + 16));
    int64_t *pos = malloc(sizeof(int64_t) * n);
    if (!work || !keys32 || !cs || !ci || !pos) {
        free(work); free(keys32); free(cs); free(ci); free(pos);
        return -1;
    }
    for (int64_t t = r0; t < r1; t++) {
        int64_t h = t / R, r = t % R;
        const float *row = s + h * s_hs + r * s_rs, *qr = q + h * q_hs + r * q_rs;
        const float *kh = keys + h * k_hs, *norm = kn + h * kn_hs;
        const float e = eps[t], sl = slack[t];
        const float *bm = bmax + t * nb;   /* the block maxima of the lower bounds, from the scoring pass */
        float t1 = kth_best(bm, keys32, nb, k < nb ? k : nb);
        if (k > nb) t1 = -INFINITY;
        /* every lower bound >= t1, then the exact k-th largest of them: tau */
        int64_t c = 0;
        for (int64_t b = 0; b < nb; b++) {
            if (!(bm[b] >= t1)) continue;
            int64_t j1 = b * 16 + 16 < n ? b * 16 + 16 : n;
            for (int64_t j = b * 16; j < j1; j++) {
                float v = row[j] - e * norm[j] - sl;
                if (v >= t1) work[c++] = v;
            }
        }
        if (c < k) { ncand[t] = c; status = 1; continue; }
        float tau = kth_largest(work, keys32, c, k);
        /* candidates: upper bound s + e·norm + slack >= tau, in index order */
        c = 0;
        int64_t j = 0;
#if defined(__AVX512F__)
        const __m512 ve = _mm512_set1_ps(e), vt = _mm512_set1_ps(tau - sl);
        const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (; j + 16 <= n; j += 16) {
            __m512 up = _mm512_fmadd_ps(ve, _mm512_loadu_ps(norm + j), _mm512_loadu_ps(row + j));
            __mmask16 m = _mm512_cmp_ps_mask(up, vt, _CMP_GE_OQ);
            if (m) {
                _mm512_mask_compressstoreu_epi32(ci + c, m, _mm512_add_epi32(_mm512_set1_epi32((int)j), lanes));
                c += __builtin_popcount((unsigned)m);
            }
        }
#endif
        for (; j < n; j++)
            if (row[j] + e * norm[j] >= tau - sl) ci[c++] = (int32_t)j;
        rescore(qr, kh, k_rs, D, ci, c, cs, pos);
        ncand[t] = c;
        /* the k best by counting (`select_k`): a heap's sifts were ~1/8 of a decode lookup's selection */
        if (c < k || select_k(cs, pos, c, k, keys32, out_v + t * k, out_i + t * k)) { status = 1; continue; }
    }
    free(work); free(keys32); free(cs); free(ci); free(pos);
    return (int)status;
}

/* `lookup_bf16_rows`'s steps, the bounds given */
static int lookup_steps(const uint16_t *kb, int64_t kb_hs, const float *q, int64_t q_hs, int64_t q_rs,
                        const float *keys, int64_t k_hs, int64_t k_rs, const float *kn, int64_t kn_hs,
                        const float *eps, const float *slack, int64_t H, int64_t R, int64_t D, int64_t n, int64_t k,
                        int64_t nb, float *s, float *bmax, float *out_v, int64_t *out_i, int64_t *ncand,
                        int64_t step, int64_t j0, int64_t j1, int64_t threads) {
    if (step == 1) {
        score_blocked_range(kb, kb_hs, q, q_hs, q_rs, H, R, D, j0, j1, s, R * n, n, kn, kn_hs, eps, slack, bmax, nb);
        return 0;
    }
    if (step == 2)
        return select_bounded_range(s, R * n, n, q, q_hs, q_rs, keys, k_hs, k_rs, kn, kn_hs, eps, slack, bmax, R, D,
                                    n, k, j0, j1, out_v, out_i, ncand);
    int lowest = 0, highest = 0;
#pragma omp parallel num_threads(threads) reduction(min:lowest) reduction(max:highest)
    {
        int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
        int64_t b0 = nb * part / parts, b1 = nb * (part + 1) / parts;
        score_blocked_range(kb, kb_hs, q, q_hs, q_rs, H, R, D, 16 * b0, 16 * b1 < n ? 16 * b1 : n, s, R * n, n,
                            kn, kn_hs, eps, slack, bmax, nb);
#pragma omp barrier
        int64_t t0 = H * R * part / parts, t1 = H * R * (part + 1) / parts;
        int code = select_bounded_range(s, R * n, n, q, q_hs, q_rs, keys, k_hs, k_rs, kn, kn_hs, eps, slack, bmax,
                                        R, D, n, k, t0, t1, out_v, out_i, ncand);
        lowest = code < lowest ? code : lowest;
        highest = code > highest ? code : highest;
    }
    return lowest < 0 ? lowest : highest;
}

/* A decode lookup in two steps over the same threads: the bf16 copy's scores of the H·R rows (threads split the
   keys; each row's block maxima of the lower bounds taken from the scores still in registers), then, past a
   barrier, the exact selection (threads split the rows). Scores go to s (H, R, n: s_hs = R·n, s_rs = n), the block
   maxima to bmax (H·R rows of ceil(n / 16)). step: 3 both (OpenMP builds; one parallel region instead of two), 1
   the scores of keys j0..j1−1 only (j0 a multiple of 16), 2 the selection of rows j0..j1−1 only (after step 1 over
   all keys: the thread-pool build calls the steps in turn). The bound of row t (head h) is `Bf16KeyCopy`'s:
   eps[t] = ‖q_t‖ times each key's weight kn, plus slack[t] = slack_factor·‖q_t‖·norm_max[h]; both are computed
   here (torch's three small ops per call were ~1/10 of a decode lookup). Returns as `select_bounded_range`. */
int lookup_bf16_rows(const uint16_t *kb, int64_t kb_hs, const float *q, int64_t q_hs, int64_t q_rs,
                     const float *keys, int64_t k_hs, int64_t k_rs, const float *kn, int64_t kn_hs,
                     const float *norm_max, float slack_factor, int64_t H, int64_t R, int64_t D, int64_t n, int64_t k,
                     float *s, float *bmax, float *out_v, int64_t *out_i, int64_t *ncand,
                     int64_t step, int64_t j0, int64_t j1, int64_t threads) {
    int64_t nb = (n + 15) / 16;
    float *eps = malloc(sizeof(float) * 2 * H * R);
    if (!eps) return -1;
    float *slack = eps + H * R;
    for (int64_t t = 0; t < H * R; t++) {
        const float *qr = q + (t / R) * q_hs + (t % R) * q_rs;
        float ss = 0.0f;
        for (int64_t i = 0; i < D; i++) ss += qr[i] * qr[i];
        eps[t] = sqrtf(ss);
        slack[t] = slack_factor * eps[t] * norm_max[t / R];
    }
    int status = lookup_steps(kb, kb_hs, q, q_hs, q_rs, keys, k_hs, k_rs, kn, kn_hs, eps, slack, H, R, D, n, k, nb, s,
                              bmax, out_v, out_i, ncand, step, j0, j1, threads);
    free(eps);
    return status;
}


/* float → bf16 bits, rounded to nearest even (NaN stays a quiet NaN): torch's conversion */
static inline uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* `kernels.Bf16KeyCopy.append` for keys k (H, T, D): each key minus the centre (H, D) stored in bf16 at position
   n0 + t of its head's blocks (block (n0 + t) / 16, component i at [i·16 + (n0 + t) % 16]), its error weight
   ‖x − bf16(x)‖·(1 + 2^-10) + 2^-15·‖x‖ into norms[h·n_hs + n0 + t], and the keys' own norms into the running
   maxima norm_max[h] (NaN kept). One call instead of ~25 torch ops: a decode step appends one key per memory
   layer. Returns 0. */
int bf16_copy_append(const float *k, int64_t k_hs, int64_t k_rs, const float *centre, int64_t H, int64_t T,
                     int64_t D, int64_t n0, uint16_t *blocks, int64_t b_hs, float *norms, int64_t n_hs,
                     float *norm_max) {
    for (int64_t h = 0; h < H; h++) {
        for (int64_t t = 0; t < T; t++) {
            const float *key = k + h * k_hs + t * k_rs, *c = centre + h * D;
            int64_t j = n0 + t;
            uint16_t *dst = blocks + h * b_hs + (j / 16) * D * 16 + j % 16;
            float rr = 0.0f, xx = 0.0f, kk = 0.0f;
            for (int64_t i = 0; i < D; i++) {
                float x = key[i] - c[i];
                uint16_t b = bf16_round(x);
                float r = x - bf16_value(b);
                dst[i * 16] = b;
                rr += r * r; xx += x * x; kk += key[i] * key[i];
            }
            norms[h * n_hs + j] = sqrtf(rr) * (1.0f + 0x1p-10f) + 0x1p-15f * sqrtf(xx);
            float nm = sqrtf(kk);
            if (!(nm <= norm_max[h])) norm_max[h] = nm;
        }
    }
    return 0;
}

/* LongCache's bf16 candidate copies of new keys k (H, T, D) (`longcache._key_copies` of k − centre, centre (H, D)):
   x16[h, t] = bf16(x) (bits, exactly what torch's conversion gives), norms[h, t] = ‖x‖, weights[h, t] = the bound's
   weight ‖x − bf16(x)‖·(1 + 2^-10) + 2^-15·‖x‖ (`kernels.residual_weights`), and kmax[h] the largest ‖k‖ of each
   head's new keys (NaN kept). One call per layer and chunk instead of ~20 torch ops. Returns 0. */
int candidate_copies(const float *k, int64_t k_hs, int64_t k_rs, const float *centre, int64_t H, int64_t T,
                     int64_t D, uint16_t *x16, float *norms, float *weights, float *kmax) {
    for (int64_t h = 0; h < H; h++) {
        float hmax = 0.0f;
        for (int64_t t = 0; t < T; t++) {
            const float *key = k + h * k_hs + t * k_rs, *c = centre + h * D;
            uint16_t *out = x16 + (h * T + t) * D;
            float xx = 0.0f, r = 0.0f, kk = 0.0f;
            for (int64_t i = 0; i < D; i++) {
                float x = key[i] - c[i];
                uint16_t b = bf16_round(x);
                float d = x - bf16_value(b);   /* exact */
                out[i] = b;
                xx += x * x; r += d * d; kk += key[i] * key[i];
            }
            float nx = sqrtf(xx), nk = sqrtf(kk);
            norms[h * T + t] = nx;
            weights[h * T + t] = sqrtf(r) * (1.0f + 0x1p-10f) + 0x1p-15f * nx;
            if (!(nk <= hmax)) hmax = nk;
        }
        kmax[h] = hmax;
    }
    return 0;
}

/* LongCache's duplicate-key flags for new keys k (H, T, D) (`longcache._duplicate_flags`): each key's 64-bit hash
   into hashes[h·T + t] (`longcache._key_hashes`, bit for bit: int32 words sign-extended, times mult[i], x ^ (x >> 29)
   arithmetic, summed, all wrapping), and flags[h·T + t] = 1 when the index of earlier keys' hashes (sorted (H, S)
   ascending, order (H, S) their positions in keys, rows sh_hs / or_hs apart) holds at least topk keys with that hash
   and the first topk of them (by position) are the key's bytes exactly. S < topk: no key flagged. Returns 0. */
int key_flags(const float *k, int64_t k_hs, int64_t k_rs, int64_t H, int64_t T, int64_t D, const int64_t *mult,
              const int64_t *sorted, int64_t sh_hs, const int64_t *order, int64_t or_hs, int64_t S,
              const float *keys, int64_t keys_hs, int64_t keys_rs, int64_t topk, int64_t *hashes, uint8_t *flags) {
    for (int64_t h = 0; h < H; h++) {
        const int64_t *sh = sorted + h * sh_hs, *oh = order + h * or_hs;
        for (int64_t t = 0; t < T; t++) {
            const float *key = k + h * k_hs + t * k_rs;
            uint64_t sum = 0;
            for (int64_t i = 0; i < D; i++) {
                int32_t w;
                memcpy(&w, key + i, 4);
                int64_t m = (int64_t)((uint64_t)(int64_t)w * (uint64_t)mult[i]);
                sum += (uint64_t)(m ^ (m >> 29));
            }
            int64_t hv = (int64_t)sum;
            hashes[h * T + t] = hv;
            uint8_t flag = 0;
            if (S >= topk) {
                int64_t lo = 0, hi = S;   /* first entry >= hv */
                while (lo < hi) { int64_t mid = (lo + hi) / 2; if (sh[mid] < hv) lo = mid + 1; else hi = mid; }
                if (lo + topk <= S && sh[lo + topk - 1] == hv) {   /* at least topk equal hashes */
                    flag = 1;
                    for (int64_t j = 0; j < topk && flag; j++)
                        flag = memcmp(keys + h * keys_hs + oh[lo + j] * keys_rs, key, 4 * D) == 0;
                }
            }
            flags[h * T + t] = flag;
        }
    }
    return 0;
}

/* exp(x) for 16 lanes: x = n·ln2 + f (|f| ≤ ln2/2, ln2 in two parts), exp(f) by its degree-7 Taylor polynomial
   (relative error < 2^-23 on that range: within ~2 ulp of expf), scaled by 2^n (`scalef`: 0 below the fp32 range,
   inf above it; −inf → 0, NaN stays NaN) */
#if defined(__AVX512F__)
static inline __m512 exp512(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693145751953125f), ln2_lo = _mm512_set1_ps(1.428606765330187045e-06f);
    x = _mm512_max_ps(_mm512_set1_ps(-200.0f), x);   /* far below the smallest denormal (exp → 0 exactly); NaN kept */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, ln2_hi, x);
    f = _mm512_fnmadd_ps(n, ln2_lo, f);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* One softmax over [memory ‖ local] for decode rows, and its weighted sum of values: for rows t in r0..r1−1 (head
   h = t / R), the k memory entries' raw scores vals[t·k + j] (q·key, unscaled) of entries idx[t·k + j] and the L
   local scores s_loc (already scaled and masked, −inf where hidden); with a = scale·vals + bias,
   out[t] = (Σ_j e^(a_j − m) values[h, idx_j] + Σ_l e^(s_l − m) v_loc[h, l]) / (Σ_j e^(a_j − m) + Σ_l e^(s_l − m)),
   m the largest of all of them. With s_loc NULL the local scores are computed here, all L keys visible:
   s_l = scale·(q_loc[h, r] · k_loc[h, l]) (a decode step: one new token sees its whole window). What
   `memory_attention`'s top-k block computes in ~20 torch ops (and one `embedding_bag` per head), here in one pass
   per row. Returns 0, −1 out of memory. */
static int decode_attend_range(const float *vals, const int64_t *idx, int64_t k, float scale, float bias,
                               const float *values, int64_t v_hs, int64_t v_rs,
                               const float *s_loc, int64_t sl_hs, int64_t sl_rs, int64_t L,
                               const float *v_loc, int64_t vl_hs, int64_t vl_rs,
                               const float *q_loc, int64_t ql_hs, int64_t ql_rs,
                               const float *k_loc, int64_t kl_hs, int64_t kl_rs,
                               int64_t R, int64_t D, float *out, int64_t o_hs, int64_t o_rs, int64_t r0, int64_t r1) {
    float *w = malloc(sizeof(float) * (k + L + 16));
    float *acc = malloc(sizeof(float) * (D + 16));
    if (!w || !acc) { free(w); free(acc); return -1; }
    for (int64_t t = r0; t < r1; t++) {
        int64_t h = t / R, r = t % R;
        const float *a = vals + t * k, *sl = s_loc + h * sl_hs + r * sl_rs;
        const int64_t *ix = idx + t * k;
        float m = -INFINITY;
        for (int64_t j = 0; j < k; j++) { w[j] = scale * a[j] + bias; m = w[j] > m ? w[j] : m; }
        if (s_loc) {
            for (int64_t l = 0; l < L; l++) w[k + l] = sl[l];
        } else {
            const float *qr = q_loc + h * ql_hs + r * ql_rs, *kh = k_loc + h * kl_hs;
            for (int64_t l = 0; l < L; l++) w[k + l] = scale * dot_fixed(qr, kh + l * kl_rs, D);
        }
        for (int64_t l = 0; l < L; l++) m = w[k + l] > m ? w[k + l] : m;
        int64_t n = k + L, j = 0;
        float total = 0.0f;
#if defined(__AVX512F__)
        __m512 vm = _mm512_set1_ps(m), vsum = _mm512_setzero_ps();
        for (; j + 16 <= n; j += 16) {
            __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(w + j), vm));
            _mm512_storeu_ps(w + j, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        if (j < n) {
            __mmask16 mk = (__mmask16)((1u << (n - j)) - 1);
            __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, w + j), vm));
            _mm512_mask_storeu_ps(w + j, mk, e);
            vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(mk, e));
            j = n;
        }
        total = _mm512_reduce_add_ps(vsum);
#endif
        for (; j < n; j++) { w[j] = expf(w[j] - m); total += w[j]; }
        for (int64_t i = 0; i < D; i++) acc[i] = 0.0f;
        const float *vh = values + h * v_hs, *vlh = v_loc + h * vl_hs;
        int64_t i0 = 0;
#if defined(__AVX512F__)
        if (D % 16 == 0 && D <= 256) {
            __m512 ac[16];
            int64_t nv = D / 16;
            for (int64_t c = 0; c < nv; c++) ac[c] = _mm512_setzero_ps();
            for (int64_t jj = 0; jj < n; jj++) {
                const float *row = jj < k ? vh + ix[jj] * v_rs : vlh + (jj - k) * vl_rs;
                if (jj + 8 < k)   /* memory rows are scattered: request them ahead */
                    for (int64_t c = 0; c < nv; c++)
                        _mm_prefetch((const char *)(vh + ix[jj + 8] * v_rs + 16 * c), _MM_HINT_T0);
                __m512 wv = _mm512_set1_ps(w[jj]);
                for (int64_t c = 0; c < nv; c++) ac[c] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(row + 16 * c), ac[c]);
            }
            for (int64_t c = 0; c < nv; c++) _mm512_storeu_ps(acc + 16 * c, ac[c]);
            i0 = D;
        }
#endif
        if (i0 < D)
            for (int64_t jj = 0; jj < n; jj++) {
                const float *row = jj < k ? vh + ix[jj] * v_rs : vlh + (jj - k) * vl_rs;
                for (int64_t i = 0; i < D; i++) acc[i] += w[jj] * row[i];
            }
        float *o = out + h * o_hs + r * o_rs;
        for (int64_t i = 0; i < D; i++) o[i] = acc[i] / total;
    }
    free(w); free(acc);
    return 0;
}

int decode_attend_rows(const float *vals, const int64_t *idx, int64_t k, float scale, float bias,
                       const float *values, int64_t v_hs, int64_t v_rs,
                       const float *s_loc, int64_t sl_hs, int64_t sl_rs, int64_t L,
                       const float *v_loc, int64_t vl_hs, int64_t vl_rs,
                       const float *q_loc, int64_t ql_hs, int64_t ql_rs,
                       const float *k_loc, int64_t kl_hs, int64_t kl_rs,
                       int64_t R, int64_t D, float *out, int64_t o_hs, int64_t o_rs, int64_t r0, int64_t r1,
                       int64_t threads) {
    PARALLEL_RANGE(threads, r0, r1, lo, hi,
                   decode_attend_range(vals, idx, k, scale, bias, values, v_hs, v_rs, s_loc, sl_hs, sl_rs, L, v_loc,
                                       vl_hs, vl_rs, q_loc, ql_hs, ql_rs, k_loc, kl_hs, kl_rs, R, D, out, o_hs, o_rs,
                                       lo, hi))
}

/* The AMX selection's int8 values (`kernels._int8_split`): a = x · (1/s) in fp32 rounded half to even and clamped
   to ±32639 (any integer would do: the bound is taken from the residual x − s·a itself), split a = 256·h + l
   (h in [−127, 127], l in [−128, 127]); hi[d], lo[d] the parts of x[d]. Returns ‖x − s·a‖ and puts ‖l‖ in
   *low_norm (float64). D <= 64; 2^-100 <= s finite. */
#if defined(__AVX512F__)
static inline __m256 upper_half(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }
#endif

static double int8_split(const float *x, int64_t D, float s, int8_t *hi, int8_t *lo, double *low_norm) {
    const float inv = 1.0f / s;
#if defined(__AVX512F__)
    if (D % 16 == 0) {   /* 16 values at a time: the same integers; the norms summed in another order */
        const __m512 vinv = _mm512_set1_ps(inv), top = _mm512_set1_ps(32639.0f), bottom = _mm512_set1_ps(-32639.0f);
        const __m512d vs = _mm512_set1_pd((double)s);
        __m512d rho = _mm512_setzero_pd();
        __m512 nl = _mm512_setzero_ps();   /* sums of squared integers below 2^24: exact */
        for (int64_t d = 0; d < D; d += 16) {
            const __m512 xv = _mm512_loadu_ps(x + d);
            __m512 a = _mm512_roundscale_ps(_mm512_mul_ps(xv, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            a = _mm512_min_ps(_mm512_max_ps(a, bottom), top);
            const __m512 h = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_add_ps(a, _mm512_set1_ps(128.0f)),
                                                                _mm512_set1_ps(1.0f / 256)),
                                                  _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            const __m512 l = _mm512_fnmadd_ps(h, _mm512_set1_ps(256.0f), a);   /* exact: integers */
            _mm_storeu_si128((__m128i *)(hi + d), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(h)));
            _mm_storeu_si128((__m128i *)(lo + d), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(l)));
            nl = _mm512_fmadd_ps(l, l, nl);
            /* x − s·a in float64: s·a is exact there (24 × 16 bits), so the residual is rounded once */
            const __m512d r0 = _mm512_fnmadd_pd(vs, _mm512_cvtps_pd(_mm512_castps512_ps256(a)),
                                                _mm512_cvtps_pd(_mm512_castps512_ps256(xv)));
            const __m512d r1 = _mm512_fnmadd_pd(vs, _mm512_cvtps_pd(upper_half(a)), _mm512_cvtps_pd(upper_half(xv)));
            rho = _mm512_fmadd_pd(r0, r0, _mm512_fmadd_pd(r1, r1, rho));
        }
        *low_norm = sqrt((double)_mm512_reduce_add_ps(nl));
        return sqrt(_mm512_reduce_add_pd(rho));
    }
#endif
    float a[64];
    double rho = 0, nl = 0;
    for (int64_t d = 0; d < D; d++) {   /* comparisons, not fminf / fmaxf: those are library calls here */
        const float v = nearbyintf(x[d] * inv);
        a[d] = v > 32639.0f ? 32639.0f : (v < -32639.0f ? -32639.0f : v);
    }
    for (int64_t d = 0; d < D; d++) {
        const float h = floorf((a[d] + 128) / 256), l = a[d] - 256 * h;
        const double r = (double)x[d] - (double)s * a[d];
        hi[d] = (int8_t)h;
        lo[d] = (int8_t)l;
        rho += r * r;
        nl += l * l;
    }
    *low_norm = sqrt(nl);
    return sqrt(rho);
}

/* The AMX selection's rows (`kernels.int8_row_parts`, the same arithmetic): rows u0..u1-1 of H heads × 16G
   (row u: head u / 16G, row u % 16G of q (H, R, D), head stride q_hs, row stride q_rs), each row's scale
   s = max|q| / 32639 (1 below 2^-100: a zero row) and parts (`int8_split`) written as the tiles' B operands,
   packed[(((hd·G + g)·2 + part)·(D/4) + p)·64 + 4i + e] = part (h, l) of row 16g + i's dim 4p + e (rows past R
   zero), scales[hd·16G + row] (0 past R), and terms[(hd·R + row)·4 + c] = [e, e2, e3, slack] with
   e = ‖ρ‖ + 2^-22·(‖q‖ + ‖ρ‖), e2 = (‖q‖ + ‖ρ‖)·(1 + 2^-22), e3 = s·‖l‖·(1 + 2^-22), each times 1 + 2^-12
   (ρ = q − s·a). Returns 1 when a row is not finite. */
static int int8_rows_range(const float *q, int64_t q_hs, int64_t q_rs, int64_t R, int64_t D, int64_t G,
                           const float *slack, int8_t *packed, float *scales, float *terms, int64_t u0, int64_t u1) {
    const double margin = 1 + 0x1p-12, grow = 1 + 0x1p-22;
    int8_t hi[64], lo[64];
    for (int64_t u = u0; u < u1; u++) {
        const int64_t hd = u / (16 * G), t = u % (16 * G);
        int8_t *row = packed + (hd * G + t / 16) * 32 * D + 4 * (t % 16);
        if (t >= R) {
            for (int64_t d = 0; d < D; d++) row[(d / 4) * 64 + d % 4] = row[16 * D + (d / 4) * 64 + d % 4] = 0;
            scales[u] = 0;
            continue;
        }
        const float *x = q + hd * q_hs + t * q_rs;
        float m = 0;
        double nq = 0;
        for (int64_t d = 0; d < D; d++) {
            if (!isfinite(x[d])) return 1;
            m = fabsf(x[d]) > m ? fabsf(x[d]) : m;
            nq += (double)x[d] * x[d];
        }
        float s = m / 32639.0f;
        if (!(s >= 0x1p-100f)) s = 1;   /* a zero (or all but zero) row */
        double nl, rho = int8_split(x, D, s, hi, lo, &nl);
        for (int64_t p = 0; p < D / 4; p++) {   /* 4 dims (bytes) at a time */
            memcpy(row + p * 64, hi + 4 * p, 4);
            memcpy(row + 16 * D + p * 64, lo + 4 * p, 4);
        }
        nq = sqrt(nq);
        float *out = terms + (hd * R + t) * 4;
        out[0] = (float)((rho + 0x1p-22 * (nq + rho)) * margin);
        out[1] = (float)((nq + rho) * grow * margin);
        out[2] = (float)((double)s * nl * grow * margin);
        out[3] = slack[hd * R + t];
        scales[u] = s;
    }
    return 0;
}

int int8_rows(const float *q, int64_t q_hs, int64_t q_rs, int64_t R, int64_t D, int64_t G, const float *slack,
              int8_t *packed, float *scales, float *terms, int64_t u0, int64_t u1, int64_t threads) {
    PARALLEL_RANGE(threads, u0, u1, lo, hi,
                   int8_rows_range(q, q_hs, q_rs, R, D, G, slack, packed, scales, terms, lo, hi))
}

/* LongCache's int8 copies of new keys (`kernels.int8_key_parts` of k − centre, the same arithmetic): k (H, T, D)
   (head stride k_hs, row stride k_rs), centre (H, D) contiguous; blocks of 16 keys (the first `first` long) share
   the scale s = (the block's largest |x|) / 32639 (1 below 2^-100, inf for a block with a value that is
   not finite: then its parts are 0). Writes parts (H, T, 2D) [h | l], norms (H, T) ‖x‖, weights (H, T, 3)
   [‖r‖·(1 + 2^-12), s·‖l‖·(1 + 2^-12), s], all contiguous, and each head's largest ‖k‖ (kmax, H). D <= 64. */
void int8_key_copies(const float *k, int64_t k_hs, int64_t k_rs, const float *centre, int64_t H, int64_t T,
                     int64_t D, int64_t first, int8_t *parts, float *norms, float *weights, float *kmax) {
    const float margin = 1 + 0x1p-12f;
    float x[64];
    for (int64_t hd = 0; hd < H; hd++) {
        float largest = 0;
        for (int64_t j = 0; j < T; j++) {
            const float *kj = k + hd * k_hs + j * k_rs;
            float n2 = 0;
            for (int64_t d = 0; d < D; d++) n2 += kj[d] * kj[d];
            largest = sqrtf(n2) > largest ? sqrtf(n2) : largest;
        }
        kmax[hd] = largest;
        for (int64_t j0 = 0; j0 < T;) {
            const int64_t want = j0 == 0 && first > 0 ? first : 16, len = want < T - j0 ? want : T - j0;
            float m = 0;
            int finite = 1;
            for (int64_t j = j0; j < j0 + len; j++)
                for (int64_t d = 0; d < D; d++) {
                    const float v = k[hd * k_hs + j * k_rs + d] - centre[hd * D + d];
                    if (!isfinite(v)) finite = 0;
                    m = fabsf(v) > m ? fabsf(v) : m;
                }
            float s = finite ? m / 32639.0f : INFINITY;
            if (!(s >= 0x1p-100f)) s = 1;   /* an all-zero (or all but zero) block */
            for (int64_t j = j0; j < j0 + len; j++) {
                double n2 = 0, nl, rho;
                for (int64_t d = 0; d < D; d++) {
                    x[d] = k[hd * k_hs + j * k_rs + d] - centre[hd * D + d];
                    n2 += (double)x[d] * x[d];
                }
                int8_t *out = parts + (hd * T + j) * 2 * D;
                float *w = weights + (hd * T + j) * 3;
                if (isfinite(s)) {
                    rho = int8_split(x, D, s, out, out + D, &nl);
                    w[0] = (float)rho * margin;
                    w[1] = (float)((double)s * nl) * margin;
                } else {
                    memset(out, 0, 2 * D);
                    w[0] = w[1] = NAN;
                }
                w[2] = s;
                norms[hd * T + j] = (float)sqrt(n2);
            }
            j0 += len;
        }
    }
}

/* ---- AMX (Intel Advanced Matrix Extensions): LongCache's exact selection from int8 tile scores ----
   The path above scores every query row against every key in a torch bf16 matmul, writes the scores out and
   `select_exact_range` reads them back; on real text the bf16 error bound (~1% of a score) leaves tens to hundreds
   of keys per row to re-score in fp32. Here AMX int8 tiles score each query row and each centred key held as
   ~16-bit integers in two int8 parts: a row q ≈ sq·(256·q̂h + q̂l) (one scale per row), a key x ≈ s·(256·k̂h + k̂l)
   (one scale per block of 16 keys), q̂h, k̂h in [−127, 127], q̂l, k̂l in [−128, 127]. Two tile products,
   T1 = k̂h·q̂h and T2 = k̂h·q̂l + k̂l·q̂h (int32, exact), give the score ŝ = sq·s·256·(256·T1 + T2) (the integer exact
   in int32; the fourth product q̂l·k̂l and the parts' residuals go into the bound, `kernels.int8_row_parts`):
   ~2^-13 of a score, for three tile instructions per 16 rows × 16 keys × 64 dims (the split-bf16 scores this
   replaced took six for the same work and ~2^-14: measured 2.4x the block maxima per second). Nothing but each
   16-key block's maximum per row is kept, and a key block's tiles are loaded once for all rows.
   Pass 1 (`amx_maxima`): block maxima over the keys not excluded. Pass 2 (`amx_select`), per group of 16 rows:
   each row's bound from the maxima (as in `select_exact_range`), the blocks where some row of the group can still
   have a candidate re-scored by tiles, their keys tested 16 rows at a time, the candidates re-scored in fp32.
   Keys arrive as rows [k̂h | k̂l] (2D int8) with per-key weights [‖r‖, s·‖k̂l‖, s] (kr, the block's scale s
   repeated for each of its keys); rows as the tiles' B operands (`int8_rows`). D = 32 or 64. */
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_NETWORK_K 16   /* up to this k, the rows' k-th best bounds by a vector insertion network */

/* the kernel's permission to use the AMX tile data (Linux asks each process to request it once) */
int amx_ready(void) {
    static int state = 0;   /* 0 not asked yet, 1 granted, -1 refused */
    if (state == 0)
        state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 1 : -1;
    return state == 1;
}

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Tiles: 0, 1 (a group of rows) and 4, 5 (a second group) the int32 products T1, T2 (row j: key j, column i:
   row i); 2, 3 the block's k̂h, k̂l (16 keys × D bytes, loaded once per block); 6, 7 a group's q̂h, q̂l (D/4 rows:
   dims 4p..4p+3 of each of 16 rows). The tile state is per thread. */
static void amx_configure(int64_t D) {
    struct tile_config cfg __attribute__((aligned(64)));
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    cfg.colsb[2] = cfg.colsb[3] = (uint16_t)D;
    cfg.rows[6] = cfg.rows[7] = (uint8_t)(D / 4);
    _tile_loadconfig(&cfg);
}

/* kj: 16 key rows [k̂h | k̂l] of 2D bytes */
static inline void amx_keys(const int8_t *kj, int64_t D) {
    _tile_loadd(2, kj, 2 * D);
    _tile_loadd(3, kj + D, 2 * D);
}

/* T1, T2 of the groups at qa (buf, buf + 256) and qb (buf + 512, buf + 768): buf[16 j + i] for key j, row i; a
   group's q̂l tile lies 16·D bytes after its q̂h tile */
static inline void amx_pair_products(const int8_t *qa, const int8_t *qb, int64_t D, int32_t *buf) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(4);
    _tile_zero(5);
    _tile_loadd(6, qa, 64);
    _tile_loadd(7, qa + 16 * D, 64);
    _tile_dpbssd(0, 2, 6);   /* k̂h·q̂h */
    _tile_dpbssd(1, 2, 7);   /* k̂h·q̂l */
    _tile_dpbssd(1, 3, 6);   /* k̂l·q̂h */
    _tile_loadd(6, qb, 64);
    _tile_loadd(7, qb + 16 * D, 64);
    _tile_dpbssd(4, 2, 6);
    _tile_dpbssd(5, 2, 7);
    _tile_dpbssd(5, 3, 6);
    _tile_stored(0, buf, 64);
    _tile_stored(1, buf + 256, 64);
    _tile_stored(4, buf + 512, 64);
    _tile_stored(5, buf + 768, 64);
}

/* `amx_pair_products` for one group (tiles 0, 1 only: tile numbers must be compile-time constants) */
static inline void amx_group_products(const int8_t *qa, int64_t D, int32_t *buf) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_loadd(6, qa, 64);
    _tile_loadd(7, qa + 16 * D, 64);
    _tile_dpbssd(0, 2, 6);
    _tile_dpbssd(1, 2, 7);
    _tile_dpbssd(1, 3, 6);
    _tile_stored(0, buf, 64);
    _tile_stored(1, buf + 256, 64);
}

/* key j's integer scores with the 16 rows: 256·T1 + T2, exact in int32 (|T1| ≤ 64·127², |T2| ≤ 2·64·127·128) */
static inline __m512i amx_combined(const int32_t *buf, int64_t j) {
    return _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(buf + 16 * j), 8),
                            _mm512_load_si512(buf + 256 + 16 * j));
}

/* block b's key rows: in place for a full block, else its keys copied into tail (16 rows of 2D, zero past the
   n − 16b real keys, whose scores are then ignored) */
static inline const int8_t *amx_block(const int8_t *kh, int64_t D, int64_t n, int64_t b, int8_t *tail) {
    if (16 * b + 16 <= n) return kh + 16 * b * 2 * D;
    memset(tail, 0, 16 * 2 * D);
    memcpy(tail, kh + 16 * b * 2 * D, (n - 16 * b) * 2 * D);
    return tail;
}

/* the largest integer score of the 16 rows over the keys in `keep` (bit j: key j; keep ≠ 0) */
static inline __m512i amx_block_max(const int32_t *buf, unsigned keep) {
    if (keep == 0xFFFFu) {
        __m512i m0 = amx_combined(buf, 0), m1 = amx_combined(buf, 1);
        for (int64_t j = 2; j < 16; j += 2) {
            m0 = _mm512_max_epi32(m0, amx_combined(buf, j));
            m1 = _mm512_max_epi32(m1, amx_combined(buf, j + 1));
        }
        return _mm512_max_epi32(m0, m1);
    }
    __m512i m = _mm512_set1_epi32(INT32_MIN);
    for (; keep; keep &= keep - 1) m = _mm512_max_epi32(m, amx_combined(buf, __builtin_ctz(keep)));
    return m;
}

/* `order_key` of 16 floats */
static inline __m512i order_keys(__m512 v) {
    const __m512i u = _mm512_castps_si512(v), sign = _mm512_set1_epi32((int)0x80000000u);
    __m512i key = _mm512_mask_xor_epi32(_mm512_or_si512(u, sign), _mm512_test_epi32_mask(u, sign), u,
                                        _mm512_set1_epi32(-1));   /* negative: ~u, else u | sign */
    key = _mm512_mask_mov_epi32(key, _mm512_cmpeq_epi32_mask(u, sign), sign);   /* −0 as +0 */
    return _mm512_mask_mov_epi32(key, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_setzero_si512());   /* NaN */
}

/* the keys of block b that can be selected: real (below n) and not excluded */
static inline unsigned amx_keep(const uint8_t *ex, int64_t n, int64_t b) {
    int64_t valid = n - 16 * b < 16 ? n - 16 * b : 16;
    unsigned keep = valid == 16 ? 0xFFFFu : (1u << valid) - 1;
    if (ex)
        for (int64_t j = 0; j < valid; j++)
            if (ex[16 * b + j]) keep &= ~(1u << j);
    return keep;
}

/* Pass 1, units u0..u1-1 of H heads × nb blocks of 16 keys (unit u: head u / nb, block u % nb): the block's
   largest score per query row over its keys not excluded, maxima[((h·G + g)·nb + b)·16 + i] for row 16g + i
   (G even: groups scored in pairs; rows past R are zero in qp and their maxima unused), and the block's largest
   weights bw[(h·nb + b)·3 + c] of [kn, ‖r‖, w] (pass 2's bounds). kb: the keys' int8 parts (head stride kb_hs,
   rows of 2D); kr: the per-key weights (head stride kr_hs, rows of 3: the block's scale third); kn: the keys'
   norms (head stride kn_hs); qp: the packed rows (head stride qp_hs), rs: their scales (head stride 16G, both
   from `int8_rows`). Returns 1 when a block's scale is not finite (a key with inf or NaN: the caller falls back). */
static int amx_maxima_range(const int8_t *kb, int64_t kb_hs, const float *kr, int64_t kr_hs, const float *kn,
                            int64_t kn_hs, const int8_t *qp, int64_t qp_hs, const float *rs, int64_t G, int64_t D,
                            int64_t n, const uint8_t *excl, int64_t ex_hs, float *maxima, float *bw,
                            int64_t u0, int64_t u1) {
    const int64_t nb = (n + 15) / 16;
    int32_t buf[1024] __attribute__((aligned(64)));
    int8_t tail[16 * 2 * 64] __attribute__((aligned(64)));
    amx_configure(D);
    int status = 0;
    for (int64_t u = u0; u < u1; u++) {
        const int64_t h = u / nb, b = u % nb;
        const unsigned keep = amx_keep(excl ? excl + h * ex_hs : 0, n, b);
        const float scale = 256.0f * kr[h * kr_hs + 16 * b * 3 + 2];
        float *out = maxima + (h * G * nb + b) * 16, *w = bw + (h * nb + b) * 3;
        w[0] = w[1] = w[2] = 0;
        for (int64_t j = 16 * b; j < n && j < 16 * b + 16; j++) {
            const float *wj = kr + h * kr_hs + 3 * j;
            w[0] = kn[h * kn_hs + j] > w[0] ? kn[h * kn_hs + j] : w[0];
            w[1] = wj[0] > w[1] ? wj[0] : w[1];
            w[2] = wj[1] > w[2] ? wj[1] : w[2];
        }
        if (!isfinite(scale)) status = 1;
        if (!keep || !isfinite(scale)) {   /* every key excluded: the block never passes */
            for (int64_t g = 0; g < G; g++) _mm512_store_ps(out + g * nb * 16, _mm512_set1_ps(-INFINITY));
            continue;
        }
        amx_keys(amx_block(kb + h * kb_hs, D, n, b, tail), D);
        const int8_t *qh = qp + h * qp_hs;
        const float *rh = rs + h * 16 * G;
        const __m512 vs = _mm512_set1_ps(scale);
        for (int64_t g = 0; g < G; g += 2) {
            amx_pair_products(qh + 32 * D * g, qh + 32 * D * (g + 1), D, buf);
            _mm512_store_ps(out + g * nb * 16, _mm512_mul_ps(_mm512_cvtepi32_ps(amx_block_max(buf, keep)),
                                                             _mm512_mul_ps(_mm512_load_ps(rh + 16 * g), vs)));
            _mm512_store_ps(out + (g + 1) * nb * 16,
                            _mm512_mul_ps(_mm512_cvtepi32_ps(amx_block_max(buf + 512, keep)),
                                          _mm512_mul_ps(_mm512_load_ps(rh + 16 * g + 16), vs)));
        }
    }
    _tile_release();
    return status;
}

int amx_maxima(const int8_t *kb, int64_t kb_hs, const float *kr, int64_t kr_hs, const float *kn, int64_t kn_hs,
               const int8_t *qp, int64_t qp_hs, const float *rs, int64_t G, int64_t D, int64_t n,
               const uint8_t *excl, int64_t ex_hs, float *maxima, float *bw, int64_t u0, int64_t u1,
               int64_t threads) {
    if (!amx_ready()) return -2;
    PARALLEL_RANGE(threads, u0, u1, lo, hi,
                   amx_maxima_range(kb, kb_hs, kr, kr_hs, kn, kn_hs, qp, qp_hs, rs, G, D, n, excl, ex_hs, maxima, bw,
                                    lo, hi))
}

/* Pass 2, units u0..u1-1 of H heads × G groups of 16 rows: each row's exact fp32 top-k, as `select_exact_range`
   finds it, from pass 1's maxima. Key j's score with row t is within e[t]·kn[j] + e2[t]·‖r_j‖ + e3[t]·w_j +
   slack[t] of the exact one (rt[t] = [e, e2, e3, slack]; kn: the keys' norms, kr: [‖r‖, w, s] as in pass 1; bw:
   the maxima of [kn, ‖r‖, w] over each block, (H, nb, 3) contiguous); q, keys: the fp32 rows and keys the
   candidates are re-scored from; the other arguments as in pass 1. Row t's k keys go to out_i + t·k, their fp32
   scores to out_v + t·k (in heap order). Returns 1 when a row found fewer than k candidates (NaN scores: the
   caller falls back). */
static int amx_select_range(const int8_t *kb, int64_t kb_hs, const float *kr, int64_t kr_hs, const int8_t *qp,
                            int64_t qp_hs, const float *rs, const float *maxima, int64_t G,
                            const float *q, int64_t q_hs, int64_t q_rs, const float *keys, int64_t k_hs, int64_t k_rs,
                            const float *kn, int64_t kn_hs, const float *bw, const float *rt,
                            const uint8_t *excl, int64_t ex_hs, int64_t R, int64_t D, int64_t n, int64_t k,
                            int64_t u0, int64_t u1, float *out_v, int64_t *out_i, int64_t *ncand) {
    const int64_t nb = (n + 15) / 16;
    int status = 0;
    int32_t buf[512] __attribute__((aligned(64)));
    int8_t tail[16 * 2 * 64] __attribute__((aligned(64)));
    float *cs = malloc(sizeof(float) * n);
    uint16_t *pass = malloc(sizeof(uint16_t) * nb);
    uint32_t *work = malloc(sizeof(uint32_t) * (16 * nb > n ? 16 * nb : n));   /* bounds' keys; select_k's keys */
    int32_t *ci = malloc(sizeof(int32_t) * 16 * n);   /* row i's candidates at ci + i·n */
    int64_t *pos = malloc(sizeof(int64_t) * n);
    if (!cs || !pass || !work || !ci || !pos) {
        free(cs); free(pass); free(work); free(ci); free(pos);
        return -1;
    }
    amx_configure(D);
    for (int64_t u = u0; u < u1; u++) {
        const int64_t h = u / G, g = u % G, r0 = 16 * g;
        const int64_t nq = R - r0 < 16 ? (R - r0 > 0 ? R - r0 : 0) : 16;
        if (nq == 0) continue;   /* a padding group */
        const float *mx = maxima + (h * G + g) * nb * 16, *bwh = bw + h * nb * 3;
        const float *norm = kn + h * kn_hs, *krh = kr + h * kr_hs;
        const uint8_t *ex = excl ? excl + h * ex_hs : 0;
        float tau[16], e[16], e2[16], e3[16], sl[16];
        int64_t c[16];
        for (int64_t i = 0; i < 16; i++) {   /* rows past R: zero bounds, never a candidate */
            e[i] = e2[i] = e3[i] = sl[i] = 0;
            c[i] = 0;
        }
        for (int64_t i = 0; i < nq; i++) {
            const float *t = rt + (h * R + r0 + i) * 4;
            e[i] = t[0]; e2[i] = t[1]; e3[i] = t[2]; sl[i] = t[3];
        }
        const __m512 ve = _mm512_loadu_ps(e), ve2 = _mm512_loadu_ps(e2), ve3 = _mm512_loadu_ps(e3);
        const __m512 vsl = _mm512_loadu_ps(sl), vrs = _mm512_load_ps(rs + h * 16 * G + 16 * g);
        const __mmask16 rows = (__mmask16)((1u << nq) - 1);
#define BLOCK_BOUND(b) _mm512_add_ps(_mm512_fmadd_ps(ve3, _mm512_set1_ps(bwh[3 * (b) + 2]),                      \
                                     _mm512_fmadd_ps(ve2, _mm512_set1_ps(bwh[3 * (b) + 1]),                      \
                                                     _mm512_mul_ps(ve, _mm512_set1_ps(bwh[3 * (b)])))), vsl)
        /* the k blocks with the best lower bounds hold k distinct keys scoring at least tau exactly: the 16 rows'
           k-th best lower bounds at once (an insertion network over each row's k best; NaN bounds passed over as
           −inf, as `kth_best` passes them over), or row by row for a large k */
        if (k <= AMX_NETWORK_K) {
            __m512 best[AMX_NETWORK_K];
            for (int64_t l = 0; l < k; l++) best[l] = _mm512_set1_ps(-INFINITY);
            for (int64_t b = 0; b < nb; b++) {
                __m512 v = _mm512_sub_ps(_mm512_load_ps(mx + 16 * b), BLOCK_BOUND(b));
                v = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);
                for (int64_t l = 0; l < k; l++) {
                    __m512 hi = _mm512_max_ps(best[l], v);
                    v = _mm512_min_ps(best[l], v);
                    best[l] = hi;
                }
            }
            _mm512_storeu_ps(tau, best[k - 1]);
        } else {
            /* a large k (memory's 128): the 16 rows at once, lane i row i, by counting on the bounds' order keys
               (`kth_key`, 16 lanes wide), the top 24 of their 32 bits: every bit below taken as 0 gives a lower
               bound on the k-th best within 2^-15 of it (at least k blocks still reach it) in 3/4 of the passes */
            for (int64_t b = 0; b < nb; b++)
                _mm512_storeu_si512(work + 16 * b,
                                    order_keys(_mm512_sub_ps(_mm512_load_ps(mx + 16 * b), BLOCK_BOUND(b))));
            __m512i t = _mm512_setzero_si512();
            const __m512i one = _mm512_set1_epi32(1), vk = _mm512_set1_epi32((int)k);
            for (int bit = 31; bit >= 8; bit--) {
                const __m512i c = _mm512_or_si512(t, _mm512_set1_epi32((int)(1u << bit)));
                __m512i count = _mm512_setzero_si512();
                for (int64_t b = 0; b < nb; b++)
                    count = _mm512_mask_add_epi32(count, _mm512_cmpge_epu32_mask(_mm512_loadu_si512(work + 16 * b), c),
                                                  count, one);
                t = _mm512_mask_mov_epi32(t, _mm512_cmpge_epi32_mask(count, vk), c);
            }
            uint32_t keys[16];
            _mm512_storeu_si512(keys, t);
            for (int64_t i = 0; i < 16; i++) tau[i] = keys[i] == 0 ? -INFINITY : from_order_key(keys[i]);
        }
        const __m512 vtau = _mm512_loadu_ps(tau);
        for (int64_t b = 0; b < nb; b++)   /* blocks whose upper bound reaches a row's tau hold its candidates */
            pass[b] = _mm512_mask_cmp_ps_mask(rows, _mm512_add_ps(_mm512_load_ps(mx + 16 * b), BLOCK_BOUND(b)),
                                              vtau, _CMP_GE_OQ);
#undef BLOCK_BOUND
        const int8_t *qg = qp + h * qp_hs + 32 * D * g, *kh = kb + h * kb_hs;
        for (int64_t b = 0; b < nb; b++) {
            if (!pass[b]) continue;
            amx_keys(amx_block(kh, D, n, b, tail), D);
            amx_group_products(qg, D, buf);
            const __m512 vc = _mm512_mul_ps(vrs, _mm512_set1_ps(256.0f * krh[16 * b * 3 + 2]));
            for (unsigned keep = amx_keep(ex, n, b); keep; keep &= keep - 1) {   /* key 16b + j, 16 rows at once */
                const int64_t j = __builtin_ctz(keep), key = 16 * b + j;
                const float *w = krh + key * 3;
                __m512 d = _mm512_fmadd_ps(ve3, _mm512_set1_ps(w[1]),
                                           _mm512_fmadd_ps(ve2, _mm512_set1_ps(w[0]),
                                                           _mm512_mul_ps(ve, _mm512_set1_ps(norm[key]))));
                __m512 up = _mm512_add_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(amx_combined(buf, j)), vc, d), vsl);
                unsigned m = _mm512_cmp_ps_mask(up, vtau, _CMP_GE_OQ) & pass[b];
                for (; m; m &= m - 1) {
                    int i = __builtin_ctz(m);
                    ci[i * n + c[i]++] = (int32_t)key;
                }
            }
        }
        for (int64_t i = 0; i < nq; i++) {   /* exact scores of the candidates, in index order (the heap's tie rule) */
            const int64_t t = h * R + r0 + i;
            rescore(q + h * q_hs + (r0 + i) * q_rs, keys + h * k_hs, k_rs, D, ci + i * n, c[i], cs, pos);
            ncand[t] = c[i];
            if (c[i] < k) { status = 1; continue; }
            if (k <= AMX_NETWORK_K)
                heap_topk(cs, pos, c[i], k, out_v + t * k, out_i + t * k);
            else if (select_k(cs, pos, c[i], k, work, out_v + t * k, out_i + t * k))   /* no heap for a large k */
                status = 1;   /* NaN scores */
        }
    }
    _tile_release();
    free(cs); free(pass); free(work); free(ci); free(pos);
    return status;
}

int amx_select(const int8_t *kb, int64_t kb_hs, const float *kr, int64_t kr_hs, const int8_t *qp, int64_t qp_hs,
               const float *rs, const float *maxima, int64_t G, const float *q, int64_t q_hs, int64_t q_rs,
               const float *keys, int64_t k_hs, int64_t k_rs, const float *kn, int64_t kn_hs, const float *bw,
               const float *rt, const uint8_t *excl, int64_t ex_hs, int64_t R, int64_t D, int64_t n, int64_t k,
               int64_t u0, int64_t u1, float *out_v, int64_t *out_i, int64_t *ncand, int64_t threads) {
    if (!amx_ready()) return -2;
    PARALLEL_RANGE(threads, u0, u1, lo, hi,
                   amx_select_range(kb, kb_hs, kr, kr_hs, qp, qp_hs, rs, maxima, G, q, q_hs, q_rs, keys, k_hs, k_rs,
                                    kn, kn_hs, bw, rt, excl, ex_hs, R, D, n, k, lo, hi, out_v, out_i, ncand))
}
#else
int amx_ready(void) { return 0; }

int amx_maxima(const int8_t *kb, int64_t kb_hs, const float *kr, int64_t kr_hs, const float *kn, int64_t kn_hs,
               const int8_t *qp, int64_t qp_hs, const float *rs, int64_t G, int64_t D, int64_t n,
               const uint8_t *excl, int64_t ex_hs, float *maxima, float *bw, int64_t u0, int64_t u1,
               int64_t threads) {
    return -2;
}

int amx_select(const int8_t *kb, int64_t kb_hs, const float *kr, int64_t kr_hs, const int8_t *qp, int64_t qp_hs,
               const float *rs, const float *maxima, int64_t G, const float *q, int64_t q_hs, int64_t q_rs,
               const float *keys, int64_t k_hs, int64_t k_rs, const float *kn, int64_t kn_hs, const float *bw,
               const float *rt, const uint8_t *excl, int64_t ex_hs, int64_t R, int64_t D, int64_t n, int64_t k,
               int64_t u0, int64_t u1, float *out_v, int64_t *out_i, int64_t *ncand, int64_t threads) {
    return -2;
}
#endif
"""
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared"]   # no errno: sqrt inline
# OpenMP first: where torch runs on one OpenMP runtime (linux wheels: libgomp), the kernels then split their work over
# torch's own threads (prefill-sized calls 1.5-2x faster than on a second pool competing with torch's spinning
# workers); elsewhere the plain build and a thread pool
OPENMP_FLAGS = ["-fopenmp"]

_lock = threading.Lock()
_lib = None
_tried = False
_pool = None
_openmp = False   # the kernels split their work over torch's OpenMP threads themselves


def _cache_dir() -> Path:
    from .models import cache_dir

    return cache_dir() / "native"


def _compile(compiler: str, flags: list[str]) -> Path | None:
    key = hashlib.sha256((SOURCE + " ".join(flags) + compiler).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"topk-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            src, out = Path(tmp) / "topk.c", Path(tmp) / "topk.so"
            src.write_text(SOURCE)
            done = subprocess.run([compiler, *flags, str(src), "-o", str(out)], capture_output=True)
            if done.returncode != 0:
                return None
            os.replace(out, lib)   # atomic: a concurrent build never loads a half-written file
    return lib


def _one_openmp_runtime() -> bool:
    """Whether torch runs on OpenMP and the process holds one OpenMP runtime: our library then shares torch's
    (linked by soname, it resolves to the copy torch loaded) and its threads. Two runtimes would be two sets of
    threads competing for the cores: then the kernels run single-threaded under our own pool."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps
                     if line.rsplit("/", 1)[-1].startswith(("libgomp", "libiomp", "libomp"))}
    except OSError:
        return False
    return len(paths) == 1


def _build() -> ctypes.CDLL | None:
    global _openmp
    if os.environ.get("INFINICTX_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    if os.environ.get("INFINICTX_NATIVE_OPENMP", "1") != "0":
        handle = _load(_compile(compiler, FLAGS + OPENMP_FLAGS))
        if handle is not None and handle.has_openmp() and _one_openmp_runtime():
            _openmp = True
            return handle
    return _load(_compile(compiler, FLAGS))


def _load(lib: Path | None) -> ctypes.CDLL | None:
    """The compiled library with its routines' signatures declared, or None."""
    if lib is None:
        return None
    try:
        handle = ctypes.CDLL(str(lib))
    except OSError:
        return None
    f = handle.topk_rows
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    handle.has_avx512.restype = ctypes.c_int
    handle.has_avx512.argtypes = []
    handle.has_openmp.restype = ctypes.c_int
    handle.has_openmp.argtypes = []
    f = handle.lookup_bf16_rows
    f.restype = ctypes.c_int
    f.argtypes = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
                  + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
                  + [ctypes.c_void_p, ctypes.c_float] + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 5
                  + [ctypes.c_int64] * 4)
    f = handle.bf16_copy_append
    f.restype = ctypes.c_int
    f.argtypes = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 4
                  + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p])
    f = handle.candidate_copies
    f.restype = ctypes.c_int
    f.argtypes = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 3
                  + [ctypes.c_void_p] * 4)
    f = handle.key_flags
    f.restype = ctypes.c_int
    f.argtypes = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2
                  + [ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
                  + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2)
    f = handle.decode_attend_rows
    f.restype = ctypes.c_int
    f.argtypes = ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_float]
                  + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] * 2 + [ctypes.c_int64]
                  + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] * 3 + [ctypes.c_int64] * 2
                  + [ctypes.c_void_p] + [ctypes.c_int64] * 5)
    f = handle.select_exact_rows
    f.restype = ctypes.c_int
    f.argtypes = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] * 3
                  + ([ctypes.c_void_p, ctypes.c_int64] * 2 + [ctypes.c_void_p]) * 2 + [ctypes.c_float]
                  + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 7 + [ctypes.c_void_p, ctypes.c_void_p]
                  + [ctypes.c_int64])
    handle.amx_ready.restype = ctypes.c_int
    handle.amx_ready.argtypes = []
    f = handle.int8_rows
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    f = handle.int8_key_copies
    f.restype = None
    f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 4 + [
        ctypes.c_void_p] * 4
    f = handle.amx_maxima
    f.restype = ctypes.c_int
    f.argtypes = ([ctypes.c_void_p, ctypes.c_int64] * 4 + [ctypes.c_void_p] + [ctypes.c_int64] * 3
                  + [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3)
    f = handle.amx_select
    f.restype = ctypes.c_int
    f.argtypes = ([ctypes.c_void_p, ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_int64]
                  + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int64]
                  + [ctypes.c_void_p] * 2 + [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_int64] * 6
                  + [ctypes.c_void_p] * 3 + [ctypes.c_int64])
    return handle


def available() -> bool:
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _lib, _tried = _build(), True
    return _lib is not None


def uses_openmp() -> bool:
    """Whether the kernels run on torch's own OpenMP threads (else: small calls on the calling thread, large
    ones split over a thread pool)."""
    return available() and _openmp


# Without OpenMP: calls touching fewer score entries than this run on the calling thread. Why: torch's OpenMP
# workers keep spinning for a while after each torch op, so a small call split over a thread pool shares the cores
# with them: measured in a decode step with memory (9 rows × 16K keys per call), the native calls took 1.7-2x
# longer on two pool threads than on the calling thread alone (top-k 9-12 vs 5 ms per token). Large calls (a
# prefill chunk's rows) still gain from the pool.
POOL_MIN_ENTRIES = 1 << 21
# With OpenMP, calls smaller than this run on one thread (waking the team costs more than it saves)
OPENMP_MIN_ENTRIES = 1 << 15


def _run_rows(call, R: int, entries: int) -> list[int]:
    """call(r0, r1, threads) for the rows 0..R−1 (the kernel splits its range over `threads` OpenMP threads):
    with OpenMP, one call on torch's intra-op thread count (one thread below `OPENMP_MIN_ENTRIES` score entries);
    without, parts of the range on a thread pool (ctypes releases the GIL) from `POOL_MIN_ENTRIES` entries, else
    one call on the calling thread."""
    global _pool
    threads = max(1, min(torch.get_num_threads(), R))
    if _openmp:
        return [call(0, R, threads if entries >= OPENMP_MIN_ENTRIES else 1)]
    if threads == 1 or entries < POOL_MIN_ENTRIES:
        return [call(0, R, 1)]
    if _pool is None or _pool._max_workers != threads:
        _pool = ThreadPoolExecutor(threads)
    bounds = [R * t // threads for t in range(threads + 1)]
    return list(_pool.map(lambda t: call(bounds[t], bounds[t + 1], 1), range(threads)))


def _block_maxima(x: torch.Tensor, block: int) -> torch.Tensor:
    """Maxima (H, ceil(n / block)) of x (H, n) over consecutive blocks."""
    nb = -(-x.shape[-1] // block)
    return F.pad(x, (0, block * nb - x.shape[-1])).view(x.shape[0], nb, block).amax(-1)


def select_exact(scores: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, key_norms: torch.Tensor,
                 eps: torch.Tensor, k: int, rel: float = 0.0, slack: torch.Tensor | None = None,
                 excluded: torch.Tensor | None = None, key_norms2: torch.Tensor | None = None,
                 eps2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact fp32 top-k indices of q·k per row, found through approximate bf16 scores (`select_exact_rows`).

    scores (H, R, n) bfloat16 (last dim contiguous), q (H, R, D) float32, keys (H, n, D) float32 (last dim
    contiguous), key_norms (H, n) float32, eps (H, R) float32 with |scores − q·kᵀ| ≤ eps · key_norms + rel · |scores|
    (+ eps2 · key_norms2, a second weight, when given) entrywise; slack (H, R) float32 or None (0): added to every
    bound (how far fp32 rounding can move a score);
    excluded (H, n) uint8 or None: keys that never enter the top-k (each has at least k earlier bit-identical keys).
    Returns (indices (H, R, k), candidates re-scored per row (H, R)), or None when a row had NaN scores (the
    caller computes that selection another way). Requires 1 <= k and 4k·32 <= n. Call only when `available()`."""
    H, R, n = scores.shape
    D = q.shape[-1]
    q = q.contiguous()
    eps = eps.contiguous()
    slack = torch.zeros_like(eps) if slack is None else slack.contiguous()
    if key_norms.stride(-1) != 1:
        key_norms = key_norms.contiguous()
    block_norms = _block_maxima(key_norms, 32)   # the kernel's blocks of 32 keys: their largest norms
    if key_norms2 is None:   # no second term: weight 0
        key_norms2, block_norms2, eps2 = key_norms, block_norms, torch.zeros_like(eps)
    else:
        if key_norms2.stride(-1) != 1:
            key_norms2 = key_norms2.contiguous()
        block_norms2 = _block_maxima(key_norms2, 32)
        eps2 = eps2.contiguous()
    assert scores.dtype == torch.bfloat16 and scores.stride(-1) == 1 and keys.stride(-1) == 1
    assert excluded is None or (excluded.dtype == torch.uint8 and excluded.stride(-1) == 1)
    idx = torch.empty(H * R, k, dtype=torch.int64)
    ncand = torch.empty(H * R, dtype=torch.int64)
    args = (scores.data_ptr(), scores.stride(0), scores.stride(1), q.data_ptr(), q.stride(0), q.stride(1),
            keys.data_ptr(), keys.stride(0), keys.stride(1), key_norms.data_ptr(), key_norms.stride(0),
            block_norms.data_ptr(), block_norms.stride(0), eps.data_ptr(),
            key_norms2.data_ptr(), key_norms2.stride(0), block_norms2.data_ptr(), block_norms2.stride(0),
            eps2.data_ptr(),
            float(rel), slack.data_ptr(),
            None if excluded is None else excluded.data_ptr(), 0 if excluded is None else excluded.stride(0),
            R, D, n, k)
    codes = _run_rows(lambda r0, r1, t: _lib.select_exact_rows(*args, r0, r1, idx.data_ptr(), ncand.data_ptr(), t),
                      H * R, H * R * n)
    if any(c < 0 for c in codes):
        raise MemoryError("native selection: out of memory")
    if any(codes):
        return None
    return idx.view(H, R, k), ncand.view(H, R)


def has_amx() -> bool:
    """Whether `select_exact_amx` runs here: built for a CPU with AMX (int8 tiles) and the OS lets this process use
    the tiles."""
    return available() and bool(_lib.amx_ready())


def int8_rows(q: torch.Tensor, slack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The AMX selection's rows q (H, R, D) float32 (last dim contiguous), as `kernels.int8_row_parts` computes them,
    in groups of 16 (an even number G of groups: pass 1 scores them in pairs) laid out as the tiles' B operands:
    (packed (H, G, 2, D/4, 16, 4) int8, [h, g, part, p, i, e] = part (h, l) of row 16g + i's dim 4p + e (rows past
    R zero); scales (H, 16G) (0 past R); terms (H, R, 4) = [e, e2, e3, slack]), or None when a row is not finite."""
    H, R, D = q.shape
    assert q.dtype == slack.dtype == torch.float32 and q.stride(-1) == 1 and D % 4 == 0 and D <= 64
    slack = slack.contiguous()
    G = 2 * -(-R // 32)
    packed = torch.empty(H, G, 2, D // 4, 16, 4, dtype=torch.int8)
    scales, terms = torch.empty(H, 16 * G), torch.empty(H, R, 4)
    if any(_run_rows(lambda u0, u1, t: _lib.int8_rows(q.data_ptr(), q.stride(0), q.stride(1), R, D, G,
                                                      slack.data_ptr(), packed.data_ptr(), scales.data_ptr(),
                                                      terms.data_ptr(), u0, u1, t), H * 16 * G, 64 * H * R * D)):
        return None
    return packed, scales, terms


def select_exact_amx(keys_int8: torch.Tensor, key_weights: torch.Tensor, q: torch.Tensor, keys: torch.Tensor,
                     key_norms: torch.Tensor, k: int, slack: torch.Tensor, excluded: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact fp32 top-k indices of q·k per row, as `select_exact` finds them, from int8 scores computed by AMX tiles
    inside the kernel (`amx_maxima`, then `amx_select`) and never stored. keys_int8 (H, n, 2D) int8 and
    key_weights (H, n, 3) float32: the (centred) keys as `kernels.int8_key_parts` gives them, in blocks of 16 from
    the first key (rows contiguous, any head stride); q (H, R, D) float32 the rows, split here (`int8_rows`); keys
    (H, n, D) float32 the exact keys the candidates are re-scored from (centred or not: the ranking is the same),
    key_norms (H, n) the centred keys' norms; slack (H, R): added to every bound (fp32
    re-scores swapping, the bound's own rounding); excluded as in `select_exact`. D = 32 or 64; 1 <= k <= n / 16.
    Returns (fp32 scores q·k of the chosen keys (H, R, k), their indices (H, R, k), in no particular order,
    candidates re-scored per row (H, R)), or None when a row or a key is not finite (the caller takes another
    path). Call only when `has_amx()`."""
    H, R, D = q.shape
    n = keys_int8.shape[1]
    assert keys_int8.dtype == torch.int8 and keys_int8.stride()[1:] == (2 * D, 1)
    assert key_weights.shape[-1] == 3 and key_weights.stride()[1:] == (3, 1)
    assert keys.stride(-1) == 1 and D in (32, 64) and 1 <= k <= n // 16
    assert excluded is None or (excluded.dtype == torch.uint8 and excluded.stride(-1) == 1)
    assert key_norms.dtype == torch.float32
    if key_norms.stride(-1) != 1:
        key_norms = key_norms.contiguous()
    rows = int8_rows(q, slack)
    if rows is None:
        return None   # a row that is not finite
    packed, row_scales, row_terms = rows
    G = packed.shape[1]
    nb = -(-n // 16)
    maxima = torch.empty(H, G, nb, 16)
    block_weights = torch.empty(H, nb, 3)   # per block, the largest [‖x‖, ‖r‖, w] (pass 1 fills it)
    ex = (None, 0) if excluded is None else (excluded.data_ptr(), excluded.stride(0))
    args = (keys_int8.data_ptr(), keys_int8.stride(0), key_weights.data_ptr(), key_weights.stride(0))
    codes = _run_rows(lambda u0, u1, t: _lib.amx_maxima(
        *args, key_norms.data_ptr(), key_norms.stride(0), packed.data_ptr(), packed.stride(0),
        row_scales.data_ptr(), G, D, n, *ex, maxima.data_ptr(), block_weights.data_ptr(), u0, u1, t),
        H * nb, 3 * H * R * n)
    if not any(codes):
        vals = torch.empty(H * R, k)
        idx = torch.empty(H * R, k, dtype=torch.int64)
        ncand = torch.empty(H * R, dtype=torch.int64)
        args += (packed.data_ptr(), packed.stride(0), row_scales.data_ptr(), maxima.data_ptr(), G, q.data_ptr(),
                 q.stride(0), q.stride(1), keys.data_ptr(), keys.stride(0), keys.stride(1), key_norms.data_ptr(),
                 key_norms.stride(0), block_weights.data_ptr(), row_terms.data_ptr(), *ex, R, D, n, k)
        codes = _run_rows(lambda u0, u1, t: _lib.amx_select(*args, u0, u1, vals.data_ptr(), idx.data_ptr(),
                                                            ncand.data_ptr(), t), H * G, H * R * n)
    if any(c == -1 for c in codes):
        raise MemoryError("native selection: out of memory")
    if any(codes):
        return None
    return vals.view(H, R, k), idx.view(H, R, k), ncand.view(H, R)


def topk_rows(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row of a float32 CPU tensor (..., n), ties to the
    earlier index, in no particular order within a row. Call only when `available()`."""
    n = s.shape[-1]
    rows = s.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    R = rows.shape[0]
    vals = torch.empty(R, k, dtype=torch.float32)
    idx = torch.empty(R, k, dtype=torch.int64)
    args = (rows.data_ptr(), rows.stride(0), n, k)
    codes = _run_rows(lambda r0, r1, t: _lib.topk_rows(*args, r0, r1, vals.data_ptr(), idx.data_ptr(), t), R,
                      R * n)
    if any(codes):
        raise MemoryError("native top-k: out of memory")
    return vals.view(*s.shape[:-1], k), idx.view(*s.shape[:-1], k)


def has_avx512() -> bool:
    """Whether the native kernels were built with AVX-512 (the bf16 lookup copy is worth keeping only then)."""
    return available() and bool(_lib.has_avx512())


def lookup_bf16(blocked: torch.Tensor, n: int, q: torch.Tensor, keys: torch.Tensor, key_norms: torch.Tensor,
                norm_max: torch.Tensor, slack_factor: float, k: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Exact fp32 top-k of q·k per row through a bf16 copy of the keys (`lookup_bf16_rows`): the copy's scores
    (16 keys per step, no horizontal sums; each row's block maxima of the lower bounds taken from the scores still in
    registers), then every key whose bound cannot rule it out re-scored in fp32, in one parallel region. blocked
    (H, n_blocks, D, 16) bfloat16 (`kernels.Bf16KeyCopy`'s layout), q (H, R, D), keys (H, n, D) float32 (last dims
    contiguous), key_norms (H, n) each key's weight w: |bf16 score − q·k| ≤ ‖q‖·w + slack_factor·‖q‖·norm_max[h].
    Returns (exact scores, indices) (H, R, k) in no particular order, ties to the earlier key, and the keys re-scored
    per row (H, R); None when a row had NaN scores. Call only when `available()`."""
    H, R, D = q.shape
    q, norm_max = q.contiguous(), norm_max.contiguous()
    if key_norms.stride(-1) != 1:
        key_norms = key_norms.contiguous()
    assert blocked.dtype == torch.bfloat16 and blocked.stride()[1:] == (D * 16, 16, 1) and blocked.shape[1] * 16 >= n
    assert keys.stride(-1) == 1 and 1 <= k <= n
    nb = -(-n // 16)
    scores, bmax = torch.empty(H, R, n), torch.empty(H * R, nb)
    vals = torch.empty(H * R, k)
    idx = torch.empty(H * R, k, dtype=torch.int64)
    ncand = torch.empty(H * R, dtype=torch.int64)
    args = (blocked.data_ptr(), blocked.stride(0), q.data_ptr(), q.stride(0), q.stride(1),
            keys.data_ptr(), keys.stride(0), keys.stride(1), key_norms.data_ptr(), key_norms.stride(0),
            norm_max.data_ptr(), slack_factor, H, R, D, n, k, scores.data_ptr(), bmax.data_ptr(),
            vals.data_ptr(), idx.data_ptr(), ncand.data_ptr())
    entries = H * R * n
    if _openmp:
        codes = [_lib.lookup_bf16_rows(*args, 3, 0, 0, threads) for threads in
                 [max(1, min(torch.get_num_threads(), H * R)) if entries >= OPENMP_MIN_ENTRIES else 1]]
    else:   # the two steps in turn, each split over the pool
        _run_rows(lambda b0, b1, t: _lib.lookup_bf16_rows(*args, 1, 16 * b0, min(16 * b1, n), 1), nb, entries)
        codes = _run_rows(lambda r0, r1, t: _lib.lookup_bf16_rows(*args, 2, r0, r1, 1), H * R, entries)
    if any(c < 0 for c in codes):
        raise MemoryError("native selection: out of memory")
    if any(codes):
        return None
    return vals.view(H, R, k), idx.view(H, R, k), ncand.view(H, R)


def bf16_copy_append(k: torch.Tensor, centre: torch.Tensor, blocks: torch.Tensor, n0: int, norms: torch.Tensor,
                     norm_max: torch.Tensor):
    """`kernels.Bf16KeyCopy.append`'s writes for keys k (H, T, D) float32 (last dim contiguous) at positions
    n0..n0+T−1: blocks (H, n_blocks, D, 16) bfloat16 and norms (H, N) float32 (room for them), norm_max (H,)
    float32 updated in place; centre (H, 1, D) or (H, D) float32. Call only when `available()`."""
    H, T, D = k.shape
    centre = centre.reshape(H, D).contiguous()
    assert k.dtype == centre.dtype == norms.dtype == norm_max.dtype == torch.float32 and k.stride(-1) == 1
    assert blocks.dtype == torch.bfloat16 and blocks.stride()[1:] == (D * 16, 16, 1) and norms.stride(-1) == 1
    assert norm_max.is_contiguous() and blocks.shape[1] * 16 >= n0 + T and norms.shape[1] >= n0 + T
    _lib.bf16_copy_append(k.data_ptr(), k.stride(0), k.stride(1), centre.data_ptr(), H, T, D, n0, blocks.data_ptr(),
                          blocks.stride(0), norms.data_ptr(), norms.stride(0), norm_max.data_ptr())


def candidate_copies(k: torch.Tensor, centre: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LongCache's bf16 candidate copies of new keys k (H, T, D) float32 (last dim contiguous) about centre
    (H, 1, D) or (H, D): (bf16(x) (H, T, D), norms ‖x‖ (H, T, 1), weights (H, T, 1), each head's largest ‖k‖ (H,)),
    x = k − centre, as `kv.longcache._key_copies` computes them (bf16(x) bit for bit, norms and weights to
    rounding). Call only when `available()`."""
    H, T, D = k.shape
    centre = centre.reshape(H, D).contiguous()
    assert k.dtype == centre.dtype == torch.float32 and k.stride(-1) == 1
    x16 = torch.empty(H, T, D, dtype=torch.bfloat16)
    norms, weights, kmax = torch.empty(H, T, 1), torch.empty(H, T, 1), torch.empty(H)
    _lib.candidate_copies(k.data_ptr(), k.stride(0), k.stride(1), centre.data_ptr(), H, T, D, x16.data_ptr(),
                          norms.data_ptr(), weights.data_ptr(), kmax.data_ptr())
    return x16, norms, weights, kmax


def int8_key_copies(k: torch.Tensor, centre: torch.Tensor, first: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LongCache's int8 copies of new keys k (H, T, D) float32 (last dim contiguous) about centre (H, 1, D) or
    (H, D), in blocks of 16 keys (the first `first` long): (parts (H, T, 2D) int8, norms ‖x‖ (H, T, 1), weights
    (H, T, 3), each head's largest ‖k‖ (H,)), x = k − centre, as `kernels.int8_key_parts` computes them (parts and
    scales bit for bit, norms and weights to rounding). D <= 64. Call only when `available()`."""
    H, T, D = k.shape
    centre = centre.reshape(H, D).contiguous()
    assert k.dtype == centre.dtype == torch.float32 and k.stride(-1) == 1 and D <= 64
    parts = torch.empty(H, T, 2 * D, dtype=torch.int8)
    norms, weights, kmax = torch.empty(H, T, 1), torch.empty(H, T, 3), torch.empty(H)
    _lib.int8_key_copies(k.data_ptr(), k.stride(0), k.stride(1), centre.data_ptr(), H, T, D, first, parts.data_ptr(),
                         norms.data_ptr(), weights.data_ptr(), kmax.data_ptr())
    return parts, norms, weights, kmax


def key_flags(k: torch.Tensor, multipliers: torch.Tensor, sorted_hashes: torch.Tensor, order: torch.Tensor,
              keys: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LongCache's hashes (H, T) int64 and duplicate flags (H, T) uint8 of new keys k (H, T, D) float32
    (`key_flags`): multipliers (≥ D,) int64, the index sorted_hashes / order (H, S) int64 of earlier keys' hashes and
    positions in keys (H, N, D) float32. Last dims contiguous. Call only when `available()`."""
    H, T, D = k.shape
    multipliers, sorted_hashes, order = multipliers.contiguous(), sorted_hashes.contiguous(), order.contiguous()
    assert k.dtype == keys.dtype == torch.float32 and k.stride(-1) == 1 and keys.stride(-1) == 1
    assert multipliers.dtype == sorted_hashes.dtype == order.dtype == torch.int64 and multipliers.numel() >= D
    hashes, flags = torch.empty(H, T, dtype=torch.int64), torch.empty(H, T, dtype=torch.uint8)
    _lib.key_flags(k.data_ptr(), k.stride(0), k.stride(1), H, T, D, multipliers.data_ptr(), sorted_hashes.data_ptr(),
                   sorted_hashes.stride(0), order.data_ptr(), order.stride(0), sorted_hashes.shape[1], keys.data_ptr(),
                   keys.stride(0), keys.stride(1), topk, hashes.data_ptr(), flags.data_ptr())
    return hashes, flags


def decode_attend(vals: torch.Tensor, idx: torch.Tensor, scale: float, bias: float, values: torch.Tensor,
                  v_loc: torch.Tensor, s_loc: torch.Tensor | None = None, q_loc: torch.Tensor | None = None,
                  k_loc: torch.Tensor | None = None) -> torch.Tensor:
    """One softmax over [memory ‖ local] and its weighted sum of values (`decode_attend_rows`), for a few rows:
    vals, idx (H, R, k) the memory entries' raw scores (q·key) and positions in values (H, M, D), scaled by `scale`
    and shifted by `bias`; v_loc (H, L, D) the local values; the local scores either s_loc (H, R, L), scaled and
    masked, or computed from q_loc (H, R, D) and k_loc (H, L, D) with every local key visible. Returns (H, R, D).
    All float32 with contiguous last dims. Call only when `available()`."""
    H, R, k = vals.shape
    L, D = v_loc.shape[-2], values.shape[-1]
    vals, idx = vals.contiguous(), idx.contiguous()
    local = [s_loc] if s_loc is not None else [q_loc, k_loc]
    assert all(x.stride(-1) == 1 and x.dtype == torch.float32 for x in [values, v_loc, *local])
    assert vals.dtype == torch.float32 and (s_loc is None or s_loc.shape[-1] == L)
    none = (None, 0, 0)
    sl = (s_loc.data_ptr(), s_loc.stride(0), s_loc.stride(1)) if s_loc is not None else none
    ql = (q_loc.data_ptr(), q_loc.stride(0), q_loc.stride(1)) if s_loc is None else none
    kl = (k_loc.data_ptr(), k_loc.stride(0), k_loc.stride(1)) if s_loc is None else none
    out = torch.empty(H, R, D)
    args = (vals.data_ptr(), idx.data_ptr(), k, scale, bias, values.data_ptr(), values.stride(0), values.stride(1),
            *sl, L, v_loc.data_ptr(), v_loc.stride(0), v_loc.stride(1), *ql, *kl, R, D, out.data_ptr(),
            out.stride(0), out.stride(1))
    codes = _run_rows(lambda r0, r1, t: _lib.decode_attend_rows(*args, r0, r1, t), H * R, H * R * (k + L) * D)
    if any(c < 0 for c in codes):
        raise MemoryError("native decode attention: out of memory")
    return out
