//! The device API is the same in every build, with or without the `cuda` feature and
//! on a machine with or without a GPU: a caller picks the host loader or the device
//! stage at run time with no `cfg` of its own, and writes stream code once over
//! [`BatchStream`]. Without a usable device, the device half checks the typed
//! `DeviceUnavailable` path.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Fixture;
use shardlock::device::{measure_h2d, parse_device, DeviceLoader, DeviceOptions};
use shardlock::{BatchStream, Error, Loader};
use shardlock::{BenchSource, Next};

const SAMPLES: usize = 37;

fn loader(fx: &Fixture, dir: &std::path::Path) -> Loader {
    fx.loader(dir, "api").batch_size(8).seed(3).drop_last(false).build().unwrap()
}

fn assert_unavailable(e: &Error, device: &str) {
    assert!(matches!(e, Error::DeviceUnavailable { .. }), "{e}");
    assert!(e.to_string().contains(device), "{e}");
    if cfg!(not(feature = "cuda")) {
        assert!(e.to_string().contains("build with the `cuda` feature"), "{e}");
    }
    eprintln!("no device stage here: {e}");
}

/// One epoch of any stream, through `next_within`: (batches, sample ids in order).
fn one_epoch<S: BatchStream>(s: &mut S) -> (usize, Vec<u64>) {
    let epoch = s.epoch();
    let expected = s.len().unwrap();
    let (mut batches, mut ids) = (0, Vec::new());
    loop {
        match s.next_within(Duration::from_millis(100)) {
            Next::Pending => continue,
            Next::End => break,
            Next::Batch(b) => {
                let b = b.unwrap();
                s.wait_ready(&b).unwrap();
                ids.extend_from_slice(b.sample_ids());
                batches += 1;
            }
        }
    }
    assert_eq!(batches, expected, "len() is the epoch's batch count");
    assert_eq!(s.epoch(), epoch + 1, "the next iteration reads the next epoch");
    (batches, ids)
}

/// What `shardlock bench [--device D] [--pageable]` streams, chosen at run time.
fn bench_source(loader: Loader, device: Option<&str>, pageable: bool) -> shardlock::Result<Box<dyn BenchSource>> {
    let Some(spec) = device else { return Ok(Box::new(loader)) };
    let opts = DeviceOptions { ordinal: parse_device(spec)?, pinned: !pageable, ..Default::default() };
    Ok(Box::new(DeviceLoader::new(loader, opts)?))
}

#[test]
fn host_and_device_streams_share_one_interface() {
    let fx = Fixture::new();
    let (dir, _) = fx.standard("ds", "api", SAMPLES);
    let mut host = loader(&fx, &dir);
    let (_, host_ids) = one_epoch(&mut host);
    assert_eq!(host_ids.len(), SAMPLES);
    match DeviceLoader::new(loader(&fx, &dir), DeviceOptions::default()) {
        Ok(mut dev) => {
            let (_, dev_ids) = one_epoch(&mut dev);
            assert_eq!(dev_ids, host_ids, "same order as the host loader");
            let state = dev.state();
            dev.set_epoch(0);
            dev.load_state(&state).unwrap();
        }
        Err(e) => assert_unavailable(&e, "cuda:0"),
    }
}

#[test]
fn the_bench_runs_over_either_stream_chosen_at_run_time() {
    let fx = Fixture::new();
    let (dir, _) = fx.standard("ds", "api", SAMPLES);
    let mut source = bench_source(loader(&fx, &dir), None, false).unwrap();
    let r = shardlock::run_bench(&mut *source, 1, &mut |_, _| {}).unwrap();
    assert_eq!(r.epochs[0].samples, SAMPLES as u64);
    match bench_source(loader(&fx, &dir), Some("cuda:0"), false) {
        Ok(mut source) => {
            let r = shardlock::run_bench(&mut *source, 1, &mut |_, _| {}).unwrap();
            assert_eq!(r.epochs[0].samples, SAMPLES as u64);
            assert!(measure_h2d(0, 4096, 1, true).unwrap() > 0.0);
        }
        Err(e) => {
            assert_unavailable(&e, "cuda:0");
            assert_unavailable(&measure_h2d(0, 4096, 1, true).unwrap_err(), "cuda:0");
        }
    }
}
