// On-device decoding of fixed-size batch fields for training input.
//
// Compiled at run time with NVRTC (no headers needed: half and bfloat16 results are
// produced as their 16-bit patterns), once per device, by shardlock::device::kernels.
// Each kernel has a CPU reference in loader-core/src/device/kernels/mod.rs (module `cpu`)
// that the GPU test compares against bit for bit; build options: --fmad=false, so
// (x - mean) * scale rounds exactly as on the CPU.

// f32 -> IEEE half, round to nearest even (the hardware conversion).
__device__ __forceinline__ unsigned short to_f16_bits(float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

// f32 -> bfloat16, round to nearest even; NaN stays a quiet NaN.
__device__ __forceinline__ unsigned short to_bf16_bits(float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// Index of output element i in the HWC source, for an output in CHW (chw != 0) or
// HWC layout. n samples of h*w*c bytes each.
__device__ __forceinline__ long long src_index(long long i, int h, int w, int c, int chw, int* ch) {
    long long hw = (long long)h * w;
    long long per = hw * c;
    long long s = i / per;
    long long r = i - s * per;
    if (chw) {
        *ch = (int)(r / hw);
        long long p = r - (long long)(*ch) * hw;
        return s * per + p * c + *ch;
    }
    *ch = (int)(r % c);
    return i;
}

#define NORMALIZE_U8(NAME, OUT_T, CONVERT)                                                      \
    extern "C" __global__ void NAME(const unsigned char* __restrict__ src, OUT_T* __restrict__ dst, \
                                    const float* __restrict__ mean, const float* __restrict__ scale, \
                                    long long total, int h, int w, int c, int chw) {            \
        long long stride = (long long)blockDim.x * gridDim.x;                                   \
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) { \
            int ch;                                                                             \
            long long j = src_index(i, h, w, c, chw, &ch);                                      \
            float y = ((float)src[j] - mean[ch]) * scale[ch];                                   \
            dst[i] = CONVERT(y);                                                                \
        }                                                                                       \
    }

#define IDENTITY(y) (y)
NORMALIZE_U8(normalize_u8_f32, float, IDENTITY)
NORMALIZE_U8(normalize_u8_f16, unsigned short, to_f16_bits)
NORMALIZE_U8(normalize_u8_bf16, unsigned short, to_bf16_bits)

// Integer widening: u16 token ids -> i64 (what embedding lookups take).
extern "C" __global__ void widen_u16_i64(const unsigned short* __restrict__ src, long long* __restrict__ dst,
                                         long long total) {
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        dst[i] = (long long)src[i];
    }
}

// ---------------------------------------------------------------------------------
// Image resampling for decode_on="device": crop, resize and flip fused into per-sample
// filter taps computed on the host (shardlock::decode::Plan, PIL's antialiased
// bilinear), in PIL's two passes, each rounded to 8 bits. Both kernels compute exactly
// what Plan::run does on the CPU: the same taps, the same order of f32 operations
// (__fmul_rn / __fadd_rn, never contracted), the same rounding.

// One sample's descriptor: 16 x i64 (`SampleDesc` in device/kernels/mod.rs).
struct ResampleDesc {
    long long src;       // byte offset of the sample's decoded pixels in `pixels`
    long long pitch;     // bytes per source row
    long long channels;  // bytes per source pixel: 1, 2 (gray replicated), 3, 4 (alpha dropped)
    long long row0;      // first source row the vertical pass reads
    long long rows;      // source rows it reads
    long long tmp;       // offset (floats) of the sample's horizontal-pass rows in `tmp`
    long long xs;        // offset (ints) of the x starts in `ints`; ow tap counts follow
    long long xw;        // offset (floats) of the x weights in `weights`
    long long xstride;   // weight slots per output column
    long long ys;        // offset (ints) of the y starts; oh tap counts follow
    long long yw;        // offset (floats) of the y weights
    long long ystride;   // weight slots per output row
    long long pad[4];
};

// Clamp to [0, 255] and round to an integer (ties to even), as decode/resample.rs clip8.
__device__ __forceinline__ float clip8(float v) {
    v = fminf(fmaxf(v, 0.0f), 255.0f);
    return __fadd_rn(__fadd_rn(v, 12582912.0f), -12582912.0f);
}

