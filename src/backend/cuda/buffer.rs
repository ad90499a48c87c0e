//! Device memory.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

/// Device memory owned by the CUDA backend: the storage of a device `Tensor`.
///
/// Untyped bytes (the tensor carries the dtype); kernels get typed views of it. The memory is
/// allocated on, and freed in stream order on, the stream of the `CudaBackend` that made it.
pub struct DeviceBuffer {
    /// At least `bytes` long (a zero-byte buffer holds a one-byte allocation, since the driver
    /// rejects empty allocations).
    slice: CudaSlice<u8>,
    /// Logical length in bytes.
    bytes: usize,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceBuffer({} bytes on cuda:{})",
            self.bytes,
            self.ordinal()
        )
    }
}

impl DeviceBuffer {
    pub(crate) fn new(slice: CudaSlice<u8>, bytes: usize) -> Self {
        debug_assert!(slice.len() >= bytes);
        DeviceBuffer { slice, bytes }
    }

    pub fn len_bytes(&self) -> usize {
        self.bytes
    }

    /// The device this memory lives on.
    pub fn ordinal(&self) -> usize {
        self.slice.ordinal()
    }

    /// `len` elements of `T` starting at byte `start`, or `None` when that range is outside the
    /// buffer or misaligned for `T`.
    pub(crate) fn view<T>(&self, start: usize, len: usize) -> Option<CudaView<'_, T>> {
        let size = std::mem::size_of::<T>();
        let end = len.checked_mul(size)?.checked_add(start)?;
        if end > self.bytes || !start.is_multiple_of(size) {
            return None;
        }
        let bytes = self.slice.try_slice(start..start + len * size)?;
        // SAFETY: every bit pattern is a valid f32/bf16/f16 (the only element types used), and
        // device allocations are 256-byte aligned, so `start % size == 0` keeps `T` aligned.
        unsafe { bytes.transmute::<T>(len) }
    }

    /// The whole buffer as `len` elements of `T` for a kernel to write.
    pub(crate) fn view_mut<T>(&mut self, len: usize) -> Option<CudaViewMut<'_, T>> {
        if len.checked_mul(std::mem::size_of::<T>())? > self.bytes {
            return None;
        }
        // SAFETY: as in `view`; the buffer starts at an aligned allocation.
        unsafe { self.slice.transmute_mut::<T>(len) }
    }

    pub(crate) fn slice_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.slice
    }
}
