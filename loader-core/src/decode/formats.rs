//! The three decoders (zune-jpeg, zune-png, image-webp; docs/DECODE.md says why these),
//! each run inside the worker's locked [`Arena`] with panics caught, and the EXIF
//! orientation tag.

use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};

use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;

use crate::memory::Arena;

/// An encoded image format, told by its signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Jpeg,
    Png,
    WebP,
}

impl Format {
    pub(crate) fn sniff(b: &[u8]) -> Option<Self> {
        if b.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(Self::Jpeg)
        } else if b.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(Self::Png)
        } else if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP" {
            Some(Self::WebP)
        } else {
            None
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Jpeg => "JPEG",
            Self::Png => "PNG",
            Self::WebP => "WebP",
        }
    }
}

/// A short message made inside the arena and carried out of it by value (so it owns no
/// arena memory). It names the format and the decoder's error kind, never image bytes.
#[derive(Clone, Copy)]
pub(crate) struct Fail {
    text: [u8; 112],
    len: u8,
}

impl Fail {
    fn new(args: std::fmt::Arguments<'_>) -> Self {
        let mut f = Fail { text: [0; 112], len: 0 };
        let _ = f.write_fmt(args);
        f
    }
}

impl std::fmt::Write for Fail {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        for ch in s.chars() {
            let mut b = [0u8; 4];
            let e = ch.encode_utf8(&mut b);
            let at = usize::from(self.len);
            if at + e.len() > self.text.len() {
                return Err(std::fmt::Error);
            }
            self.text[at..at + e.len()].copy_from_slice(e.as_bytes());
            self.len += e.len() as u8;
        }
        Ok(())
    }
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::str::from_utf8(&self.text[..usize::from(self.len)]).unwrap_or("?"))
    }
}

/// The decoder error's kind: its `Debug` name up to the first parenthesis (the
/// variant), so no value the decoder read from the image reaches a message.
fn kind(e: &dyn std::fmt::Debug) -> Fail {
    struct Upto(Fail, bool);
    impl std::fmt::Write for Upto {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            if self.1 {
                return Ok(());
            }
            let cut = s.find(['(', ' ', '{']).unwrap_or(s.len());
            self.0.write_str(&s[..cut])?;
            if cut < s.len() {
                self.1 = true;
            }
            Ok(())
        }
    }
    let mut u = Upto(Fail { text: [0; 112], len: 0 }, false);
    let _ = write!(u, "{e:?}");
    u.0
}

/// What the headers say, enough to size every buffer before the image is decoded.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Header {
    pub(crate) width: u32,
    pub(crate) height: u32,
    /// Channels of the decoded pixels: 1 (gray), 2 (gray + alpha), 3 (RGB), 4 (RGBA).
    pub(crate) channels: u8,
    /// EXIF orientation, 1 (as stored) to 8.
    pub(crate) orientation: u8,
    /// Colour components in a JPEG's frame header (1 gray, 3 YCbCr or RGB, 4 CMYK or
    /// YCCK); 0 for PNG and WebP.
    pub(crate) components: u8,
    /// Arena bytes the decoder will want (an estimate; more goes to overflow chunks).
    pub(crate) scratch: usize,
}

fn jpeg_options(out: ColorSpace, strict: bool) -> DecoderOptions {
    DecoderOptions::default()
        .set_max_width(1 << 16)
        .set_max_height(1 << 16)
        .set_strict_mode(strict)
        .jpeg_set_out_colorspace(out)
}

/// A truncated JPEG: the data ends before the image does. (zune-jpeg reports it only in
/// strict mode; lenient mode fills the rest with gray, which PIL refuses too.)
fn truncated(e: &zune_jpeg::errors::DecodeErrors) -> bool {
    use zune_jpeg::errors::DecodeErrors as E;
    matches!(e, E::ExhaustedData | E::FormatStatic("Premature end of buffer"))
}

fn png_options() -> DecoderOptions {
    DecoderOptions::default().set_max_width(1 << 24).set_max_height(1 << 24).png_set_strip_to_8bit(true)
}

