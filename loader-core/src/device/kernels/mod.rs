//! On-device decoding of batch fields (`loader-core/kernels/decode.cu`), and the CPU reference
//! of each kernel.
//!
//! The CUDA C source is embedded with `include_str!` and compiled at run time with
//! NVRTC, once per device (feature `cuda`, [`Kernels`]); building shardlock never
//! needs a CUDA toolkit. The [`cpu`] functions are always built: they define what each
//! kernel computes, are tested on every machine, and are the oracle of the GPU test,
//! which compares bit for bit.
//!
//! Kernels:
//! - `normalize_u8_{f32,f16,bf16}`: an image batch stored as `u8[n, h, w, c]` (HWC)
//!   becomes `(x - mean[c]) / std[c]` as f32, f16 or bf16, in CHW (`[n, c, h, w]`)
//!   or HWC layout;
//! - `widen_u16_i64`: token ids stored as u16 become i64 (what embedding lookups take).

/// The CUDA C source of the kernels.
/// (`loader-core/kernels/decode.cu`, inside the crate so that `cargo package` ships it.)
pub const SOURCE: &str = include_str!("../../../kernels/decode.cu");

/// Output element types of the normalisation kernel.
pub trait NormOut: Copy + Default + bytemuck::Pod + Send + Sync + 'static {
    /// Kernel name for this output type.
    const KERNEL: &'static str;
    /// Rounds an f32 (nearest, ties to even), as the kernel does.
    fn from_f32(x: f32) -> Self;
}

impl NormOut for f32 {
    const KERNEL: &'static str = "normalize_u8_f32";
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl NormOut for half::f16 {
    const KERNEL: &'static str = "normalize_u8_f16";
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

impl NormOut for half::bf16 {
    const KERNEL: &'static str = "normalize_u8_bf16";
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

/// Shape and parameters of a normalisation: `n` images of `h x w x c` bytes (HWC).
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// Per-channel mean (in the units of the stored bytes, e.g. 0..255).
    pub mean: Vec<f32>,
    /// Per-channel standard deviation (same units); must be non-zero.
    pub std: Vec<f32>,
    /// Output in CHW layout (`[n, c, h, w]`, what convolutions take) instead of HWC.
    pub chw: bool,
}

impl Normalize {
    /// Checks the parameters against `bytes` of input and returns the image count.
    pub fn images(&self, bytes: usize) -> crate::Result<usize> {
        let c = self.mean.len();
        let bad = |m: String| crate::Error::InvalidArgument(format!("normalize: {m}"));
        if c == 0 || c != self.std.len() {
            return Err(bad(format!(
                "{} means but {} standard deviations (one of each per channel)",
                c,
                self.std.len()
            )));
        }
        if let Some(i) = self.std.iter().position(|s| !s.is_normal()) {
            return Err(bad(format!("std[{i}] must be finite, non-zero and not subnormal")));
        }
        if let Some(i) = self.mean.iter().position(|m| !m.is_finite()) {
            return Err(bad(format!("mean[{i}] must be finite")));
        }
        // The kernel takes h, w, c as 32-bit ints and the element count as i64.
        let fits = |v: usize| i32::try_from(v).is_ok();
        let per = self.h.checked_mul(self.w).and_then(|hw| hw.checked_mul(c));
        let per = match per {
            Some(p) if fits(self.h) && fits(self.w) && fits(c) && i64::try_from(bytes).is_ok() => p,
            _ => return Err(bad(format!("{}x{}x{c} images are too large", self.h, self.w))),
        };
        if per == 0 || !bytes.is_multiple_of(per) {
            return Err(bad(format!("{bytes} bytes are not a whole number of {}x{}x{c} images", self.h, self.w)));
        }
        Ok(bytes / per)
    }

    /// The multipliers the kernel uses: `1 / std`, rounded to f32 once, on the host.
    pub fn scale(&self) -> Vec<f32> {
        self.std.iter().map(|s| 1.0 / s).collect()
    }
}

/// One sample's descriptor for `resample_h` / `resample_v_*` (`ResampleDesc` in
/// decode.cu): 16 little-endian i64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct SampleDesc {
    /// Byte offset of the sample's decoded pixels in the pixel buffer.
    pub(crate) src: i64,
    /// Bytes per source row.
    pub(crate) pitch: i64,
    /// Bytes per source pixel (1 to 4).
    pub(crate) channels: i64,
    /// First source row the vertical pass reads, and how many.
    pub(crate) row0: i64,
    pub(crate) rows: i64,
    /// Offset (floats) of the sample's horizontal-pass output in the scratch.
    pub(crate) tmp: i64,
    /// Offsets of the x taps (ints: starts then counts; floats: weights) and slots per column.
    pub(crate) xs: i64,
    pub(crate) xw: i64,
    pub(crate) xstride: i64,
    /// The same for y.
    pub(crate) ys: i64,
    pub(crate) yw: i64,
    pub(crate) ystride: i64,
    pad: [i64; 4],
}

// The kernel reads `ResampleDesc` as 16 consecutive i64.
const _: () = assert!(std::mem::size_of::<SampleDesc>() == 128);

/// The host half of a resample launch: every sample's descriptor and taps.
#[derive(Debug, Default)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct ResampleTables {
    pub(crate) descs: Vec<SampleDesc>,
    pub(crate) ints: Vec<i32>,
    pub(crate) weights: Vec<f32>,
    /// Floats of horizontal-pass scratch the batch needs.
    pub(crate) tmp_floats: usize,
    /// Most source rows one sample's vertical pass reads.
    pub(crate) max_rows: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl ResampleTables {
    /// Adds a sample whose decoded pixels (`channels` bytes each, `pitch` bytes a row)
    /// start at byte `src` of the pixel buffer, resampled by `plan` to width `ow`.
    pub(crate) fn push(&mut self, plan: &crate::decode::Plan, src: usize, pitch: usize, channels: usize, ow: usize) {
        let at = plan.push_tables(&mut self.ints, &mut self.weights);
        let (row0, rows) = plan.source_rows();
        self.descs.push(SampleDesc {
            src: src as i64,
            pitch: pitch as i64,
            channels: channels as i64,
            row0: row0 as i64,
            rows: rows as i64,
            tmp: self.tmp_floats as i64,
            xs: at.xs as i64,
            xw: at.xw as i64,
            xstride: at.xstride as i64,
            ys: at.ys as i64,
            yw: at.yw as i64,
            ystride: at.ystride as i64,
            pad: [0; 4],
        });
        self.tmp_floats += rows * ow * 4;
        self.max_rows = self.max_rows.max(rows);
    }
}

/// CPU references of the kernels.
pub mod cpu {
    use super::{NormOut, Normalize};

