//! `decode_on = "device"`: image fields decoded on the GPU (feature `cuda`).
//!
//! The decrypt workers deliver the encoded images (a bytes field) in the locked host
//! batch; the device stage then, per batch, on its copy stream:
//! 1. reads each image's headers on the host (the workers' decoder, in its locked arena):
//!    size, `max_pixels`, EXIF orientation;
//! 2. decodes three-component JPEGs with nvJPEG straight from the locked host batch into
//!    device scratch; other images (PNG, WebP, gray, CMYK, EXIF-rotated, or what nvJPEG
//!    does not support) are decoded on this thread by the workers' decoder into locked,
//!    registered staging and copied up;
//! 3. runs `resample_h` + `resample_v_*` (crop, resize, flip, normalize, layout, dtype),
//!    whose taps are the workers' own (`decode::Plan`), into the batch's device buffer.
//!
//! So the augmentation of each sample is the same pure function of (seed, epoch,
//! sample) as on the workers; a PNG gives the workers' pixels bit for bit, a JPEG
//! differs only by the decoders' IDCT and chroma upsampling.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr};

use super::buffers::HostRegistrations;
use super::kernels::{Kernels, ResampleLaunch, ResampleTables, SampleDesc};
use super::nvjpeg::{self, Outcome};
use super::probe::device_error;
use crate::decode::{out_affine, DecodeFail, ImageDecode, ImageLayout, ImageWorker, OnDecodeError, Plan, SampleKey};
use crate::error::{Error, Result};
use crate::format::FieldKind;
use crate::memory::{LockedBuf, MemoryPolicy};
use crate::pipeline::{Batch, BatchLayout, FieldSlot, Loader};

/// Alignment of device regions (pixels of one image, fields of the output).
const ALIGN: usize = 256;

/// Checks `decode` against `loader` before any device is touched: each field is a
/// bytes field of the loader that its workers do not decode already, the spec is valid,
/// this process can decode images, and bad images raise.
pub(crate) fn check(loader: &Loader, decode: &[(String, ImageDecode)]) -> Result<()> {
    let schema = &loader.dataset().manifest().schema;
    if !decode.is_empty() && loader.batch_size() > 65_535 {
        return Err(Error::InvalidArgument(format!(
            "decode on the device takes batches of at most 65,535 images, not {}",
            loader.batch_size()
        )));
    }
    for (name, spec) in decode {
        let names = loader.field_names();
        if !names.contains(&name.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "decode on the device names field {name:?}, which is not among the loader's fields ({})",
                names.join(", ")
            )));
        }
        let (on_workers, on_error) = loader.worker_decode(name);
        if on_workers {
            return Err(Error::InvalidArgument(format!(
                "field {name:?} is decoded on the decrypt workers already: give its decode to the loader or to the \
                 device stage, not both"
            )));
        }
        if on_error == OnDecodeError::Skip {
            return Err(Error::InvalidArgument(
                "on_decode_error=\"skip\" needs the decrypt workers to decode (decode_on=\"workers\"): a batch on \
                 the device keeps every sample, so a bad image raises DecodeError there"
                    .into(),
            ));
        }
        let field = schema
            .fields
            .iter()
            .find(|f| f.name == *name)
            .ok_or_else(|| Error::Internal(format!("field {name:?} not in the schema")))?;
        crate::decode::check_supported(field, spec, loader.memory_policy())?;
    }
    Ok(())
}

/// The slots of a device batch: `host`'s, with each decoded field a tensor placed after
/// the host bytes (256-byte aligned); and the device buffer length.
pub(super) fn device_layout(host: &BatchLayout, used: usize, decode: &[(String, ImageDecode)]) -> (BatchLayout, usize) {
    let n = host.len();
    let mut off = used.next_multiple_of(ALIGN);
    let slots: Vec<FieldSlot> = host
        .fields()
        .iter()
        .map(|s| match decode.iter().find(|(f, _)| **f == *s.name) {
            Some((_, spec)) => {
                let len = n * spec.out_len();
                let slot = FieldSlot {
                    name: s.name.clone(),
                    schema_pos: s.schema_pos,
                    kind: FieldKind::Tensor { dtype: spec.dtype, shape: spec.shape() },
                    offset: off,
                    len,
                    offsets_at: None,
                };
                off = (off + len).next_multiple_of(ALIGN);
                slot
            }
            None => s.clone(),
        })
        .collect();
    let layout =
        BatchLayout { slots: slots.into(), samples: host.samples.clone(), index: host.index, epoch: host.epoch };
    (layout, off.max(used))
}

