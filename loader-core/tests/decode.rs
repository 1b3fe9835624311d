//! Images decoded on the decrypt workers, from Rust (`LoaderBuilder::decode`): exact
//! pixels through an identity geometry, layouts, bad values raised or skipped.
#![allow(clippy::unwrap_used)]

mod common;

use common::{png, Fixture};
use shardlock::{DType, Error, Field, Geometry, ImageDecode, ImageLayout, OnDecodeError, Schema, Shuffle};

#[global_allocator]
static ALLOC: shardlock::ScratchAlloc = shardlock::ScratchAlloc;

const W: u32 = 32;
const H: u32 = 24;

fn pixels(i: usize) -> Vec<u8> {
    (0..(W * H * 3) as usize).map(|k| ((k * 7 + i * 31) % 256) as u8).collect()
}

/// `Resize(24)` of a 32x24 image is 32x24 and `CenterCrop(24, 32)` takes all of it:
/// every output pixel is its source pixel.
fn identity(layout: ImageLayout) -> ImageDecode {
    ImageDecode { size: (H, W), geometry: Geometry::Eval { resize: H }, layout, ..ImageDecode::eval(H) }
}

fn images(fx: &Fixture, values: Vec<Vec<u8>>) -> std::path::PathBuf {
    let schema = Schema::new(vec![Field::bytes("image"), Field::tensor("label", DType::I64, &[])]).unwrap();
    let samples: Vec<Vec<Vec<u8>>> =
        values.into_iter().enumerate().map(|(i, v)| vec![v, (i as i64).to_le_bytes().to_vec()]).collect();
    fx.pack("imgs", "imgs", schema, &samples, 1 << 16)
}

#[test]
fn png_pixels_come_through_an_identity_geometry_exactly_in_either_layout() {
    let fx = Fixture::new();
    let gray: Vec<u8> = (0..(W * H) as usize).map(|k| (k % 256) as u8).collect();
    let mut values: Vec<Vec<u8>> = (0..5).map(|i| png(W, H, 3, &pixels(i))).collect();
    values.push(png(W, H, 1, &gray));
    let dir = images(&fx, values);
    for layout in [ImageLayout::Hwc, ImageLayout::Chw] {
        let loader = fx
            .loader(&dir, "imgs")
            .batch_size(3)
            .shuffle(Shuffle::Window)
            .decode("image", identity(layout))
            .build()
            .unwrap();
        let mut seen = 0;
        for b in loader {
            let b = b.unwrap();
            let img = b.tensor::<u8>("image").unwrap();
            let want_shape = if layout == ImageLayout::Hwc { vec![3, 24, 32, 3] } else { vec![3, 3, 24, 32] };
            assert_eq!(img.shape, want_shape);
            let labels = b.tensor::<i64>("label").unwrap();
            for (j, &label) in labels.data.iter().enumerate() {
                let hwc: Vec<u8> =
                    if label == 5 { gray.iter().flat_map(|&g| [g, g, g]).collect() } else { pixels(label as usize) };
                let got = &img.data[j * hwc.len()..(j + 1) * hwc.len()];
                let want: Vec<u8> = match layout {
                    ImageLayout::Hwc => hwc,
                    ImageLayout::Chw => {
                        (0..3).flat_map(|c| hwc.iter().skip(c).step_by(3).copied().collect::<Vec<_>>()).collect()
                    }
                };
                assert_eq!(got, &want[..], "sample {label}, {layout:?}");
                seen += 1;
            }
        }
        assert_eq!(seen, 6);
    }
}

