//! Launchers for kernels/tensor_ops.cu: the element-wise, broadcast and data-movement ops the
//! graph executor needs beyond the model-specific kernels (mul, scale, add_row, relu, silu,
//! clamp, mask_keep, L2-normalise, permute / narrow / concat through one strided copy, im2col
//! convolution through the GEMM, masked-attention keep bits from a 0/1 keep matrix).
//!
//! All take and return f32 device tensors (contiguous, possibly with an element offset), check
//! shapes and index ranges on the host, and queue work on the backend's stream without waiting.

use super::attention::AttnMaskBits;
use super::context::{backend_err, driver_err, CudaBackend};
use super::gemm::Epilogue;
use crate::{DType, Error, Result, Shape, Tensor};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

const BLOCK: u32 = 256;

/// Highest rank of the strided copy (`MAX_RANK` in tensor_ops.cu).
pub const MAX_COPY_RANK: usize = 8;

/// `xsam_tensor::CopyParams` (kernels/tensor_ops.cu), field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct CopyParams {
    dims: [i64; MAX_COPY_RANK],
    src_strides: [i64; MAX_COPY_RANK],
    dst_strides: [i64; MAX_COPY_RANK],
    src_offset: i64,
    dst_offset: i64,
    n: i64,
    rank: i32,
    reserved: i32,
}
// SAFETY: plain old data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for CopyParams {}
const _: () = assert!(std::mem::size_of::<CopyParams>() == 3 * 8 * MAX_COPY_RANK + 3 * 8 + 8);

/// Largest element index a strided walk over `dims` reaches from `offset`, `None` on overflow.
fn max_index(dims: &[usize], strides: &[usize], offset: usize) -> Option<usize> {
    dims.iter().zip(strides).try_fold(offset, |acc, (&d, &s)| {
        acc.checked_add(d.saturating_sub(1).checked_mul(s)?)
    })
}

fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::shape(op, format!("{what} = {v} exceeds the kernel's int range")))
}

impl CudaBackend {
    fn grid_cfg(&self, n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.grid_for(n, BLOCK), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `y = f(x)` for a kernel `k(const float* x, float* y, <extra>, size_t n)`; `extra` pushes
    /// the arguments between y and n.
    fn map_f32(&self, k: &'static str, x: &Tensor, extra: &[f32]) -> Result<Tensor> {
        let xp = self.addr(k, x, DType::F32)?;
        let n = x.numel();
        let (out, shape) = self.new_output(x.dims().to_vec(), DType::F32)?;
        if n > 0 {
            let yp = self.out_addr(k, &out)?;
            let mut l = self.stream().launch_builder(self.function(k)?);
            l.arg(&xp).arg(&yp);
            for v in extra {
                l.arg(v);
            }
            l.arg(&n);
            // SAFETY: k(const float* x, float* y, float..., size_t n); x and y hold n floats.
            unsafe { l.launch(self.grid_cfg(n)) }.map_err(|e| driver_err(k, e))?;
        }
        Ok(Tensor::from_device(out, DType::F32, shape))
    }

    /// `a * b` (same shape, f32).
    pub fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        const K: &str = "mul_f32";
        if a.dims() != b.dims() {
            return Err(Error::shape(K, format!("{} vs {}", a.shape(), b.shape())));
        }
        let ap = self.addr(K, a, DType::F32)?;
        let bp = self.addr(K, b, DType::F32)?;
        let n = a.numel();
        let (out, shape) = self.new_output(a.dims().to_vec(), DType::F32)?;
        if n > 0 {
            let yp = self.out_addr(K, &out)?;
            let mut l = self.stream().launch_builder(self.function(K)?);
            l.arg(&ap).arg(&bp).arg(&yp).arg(&n);
            // SAFETY: mul_f32(const float*, const float*, float*, size_t n), all n floats.
            unsafe { l.launch(self.grid_cfg(n)) }.map_err(|e| driver_err(K, e))?;
        }
        Ok(Tensor::from_device(out, DType::F32, shape))
    }

