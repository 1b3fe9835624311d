//! Crop, resize, flip, normalize: the geometry of torchvision's transforms on PIL
//! images, computed as PIL computes it.
//!
//! The filter is PIL's antialiased bilinear (`Image.BILINEAR`, a triangle whose support
//! widens with the downscale factor), with PIL's coefficient placement
//! (`precompute_coeffs` in `Resample.c`): horizontal pass first over the rows the
//! vertical pass needs, each pass rounded to 8 bits as PIL's are. Crop and flip are
//! fused into the coefficients, so only output pixels are computed.

use super::{Geometry, ImageDecode, ImageLayout, SampleKey};
use crate::format::DType;
use crate::memory::LockedBuf;
use crate::rng::Stream;

/// Decoded pixels: `channels` interleaved bytes per pixel, rows top to bottom.
pub(crate) struct Image<'a> {
    pub(super) data: &'a [u8],
    pub(super) width: usize,
    pub(super) channels: usize,
}

/// The filter taps of one axis: for output position `i`, source indices
/// `start[i]..start[i] + taps[i]` with weights `weights[i * stride..]`.
struct Axis {
    start: Vec<usize>,
    taps: Vec<usize>,
    weights: Vec<f32>,
    stride: usize,
}

impl Axis {
    /// Output positions `from..from + count` of resizing source `[lo, lo + len)` to
    /// `out_full` samples (PIL: the source is the crop, so taps stay inside it).
    fn new(lo: usize, len: usize, out_full: usize, from: usize, count: usize, reverse: bool) -> Self {
        let scale = len as f64 / out_full as f64;
        let filterscale = scale.max(1.0);
        let support = filterscale; // bilinear support 1.0
        let stride = (support.ceil() as usize) * 2 + 1;
        let mut a = Axis {
            start: Vec::with_capacity(count),
            taps: Vec::with_capacity(count),
            weights: vec![0.0; count * stride],
            stride,
        };
        for k in 0..count {
            let xx = if reverse { from + count - 1 - k } else { from + k };
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(len as i64).max(xmin as i64) as usize;
            let n = (xmax - xmin).min(stride);
            let mut total = 0.0f64;
            let mut w = [0.0f64; 64];
            let mut big = Vec::new();
            let ws: &mut [f64] = if n <= 64 {
                &mut w[..n]
            } else {
                big.resize(n, 0.0);
                &mut big[..]
            };
            for (x, slot) in ws.iter_mut().enumerate() {
                let t = ((x + xmin) as f64 - center + 0.5) * ss;
                let v = (1.0 - t.abs()).max(0.0);
                *slot = v;
                total += v;
            }
            for (x, v) in ws.iter().enumerate() {
                a.weights[k * stride + x] = if total != 0.0 { (v / total) as f32 } else { 0.0 };
            }
            a.start.push(lo + xmin);
            a.taps.push(n);
        }
        a
    }

    fn len(&self) -> usize {
        self.start.len()
    }

    fn w(&self, i: usize) -> &[f32] {
        &self.weights[i * self.stride..i * self.stride + self.taps[i]]
    }
}

/// Clamp to [0, 255] and round to an integer, as each of PIL's passes rounds to 8 bits.
/// Adding and subtracting 1.5 * 2^23 rounds with two vector-friendly additions (no
/// conversion); ties go to even where PIL's fixed point rounds them up, a difference
/// only at sums that land exactly on .5.
#[inline]
fn clip8(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v.clamp(0.0, 255.0) + MAGIC) - MAGIC
}

/// A source row of `C`-channel bytes as RGBX f32 (gray replicated, alpha dropped).
#[inline]
fn widen_row<const C: usize>(src: &[u8], line: &mut [f32]) {
    for (px, d) in src.chunks_exact(C).zip(line.chunks_exact_mut(4)) {
        let rgb = if C >= 3 { [px[0], px[1], px[2], 0] } else { [px[0], px[0], px[0], 0] };
        d.copy_from_slice(&rgb.map(f32::from));
    }
}

/// The geometry of one sample: its two axes and where its rows start.
pub(crate) struct Plan {
    x: Axis,
    y: Axis,
    /// First source row any output row reads, and how many rows the vertical pass reads.
    row0: usize,
    rows: usize,
    /// Source width (pixels), for the f32 copy of one source row.
    src_w: usize,
}

/// torchvision's `Resize(short)` output size: `(width, height)`.
fn resized(w: usize, h: usize, short: usize) -> (usize, usize) {
    if w <= h {
        (short, (short as f64 * h as f64 / w as f64) as usize)
    } else {
        ((short as f64 * w as f64 / h as f64) as usize, short)
    }
}

/// Python's `round`, halves to even (torchvision's CenterCrop uses it).
fn round_even(x: f64) -> usize {
    let r = x.round();
    let r = if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 { r - x.signum() } else { r };
    r.max(0.0) as usize
}