    /// `normalize_u8_*` on the CPU: exactly the kernel's arithmetic (`(x - mean) *
    /// (1/std)` in f32, then one rounding to the output type).
    pub fn normalize_u8<T: NormOut>(src: &[u8], p: &Normalize) -> crate::Result<Vec<T>> {
        let n = p.images(src.len())?;
        let (h, w, c) = (p.h, p.w, p.mean.len());
        let scale = p.scale();
        let mut out = vec![T::default(); src.len()];
        let hw = h * w;
        for s in 0..n {
            let img = &src[s * hw * c..(s + 1) * hw * c];
            let dst = &mut out[s * hw * c..(s + 1) * hw * c];
            for px in 0..hw {
                for ch in 0..c {
                    let y = (f32::from(img[px * c + ch]) - p.mean[ch]) * scale[ch];
                    let at = if p.chw { ch * hw + px } else { px * c + ch };
                    dst[at] = T::from_f32(y);
                }
            }
        }
        Ok(out)
    }

    /// `resample_h` then `resample_v_*` on the CPU, from the same tables and in the
    /// same order of operations: `n` images of `3 * oh * ow` values of `dtype`
    /// (little-endian bytes), CHW or HWC, each value `round8(sum) * scale + bias`.
    #[allow(clippy::too_many_arguments)]
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn resample(
        pixels: &[u8],
        t: &super::ResampleTables,
        oh: usize,
        ow: usize,
        chw: bool,
        dtype: crate::format::DType,
        scale: [f32; 3],
        bias: [f32; 3],
    ) -> Vec<u8> {
        use crate::format::DType;
        let clip8 = |v: f32| (v.clamp(0.0, 255.0) + 12_582_912.0) - 12_582_912.0;
        let es = dtype.size();
        let per = 3 * oh * ow;
        let mut out = vec![0u8; t.descs.len() * per * es];
        let mut tmp = vec![0f32; t.tmp_floats];
        for (s, d) in t.descs.iter().enumerate() {
            let (xs, xw, ys, yw) = (d.xs as usize, d.xw as usize, d.ys as usize, d.yw as usize);
            let c = d.channels as usize;
            for r in 0..d.rows as usize {
                let row = &pixels[d.src as usize + (d.row0 as usize + r) * d.pitch as usize..];
                for x in 0..ow {
                    let (s0, n) = (t.ints[xs + x] as usize, t.ints[xs + ow + x] as usize);
                    let w = &t.weights[xw + x * d.xstride as usize..];
                    let mut a = [0f32; 3];
                    for k in 0..n {
                        let p = &row[(s0 + k) * c..];
                        let px = if c >= 3 { [p[0], p[1], p[2]] } else { [p[0]; 3] };
                        for ch in 0..3 {
                            a[ch] += f32::from(px[ch]) * w[k];
                        }
                    }
                    let o = d.tmp as usize + (r * ow + x) * 4;
                    tmp[o..o + 3].copy_from_slice(&a.map(clip8));
                }
            }
            for y in 0..oh {
                let (s0, n) = (t.ints[ys + y] as usize - d.row0 as usize, t.ints[ys + oh + y] as usize);
                let w = &t.weights[yw + y * d.ystride as usize..];
                for x in 0..ow {
                    let mut a = [0f32; 3];
                    for k in 0..n {
                        let v = &tmp[d.tmp as usize + ((s0 + k) * ow + x) * 4..];
                        for ch in 0..3 {
                            a[ch] += v[ch] * w[k];
                        }
                    }
                    for ch in 0..3 {
                        let q = clip8(a[ch]) * scale[ch] + bias[ch];
                        let at = s * per + if chw { (ch * oh + y) * ow + x } else { (y * ow + x) * 3 + ch };
                        let b = &mut out[at * es..(at + 1) * es];
                        match dtype {
                            DType::U8 => b[0] = q as u8,
                            DType::F16 => b.copy_from_slice(&half::f16::from_f32(q).to_le_bytes()),
                            DType::Bf16 => b.copy_from_slice(&half::bf16::from_f32(q).to_le_bytes()),
                            _ => b.copy_from_slice(&q.to_le_bytes()),
                        }
                    }
                }
            }
        }
        out
    }