/// The byte ranges of a host batch to copy to the device when `decode` fields are
/// decoded there: everything in `[0, used)` except those fields' encoded values and
/// offsets (the device only needs their decoded tensors), merged and in order.
pub(super) fn host_ranges(host: &BatchLayout, used: usize, decode: &[(String, ImageDecode)]) -> Vec<(usize, usize)> {
    let mut skip: Vec<(usize, usize)> = Vec::new();
    for s in host.fields().iter().filter(|s| decode.iter().any(|(f, _)| **f == *s.name)) {
        skip.push((s.offset, s.offset + s.len));
        if let Some(at) = s.offsets_at {
            skip.push((at, at + 8 * (host.len() + 1)));
        }
    }
    skip.sort_unstable();
    let mut out = Vec::new();
    let mut cursor = 0;
    for (a, z) in skip {
        if a > cursor {
            out.push((cursor, a.min(used)));
        }
        cursor = cursor.max(z);
    }
    if cursor < used {
        out.push((cursor, used));
    }
    out.retain(|(a, z)| z > a);
    out
}

/// Device scratch that only grows; zeroed on `stream` before it is replaced or dropped.
struct Scratch<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> {
    slice: Option<CudaSlice<T>>,
}

impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> Scratch<T> {
    fn new() -> Self {
        Self { slice: None }
    }

    /// The device address of at least `len` elements.
    fn ensure(&mut self, stream: &Arc<CudaStream>, device: &str, len: usize) -> Result<u64> {
        if self.slice.as_ref().is_none_or(|s| s.len() < len) {
            self.clear(stream);
            let cap = len.max(1).next_multiple_of(64 << 10) + len / 4;
            self.slice = Some(stream.alloc_zeros::<T>(cap).map_err(device_error(device, "cuMemAlloc"))?);
        }
        let s = self.slice.as_ref().ok_or_else(|| Error::Internal("device scratch missing".into()))?;
        let (addr, guard) = s.device_ptr(stream);
        drop(guard);
        Ok(addr)
    }

    /// Zeroes (its contents are plaintext) and frees the scratch, in stream order.
    fn clear(&mut self, stream: &Arc<CudaStream>) {
        if let Some(mut s) = self.slice.take() {
            if stream.memset_zeros(&mut s).is_err() || stream.synchronize().is_err() {
                // Work may still use it: leak it rather than free memory a kernel reads.
                std::mem::forget(s);
            }
        }
    }
}

/// How one sample's pixels reach the device.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Nvjpeg,
    Host,
}

/// One sample of a batch being decoded.
struct Item {
    route: Route,
    /// Stored size (nvJPEG's output) and channels of the decoded pixels.
    width: usize,
    height: usize,
    channels: usize,
    /// EXIF orientation (applied on the host route only; nvJPEG takes 1).
    orientation: u8,
    /// Byte offset of its pixels in the device pixel scratch.
    src: usize,
}

/// The device stage's image decoder.
pub(super) struct DeviceDecode {
    fields: Vec<(String, ImageDecode)>,
    device: String,
    ctx: Arc<CudaContext>,
    kernels: Arc<Kernels>,
    nvjpeg: nvjpeg::Decoder,
    worker: ImageWorker,
    policy: MemoryPolicy,
    seed: u64,
    pixels: Scratch<u8>,
    tmp: Scratch<f32>,
    tables: Scratch<u8>,
    /// Host staging for the tables and the host-decoded pixels: locked, registered.
    staging: Option<LockedBuf>,
    registered: HostRegistrations,
    /// Recorded after the last copy from `staging`; it is not rewritten before.
    staged: Option<CudaEvent>,
    /// Register the staging with the driver (`pinned`; else copies are from pageable
    /// memory, synchronous, for platforms that cannot pin).
    pinned: bool,
}

