//! Image decode and the standard transforms, on the decrypt workers (docs/DECODE.md).
//!
//! A bytes field holding JPEG, PNG or WebP is decoded right after its chunks are
//! authenticated, into the worker's locked scratch, and resampled into the batch as a
//! fixed-shape tensor: `Resize(shorter side)` + `CenterCrop` (eval) or
//! `RandomResizedCrop` + horizontal flip (train), with PIL's antialiased bilinear
//! filter, then `Normalize` and the output layout and dtype. The decoders' own
//! buffers come from [`crate::memory::Arena`] (locked, wiped after every image).
//!
//! Randomness is a pure function of (seed, epoch, global sample id), so a resumed run
//! or another worker count gives the same pixels.

#[cfg(feature = "image")]
mod formats;
#[cfg_attr(not(feature = "image"), allow(dead_code))]
mod resample;

#[cfg_attr(not(feature = "cuda"), allow(unused_imports))]
pub(crate) use resample::{out_affine, Plan};

/// Decoded pixels as the resampler reads them (`channels` bytes a pixel, `width` a row).
#[cfg(test)]
pub(crate) fn resample_image(data: &[u8], width: usize, channels: usize) -> resample::Image<'_> {
    resample::Image { data, width, channels }
}

use crate::error::{Error, Result};
use crate::format::DType;
use crate::memory::{Arena, LockedBuf, MemoryPolicy};

/// Output memory layout of a decoded image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageLayout {
    /// `[3, height, width]`, what torchvision's tensors use (the default).
    #[default]
    Chw,
    /// `[height, width, 3]`, what PIL and NumPy images use.
    Hwc,
}

/// The geometric transform of a decoded image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Geometry {
    /// torchvision's ImageNet evaluation: `Resize(resize)` on the shorter side, then
    /// `CenterCrop(size)`.
    Eval {
        /// Target of the shorter side before the crop (256 for a 224 crop).
        resize: u32,
    },
    /// torchvision's `RandomResizedCrop(size, scale, ratio)`, then a horizontal flip with
    /// probability `flip`.
    Train {
        /// Range of the crop's area, as a fraction of the image's.
        scale: (f64, f64),
        /// Range of the crop's aspect ratio (width / height).
        ratio: (f64, f64),
        /// Probability of a horizontal flip.
        flip: f64,
    },
}

/// How a bytes field of encoded images becomes a tensor field: the loader option
/// `decode` (Rust [`crate::LoaderBuilder::decode`], Python `shardlock.Image`).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageDecode {
    /// Output `(height, width)`.
    pub size: (u32, u32),
    /// Eval or train geometry.
    pub geometry: Geometry,
    /// `Normalize(mean, std)` on values scaled to [0, 1] (float dtypes only).
    pub normalize: Option<([f32; 3], [f32; 3])>,
    /// CHW (default) or HWC.
    pub layout: ImageLayout,
    /// `U8` (default), `F16`, `Bf16` or `F32`. Float outputs are scaled to [0, 1] before
    /// `normalize`, as `ToDtype(float32, scale=True)` does.
    pub dtype: DType,
    /// Largest image accepted, in pixels (width x height); a larger declared size is a
    /// decode error, before anything is allocated for it. Default 64 Mi pixels.
    pub max_pixels: u64,
}

/// What the loader does with a sample whose image does not decode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnDecodeError {
    /// The batch fails with [`Error::Decode`] (the default).
    #[default]
    Raise,
    /// The sample is left out of its batch; each skip is audited (`decode_skipped`)
    /// and counted ([`crate::Loader::decode_skips`]).
    Skip,
}

impl ImageDecode {
    /// Eval transforms for a square `size` crop: `Resize(size * 8 / 7)` (256 for 224),
    /// `CenterCrop(size)`, u8 CHW, no normalization.
    pub fn eval(size: u32) -> Self {
        Self {
            size: (size, size),
            geometry: Geometry::Eval { resize: (u64::from(size) * 8 / 7) as u32 },
            normalize: None,
            layout: ImageLayout::Chw,
            dtype: DType::U8,
            max_pixels: 64 << 20,
        }
    }

    /// Train transforms for a square `size`: `RandomResizedCrop(size, scale=(0.08, 1),
    /// ratio=(3/4, 4/3))` and a horizontal flip with probability 0.5, u8 CHW.
    pub fn train(size: u32) -> Self {
        Self {
            geometry: Geometry::Train { scale: (0.08, 1.0), ratio: (3.0 / 4.0, 4.0 / 3.0), flip: 0.5 },
            ..Self::eval(size)
        }
    }

