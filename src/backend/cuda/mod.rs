//! CUDA backend (cudarc, dynamically loaded).

/// Device memory owned by the CUDA backend.
pub struct DeviceBuffer {
    pub(crate) bytes: usize,
}

impl DeviceBuffer {
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }
}
