//! The CUDA device stage and kernels (feature `cuda`).
//!
//! On a machine without an NVIDIA driver every test checks the typed
//! `DeviceUnavailable` path (never a panic) and prints `SKIPPED (no GPU)` with the
//! reason; on a GPU machine (`scripts/gpu-check`) they check bytes on the device
//! against the plaintext, the kernels against their CPU references, and leaks.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::path::PathBuf;

use common::Fixture;
use shardlock::device::kernels::{cpu, Kernels, Normalize};
use shardlock::device::{DeviceLoader, DeviceOptions};
use shardlock::{BatchStream, DType, Error, Field, LoaderBuilder, Schema, Shuffle};

const H: usize = 5;
const W: usize = 4;
const C: usize = 3;

/// `n` samples: `img` = u8[5,4,3] (HWC), `tok` = u16[6], `tag` = bytes.
fn dataset(fx: &Fixture, n: usize) -> PathBuf {
    let schema = Schema::new(vec![
        Field::tensor("img", DType::U8, &[H as u64, W as u64, C as u64]),
        Field::tensor("tok", DType::U16, &[6]),
        Field::bytes("tag"),
    ])
    .unwrap();
    let samples: Vec<Vec<Vec<u8>>> = (0..n)
        .map(|i| {
            let img: Vec<u8> = (0..H * W * C).map(|j| ((i * 31 + j * 7) % 256) as u8).collect();
            let tok: Vec<u8> =
                (0..6u16).flat_map(|j| ((i as u16).wrapping_mul(977).wrapping_add(j * 4099)).to_le_bytes()).collect();
            vec![img, tok, format!("sample-{i}-{}", "x".repeat(i % 9)).into_bytes()]
        })
        .collect();
    fx.pack("ds", "cuda", schema, &samples, 4096)
}

fn builder(fx: &Fixture, dir: &std::path::Path) -> LoaderBuilder {
    fx.loader(dir, "cuda").batch_size(8).shuffle(Shuffle::Window).seed(7).drop_last(false)
}

/// The device stage, or `None` after checking that its absence is the typed error.
fn device_loader(fx: &Fixture, dir: &std::path::Path, pinned: bool) -> Option<DeviceLoader> {
    let opts = DeviceOptions { pinned, ..Default::default() };
    match DeviceLoader::new(builder(fx, dir).build().unwrap(), opts) {
        Ok(d) => Some(d),
        Err(e @ Error::DeviceUnavailable { .. }) => {
            assert!(e.to_string().contains("cuda:0"), "{e}");
            eprintln!("SKIPPED (no GPU): {e}");
            None
        }
        Err(e) => panic!("expected a device stage or DeviceUnavailable, got {e}"),
    }
}

#[test]
fn without_a_driver_every_entry_point_is_a_typed_error() {
    #[allow(unsafe_code)]
    // SAFETY: only probes whether libcuda can be dlopen'ed.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    let e = shardlock::device::open(0).err();
    if driver {
        eprintln!("a driver is present: open(0) -> {e:?}");
    } else {
        let e = e.expect("no driver, yet the device opened");
        assert!(matches!(e, Error::DeviceUnavailable { .. }));
        assert!(e.to_string().contains("libcuda"), "{e}");
        assert!(shardlock::device::measure_h2d(0, 4096, 1, true).is_err());
    }
    // An ordinal past the last device is always DeviceUnavailable, driver or not.
    let e = shardlock::device::open(4096).unwrap_err();
    assert!(matches!(e, Error::DeviceUnavailable { .. }), "{e}");
    assert!(e.to_string().contains("cuda:4096"), "{e}");
}

#[test]
fn bytes_on_the_device_equal_the_plaintext_pinned_and_pageable() {
    let fx = Fixture::new();
    let dir = dataset(&fx, 203);
    for pinned in [true, false] {
        let Some(dev) = device_loader(&fx, &dir, pinned) else { return };
        let stream = dev.context().default_stream();
        let host = builder(&fx, &dir).build().unwrap();
        let mut seen = HashSet::new();
        for (h, d) in host.zip(dev) {
            let (h, d) = (h.unwrap(), d.unwrap());
            assert_eq!(h.sample_ids(), d.sample_ids(), "same order as the host loader");
            assert_eq!(d.device(), "cuda:0");
            for f in ["img", "tok", "tag"] {
                let got = stream.clone_dtoh(&d.bytes(f).unwrap()).unwrap();
                assert_eq!(got, h.field_bytes(f).unwrap(), "field {f} (pinned={pinned})");
            }
            let offs = stream.clone_dtoh(&d.offsets("tag").unwrap()).unwrap();
            for j in 0..h.len() {
                let a = u64::from_le_bytes(offs[8 * j..8 * j + 8].try_into().unwrap()) as usize;
                let b = u64::from_le_bytes(offs[8 * j + 8..8 * j + 16].try_into().unwrap()) as usize;
                assert_eq!(&h.field_bytes("tag").unwrap()[a..b], h.bytes("tag", j).unwrap());
            }
            let tok = d.tensor::<u16>("tok").unwrap();
            assert_eq!(tok.shape, vec![h.len(), 6]);
            assert!(d.tensor::<f32>("tok").is_err(), "dtype is checked");
            seen.extend(d.sample_ids().iter().copied());
        }
        assert_eq!(seen.len(), 203, "one whole epoch (pinned={pinned})");
    }
}

