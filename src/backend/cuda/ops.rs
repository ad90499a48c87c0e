//! Host <-> device copies and kernel launchers.
//!
//! Launchers take device tensors, check dtype, device and layout, allocate the output and queue
//! the kernel on the backend's stream; nothing waits for the GPU except `to_host`.

use super::buffer::DeviceBuffer;
use super::context::{backend_err, driver_err, CudaBackend};
use crate::tensor::{Element, Storage};
use crate::{DType, Error, Result, Tensor};
use cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

/// Threads per block for the element-wise kernels.
const ELEMENTWISE_BLOCK: u32 = 256;

fn device_buffer<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a DeviceBuffer> {
    match t.storage() {
        Storage::Device(b) => Ok(b),
        Storage::Host(_) => Err(backend_err(format!(
            "{op}: tensor {t:?} is on the host; copy it with to_device first"
        ))),
    }
}

fn check_dtype(op: &'static str, t: &Tensor, want: DType) -> Result<()> {
    if t.dtype() != want {
        return Err(Error::DType {
            op,
            expected: want.to_string(),
            found: t.dtype().to_string(),
        });
    }
    Ok(())
}

impl CudaBackend {
    // ------------------------------------------------------------------ copies

    /// A device copy of `t` (contiguous). A tensor already on this device is returned as is.
    pub fn to_device(&self, t: &Tensor) -> Result<Tensor> {
        let host = match t.storage() {
            Storage::Device(b) => {
                self.check_device("to_device", b)?;
                return Ok(t.clone());
            }
            Storage::Host(h) => h,
        };
        let esize = t.dtype().size_in_bytes();
        let owned;
        let bytes: &[u8] = if t.is_contiguous() {
            let start = t.offset() * esize;
            &host.bytes()[start..start + t.numel() * esize]
        } else {
            owned = t.to_bytes()?;
            &owned
        };
        let mut buf = self.alloc(bytes.len())?;
        // An async copy from pageable memory returns once the driver has staged the source, so
        // `bytes` (possibly a temporary) may go away after the call.
        if !bytes.is_empty() {
            self.stream()
                .memcpy_htod(bytes, buf.slice_mut())
                .map_err(|e| driver_err("copying to the device", e))?;
        }
        Ok(Tensor::from_device(buf, t.dtype(), t.shape().clone()))
    }

    /// A host copy of `t` (contiguous, same dtype). Waits for all queued work. A host tensor is
    /// returned as is.
    pub fn to_host(&self, t: &Tensor) -> Result<Tensor> {
        let buf = match t.storage() {
            Storage::Host(_) => return Ok(t.clone()),
            Storage::Device(b) => b,
        };
        self.check_device("to_host", buf)?;
        match t.dtype() {
            DType::F32 => self.to_host_typed::<f32>(t, buf),
            DType::BF16 => self.to_host_typed::<bf16>(t, buf),
            DType::F16 => self.to_host_typed::<f16>(t, buf),
        }
    }

    fn to_host_typed<T: Element + DeviceRepr>(
        &self,
        t: &Tensor,
        buf: &DeviceBuffer,
    ) -> Result<Tensor> {
        let esize = std::mem::size_of::<T>();
        let n = t.numel();
        if n == 0 {
            return Tensor::from_vec(Vec::<T>::new(), t.shape().clone());
        }
        if t.is_contiguous() {
            let v = self.copy_out::<T>(buf, t.offset() * esize, n)?;
            return Tensor::from_vec(v, t.shape().clone());
        }
        // A strided view: copy the span it covers, gather on the host.
        let last = t
            .dims()
            .iter()
            .zip(t.strides())
            .try_fold(t.offset(), |acc, (&d, &s)| {
                acc.checked_add((d - 1).checked_mul(s)?)
            })
            .ok_or_else(|| backend_err("to_host: view index overflow"))?;
        let off = t.offset();
        let all = self.copy_out::<T>(buf, off * esize, last + 1 - off)?;
        let mut out = Vec::with_capacity(n);
        let dims = t.dims();
        let strides = t.strides();
        let mut idx = vec![0usize; dims.len()];
        for _ in 0..n {
            let pos = idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
            out.push(all[pos]);
            for k in (0..dims.len()).rev() {
                idx[k] += 1;
                if idx[k] < dims[k] {
                    break;
                }
                idx[k] = 0;
            }
        }
        Tensor::from_vec(out, t.shape().clone())
    }

    /// `len` elements of `T` from byte `start` of `buf`, after all queued work.
    fn copy_out<T: Element + DeviceRepr>(
        &self,
        buf: &DeviceBuffer,
        start: usize,
        len: usize,
    ) -> Result<Vec<T>> {
        let view = buf.view::<T>(start, len).ok_or_else(|| {
            backend_err(format!(
                "to_host: {len} elements at byte {start} outside a {}-byte buffer",
                buf.len_bytes()
            ))
        })?;
        let mut v: Vec<T> = vec![bytemuck::Zeroable::zeroed(); len];
        self.stream()
            .memcpy_dtoh(&view, &mut v)
            .map_err(|e| driver_err("copying to the host", e))?;
        // The copy into pageable memory is queued on the stream; wait before reading it.
        self.synchronize()?;
        Ok(v)
    }