    /// `widen_u16_i64` on the CPU.
    pub fn widen_u16_i64(src: &[u16]) -> Vec<i64> {
        src.iter().map(|&v| i64::from(v)).collect()
    }
}

#[cfg(feature = "cuda")]
mod gpu;
/// Without the `cuda` feature: the same type, whose constructors return
/// [`crate::Error::DeviceUnavailable`].
#[cfg(not(feature = "cuda"))]
pub use super::placeholder::Kernels;
#[cfg(feature = "cuda")]
pub use gpu::Kernels;
#[cfg(feature = "cuda")]
pub(crate) use gpu::ResampleLaunch;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn params(chw: bool) -> Normalize {
        Normalize { h: 2, w: 3, mean: vec![10.0, 20.0, 30.0], std: vec![2.0, 4.0, 0.5], chw }
    }

    #[test]
    fn chw_layout_moves_channels_first_and_normalizes() {
        // Two 2x3 RGB images; pixel p of image s has channel values (s*100+p, p, 255).
        let mut src = Vec::new();
        for s in 0..2u8 {
            for p in 0..6u8 {
                src.extend_from_slice(&[s * 100 + p, p, 255]);
            }
        }
        let out = cpu::normalize_u8::<f32>(&src, &params(true)).unwrap();
        assert_eq!(out.len(), 36);
        // Image 1, channel 0, pixel 4: (104 - 10) / 2.
        assert_eq!(out[18 + 4], 47.0);
        // Image 0, channel 1, pixel 5: (5 - 20) / 4.
        assert_eq!(out[6 + 5], -3.75);
        // Channel 2 everywhere: (255 - 30) / 0.5.
        assert!(out[12..18].iter().chain(&out[30..36]).all(|&v| v == 450.0));
        let hwc = cpu::normalize_u8::<f32>(&src, &params(false)).unwrap();
        assert_eq!(hwc[18 + 4 * 3], 47.0);
        assert_eq!(hwc[5 * 3 + 1], -3.75);
    }

    #[test]
    fn half_outputs_round_the_f32_result_once() {
        // std 3: x / 3 needs more mantissa bits than f16 (11) or bf16 (8) have, so the
        // rounding is exercised, not skipped.
        let p = Normalize { h: 2, w: 3, mean: vec![0.5, 1.0, 2.0], std: vec![3.0, 3.0, 7.0], chw: true };
        let src: Vec<u8> = (0..=255u8).cycle().take(6 * 3 * 7).collect();
        let f = cpu::normalize_u8::<f32>(&src, &p).unwrap();
        let h = cpu::normalize_u8::<half::f16>(&src, &p).unwrap();
        let b = cpu::normalize_u8::<half::bf16>(&src, &p).unwrap();
        for i in 0..f.len() {
            assert_eq!(h[i], half::f16::from_f32(f[i]));
            assert_eq!(b[i], half::bf16::from_f32(f[i]));
        }
        assert!((0..f.len()).any(|i| h[i].to_f32() != f[i]));
        assert!((0..f.len()).any(|i| b[i].to_f32() != f[i]));
    }

