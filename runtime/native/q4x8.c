/* ib-edge's int4 x int8 matmul for the ort LLM engine, as an ONNX Runtime custom op
 * (domain "ib_edge", op "MatMulQ4x8"): x86-64 with AVX-512 F/BW/VL and VNNI.
 *
 * Why it exists: at decode (one activation row) the step is a GEMV that streams every int4 weight
 * once, so its speed is the rate at which the weights come from DRAM. ONNX Runtime's MatMulNBits
 * (accuracy_level 4) streamed the 88 TinyLlama-shape decoder linears at ~30 GB/s on our 2-core
 * AMD EPYC Zen 4 while a plain read of the same bytes ran ~36 GB/s. This kernel reads the weights
 * as ONE sequential stream per thread: RR weight rows are interleaved block by block
 * ([group][block][row][64 bytes]), so the hardware prefetcher sees a single forward stream, with a
 * software prefetch ahead of it; that reaches the plain-read rate (README "A faster int4 decode
 * kernel"). The math is MatMulNBits' accuracy_level 4: activations quantized to int8 per 128-value
 * block (symmetric, round to nearest), u8 x s8 dot products with vpdpbusd, fp32 accumulation.
 *
 * Inputs  A float [..., K]; W uint8 [G, K/128, RR, 64] (G = ceil(N / RR); inside a 64-byte block
 *         byte j holds element 2j in its low nibble and 2j+1 in its high nibble, MatMulNBits'
 *         order); S float [G, K/128, RR] (scale per 128-block; padding rows 0); Z uint8
 *         [G, K/128, RR] (zero point 0..15).
 * Output  Y float [..., N]:  Y[m, n] = sum_k S[n, k/128] * (q[n, k] - Z[n, k/128]) * A[m, k].
 * Attributes K, N (int64).
 *
 * The ONNX Runtime C ABI is declared in ort_abi.h (the few entries this file uses, at their fixed
 * positions); no ONNX Runtime header or library is needed to build, only a C compiler.
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"

#define RR 8          /* weight rows per interleaved group */
#define QB 128        /* values per quantization block (activations and weights) */
#define PREFETCH 2048 /* bytes ahead of the weight stream */

/* ---------------------------------------------------------------- the algorithm core --------- */

/* One row of K floats -> int8 per 128-block: the even elements in bytes 0..63 of the block and the
 * odd ones in 64..127 (matching the weights' low and high nibbles); dx[b] = block scale,
 * dsx[b] = dx[b] * sum of the block's int8 values (for the zero-point term). */
static void quantize_row(const float *x, int64_t K, int8_t *xq, float *dx, float *dsx) {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (int64_t b = 0; b < K / QB; b++) {
        const float *xb = x + b * QB;
        __m512 v[8], m = _mm512_setzero_ps();
        __mmask16 nan = 0;
        for (int i = 0; i < 8; i++) {
            v[i] = _mm512_loadu_ps(xb + 16 * i);
            m = _mm512_max_ps(m, _mm512_abs_ps(v[i]));
            nan |= _mm512_cmp_ps_mask(v[i], v[i], _CMP_UNORD_Q);
        }
        /* a NaN (max_ps would drop it) or an infinity makes the block's scale NaN, so every output
         * that reads the block is NaN, as a float matmul would give, not finite garbage */
        float amax = nan ? __builtin_nanf("") : _mm512_reduce_max_ps(m);
        float d = amax / 127.0f, inv = (amax > 0.0f && amax <= __FLT_MAX__) ? 127.0f / amax : 0.0f;
        if (amax > __FLT_MAX__) d = __builtin_nanf("");
        __m512 s = _mm512_set1_ps(inv);
        __m512i total = _mm512_setzero_si512();
        int8_t *q = xq + b * QB;
        for (int i = 0; i < 4; i++) {   /* 32 floats -> 16 even + 16 odd */
            __m512i e = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(v[2 * i], even, v[2 * i + 1]), s));
            __m512i o = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(v[2 * i], odd, v[2 * i + 1]), s));
            _mm_storeu_si128((__m128i *)(q + 16 * i), _mm512_cvtsepi32_epi8(e));
            _mm_storeu_si128((__m128i *)(q + 64 + 16 * i), _mm512_cvtsepi32_epi8(o));
            total = _mm512_add_epi32(total, _mm512_add_epi32(e, o));
        }
        dx[b] = d;
        dsx[b] = d * (float)_mm512_reduce_add_epi32(total);
    }
}