    /// `x * s`.
    pub fn scale(&self, x: &Tensor, s: f32) -> Result<Tensor> {
        self.map_f32("scale_f32", x, &[s])
    }

    /// torch.relu (NaN kept).
    pub fn relu(&self, x: &Tensor) -> Result<Tensor> {
        self.map_f32("relu_f32", x, &[])
    }

    /// `x / (1 + exp(-x))`.
    pub fn silu(&self, x: &Tensor) -> Result<Tensor> {
        self.map_f32("silu_f32", x, &[])
    }

    /// `min(max(x, lo), hi)` as Rust's `f32::clamp` (NaN stays NaN); `lo <= hi` required.
    pub fn clamp(&self, x: &Tensor, lo: f32, hi: f32) -> Result<Tensor> {
        if lo.is_nan() || hi.is_nan() || lo > hi {
            return Err(Error::Input(format!(
                "clamp bounds {lo}..{hi} are not ordered"
            )));
        }
        self.map_f32("clamp_f32", x, &[lo, hi])
    }

    /// 1 where `sigmoid(x) >= 0.5`, else 0 (Mask2Former's attention keep map).
    pub fn mask_keep(&self, x: &Tensor) -> Result<Tensor> {
        self.map_f32("mask_keep_f32", x, &[])
    }

    /// `x[.., c] + row[c]`.
    pub fn add_row(&self, x: &Tensor, row: &Tensor) -> Result<Tensor> {
        const K: &str = "add_row_f32";
        let cols = x.dims().last().copied().unwrap_or(0);
        if row.dims() != [cols] {
            return Err(Error::shape(
                K,
                format!("row {} for {}", row.shape(), x.shape()),
            ));
        }
        self.broadcast_add(K, x, row, cols, None)
    }

    /// `x[.., c, h, w] + bias[c]` (channels-first).
    pub fn add_channel_bias(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        const K: &str = "add_channel_bias_f32";
        let d = x.dims();
        if d.len() < 3 || bias.dims() != [d[d.len() - 3]] {
            return Err(Error::shape(
                K,
                format!("bias {} for {}", bias.shape(), x.shape()),
            ));
        }
        let hw = d[d.len() - 2] * d[d.len() - 1];
        self.broadcast_add(K, x, bias, hw, Some(d[d.len() - 3]))
    }

    fn broadcast_add(
        &self,
        k: &'static str,
        x: &Tensor,
        p: &Tensor,
        run: usize,
        channels: Option<usize>,
    ) -> Result<Tensor> {
        let xp = self.addr(k, x, DType::F32)?;
        let pp = self.addr(k, p, DType::F32)?;
        let n = x.numel();
        let (out, shape) = self.new_output(x.dims().to_vec(), DType::F32)?;
        if n > 0 && run > 0 {
            let yp = self.out_addr(k, &out)?;
            let mut l = self.stream().launch_builder(self.function(k)?);
            l.arg(&xp).arg(&pp).arg(&yp).arg(&n).arg(&run);
            if let Some(c) = &channels {
                l.arg(c);
            }
            // SAFETY: add_row_f32(const float* x, const float* row, float* y, size_t n,
            // size_t cols) / add_channel_bias_f32(.., size_t n, size_t hw, size_t channels); x and
            // y hold n floats, the parameter `cols` (or `channels`) floats, checked by the callers.
            unsafe { l.launch(self.grid_cfg(n)) }.map_err(|e| driver_err(k, e))?;
        }
        Ok(Tensor::from_device(out, DType::F32, shape))
    }

