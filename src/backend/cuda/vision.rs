//! Launchers for the vision and segmentation kernels (kernels/norm.cu, norm2d.cu,
//! ms_deform_attn.cu, pixel_shuffle.cu, region_pool.cu, rope.cu, activation.cu, resize.cu,
//! embed.cu) and the benchmark helpers (timing with CUDA events, a device copy, a spin kernel).
//!
//! Conventions, as in `ops`: inputs are device tensors on this backend, contiguous unless a
//! method says otherwise; storage is f32 or bf16 (one dtype per call: parameters such as norm
//! weights have the input's dtype), arithmetic f32; every launcher checks shapes, dtypes and the
//! limits of its kernel, allocates its output and queues the kernel on the backend's stream
//! without waiting. Sizes that reach a kernel as `int` are checked to fit.
//!
//! Kernel arguments are raw device addresses: every tensor is checked to cover its byte range of
//! its buffer first (`DeviceBuffer::view`), and all work runs on the backend's one stream, so
//! stream order is the only synchronisation needed.

use super::buffer::DeviceBuffer;
use super::context::{backend_err, driver_err, CudaBackend};
use crate::tensor::Storage;
use crate::{DType, Error, Result, Tensor};
use cudarc::driver::{sys, DevicePtr, LaunchConfig, PushKernelArg};

/// Threads per block of the element-wise and 2-D kernels.
const BLOCK: u32 = 256;

/// Longest row the register-cached row kernels take (32 values per thread, 1024 threads).
pub const MAX_ROW: usize = 32 * 1024;

/// Levels and points of the deformable attention kernel (the only values X-SAM's config allows).
pub const DEFORM_LEVELS: usize = 3;
pub const DEFORM_POINTS: usize = 4;

/// Which GELU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gelu {
    /// Exact: x/2 (1 + erf(x/sqrt 2)) (SAM, projectors).
    Erf,
    /// PyTorch's tanh approximation (SigLIP).
    Tanh,
}

/// Direction of X-SAM's pixel shuffle (architecture notes §5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shuffle {
    /// Ratio 0.5: [h, w, c] -> [ceil(h/2), ceil(w/2), 4c] (odd sizes zero-padded).
    Down,
    /// Ratio 2: [h, w, c] -> [2h, 2w, c/4].
    Up,
}

/// Memory layout of an image-like tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapLayout {
    /// `[.., H, W, C]`
    ChannelsLast,
    /// `[.., C, H, W]`
    ChannelsFirst,
}

/// Positions of the tokens given to `rope`.
#[derive(Clone, Copy, Debug)]
pub enum RopePositions<'a> {
    /// Token t is at position `start + t`.
    Offset(usize),
    /// Token t is at position `list[t]` (uploaded with the launch).
    List(&'a [u32]),
}

// ---------------------------------------------------------------------------- host helpers

/// Block size of the register-cached row kernels: one 8-element pack per thread when the row
/// allows, whole warps, at most 1024 threads; rows up to `MAX_ROW` fit (32 values per thread).
fn row_block(cols: usize) -> u32 {
    (cols.div_ceil(8).div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// `(bx, by)` with `bx * by == 256`, bx the smallest power of two >= `run` (at most 256): one
/// block covers `by` rows of `run` elements.
fn block_2d(run: usize) -> (u32, u32) {
    let bx = run.clamp(1, 256).next_power_of_two() as u32;
    (bx, BLOCK / bx)
}

fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::shape(op, format!("{what} = {v} exceeds the kernel's int range")))
}

/// Kernel name for the storage dtype.
fn pick(
    op: &'static str,
    dt: DType,
    f32_name: &'static str,
    bf16_name: &'static str,
) -> Result<&'static str> {
    match dt {
        DType::F32 => Ok(f32_name),
        DType::BF16 => Ok(bf16_name),
        other => Err(Error::DType {
            op,
            expected: "f32 or bf16".into(),
            found: other.to_string(),
        }),
    }
}

fn same_dtype(op: &'static str, want: DType, t: &Tensor) -> Result<()> {
    if t.dtype() != want {
        return Err(Error::DType {
            op,
            expected: want.to_string(),
            found: t.dtype().to_string(),
        });
    }
    Ok(())
}

fn launch_cfg(grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: smem,
    }
}

/// Checks the grid dimensions y and z (at most 65535).
fn grid_yz(op: &'static str, what: &str, v: usize) -> Result<u32> {
    if v == 0 || v > 65_535 {
        return Err(Error::shape(
            op,
            format!("{what} = {v} must be in 1..=65535"),
        ));
    }
    Ok(v as u32)
}

// ---------------------------------------------------------------------------- launchers

impl CudaBackend {
    // ------------------------------------------------------------------ argument helpers

    fn dev_buf<'a>(&self, op: &'static str, t: &'a Tensor) -> Result<&'a DeviceBuffer> {
        match t.storage() {
            Storage::Device(b) => {
                self.check_device(op, b)?;
                Ok(b)
            }
            Storage::Host(_) => Err(backend_err(format!(
                "{op}: tensor {t:?} is on the host; copy it with to_device first"
            ))),
        }
    }

    /// Device address of `len` bytes at byte `start` of `buf`, after checking the range.
    fn addr_range(
        &self,
        op: &'static str,
        buf: &DeviceBuffer,
        start: usize,
        len: usize,
    ) -> Result<u64> {
        let view = buf.view::<u8>(start, len).ok_or_else(|| {
            backend_err(format!(
                "{op}: {len} bytes at byte {start} exceed a {}-byte device buffer",
                buf.len_bytes()
            ))
        })?;
        let (ptr, _sync) = view.device_ptr(self.stream());
        Ok(ptr)
    }

    /// Address of the first element of a contiguous device tensor of dtype `want`.
    pub(super) fn addr(&self, op: &'static str, t: &Tensor, want: DType) -> Result<u64> {
        same_dtype(op, want, t)?;
        let buf = self.dev_buf(op, t)?;
        if !t.is_contiguous() {
            return Err(Error::shape(op, format!("{t:?} is not contiguous")));
        }
        let es = want.size_in_bytes();
        self.addr_range(op, buf, t.offset() * es, t.numel() * es)
    }

    fn addr_opt(&self, op: &'static str, t: Option<&Tensor>, want: DType) -> Result<u64> {
        t.map_or(Ok(0), |t| self.addr(op, t, want))
    }

    /// A `[rows, >= min_cols]` tensor whose rows may be strided (unit column stride, e.g. a
    /// column slice of a fused projection): (address, row stride in elements).
    fn addr_rows(
        &self,
        op: &'static str,
        what: &str,
        t: &Tensor,
        want: DType,
        rows: usize,
        min_cols: usize,
    ) -> Result<(u64, usize)> {
        same_dtype(op, want, t)?;
        let buf = self.dev_buf(op, t)?;
        let d = t.dims();
        if d.len() != 2 || d[0] != rows || d[1] < min_cols {
            return Err(Error::shape(
                op,
                format!(
                    "{what} has shape {}, expected [{rows}, >= {min_cols}]",
                    t.shape()
                ),
            ));
        }
        let s = t.strides();
        let stride = if rows <= 1 { d[1] } else { s[0] };
        if (d[1] > 1 && s[1] != 1) || stride < d[1] {
            return Err(Error::shape(
                op,
                format!("{what} {t:?} needs unit column stride and row stride >= its width"),
            ));
        }
        let es = want.size_in_bytes();
        let span = if rows == 0 {
            0
        } else {
            (rows - 1) * stride + d[1]
        };
        Ok((
            self.addr_range(op, buf, t.offset() * es, span * es)?,
            stride,
        ))
    }

