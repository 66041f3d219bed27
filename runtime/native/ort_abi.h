/* The part of ONNX Runtime's C ABI that q4x8.c uses, declared here so that building the op needs
 * only a C compiler (the onnxruntime wheel ships no headers).
 *
 * ONNX Runtime's OrtApi is a table of function pointers that only ever grows at its end: an entry
 * keeps its position in every later release, and GetApi(v) hands out the table of API version v.
 * The positions below are those of ONNX Runtime's public onnxruntime_c_api.h (counted entry by entry
 * and checked with offsetof against that header;
 * the _Static_asserts pin them); KernelContext_ParallelFor (position 274) arrived in API version
 * 17 (ONNX Runtime 1.17), the oldest this library asks for. OrtCustomOp is the layout of its
 * version 16 (the version q4x8.c declares, so ONNX Runtime reads no field past KernelComputeV2).
 * tests/test_q4x8.py loads the op into the installed ONNX Runtime and checks its results.
 */
#ifndef IB_ORT_ABI_H
#define IB_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

#define IB_ORT_API_VERSION 17

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtShapeInferContext OrtShapeInferContext;
struct OrtCustomOp;

typedef enum { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 } OrtErrorCode;
typedef enum { ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 = 2 } ONNXTensorElementDataType;
typedef enum { INPUT_OUTPUT_REQUIRED = 0 } OrtCustomOpInputOutputCharacteristic;
typedef enum { OrtMemTypeDefault = 0 } OrtMemType;

#define IB_GAP(from, to) void *gap_##from##_##to[(to) - (from) + 1]

typedef struct OrtApi {
    OrtStatus *(*CreateStatus)(OrtErrorCode code, const char *msg);                                   /* 0 */
    IB_GAP(1, 25);
    OrtStatus *(*CreateCustomOpDomain)(const char *domain, OrtCustomOpDomain **out);                  /* 26 */
    OrtStatus *(*CustomOpDomain_Add)(OrtCustomOpDomain *domain, const struct OrtCustomOp *op);        /* 27 */
    OrtStatus *(*AddCustomOpDomain)(OrtSessionOptions *options, OrtCustomOpDomain *domain);           /* 28 */
    IB_GAP(29, 50);
    OrtStatus *(*GetTensorMutableData)(OrtValue *value, void **out);                                  /* 51 */
    IB_GAP(52, 60);
    OrtStatus *(*GetDimensionsCount)(const OrtTensorTypeAndShapeInfo *info, size_t *out);             /* 61 */
    OrtStatus *(*GetDimensions)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims, size_t n);      /* 62 */
    IB_GAP(63, 64);
    OrtStatus *(*GetTensorTypeAndShape)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out);      /* 65 */
    IB_GAP(66, 85);
    OrtStatus *(*KernelInfoGetAttribute_int64)(const OrtKernelInfo *info, const char *name, int64_t *out); /* 86 */
    IB_GAP(87, 89);
    OrtStatus *(*KernelContext_GetInput)(const OrtKernelContext *ctx, size_t i, const OrtValue **out); /* 90 */
    OrtStatus *(*KernelContext_GetOutput)(OrtKernelContext *ctx, size_t i, const int64_t *dims, size_t n,
                                          OrtValue **out);                                            /* 91 */
    IB_GAP(92, 92);
    void (*ReleaseStatus)(OrtStatus *status);                                                         /* 93 */
    IB_GAP(94, 98);
    void (*ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo *info);                           /* 99 */
    IB_GAP(100, 100);
    void (*ReleaseCustomOpDomain)(OrtCustomOpDomain *domain);                                         /* 101 */
    IB_GAP(102, 273);
    OrtStatus *(*KernelContext_ParallelFor)(const OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t total,
                                            size_t num_batch, void *user);                           /* 274 */
} OrtApi;

#define IB_AT(field, pos) _Static_assert(offsetof(OrtApi, field) == (pos) * sizeof(void *), #field " at " #pos)
IB_AT(CreateCustomOpDomain, 26);
IB_AT(GetTensorMutableData, 51);
IB_AT(GetDimensionsCount, 61);
IB_AT(GetTensorTypeAndShape, 65);
IB_AT(KernelInfoGetAttribute_int64, 86);
IB_AT(KernelContext_GetInput, 90);
IB_AT(ReleaseStatus, 93);
IB_AT(ReleaseTensorTypeAndShapeInfo, 99);
IB_AT(ReleaseCustomOpDomain, 101);
IB_AT(KernelContext_ParallelFor, 274);

typedef struct OrtApiBase {
    const OrtApi *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

typedef struct OrtCustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info);
    const char *(*GetName)(const struct OrtCustomOp *op);
    const char *(*GetExecutionProviderType)(const struct OrtCustomOp *op);
    ONNXTensorElementDataType (*GetInputType)(const struct OrtCustomOp *op, size_t index);
    size_t (*GetInputTypeCount)(const struct OrtCustomOp *op);
    ONNXTensorElementDataType (*GetOutputType)(const struct OrtCustomOp *op, size_t index);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOp *op);
    void (*KernelCompute)(void *kernel, OrtKernelContext *ctx);
    void (*KernelDestroy)(void *kernel);
    OrtCustomOpInputOutputCharacteristic (*GetInputCharacteristic)(const struct OrtCustomOp *op, size_t index);
    OrtCustomOpInputOutputCharacteristic (*GetOutputCharacteristic)(const struct OrtCustomOp *op, size_t index);
    OrtMemType (*GetInputMemoryType)(const struct OrtCustomOp *op, size_t index);
    int (*GetVariadicInputMinArity)(const struct OrtCustomOp *op);
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *op);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *op);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *op);
    OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                                 void **kernel);
    OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *ctx);
} OrtCustomOp;

#endif