/// torchvision's `RandomResizedCrop.get_params`: `(top, left, height, width)`.
fn random_resized_crop(
    w: usize,
    h: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut Stream,
) -> (usize, usize, usize, usize) {
    let area = (w * h) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.uniform(scale.0, scale.1);
        let aspect = rng.uniform(lr0, lr1).exp();
        let cw = (target * aspect).sqrt().round() as usize;
        let ch = (target / aspect).sqrt().round() as usize;
        if cw > 0 && cw <= w && ch > 0 && ch <= h {
            let top = rng.upto((h - ch) as u64) as usize;
            let left = rng.upto((w - cw) as u64) as usize;
            return (top, left, ch, cw);
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (cw, ch) = if in_ratio < ratio.0 {
        (w, ((w as f64 / ratio.0).round() as usize).clamp(1, h))
    } else if in_ratio > ratio.1 {
        (((h as f64 * ratio.1).round() as usize).clamp(1, w), h)
    } else {
        (w, h)
    };
    ((h - ch) / 2, (w - cw) / 2, ch, cw)
}

/// Domain of the transform stream (so it is unrelated to the plan's and the mix's).
const DOMAIN: u64 = 0x696d_6167_6573;

impl Plan {
    pub(crate) fn new(spec: &ImageDecode, w: usize, h: usize, key: SampleKey) -> Self {
        let (oh, ow) = (spec.size.0 as usize, spec.size.1 as usize);
        let (x, y) = match spec.geometry {
            Geometry::Eval { resize } => {
                let (rw, rh) = resized(w, h, resize as usize);
                let (rw, rh) = (rw.max(ow), rh.max(oh));
                let top = round_even((rh - oh) as f64 / 2.0);
                let left = round_even((rw - ow) as f64 / 2.0);
                (Axis::new(0, w, rw, left, ow, false), Axis::new(0, h, rh, top, oh, false))
            }
            Geometry::Train { scale, ratio, flip } => {
                let mut rng = Stream::new(DOMAIN ^ key.seed, key.epoch, key.sample, 0);
                let (top, left, ch, cw) = random_resized_crop(w, h, scale, ratio, &mut rng);
                let flipped = rng.unit() < flip;
                (Axis::new(left, cw, ow, 0, ow, flipped), Axis::new(top, ch, oh, 0, oh, false))
            }
        };
        let row0 = y.start.iter().copied().min().unwrap_or(0);
        let row1 = y.start.iter().zip(&y.taps).map(|(s, t)| s + t).max().unwrap_or(row0);
        Self { x, y, row0, rows: row1 - row0, src_w: w }
    }

    /// First source row any output row reads, and how many rows the vertical pass reads.
    pub(crate) fn source_rows(&self) -> (usize, usize) {
        (self.row0, self.rows)
    }

    /// Appends this sample's taps for the device kernels (`resample_h` / `resample_v`
    /// in `kernels/decode.cu`, which compute exactly what [`Plan::run`] does): to `ints`
    /// the x starts, x tap counts, y starts and y tap counts (absolute source columns
    /// and rows); to `weights` the x then the y weights, `stride` slots per position.
    pub(crate) fn push_tables(&self, ints: &mut Vec<i32>, weights: &mut Vec<f32>) -> TableAt {
        let mut axis = |a: &Axis| {
            let at = (ints.len(), weights.len(), a.stride);
            ints.extend(a.start.iter().map(|&v| v as i32));
            ints.extend(a.taps.iter().map(|&v| v as i32));
            weights.extend_from_slice(&a.weights);
            at
        };
        let (xs, xw, xstride) = axis(&self.x);
        let (ys, yw, ystride) = axis(&self.y);
        TableAt { xs, xw, xstride, ys, yw, ystride }
    }

    /// Bytes of the horizontal pass's output (f32 rows of the output width), of the
    /// vertical pass's accumulator row and of one source row as f32 RGB.
    pub(crate) fn rows_bytes(&self) -> usize {
        ((self.rows + 1) * self.x.len() + self.src_w) * 4 * 4
    }

    /// Resamples `img` into `out` (the sample's bytes of the output tensor).
    pub(crate) fn run(&self, img: &Image<'_>, spec: &ImageDecode, rows: &mut LockedBuf, out: &mut [u8]) {
        let ow = self.x.len();
        let oh = self.y.len();
        // Gray (and gray + alpha) replicate into RGB; alpha is dropped, as PIL's convert("RGB").
        let c = img.channels;
        // Pixels are RGBX f32 in the passes (the fourth lane unused): one tap is one
        // 4-wide multiply-add, which the compiler vectorizes.
        let n = self.rows_bytes();
        let all: &mut [f32] = bytemuck::cast_slice_mut(&mut rows.prefix_mut(n)[..n]);
        let (tmp, rest) = all.split_at_mut(self.rows * ow * 4);
        let (acc_row, line) = rest.split_at_mut(ow * 4);
        for r in 0..self.rows {
            let src = &img.data[(self.row0 + r) * img.width * c..(self.row0 + r + 1) * img.width * c];
            match c {
                1 => widen_row::<1>(src, line),
                2 => widen_row::<2>(src, line),
                3 => widen_row::<3>(src, line),
                _ => widen_row::<4>(src, line),
            }
            let dst = &mut tmp[r * ow * 4..(r + 1) * ow * 4];
            for (i, out) in dst.chunks_exact_mut(4).enumerate() {
                let (s0, wts) = (self.x.start[i], self.x.w(i));
                let taps = &line[s0 * 4..(s0 + wts.len()) * 4];
                let mut acc = [0.0f32; 4];
                for (p, &wt) in taps.chunks_exact(4).zip(wts) {
                    for k in 0..4 {
                        acc[k] += p[k] * wt;
                    }
                }
                out.copy_from_slice(&acc.map(clip8));
            }
        }
        let (scale, bias) = out_affine(spec);
        let mut put = Writer::new(spec, out, oh, ow);
        for yo in 0..oh {
            let (s0, wts) = (self.y.start[yo] - self.row0, self.y.w(yo));
            // Whole rows at a time (vectorizes): acc = sum of weighted source rows.
            acc_row.fill(0.0);
            for (t, &wt) in wts.iter().enumerate() {
                let src = &tmp[(s0 + t) * ow * 4..(s0 + t + 1) * ow * 4];
                for (a, &v) in acc_row.iter_mut().zip(src) {
                    *a += v * wt;
                }
            }
            put.row(yo, acc_row, &scale, &bias);
        }
    }
}

/// `value * scale + bias` per channel turns an 8-bit level into the output value:
/// identity for u8, `/ 255` for floats, and `(x / 255 - mean) / std` when normalizing.
pub(crate) fn out_affine(spec: &ImageDecode) -> ([f32; 3], [f32; 3]) {
    if spec.dtype == DType::U8 {
        return ([1.0; 3], [0.0; 3]);
    }
    match &spec.normalize {
        None => ([1.0 / 255.0; 3], [0.0; 3]),
        Some((mean, std)) => {
            let s = [1.0 / (255.0 * std[0]), 1.0 / (255.0 * std[1]), 1.0 / (255.0 * std[2])];
            (s, [-mean[0] / std[0], -mean[1] / std[1], -mean[2] / std[2]])
        }
    }
}

/// Where [`Plan::push_tables`] put one sample's taps (indices into its two vectors).
#[derive(Clone, Copy, Debug)]
pub(crate) struct TableAt {
    pub(crate) xs: usize,
    pub(crate) xw: usize,
    pub(crate) xstride: usize,
    pub(crate) ys: usize,
    pub(crate) yw: usize,
    pub(crate) ystride: usize,
}

/// Writes output values at (channel, y, x) in the spec's layout and dtype.
struct Writer<'a> {
    out: &'a mut [u8],
    dtype: DType,
    chw: bool,
    oh: usize,
    ow: usize,
}