#[test]
fn kernels_equal_their_cpu_references_bit_for_bit() {
    let fx = Fixture::new();
    let dir = dataset(&fx, 64);
    let Some(dev) = device_loader(&fx, &dir, true) else { return };
    let k = Kernels::for_device(dev.context()).unwrap();
    let stream = dev.context().default_stream();
    let host: Vec<_> = builder(&fx, &dir).build().unwrap().map(|b| b.unwrap()).collect();
    let mut checked = 0;
    for (h, d) in host.iter().zip(dev) {
        let d = d.unwrap();
        let img = h.field_bytes("img").unwrap();
        for chw in [true, false] {
            let p = Normalize { h: H, w: W, mean: vec![123.7, 116.3, 103.5], std: vec![58.4, 57.1, 57.4], chw };
            let f = k.normalize_u8::<f32>(&stream, &d.bytes("img").unwrap(), &p).unwrap();
            let f: Vec<f32> = stream.clone_dtoh(&f).unwrap();
            let want = cpu::normalize_u8::<f32>(img, &p).unwrap();
            assert!(f.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "f32 chw={chw}");
            let g = k.normalize_u8::<half::f16>(&stream, &d.bytes("img").unwrap(), &p).unwrap();
            assert_eq!(stream.clone_dtoh(&g).unwrap(), cpu::normalize_u8::<half::f16>(img, &p).unwrap(), "f16");
            let g = k.normalize_u8::<half::bf16>(&stream, &d.bytes("img").unwrap(), &p).unwrap();
            assert_eq!(stream.clone_dtoh(&g).unwrap(), cpu::normalize_u8::<half::bf16>(img, &p).unwrap(), "bf16");
        }
        let tok = d.tensor::<u16>("tok").unwrap();
        let wide = k.widen_u16_i64(&stream, &tok.data).unwrap();
        let host_tok = h.tensor::<u16>("tok").unwrap();
        assert_eq!(stream.clone_dtoh(&wide).unwrap(), cpu::widen_u16_i64(host_tok.data));
        checked += 1;
    }
    assert_eq!(checked, 8);
    // Bad parameters are errors, not launches.
    let bad = Normalize { h: H, w: W, mean: vec![0.0; 2], std: vec![1.0; 3], chw: true };
    let buf = stream.alloc_zeros::<u8>(H * W * C).unwrap();
    assert!(k.normalize_u8::<f32>(&stream, &buf.slice(..), &bad).is_err());
}

#[test]
fn a_thousand_batches_leak_no_buffers_and_no_device_memory() {
    let fx = Fixture::new();
    let dir = dataset(&fx, 200);
    let Some(mut dev) = device_loader(&fx, &dir, true) else { return };
    let ctx = dev.context().clone();
    let mut batches = 0;
    let mut after_first_epoch = None;
    while batches < 1000 {
        for b in dev.by_ref() {
            let b = b.unwrap();
            b.ready_event().synchronize().unwrap();
            batches += 1;
        }
        if after_first_epoch.is_none() {
            ctx.synchronize().unwrap();
            after_first_epoch = Some((ctx.mem_get_info().unwrap().0, dev.device_buffers_allocated()));
        }
    }
    ctx.synchronize().unwrap();
    let (free0, bufs0) = after_first_epoch.unwrap();
    let free1 = ctx.mem_get_info().unwrap().0;
    eprintln!(
        "{batches} batches: device buffers {bufs0} -> {}, registered host buffers {}, free device memory {} -> {} MiB",
        dev.device_buffers_allocated(),
        dev.host_buffers_registered(),
        free0 >> 20,
        free1 >> 20
    );
    assert_eq!(dev.device_buffers_allocated(), bufs0, "device buffers are reused, not reallocated");
    assert!(bufs0 <= 8, "{bufs0} device buffers for depth 3");
    assert!(dev.host_buffers_registered() <= dev.loader().buffers_allocated());
    assert!(free1 + (64 << 20) >= free0, "device memory fell by {} MiB", (free0 - free1) >> 20);
}

#[test]
fn resume_after_a_break_counts_read_ahead_batches_as_unread() {
    let fx = Fixture::new();
    let dir = dataset(&fx, 203);
    let Some(mut dev) = device_loader(&fx, &dir, true) else { return };
    let mut first: Vec<u64> = Vec::new();
    for b in dev.by_ref().take(5) {
        first.extend_from_slice(b.unwrap().sample_ids());
    }
    let state = dev.state();
    drop(dev);
    let Some(mut again) = device_loader(&fx, &dir, true) else { return };
    again.load_state(&state).unwrap();
    let rest: Vec<u64> = again.by_ref().flat_map(|b| b.unwrap().sample_ids().to_vec()).collect();
    let all: HashSet<u64> = first.iter().chain(&rest).copied().collect();
    assert_eq!(first.len() + rest.len(), 203, "no duplicates");
    assert_eq!(all.len(), 203, "no gaps");
}