    /// Blocks for a grid-stride loop over `rows` rows with `by` rows per block.
    fn grid_rows(&self, rows: usize, by: u32) -> u32 {
        rows.div_ceil(by as usize).clamp(1, self.sm_count() * 32) as u32
    }

    /// Address of an output buffer.
    pub(super) fn out_addr(&self, op: &'static str, buf: &DeviceBuffer) -> Result<u64> {
        self.addr_range(op, buf, 0, buf.len_bytes())
    }

    /// A device copy of `v` as int32 (for point lists, ids and positions).
    fn upload_i32(&self, op: &'static str, v: &[i32]) -> Result<DeviceBuffer> {
        let mut buf = self.alloc(std::mem::size_of_val(v))?;
        if !v.is_empty() {
            self.stream()
                .memcpy_htod(bytemuck::cast_slice::<i32, u8>(v), buf.slice_mut())
                .map_err(|e| driver_err(op, e))?;
        }
        Ok(buf)
    }

    pub(super) fn new_output(
        &self,
        shape: Vec<usize>,
        dt: DType,
    ) -> Result<(DeviceBuffer, crate::Shape)> {
        let shape = crate::Shape::new(shape);
        let bytes = shape
            .checked_numel()
            .and_then(|n| n.checked_mul(dt.size_in_bytes()))
            .ok_or_else(|| Error::shape("alloc", format!("{shape} is too large")))?;
        Ok((self.alloc(bytes)?, shape))
    }

    // ------------------------------------------------------------------ row ops

    /// (rows, cols) of a row op over the last dimension, with the row kernels' limits.
    fn row_dims(op: &'static str, x: &Tensor) -> Result<(usize, usize)> {
        let cols = *x
            .dims()
            .last()
            .ok_or_else(|| Error::shape(op, "input is a scalar; need at least one dimension"))?;
        if cols == 0 || cols > MAX_ROW {
            return Err(Error::shape(
                op,
                format!("last dim {cols} must be in 1..={MAX_ROW}"),
            ));
        }
        let rows = x.numel() / cols;
        if rows > i32::MAX as usize {
            return Err(Error::shape(
                op,
                format!("{rows} rows exceed the CUDA grid limit"),
            ));
        }
        Ok((rows, cols))
    }

    fn row_param(
        &self,
        op: &'static str,
        what: &str,
        p: Option<&Tensor>,
        cols: usize,
        dt: DType,
    ) -> Result<u64> {
        if let Some(p) = p {
            if p.dims() != [cols] {
                return Err(Error::shape(
                    op,
                    format!("{what} has shape {}, expected [{cols}]", p.shape()),
                ));
            }
        }
        self.addr_opt(op, p, dt)
    }

    /// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * w + b` (biased variance,
    /// like torch), f32 or bf16 (one rounding of the result). `weight` and `bias` are optional
    /// `[cols]` tensors of x's dtype. Rows of up to `MAX_ROW` elements.
    pub fn layer_norm(
        &self,
        x: &Tensor,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        let k = pick("layer_norm", x.dtype(), "layer_norm_f32", "layer_norm_bf16")?;
        let (rows, cols) = Self::row_dims(k, x)?;
        let dt = x.dtype();
        let xp = self.addr(k, x, dt)?;
        let wp = self.row_param(k, "weight", weight, cols, dt)?;
        let bp = self.row_param(k, "bias", bias, cols, dt)?;
        let (out, shape) = self.new_output(x.dims().to_vec(), dt)?;
        if rows > 0 {
            let yp = self.out_addr(k, &out)?;
            let cols_i = cols as i32;
            let mut l = self.stream().launch_builder(self.function(k)?);
            l.arg(&xp).arg(&wp).arg(&bp).arg(&yp).arg(&cols_i).arg(&eps);
            // SAFETY: layer_norm_T(const T* x, const T* w, const T* b, T* y, int cols, float eps);
            // x, y hold rows*cols elements, w and b cols or null; grid = rows, block = row_block.
            unsafe { l.launch(launch_cfg((rows as u32, 1, 1), (row_block(cols), 1, 1), 0)) }
                .map_err(|e| driver_err(k, e))?;
        }
        Ok(Tensor::from_device(out, dt, shape))
    }

    /// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * w` (Phi-3's: under bf16 the
    /// normalised value is rounded before the weight multiply). `weight` is optional `[cols]`.
    pub fn rms_norm(&self, x: &Tensor, weight: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        let k = pick("rms_norm", x.dtype(), "rms_norm_f32", "rms_norm_bf16")?;
        let (rows, cols) = Self::row_dims(k, x)?;
        let dt = x.dtype();
        let xp = self.addr(k, x, dt)?;
        let wp = self.row_param(k, "weight", weight, cols, dt)?;
        let (out, shape) = self.new_output(x.dims().to_vec(), dt)?;
        if rows > 0 {
            let yp = self.out_addr(k, &out)?;
            let cols_i = cols as i32;
            let mut l = self.stream().launch_builder(self.function(k)?);
            l.arg(&xp).arg(&wp).arg(&yp).arg(&cols_i).arg(&eps);
            // SAFETY: rms_norm_T(const T* x, const T* w, T* y, int cols, float eps), sizes as above.
            unsafe { l.launch(launch_cfg((rows as u32, 1, 1), (row_block(cols), 1, 1), 0)) }
                .map_err(|e| driver_err(k, e))?;
        }
        Ok(Tensor::from_device(out, dt, shape))
    }

    /// The residual add fused with the RMSNorm after it: returns `(s, y)` with `s = x + residual`
    /// (rounded to the dtype: the new residual stream) and `y = rms_norm(s) * w`.
    pub fn rms_norm_residual(
        &self,
        x: &Tensor,
        residual: &Tensor,
        weight: Option<&Tensor>,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        let k = pick(
            "rms_norm_residual",
            x.dtype(),
            "rms_norm_residual_f32",
            "rms_norm_residual_bf16",
        )?;
        let (rows, cols) = Self::row_dims(k, x)?;
        if residual.dims() != x.dims() {
            return Err(Error::shape(
                k,
                format!("residual {} vs x {}", residual.shape(), x.shape()),
            ));
        }
        let dt = x.dtype();
        let xp = self.addr(k, x, dt)?;
        let rp = self.addr(k, residual, dt)?;
        let wp = self.row_param(k, "weight", weight, cols, dt)?;
        let (sum, shape) = self.new_output(x.dims().to_vec(), dt)?;
        let (out, _) = self.new_output(x.dims().to_vec(), dt)?;
        if rows > 0 {
            let sp = self.out_addr(k, &sum)?;
            let yp = self.out_addr(k, &out)?;
            let cols_i = cols as i32;
            let mut l = self.stream().launch_builder(self.function(k)?);
            l.arg(&xp)
                .arg(&rp)
                .arg(&wp)
                .arg(&sp)
                .arg(&yp)
                .arg(&cols_i)
                .arg(&eps);
            // SAFETY: rms_norm_residual_T(const T* x, const T* r, const T* w, T* sum, T* y, int cols,
            // float eps); x, r, sum, y hold rows*cols elements, w cols or null.
            unsafe { l.launch(launch_cfg((rows as u32, 1, 1), (row_block(cols), 1, 1), 0)) }
                .map_err(|e| driver_err(k, e))?;
        }
        Ok((
            Tensor::from_device(sum, dt, shape.clone()),
            Tensor::from_device(out, dt, shape),
        ))
    }