/* RR output rows (group g) for activation row m (and m + 1 when two): y[m * ldy + g * RR + r],
 * r < rows. Two rows share each weight load and nibble unpack (prefill, batched decode). */
static inline void group_rows_at(const uint8_t *W, const float *S, const uint8_t *Z, int64_t nb, int64_t g, int rows,
                                 int64_t m, int two, const int8_t *xq, const float *dx, const float *dsx, float *y,
                                 int64_t ldy) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const uint8_t *w0 = W + (size_t)g * nb * RR * 64;
    const float *s0 = S + (size_t)g * nb * RR;
    const uint8_t *z0 = Z + (size_t)g * nb * RR;
    const int8_t *x0 = xq + m * nb * QB, *x1 = x0 + (two ? nb * QB : 0);
    const float *dx0 = dx + m * nb, *dx1 = dx0 + (two ? nb : 0);
    const float *ds0 = dsx + m * nb, *ds1 = ds0 + (two ? nb : 0);
    __m512 acc0[RR], acc1[RR];
    __m256 corr0 = _mm256_setzero_ps(), corr1 = _mm256_setzero_ps();
    float sc0[RR] __attribute__((aligned(32))), sc1[RR] __attribute__((aligned(32)));
    for (int r = 0; r < RR; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w0 + (size_t)b * RR * 64;
        if (m == 0)
            for (int p = 0; p < RR; p++) _mm_prefetch((const char *)(wb + PREFETCH + 64 * p), _MM_HINT_T0);
        const __m256 sv = _mm256_loadu_ps(s0 + b * RR);
        const __m256 sz = _mm256_mul_ps(sv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                                _mm_loadl_epi64((const __m128i *)(z0 + b * RR)))));
        const __m512i xl0 = _mm512_loadu_si512(x0 + b * QB), xh0 = _mm512_loadu_si512(x0 + b * QB + 64);
        _mm256_store_ps(sc0, _mm256_mul_ps(sv, _mm256_set1_ps(dx0[b])));
        corr0 = _mm256_fmadd_ps(sz, _mm256_set1_ps(ds0[b]), corr0);
        if (two) {
            const __m512i xl1 = _mm512_loadu_si512(x1 + b * QB), xh1 = _mm512_loadu_si512(x1 + b * QB + 64);
            _mm256_store_ps(sc1, _mm256_mul_ps(sv, _mm256_set1_ps(dx1[b])));
            corr1 = _mm256_fmadd_ps(sz, _mm256_set1_ps(ds1[b]), corr1);
            for (int r = 0; r < RR; r++) {
                const __m512i w = _mm512_loadu_si512(wb + 64 * r);
                const __m512i lo = _mm512_and_si512(w, low4);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
                const __m512i d0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl0), hi, xh0);
                const __m512i d1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl1), hi, xh1);
                acc0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(sc0[r]), acc0[r]);
                acc1[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_set1_ps(sc1[r]), acc1[r]);
            }
        } else {
            for (int r = 0; r < RR; r++) {
                const __m512i w = _mm512_loadu_si512(wb + 64 * r);
                const __m512i lo = _mm512_and_si512(w, low4);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
                const __m512i d0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl0), hi, xh0);
                acc0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(sc0[r]), acc0[r]);
            }
        }
    }
    float c[RR];
    _mm256_storeu_ps(c, corr0);
    for (int r = 0; r < rows; r++) y[m * ldy + g * RR + r] = _mm512_reduce_add_ps(acc0[r]) - c[r];
    if (two) {
        _mm256_storeu_ps(c, corr1);
        for (int r = 0; r < rows; r++) y[(m + 1) * ldy + g * RR + r] = _mm512_reduce_add_ps(acc1[r]) - c[r];
    }
}