    /// The ImageNet mean and std (torchvision's reference recipes).
    pub const IMAGENET_MEAN_STD: ([f32; 3], [f32; 3]) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);

    /// Checks the settings; the error names the one that is wrong.
    pub fn validate(&self, field: &str) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidArgument(format!("decode of field {field:?}: {what}")));
        let (h, w) = self.size;
        if h == 0 || w == 0 || h > 1 << 14 || w > 1 << 14 {
            return bad(format!("size {h}x{w} must be 1..=16384 on each side"));
        }
        if !matches!(self.dtype, DType::U8 | DType::F16 | DType::Bf16 | DType::F32) {
            return bad(format!("dtype {} is not one of uint8, float16, bfloat16, float32", self.dtype.name()));
        }
        if let Some((_, std)) = &self.normalize {
            if self.dtype == DType::U8 {
                return bad("normalize needs a float dtype (float32, float16 or bfloat16), not uint8".into());
            }
            if std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
                return bad(format!("normalize std {std:?} must be positive"));
            }
        }
        match self.geometry {
            Geometry::Eval { resize } => {
                if resize < h.min(w) {
                    return bad(format!("resize {resize} is smaller than the crop {h}x{w}"));
                }
            }
            Geometry::Train { scale, ratio, flip } => {
                if !(scale.0 > 0.0 && scale.0 <= scale.1 && scale.1 <= 1.0) {
                    return bad(format!("scale {scale:?} must satisfy 0 < min <= max <= 1"));
                }
                if !(ratio.0 > 0.0 && ratio.0 <= ratio.1 && ratio.1.is_finite()) {
                    return bad(format!("ratio {ratio:?} must satisfy 0 < min <= max"));
                }
                if !(0.0..=1.0).contains(&flip) {
                    return bad(format!("flip probability {flip} must be in [0, 1]"));
                }
            }
        }
        if self.max_pixels == 0 {
            return bad("max_pixels must be at least 1".into());
        }
        Ok(())
    }

    /// The output tensor's shape.
    pub fn shape(&self) -> Vec<u64> {
        let (h, w) = (u64::from(self.size.0), u64::from(self.size.1));
        match self.layout {
            ImageLayout::Chw => vec![3, h, w],
            ImageLayout::Hwc => vec![h, w, 3],
        }
    }

    /// Bytes of one output image.
    pub fn out_len(&self) -> usize {
        3 * self.size.0 as usize * self.size.1 as usize * self.dtype.size()
    }
}

/// Where an image's randomness comes from: a pure function of these.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SampleKey {
    pub(crate) seed: u64,
    pub(crate) epoch: u64,
    pub(crate) sample: u64,
}

/// A decode worker's state: the locked arena for the decoders' own buffers, the
/// decoded pixels and the resampler's rows, all locked and wiped when replaced.
#[cfg_attr(not(feature = "image"), allow(dead_code))]
pub(crate) struct ImageWorker {
    arena: Option<Arena>,
    pixels: Option<LockedBuf>,
    turned: Option<LockedBuf>,
    rows: Option<LockedBuf>,
    policy: MemoryPolicy,
}

/// Smallest arena (the headers are read in it; an image that needs more gets a larger one).
#[cfg_attr(not(feature = "image"), allow(dead_code))]
const MIN_ARENA: usize = 1 << 20;

impl ImageWorker {
    pub(crate) fn new(policy: MemoryPolicy) -> Self {
        Self { arena: None, pixels: None, turned: None, rows: None, policy }
    }

    /// Without the `image` feature no decoder is built in (the loader refuses `decode`
    /// before this is reached).
    #[cfg(not(feature = "image"))]
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn probe(&mut self, _encoded: &[u8], _spec: &ImageDecode) -> std::result::Result<Probe, DecodeFail> {
        Err(DecodeFail::Msg("this build of shardlock has no image decoders (feature `image`)".into()))
    }

