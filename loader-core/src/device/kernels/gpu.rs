//! NVRTC compilation (once per device) and launches of the decode kernels.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    CudaContext, CudaModule, CudaSlice, CudaStream, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use super::{NormOut, Normalize, SOURCE};
use crate::device::{device_error, device_name, open};
use crate::error::{Error, Result};
use crate::format::DType;

/// The decode kernels, compiled for one device.
pub struct Kernels {
    module: Arc<CudaModule>,
    device: String,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels").field("device", &self.device).finish()
    }
}

fn cache() -> &'static Mutex<HashMap<usize, Arc<Kernels>>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Kernels>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Grid-stride launch shape for `total` elements.
fn launch_config(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(256).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

impl Kernels {
    /// The kernels for `ctx`'s device, compiled with NVRTC on first use and cached for
    /// the life of the process.
    pub fn for_device(ctx: &Arc<CudaContext>) -> Result<Arc<Kernels>> {
        let device = device_name(ctx.ordinal());
        let mut map = cache().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = map.get(&ctx.ordinal()) {
            return Ok(k.clone());
        }
        #[allow(unsafe_code)]
        // SAFETY: only tries to dlopen libnvrtc under its usual names; no NVRTC call.
        let present = unsafe { cudarc::nvrtc::sys::is_culib_present() };
        if !present {
            return Err(Error::DeviceUnavailable {
                device,
                detail: "NVRTC (libnvrtc.so) was not found, so the decode kernels cannot be compiled: add the CUDA \
                         toolkit's lib64 (or pip's nvidia/cuda_nvrtc/lib) to LD_LIBRARY_PATH; copying batches to the \
                         device does not need it"
                    .into(),
            });
        }
        let (major, minor) = ctx.compute_capability().map_err(device_error(&device, "cuDeviceGetAttribute"))?;
        let opts = CompileOptions {
            fmad: Some(false),
            options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
            name: Some("decode.cu".into()),
            ..Default::default()
        };
        let ptx = compile_ptx_with_opts(SOURCE, opts).map_err(|e| Error::Device {
            device: device.clone(),
            op: "NVRTC compile",
            detail: e.to_string(),
        })?;
        let module = ctx.load_module(ptx).map_err(device_error(&device, "cuModuleLoadData"))?;
        let k = Arc::new(Kernels { module, device });
        map.insert(ctx.ordinal(), k.clone());
        Ok(k)
    }

    /// The kernels for device `ordinal`: [`open`], then [`Kernels::for_device`].
    pub fn for_ordinal(ordinal: usize) -> Result<Arc<Kernels>> {
        Self::for_device(&open(ordinal)?)
    }

    /// `u8[n, h, w, c]` (HWC) to `(x - mean) / std` as `T`, in CHW or HWC layout, on
    /// `stream`. The result is ready once `stream` reaches this point.
    pub fn normalize_u8<T: NormOut + DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        stream: &Arc<CudaStream>,
        src: &CudaView<'_, u8>,
        p: &Normalize,
    ) -> Result<CudaSlice<T>> {
        p.images(src.len())?;
        let err = |op| device_error(&self.device, op);
        let total = src.len();
        let mean = stream.clone_htod(&p.mean).map_err(err("H2D copy"))?;
        let scale = stream.clone_htod(&p.scale()).map_err(err("H2D copy"))?;
        let mut out = stream.alloc_zeros::<T>(total).map_err(err("cuMemAlloc"))?;
        let func = self.module.load_function(T::KERNEL).map_err(err("cuModuleGetFunction"))?;
        let (n, h, w, c, chw) = (total as i64, p.h as i32, p.w as i32, p.mean.len() as i32, i32::from(p.chw));
        let mut launch = stream.launch_builder(&func);
        launch.arg(src).arg(&mut out).arg(&mean).arg(&scale).arg(&n).arg(&h).arg(&w).arg(&c).arg(&chw);
        #[allow(unsafe_code)]
        // SAFETY: the argument list matches the kernel's signature in decode.cu
        // (pointers to `total` u8 / T values and to `c` floats, then i64, 4 x i32); the
        // kernel reads src[0..total) and writes out[0..total) only (grid-stride loop
        // bounded by `total`), and every buffer lives until the launch completes
        // (cudarc records their use on `stream`).
        unsafe { launch.launch(launch_config(total)) }.map_err(err("kernel launch"))?;
        Ok(out)
    }

    /// u16 values to i64, on `stream`.
    pub fn widen_u16_i64(&self, stream: &Arc<CudaStream>, src: &CudaView<'_, u16>) -> Result<CudaSlice<i64>> {
        let err = |op| device_error(&self.device, op);
        let total = src.len();
        let mut out = stream.alloc_zeros::<i64>(total).map_err(err("cuMemAlloc"))?;
        let func = self.module.load_function("widen_u16_i64").map_err(err("cuModuleGetFunction"))?;
        let n = total as i64;
        let mut launch = stream.launch_builder(&func);
        launch.arg(src).arg(&mut out).arg(&n);
        #[allow(unsafe_code)]
        // SAFETY: matches `widen_u16_i64(const u16*, i64*, i64)`; reads and writes
        // `total` elements of buffers that outlive the launch on `stream`.
        unsafe { launch.launch(launch_config(total)) }.map_err(err("kernel launch"))?;
        Ok(out)
    }

    /// Launches `resample_h` then `resample_v_<dtype>` (kernels/decode.cu) on `stream`
    /// for a batch of images decoded on the device (`decode_on = "device"`).
    ///
    /// # Safety
    /// Every address in `l` must point into device allocations of this context that
    /// stay alive until `stream` passes this point: `desc` holds `samples` descriptors
    /// whose offsets lie inside `pixels`, `ints`, `weights` and `tmp`, and `out` has room
    /// for `samples` images of `3 * oh * ow` values of `l.dtype`.
    #[allow(unsafe_code)]
    pub(crate) unsafe fn resample(&self, stream: &Arc<CudaStream>, l: &ResampleLaunch) -> Result<()> {
        let err = |op| device_error(&self.device, op);
        let samples = u32::try_from(l.samples).ok().filter(|&n| (1..=65_535).contains(&n)).ok_or_else(|| {
            Error::InvalidArgument(format!("decode on the device takes 1 to 65,535 images a batch, not {}", l.samples))
        })?;
        let grid = |work: usize| ((work.div_ceil(256)).clamp(1, 4096) as u32, samples, 1);
        let (oh, ow, chw) = (l.oh as i32, l.ow as i32, i32::from(l.chw));
        let h = self.module.load_function("resample_h").map_err(err("cuModuleGetFunction"))?;
        let mut launch = stream.launch_builder(&h);
        launch.arg(&l.pixels).arg(&l.desc).arg(&l.ints).arg(&l.weights).arg(&l.tmp).arg(&ow);
        let cfg = LaunchConfig { grid_dim: grid(l.max_rows * l.ow), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments match `resample_h(const u8*, const ResampleDesc*, const
        // int*, const float*, float*, int)`; the caller guarantees the addresses.
        unsafe { launch.launch(cfg) }.map_err(err("kernel launch"))?;
        let name = match l.dtype {
            DType::U8 => "resample_v_u8",
            DType::F32 => "resample_v_f32",
            DType::F16 => "resample_v_f16",
            DType::Bf16 => "resample_v_bf16",
            other => return Err(Error::InvalidArgument(format!("no image output in {}", other.name()))),
        };
        let v = self.module.load_function(name).map_err(err("cuModuleGetFunction"))?;
        let mut launch = stream.launch_builder(&v);
        launch.arg(&l.desc).arg(&l.ints).arg(&l.weights).arg(&l.tmp).arg(&l.out).arg(&oh).arg(&ow).arg(&chw);
        for x in l.scale.iter().chain(&l.bias) {
            launch.arg(x);
        }
        let cfg = LaunchConfig { grid_dim: grid(l.oh * l.ow), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments match `resample_v_*(const ResampleDesc*, const int*,
        // const float*, const float*, T*, int, int, int, 6 x float)`; the caller
        // guarantees the addresses.
        unsafe { launch.launch(cfg) }.map_err(err("kernel launch"))?;
        Ok(())
    }
}

/// Device addresses and shape of one [`Kernels::resample`] launch.
#[derive(Clone, Debug)]
pub(crate) struct ResampleLaunch {
    pub(crate) pixels: u64,
    pub(crate) desc: u64,
    pub(crate) ints: u64,
    pub(crate) weights: u64,
    pub(crate) tmp: u64,
    pub(crate) out: u64,
    pub(crate) samples: usize,
    /// Most source rows any sample's vertical pass reads.
    pub(crate) max_rows: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
    pub(crate) chw: bool,
    pub(crate) dtype: DType,
    pub(crate) scale: [f32; 3],
    pub(crate) bias: [f32; 3],
}