impl<'a> Writer<'a> {
    fn new(spec: &ImageDecode, out: &'a mut [u8], oh: usize, ow: usize) -> Self {
        Self { out, dtype: spec.dtype, chw: spec.layout == ImageLayout::Chw, oh, ow }
    }

    /// Output row `y` from interleaved RGBX sums: each rounded to 8 bits (PIL's second
    /// pass), then `* scale + bias` per channel, in the output dtype and layout.
    fn row(&mut self, y: usize, acc: &[f32], scale: &[f32; 3], bias: &[f32; 3]) {
        let (ow, oh) = (self.ow, self.oh);
        let es = self.dtype.size();
        for c in 0..3 {
            let (s, b) = (scale[c], bias[c]);
            // CHW: the row is contiguous in plane c; HWC: every third element of row y.
            let (start, step) = if self.chw { ((c * oh + y) * ow, 1) } else { (y * ow * 3 + c, 3) };
            let bytes = &mut self.out[start * es..(start + (ow - 1) * step + 1) * es];
            match self.dtype {
                DType::U8 => {
                    for x in 0..ow {
                        bytes[x * step] = clip8(acc[4 * x + c]) as u8;
                    }
                }
                DType::F32 => match bytemuck::try_cast_slice_mut::<u8, f32>(bytes) {
                    Ok(vals) => {
                        for x in 0..ow {
                            vals[x * step] = clip8(acc[4 * x + c]) * s + b;
                        }
                    }
                    Err(_) => {
                        for x in 0..ow {
                            let v = clip8(acc[4 * x + c]) * s + b;
                            bytes[4 * x * step..4 * x * step + 4].copy_from_slice(&v.to_le_bytes());
                        }
                    }
                },
                dtype => {
                    for x in 0..ow {
                        let v = clip8(acc[4 * x + c]) * s + b;
                        let h = if dtype == DType::F16 {
                            half::f16::from_f32(v).to_bits()
                        } else {
                            half::bf16::from_f32(v).to_bits()
                        };
                        bytes[2 * x * step..2 * x * step + 2].copy_from_slice(&h.to_le_bytes());
                    }
                }
            }
        }
    }
}