    /// Reads the headers of `encoded` and checks them against `spec` (an empty image, or
    /// more pixels than `max_pixels`, is refused before anything is allocated for it).
    /// The error is a sentence that names no pixel or byte of the image.
    #[cfg(feature = "image")]
    pub(crate) fn probe(&mut self, encoded: &[u8], spec: &ImageDecode) -> std::result::Result<Probe, DecodeFail> {
        use formats::Format;
        let format = Format::sniff(encoded).ok_or(DecodeFail::Msg(
            "no JPEG, PNG or WebP signature at the start of the value (wrong field, or not an image)".into(),
        ))?;
        let arena = match &mut self.arena {
            Some(a) => a,
            slot => slot.insert(Arena::new(MIN_ARENA, self.policy).map_err(DecodeFail::Memory)?),
        };
        let head = formats::header(arena, format, encoded)?;
        let pixels = u64::from(head.width) * u64::from(head.height);
        // The messages name the limit, not the declared size: that is the image's content.
        if head.width == 0 || head.height == 0 {
            return Err(DecodeFail::Msg(format!("the {} declares an empty image", format.name())));
        }
        if pixels > spec.max_pixels {
            return Err(DecodeFail::Msg(format!(
                "the {} declares more pixels than max_pixels ({}): a decompression bomb, or raise max_pixels",
                format.name(),
                spec.max_pixels
            )));
        }
        Ok(Probe {
            width: head.width as usize,
            height: head.height as usize,
            channels: usize::from(head.channels),
            orientation: head.orientation,
            plain_jpeg: format == Format::Jpeg && head.components == 3 && !formats::adobe_rgb(encoded),
            head,
            format,
        })
    }

    /// Decodes `encoded` to pixels in this worker's locked scratch, EXIF orientation
    /// applied: what [`ImageWorker::decoded`] then returns.
    #[cfg(feature = "image")]
    pub(crate) fn pixels(&mut self, encoded: &[u8], spec: &ImageDecode) -> std::result::Result<Decoded, DecodeFail> {
        let p = self.probe(encoded, spec)?;
        let outgrown = self.arena.as_ref().is_none_or(|a| p.head.scratch > a.capacity());
        let arena = match &mut self.arena {
            Some(a) if !outgrown => a,
            // The old arena is wiped and unmapped before the larger one is locked.
            slot => {
                *slot = None;
                slot.insert(Arena::new(p.head.scratch, self.policy).map_err(DecodeFail::Memory)?)
            }
        };
        let len = p.width * p.height * p.channels;
        let pix = LockedBuf::ensure(&mut self.pixels, len, self.policy).map_err(DecodeFail::Memory)?;
        formats::decode(arena, p.format, encoded, &p.head, &mut pix.prefix_mut(len)[..])?;
        let (mut width, mut height) = (p.width, p.height);
        let turned = p.orientation > 1;
        if turned {
            let t = LockedBuf::ensure(&mut self.turned, len, self.policy).map_err(DecodeFail::Memory)?;
            let dst = &mut t.prefix_mut(len)[..];
            (width, height) = resample::orient(&pix.as_slice()[..len], width, height, p.channels, p.orientation, dst);
        }
        Ok(Decoded { width, height, channels: p.channels, turned })
    }

    /// Without the `image` feature there are no decoders (the checks refuse first).
    #[cfg(not(feature = "image"))]
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn pixels(&mut self, _encoded: &[u8], _spec: &ImageDecode) -> std::result::Result<Decoded, DecodeFail> {
        Err(DecodeFail::Msg("this build of shardlock has no image decoders (feature `image`)".into()))
    }

    /// Without the `image` feature nothing is ever decoded.
    #[cfg(not(feature = "image"))]
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn decoded(&self, _d: &Decoded) -> &[u8] {
        &[]
    }

    /// The pixels of the last [`ImageWorker::pixels`] call.
    #[cfg(feature = "image")]
    pub(crate) fn decoded(&self, d: &Decoded) -> &[u8] {
        let buf = if d.turned { &self.turned } else { &self.pixels };
        buf.as_ref().map_or(&[], |b| &b.as_slice()[..d.len()])
    }

    /// Without the `image` feature no decoder is built in (the loader refuses `decode`
    /// before this is reached).
    #[cfg(not(feature = "image"))]
    pub(crate) fn decode(
        &mut self,
        _encoded: &[u8],
        _spec: &ImageDecode,
        _key: SampleKey,
        _out: &mut [u8],
    ) -> std::result::Result<(), DecodeFail> {
        Err(DecodeFail::Msg("this build of shardlock has no image decoders (feature `image`)".into()))
    }

