//! Where the KV pool lives ([`PoolDevice`]), a pool tensor's storage (a host region or a device buffer), and the
//! memory on a CUDA GPU ([`DeviceBuffer`]), through the CUDA runtime loaded at run time.
//!
//! The pool of a backend that runs on a GPU (ONNX Runtime's CUDA provider over the CUDA serving graph) is allocated
//! once, on that GPU, with `cudaMalloc`: the graph's `GroupQueryAttention` reads and appends it in place through
//! tensors bound over it (`backend/ort_in_place.rs`), so the host never holds a copy of a running sequence's cache.
//! Moves between slots (compaction, prefix-cache copies) are device-to-device `cudaMemcpy`s.
//!
//! `libcudart` is opened with `dlopen` (no link-time CUDA dependency: CI and CPU hosts build and run without it). By
//! the time a pool is made, ONNX Runtime's CUDA provider has loaded the runtime it was built against, so the first
//! name below that resolves is that same library; a host without it gets an error naming the files tried.
//!
//! Unlike a host region, device memory is committed when allocated: the whole pool (slots × context × bytes per
//! position) is taken at load, and the engine logs its size.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use crate::error::{EngineError, Result};

/// Where a KV pool's memory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolDevice {
    /// Host memory (anonymous mappings committed page by page: [`super::region::Region`]).
    #[default]
    Host,
    /// Memory of CUDA device `id`.
    Cuda {
        /// The CUDA device ordinal (ONNX Runtime's `device_id`).
        id: i32,
    },
}

impl std::fmt::Display for PoolDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolDevice::Host => f.write_str("host memory"),
            PoolDevice::Cuda { id } => write!(f, "CUDA device {id}"),
        }
    }
}

/// The CUDA runtime library names tried, newest first (onnxruntime-gpu 1.31 is built against CUDA 13; CUDA 12 builds
/// of ONNX Runtime load `.12`).
pub const CUDART_NAMES: [&str; 3] = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"];

const CUDA_MEMCPY_HOST_TO_DEVICE: c_int = 1;
const CUDA_MEMCPY_DEVICE_TO_HOST: c_int = 2;
const CUDA_MEMCPY_DEVICE_TO_DEVICE: c_int = 3;

type CudaError = c_int;

/// The few CUDA runtime entry points the pool needs.
struct CudaRuntime {
    set_device: unsafe extern "C" fn(c_int) -> CudaError,
    malloc: unsafe extern "C" fn(*mut *mut c_void, usize) -> CudaError,
    free: unsafe extern "C" fn(*mut c_void) -> CudaError,
    memcpy: unsafe extern "C" fn(*mut c_void, *const c_void, usize, c_int) -> CudaError,
    /// `cudaMemcpy2D(dst, dpitch, src, spitch, width, height, kind)`.
    memcpy_2d: unsafe extern "C" fn(*mut c_void, usize, *const c_void, usize, usize, usize, c_int) -> CudaError,
    memset: unsafe extern "C" fn(*mut c_void, c_int, usize) -> CudaError,
    synchronize: unsafe extern "C" fn() -> CudaError,
    error_string: unsafe extern "C" fn(CudaError) -> *const c_char,
    /// Keeps the library loaded for the process's life.
    _lib: libloading::Library,
}

static RUNTIME: OnceLock<std::result::Result<CudaRuntime, String>> = OnceLock::new();

fn unavailable(message: String) -> EngineError {
    EngineError::Unavailable { what: "the CUDA runtime (KV pool on the GPU)".into(), message }
}

fn open_runtime() -> std::result::Result<CudaRuntime, String> {
    let mut tried = Vec::new();
    for name in CUDART_NAMES {
        // SAFETY: loading the CUDA runtime runs its initialisers, which have no preconditions.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => {
                // SAFETY: the symbol types are the CUDA runtime API's documented signatures.
                let rt = unsafe {
                    macro_rules! sym {
                        ($name:literal) => {
                            *lib.get($name).map_err(|e| format!("{name}: {e}"))?
                        };
                    }
                    CudaRuntime {
                        set_device: sym!(b"cudaSetDevice\0"),
                        malloc: sym!(b"cudaMalloc\0"),
                        free: sym!(b"cudaFree\0"),
                        memcpy: sym!(b"cudaMemcpy\0"),
                        memcpy_2d: sym!(b"cudaMemcpy2D\0"),
                        memset: sym!(b"cudaMemset\0"),
                        synchronize: sym!(b"cudaDeviceSynchronize\0"),
                        error_string: sym!(b"cudaGetErrorString\0"),
                        _lib: lib,
                    }
                };
                return Ok(rt);
            }
            Err(e) => tried.push(format!("{name} ({e})")),
        }
    }
    Err(format!(
        "none of {} could be loaded: {}; a GPU pool needs the CUDA runtime that ONNX Runtime's CUDA provider uses \
         (on LD_LIBRARY_PATH)",
        CUDART_NAMES.join(", "),
        tried.join("; ")
    ))
}