    #[test]
    fn widening_keeps_every_u16_value() {
        let src: Vec<u16> = vec![0, 1, 255, 256, 32767, 32768, 65535];
        assert_eq!(cpu::widen_u16_i64(&src), vec![0, 1, 255, 256, 32767, 32768, 65535]);
    }

    #[test]
    fn bad_parameters_are_errors_naming_the_problem() {
        let mut p = params(true);
        p.std[1] = 0.0;
        let e = cpu::normalize_u8::<f32>(&[0; 18], &p).unwrap_err().to_string();
        assert!(e.contains("std[1]"), "{e}");
        let e = cpu::normalize_u8::<f32>(&[0; 17], &params(true)).unwrap_err().to_string();
        assert!(e.contains("whole number"), "{e}");
        let mut p = params(true);
        p.mean.pop();
        assert!(cpu::normalize_u8::<f32>(&[0; 18], &p).is_err());
    }

    /// The device kernels' arithmetic, run on the CPU from the tables the device stage
    /// uploads, gives exactly the decrypt workers' pixels (decode::Plan::run) for every
    /// geometry, channel count, layout and dtype: the tables and descriptors say what
    /// the workers compute, and the GPU test then holds the kernels to this function.
    #[test]
    fn the_resample_tables_reproduce_the_worker_resampler_bit_for_bit() {
        use crate::decode::{out_affine, ImageDecode, ImageLayout, Plan, SampleKey};
        use crate::format::DType;
        use crate::memory::{LockedBuf, MemoryPolicy};
        let mut rng = 0x1234_5678_u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 24) as u8
        };
        let sizes = [(97usize, 61usize, 3usize), (40, 75, 1), (64, 64, 4), (33, 200, 2)];
        let images: Vec<Vec<u8>> = sizes.iter().map(|&(w, h, c)| (0..w * h * c).map(|_| next()).collect()).collect();
        for train in [false, true] {
            for (dtype, layout, norm) in [
                (DType::U8, ImageLayout::Chw, false),
                (DType::F32, ImageLayout::Hwc, true),
                (DType::F16, ImageLayout::Chw, true),
                (DType::Bf16, ImageLayout::Hwc, false),
            ] {
                let mut spec = if train { ImageDecode::train(24) } else { ImageDecode::eval(24) };
                spec.size = (24, 20);
                spec.dtype = dtype;
                spec.layout = layout;
                spec.normalize = norm.then_some(ImageDecode::IMAGENET_MEAN_STD);
                let (oh, ow) = (spec.size.0 as usize, spec.size.1 as usize);
                let mut pixels = Vec::new();
                let mut t = ResampleTables::default();
                let mut want = Vec::new();
                for (i, (&(w, h, c), img)) in sizes.iter().zip(&images).enumerate() {
                    let key = SampleKey { seed: 7, epoch: 2, sample: i as u64 * 11 };
                    let plan = Plan::new(&spec, w, h, key);
                    let mut out = vec![0u8; spec.out_len()];
                    let mut rows = LockedBuf::new(plan.rows_bytes(), MemoryPolicy::AllowUnlocked).unwrap();
                    let image = crate::decode::resample_image(img, w, c);
                    plan.run(&image, &spec, &mut rows, &mut out);
                    want.extend_from_slice(&out);
                    let src = pixels.len().next_multiple_of(256);
                    pixels.resize(src, 0);
                    pixels.extend_from_slice(img);
                    t.push(&plan, src, w * c, c, ow);
                }
                let (scale, bias) = out_affine(&spec);
                let got = cpu::resample(&pixels, &t, oh, ow, layout == ImageLayout::Chw, dtype, scale, bias);
                assert!(got == want, "train={train} {dtype:?} {layout:?} normalize={norm}");
            }
        }
    }

    #[test]
    fn the_source_defines_every_kernel_the_host_launches() {
        for k in
            [<f32 as NormOut>::KERNEL, <half::f16 as NormOut>::KERNEL, <half::bf16 as NormOut>::KERNEL, "widen_u16_i64"]
        {
            assert!(SOURCE.contains(k), "{k} missing from loader-core/kernels/decode.cu");
        }
        for k in ["resample_h", "resample_v_u8", "resample_v_f32", "resample_v_f16", "resample_v_bf16"] {
            assert!(SOURCE.contains(&format!("void {k}(")) || SOURCE.contains(&format!("({k},")), "{k} missing");
        }
    }
}