    /// Softmax over the last dimension (f32 inside; an all -inf row gives NaN, as in torch).
    pub fn softmax_rows(&self, x: &Tensor) -> Result<Tensor> {
        let k = pick(
            "softmax_rows",
            x.dtype(),
            "softmax_rows_f32",
            "softmax_rows_bf16",
        )?;
        let (rows, cols) = Self::row_dims(k, x)?;
        let dt = x.dtype();
        let xp = self.addr(k, x, dt)?;
        let (out, shape) = self.new_output(x.dims().to_vec(), dt)?;
        if rows > 0 {
            let yp = self.out_addr(k, &out)?;
            let cols_i = cols as i32;
            let mut l = self.stream().launch_builder(self.function(k)?);
            l.arg(&xp).arg(&yp).arg(&cols_i);
            // SAFETY: softmax_rows_T(const T* x, T* y, int cols); rows*cols elements each.
            unsafe { l.launch(launch_cfg((rows as u32, 1, 1), (row_block(cols), 1, 1), 0)) }
                .map_err(|e| driver_err(k, e))?;
        }
        Ok(Tensor::from_device(out, dt, shape))
    }

    // ------------------------------------------------------------------ 2-D norms

    /// (n, C, HW) of a channels-first `[.., C, H, W]` map.
    fn nchw(op: &'static str, x: &Tensor) -> Result<(usize, usize, usize)> {
        let d = x.dims();
        if d.len() < 3 {
            return Err(Error::shape(
                op,
                format!("input {} must be [.., C, H, W]", x.shape()),
            ));
        }
        let r = d.len();
        let n = d[..r - 3].iter().product::<usize>();
        Ok((n, d[r - 3], d[r - 2] * d[r - 1]))
    }

    /// SAM's LayerNorm2d over the channels of each pixel of `x [.., C, H, W]`: f32 statistics,
    /// the normalised value rounded to x's dtype, then `w * x + b` (each rounded, as SAM's module
    /// does under bf16). eps 1e-6 in SAM.
    pub fn layer_norm_2d(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        let k = pick(
            "layer_norm_2d",
            x.dtype(),
            "layer_norm_cf_f32",
            "layer_norm_cf_bf16",
        )?;
        let (n, c, hw) = Self::nchw(k, x)?;
        let dt = x.dtype();
        let xp = self.addr(k, x, dt)?;
        let wp = self.row_param(k, "weight", Some(weight), c, dt)?;
        let bp = self.row_param(k, "bias", Some(bias), c, dt)?;
        let (out, shape) = self.new_output(x.dims().to_vec(), dt)?;
        if n * c * hw > 0 {
            let (c_i, hw_i) = (to_i32(k, "C", c)?, to_i32(k, "H*W", hw)?);
            let gy = grid_yz(k, "batch", n)?;
            let yp = self.out_addr(k, &out)?;
            let mut l = self.stream().launch_builder(self.function(k)?);
            l.arg(&xp)
                .arg(&wp)
                .arg(&bp)
                .arg(&yp)
                .arg(&c_i)
                .arg(&hw_i)
                .arg(&eps);
            // SAFETY: layer_norm_cf_T(const T* x, const T* w, const T* b, T* y, int C, int HW,
            // float eps); x, y hold n*C*HW elements, w and b C; grid (ceil(HW/32), n), block 256.
            unsafe {
                l.launch(launch_cfg(
                    (hw.div_ceil(32) as u32, gy, 1),
                    (BLOCK, 1, 1),
                    0,
                ))
            }
            .map_err(|e| driver_err(k, e))?;
        }
        Ok(Tensor::from_device(out, dt, shape))
    }

