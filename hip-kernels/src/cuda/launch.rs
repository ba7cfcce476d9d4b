//! Kernel launches with programmatic dependent launch (PDL, Hopper and later).
//!
//! A decode step is ~300 short kernels in one stream; between two of them the device spends a
//! few microseconds retiring one grid and starting the next. Launched with the attribute
//! `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`, a kernel of ours may be scheduled
//! while its predecessor in the stream still runs: its CTAs start, then wait in
//! `griddepcontrol.wait` (common.cuh's `pdl_entry`, the first statement of every kernel of
//! `fused.cu`, `span_attn.cu` and `hip_mask.cu`) until the predecessor has finished and its
//! writes are visible. So the kernels see exactly what a plain launch would show them; only the
//! launch latency overlaps the predecessor's tail. Our kernels also call
//! `griddepcontrol.launch_dependents` at their start, which lets the next PDL launch be
//! scheduled as soon as all of their CTAs are running.
//!
//! `HIP_PDL=0` launches without the attribute (for comparisons); devices below compute
//! capability 9.0 never get it (the instructions are compiled out there).

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::sys::{
    self, CUdevice_attribute, CUlaunchAttribute, CUlaunchAttributeID, CUlaunchAttributeValue, CUlaunchConfig,
};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaStream, DeviceRepr, DriverError, LaunchConfig,
};

/// One launch's arguments, collected like cudarc's `LaunchArgs` (pointers to values that
/// outlive the launch), launched through `cuLaunchKernelEx`.
pub(crate) struct Launch<'a> {
    stream: &'a CudaStream,
    func: &'a CudaFunction,
    args: Vec<*mut c_void>,
    _values: PhantomData<&'a ()>,
}

impl<'a> Launch<'a> {
    pub(crate) fn new(stream: &'a CudaStream, func: &'a CudaFunction) -> Self {
        Launch { stream, func, args: Vec::with_capacity(24), _values: PhantomData }
    }

    /// A by-value kernel argument (a scalar, a device address, a `#[repr(C)]` struct).
    pub(crate) fn arg<T: DeviceRepr>(&mut self, value: &'a T) -> &mut Self {
        self.args.push(value as *const T as *mut c_void);
        self
    }

    /// Launches the kernel in the stream, with programmatic stream serialization where
    /// [`pdl_enabled`] says so.
    ///
    /// # Safety
    /// As cudarc's `LaunchArgs::launch`: the arguments must match the kernel's parameters in
    /// number, order and type, the buffers must hold what the kernel reads and writes, and
    /// every kernel launched this way must start with `pdl_entry()` (common.cuh) before it
    /// touches global memory.
    pub(crate) unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        self.stream.context().bind_to_thread()?;
        let mut attr = CUlaunchAttribute {
            id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: CUlaunchAttributeValue { programmaticStreamSerializationAllowed: 1 },
        };
        let pdl = pdl_enabled(self.stream);
        let config = CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
            numAttrs: u32::from(pdl),
        };
        // SAFETY: `config` and `attr` live through the call; the caller vouches for the
        // arguments (see above).
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                self.func.cu_function(),
                self.args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
            .result()
        }
    }
}

/// Whether launches on `stream`'s device carry the PDL attribute: compute capability 9.0 or
/// later and `HIP_PDL` not `0`. Asked once per process (one device kind per process here).
pub(crate) fn pdl_enabled(stream: &CudaStream) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        if std::env::var("HIP_PDL").is_ok_and(|v| v == "0") {
            return false;
        }
        stream
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .is_ok_and(|major| major >= 9)
    })
}