impl DeviceDecode {
    /// nvJPEG and the kernels for `ctx`'s device (its context current on this thread).
    pub(super) fn new(
        ctx: &Arc<CudaContext>,
        loader: &Loader,
        fields: Vec<(String, ImageDecode)>,
        nvjpeg_path: Option<&std::path::Path>,
        pinned: bool,
    ) -> Result<Self> {
        let device = super::device_name(ctx.ordinal());
        ctx.bind_to_thread().map_err(device_error(&device, "cuCtxSetCurrent"))?;
        let policy = loader.memory_policy();
        let kernels = Kernels::for_device(ctx)?;
        let nvjpeg = nvjpeg::Decoder::new(nvjpeg_path, &device, policy)?;
        Ok(Self {
            fields,
            device,
            ctx: ctx.clone(),
            kernels,
            nvjpeg,
            worker: ImageWorker::new(policy),
            policy,
            seed: loader.seed(),
            pixels: Scratch::new(),
            tmp: Scratch::new(),
            tables: Scratch::new(),
            staging: None,
            registered: HostRegistrations::default(),
            staged: None,
            pinned,
        })
    }

    /// The fields decoded here.
    pub(super) fn fields(&self) -> &[(String, ImageDecode)] {
        &self.fields
    }

    /// Decodes every decoded field of `host` into the device buffer at `base`, whose
    /// slots are `layout`'s ([`device_layout`]), on `stream` (after the batch's copy).
    pub(super) fn run(
        &mut self,
        stream: &Arc<CudaStream>,
        host: &Batch,
        layout: &BatchLayout,
        base: u64,
        loader: &Loader,
    ) -> Result<()> {
        self.ctx.bind_to_thread().map_err(device_error(&self.device, "cuCtxSetCurrent"))?;
        for k in 0..self.fields.len() {
            let (name, spec) = self.fields[k].clone();
            if host.is_empty() {
                continue;
            }
            let out = base + layout.slot(&name)?.offset as u64;
            self.field(stream, host, layout, &name, &spec, out, loader)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn field(
        &mut self,
        stream: &Arc<CudaStream>,
        host: &Batch,
        layout: &BatchLayout,
        name: &str,
        spec: &ImageDecode,
        out: u64,
        loader: &Loader,
    ) -> Result<()> {
        let n = host.len();
        let fail = |i: usize, detail: String| {
            let (shard, record) = loader.locate(layout.samples[i]);
            Error::Decode { shard, record, field: name.to_owned(), detail }
        };
        let msg = |i: usize, f: DecodeFail| match f {
            DecodeFail::Msg(d) => fail(i, d),
            DecodeFail::Memory(e) => e,
        };
        // 1. Headers, routes and where each image's pixels go.
        let mut items = Vec::with_capacity(n);
        let mut total = 0usize;
        for i in 0..n {
            let bytes = host.bytes(name, i)?;
            let p = self.worker.probe(bytes, spec).map_err(|f| msg(i, f))?;
            let nv = p.plain_jpeg && p.orientation <= 1 && self.nvjpeg.dimensions(bytes) == Ok((p.width, p.height));
            let route = if nv { Route::Nvjpeg } else { Route::Host };
            let src = total.next_multiple_of(ALIGN);
            total = src + p.width * p.height * p.channels;
            items.push(Item {
                route,
                width: p.width,
                height: p.height,
                channels: p.channels,
                orientation: p.orientation,
                src,
            });
        }
        let pixels = self.pixels.ensure(stream, &self.device, total)?;
        // 2. nvJPEG, from the locked host batch into the device scratch.
        for (i, it) in items.iter_mut().enumerate() {
            if it.route != Route::Nvjpeg {
                continue;
            }
            let bytes = host.bytes(name, i)?;
            #[allow(unsafe_code)]
            // SAFETY: `pixels + it.src` starts a region of `width * height * 3` bytes of
            // the pixel scratch (sized above from the dimensions nvJPEG itself reported
            // for these bytes); only work queued on `stream` after this reads it.
            let done = unsafe { self.nvjpeg.decode(bytes, pixels + it.src as u64, it.width, stream.cu_stream()) }?;
            if let Outcome::Refused = done {
                it.route = Route::Host;
            }
        }
        // 3. Taps (after EXIF orientation, which the host route applies), then staging.
        let (oh, ow) = (spec.size.0 as usize, spec.size.1 as usize);
        let mut tables = ResampleTables::default();
        let mut host_bytes = 0usize;
        for (i, it) in items.iter().enumerate() {
            if it.route == Route::Host {
                host_bytes = host_bytes.next_multiple_of(64) + it.width * it.height * it.channels;
            }
            // Orientations 5 to 8 transpose the image (the host route applies them).
            let turned = it.route == Route::Host && it.orientation >= 5;
            let (w, h) = if turned { (it.height, it.width) } else { (it.width, it.height) };
            let key = SampleKey { seed: self.seed, epoch: layout.epoch, sample: layout.samples[i] };
            tables.push(&Plan::new(spec, w, h, key), it.src, w * it.channels, it.channels, ow);
        }
        let descs: &[u8] = bytemuck::cast_slice::<SampleDesc, u8>(&tables.descs);
        let ints: &[u8] = bytemuck::cast_slice(&tables.ints);
        let weights: &[u8] = bytemuck::cast_slice(&tables.weights);
        let ints_at = descs.len().next_multiple_of(ALIGN);
        let weights_at = (ints_at + ints.len()).next_multiple_of(ALIGN);
        let table_len = weights_at + weights.len();
        let host_at = table_len.next_multiple_of(64);
        self.prepare_staging(stream, host_at + host_bytes)?;
        let table_addr = self.tables.ensure(stream, &self.device, table_len)?;
        let Self { staging, worker, pixels: pix, tables: table_scratch, device, .. } = self;
        let staging = staging.as_mut().ok_or_else(|| Error::Internal("staging missing".into()))?;
        {
            let buf = staging.prefix_mut(table_len);
            buf[..descs.len()].copy_from_slice(descs);
            buf[ints_at..ints_at + ints.len()].copy_from_slice(ints);
            buf[weights_at..].copy_from_slice(weights);
        }
        let err = |op| device_error(device, op);
        // 4. Host-decoded pixels: decoded into the worker's locked scratch, staged, copied up.
        let mut at = host_at;
        let pix = pix.slice.as_mut().ok_or_else(|| Error::Internal("pixel scratch missing".into()))?;
        for (i, it) in items.iter().enumerate().filter(|(_, it)| it.route == Route::Host) {
            let d = worker.pixels(host.bytes(name, i)?, spec).map_err(|f| msg(i, f))?;
            let len = it.width * it.height * it.channels;
            if d.len() != len || d.channels != it.channels {
                return Err(fail(i, "the image's headers changed between two reads of the same bytes".into()));
            }
            at = at.next_multiple_of(64);
            let staged = &mut staging.prefix_mut(at + len)[at..at + len];
            staged.copy_from_slice(worker.decoded(&d));
            let mut dst = pix.slice_mut(it.src..it.src + len);
            stream.memcpy_htod(&staging.as_slice()[at..at + len], &mut dst).map_err(err("H2D copy"))?;
            at += len;
        }
        {
            let t = table_scratch.slice.as_mut().ok_or_else(|| Error::Internal("table scratch missing".into()))?;
            let mut dst = t.slice_mut(..table_len);
            stream.memcpy_htod(&staging.as_slice()[..table_len], &mut dst).map_err(err("H2D copy"))?;
        }
        // The staging may be rewritten once these copies are done (not the kernels).
        let copied = self.ctx.new_event(None).and_then(|e| e.record(stream).map(|_| e));
        self.staged = Some(copied.map_err(device_error(&self.device, "cuEventRecord"))?);
        let tmp = self.tmp.ensure(stream, &self.device, tables.tmp_floats)?;
        // 5. The kernels, into the batch's device buffer.
        let (scale, bias) = out_affine(spec);
        let launch = ResampleLaunch {
            pixels,
            desc: table_addr,
            ints: table_addr + ints_at as u64,
            weights: table_addr + weights_at as u64,
            tmp,
            out,
            samples: n,
            max_rows: tables.max_rows,
            oh,
            ow,
            chw: spec.layout == ImageLayout::Chw,
            dtype: spec.dtype,
            scale,
            bias,
        };
        #[allow(unsafe_code)]
        // SAFETY: the descriptors' offsets were computed above inside the pixel scratch
        // (`total` bytes), the tables (`table_len`) and the horizontal scratch
        // (`tmp_floats`); `out` is the decoded field's slot of the batch's device buffer,
        // `n * spec.out_len()` bytes (`device_layout`). All of them live until the stream
        // passes this point (the scratch is only replaced after a synchronize; the batch
        // buffer is reused only after its events).
        unsafe {
            self.kernels.resample(stream, &launch)
        }
    }

    /// Staging of at least `len` bytes that no pending copy reads; registered with the
    /// driver, so the copies from it are DMA from locked memory.
    fn prepare_staging(&mut self, stream: &Arc<CudaStream>, len: usize) -> Result<()> {
        if let Some(e) = self.staged.take() {
            e.synchronize().map_err(device_error(&self.device, "cuEventSynchronize"))?;
        }
        if self.staging.as_ref().is_none_or(|b| b.capacity() < len) {
            if self.staging.is_some() {
                stream.synchronize().map_err(device_error(&self.device, "cuStreamSynchronize"))?;
                #[allow(unsafe_code)]
                // SAFETY: the only registered buffer is the old staging, still mapped (it
                // is dropped below), and no copy from it is pending (synchronized above).
                unsafe {
                    self.registered.unregister_all(&self.ctx)
                };
            }
            self.staging = None;
            let cap = len.max(1 << 20).next_power_of_two();
            self.staging = Some(LockedBuf::new(cap, self.policy)?);
        }
        let buf = self.staging.as_mut().ok_or_else(|| Error::Internal("staging missing".into()))?;
        if !self.pinned {
            return Ok(());
        }
        #[allow(unsafe_code)]
        // SAFETY: `buf` is a page-aligned mapping owned by `self.staging`; it stays
        // mapped until it is unregistered above or in `Drop` (before it is unmapped).
        unsafe {
            self.registered.register(&self.ctx, &self.device, buf.as_slice())
        }
    }
}

impl Drop for DeviceDecode {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let synced = self.ctx.synchronize().is_ok();
        if synced {
            #[allow(unsafe_code)]
            // SAFETY: the staging is still mapped (dropped after this body) and no copy
            // from it is pending (the context was synchronized).
            unsafe {
                self.registered.unregister_all(&self.ctx)
            };
        } else if let Some(b) = self.staging.take() {
            // A copy may still read it: never unmap memory a DMA reads.
            std::mem::forget(b);
        }
        let stream = self.ctx.default_stream();
        self.pixels.clear(&stream);
        self.tmp.clear(&stream);
        self.tables.clear(&stream);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::format::DType;

    #[test]
    fn decoded_fields_become_aligned_tensor_slots_after_the_host_bytes() {
        let slot = |name: &str, offset, len, offsets_at: Option<usize>| FieldSlot {
            name: name.into(),
            schema_pos: 0,
            kind: if offsets_at.is_some() {
                FieldKind::Bytes
            } else {
                FieldKind::Tensor { dtype: DType::I64, shape: vec![] }
            },
            offset,
            len,
            offsets_at,
        };
        let host = BatchLayout {
            slots: vec![slot("label", 0, 24, None), slot("image", 128, 1000, Some(64))].into(),
            samples: vec![5, 9, 2],
            index: 4,
            epoch: 1,
        };
        let mut spec = ImageDecode::train(8);
        spec.dtype = DType::F16;
        let (dev, len) = device_layout(&host, 1128, &[("image".into(), spec.clone())]);
        let img = dev.slot("image").unwrap();
        assert_eq!((img.offset, img.len, img.offsets_at), (1280, 3 * spec.out_len(), None));
        assert_eq!(img.kind, FieldKind::Tensor { dtype: DType::F16, shape: vec![3, 8, 8] });
        assert_eq!(dev.slot("label").unwrap().offset, 0);
        assert_eq!(len, (1280 + 3 * spec.out_len()).next_multiple_of(256));
        assert_eq!((dev.sample_ids(), dev.index(), dev.epoch()), (&[5u64, 9, 2][..], 4, 1));
        // The encoded image (offsets at 64..96, values at 128..1128) stays on the host.
        let decode = [("image".to_owned(), spec)];
        assert_eq!(host_ranges(&host, 1128, &decode), vec![(0, 64), (96, 128)]);
        assert_eq!(host_ranges(&host, 1128, &[]), vec![(0, 1128)]);
    }
}
