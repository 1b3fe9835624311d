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