/* RR output rows (group g) for all M activation rows, two at a time while the group's weights
 * (8 rows x K/2 bytes) stay in L1/L2. */
static void group_rows(const uint8_t *W, const float *S, const uint8_t *Z, int64_t nb, int64_t g, int rows,
                       int64_t M, const int8_t *xq, const float *dx, const float *dsx, float *y, int64_t ldy) {
    int64_t m = 0;
    for (; m + 1 < M; m += 2) group_rows_at(W, S, Z, nb, g, rows, m, 1, xq, dx, dsx, y, ldy);
    if (m < M) group_rows_at(W, S, Z, nb, g, rows, m, 0, xq, dx, dsx, y, ldy);
}

/* One product: the weights, the activations quantized once into a scratch buffer, the output. */
typedef struct {
    const uint8_t *W; const float *S; const uint8_t *Z;
    int64_t nb, G, N, M, chunks;
    int8_t *xq; float *dx, *dsx; float *y;
} Work;

/* Quantize A's M rows into w's scratch (one allocation, freed by work_free); 0, or -2 when out of
 * memory. */
static int work_init(Work *w, const float *A, int64_t M, int64_t K, int64_t N, const uint8_t *W, const float *S,
                     const uint8_t *Z, float *Y) {
    int64_t nb = K / QB, rows = M ? M : 1;
    *w = (Work){W, S, Z, nb, (N + RR - 1) / RR, N, M, 1, NULL, NULL, NULL, Y};
    float *f = malloc(sizeof(float) * (size_t)rows * nb * 2 + (size_t)rows * K);
    if (!f) return -2;
    w->dx = f;
    w->dsx = f + rows * nb;
    w->xq = (int8_t *)(f + 2 * rows * nb);
    for (int64_t m = 0; m < M; m++) quantize_row(A + m * K, K, w->xq + m * K, w->dx + m * nb, w->dsx + m * nb);
    return 0;
}

static void work_free(Work *w) { free(w->dx); }

/* Output row groups [g0, g1) for every activation row. */
static void run_groups(const Work *w, int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; g++)
        group_rows(w->W, w->S, w->Z, w->nb, g, (int)(w->N - g * RR < RR ? w->N - g * RR : RR), w->M, w->xq, w->dx,
                   w->dsx, w->y, w->N);
}

/* The whole product on the calling thread, for tests and benchmarks outside ONNX Runtime. */
#define IB_EXPORT __attribute__((visibility("default")))

IB_EXPORT int ib_q4x8_matmul(const float *A, int64_t M, int64_t K, int64_t N, const uint8_t *W, const float *S,
                   const uint8_t *Z, float *Y) {
    if (K <= 0 || K % QB || N <= 0 || M < 0) return -1;
    Work w;
    if (work_init(&w, A, M, K, N, W, S, Z, Y)) return -2;
    run_groups(&w, 0, w.G);
    work_free(&w);
    return 0;
}

/* 1 when this CPU runs the kernel (AVX-512 F/BW/VL + VNNI, and the OS saves the zmm state). */
IB_EXPORT int ib_q4x8_cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

/* ------------------------------------------------------------- the ONNX Runtime custom op ---- */

static const OrtApi *api;

typedef struct {
    int64_t K, N;
} Kernel;

#define CHUNKS 16   /* tasks per matmul: contiguous runs of groups, spread over the intra-op pool */

static void run_chunk(void *p, size_t i) {
    const Work *w = p;
    run_groups(w, w->G * (int64_t)i / w->chunks, w->G * (int64_t)(i + 1) / w->chunks);
}

static OrtStatus *fail(const char *fmt, long long a, long long b) {
    char msg[256];
    snprintf(msg, sizeof msg, fmt, a, b);
    return api->CreateStatus(ORT_INVALID_ARGUMENT, msg);
}

#define CHECK(expr) do { OrtStatus *st_ = (expr); if (st_) return st_; } while (0)