fn runtime() -> Result<&'static CudaRuntime> {
    RUNTIME.get_or_init(open_runtime).as_ref().map_err(|m| unavailable(m.clone()))
}

impl CudaRuntime {
    fn check(&self, rc: CudaError, what: impl FnOnce() -> String) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: cudaGetErrorString returns a static C string for any code.
        let text = unsafe { CStr::from_ptr((self.error_string)(rc)) }.to_string_lossy().into_owned();
        Err(unavailable(format!("{} failed: CUDA error {rc} ({text})", what())))
    }
}

/// `bytes` bytes of one CUDA device's memory, freed on drop.
pub struct DeviceBuffer {
    ptr: *mut u8,
    bytes: usize,
    device: i32,
}

// Device memory is only an address here; every access goes through the CUDA runtime or ONNX Runtime.
unsafe impl Send for DeviceBuffer {}
unsafe impl Sync for DeviceBuffer {}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({} bytes on CUDA device {} at {:p})", self.bytes, self.device, self.ptr)
    }
}

impl DeviceBuffer {
    /// Allocates `bytes` bytes on CUDA device `device`, zeroed (`what` names the tensor in errors).
    pub fn new(device: i32, bytes: usize, what: &str) -> Result<DeviceBuffer> {
        let rt = runtime()?;
        // SAFETY: plain CUDA runtime calls with valid arguments; `p` receives the allocation.
        unsafe {
            rt.check((rt.set_device)(device), || format!("cudaSetDevice({device})"))?;
            let mut p: *mut c_void = std::ptr::null_mut();
            if bytes > 0 {
                rt.check((rt.malloc)(&mut p, bytes), || {
                    format!(
                        "cudaMalloc of {bytes} bytes for {what} on device {device} (lower --max-batch-size or \
                         --max-context-tokens: the GPU pool is allocated in full at load)"
                    )
                })?;
                let buffer = DeviceBuffer { ptr: p.cast(), bytes, device };
                rt.check((rt.memset)(p, 0, bytes), || format!("cudaMemset of {what}"))?;
                return Ok(buffer);
            }
            Ok(DeviceBuffer { ptr: p.cast(), bytes, device })
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The device.
    pub fn device(&self) -> i32 {
        self.device
    }

    /// The device address of byte `offset` (for binding a range to ONNX Runtime). `offset <= bytes`.
    pub fn ptr_at(&self, offset: usize) -> Result<*mut u8> {
        check_range("device pointer", offset, 0, self.bytes)?;
        Ok(self.ptr.wrapping_add(offset))
    }

    /// Copies `n` bytes from offset `src` to offset `dst` of this buffer, on the device; the ranges must not overlap.
    /// Waits for the copy (a following ONNX Runtime run may use another stream).
    pub fn copy_within(&mut self, src: usize, dst: usize, n: usize) -> Result<()> {
        self.copy_many(&[(src, dst, n)])
    }

    /// Several [`DeviceBuffer::copy_within`]s, then one wait.
    pub fn copy_many(&mut self, copies: &[(usize, usize, usize)]) -> Result<()> {
        for &(src, dst, n) in copies {
            check_range("device copy source", src, n, self.bytes)?;
            check_range("device copy destination", dst, n, self.bytes)?;
            if src.max(dst) < src.min(dst) + n {
                return Err(EngineError::InvalidArgument {
                    name: "device copy".into(),
                    message: format!("ranges {src}+{n} and {dst}+{n} overlap"),
                });
            }
        }
        if copies.iter().all(|c| c.2 == 0) {
            return Ok(());
        }
        let rt = runtime()?;
        // SAFETY: every range was checked to lie inside this allocation and not to overlap.
        unsafe {
            rt.check((rt.set_device)(self.device), || format!("cudaSetDevice({})", self.device))?;
            for &(src, dst, n) in copies.iter().filter(|c| c.2 > 0) {
                let (s, d) = (self.ptr.add(src), self.ptr.add(dst));
                rt.check((rt.memcpy)(d.cast(), s.cast(), n, CUDA_MEMCPY_DEVICE_TO_DEVICE), || {
                    format!("cudaMemcpy of {n} bytes on device {}", self.device)
                })?;
            }
            rt.check((rt.synchronize)(), || "cudaDeviceSynchronize".into())
        }
    }
}

impl DeviceBuffer {
    /// Copies `data` from the host to offset `offset` of this buffer and waits until the device holds it.
    pub fn upload(&mut self, offset: usize, data: &[u8]) -> Result<()> {
        check_range("device upload", offset, data.len(), self.bytes)?;
        if data.is_empty() {
            return Ok(());
        }
        let rt = runtime()?;
        // SAFETY: the destination range lies inside this allocation (checked); `data` is host memory of that length.
        unsafe {
            rt.check((rt.set_device)(self.device), || format!("cudaSetDevice({})", self.device))?;
            let dst = self.ptr.add(offset);
            rt.check((rt.memcpy)(dst.cast(), data.as_ptr().cast(), data.len(), CUDA_MEMCPY_HOST_TO_DEVICE), || {
                format!("cudaMemcpy of {} bytes to device {}", data.len(), self.device)
            })?;
            rt.check((rt.synchronize)(), || "cudaDeviceSynchronize".into())
        }
    }

    /// Copies `rows` pieces of `width` bytes (`data`, packed) to offsets `offset + r · pitch` of this buffer (one
    /// `cudaMemcpy2D`: e.g. one column of a row-major matrix) and waits until the device holds them.
    pub fn upload_strided(&mut self, offset: usize, pitch: usize, width: usize, data: &[u8]) -> Result<()> {
        if width == 0 || data.is_empty() {
            return Ok(());
        }
        if !data.len().is_multiple_of(width) || pitch < width {
            return Err(EngineError::InvalidArgument {
                name: "strided device upload".into(),
                message: format!("{} bytes are not rows of {width} bytes at a pitch of {pitch}", data.len()),
            });
        }
        let rows = data.len() / width;
        check_range("strided device upload", offset, (rows - 1) * pitch + width, self.bytes)?;
        let rt = runtime()?;
        // SAFETY: every row's destination lies inside this allocation (checked above); `data` holds `rows · width`.
        unsafe {
            rt.check((rt.set_device)(self.device), || format!("cudaSetDevice({})", self.device))?;
            let dst = self.ptr.add(offset);
            rt.check(
                (rt.memcpy_2d)(dst.cast(), pitch, data.as_ptr().cast(), width, width, rows, CUDA_MEMCPY_HOST_TO_DEVICE),
                || format!("cudaMemcpy2D of {rows} x {width} bytes to device {}", self.device),
            )?;
            rt.check((rt.synchronize)(), || "cudaDeviceSynchronize".into())
        }
    }

    /// Copies `out.len()` bytes from offset `offset` of this buffer to `out` (after the device's work so far).
    pub fn download(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        check_range("device download", offset, out.len(), self.bytes)?;
        if out.is_empty() {
            return Ok(());
        }
        let rt = runtime()?;
        // SAFETY: the source range lies inside this allocation (checked); `out` is host memory of that length.
        unsafe {
            rt.check((rt.set_device)(self.device), || format!("cudaSetDevice({})", self.device))?;
            rt.check((rt.synchronize)(), || "cudaDeviceSynchronize".into())?;
            let src = self.ptr.add(offset);
            rt.check((rt.memcpy)(out.as_mut_ptr().cast(), src.cast(), out.len(), CUDA_MEMCPY_DEVICE_TO_HOST), || {
                format!("cudaMemcpy of {} bytes from device {}", out.len(), self.device)
            })
        }
    }
}

/// Copies `out.len() / width` rows of `width` bytes, read `pitch` bytes apart from `src`, into `out` (packed): from
/// host memory, or with one `cudaMemcpy2D` from memory of the CUDA device `device` names (after the device's work so
/// far). How a step's new positions are read out of a present tensor that ONNX Runtime allocated where it runs
/// (`backend/ort_bound.rs`): the same stride arithmetic on either side.
///
/// # Safety
/// `src` must point at `rows` rows of `width` bytes `pitch` apart in the memory `device` names, valid for the call.
pub unsafe fn copy_rows_out(
    device: PoolDevice,
    src: *const u8,
    pitch: usize,
    width: usize,
    out: &mut [u8],
) -> Result<()> {
    if width == 0 || out.is_empty() {
        return Ok(());
    }
    if !out.len().is_multiple_of(width) || pitch < width {
        return Err(EngineError::InvalidArgument {
            name: "strided copy out".into(),
            message: format!("{} bytes are not rows of {width} bytes at a pitch of {pitch}", out.len()),
        });
    }
    let rows = out.len() / width;
    match device {
        PoolDevice::Host => {
            for (r, dst) in out.chunks_exact_mut(width).enumerate() {
                // SAFETY: the caller's guarantee covers row `r`.
                dst.copy_from_slice(unsafe { std::slice::from_raw_parts(src.add(r * pitch), width) });
            }
            Ok(())
        }
        PoolDevice::Cuda { id } => {
            let rt = runtime()?;
            // SAFETY: the caller's guarantee covers the source rows; `out` holds `rows · width` bytes.
            unsafe {
                rt.check((rt.set_device)(id), || format!("cudaSetDevice({id})"))?;
                rt.check((rt.synchronize)(), || "cudaDeviceSynchronize".into())?;
                rt.check(
                    (rt.memcpy_2d)(
                        out.as_mut_ptr().cast(),
                        width,
                        src.cast(),
                        pitch,
                        width,
                        rows,
                        CUDA_MEMCPY_DEVICE_TO_HOST,
                    ),
                    || format!("cudaMemcpy2D of {rows} x {width} bytes from device {id}"),
                )
            }
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.bytes > 0 {
            if let Ok(rt) = runtime() {
                // SAFETY: freeing exactly what `new` allocated, once.
                unsafe {
                    (rt.set_device)(self.device);
                    (rt.free)(self.ptr.cast());
                }
            }
        }
    }
}

/// One pool tensor's memory: a host region, or a buffer on the GPU the backend runs on.
#[derive(Debug)]
pub(super) enum Storage {
    Host(super::region::Region),
    Cuda(DeviceBuffer),
}

impl Storage {
    pub(super) fn ptr_at(&mut self, offset: usize) -> Result<*mut u8> {
        match self {
            Storage::Host(r) if offset <= r.bytes() => Ok(r.ptr_at(offset)),
            Storage::Host(r) => Err(EngineError::InvalidArgument {
                name: "KV pool offset".into(),
                message: format!("byte {offset} beyond the region of {}", r.bytes()),
            }),
            Storage::Cuda(b) => b.ptr_at(offset),
        }
    }

    /// The host region; a device pool has none (only in-place backends step over it).
    pub(super) fn host(&self) -> Result<&super::region::Region> {
        match self {
            Storage::Host(r) => Ok(r),
            Storage::Cuda(b) => Err(host_path_on_device(b.device())),
        }
    }

    pub(super) fn host_mut(&mut self) -> Result<&mut super::region::Region> {
        match self {
            Storage::Host(r) => Ok(r),
            Storage::Cuda(b) => Err(host_path_on_device(b.device())),
        }
    }
}

pub(super) fn host_path_on_device(device: i32) -> EngineError {
    EngineError::Unavailable {
        what: "a host-path step over the KV pool".into(),
        message: format!(
            "the pool lives on CUDA device {device}: only a backend that steps in place reads it (the CUDA serving \
             graph); gathering it to the host is not done"
        ),
    }
}

fn check_range(what: &str, start: usize, n: usize, bytes: usize) -> Result<()> {
    match start.checked_add(n) {
        Some(end) if end <= bytes => Ok(()),
        _ => Err(EngineError::InvalidArgument {
            name: what.into(),
            message: format!("bytes {start}..{} lie outside the buffer of {bytes} bytes", start.saturating_add(n)),
        }),
    }
}

/// Whether this process can reach a CUDA runtime (the library loads); `Err` names the files tried.
pub fn cuda_runtime_available() -> Result<()> {
    runtime().map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_without_the_cuda_runtime_is_told_which_library_is_missing() {
        // CI and this project's CPU hosts have no CUDA runtime: allocating must fail with the names tried, not panic.
        if cuda_runtime_available().is_ok() {
            return; // a GPU host: nothing to check here (scripts/gpu_check.sh exercises the pool there)
        }
        let e = DeviceBuffer::new(0, 1 << 20, "layer 0 keys").unwrap_err().to_string();
        assert!(e.contains("CUDA runtime") && e.contains("libcudart.so.13") && e.contains("LD_LIBRARY_PATH"), "{e}");
    }

    #[test]
    fn ranges_are_checked_before_any_device_call() {
        assert!(check_range("x", 10, 5, 15).is_ok());
        let e = check_range("device copy source", 10, 6, 15).unwrap_err().to_string();
        assert!(e.contains("device copy source") && e.contains("10..16") && e.contains("15 bytes"), "{e}");
        assert!(check_range("x", usize::MAX, 2, 15).is_err(), "overflow is out of range");
    }

    #[test]
    fn pool_device_names_itself() {
        assert_eq!(PoolDevice::default(), PoolDevice::Host);
        assert_eq!(PoolDevice::Cuda { id: 1 }.to_string(), "CUDA device 1");
    }
}