/// Applies EXIF orientation `o` (2..=8, as PIL's `ImageOps.exif_transpose`) from `src`
/// into `dst`; returns the new (width, height).
pub(super) fn orient(src: &[u8], w: usize, h: usize, c: usize, o: u8, dst: &mut [u8]) -> (usize, usize) {
    let swap = o >= 5;
    let (nw, nh) = if swap { (h, w) } else { (w, h) };
    for y in 0..nh {
        for x in 0..nw {
            let (sx, sy) = match o {
                2 => (w - 1 - x, y),
                3 => (w - 1 - x, h - 1 - y),
                4 => (x, h - 1 - y),
                5 => (y, x),
                6 => (y, h - 1 - x),
                7 => (w - 1 - y, h - 1 - x),
                8 => (w - 1 - y, x),
                _ => (x, y),
            };
            let s = (sy * w + sx) * c;
            let d = (y * nw + x) * c;
            dst[d..d + c].copy_from_slice(&src[s..s + c]);
        }
    }
    (nw, nh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_sizes_and_center_crop_offsets_match_torchvision() {
        // torchvision: Resize(256) of 500x375 -> 341x256; CenterCrop(224) left round(58.5) = 58.
        assert_eq!(resized(500, 375, 256), (341, 256));
        assert_eq!(resized(375, 500, 256), (256, 341));
        assert_eq!(round_even(58.5), 58);
        assert_eq!(round_even(59.5), 60);
        assert_eq!(round_even(16.0), 16);
    }

    #[test]
    fn downscale_taps_are_normalised_and_widen_with_the_factor() {
        let a = Axis::new(0, 400, 100, 0, 100, false);
        for i in 0..a.len() {
            let s: f32 = a.w(i).iter().sum();
            assert!((s - 1.0).abs() < 1e-5, "{s}");
            // Support 4 on each side at a 4x downscale (fewer at the clamped edges).
            if (1..99).contains(&i) {
                assert!(a.taps[i] >= 7 && a.taps[i] <= 9, "{}", a.taps[i]);
            }
        }
        // Same size: identity.
        let id = Axis::new(3, 10, 10, 0, 10, false);
        for i in 0..10 {
            assert_eq!(id.start[i], 3 + i);
            assert_eq!(id.w(i)[0], 1.0);
        }
        // Reversed: the same taps, mirrored.
        let r = Axis::new(0, 400, 100, 0, 100, true);
        assert_eq!(r.start[0], a.start[99]);
    }

    #[test]
    fn random_crops_stay_inside_and_follow_the_key() {
        for s in 0..500u64 {
            let mut rng = Stream::new(1, 2, s, 0);
            let (t, l, h, w) = random_resized_crop(500, 375, (0.08, 1.0), (0.75, 4.0 / 3.0), &mut rng);
            assert!(t + h <= 375 && l + w <= 500 && h > 0 && w > 0);
        }
        let a = random_resized_crop(500, 375, (0.08, 1.0), (0.75, 1.33), &mut Stream::new(1, 2, 3, 0));
        let b = random_resized_crop(500, 375, (0.08, 1.0), (0.75, 1.33), &mut Stream::new(1, 2, 3, 0));
        let c = random_resized_crop(500, 375, (0.08, 1.0), (0.75, 1.33), &mut Stream::new(1, 2, 4, 0));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn orientations_move_the_corner_pixel_where_pil_puts_it() {
        // 3x2 image, one channel, values 0..6 row-major.
        let src: Vec<u8> = (0..6).collect();
        let mut dst = vec![0u8; 6];
        assert_eq!(orient(&src, 3, 2, 1, 6, &mut dst), (2, 3));
        // Rotated 90 degrees clockwise: the bottom-left (3) is now top-left.
        assert_eq!(dst, vec![3, 0, 4, 1, 5, 2]);
        orient(&src, 3, 2, 1, 8, &mut dst);
        assert_eq!(dst, vec![2, 5, 1, 4, 0, 3]);
        orient(&src, 3, 2, 1, 3, &mut dst);
        assert_eq!(dst, vec![5, 4, 3, 2, 1, 0]);
    }
}