    /// A device tensor of `shape` and `dtype` with uninitialised contents (NaN when poisoning).
    pub fn alloc_tensor(&self, shape: impl Into<crate::Shape>, dtype: DType) -> Result<Tensor> {
        let shape = shape.into();
        let bytes = shape
            .checked_numel()
            .and_then(|n| n.checked_mul(dtype.size_in_bytes()))
            .ok_or_else(|| Error::shape("alloc_tensor", format!("{shape} is too large")))?;
        Ok(Tensor::from_device(self.alloc(bytes)?, dtype, shape))
    }

    // ------------------------------------------------------------------ launch helpers

    /// Typed view of a contiguous device input of dtype `want` on this device.
    fn input<'a, T>(
        &self,
        op: &'static str,
        t: &'a Tensor,
        want: DType,
    ) -> Result<CudaView<'a, T>> {
        check_dtype(op, t, want)?;
        let buf = device_buffer(op, t)?;
        self.check_device(op, buf)?;
        if !t.is_contiguous() {
            return Err(Error::shape(op, format!("{t:?} is not contiguous")));
        }
        let esize = want.size_in_bytes();
        buf.view::<T>(t.offset() * esize, t.numel())
            .ok_or_else(|| backend_err(format!("{op}: tensor {t:?} exceeds its device buffer")))
    }

    /// Launches a one-input, one-output element-wise kernel `y[i] = f(x[i])`, `n` as size_t.
    fn unary<I, O>(
        &self,
        kernel: &'static str,
        x: &Tensor,
        in_dt: DType,
        out_dt: DType,
    ) -> Result<Tensor> {
        let xv = self.input::<I>(kernel, x, in_dt)?;
        let n = x.numel();
        let mut out = self.alloc(n * out_dt.size_in_bytes())?;
        if n > 0 {
            let mut yv = out
                .view_mut::<O>(n)
                .ok_or_else(|| backend_err(format!("{kernel}: output view")))?;
            let f = self.function(kernel)?;
            let cfg = LaunchConfig {
                grid_dim: (self.grid_for(n, ELEMENTWISE_BLOCK), 1, 1),
                block_dim: (ELEMENTWISE_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream().launch_builder(f);
            b.arg(&xv).arg(&mut yv).arg(&n);
            // SAFETY: the kernel signature is (const I*, O*, size_t) and both views hold n elements.
            unsafe { b.launch(cfg) }.map_err(|e| driver_err(kernel, e))?;
        }
        Ok(Tensor::from_device(out, out_dt, x.shape().clone()))
    }

    // ------------------------------------------------------------------ element-wise ops

    /// Converts between f32, bf16 and f16 (round to nearest even when narrowing). Same dtype:
    /// returned as is.
    pub fn cast(&self, x: &Tensor, to: DType) -> Result<Tensor> {
        match (x.dtype(), to) {
            (a, b) if a == b => Ok(x.clone()),
            (DType::F32, DType::BF16) => {
                self.unary::<f32, bf16>("cast_f32_bf16", x, DType::F32, DType::BF16)
            }
            (DType::BF16, DType::F32) => {
                self.unary::<bf16, f32>("cast_bf16_f32", x, DType::BF16, DType::F32)
            }
            (DType::F32, DType::F16) => {
                self.unary::<f32, f16>("cast_f32_f16", x, DType::F32, DType::F16)
            }
            (DType::F16, DType::F32) => {
                self.unary::<f16, f32>("cast_f16_f32", x, DType::F16, DType::F32)
            }
            (DType::BF16, DType::F16) => {
                self.unary::<bf16, f16>("cast_bf16_f16", x, DType::BF16, DType::F16)
            }
            (DType::F16, DType::BF16) => {
                self.unary::<f16, bf16>("cast_f16_bf16", x, DType::F16, DType::BF16)
            }
            (a, b) => Err(backend_err(format!(
                "cast {a} -> {b} has no CUDA kernel yet"
            ))),
        }
    }

    /// Exact (erf) GELU of an f32 tensor.
    pub fn gelu_erf(&self, x: &Tensor) -> Result<Tensor> {
        self.unary::<f32, f32>("gelu_erf_f32", x, DType::F32, DType::F32)
    }

    /// `a + b` for two f32 tensors of the same shape.
    pub fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        const K: &str = "add_f32";
        if a.dims() != b.dims() {
            return Err(Error::shape(K, format!("{} vs {}", a.shape(), b.shape())));
        }
        let av = self.input::<f32>(K, a, DType::F32)?;
        let bv = self.input::<f32>(K, b, DType::F32)?;
        let n = a.numel();
        let mut out = self.alloc(n * 4)?;
        if n > 0 {
            let mut ov = out
                .view_mut::<f32>(n)
                .ok_or_else(|| backend_err("add_f32: output view"))?;
            let cfg = LaunchConfig {
                grid_dim: (self.grid_for(n, ELEMENTWISE_BLOCK), 1, 1),
                block_dim: (ELEMENTWISE_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut l = self.stream().launch_builder(self.function(K)?);
            l.arg(&av).arg(&bv).arg(&mut ov).arg(&n);
            // SAFETY: add_f32(const float*, const float*, float*, size_t), all n elements.
            unsafe { l.launch(cfg) }.map_err(|e| driver_err(K, e))?;
        }
        Ok(Tensor::from_device(out, DType::F32, a.shape().clone()))
    }
}