/// Runs `f` in the arena with panics caught (a decoder panic is a decode error).
fn in_arena<R: Copy>(arena: &mut Arena, what: Format, f: impl FnOnce() -> Result<R, Fail>) -> Result<R, Fail> {
    let caught = || match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        // Dropped here, inside the run, and caught again should its drop panic.
        Err(payload) => {
            if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
                std::mem::forget(again);
            }
            Err(Fail::new(format_args!("the {} decoder stopped on malformed data", what.name())))
        }
    };
    #[allow(unsafe_code)]
    // SAFETY: every decoder, cursor and error is created and dropped inside `caught`;
    // what leaves it is `Result<R: Copy, Fail: Copy>`, which owns no heap memory, and
    // `catch_unwind` keeps a panic from unwinding through `run`.
    let r = unsafe { arena.run(caught) };
    r.unwrap_or_else(|| {
        Err(Fail::new(format_args!(
            "the {} decoder's scratch could not be locked in RAM (raise RLIMIT_MEMLOCK, or allow unlocked memory)",
            what.name()
        )))
    })
}

/// Whether a JPEG declares Adobe's colour transform 0 (its three components are RGB,
/// not YCbCr) in an APP14 segment before its first scan: such a JPEG is decoded on the
/// host, whose decoder honours the marker.
pub(crate) fn adobe_rgb(data: &[u8]) -> bool {
    let mut i = 2;
    while i + 4 <= data.len() && data[i] == 0xFF {
        let marker = data[i + 1];
        if marker == 0xDA || marker == 0xD9 {
            break;
        }
        if marker == 0xFF || (0xD0..=0xD7).contains(&marker) || marker == 0x01 {
            i += if marker == 0xFF { 1 } else { 2 };
            continue;
        }
        let len = usize::from(u16::from_be_bytes([data[i + 2], data[i + 3]]));
        let seg = &data[i + 4..(i + 2 + len).min(data.len()).max(i + 4)];
        if marker == 0xEE && seg.len() >= 12 && &seg[..5] == b"Adobe" {
            return seg[11] == 0;
        }
        i += 2 + len.max(2);
    }
    false
}

/// Reads the headers of `data`.
pub(crate) fn header(arena: &mut Arena, format: Format, data: &[u8]) -> Result<Header, Fail> {
    in_arena(arena, format, || match format {
        Format::Jpeg => {
            let mut d =
                zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(data), jpeg_options(ColorSpace::RGB, false));
            d.decode_headers().map_err(|e| jpeg_fail(&e))?;
            let (w, h) = d.dimensions().ok_or_else(|| Fail::new(format_args!("the JPEG has no frame header")))?;
            let info = d.info().ok_or_else(|| Fail::new(format_args!("the JPEG has no frame header")))?;
            let channels = if info.components >= 3 { 3 } else { 1 };
            let progressive = info.sof.is_progressive();
            let orientation = d.exif().map_or(1, |e| exif_orientation(e));
            // Baseline: a few MCU rows per component; progressive: every coefficient (i16).
            let rows = (w + 16) * 16 * 4 * 4;
            let coeffs = if progressive { (w + 16) * (h + 16) * 2 * usize::from(info.components.max(1)) } else { 0 };
            Ok(Header {
                width: w as u32,
                height: h as u32,
                channels,
                orientation,
                components: info.components,
                scratch: (256 << 10) + rows + coeffs + coeffs / 8,
            })
        }
        Format::Png => {
            let mut d = zune_png::PngDecoder::new_with_options(ZCursor::new(data), png_options());
            d.decode_headers().map_err(|e| png_fail(&e))?;
            let (w, h) = d.dimensions().ok_or_else(|| Fail::new(format_args!("the PNG has no IHDR chunk")))?;
            let channels = match d.colorspace() {
                Some(ColorSpace::Luma) => 1,
                Some(ColorSpace::LumaA) => 2,
                Some(ColorSpace::RGB) => 3,
                Some(ColorSpace::RGBA) => 4,
                _ => return Err(Fail::new(format_args!("the PNG has a colour type shardlock does not decode"))),
            };
            let deep = matches!(d.depth(), Some(zune_core::bit_depth::BitDepth::Sixteen));
            // zune-png inflates the whole image (filter bytes included) before it unfilters.
            let raw = h.saturating_mul(w.saturating_mul(4 * if deep { 2 } else { 1 }) + 1);
            Ok(Header {
                width: w as u32,
                height: h as u32,
                channels,
                orientation: 1,
                components: 0,
                scratch: (256 << 10) + 2 * raw,
            })
        }
        Format::WebP => {
            let d = image_webp::WebPDecoder::new(std::io::Cursor::new(data)).map_err(|e| webp_fail(&e))?;
            let (w, h) = d.dimensions();
            let channels = if d.has_alpha() { 4 } else { 3 };
            let (w, h) = (w as usize, h as usize);
            Ok(Header {
                width: w as u32,
                height: h as u32,
                channels,
                orientation: 1,
                components: 0,
                scratch: (256 << 10) + w.saturating_mul(h).saturating_mul(6),
            })
        }
    })
}