    /// GroupNorm of `x [.., C, H, W]` with `groups` groups of C/groups consecutive channels, then
    /// the per-channel affine and, when `relu`, ReLU (the FPN's GN + ReLU in one pass).
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        groups: usize,
        eps: f32,
        relu: bool,
    ) -> Result<Tensor> {
        const OP: &str = "group_norm";
        let ks = pick(
            OP,
            x.dtype(),
            "group_norm_stats_f32",
            "group_norm_stats_bf16",
        )?;
        let ka = pick(
            OP,
            x.dtype(),
            "group_norm_apply_f32",
            "group_norm_apply_bf16",
        )?;
        let (n, c, hw) = Self::nchw(OP, x)?;
        if groups == 0 || c % groups != 0 {
            return Err(Error::shape(
                OP,
                format!("{c} channels do not split into {groups} groups"),
            ));
        }
        let dt = x.dtype();
        let xp = self.addr(OP, x, dt)?;
        let wp = self.row_param(OP, "weight", Some(weight), c, dt)?;
        let bp = self.row_param(OP, "bias", Some(bias), c, dt)?;
        let (out, shape) = self.new_output(x.dims().to_vec(), dt)?;
        let gs = c / groups * hw;
        if n * gs > 0 {
            const CHUNK: usize = 4096; // GN_CHUNK in norm2d.cu
            let splits = gs.div_ceil(CHUNK);
            let gy = grid_yz(OP, "batch * groups", n * groups)?;
            let splits_u =
                u32::try_from(splits).map_err(|_| Error::shape(OP, "group too large"))?;
            let (c_i, hw_i, g_i) = (
                to_i32(OP, "C", c)?,
                to_i32(OP, "H*W", hw)?,
                to_i32(OP, "groups", groups)?,
            );
            let part = self.alloc(n * groups * splits * 3 * 4)?;
            let pp = self.out_addr(OP, &part)?;
            let yp = self.out_addr(OP, &out)?;
            let relu_i = i32::from(relu);
            let cfg = launch_cfg((splits_u, gy, 1), (BLOCK, 1, 1), 0);
            let mut l = self.stream().launch_builder(self.function(ks)?);
            l.arg(&xp).arg(&pp).arg(&c_i).arg(&hw_i).arg(&g_i);
            // SAFETY: group_norm_stats_T(const T* x, float* part, int C, int HW, int G); x holds
            // n*C*HW elements, part n*G*splits*3 floats; grid (splits, n*G), block 256.
            unsafe { l.launch(cfg) }.map_err(|e| driver_err(ks, e))?;
            let mut l = self.stream().launch_builder(self.function(ka)?);
            l.arg(&xp)
                .arg(&pp)
                .arg(&wp)
                .arg(&bp)
                .arg(&yp)
                .arg(&c_i)
                .arg(&hw_i)
                .arg(&g_i)
                .arg(&eps)
                .arg(&relu_i);
            // SAFETY: group_norm_apply_T(const T* x, const float* part, const T* w, const T* b,
            // T* y, int C, int HW, int G, float eps, int relu); same grid; `part` lives until the
            // end of this function and its free is stream-ordered after the kernel.
            unsafe { l.launch(cfg) }.map_err(|e| driver_err(ka, e))?;
        }
        Ok(Tensor::from_device(out, dt, shape))
    }

    // ------------------------------------------------------------------ element-wise

    fn map_unary(&self, k: &'static str, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let xp = self.addr(k, x, dt)?;
        let n = x.numel();
        let (out, shape) = self.new_output(x.dims().to_vec(), dt)?;
        if n > 0 {
            let yp = self.out_addr(k, &out)?;
            let mut l = self.stream().launch_builder(self.function(k)?);
            l.arg(&xp).arg(&yp).arg(&n);
            // SAFETY: k(const T* x, T* y, size_t n), both n elements; any grid.
            unsafe {
                l.launch(launch_cfg(
                    (self.grid_for(n.div_ceil(8), BLOCK), 1, 1),
                    (BLOCK, 1, 1),
                    0,
                ))
            }
            .map_err(|e| driver_err(k, e))?;
        }
        Ok(Tensor::from_device(out, dt, shape))
    }

    /// GELU of an f32 or bf16 tensor (computed in f32, one rounding).
    pub fn gelu(&self, x: &Tensor, kind: Gelu) -> Result<Tensor> {
        let k = match kind {
            Gelu::Erf => pick("gelu", x.dtype(), "gelu_erf_f32", "gelu_erf_bf16")?,
            Gelu::Tanh => pick("gelu", x.dtype(), "gelu_tanh_f32", "gelu_tanh_bf16")?,
        };
        if k == "gelu_erf_f32" {
            // elementwise.cu's scalar kernel, launched by `ops`.
            return self.gelu_erf(x);
        }
        self.map_unary(k, x)
    }

    /// Phi-3's MLP gate: `gate_up [.., 2I]` (gate | up) -> `[.., I]`, `silu(gate) * up` (under bf16
    /// the activation is rounded before the product, as HF computes it).
    pub fn silu_gate(&self, gate_up: &Tensor) -> Result<Tensor> {
        let k = pick(
            "silu_gate",
            gate_up.dtype(),
            "silu_gate_f32",
            "silu_gate_bf16",
        )?;
        let d = gate_up.dims();
        let last = *d
            .last()
            .ok_or_else(|| Error::shape(k, "input is a scalar"))?;
        if last % 2 != 0 {
            return Err(Error::shape(
                k,
                format!("last dim {last} is odd; expected [.., 2I]"),
            ));
        }
        let inter = last / 2;
        let rows = gate_up.numel().checked_div(last).unwrap_or(0);
        let dt = gate_up.dtype();
        let xp = self.addr(k, gate_up, dt)?;
        let mut od = d.to_vec();
        if let Some(l) = od.last_mut() {
            *l = inter;
        }
        let (out, shape) = self.new_output(od, dt)?;
        if rows * inter > 0 {
            let inter_i = to_i32(k, "I", inter)?;
            let yp = self.out_addr(k, &out)?;
            let mut l = self.stream().launch_builder(self.function(k)?);
            l.arg(&xp).arg(&yp).arg(&rows).arg(&inter_i);
            // SAFETY: silu_gate_T(const T* gu, T* y, size_t rows, int inter); gu holds rows*2I,
            // y rows*I elements; any grid.
            unsafe {
                l.launch(launch_cfg(
                    (self.grid_for((rows * inter).div_ceil(8), BLOCK), 1, 1),
                    (BLOCK, 1, 1),
                    0,
                ))
            }
            .map_err(|e| driver_err(k, e))?;
        }
        Ok(Tensor::from_device(out, dt, shape))
    }

    // ------------------------------------------------------------------ RoPE

    /// The RoPE frequency table `inv_freq[i] = 1 / theta^(2i / head_dim)` (f32 `[head_dim / 2]`),
    /// computed on the host with the CPU backend's f32 formula (as transformers computes it) and
    /// uploaded: make it once per model and pass it to every `rope` call.
    pub fn rope_inv_freq(&self, head_dim: usize, theta: f32) -> Result<Tensor> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::shape(
                "rope_inv_freq",
                format!("head_dim {head_dim} must be even and positive"),
            ));
        }
        let f: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let n = f.len();
        self.to_device(&Tensor::from_f32(f, [n])?)
    }

    /// Rotate-half RoPE (Llama / Phi-3) on `x [T, heads * head_dim]` (or `[T, heads, head_dim]`);
    /// returns a new tensor of the same shape. `inv_freq` from `rope_inv_freq`; the angle
    /// `pos * inv_freq[i]` is rounded to f32 and its cos/sin are taken in f64, as the CPU backend
    /// does; under bf16 cos/sin, the products and the sum are rounded as in HF's
    /// `q * cos + rotate_half(q) * sin`.
    pub fn rope(
        &self,
        x: &Tensor,
        heads: usize,
        head_dim: usize,
        inv_freq: &Tensor,
        positions: RopePositions<'_>,
    ) -> Result<Tensor> {
        let k = pick("rope", x.dtype(), "rope_f32", "rope_bf16")?;
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::shape(
                k,
                format!("head_dim {head_dim} must be even and positive"),
            ));
        }
        if inv_freq.dims() != [head_dim / 2] {
            return Err(Error::shape(
                k,
                format!(
                    "inv_freq {} must be [{}] (see rope_inv_freq)",
                    inv_freq.shape(),
                    head_dim / 2
                ),
            ));
        }
        let fp = self.addr(k, inv_freq, DType::F32)?;
        let per_token = heads * head_dim;
        let tokens = x.dims().first().copied().unwrap_or(0);
        if x.numel() != tokens * per_token || x.dims().len() < 2 {
            return Err(Error::shape(
                k,
                format!("{} is not [T, {heads} * {head_dim}]", x.shape()),
            ));
        }
        let dt = x.dtype();
        let xp = self.addr(k, x, dt)?;
        let (out, shape) = self.new_output(x.dims().to_vec(), dt)?;
        // The uploaded positions must outlive the launch; stream-ordered free makes that hold.
        let (pos_buf, offset) = match positions {
            RopePositions::Offset(o) => {
                // The last position must fit the kernel's int as well.
                to_i32(
                    k,
                    "last position",
                    o.saturating_add(tokens.saturating_sub(1)),
                )?;
                (None, o as i32)
            }
            RopePositions::List(list) => {
                if list.len() != tokens {
                    return Err(Error::shape(
                        k,
                        format!("{} positions for {tokens} tokens", list.len()),
                    ));
                }
                let v: Vec<i32> = list
                    .iter()
                    .map(|&p| {
                        i32::try_from(p)
                            .map_err(|_| Error::shape(k, format!("position {p} too large")))
                    })
                    .collect::<Result<_>>()?;
                (Some(self.upload_i32(k, &v)?), 0)
            }
        };
        if tokens > 0 && heads > 0 {
            let half = head_dim / 2;
            let pp = match &pos_buf {
                Some(b) => self.out_addr(k, b)?,
                None => 0u64,
            };
            let yp = self.out_addr(k, &out)?;
            let (h_i, hd_i) = (to_i32(k, "heads", heads)?, to_i32(k, "head_dim", head_dim)?);
            let t_u = u32::try_from(tokens).map_err(|_| Error::shape(k, "too many tokens"))?;
            let gy = grid_yz(k, "head_dim/64", half.div_ceil(32))?;
            let mut l = self.stream().launch_builder(self.function(k)?);
            l.arg(&xp)
                .arg(&yp)
                .arg(&fp)
                .arg(&pp)
                .arg(&offset)
                .arg(&h_i)
                .arg(&hd_i);
            // SAFETY: rope_T(const T* x, T* y, const float* inv_freq, const int* positions,
            // int pos_offset, int heads, int hd); x, y hold T*heads*hd elements, inv_freq hd/2
            // floats, positions T ints or null; grid (T, ceil(hd/2/32)), block (32, 8).
            unsafe { l.launch(launch_cfg((t_u, gy, 1), (32, 8, 1), 0)) }
                .map_err(|e| driver_err(k, e))?;
        }
        Ok(Tensor::from_device(out, dt, shape))
    }

    // ------------------------------------------------------------------ resize

    /// torch `interpolate(mode='bilinear', antialias=False)` of `x [.., H, W]` (every leading
    /// index is one plane) to `[.., out_h, out_w]`. f32 results equal the CPU backend's bit for bit.
    pub fn resize_bilinear(
        &self,
        x: &Tensor,
        out_h: usize,
        out_w: usize,
        align_corners: bool,
    ) -> Result<Tensor> {
        let k = pick(
            "resize_bilinear",
            x.dtype(),
            "resize_bilinear_f32",
            "resize_bilinear_bf16",
        )?;
        let d = x.dims();
        if d.len() < 2 {
            return Err(Error::shape(
                k,
                format!("input {} must be [.., H, W]", x.shape()),
            ));
        }
        let (h, w) = (d[d.len() - 2], d[d.len() - 1]);
        let planes = d[..d.len() - 2].iter().product::<usize>();
        let dt = x.dtype();
        let xp = self.addr(k, x, dt)?;
        let mut od = d.to_vec();
        let r = od.len();
        od[r - 2] = out_h;
        od[r - 1] = out_w;
        let (out, shape) = self.new_output(od, dt)?;
        if planes * out_h * out_w > 0 {
            if h == 0 || w == 0 {
                return Err(Error::shape(
                    k,
                    "cannot resize an empty map to a non-empty one",
                ));
            }
            let (h_i, w_i) = (to_i32(k, "h", h)?, to_i32(k, "w", w)?);
            let (oh_i, ow_i) = (to_i32(k, "out_h", out_h)?, to_i32(k, "out_w", out_w)?);
            let ac = i32::from(align_corners);
            let (bx, by) = block_2d(out_w);
            let grid = self.grid_rows(planes * out_h, by);
            let yp = self.out_addr(k, &out)?;
            let mut l = self.stream().launch_builder(self.function(k)?);
            l.arg(&xp)
                .arg(&yp)
                .arg(&planes)
                .arg(&h_i)
                .arg(&w_i)
                .arg(&oh_i)
                .arg(&ow_i)
                .arg(&ac);
            // SAFETY: resize_bilinear_T(const T* x, T* y, size_t planes, int h, int w, int oh,
            // int ow, int align_corners); x planes*h*w, y planes*oh*ow elements; grid-stride rows.
            unsafe { l.launch(launch_cfg((grid, 1, 1), (bx, by, 1), 0)) }
                .map_err(|e| driver_err(k, e))?;
        }
        Ok(Tensor::from_device(out, dt, shape))
    }

    /// X-SAM's final mask resize in one pass: `logits [Q, h, w]` bilinearly upsampled to
    /// `pad x pad` (align_corners=False), cropped to the SAM scaled size `scaled = (newh, neww)`,
    /// resized bilinearly to the image size `out = (H0, W0)` -> `[Q, H0, W0]`. Equal to the
    /// two-step torch computation (the intermediate is rounded to the dtype as torch stores it).
    pub fn mask_postprocess(
        &self,
        logits: &Tensor,
        pad: usize,
        scaled: (usize, usize),
        out: (usize, usize),
    ) -> Result<Tensor> {
        let k = pick(
            "mask_postprocess",
            logits.dtype(),
            "mask_postprocess_f32",
            "mask_postprocess_bf16",
        )?;
        let d = logits.dims();
        if d.len() != 3 {
            return Err(Error::shape(
                k,
                format!("logits {} must be [Q, h, w]", logits.shape()),
            ));
        }
        let (q, h, w) = (d[0], d[1], d[2]);
        let (newh, neww) = scaled;
        let (oh, ow) = out;
        if newh == 0 || neww == 0 || newh > pad || neww > pad || h == 0 || w == 0 {
            return Err(Error::shape(k, format!(
                "scaled size {newh}x{neww} must be non-empty and within the {pad}x{pad} canvas, logits non-empty"
            )));
        }
        let dt = logits.dtype();
        let xp = self.addr(k, logits, dt)?;
        let (buf, shape) = self.new_output(vec![q, oh, ow], dt)?;
        if q * oh * ow > 0 {
            let vals = [q, h, w, pad, newh, neww, oh, ow]
                .iter()
                .map(|&v| to_i32(k, "size", v))
                .collect::<Result<Vec<i32>>>()?;
            let (bx, by) = block_2d(ow);
            let grid = self.grid_rows(q * oh, by);
            let yp = self.out_addr(k, &buf)?;
            let mut l = self.stream().launch_builder(self.function(k)?);
            l.arg(&xp).arg(&yp);
            for v in &vals {
                l.arg(v);
            }
            // SAFETY: mask_postprocess_T(const T* x, T* y, int q, int h, int w, int S, int newh,
            // int neww, int H0, int W0); x q*h*w, y q*H0*W0 elements; grid-stride rows.
            unsafe { l.launch(launch_cfg((grid, 1, 1), (bx, by, 1), 0)) }
                .map_err(|e| driver_err(k, e))?;
        }
        Ok(Tensor::from_device(buf, dt, shape))
    }

    // ------------------------------------------------------------------ pixel shuffle

    /// X-SAM's pixel shuffle (architecture notes §5.1) of `x` in `layout`
    /// (`[.., H, W, C]` or `[.., C, H, W]`). Down: `[.., ceil(H/2), ceil(W/2), 4C]` (odd sizes
    /// zero-padded); Up (C % 4 == 0): `[.., 2H, 2W, C/4]` (channels-first: `[.., 4C, ..]` /
    /// `[.., C/4, 2H, 2W]`). Bit-exact data movement.
    pub fn pixel_shuffle(&self, x: &Tensor, dir: Shuffle, layout: MapLayout) -> Result<Tensor> {
        let (kf, kb) = match (dir, layout) {
            (Shuffle::Down, MapLayout::ChannelsLast) => {
                ("pixel_shuffle_down_cl_f32", "pixel_shuffle_down_cl_bf16")
            }
            (Shuffle::Up, MapLayout::ChannelsLast) => {
                ("pixel_shuffle_up_cl_f32", "pixel_shuffle_up_cl_bf16")
            }
            (Shuffle::Down, MapLayout::ChannelsFirst) => {
                ("pixel_shuffle_down_cf_f32", "pixel_shuffle_down_cf_bf16")
            }
            (Shuffle::Up, MapLayout::ChannelsFirst) => {
                ("pixel_shuffle_up_cf_f32", "pixel_shuffle_up_cf_bf16")
            }
        };
        let k = pick("pixel_shuffle", x.dtype(), kf, kb)?;
        let d = x.dims();
        if d.len() < 3 {
            return Err(Error::shape(
                k,
                format!("input {} needs rank >= 3", x.shape()),
            ));
        }
        let r = d.len();
        let n = d[..r - 3].iter().product::<usize>();
        let (h, w, c) = match layout {
            MapLayout::ChannelsLast => (d[r - 3], d[r - 2], d[r - 1]),
            MapLayout::ChannelsFirst => (d[r - 2], d[r - 1], d[r - 3]),
        };
        if dir == Shuffle::Up && c % 4 != 0 {
            return Err(Error::shape(
                k,
                format!("{c} channels are not divisible by 4"),
            ));
        }
        let (oh, ow, oc) = match dir {
            Shuffle::Down => (h.div_ceil(2), w.div_ceil(2), 4 * c),
            Shuffle::Up => (2 * h, 2 * w, c / 4),
        };
        let mut od = d[..r - 3].to_vec();
        match layout {
            MapLayout::ChannelsLast => od.extend([oh, ow, oc]),
            MapLayout::ChannelsFirst => od.extend([oc, oh, ow]),
        }
        let dt = x.dtype();
        let es = dt.size_in_bytes();
        let xp = self.addr(k, x, dt)?;
        let (out, shape) = self.new_output(od, dt)?;
        if n * h * w * c > 0 {
            let yp = self.out_addr(k, &out)?;
            // Rows and their contiguous runs, as the kernel walks them (see pixel_shuffle.cu).
            let (rows, run) = match (layout, dir) {
                (MapLayout::ChannelsLast, _) => {
                    let run_elems = if dir == Shuffle::Down { c } else { c / 4 };
                    let vec = (run_elems * es).is_multiple_of(16) && xp % 16 == 0 && yp % 16 == 0;
                    let rows = if dir == Shuffle::Down {
                        n * oh * ow * 4
                    } else {
                        n * oh * ow
                    };
                    (rows, if vec { run_elems * es / 16 } else { run_elems })
                }
                (MapLayout::ChannelsFirst, Shuffle::Down) => (n * c * 2 * oh, ow),
                (MapLayout::ChannelsFirst, Shuffle::Up) => (n * (c / 4) * 2 * h, w),
            };
            let (bx, by) = block_2d(run);
            let grid = self.grid_rows(rows, by);
            let ints = match layout {
                MapLayout::ChannelsLast => [n, h, w, c],
                MapLayout::ChannelsFirst => [n, c, h, w],
            }
            .iter()
            .map(|&v| to_i32(k, "size", v))
            .collect::<Result<Vec<i32>>>()?;
            let mut l = self.stream().launch_builder(self.function(k)?);
            l.arg(&xp).arg(&yp);
            for v in &ints {
                l.arg(v);
            }
            // SAFETY: pixel_shuffle_*_T(const T* x, T* y, int, int, int, int) with the sizes in
            // the kernel's order; x and y hold the element counts of their shapes; grid-stride.
            unsafe { l.launch(launch_cfg((grid, 1, 1), (bx, by, 1), 0)) }
                .map_err(|e| driver_err(k, e))?;
        }
        Ok(Tensor::from_device(out, dt, shape))
    }

    // ------------------------------------------------------------------ deformable attention

    /// Multi-scale deformable attention (3 levels x 4 points), fused with the softmax over each
    /// head's 12 attention logits.
    ///
    /// - `value [S, heads*hd]`: the level maps flattened row-major and concatenated, level 0
    ///   first; `levels` their (H, W), S = sum of H*W.
    /// - `offsets [Q, >= heads*24]`: per row `[heads, 3, 4, (x, y)]` raw sampling offsets (in
    ///   pixels of each level); rows may be strided (a column slice of a fused projection).
    /// - `logits [Q, >= heads*12]`: per row `[heads, 12]`, strided rows allowed.
    /// - `ref_points`: optional f32 `[Q, 2]` normalised (x, y). `None` means the queries are the
    ///   S pixels themselves (the pixel decoder's encoder), with reference points at the pixel
    ///   centres ((j + 0.5)/W, (i + 0.5)/H).
    ///
    /// Returns `[Q, heads*hd]` in value's dtype (offsets and logits must share it).
    pub fn ms_deform_attn(
        &self,
        value: &Tensor,
        levels: [(usize, usize); DEFORM_LEVELS],
        heads: usize,
        offsets: &Tensor,
        logits: &Tensor,
        ref_points: Option<&Tensor>,
    ) -> Result<Tensor> {
        let k = pick(
            "ms_deform_attn",
            value.dtype(),
            "ms_deform_attn_f32",
            "ms_deform_attn_bf16",
        )?;
        let dt = value.dtype();
        let vd = value.dims();
        let s: usize = levels.iter().map(|&(h, w)| h * w).sum();
        if vd.len() != 2 || vd[0] != s || heads == 0 || !vd[1].is_multiple_of(heads) || vd[1] == 0 {
            return Err(Error::shape(
                k,
                format!(
                "value {} must be [{s} (sum of level H*W), heads * head_dim] with {heads} heads",
                value.shape()
            ),
            ));
        }
        if levels.iter().any(|&(h, w)| h == 0 || w == 0) {
            return Err(Error::shape(k, format!("empty level in {levels:?}")));
        }
        let c = vd[1];
        let hd = c / heads;
        let q = offsets.dims().first().copied().unwrap_or(0);
        if ref_points.is_none() && q != s {
            return Err(Error::shape(
                k,
                format!("{q} queries without reference points; expected one per pixel ({s})"),
            ));
        }
        let samples = DEFORM_LEVELS * DEFORM_POINTS;
        let vp = self.addr(k, value, dt)?;
        let (op, ostride) = self.addr_rows(k, "offsets", offsets, dt, q, heads * samples * 2)?;
        let (lp, lstride) = self.addr_rows(k, "logits", logits, dt, q, heads * samples)?;
        let rp = match ref_points {
            Some(r) => {
                if r.dims() != [q, 2] {
                    return Err(Error::shape(
                        k,
                        format!("ref_points {} must be [{q}, 2]", r.shape()),
                    ));
                }
                self.addr(k, r, DType::F32)?
            }
            None => 0,
        };
        let (out, shape) = self.new_output(vec![q, c], dt)?;
        if q > 0 {
            let yp = self.out_addr(k, &out)?;
            let group = hd.next_power_of_two().min(32);
            let block = (64 * group).min(256);
            let gpb = block / group;
            let grid = u32::try_from((q * heads).div_ceil(gpb))
                .map_err(|_| Error::shape(k, "too many queries"))?;
            let smem = (gpb * samples * 4 * 8) as u32; // sizeof(Corner) = 384
            let mut ints = vec![
                to_i32(k, "offset row stride", ostride)?,
                to_i32(k, "logit row stride", lstride)?,
            ];
            ints.extend(
                [q, heads, hd]
                    .iter()
                    .map(|&v| to_i32(k, "size", v))
                    .collect::<Result<Vec<_>>>()?,
            );
            for &(h, w) in &levels {
                ints.push(to_i32(k, "level size", h)?);
                ints.push(to_i32(k, "level size", w)?);
            }
            to_i32(k, "value rows", s)?; // flat row indices are ints in the kernel
            let group_i = group as i32;
            let mut l = self.stream().launch_builder(self.function(k)?);
            l.arg(&vp)
                .arg(&op)
                .arg(&ints[0])
                .arg(&lp)
                .arg(&ints[1])
                .arg(&rp)
                .arg(&yp);
            for v in &ints[2..] {
                l.arg(v);
            }
            l.arg(&group_i);
            // SAFETY: ms_deform_attn_T(const T* value, const T* offsets, int off_stride,
            // const T* logits, int logit_stride, const float* ref, T* out, int Q, int heads,
            // int hd, int h0, int w0, int h1, int w1, int h2, int w2, int group); every range was
            // checked above; block = (block/group) groups, dynamic smem 384 B per group.
            unsafe { l.launch(launch_cfg((grid, 1, 1), (block as u32, 1, 1), smem)) }
                .map_err(|e| driver_err(k, e))?;
        }
        Ok(Tensor::from_device(out, dt, shape))
    }

    // ------------------------------------------------------------------ region pooling

    /// X-SAM's region sampler (architecture notes §7): for each prompt, bilinear samples
    /// (align_corners=True, zero padding) of the token map `tokens [gh*gw, D]` (or `[gh, gw, D]`)
    /// at its `num_points` points (`[row, col]` in a `mask_size = (mask_h, mask_w)` mask, divided
    /// by the mask size), max-pooled per channel -> `[R, D]` with R = points.len() / num_points.
    /// The points are `(row, col)`, `num_points` per prompt, as
    /// `xsam::model::region::region_points` makes them (interfaces.md §2, on the host: the prompt
    /// mask is made there by preprocessing, and uploading 2 x num_points ints beats uploading a
    /// megapixel mask and compacting it on the device).
    pub fn region_pool(
        &self,
        tokens: &Tensor,
        grid: (usize, usize),
        points: &[(usize, usize)],
        num_points: usize,
        mask_size: (usize, usize),
    ) -> Result<Tensor> {
        let k = pick(
            "region_pool",
            tokens.dtype(),
            "region_pool_f32",
            "region_pool_bf16",
        )?;
        let (gh, gw) = grid;
        let (mh, mw) = mask_size;
        let d = *tokens.dims().last().unwrap_or(&0);
        if gh == 0 || gw == 0 || tokens.numel() != gh * gw * d || d == 0 {
            return Err(Error::shape(
                k,
                format!(
                    "tokens {} are not a {gh} x {gw} map of D channels",
                    tokens.shape()
                ),
            ));
        }
        if num_points == 0 || !points.len().is_multiple_of(num_points) || points.is_empty() {
            return Err(Error::shape(
                k,
                format!("{} points are not prompts of {num_points}", points.len()),
            ));
        }
        if let Some(p) = points.iter().find(|p| p.0 >= mh || p.1 >= mw) {
            return Err(Error::shape(
                k,
                format!("point {p:?} is outside the {mh} x {mw} mask"),
            ));
        }
        let r = points.len() / num_points;
        let dt = tokens.dtype();
        let tp = self.addr(k, tokens, dt)?;
        // < mask size, which fits an int (checked below with the other sizes)
        let flat: Vec<i32> = points
            .iter()
            .flat_map(|p| [p.0 as i32, p.1 as i32])
            .collect();
        let pts = self.upload_i32(k, &flat)?;
        let (out, shape) = self.new_output(vec![r, d], dt)?;
        let ints = [gh, gw, d, num_points, mh, mw]
            .iter()
            .map(|&v| to_i32(k, "size", v))
            .collect::<Result<Vec<i32>>>()?;
        let gy = grid_yz(k, "prompts", r)?;
        let pp = self.out_addr(k, &pts)?;
        let yp = self.out_addr(k, &out)?;
        let mut l = self.stream().launch_builder(self.function(k)?);
        l.arg(&tp).arg(&pp).arg(&yp);
        for v in &ints {
            l.arg(v);
        }
        // SAFETY: region_pool_T(const T* feat, const int* points, T* out, int gh, int gw, int D,
        // int P, int mask_h, int mask_w); feat gh*gw*D, points R*P*2 ints (all inside the mask),
        // out R*D; grid (ceil(D/32), R), block 256.
        unsafe { l.launch(launch_cfg((d.div_ceil(32) as u32, gy, 1), (BLOCK, 1, 1), 0)) }
            .map_err(|e| driver_err(k, e))?;
        Ok(Tensor::from_device(out, dt, shape))
    }

    // ------------------------------------------------------------------ embeddings

    /// Rows `ids` of `table [rows, cols]` (bf16 or f32) as `[ids.len(), cols]` in `out_dtype`
    /// (bf16 -> f32 / bf16, f32 -> f32). An id out of range is an error.
    pub fn gather_rows(&self, table: &Tensor, ids: &[u32], out_dtype: DType) -> Result<Tensor> {
        const OP: &str = "gather_rows";
        let k = match (table.dtype(), out_dtype) {
            (DType::BF16, DType::F32) => "gather_rows_bf16_f32",
            (DType::BF16, DType::BF16) => "gather_rows_bf16_bf16",
            (DType::F32, DType::F32) => "gather_rows_f32_f32",
            (a, b) => {
                return Err(backend_err(format!(
                    "{OP}: {a} table -> {b} rows has no kernel"
                )))
            }
        };
        let td = table.dims();
        if td.len() != 2 {
            return Err(Error::shape(
                OP,
                format!("table {} must be [rows, cols]", table.shape()),
            ));
        }
        let (rows, cols) = (td[0], td[1]);
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= rows) {
            return Err(Error::shape(
                OP,
                format!("id {bad} is out of range for a table of {rows} rows"),
            ));
        }
        let tp = self.addr(OP, table, table.dtype())?;
        let (out, shape) = self.new_output(vec![ids.len(), cols], out_dtype)?;
        if !ids.is_empty() && cols > 0 {
            let v: Vec<i32> = ids.iter().map(|&i| i as i32).collect(); // < rows <= i32 range below
            let (n_i, c_i, r_i) = (
                to_i32(OP, "ids", ids.len())?,
                to_i32(OP, "cols", cols)?,
                to_i32(OP, "rows", rows)?,
            );
            let ib = self.upload_i32(OP, &v)?;
            let ip = self.out_addr(OP, &ib)?;
            let yp = self.out_addr(OP, &out)?;
            let grid = ids.len().min(self.sm_count() * 16) as u32;
            let mut l = self.stream().launch_builder(self.function(k)?);
            l.arg(&tp).arg(&ip).arg(&yp).arg(&n_i).arg(&c_i).arg(&r_i);
            // SAFETY: gather_rows_I_O(const I* table, const int* ids, O* out, int n, int cols,
            // int rows); ids validated < rows; out n*cols; grid-stride over ids.
            unsafe { l.launch(launch_cfg((grid, 1, 1), (BLOCK, 1, 1), 0)) }
                .map_err(|e| driver_err(k, e))?;
        }
        Ok(Tensor::from_device(out, out_dtype, shape))
    }

    /// Mask2Former's sine position embedding (normalize=True, scale 2 pi) of an `h x w` map with
    /// `num_pos_feats` features per axis (row half first): `[2F, h, w]` (channels-first) or
    /// `[h*w, 2F]` (channels-last), in `dtype`. `add` (optional `[2F]`, e.g. a level embedding) is
    /// added to every position.
    #[allow(clippy::too_many_arguments)]
    pub fn sine_position_embedding(
        &self,
        h: usize,
        w: usize,
        num_pos_feats: usize,
        temperature: f32,
        dtype: DType,
        layout: MapLayout,
        add: Option<&Tensor>,
    ) -> Result<Tensor> {
        let k = pick(
            "sine_position_embedding",
            dtype,
            "pos_embed_sine_f32",
            "pos_embed_sine_bf16",
        )?;
        let c = 2 * num_pos_feats;
        let ap = match add {
            Some(a) => {
                if a.dims() != [c] {
                    return Err(Error::shape(k, format!("add {} must be [{c}]", a.shape())));
                }
                self.addr(k, a, dtype)?
            }
            None => 0,
        };
        let dims = match layout {
            MapLayout::ChannelsFirst => vec![c, h, w],
            MapLayout::ChannelsLast => vec![h * w, c],
        };
        let (out, shape) = self.new_output(dims, dtype)?;
        let n = c * h * w;
        if n > 0 {
            let (h_i, w_i, f_i) = (
                to_i32(k, "h", h)?,
                to_i32(k, "w", w)?,
                to_i32(k, "num_pos_feats", num_pos_feats)?,
            );
            let scale = 2.0 * std::f32::consts::PI;
            let cl = i32::from(layout == MapLayout::ChannelsLast);
            let yp = self.out_addr(k, &out)?;
            let mut l = self.stream().launch_builder(self.function(k)?);
            l.arg(&yp)
                .arg(&ap)
                .arg(&h_i)
                .arg(&w_i)
                .arg(&f_i)
                .arg(&temperature)
                .arg(&scale)
                .arg(&cl);
            // SAFETY: pos_embed_sine_T(T* out, const T* add, int h, int w, int F, float temperature,
            // float scale, int channels_last); out holds 2F*h*w elements, add 2F or null.
            unsafe {
                l.launch(launch_cfg(
                    (self.grid_for(n, BLOCK), 1, 1),
                    (BLOCK, 1, 1),
                    0,
                ))
            }
            .map_err(|e| driver_err(k, e))?;
        }
        Ok(Tensor::from_device(out, dtype, shape))
    }

    // ------------------------------------------------------------------ benchmark support

    /// Queues a kernel that keeps the GPU busy for `duration` (one thread). Queue it before a
    /// batch of launches so the host can enqueue them while the GPU waits, then time the batch
    /// with `time_queued`: the measurement is then the kernels back to back, not the host's
    /// launch rate.
    pub fn spin(&self, duration: std::time::Duration) -> Result<()> {
        const K: &str = "bench_spin";
        let ns = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        let mut l = self.stream().launch_builder(self.function(K)?);
        l.arg(&ns);
        // SAFETY: bench_spin(unsigned long long ns); grid 1, block 1.
        unsafe { l.launch(launch_cfg((1, 1, 1), (1, 1, 1), 0)) }.map_err(|e| driver_err(K, e))?;
        Ok(())
    }

    /// Milliseconds of GPU time between CUDA events recorded before and after the work `f`
    /// queues on this backend's stream. Waits for the end event.
    pub fn time_queued(&self, f: impl FnOnce() -> Result<()>) -> Result<f32> {
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self
            .stream()
            .record_event(flags)
            .map_err(|e| driver_err("cuEventRecord", e))?;
        f()?;
        let end = self
            .stream()
            .record_event(flags)
            .map_err(|e| driver_err("cuEventRecord", e))?;
        start
            .elapsed_ms(&end)
            .map_err(|e| driver_err("cuEventElapsedTime", e))
    }

    /// Lets the device's stream-ordered memory pool keep up to `bytes` of freed memory instead of
    /// returning it to the driver at every synchronisation (CUDA's default threshold is 0), so
    /// that allocations in a repeated workload (a benchmark loop, a forward pass) are pool hits.
    pub fn set_pool_release_threshold(&self, bytes: u64) -> Result<()> {
        const OP: &str = "set_pool_release_threshold";
        let ctx = self.stream().context();
        ctx.bind_to_thread().map_err(|e| driver_err(OP, e))?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: out-parameter call on a valid device of the bound context.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
            .result()
            .map_err(|e| driver_err("cuDeviceGetDefaultMemPool", e))?;
        let mut v: u64 = bytes;
        // SAFETY: RELEASE_THRESHOLD takes a pointer to a cuuint64_t, which `v` is.
        unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut v as *mut u64).cast(),
            )
        }
        .result()
        .map_err(|e| driver_err("cuMemPoolSetAttribute", e))
    }

    /// A device-to-device copy of a contiguous device tensor (the bandwidth ceiling in benches).
    pub fn copy_device(&self, t: &Tensor) -> Result<Tensor> {
        const OP: &str = "copy_device";
        let buf = self.dev_buf(OP, t)?;
        if !t.is_contiguous() {
            return Err(Error::shape(OP, format!("{t:?} is not contiguous")));
        }
        let es = t.dtype().size_in_bytes();
        let bytes = t.numel() * es;
        let mut out = self.alloc(bytes)?;
        if bytes > 0 {
            let src = buf
                .view::<u8>(t.offset() * es, bytes)
                .ok_or_else(|| backend_err(format!("{OP}: tensor exceeds its buffer")))?;
            self.stream()
                .memcpy_dtod(&src, out.slice_mut())
                .map_err(|e| driver_err(OP, e))?;
        }
        Ok(Tensor::from_device(out, t.dtype(), t.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_blocks_cover_the_row() {
        for cols in 1..=MAX_ROW {
            let b = row_block(cols) as usize;
            assert!(
                b.is_multiple_of(32) && (32..=1024).contains(&b),
                "cols {cols}: block {b}"
            );
            assert!(
                cols <= 32 * b,
                "cols {cols}: block {b} holds only {}",
                32 * b
            );
        }
        assert_eq!(row_block(1024), 128);
        assert_eq!(row_block(3072), 384);
    }

    #[test]
    fn blocks_2d_have_256_threads() {
        for run in 0..600 {
            let (bx, by) = block_2d(run);
            assert_eq!(bx * by, 256);
            assert!(bx.is_power_of_two() && (run == 0 || bx as usize >= run.min(256)));
        }
    }
}