// Horizontal pass: for sample blockIdx.y, rows row0..row0+rows of the source, output
// columns 0..ow, as RGBX floats (the fourth lane 0).
extern "C" __global__ void resample_h(const unsigned char* __restrict__ pixels, const ResampleDesc* __restrict__ desc,
                                      const int* __restrict__ ints, const float* __restrict__ weights,
                                      float* __restrict__ tmp, int ow) {
    const ResampleDesc d = desc[blockIdx.y];
    long long total = d.rows * ow;
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        long long r = i / ow;
        int x = (int)(i - r * ow);
        const unsigned char* row = pixels + d.src + (d.row0 + r) * d.pitch;
        int s0 = ints[d.xs + x];
        int n = ints[d.xs + ow + x];
        const float* w = weights + d.xw + (long long)x * d.xstride;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f;
        for (int t = 0; t < n; t++) {
            const unsigned char* p = row + (long long)(s0 + t) * d.channels;
            float r0 = (float)p[0];
            float g0 = d.channels >= 3 ? (float)p[1] : r0;
            float b0 = d.channels >= 3 ? (float)p[2] : r0;
            a0 = __fadd_rn(a0, __fmul_rn(r0, w[t]));
            a1 = __fadd_rn(a1, __fmul_rn(g0, w[t]));
            a2 = __fadd_rn(a2, __fmul_rn(b0, w[t]));
        }
        float* o = tmp + d.tmp + i * 4;
        o[0] = clip8(a0);
        o[1] = clip8(a1);
        o[2] = clip8(a2);
        o[3] = 0.0f;
    }
}

// Vertical pass, rounding, then value * scale + bias per channel (identity for u8,
// 1/255 for floats, (x/255 - mean)/std when normalizing) in the output dtype, CHW
// (chw != 0) or HWC, sample blockIdx.y at out + blockIdx.y * 3 * oh * ow.
#define RESAMPLE_V(NAME, OUT_T, CONVERT)                                                                        \
    extern "C" __global__ void NAME(const ResampleDesc* __restrict__ desc, const int* __restrict__ ints,         \
                                    const float* __restrict__ weights, const float* __restrict__ tmp,            \
                                    OUT_T* __restrict__ out, int oh, int ow, int chw, float s0, float s1,        \
                                    float s2, float b0, float b1, float b2) {                                    \
        const ResampleDesc d = desc[blockIdx.y];                                                                 \
        long long hw = (long long)oh * ow;                                                                       \
        OUT_T* o = out + (long long)blockIdx.y * 3 * hw;                                                         \
        long long stride = (long long)blockDim.x * gridDim.x;                                                    \
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < hw; i += stride) {              \
            int y = (int)(i / ow);                                                                               \
            int x = (int)(i - (long long)y * ow);                                                                \
            long long s = ints[d.ys + y] - d.row0;                                                               \
            int n = ints[d.ys + oh + y];                                                                         \
            const float* w = weights + d.yw + (long long)y * d.ystride;                                          \
            float a[3] = {0.0f, 0.0f, 0.0f};                                                                     \
            for (int t = 0; t < n; t++) {                                                                        \
                const float* v = tmp + d.tmp + ((s + t) * ow + x) * 4;                                           \
                for (int k = 0; k < 3; k++) a[k] = __fadd_rn(a[k], __fmul_rn(v[k], w[t]));                       \
            }                                                                                                    \
            float sc[3] = {s0, s1, s2};                                                                          \
            float bi[3] = {b0, b1, b2};                                                                          \
            for (int c = 0; c < 3; c++) {                                                                        \
                float q = __fadd_rn(__fmul_rn(clip8(a[c]), sc[c]), bi[c]);                                      \
                long long at = chw ? ((long long)c * oh + y) * ow + x : ((long long)y * ow + x) * 3 + c;         \
                o[at] = CONVERT(q);                                                                              \
            }                                                                                                    \
        }                                                                                                        \
    }

#define TO_U8(y) ((unsigned char)(y))
RESAMPLE_V(resample_v_u8, unsigned char, TO_U8)
RESAMPLE_V(resample_v_f32, float, IDENTITY)
RESAMPLE_V(resample_v_f16, unsigned short, to_f16_bits)
RESAMPLE_V(resample_v_bf16, unsigned short, to_bf16_bits)