#[test]
fn a_value_that_is_not_an_image_fails_its_batch_or_is_skipped_and_counted() {
    let fx = Fixture::new();
    let mut values: Vec<Vec<u8>> = (0..6).map(|i| png(W, H, 3, &pixels(i))).collect();
    values[3] = b"not an image at all".to_vec();
    let dir = images(&fx, values);
    let build = |on: OnDecodeError| {
        fx.loader(&dir, "imgs")
            .batch_size(6)
            .shuffle(Shuffle::None)
            .decode("image", identity(ImageLayout::Chw))
            .on_decode_error(on)
            .build()
            .unwrap()
    };
    let mut raise = build(OnDecodeError::Raise);
    match raise.next().unwrap() {
        Err(Error::Decode { record, field, detail, .. }) => {
            assert_eq!((record, field.as_str()), (3, "image"));
            assert!(detail.contains("signature"), "{detail}");
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
    let mut skip = build(OnDecodeError::Skip);
    let b = skip.next().unwrap().unwrap();
    assert_eq!(b.tensor::<i64>("label").unwrap().data, &[0, 1, 2, 4, 5]);
    assert_eq!(b.sample_ids(), &[0, 1, 2, 4, 5]);
    assert_eq!(skip.decode_skips(), 1);
    // A decode setting that cannot work is refused when the loader is built.
    let bad = ImageDecode { dtype: DType::U8, normalize: Some(ImageDecode::IMAGENET_MEAN_STD), ..ImageDecode::eval(8) };
    let err = fx.loader(&dir, "imgs").decode("image", bad).build().err().unwrap();
    assert!(err.to_string().contains("normalize needs a float dtype"), "{err}");
    let err = fx.loader(&dir, "imgs").decode("label", ImageDecode::eval(8)).build().err().unwrap();
    assert!(err.to_string().contains("holds tensor values"), "{err}");
}

/// Every batch of `loader` as `(sample ids, image bytes)` through the host loader.
#[cfg(feature = "cuda")]
fn host_images(loader: shardlock::Loader) -> Vec<(Vec<u64>, Vec<u8>)> {
    loader.map(|b| b.unwrap()).map(|b| (b.sample_ids().to_vec(), b.field_bytes("image").unwrap().to_vec())).collect()
}

/// `decode_on = "device"`: what does not fit the loader is refused before any device
/// is touched (so here too); on a GPU machine a PNG dataset then gives the workers'
/// pixels bit for bit (PNGs decode on the host, the kernels resample them), for train
/// and eval transforms, u8 and normalized f16. Without a GPU the valid case is
/// `DeviceUnavailable`.
#[test]
#[cfg(feature = "cuda")]
fn decode_on_the_device_is_checked_first_and_matches_the_workers_bit_for_bit() {
    use shardlock::device::{DeviceLoader, DeviceOptions};
    let fx = Fixture::new();
    let dir = images(&fx, (0..7).map(|i| png(W, H, 3, &pixels(i))).collect());
    let opts =
        |field: &str, spec: ImageDecode| DeviceOptions { decode: vec![(field.into(), spec)], ..Default::default() };
    let base = || fx.loader(&dir, "imgs").batch_size(3).shuffle(Shuffle::Global).seed(5);
    {
        let refused = [
            (base().build().unwrap(), opts("label", ImageDecode::eval(16)), "tensor values"),
            (base().build().unwrap(), opts("nope", ImageDecode::eval(16)), "not among the loader's fields"),
            (
                base().decode("image", ImageDecode::eval(16)).build().unwrap(),
                opts("image", ImageDecode::eval(16)),
                "decoded on the decrypt workers already",
            ),
            (
                base().on_decode_error(OnDecodeError::Skip).build().unwrap(),
                opts("image", ImageDecode::eval(16)),
                "on_decode_error=\"skip\"",
            ),
            (base().build().unwrap(), opts("image", ImageDecode { size: (0, 4), ..ImageDecode::eval(16) }), "size 0x4"),
        ];
        for (loader, o, want) in refused {
            let e = DeviceLoader::new(loader, o).err().unwrap();
            assert!(matches!(e, Error::InvalidArgument(_)) && e.to_string().contains(want), "{want}: {e}");
        }
    }
    let mut half = ImageDecode::train(16);
    half.dtype = DType::F16;
    half.normalize = Some(ImageDecode::IMAGENET_MEAN_STD);
    for spec in [ImageDecode::eval(16), half] {
        let dev = match DeviceLoader::new(base().build().unwrap(), opts("image", spec.clone())) {
            Ok(d) => d,
            Err(e) => {
                assert!(matches!(e, Error::DeviceUnavailable { .. }), "{e}");
                eprintln!("decode on the device not run here: {e}");
                return;
            }
        };
        let want = host_images(base().decode("image", spec.clone()).build().unwrap());
        let stream = dev.context().default_stream();
        let mut got = Vec::new();
        for b in dev {
            let b = b.unwrap();
            let bytes = stream.clone_dtoh(&b.bytes("image").unwrap()).unwrap();
            got.push((b.sample_ids().to_vec(), bytes));
        }
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.0, w.0, "same samples in the same order");
            assert!(g.1 == w.1, "device pixels differ from the workers' for {spec:?}");
        }
    }
}