/// Decodes `data` into `out` (`width * height * channels` bytes of the header).
pub(crate) fn decode(
    arena: &mut Arena,
    format: Format,
    data: &[u8],
    head: &Header,
    out: &mut [u8],
) -> Result<(), Fail> {
    in_arena(arena, format, || match format {
        Format::Jpeg => {
            let cs = if head.channels == 3 { ColorSpace::RGB } else { ColorSpace::Luma };
            // Strict first, so truncation is an error; what strict mode alone refuses
            // (stray bytes between markers, which libjpeg also accepts) decodes leniently.
            for strict in [true, false] {
                let mut d = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(data), jpeg_options(cs, strict));
                d.decode_headers().map_err(|e| jpeg_fail(&e))?;
                check_size(format, d.output_buffer_size(), out.len())?;
                match d.decode_into(out) {
                    Ok(()) => return Ok(()),
                    Err(e) if !strict || truncated(&e) => return Err(jpeg_fail(&e)),
                    Err(_) => {}
                }
            }
            Err(Fail::new(format_args!("the JPEG is corrupt")))
        }
        Format::Png => {
            let mut d = zune_png::PngDecoder::new_with_options(ZCursor::new(data), png_options());
            d.decode_headers().map_err(|e| png_fail(&e))?;
            check_size(format, d.output_buffer_size(), out.len())?;
            d.decode_into(out).map_err(|e| png_fail(&e))
        }
        Format::WebP => {
            let mut d = image_webp::WebPDecoder::new(std::io::Cursor::new(data)).map_err(|e| webp_fail(&e))?;
            d.set_memory_limit(head.scratch);
            check_size(format, d.output_buffer_size(), out.len())?;
            d.read_image(out).map_err(|e| webp_fail(&e))
        }
    })
}

fn check_size(format: Format, want: Option<usize>, have: usize) -> Result<(), Fail> {
    match want {
        Some(n) if n == have => Ok(()),
        _ => {
            Err(Fail::new(format_args!("the {}'s headers changed between two reads of the same bytes", format.name())))
        }
    }
}

fn jpeg_fail(e: &zune_jpeg::errors::DecodeErrors) -> Fail {
    use zune_jpeg::errors::DecodeErrors as E;
    let what = match e {
        _ if truncated(e) => "the JPEG is truncated",
        E::Unsupported(_) => "the JPEG uses a coding scheme the decoder does not support",
        E::LargeDimensions(_) => "the JPEG declares dimensions over 65535",
        _ => "the JPEG is corrupt",
    };
    Fail::new(format_args!("{what} (zune-jpeg: {})", kind(e)))
}

fn png_fail(e: &zune_png::error::PngDecodeErrors) -> Fail {
    Fail::new(format_args!("the PNG is corrupt or truncated (zune-png: {})", kind(e)))
}