    /// Decodes `encoded` per `spec` into `out` (`spec.out_len()` bytes). The error is a
    /// sentence that names no pixel or byte of the image.
    #[cfg(feature = "image")]
    pub(crate) fn decode(
        &mut self,
        encoded: &[u8],
        spec: &ImageDecode,
        key: SampleKey,
        out: &mut [u8],
    ) -> std::result::Result<(), DecodeFail> {
        let d = self.pixels(encoded, spec)?;
        let plan = resample::Plan::new(spec, d.width, d.height, key);
        let mut rows = self.rows.take();
        let r = match LockedBuf::ensure(&mut rows, plan.rows_bytes(), self.policy) {
            Ok(buf) => {
                let image = resample::Image { data: self.decoded(&d), width: d.width, channels: d.channels };
                plan.run(&image, spec, buf, out);
                Ok(())
            }
            Err(e) => Err(DecodeFail::Memory(e)),
        };
        self.rows = rows;
        r
    }
}

/// What an image's headers say, checked against its [`ImageDecode`].
#[cfg_attr(any(not(feature = "image"), not(feature = "cuda")), allow(dead_code))]
pub(crate) struct Probe {
    /// Width and height as stored (before EXIF orientation).
    pub(crate) width: usize,
    pub(crate) height: usize,
    /// Bytes per decoded pixel: 1 (gray), 2 (gray + alpha), 3 (RGB), 4 (RGBA).
    pub(crate) channels: usize,
    /// EXIF orientation, 1 (as stored) to 8.
    pub(crate) orientation: u8,
    /// A three-component YCbCr JPEG (no Adobe RGB marker): what nvJPEG decodes to RGB
    /// on the device.
    pub(crate) plain_jpeg: bool,
    #[cfg(feature = "image")]
    head: formats::Header,
    #[cfg(feature = "image")]
    format: formats::Format,
}

/// Decoded pixels in an [`ImageWorker`]'s scratch: `channels` interleaved bytes per
/// pixel, rows top to bottom, EXIF orientation applied.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "image"), allow(dead_code))]
pub(crate) struct Decoded {
    pub(crate) width: usize,
    pub(crate) height: usize,
    pub(crate) channels: usize,
    turned: bool,
}

impl Decoded {
    /// Bytes of the pixels.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn len(&self) -> usize {
        self.width * self.height * self.channels
    }
}

/// Why one image did not decode: a sentence about the image, or the locked memory for
/// it could not be had (which is not the image's fault and is never skipped).
#[derive(Debug)]
#[cfg_attr(not(feature = "image"), allow(dead_code))]
pub(crate) enum DecodeFail {
    Msg(String),
    Memory(Error),
}

#[cfg(feature = "image")]
impl From<formats::Fail> for DecodeFail {
    fn from(f: formats::Fail) -> Self {
        DecodeFail::Msg(f.to_string())
    }
}

/// Whether `spec` can decode `field` of this dataset in this process.
pub(crate) fn check_supported(field: &crate::format::Field, spec: &ImageDecode, policy: MemoryPolicy) -> Result<()> {
    spec.validate(&field.name)?;
    if !cfg!(feature = "image") {
        return Err(Error::InvalidArgument(format!(
            "decode names field {:?}, and this build of shardlock has no image decoders: turn on the `image` feature",
            field.name
        )));
    }
    if !matches!(field.kind, crate::format::FieldKind::Bytes) {
        return Err(Error::InvalidArgument(format!(
            "decode names field {:?}, which holds {} values; images are decoded from a bytes field",
            field.name,
            match field.kind {
                crate::format::FieldKind::Tensor { .. } => "tensor",
                _ => "list",
            }
        )));
    }
    if field.compress.is_some() {
        return Err(Error::InvalidArgument(format!(
            "decode names field {:?}, which is stored zstd-compressed: encoded images do not compress; \
             pack the field without --compress",
            field.name
        )));
    }
    if !crate::memory::scratch_alloc_installed() && policy == MemoryPolicy::RequireLocked {
        return Err(Error::InvalidArgument(format!(
            "decoding field {:?} needs shardlock's allocator, so that the image decoders' own buffers are locked \
             and wiped: add `#[global_allocator] static ALLOC: shardlock::ScratchAlloc = shardlock::ScratchAlloc;` \
             to the binary (docs/DECODE.md), or allow unlocked memory",
            field.name
        )));
    }
    Ok(())
}