    /// `x / max(||x||₂, eps)` over the last dimension.
    pub fn l2_normalize(&self, x: &Tensor, eps: f32) -> Result<Tensor> {
        const K: &str = "l2_normalize_f32";
        let cols = x.dims().last().copied().unwrap_or(0);
        let xp = self.addr(K, x, DType::F32)?;
        let (out, shape) = self.new_output(x.dims().to_vec(), DType::F32)?;
        let rows = x.numel().checked_div(cols).unwrap_or(0);
        if rows > 0 {
            let rows_u = u32::try_from(rows).map_err(|_| Error::shape(K, "too many rows"))?;
            let cols_i = to_i32(K, "cols", cols)?;
            let yp = self.out_addr(K, &out)?;
            let mut l = self.stream().launch_builder(self.function(K)?);
            l.arg(&xp).arg(&yp).arg(&cols_i).arg(&eps);
            let cfg = LaunchConfig {
                grid_dim: (rows_u, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: l2_normalize_f32(const float* x, float* y, int cols, float eps); one block
            // per row of cols floats.
            unsafe { l.launch(cfg) }.map_err(|e| driver_err(K, e))?;
        }
        Ok(Tensor::from_device(out, DType::F32, shape))
    }

    // ------------------------------------------------------------------ data movement

    /// Queues `dst[dst_off + Σ i·dst_strides] = src[src_off + Σ i·src_strides]` over `dims`.
    /// `src` and `dst` are contiguous f32 device tensors; every index is checked against them.
    #[allow(clippy::too_many_arguments)]
    fn strided_copy(
        &self,
        src: &Tensor,
        dst: &Tensor,
        dims: &[usize],
        src_strides: &[usize],
        src_offset: usize,
        dst_strides: &[usize],
        dst_offset: usize,
    ) -> Result<()> {
        const K: &str = "strided_copy_f32";
        let r = dims.len();
        if r > MAX_COPY_RANK || src_strides.len() != r || dst_strides.len() != r {
            return Err(Error::shape(
                K,
                format!("rank {r} (at most {MAX_COPY_RANK})"),
            ));
        }
        let n: usize = dims.iter().product();
        if n == 0 {
            return Ok(());
        }
        let fits = |t: &Tensor, st: &[usize], off: usize| {
            max_index(dims, st, off).is_some_and(|m| m < t.numel())
        };
        if !fits(src, src_strides, src_offset) || !fits(dst, dst_strides, dst_offset) {
            return Err(Error::shape(
                K,
                format!("copy of {dims:?} outside its tensors"),
            ));
        }
        let sp = self.addr(K, src, DType::F32)?;
        let dp = self.addr(K, dst, DType::F32)?;
        let mut p = CopyParams {
            src_offset: src_offset as i64,
            dst_offset: dst_offset as i64,
            n: n as i64,
            rank: r as i32,
            ..Default::default()
        };
        for i in 0..r {
            p.dims[i] = dims[i] as i64;
            p.src_strides[i] = src_strides[i] as i64;
            p.dst_strides[i] = dst_strides[i] as i64;
        }
        let mut l = self.stream().launch_builder(self.function(K)?);
        l.arg(&sp).arg(&dp).arg(&p);
        // SAFETY: strided_copy_f32(const float* src, float* dst, CopyParams p); every index the
        // walk reaches was checked to lie inside src and dst above.
        unsafe { l.launch(self.grid_cfg(n)) }.map_err(|e| driver_err(K, e))?;
        Ok(())
    }

    /// `x` with its dims permuted (`out.dims[i] = x.dims[perm[i]]`), made contiguous.
    pub fn permute(&self, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
        let d = x.dims();
        if perm.len() != d.len() || perm.iter().any(|&p| p >= d.len()) {
            return Err(Error::shape(
                "permute",
                format!("{perm:?} for {}", x.shape()),
            ));
        }
        let st = Shape::new(d.to_vec()).contiguous_strides();
        let dims: Vec<usize> = perm.iter().map(|&p| d[p]).collect();
        let src_strides: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
        let out = self.alloc_tensor(dims.clone(), DType::F32)?;
        let dst_strides = Shape::new(dims.clone()).contiguous_strides();
        self.strided_copy(x, &out, &dims, &src_strides, 0, &dst_strides, 0)?;
        Ok(out)
    }

    /// Elements `start..start+len` of `axis`, made contiguous.
    pub fn narrow_copy(&self, x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
        let d = x.dims();
        if axis >= d.len() || start + len > d[axis] {
            return Err(Error::shape(
                "narrow",
                format!("{start}+{len} on axis {axis} of {}", x.shape()),
            ));
        }
        let st = Shape::new(d.to_vec()).contiguous_strides();
        let mut dims = d.to_vec();
        dims[axis] = len;
        let out = self.alloc_tensor(dims.clone(), DType::F32)?;
        let dst_strides = Shape::new(dims.clone()).contiguous_strides();
        self.strided_copy(x, &out, &dims, &st, start * st[axis], &dst_strides, 0)?;
        Ok(out)
    }

    /// The parts joined along `axis` (same rank, equal other dims).
    pub fn concat(&self, parts: &[&Tensor], axis: usize) -> Result<Tensor> {
        let first = parts
            .first()
            .ok_or_else(|| Error::shape("concat", "nothing to concatenate"))?;
        let r = first.dims().len();
        if axis >= r {
            return Err(Error::shape(
                "concat",
                format!("axis {axis} of {}", first.shape()),
            ));
        }
        let mut dims = first.dims().to_vec();
        dims[axis] = 0;
        for p in parts {
            let ok = p.dims().len() == r
                && p.dims()
                    .iter()
                    .enumerate()
                    .all(|(i, &x)| i == axis || x == first.dims()[i]);
            if !ok {
                return Err(Error::shape(
                    "concat",
                    format!("{} and {} on axis {axis}", first.shape(), p.shape()),
                ));
            }
            dims[axis] += p.dims()[axis];
        }
        let out = self.alloc_tensor(dims.clone(), DType::F32)?;
        let ost = Shape::new(dims).contiguous_strides();
        let mut at = 0;
        for p in parts {
            let pst = Shape::new(p.dims().to_vec()).contiguous_strides();
            self.strided_copy(p, &out, p.dims(), &pst, 0, &ost, at * ost[axis])?;
            at += p.dims()[axis];
        }
        Ok(out)
    }

    /// Convolution of `x [.., cin, h, w]` with `w [cout, cin, kh, kw]` (bf16 or f32) and an
    /// optional f32 `bias [cout]`: per image, im2col to `[cin·kh·kw, oh·ow]` then one GEMM
    /// `w · cols` (bf16 operands, f32 accumulation and output) -> `[.., cout, oh, ow]`.
    pub fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        pad: usize,
    ) -> Result<Tensor> {
        const K: &str = "im2col_f32";
        let xd = x.dims();
        let wd = w.dims();
        if xd.len() < 3 || wd.len() != 4 || xd[xd.len() - 3] != wd[1] || stride == 0 {
            return Err(Error::shape(
                "conv2d",
                format!("{} with weight {}", x.shape(), w.shape()),
            ));
        }
        let r = xd.len();
        let (cin, h, wi) = (xd[r - 3], xd[r - 2], xd[r - 1]);
        let (cout, kh, kw) = (wd[0], wd[2], wd[3]);
        let (hp, wp) = (h + 2 * pad, wi + 2 * pad);
        if hp < kh || wp < kw {
            return Err(Error::shape(
                "conv2d",
                format!("kernel {kh}x{kw} larger than the input"),
            ));
        }
        let (oh, ow) = ((hp - kh) / stride + 1, (wp - kw) / stride + 1);
        let batch: usize = xd[..r - 3].iter().product();
        let kk = cin * kh * kw;
        let ints = [cin, h, wi, kh, kw, stride, pad, oh, ow]
            .iter()
            .map(|&v| to_i32(K, "size", v))
            .collect::<Result<Vec<i32>>>()?;
        to_i32(K, "cin*kh*kw", kk)?;
        let w2 = w.reshape([cout, kk])?;
        let x3 = x.reshape([batch, cin * h * wi])?;
        let mut outs = Vec::with_capacity(batch);
        for b in 0..batch {
            let img = x3.narrow(0, b, 1)?;
            let xp = self.addr(K, &img, DType::F32)?;
            let cols = self.alloc_tensor([kk, oh * ow], DType::F32)?;
            let n = kk * oh * ow;
            if n > 0 {
                let cp = self.addr(K, &cols, DType::F32)?;
                let mut l = self.stream().launch_builder(self.function(K)?);
                l.arg(&xp).arg(&cp);
                for v in &ints {
                    l.arg(v);
                }
                // SAFETY: im2col_f32(const float* x, float* cols, int cin, int h, int w, int kh,
                // int kw, int stride, int pad, int oh, int ow); x holds cin*h*w floats (one image
                // of the checked input), cols cin*kh*kw*oh*ow.
                unsafe { l.launch(self.grid_cfg(n)) }.map_err(|e| driver_err(K, e))?;
            }
            let y = self.gemm(&w2, &cols, false, None, Epilogue::None, DType::F32)?;
            outs.push(y.reshape([1, cout, oh, ow])?);
        }
        let y = if outs.len() == 1 {
            outs.pop().ok_or_else(|| backend_err("conv2d: no output"))?
        } else {
            let refs: Vec<&Tensor> = outs.iter().collect();
            self.concat(&refs, 0)?
        };
        let y = match bias {
            Some(b) => self.add_channel_bias(&y, b)?,
            None => y,
        };
        let mut od = xd[..r - 3].to_vec();
        od.extend([cout, oh, ow]);
        y.reshape(od)
    }

    /// Keep bits for [`masked_attention`](Self::masked_attention) from `keep [nq, tk]` (nonzero =
    /// attend; a row with nothing kept attends everything, as the CPU backend).
    pub fn keep_bits(&self, keep: &Tensor) -> Result<AttnMaskBits> {
        const K: &str = "keep_bits_f32";
        let d = keep.dims();
        if d.len() != 2 {
            return Err(Error::shape(
                K,
                format!("keep {} is not [nq, tk]", keep.shape()),
            ));
        }
        let (nq, tk) = (d[0], d[1]);
        let words = 2 * tk.div_ceil(64);
        let kp = self.addr(K, keep, DType::F32)?;
        let buf = self.alloc(nq * words * 4)?;
        if nq > 0 && words > 0 {
            let (tk_i, words_i) = (to_i32(K, "keys", tk)?, to_i32(K, "words", words)?);
            let nq_u = u32::try_from(nq).map_err(|_| Error::shape(K, "too many queries"))?;
            let bp = self.out_addr(K, &buf)?;
            let mut l = self.stream().launch_builder(self.function(K)?);
            l.arg(&kp).arg(&bp).arg(&tk_i).arg(&words_i);
            let cfg = LaunchConfig {
                grid_dim: (nq_u, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: keep_bits_f32(const float* keep, uint32_t* bits, int tk, int words); keep
            // holds nq*tk floats, bits nq*words u32; one block per row.
            unsafe { l.launch(cfg) }.map_err(|e| driver_err(K, e))?;
        }
        Ok(AttnMaskBits::from_parts(buf, nq, tk, words))
    }
}

#[cfg(test)]
mod tests {
    use super::max_index;

    #[test]
    fn max_index_of_a_permuted_walk() {
        // [2, 3] transposed: dims [3, 2], strides [1, 3] -> last element 5.
        assert_eq!(max_index(&[3, 2], &[1, 3], 0), Some(5));
        assert_eq!(max_index(&[3, 2], &[1, 3], 4), Some(9));
        assert_eq!(max_index(&[0, 2], &[1, 3], 0), Some(3));
        assert_eq!(max_index(&[2], &[usize::MAX], 1), None);
    }
}