fn webp_fail(e: &image_webp::DecodingError) -> Fail {
    Fail::new(format_args!("the WebP is corrupt, truncated or unsupported (image-webp: {})", kind(e)))
}

/// The orientation tag (0x0112) of an EXIF block (with or without its `Exif\0\0`
/// prefix); 1 when absent or unreadable.
pub(crate) fn exif_orientation(exif: &[u8]) -> u8 {
    let t = exif.strip_prefix(b"Exif\0\0").unwrap_or(exif);
    let le = match t.get(..4) {
        Some(b"II*\0") => true,
        Some(b"MM\0*") => false,
        _ => return 1,
    };
    let u16_at = |i: usize| {
        t.get(i..i + 2).map(|b| if le { u16::from_le_bytes([b[0], b[1]]) } else { u16::from_be_bytes([b[0], b[1]]) })
    };
    let u32_at = |i: usize| {
        t.get(i..i + 4).map(|b| {
            let a = [b[0], b[1], b[2], b[3]];
            if le {
                u32::from_le_bytes(a)
            } else {
                u32::from_be_bytes(a)
            }
        })
    };
    let Some(ifd) = u32_at(4).map(|x| x as usize) else { return 1 };
    let Some(n) = u16_at(ifd) else { return 1 };
    for k in 0..usize::from(n) {
        let e = ifd + 2 + 12 * k;
        if u16_at(e) == Some(0x0112) {
            return match u16_at(e + 8) {
                Some(v @ 1..=8) => v as u8,
                _ => 1,
            };
        }
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orientation_is_read_in_both_byte_orders_and_defaults_to_one() {
        let mut le = b"Exif\0\0II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0\x06\0\0\0".to_vec();
        assert_eq!(exif_orientation(&le), 6);
        le[24] = 9; // out of range
        assert_eq!(exif_orientation(&le), 1);
        let be = b"MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x03\0\0".to_vec();
        assert_eq!(exif_orientation(&be), 3);
        assert_eq!(exif_orientation(b"II*\0\xff\xff\xff\xff"), 1);
        assert_eq!(exif_orientation(b""), 1);
    }

    #[test]
    fn an_adobe_marker_with_transform_zero_marks_an_rgb_jpeg() {
        let jfif = b"\xFF\xD8\xFF\xE0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00";
        let adobe = |t: u8| [&b"\xFF\xEE\x00\x0EAdobe\x00\x64\x00\x00\x00\x00"[..], &[t]].concat();
        let jpeg = |segs: &[&[u8]]| [&jfif[..], &segs.concat(), b"\xFF\xDA\x00\x02"].concat();
        assert!(adobe_rgb(&jpeg(&[&adobe(0)])));
        assert!(!adobe_rgb(&jpeg(&[&adobe(1)])), "transform 1 is YCbCr");
        assert!(!adobe_rgb(&jpeg(&[])));
        // A marker after the first scan does not count; bad lengths and truncation stop the walk.
        assert!(!adobe_rgb(&[&jpeg(&[])[..], &adobe(0)].concat()));
        for bad in
            [&b"\xFF\xD8\xFF\xEE\x00\x00"[..], b"\xFF\xD8\xFF\xEE\x00\x01Adob", b"\xFF\xD8", b"", b"\xFF\xD8\xFF"]
        {
            assert!(!adobe_rgb(bad));
        }
        let cut = adobe(0);
        assert!(!adobe_rgb(&[&jfif[..], &cut[..cut.len() - 3]].concat()));
    }

    #[test]
    fn signatures_pick_the_decoder() {
        assert_eq!(Format::sniff(b"\xFF\xD8\xFF\xE0"), Some(Format::Jpeg));
        assert_eq!(Format::sniff(b"\x89PNG\r\n\x1a\nxxxx"), Some(Format::Png));
        assert_eq!(Format::sniff(b"RIFF\0\0\0\0WEBPVP8 "), Some(Format::WebP));
        assert_eq!(Format::sniff(b"GIF89a"), None);
        assert_eq!(Format::sniff(b""), None);
    }
}