/* (ONNX Runtime checks the element types against GetInputType before the kernel runs.) */
static OrtStatus *tensor_dims(const OrtValue *v, int64_t *dims, size_t *rank) {
    OrtTensorTypeAndShapeInfo *info;
    CHECK(api->GetTensorTypeAndShape(v, &info));
    OrtStatus *st = api->GetDimensionsCount(info, rank);
    if (!st && *rank > 8) st = api->CreateStatus(ORT_INVALID_ARGUMENT, "MatMulQ4x8: input of rank > 8");
    if (!st) st = api->GetDimensions(info, dims, *rank);
    api->ReleaseTensorTypeAndShapeInfo(info);
    return st;
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
    const Kernel *k = kernel;
    const OrtValue *in[4];
    int64_t dims[4][8];
    size_t rank[4];
    for (size_t i = 0; i < 4; i++) {
        CHECK(api->KernelContext_GetInput(ctx, i, &in[i]));
        CHECK(tensor_dims(in[i], dims[i], &rank[i]));
    }
    int64_t K = k->K, N = k->N, nb = K / QB, G = (N + RR - 1) / RR;
    if (rank[0] < 1 || dims[0][rank[0] - 1] != K) return fail("MatMulQ4x8: A's last dimension is %lld, K is %lld",
                                                               rank[0] ? dims[0][rank[0] - 1] : -1, K);
    if (rank[1] != 4 || dims[1][0] != G || dims[1][1] != nb || dims[1][2] != RR || dims[1][3] != 64)
        return fail("MatMulQ4x8: W is not [%lld, %lld, 8, 64]", G, nb);
    if (rank[2] != 3 || dims[2][0] != G || dims[2][1] != nb || dims[2][2] != RR ||
        rank[3] != 3 || dims[3][0] != G || dims[3][1] != nb || dims[3][2] != RR)
        return fail("MatMulQ4x8: S or Z is not [%lld, %lld, 8]", G, nb);
    int64_t M = 1;
    for (size_t d = 0; d + 1 < rank[0]; d++) M *= dims[0][d];
    int64_t out_dims[8];
    memcpy(out_dims, dims[0], sizeof(int64_t) * rank[0]);
    out_dims[rank[0] - 1] = N;
    OrtValue *out;
    CHECK(api->KernelContext_GetOutput(ctx, 0, out_dims, rank[0], &out));
    const float *A; const uint8_t *W, *Z; const float *S; float *Y;
    CHECK(api->GetTensorMutableData((OrtValue *)in[0], (void **)&A));
    CHECK(api->GetTensorMutableData((OrtValue *)in[1], (void **)&W));
    CHECK(api->GetTensorMutableData((OrtValue *)in[2], (void **)&S));
    CHECK(api->GetTensorMutableData((OrtValue *)in[3], (void **)&Z));
    CHECK(api->GetTensorMutableData(out, (void **)&Y));
    if (M == 0) return NULL;
    Work w;
    if (work_init(&w, A, M, K, N, W, S, Z, Y)) return api->CreateStatus(ORT_FAIL, "MatMulQ4x8: out of memory");
    w.chunks = G < CHUNKS ? G : CHUNKS;
    OrtStatus *st = api->KernelContext_ParallelFor(ctx, run_chunk, (size_t)w.chunks, (size_t)w.chunks, &w);
    work_free(&w);
    return st;
}

static OrtStatus *create_kernel(const OrtCustomOp *op, const OrtApi *a, const OrtKernelInfo *info, void **out) {
    (void)op; (void)a;
    Kernel *k = malloc(sizeof *k);
    if (!k) return api->CreateStatus(ORT_FAIL, "MatMulQ4x8: out of memory");
    OrtStatus *st = api->KernelInfoGetAttribute_int64(info, "K", &k->K);
    if (!st) st = api->KernelInfoGetAttribute_int64(info, "N", &k->N);
    if (!st && (k->K <= 0 || k->K % QB || k->N <= 0))
        st = fail("MatMulQ4x8: K=%lld must be a positive multiple of 128 and N=%lld positive", k->K, k->N);
    if (st) { free(k); return st; }
    *out = k;
    return NULL;
}

