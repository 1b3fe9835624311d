//! Decode speed of zune-jpeg and libjpeg-turbo (full size and DCT-scaled to 1/2 and
//! 1/4) on one generated photo-like JPEG, and the heap zune-jpeg allocates per image
//! (counted by a global allocator): `cargo run --release -- [WIDTH HEIGHT]`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

struct Count;
static BYTES: AtomicUsize = AtomicUsize::new(0);
static N: AtomicUsize = AtomicUsize::new(0);
// SAFETY: every call is forwarded unchanged to System; only counters are added.
unsafe impl GlobalAlloc for Count {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        BYTES.fetch_add(l.size(), Relaxed);
        N.fetch_add(1, Relaxed);
        // SAFETY: the caller's layout, forwarded.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: p came from System.alloc with l (every allocation goes there).
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        BYTES.fetch_add(n, Relaxed);
        N.fetch_add(1, Relaxed);
        // SAFETY: as dealloc; the new size is the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}
#[global_allocator]
static A: Count = Count;

fn synth(w: usize, h: usize) -> Vec<u8> {
    let mut px = vec![0u8; w * h * 3];
    let mut s = 0x1234_5678u32;
    for y in 0..h {
        for x in 0..w {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let n = (s & 15) as f32;
            let fx = x as f32 / w as f32;
            let fy = y as f32 / h as f32;
            let r = 128.0 + 100.0 * (fx * 9.0).sin() * (fy * 4.0).cos() + n;
            let g = 128.0 + 90.0 * (fy * 7.0 + fx * 3.0).sin() + n;
            let b = 128.0 + 80.0 * ((fx - 0.5) * (fy - 0.3) * 40.0).cos() + n;
            let i = (y * w + x) * 3;
            px[i] = r.clamp(0.0, 255.0) as u8;
            px[i + 1] = g.clamp(0.0, 255.0) as u8;
            px[i + 2] = b.clamp(0.0, 255.0) as u8;
        }
    }
    px
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (w, h) = (
        args.get(1).map(|s| s.parse().unwrap()).unwrap_or(500),
        args.get(2).map(|s| s.parse().unwrap()).unwrap_or(375),
    );
    let px = synth(w, h);
    let img =
        turbojpeg::Image { pixels: &px[..], width: w, pitch: w * 3, height: h, format: turbojpeg::PixelFormat::RGB };
    let jpg = turbojpeg::compress(img, 90, turbojpeg::Subsamp::Sub2x2).unwrap().to_vec();
    println!("jpeg {}x{} {} bytes", w, h, jpg.len());
    let iters = 300;
    let mut out = vec![0u8; w * h * 3];
    // zune
    for _ in 0..20 {
        let mut d = zune_jpeg::JpegDecoder::new(zune_core::bytestream::ZCursor::new(&jpg[..]));
        d.decode_into(&mut out).unwrap();
    }
    let b0 = BYTES.load(Relaxed);
    let n0 = N.load(Relaxed);
    let t = Instant::now();
    for _ in 0..iters {
        let mut d = zune_jpeg::JpegDecoder::new(zune_core::bytestream::ZCursor::new(&jpg[..]));
        d.decode_into(&mut out).unwrap();
    }
    let e = t.elapsed().as_secs_f64() / iters as f64;
    println!(
        "zune-jpeg: {:.3} ms/img, {:.0} img/s, heap {} B in {} allocs per image",
        e * 1e3,
        1.0 / e,
        (BYTES.load(Relaxed) - b0) / iters,
        (N.load(Relaxed) - n0) / iters
    );
    // turbo
    let mut dec = turbojpeg::Decompressor::new().unwrap();
    for scale in
        [turbojpeg::ScalingFactor::ONE, turbojpeg::ScalingFactor::ONE_HALF, turbojpeg::ScalingFactor::ONE_QUARTER]
    {
        dec.set_scaling_factor(scale).unwrap();
        let hd = dec.read_header(&jpg).unwrap().scaled(scale);
        let (sw, sh) = (hd.width, hd.height);
        let mut o = vec![0u8; sw * sh * 3];
        let t = Instant::now();
        for _ in 0..iters {
            dec.decompress(
                &jpg,
                turbojpeg::Image {
                    pixels: &mut o[..],
                    width: sw,
                    pitch: sw * 3,
                    height: sh,
                    format: turbojpeg::PixelFormat::RGB,
                },
            )
            .unwrap();
        }
        let e = t.elapsed().as_secs_f64() / iters as f64;
        println!("turbojpeg {}x{}: {:.3} ms/img, {:.0} img/s", sw, sh, e * 1e3, 1.0 / e);
    }
}