static void *create_kernel_v1(const OrtCustomOp *op, const OrtApi *a, const OrtKernelInfo *info) {
    void *k = NULL;
    OrtStatus *st = create_kernel(op, a, info, &k);
    if (st) api->ReleaseStatus(st);
    return k;
}
static void compute_v1(void *kernel, OrtKernelContext *ctx) {
    OrtStatus *st = compute(kernel, ctx);
    if (st) api->ReleaseStatus(st);
}
static void destroy(void *kernel) { free(kernel); }
static const char *op_name(const OrtCustomOp *op) { (void)op; return "MatMulQ4x8"; }
static const char *op_ep(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static ONNXTensorElementDataType in_type(const OrtCustomOp *op, size_t i) {
    (void)op;
    return (i == 0 || i == 2) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
}
static size_t in_count(const OrtCustomOp *op) { (void)op; return 4; }
static ONNXTensorElementDataType out_type(const OrtCustomOp *op, size_t i) {
    (void)op; (void)i;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t out_count(const OrtCustomOp *op) { (void)op; return 1; }
static OrtCustomOpInputOutputCharacteristic required(const OrtCustomOp *op, size_t i) {
    (void)op; (void)i;
    return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType mem_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return OrtMemTypeDefault; }
static int one(const OrtCustomOp *op) { (void)op; return 1; }
static int zero(const OrtCustomOp *op) { (void)op; return 0; }

static OrtCustomOp q4x8_op = {
    .version = 16,   /* ORT 1.16's struct: V2 create/compute (errors come back as statuses) */
    .CreateKernel = create_kernel_v1,
    .GetName = op_name,
    .GetExecutionProviderType = op_ep,
    .GetInputType = in_type,
    .GetInputTypeCount = in_count,
    .GetOutputType = out_type,
    .GetOutputTypeCount = out_count,
    .KernelCompute = compute_v1,
    .KernelDestroy = destroy,
    .GetInputCharacteristic = required,
    .GetOutputCharacteristic = required,
    .GetInputMemoryType = mem_type,
    .GetVariadicInputMinArity = one,
    .GetVariadicInputHomogeneity = zero,
    .GetVariadicOutputMinArity = one,
    .GetVariadicOutputHomogeneity = zero,
    .CreateKernelV2 = create_kernel,
    .KernelComputeV2 = compute,
};

static OrtCustomOpDomain *domain;   /* made once, shared by every session, never freed */
static const OrtApiBase *api_base;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void make_domain(void) {
    const OrtApiBase *base = __atomic_load_n(&api_base, __ATOMIC_ACQUIRE);
    api = base->GetApi(IB_ORT_API_VERSION);
    if (!api) return;   /* an ONNX Runtime older than 1.17 */
    OrtStatus *st = api->CreateCustomOpDomain("ib_edge", &domain);
    if (!st) {
        st = api->CustomOpDomain_Add(domain, &q4x8_op);
        if (st) { api->ReleaseCustomOpDomain(domain); domain = NULL; }
    }
    if (st) { api->ReleaseStatus(st); domain = NULL; }
}

/* ONNX Runtime's entry point (SessionOptions.register_custom_ops_library); may be called from
 * several threads, once per session options. */
IB_EXPORT OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    __atomic_store_n(&api_base, base, __ATOMIC_RELEASE);   /* the same pointer from every caller */
    pthread_once(&once, make_domain);
    if (!api) {   /* every ONNX Runtime has API version 1's CreateStatus at position 0 */
        const OrtApi *v1 = base->GetApi(1);
        return v1 ? v1->CreateStatus(ORT_FAIL, "MatMulQ4x8 needs ONNX Runtime 1.17 or later") : NULL;
    }
    if (!ib_q4x8_cpu_ok()) return api->CreateStatus(ORT_FAIL, "MatMulQ4x8 needs AVX-512 F/BW/VL and VNNI");
    if (!domain) return api->CreateStatus(ORT_FAIL, "MatMulQ4x8: ONNX Runtime refused the ib_edge op domain");
    return api->AddCustomOpDomain(options, domain);
}
