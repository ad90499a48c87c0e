//! Attention on the GPU: launchers for kernels/flash_attn.cu, masked_attn.cu and paged_attn.cu.
//!
//! Every launcher takes bf16 device tensors, checks dtype, device, shapes and layout, queues the
//! kernel(s) on the backend's stream and returns a new bf16 device tensor; nothing waits for the
//! GPU. Softmax and accumulation are f32 inside the kernels.
//!
//! Inputs are "row tensors": `[.., rows, width]` bf16 whose last dimension is contiguous and whose
//! leading dimensions merge into rows of a common stride. Column slices of a fused projection
//! (`qkv.narrow(1, C, C)`) are fine as long as every row starts on a 16-byte boundary (row stride
//! and element offset multiples of 8): the kernels move 16 bytes per copy.
//!
//! - [`CudaBackend::flash_attention`]: prefill attention, head dims 64, 72 and 96, optional causal
//!   mask with Phi-3's sliding window (query at `q_offset + i` sees key j iff
//!   `0 <= q_offset + i - j < window`), grouped K/V heads, split-K when the grid is small.
//! - [`CudaBackend::sam_attention`]: SAM's windowed or global attention straight from the qkv
//!   projection `[H, W, 3C]` with the decomposed relative-position bias computed inside the kernel;
//!   padded window positions read the qkv bias (the reference pads with zeros *before* the qkv
//!   linear); returns `[H, W, C]` with the padding already cropped.
//! - [`CudaBackend::attention_mask_bits`] + [`CudaBackend::masked_attention`]: Mask2Former's
//!   masked cross-attention (the mask from the previous mask logits, resized, thresholded and
//!   fully blocked rows unblocked, in one kernel).
//! - [`DevicePagedKv`], [`CudaBackend::kv_append`], [`CudaBackend::paged_decode`],
//!   [`CudaBackend::paged_prefill`]: the paged KV pool on the device (layout below), appending
//!   K/V rows, decode attention with split-K, and prefill attention over cached keys.
//!
//! Device KV pool layout (bf16, one pool for K and one for V): block b of layer l starts at
//! element `(b * num_layers + l) * block_elems`, `block_elems = kv_heads * block_size * head_dim`,
//! and inside a block the order is `[kv_heads][block_size][head_dim]` (head-major, so a head's
//! keys of one block are one contiguous run). The CPU cache (`crate::kv`) stores
//! `[block_size][kv_dim]` per (block, layer); the logical contents and the block ids are the same,
//! so one `PagedKvCache` can keep the bookkeeping (allocation, sharing, copy on write, sliding
//! window release) for either. Block tables (one i32 per logical block of the sequence, -1 for a
//! block released by the sliding window; see [`block_table_i32`]) and slot lists are
//! [`DeviceIndex`]es: uploaded once per step, shared by every layer's launch, validated on the host
//! copy so a kernel never reads outside the pool.

use super::buffer::DeviceBuffer;
use super::context::{backend_err, driver_err, CudaBackend};
use crate::kv::{BlockId, KvConfig};
use crate::tensor::Storage;
use crate::{DType, Error, Result, Tensor};
use cudarc::driver::{
    sys, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use half::bf16;

// ---------------------------------------------------------------------------- kernel ABI

/// `xsam_attn::FlashParams` (kernels/flash_attn.cuh), field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct FlashParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    part_o: u64,
    part_ml: u64,
    mask: u64,
    block_table: u64,
    rel_h: u64,
    rel_w: u64,
    pad_k: u64,
    pad_v: u64,
    q_stride: i64,
    k_stride: i64,
    v_stride: i64,
    o_stride: i64,
    block_stride: i64,
    tq: i32,
    tk: i32,
    heads: i32,
    kv_heads: i32,
    causal: i32,
    window: i32,
    q_offset: i32,
    mask_words: i32,
    scale: f32,
    block_size: i32,
    grid_h: i32,
    grid_w: i32,
    win: i32,
    win_cols: i32,
    qtiles_per_win: i32,
    reserved: i32,
}
// SAFETY: plain old data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for FlashParams {}
// The same numbers are static_asserted in kernels/flash_attn.cuh.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<FlashParams>() == 17 * 8 + 16 * 4);
    assert!(offset_of!(FlashParams, q_stride) == 96);
    assert!(offset_of!(FlashParams, tq) == 136);
    assert!(offset_of!(FlashParams, scale) == 168);
    assert!(offset_of!(FlashParams, reserved) == 196);
};

/// `xsam_paged::PagedDecodeParams` (kernels/paged_attn.cu), field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct PagedDecodeParams {
    q: u64,
    k_pool: u64,
    v_pool: u64,
    block_table: u64,
    o: u64,
    part_o: u64,
    part_ml: u64,
    q_stride: i64,
    o_stride: i64,
    block_stride: i64,
    nq: i32,
    heads: i32,
    kv_heads: i32,
    block_size: i32,
    pos0: i32,
    window: i32,
    split_len: i32,
    scale: f32,
}
// SAFETY: as FlashParams.
unsafe impl DeviceRepr for PagedDecodeParams {}
// As static_asserted in kernels/paged_attn.cu.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<PagedDecodeParams>() == 10 * 8 + 8 * 4);
    assert!(offset_of!(PagedDecodeParams, q_stride) == 56);
    assert!(offset_of!(PagedDecodeParams, nq) == 80);
    assert!(offset_of!(PagedDecodeParams, scale) == 108);
};

/// Threads per flash CTA (4 warps) and keys per tile, as in FlashCfg.
const FLASH_THREADS: u32 = 128;
const FLASH_BN: usize = 64;
/// Warps per paged-decode CTA (`xsam_paged::DECODE_WARPS`).
const DECODE_WARPS: usize = 8;
/// Above this much dynamic shared memory a kernel needs the opt-in attribute.
const DEFAULT_SMEM_LIMIT: usize = 48 * 1024;

/// One instantiation of the flash template: its entry point and tile geometry.
#[derive(Clone, Copy, Debug)]
struct FlashKernel {
    name: &'static str,
    head_dim: usize,
    /// m-tiles (16 rows) per warp.
    mt: usize,
    /// SAM: log2 of the padded window width KW.
    log_kw: Option<u32>,
}

impl FlashKernel {
    /// Query rows per CTA.
    fn bm(&self) -> usize {
        16 * self.mt * 4
    }

    /// `FlashCfg::SMEM`: Q, K and V tiles with rows of HDP + 8 bf16, plus SAM's f32 relh/relw.
    fn smem(&self) -> usize {
        let hdp = self.head_dim.div_ceil(16) * 16;
        let sk = hdp + 8;
        let tiles = (self.bm() + 2 * FLASH_BN) * sk * 2;
        let rel = self.log_kw.map_or(0, |l| {
            let kw = 1usize << l;
            self.bm() * ((kw + 1) + (kw + 8)) * 4
        });
        tiles + rel
    }
}

const FLASH_HD64: FlashKernel = FlashKernel {
    name: "flash_attn_hd64_bf16",
    head_dim: 64,
    mt: 2,
    log_kw: None,
};
const FLASH_HD72: FlashKernel = FlashKernel {
    name: "flash_attn_hd72_bf16",
    head_dim: 72,
    mt: 1,
    log_kw: None,
};
const FLASH_HD96: FlashKernel = FlashKernel {
    name: "flash_attn_hd96_bf16",
    head_dim: 96,
    mt: 1,
    log_kw: None,
};
const FLASH_PAGED_HD96: FlashKernel = FlashKernel {
    name: "flash_attn_paged_hd96_bf16",
    head_dim: 96,
    mt: 1,
    log_kw: None,
};
const SAM_WINDOW: FlashKernel = FlashKernel {
    name: "sam_attn_window_bf16",
    head_dim: 64,
    mt: 1,
    log_kw: Some(4),
};
const SAM_GLOBAL: FlashKernel = FlashKernel {
    name: "sam_attn_global_bf16",
    head_dim: 64,
    mt: 2,
    log_kw: Some(6),
};
const SAM_GLOBAL_BM64: FlashKernel = FlashKernel {
    name: "sam_attn_global_bm64_bf16",
    head_dim: 64,
    mt: 1,
    log_kw: Some(6),
};
const MASKED_HD32: FlashKernel = FlashKernel {
    name: "masked_attn_hd32_bf16",
    head_dim: 32,
    mt: 2,
    log_kw: None,
};

/// Every attention kernel name (for `KERNEL_NAMES`' consistency test).
pub const ATTENTION_KERNELS: &[&str] = &[
    "flash_attn_hd64_bf16",
    "flash_attn_hd72_bf16",
    "flash_attn_hd96_bf16",
    "flash_attn_paged_hd96_bf16",
    "sam_attn_window_bf16",
    "sam_attn_global_bf16",
    "sam_attn_global_bm64_bf16",
    "attn_combine_splits_bf16",
    "masked_attn_hd32_bf16",
    "attn_mask_from_logits_bf16",
    "attn_mask_from_logits_f32",
    "paged_decode_hd64_bf16",
    "paged_decode_hd96_bf16",
    "paged_decode_hd128_bf16",
    "paged_kv_append_bf16",
];

// ---------------------------------------------------------------------------- public types

/// Which keys a prefill query sees (the CPU backend's `AttnMask` minus `Keep`, which is
/// [`CudaBackend::masked_attention`] here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashMask {
    /// Every query attends every key.
    None,
    /// Query i sits at position `q_offset + i`, key j at j; i sees j iff
    /// `0 <= q_offset + i - j < window` (`None`: no window). A query that sees no key gets zeros.
    Causal {
        window: Option<usize>,
        q_offset: usize,
    },
}

/// Keep bits of a masked attention: `rows` queries x `keys` keys, bit `j % 32` of word
/// `row * words + j / 32` set where the query attends key j (fully blocked rows already
/// unblocked). Built by [`CudaBackend::attention_mask_bits`].
#[derive(Debug)]
pub struct AttnMaskBits {
    buf: DeviceBuffer,
    rows: usize,
    keys: usize,
    words: usize,
}

impl AttnMaskBits {
    /// Wraps bits made by another kernel in this layout (`tensor_ops::keep_bits`).
    pub(crate) fn from_parts(buf: DeviceBuffer, rows: usize, keys: usize, words: usize) -> Self {
        AttnMaskBits {
            buf,
            rows,
            keys,
            words,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn keys(&self) -> usize {
        self.keys
    }
    /// u32 words per row (even, >= keys / 32).
    pub fn words_per_row(&self) -> usize {
        self.words
    }
}

/// The paged KV pool on the device (layout in the module docs). Geometry from the same
/// [`KvConfig`] as the CPU cache, plus the head dim.
#[derive(Debug)]
pub struct DevicePagedKv {
    k: DeviceBuffer,
    v: DeviceBuffer,
    cfg: KvConfig,
    head_dim: usize,
}

impl DevicePagedKv {
    pub fn config(&self) -> &KvConfig {
        &self.cfg
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    pub fn kv_heads(&self) -> usize {
        self.cfg.kv_dim / self.head_dim
    }
    /// Elements in one (block, layer): kv_heads * block_size * head_dim.
    pub fn block_elems(&self) -> usize {
        self.cfg.block_size * self.cfg.kv_dim
    }
    /// Elements between block b and b + 1 of one layer.
    pub fn block_stride(&self) -> usize {
        self.cfg.num_layers * self.block_elems()
    }
    /// Element offset of (block, layer) in either pool.
    pub fn block_offset(&self, block: usize, layer: usize) -> usize {
        (block * self.cfg.num_layers + layer) * self.block_elems()
    }
    /// Read views of the whole K and V pools (kernels address them through block tables).
    fn views(&self) -> Result<(CudaView<'_, bf16>, CudaView<'_, bf16>)> {
        let n = self.cfg.num_blocks * self.block_stride();
        let k = self.k.view::<bf16>(0, n);
        let v = self.v.view::<bf16>(0, n);
        k.zip(v).ok_or_else(|| backend_err("KV pool view"))
    }
}

/// int32 indices on the device together with their host copy: block tables and slot lists.
/// Uploaded once ([`CudaBackend::upload_index`]) and used by many launches (all layers of a decode
/// step); launchers validate the host copy, so the kernels never see an index outside the pool.
#[derive(Debug)]
pub struct DeviceIndex {
    buf: DeviceBuffer,
    host: Vec<i32>,
}

impl DeviceIndex {
    pub fn as_slice(&self) -> &[i32] {
        &self.host
    }
    pub fn len(&self) -> usize {
        self.host.len()
    }
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }
}

/// A CPU block table (`PagedKvCache::block_table`) in the kernels' form: -1 for released blocks.
pub fn block_table_i32(table: &[Option<BlockId>]) -> Vec<i32> {
    table.iter().map(|b| b.map_or(-1, |b| b as i32)).collect()
}

// ---------------------------------------------------------------------------- helpers

/// A bf16 device tensor seen as rows of `width` elements.
struct Rows<'a> {
    view: CudaView<'a, bf16>,
    stride: usize,
    rows: usize,
}

fn dtype_err(op: &'static str, what: &str, t: &Tensor, want: &str) -> Error {
    Error::DType {
        op,
        expected: format!("{want} for {what}"),
        found: t.dtype().to_string(),
    }
}

fn i32_arg(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::shape(op, format!("{what} = {v} exceeds the kernels' i32 range")))
}

impl CudaBackend {
    fn device_buf<'a>(
        &self,
        op: &'static str,
        what: &str,
        t: &'a Tensor,
    ) -> Result<&'a DeviceBuffer> {
        match t.storage() {
            Storage::Device(b) => {
                self.check_device(op, b)?;
                Ok(b)
            }
            Storage::Host(_) => Err(backend_err(format!(
                "{op}: {what} {t:?} is on the host; copy it with to_device first"
            ))),
        }
    }

    /// `t` as rows of `width` bf16 (leading dims merged), 16-byte aligned rows.
    fn rows_of<'a>(
        &self,
        op: &'static str,
        what: &str,
        t: &'a Tensor,
        width: usize,
    ) -> Result<Rows<'a>> {
        if t.dtype() != DType::BF16 {
            return Err(dtype_err(op, what, t, "bf16"));
        }
        let buf = self.device_buf(op, what, t)?;
        let dims = t.dims();
        let strides = t.strides();
        let Some(last) = dims.len().checked_sub(1) else {
            return Err(Error::shape(op, format!("{what} is a scalar")));
        };
        if dims[last] != width {
            return Err(Error::shape(
                op,
                format!("{what} has shape {}, expected last dim {width}", t.shape()),
            ));
        }
        if width > 1 && strides[last] != 1 {
            return Err(Error::shape(
                op,
                format!("{what}: the last dimension must be contiguous ({t:?})"),
            ));
        }
        let rows: usize = dims[..last].iter().product();
        // Leading dims of size 1 do not move; the others must nest (outer = inner * size).
        let lead: Vec<(usize, usize)> = dims[..last]
            .iter()
            .zip(strides)
            .filter(|(&d, _)| d > 1)
            .map(|(&d, &s)| (d, s))
            .collect();
        let stride = lead.last().map_or(width, |&(_, s)| s);
        if lead.windows(2).any(|w| w[0].1 != w[1].1 * w[1].0) {
            return Err(Error::shape(
                op,
                format!("{what}: leading dims do not merge into rows ({t:?})"),
            ));
        }
        if rows > 1 && stride < width {
            return Err(Error::shape(
                op,
                format!("{what}: overlapping rows ({t:?})"),
            ));
        }
        if !stride.is_multiple_of(8) || !t.offset().is_multiple_of(8) {
            return Err(Error::shape(
                op,
                format!(
                    "{what}: rows must start on 16-byte boundaries (row stride {stride} and offset {} \
                     must be multiples of 8 elements)",
                    t.offset()
                ),
            ));
        }
        let span = if rows == 0 {
            0
        } else {
            (rows - 1) * stride + width
        };
        let view = buf
            .view::<bf16>(t.offset() * 2, span)
            .ok_or_else(|| backend_err(format!("{op}: {what} {t:?} exceeds its device buffer")))?;
        Ok(Rows { view, stride, rows })
    }

    /// Uploads int32 indices (a block table from [`block_table_i32`], or KV slots).
    pub fn upload_index(&self, v: &[i32]) -> Result<DeviceIndex> {
        let mut buf = self.alloc(v.len() * 4)?;
        if !v.is_empty() {
            self.stream()
                .memcpy_htod(bytemuck::cast_slice::<i32, u8>(v), buf.slice_mut())
                .map_err(|e| driver_err("copying indices to the device", e))?;
        }
        Ok(DeviceIndex {
            buf,
            host: v.to_vec(),
        })
    }

    /// Overwrites `idx` in place with `v` followed by -1 up to its length (`v` may be shorter):
    /// the device address stays, which is what a captured CUDA graph reading the indices
    /// needs. Queued in stream order (the source is staged before this returns); must not be
    /// called inside a capture.
    pub fn write_index(&self, idx: &mut DeviceIndex, v: &[i32]) -> Result<()> {
        if v.len() > idx.host.len() {
            return Err(backend_err(format!(
                "write_index: {} indices into a buffer of {}",
                v.len(),
                idx.host.len()
            )));
        }
        idx.host[..v.len()].copy_from_slice(v);
        idx.host[v.len()..].fill(-1);
        if !idx.host.is_empty() {
            self.stream()
                .memcpy_htod(
                    bytemuck::cast_slice::<i32, u8>(&idx.host),
                    idx.buf.slice_mut(),
                )
                .map_err(|e| driver_err("copying indices to the device", e))?;
        }
        Ok(())
    }

    /// The device pointer of an index array (its buffer lives as long as `idx`).
    fn index_view<'a>(&self, idx: &'a DeviceIndex) -> Result<CudaView<'a, i32>> {
        idx.buf
            .view::<i32>(0, idx.host.len())
            .ok_or_else(|| backend_err("index view"))
    }

    /// Queues one flash-template kernel.
    fn launch_flash(&self, k: &FlashKernel, grid: (u32, u32, u32), p: &FlashParams) -> Result<()> {
        let f = self.function(k.name)?;
        let smem = k.smem();
        if smem > DEFAULT_SMEM_LIMIT {
            f.set_attribute(
                sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| {
                driver_err(
                    &format!("{}: opting in to {smem} bytes of shared memory", k.name),
                    e,
                )
            })?;
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (FLASH_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut b = self.stream().launch_builder(f);
        b.arg(p);
        // SAFETY: the kernel takes one FlashParams by value; every pointer in it was taken from a
        // live device view whose extent the launcher checked against the shapes in the struct,
        // and the dynamic shared memory matches FlashCfg::SMEM (the kernel traps otherwise).
        unsafe { b.launch(cfg) }.map_err(|e| driver_err(k.name, e))?;
        Ok(())
    }

    /// Queues attn_combine_splits_bf16: partials of `rows` (query, head) pairs into `out`.
    #[allow(clippy::too_many_arguments)]
    fn launch_combine(
        &self,
        part_o: u64,
        part_ml: u64,
        out: u64,
        rows: usize,
        heads: usize,
        hd: usize,
        splits: usize,
        out_stride: usize,
    ) -> Result<()> {
        const K: &str = "attn_combine_splits_bf16";
        let n = rows * hd;
        let cfg = LaunchConfig {
            grid_dim: (self.grid_for(n, 256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows_i, heads_i, hd_i, splits_i, stride_i) = (
            rows as i64,
            heads as i32,
            hd as i32,
            splits as i32,
            out_stride as i64,
        );
        let mut b = self.stream().launch_builder(self.function(K)?);
        b.arg(&part_o)
            .arg(&part_ml)
            .arg(&out)
            .arg(&rows_i)
            .arg(&heads_i)
            .arg(&hd_i)
            .arg(&splits_i)
            .arg(&stride_i);
        // SAFETY: attn_combine_splits_bf16(const float*, const float*, bf16*, long long, int, int,
        // int, long long); the partial buffers hold splits*rows*hd and splits*rows*2 floats and
        // out covers rows/heads rows of out_stride elements (checked by the callers).
        unsafe { b.launch(cfg) }.map_err(|e| driver_err(K, e))?;
        Ok(())
    }

    /// Split count for a grid of `ctas` CTAs over `tiles` key tiles: enough CTAs to fill the GPU
    /// twice, at least 4 key tiles per split, at most 16 splits.
    fn auto_splits(&self, ctas: usize, tiles: usize) -> usize {
        let target = 2 * self.sm_count();
        if ctas == 0 || ctas >= self.sm_count() {
            return 1;
        }
        target.div_ceil(ctas).min(tiles / 4).clamp(1, 16)
    }

    // ------------------------------------------------------------------------ flash attention

    /// Prefill attention: `q [tq, heads*hd]`, `k`/`v [tk, kv_heads*hd]` (bf16 row tensors, see the
    /// module docs) -> `[tq, heads*hd]` bf16, `softmax(scale·q·kᵀ, mask)·v` per head; query head h
    /// reads K/V head `h / (heads / kv_heads)`. Head dims 64, 72, 96. `splits` forces the number of
    /// key splits (None: chosen from the grid size).
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        kv_heads: usize,
        scale: f32,
        mask: FlashMask,
        splits: Option<usize>,
    ) -> Result<Tensor> {
        const OP: &str = "flash_attention";
        let (qd, kd) = (
            *q.dims().last().unwrap_or(&0),
            *k.dims().last().unwrap_or(&0),
        );
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || qd % heads != 0 {
            return Err(Error::shape(
                OP,
                format!("q width {qd} with {heads} heads and {kv_heads} kv heads"),
            ));
        }
        let hd = qd / heads;
        let kern = match hd {
            64 => FLASH_HD64,
            72 => FLASH_HD72,
            96 => FLASH_HD96,
            _ => {
                return Err(backend_err(format!(
                    "{OP}: head dim {hd} has no kernel (64, 72, 96)"
                )))
            }
        };
        if kd != kv_heads * hd {
            return Err(Error::shape(
                OP,
                format!("k width {kd}, expected {kv_heads} x {hd}"),
            ));
        }
        let qr = self.rows_of(OP, "q", q, qd)?;
        let kr = self.rows_of(OP, "k", k, kd)?;
        let vr = self.rows_of(OP, "v", v, kd)?;
        if vr.rows != kr.rows {
            return Err(Error::shape(
                OP,
                format!("k has {} rows, v {}", kr.rows, vr.rows),
            ));
        }
        let (tq, tk) = (qr.rows, kr.rows);
        let (causal, window, q_offset) = match mask {
            FlashMask::None => (false, 0, 0),
            FlashMask::Causal { window, q_offset } => {
                if window == Some(0) {
                    return Err(Error::Input("sliding window must be at least 1".into()));
                }
                (true, window.unwrap_or(0), q_offset)
            }
        };
        let mut out = self.alloc(tq * qd * 2)?;
        if tq > 0 {
            let qtiles = tq.div_ceil(kern.bm());
            let splits = splits
                .unwrap_or_else(|| self.auto_splits(qtiles * heads, tk.div_ceil(FLASH_BN)))
                .max(1);
            let mut p = FlashParams {
                q_stride: qr.stride as i64,
                k_stride: kr.stride as i64,
                v_stride: vr.stride as i64,
                o_stride: qd as i64,
                tq: i32_arg(OP, "tq", tq)?,
                tk: i32_arg(OP, "tk", tk)?,
                heads: heads as i32,
                kv_heads: kv_heads as i32,
                causal: causal as i32,
                window: i32_arg(OP, "window", window)?,
                q_offset: i32_arg(OP, "q_offset", q_offset)?,
                scale,
                ..Default::default()
            };
            i32_arg(OP, "q_offset + tq", q_offset + tq)?;
            let s = self.stream();
            let (qp, _g1) = qr.view.device_ptr(s);
            let (kp, _g2) = kr.view.device_ptr(s);
            let (vp, _g3) = vr.view.device_ptr(s);
            let mut ov = out
                .view_mut::<bf16>(tq * qd)
                .ok_or_else(|| backend_err(format!("{OP}: output view")))?;
            let (op, _g4) = ov.device_ptr_mut(s);
            (p.q, p.k, p.v, p.o) = (qp, kp, vp, op);
            self.flash_with_splits(
                &kern,
                &mut p,
                (qtiles as u32, heads as u32),
                splits,
                tq,
                heads,
                hd,
                qd,
            )?;
        }
        Ok(Tensor::from_device(out, DType::BF16, [tq, qd].into()))
    }

    /// Launches a (dense, paged or masked) flash kernel, with split partials and the combine pass
    /// when `splits > 1`. `p.o` must be set; rows of the output are `o_stride` apart.
    #[allow(clippy::too_many_arguments)]
    fn flash_with_splits(
        &self,
        kern: &FlashKernel,
        p: &mut FlashParams,
        grid_xy: (u32, u32),
        splits: usize,
        tq: usize,
        heads: usize,
        hd: usize,
        o_stride: usize,
    ) -> Result<()> {
        if splits > u16::MAX as usize {
            return Err(Error::shape(kern.name, format!("{splits} splits")));
        }
        if splits == 1 {
            return self.launch_flash(kern, (grid_xy.0, grid_xy.1, 1), p);
        }
        let rows = tq * heads;
        let mut po = self.alloc(splits * rows * hd * 4)?;
        let mut pml = self.alloc(splits * rows * 2 * 4)?;
        let s = self.stream();
        let mut pov = po
            .view_mut::<f32>(splits * rows * hd)
            .ok_or_else(|| backend_err("split partials view"))?;
        let (pop, _g1) = pov.device_ptr_mut(s);
        let mut pmlv = pml
            .view_mut::<f32>(splits * rows * 2)
            .ok_or_else(|| backend_err("split partials view"))?;
        let (pmlp, _g2) = pmlv.device_ptr_mut(s);
        p.part_o = pop;
        p.part_ml = pmlp;
        self.launch_flash(kern, (grid_xy.0, grid_xy.1, splits as u32), p)?;
        self.launch_combine(pop, pmlp, p.o, rows, heads, hd, splits, o_stride)
    }

    // ------------------------------------------------------------------------ SAM

    /// SAM's attention block (architecture notes §3) straight from the qkv projection.
    ///
    /// `qkv [H, W, 3C]` (or `[H*W, 3C]` with `grid = (H, W)`), C = heads*64, q|k|v column blocks;
    /// `qkv_bias [3C]` is the qkv linear's bias: the reference zero-pads the grid to a multiple of
    /// `window` *before* the linear, so a padded position's q/k/v equal it (no attention mask:
    /// queries attend padded keys). `rel_h`, `rel_w` are `[2*window - 1, 64]`. Windowed blocks pass
    /// window 14, global blocks window = H = W (64). Logits are
    /// `scale·q·k + q·Rh[hq-hk+K-1] + q·Rw[wq-wk+K-1]` with the unscaled q; the bias is computed
    /// in the kernel from q and the tables. Returns `[H*W, C]` (row-major grid), padding cropped.
    #[allow(clippy::too_many_arguments)]
    pub fn sam_attention(
        &self,
        qkv: &Tensor,
        qkv_bias: &Tensor,
        rel_h: &Tensor,
        rel_w: &Tensor,
        grid: (usize, usize),
        heads: usize,
        window: usize,
        scale: f32,
    ) -> Result<Tensor> {
        const OP: &str = "sam_attention";
        const HD: usize = 64;
        let (gh, gw) = grid;
        let c = heads * HD;
        if window == 0 || window > 64 {
            return Err(Error::shape(
                OP,
                format!("window {window} must be in 1..=64"),
            ));
        }
        let rows = self.rows_of(OP, "qkv", qkv, 3 * c)?;
        if rows.rows != gh * gw {
            return Err(Error::shape(
                OP,
                format!("qkv has {} rows for a {gh}x{gw} grid", rows.rows),
            ));
        }
        let bias = self.rows_of(OP, "qkv_bias", qkv_bias, 3 * c)?;
        let nr = 2 * window - 1;
        let rh = self.rows_of(OP, "rel_h", rel_h, HD)?;
        let rw = self.rows_of(OP, "rel_w", rel_w, HD)?;
        if bias.rows != 1 || rh.rows != nr || rw.rows != nr || rh.stride != HD || rw.stride != HD {
            return Err(Error::shape(
                OP,
                format!(
                    "qkv_bias must be [{}], rel_h/rel_w contiguous [{nr}, {HD}] (got {}, {}, {})",
                    3 * c,
                    qkv_bias.shape(),
                    rel_h.shape(),
                    rel_w.shape()
                ),
            ));
        }
        let kern = if window <= 16 {
            SAM_WINDOW
        } else if self.max_smem_optin()? >= SAM_GLOBAL.smem() {
            SAM_GLOBAL
        } else {
            SAM_GLOBAL_BM64
        };
        let n = gh * gw * c;
        let mut out = self.alloc(n * 2)?;
        if n > 0 {
            let (wr, wc) = (gh.div_ceil(window), gw.div_ceil(window));
            let qtiles = (window * window).div_ceil(kern.bm());
            let grid_x = wr * wc * qtiles;
            if grid_x > i32::MAX as usize || heads > 65_535 {
                return Err(Error::shape(OP, "grid too large"));
            }
            let s = self.stream();
            let (qkvp, _g1) = rows.view.device_ptr(s);
            let (bp, _g2) = bias.view.device_ptr(s);
            let (rhp, _g3) = rh.view.device_ptr(s);
            let (rwp, _g4) = rw.view.device_ptr(s);
            let mut ov = out
                .view_mut::<bf16>(n)
                .ok_or_else(|| backend_err(format!("{OP}: output view")))?;
            let (op, _g5) = ov.device_ptr_mut(s);
            let e = 2u64; // bytes per element
            let p = FlashParams {
                q: qkvp,
                k: qkvp + e * c as u64,
                v: qkvp + 2 * e * c as u64,
                o: op,
                rel_h: rhp,
                rel_w: rwp,
                pad_k: bp + e * c as u64,
                pad_v: bp + 2 * e * c as u64,
                q_stride: rows.stride as i64,
                k_stride: rows.stride as i64,
                v_stride: rows.stride as i64,
                o_stride: c as i64,
                tq: i32_arg(OP, "tokens", gh * gw)?,
                tk: (window * window) as i32,
                heads: heads as i32,
                kv_heads: heads as i32,
                scale,
                grid_h: gh as i32,
                grid_w: gw as i32,
                win: window as i32,
                win_cols: wc as i32,
                qtiles_per_win: qtiles as i32,
                ..Default::default()
            };
            self.launch_flash(&kern, (grid_x as u32, heads as u32, 1), &p)?;
        }
        Ok(Tensor::from_device(out, DType::BF16, [gh * gw, c].into()))
    }

    /// The device's per-block opt-in shared memory limit in bytes.
    fn max_smem_optin(&self) -> Result<usize> {
        let v = self
            .stream()
            .context()
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| driver_err("querying the shared memory limit", e))?;
        Ok(v.max(0) as usize)
    }

    // ------------------------------------------------------------------------ masked attention

    /// Mask2Former's attention mask from the previous prediction: `logits [nq, hs, ws]` (bf16 or
    /// f32) bilinearly resized (align_corners=False) to the level's `target = (ht, wt)`, kept
    /// where `sigmoid >= 0.5` (torch's `!(sigmoid < 0.5)` in f32), rows with no kept key made
    /// all-kept. The resize is fused: resized logits never exist in memory.
    pub fn attention_mask_bits(
        &self,
        logits: &Tensor,
        target: (usize, usize),
    ) -> Result<AttnMaskBits> {
        const OP: &str = "attention_mask_bits";
        let dims = logits.dims();
        if dims.len() != 3 || !logits.is_contiguous() {
            return Err(Error::shape(
                OP,
                format!("logits must be contiguous [nq, h, w], got {logits:?}"),
            ));
        }
        let (nq, hs, ws) = (dims[0], dims[1], dims[2]);
        let (ht, wt) = target;
        let keys = ht * wt;
        if keys > 0 && (hs == 0 || ws == 0) {
            return Err(Error::shape(OP, "cannot resize an empty mask"));
        }
        i32_arg(OP, "keys", keys)?;
        i32_arg(OP, "h * w", hs * ws)?;
        let words = 2 * keys.div_ceil(64);
        let mut buf = self.alloc(nq * words * 4)?;
        if nq > 0 && words > 0 {
            let buf_in = self.device_buf(OP, "logits", logits)?;
            let (kernel, esize) = match logits.dtype() {
                DType::BF16 => ("attn_mask_from_logits_bf16", 2),
                DType::F32 => ("attn_mask_from_logits_f32", 4),
                _ => return Err(dtype_err(OP, "logits", logits, "bf16 or f32")),
            };
            let n = nq * hs * ws;
            let inv = buf_in
                .view::<u8>(logits.offset() * esize, n * esize)
                .ok_or_else(|| backend_err(format!("{OP}: logits exceed their buffer")))?;
            let s = self.stream();
            let (lp, _g1) = inv.device_ptr(s);
            let mut bv = buf
                .view_mut::<u32>(nq * words)
                .ok_or_else(|| backend_err(format!("{OP}: bits view")))?;
            let (bp, _g2) = bv.device_ptr_mut(s);
            let (hs_i, ws_i, ht_i, wt_i, words_i) =
                (hs as i32, ws as i32, ht as i32, wt as i32, words as i32);
            let cfg = LaunchConfig {
                grid_dim: (i32_arg(OP, "queries", nq)? as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = s.launch_builder(self.function(kernel)?);
            b.arg(&lp)
                .arg(&bp)
                .arg(&hs_i)
                .arg(&ws_i)
                .arg(&ht_i)
                .arg(&wt_i)
                .arg(&words_i);
            // SAFETY: attn_mask_from_logits_*(const T*, uint32_t*, int hs, int ws, int ht, int wt,
            // int words): logits hold nq*hs*ws elements, bits nq*words; grid = nq rows.
            unsafe { b.launch(cfg) }.map_err(|e| driver_err(kernel, e))?;
        }
        Ok(AttnMaskBits {
            buf,
            rows: nq,
            keys,
            words,
        })
    }

    /// The keep bits on the host (`rows * words_per_row` u32). Waits for the GPU.
    pub fn mask_bits_to_host(&self, m: &AttnMaskBits) -> Result<Vec<u32>> {
        let n = m.rows * m.words;
        let mut v = vec![0u32; n];
        if n > 0 {
            let view = m
                .buf
                .view::<u32>(0, n)
                .ok_or_else(|| backend_err("mask bits view"))?;
            self.stream()
                .memcpy_dtoh(&view, &mut v)
                .map_err(|e| driver_err("copying mask bits to the host", e))?;
            self.synchronize()?;
        }
        Ok(v)
    }

    /// Mask2Former masked cross-attention: `q [nq, heads*32]`, `k`/`v [tk, heads*32]`, the keep
    /// bits of [`attention_mask_bits`](Self::attention_mask_bits) for `nq x tk` (one mask for all
    /// heads) -> `[nq, heads*32]` bf16. Keys are split over several CTAs (`splits`, None: chosen
    /// from the grid) and merged by a second pass.
    #[allow(clippy::too_many_arguments)]
    pub fn masked_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &AttnMaskBits,
        heads: usize,
        scale: f32,
        splits: Option<usize>,
    ) -> Result<Tensor> {
        const OP: &str = "masked_attention";
        let hd = MASKED_HD32.head_dim;
        let width = heads * hd;
        if heads == 0 || *q.dims().last().unwrap_or(&0) != width {
            return Err(Error::shape(
                OP,
                format!("q {} is not [nq, {heads} x {hd}]", q.shape()),
            ));
        }
        let qr = self.rows_of(OP, "q", q, width)?;
        let kr = self.rows_of(OP, "k", k, width)?;
        let vr = self.rows_of(OP, "v", v, width)?;
        let (tq, tk) = (qr.rows, kr.rows);
        if vr.rows != tk || mask.rows != tq || mask.keys != tk {
            return Err(Error::shape(
                OP,
                format!(
                    "q {tq} rows, k {tk}, v {}, mask {}x{}",
                    vr.rows, mask.rows, mask.keys
                ),
            ));
        }
        let mut out = self.alloc(tq * width * 2)?;
        if tq > 0 {
            let kern = MASKED_HD32;
            let qtiles = tq.div_ceil(kern.bm());
            let splits = splits
                .unwrap_or_else(|| self.auto_splits(qtiles * heads, tk.div_ceil(FLASH_BN)))
                .max(1);
            let s = self.stream();
            let (qp, _g1) = qr.view.device_ptr(s);
            let (kp, _g2) = kr.view.device_ptr(s);
            let (vp, _g3) = vr.view.device_ptr(s);
            let mv = mask
                .buf
                .view::<u32>(0, tq * mask.words)
                .ok_or_else(|| backend_err(format!("{OP}: mask view")))?;
            let (mp, _g4) = mv.device_ptr(s);
            let mut ov = out
                .view_mut::<bf16>(tq * width)
                .ok_or_else(|| backend_err(format!("{OP}: output view")))?;
            let (op, _g5) = ov.device_ptr_mut(s);
            let mut p = FlashParams {
                q: qp,
                k: kp,
                v: vp,
                o: op,
                mask: mp,
                q_stride: qr.stride as i64,
                k_stride: kr.stride as i64,
                v_stride: vr.stride as i64,
                o_stride: width as i64,
                tq: i32_arg(OP, "queries", tq)?,
                tk: i32_arg(OP, "keys", tk)?,
                heads: heads as i32,
                kv_heads: heads as i32,
                mask_words: mask.words as i32,
                scale,
                ..Default::default()
            };
            self.flash_with_splits(
                &kern,
                &mut p,
                (qtiles as u32, heads as u32),
                splits,
                tq,
                heads,
                hd,
                width,
            )?;
        }
        Ok(Tensor::from_device(out, DType::BF16, [tq, width].into()))
    }

    // ------------------------------------------------------------------------ paged KV

    /// A device KV pool for `cfg` (the CPU cache's geometry) with heads of `head_dim`, zeroed.
    pub fn alloc_paged_kv(&self, cfg: KvConfig, head_dim: usize) -> Result<DevicePagedKv> {
        const OP: &str = "alloc_paged_kv";
        if head_dim == 0
            || !cfg.kv_dim.is_multiple_of(head_dim)
            || !head_dim.is_multiple_of(8)
            || cfg.block_size == 0
        {
            return Err(Error::shape(
                OP,
                format!(
                    "kv_dim {} / head_dim {head_dim} / block_size {}: head_dim must be a multiple \
                     of 8 dividing kv_dim",
                    cfg.kv_dim, cfg.block_size
                ),
            ));
        }
        let elems = cfg
            .num_blocks
            .checked_mul(cfg.num_layers)
            .and_then(|n| n.checked_mul(cfg.block_size * cfg.kv_dim))
            .ok_or_else(|| Error::OutOfMemory("KV pool size overflows".into()))?;
        let mut k = self.alloc(elems * 2)?;
        let mut v = self.alloc(elems * 2)?;
        for b in [&mut k, &mut v] {
            self.stream()
                .memset_zeros(b.slice_mut())
                .map_err(|e| driver_err("zeroing the KV pool", e))?;
        }
        Ok(DevicePagedKv {
            k,
            v,
            cfg,
            head_dim,
        })
    }

    /// The whole K and V pools on the host (for tests and debugging). Waits for the GPU.
    pub fn paged_kv_to_host(&self, pool: &DevicePagedKv) -> Result<(Vec<bf16>, Vec<bf16>)> {
        let n = pool.cfg.num_blocks * pool.block_stride();
        let mut out = Vec::new();
        for b in [&pool.k, &pool.v] {
            let mut v = vec![bf16::ZERO; n];
            if n > 0 {
                let view = b
                    .view::<bf16>(0, n)
                    .ok_or_else(|| backend_err("KV pool view"))?;
                self.stream()
                    .memcpy_dtoh(&view, &mut v)
                    .map_err(|e| driver_err("copying the KV pool to the host", e))?;
            }
            out.push(v);
        }
        self.synchronize()?;
        let v = out.pop().unwrap_or_default();
        let k = out.pop().unwrap_or_default();
        Ok((k, v))
    }

    /// Writes `k`, `v [T, kv_dim]` (bf16 row tensors, e.g. column slices of the qkv projection)
    /// of `layer` into `slots[t] = block * block_size + offset` (negative: skipped).
    pub fn kv_append(
        &self,
        pool: &mut DevicePagedKv,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        slots: &DeviceIndex,
    ) -> Result<()> {
        const OP: &str = "kv_append";
        let cfg = pool.cfg;
        if layer >= cfg.num_layers {
            return Err(Error::shape(
                OP,
                format!("layer {layer} of {}", cfg.num_layers),
            ));
        }
        let kr = self.rows_of(OP, "k", k, cfg.kv_dim)?;
        let vr = self.rows_of(OP, "v", v, cfg.kv_dim)?;
        let t = kr.rows;
        if vr.rows != t || slots.len() != t {
            return Err(Error::shape(
                OP,
                format!("k {t} rows, v {}, {} slots", vr.rows, slots.len()),
            ));
        }
        let capacity = cfg.num_blocks * cfg.block_size;
        let mut seen = std::collections::HashSet::new();
        for &s in slots.as_slice() {
            if s >= 0 && (s as usize >= capacity || !seen.insert(s)) {
                return Err(Error::Input(format!(
                    "KV slot {s} is outside the pool ({capacity} slots) or repeated"
                )));
            }
        }
        if t == 0 {
            return Ok(());
        }
        let sv = self.index_view(slots)?;
        let off = pool.block_offset(0, layer);
        let span = pool.cfg.num_blocks * pool.block_stride() - off;
        let stride = pool.block_stride() as i64;
        let (bs, kvh, hd, t_i) = (
            cfg.block_size as i32,
            pool.kv_heads() as i32,
            pool.head_dim as i32,
            i32_arg(OP, "tokens", t)?,
        );
        let (ks, vs) = (kr.stride as i64, vr.stride as i64);
        let s = self.stream();
        let (kp, _g1) = kr.view.device_ptr(s);
        let (vp, _g2) = vr.view.device_ptr(s);
        let (sp, _g3) = sv.device_ptr(s);
        let DevicePagedKv {
            k: kpool, v: vpool, ..
        } = pool;
        let mut kpv = kpool
            .view_mut::<bf16>(off + span)
            .ok_or_else(|| backend_err("KV pool view"))?;
        let (kpp, _g4) = kpv.device_ptr_mut(s);
        let mut vpv = vpool
            .view_mut::<bf16>(off + span)
            .ok_or_else(|| backend_err("KV pool view"))?;
        let (vpp, _g5) = vpv.device_ptr_mut(s);
        let (kpl, vpl) = (kpp + 2 * off as u64, vpp + 2 * off as u64);
        let n = t * cfg.kv_dim / 8;
        let cfgl = LaunchConfig {
            grid_dim: (self.grid_for(n, 256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        const K: &str = "paged_kv_append_bf16";
        let mut b = s.launch_builder(self.function(K)?);
        b.arg(&kp)
            .arg(&vp)
            .arg(&ks)
            .arg(&vs)
            .arg(&sp)
            .arg(&kpl)
            .arg(&vpl)
            .arg(&stride)
            .arg(&bs)
            .arg(&kvh)
            .arg(&hd)
            .arg(&t_i);
        // SAFETY: paged_kv_append_bf16(const bf16* k, const bf16* v, long long, long long,
        // const int* slots, bf16* k_pool, bf16* v_pool, long long block_stride, int block_size,
        // int kv_heads, int head_dim, int tokens): k/v hold t rows of kv_dim, slots are in the
        // pool (checked above) and the layer's pools start at kpl/vpl.
        unsafe { b.launch(cfgl) }.map_err(|e| driver_err(K, e))?;
        Ok(())
    }

    /// Copies block `src` to block `dst` in every layer of both pools (the device side of the
    /// cache's copy on write: when `PagedKvCache::append` replaces a shared last block, copy the
    /// old block into the new one before appending to it).
    pub fn kv_copy_block(&self, pool: &mut DevicePagedKv, src: usize, dst: usize) -> Result<()> {
        let nb = pool.cfg.num_blocks;
        if src >= nb || dst >= nb {
            return Err(Error::Input(format!(
                "KV block copy {src} -> {dst} outside the pool of {nb} blocks"
            )));
        }
        if src == dst {
            return Ok(());
        }
        // All layers of one block are one contiguous run: (b * num_layers + l) * block_elems.
        let run = pool.cfg.num_layers * pool.block_elems();
        let total = nb * run;
        let s = self.stream();
        let DevicePagedKv { k, v, .. } = pool;
        for b in [k, v] {
            let mut view = b
                .view_mut::<bf16>(total)
                .ok_or_else(|| backend_err("KV pool view"))?;
            let (base, _g) = view.device_ptr_mut(s);
            // SAFETY: both ranges lie inside the pool buffer (src, dst < num_blocks) and do not
            // overlap (src != dst); the copy is queued on the stream that owns the buffer.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    base + (2 * dst * run) as u64,
                    base + (2 * src * run) as u64,
                    2 * run,
                    s.cu_stream(),
                )
            }
            .map_err(|e| driver_err("copying a KV block", e))?;
        }
        Ok(())
    }

    /// Checks a block table for queries at `pos0..pos0+nq` (keys `0..pos0+nq`): every block a
    /// query can see exists and lies in the pool.
    /// Checks shared by paged decode and paged prefill: layer and head counts against the pool,
    /// the window, the query rows and the block table. Returns the query rows and their width.
    #[allow(clippy::too_many_arguments)]
    fn paged_query<'a>(
        &self,
        op: &'static str,
        pool: &DevicePagedKv,
        layer: usize,
        q: &'a Tensor,
        table: &DeviceIndex,
        pos0: usize,
        heads: usize,
        window: Option<usize>,
    ) -> Result<(Rows<'a>, usize)> {
        let kv_heads = pool.kv_heads();
        if layer >= pool.cfg.num_layers || heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(Error::shape(
                op,
                format!("layer {layer}, {heads} heads over {kv_heads} kv heads"),
            ));
        }
        if window == Some(0) {
            return Err(Error::Input("sliding window must be at least 1".into()));
        }
        let width = heads * pool.head_dim;
        let qr = self.rows_of(op, "q", q, width)?;
        Self::check_table(op, pool, table.as_slice(), pos0, qr.rows, window)?;
        Ok((qr, width))
    }

    fn check_table(
        op: &'static str,
        pool: &DevicePagedKv,
        table: &[i32],
        pos0: usize,
        nq: usize,
        window: Option<usize>,
    ) -> Result<()> {
        let bs = pool.cfg.block_size;
        let len = pos0 + nq;
        if table.len() < len.div_ceil(bs) {
            return Err(Error::shape(
                op,
                format!("block table of {} blocks for {len} positions", table.len()),
            ));
        }
        let first = window.map_or(0, |w| (pos0 + 1).saturating_sub(w));
        for (b, &id) in table.iter().enumerate().take(len.div_ceil(bs)) {
            if id >= 0 && id as usize >= pool.cfg.num_blocks {
                return Err(Error::Input(format!(
                    "block table entry {b} = {id} outside the pool of {} blocks",
                    pool.cfg.num_blocks
                )));
            }
            if id < 0 && b >= first / bs {
                return Err(Error::Input(
                    "attention needs KV blocks already released by the sliding window".into(),
                ));
            }
        }
        Ok(())
    }

    /// Decode attention over the pool: `q [nq, heads*hd]` for the tokens at positions
    /// `pos0..pos0+nq` (their K/V already appended), keys through `table` (-1 = released; every
    /// block a query can see must be present), causal with the sliding window. Head dims 64, 96, 128. The
    /// context is split over CTAs (`split_len` keys each, None: chosen from the grid) and merged
    /// by a second pass.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_decode(
        &self,
        pool: &DevicePagedKv,
        layer: usize,
        q: &Tensor,
        table: &DeviceIndex,
        pos0: usize,
        heads: usize,
        scale: f32,
        window: Option<usize>,
        split_len: Option<usize>,
    ) -> Result<Tensor> {
        const OP: &str = "paged_decode";
        let hd = pool.head_dim;
        let kernel = match hd {
            64 => "paged_decode_hd64_bf16",
            96 => "paged_decode_hd96_bf16",
            128 => "paged_decode_hd128_bf16",
            _ => {
                return Err(backend_err(format!(
                    "{OP}: head dim {hd} has no kernel (64, 96, 128)"
                )))
            }
        };
        let (qr, width) = self.paged_query(OP, pool, layer, q, table, pos0, heads, window)?;
        let nq = qr.rows;
        let kv_heads = pool.kv_heads();
        let mut out = self.alloc(nq * width * 2)?;
        if nq > 0 {
            i32_arg(OP, "positions", pos0 + nq)?;
            // Widest key range of any query, and the split length.
            let range = window.map_or(pos0 + nq, |w| w.min(pos0 + nq));
            let round = 16 * DECODE_WARPS;
            let split_len = match split_len {
                Some(l) => l.max(1),
                None => {
                    let want = (2 * self.sm_count()).div_ceil(heads * nq).max(1);
                    range.div_ceil(want).div_ceil(round).max(1) * round
                }
            };
            let splits = range.div_ceil(split_len).max(1);
            if splits > 65_535 || nq > 65_535 || heads > i32::MAX as usize {
                return Err(Error::shape(OP, "grid too large"));
            }
            let tv = self.index_view(table)?;
            let s = self.stream();
            let (qp, _g1) = qr.view.device_ptr(s);
            let (tp, _g2) = tv.device_ptr(s);
            let (kv, vv) = pool.views()?;
            let (kpp, _g3) = kv.device_ptr(s);
            let (vpp, _g4) = vv.device_ptr(s);
            let off = 2 * pool.block_offset(0, layer) as u64;
            let mut ov = out
                .view_mut::<bf16>(nq * width)
                .ok_or_else(|| backend_err(format!("{OP}: output view")))?;
            let (op, _g5) = ov.device_ptr_mut(s);
            let rows = nq * heads;
            let mut partials = None;
            let (mut pop, mut pmlp) = (0u64, 0u64);
            if splits > 1 {
                let mut po = self.alloc(splits * rows * hd * 4)?;
                let mut pml = self.alloc(splits * rows * 2 * 4)?;
                {
                    let mut a = po
                        .view_mut::<f32>(splits * rows * hd)
                        .ok_or_else(|| backend_err("partials view"))?;
                    pop = a.device_ptr_mut(s).0;
                    let mut b = pml
                        .view_mut::<f32>(splits * rows * 2)
                        .ok_or_else(|| backend_err("partials view"))?;
                    pmlp = b.device_ptr_mut(s).0;
                }
                partials = Some((po, pml));
            }
            let p = PagedDecodeParams {
                q: qp,
                k_pool: kpp + off,
                v_pool: vpp + off,
                block_table: tp,
                o: op,
                part_o: pop,
                part_ml: pmlp,
                q_stride: qr.stride as i64,
                o_stride: width as i64,
                block_stride: pool.block_stride() as i64,
                nq: nq as i32,
                heads: heads as i32,
                kv_heads: kv_heads as i32,
                block_size: i32_arg(OP, "block_size", pool.cfg.block_size)?,
                pos0: pos0 as i32,
                window: window.map_or(0, |w| w.min(i32::MAX as usize)) as i32,
                split_len: i32_arg(OP, "split_len", split_len)?,
                scale,
            };
            let cfg = LaunchConfig {
                grid_dim: (heads as u32, splits as u32, nq as u32),
                block_dim: (32 * DECODE_WARPS as u32, 1, 1),
                shared_mem_bytes: (DECODE_WARPS * (hd + 2) * 4) as u32,
            };
            let mut b = s.launch_builder(self.function(kernel)?);
            b.arg(&p);
            // SAFETY: paged_decode_*(PagedDecodeParams) by value: q holds nq rows, the table
            // covers every block a query sees and names pool blocks only (check_table), the
            // pools hold num_blocks blocks of every layer, the output nq rows of heads*hd, the
            // partials (when splits > 1) splits*nq*heads*(hd + 2) floats; smem as the kernel's
            // check requires.
            unsafe { b.launch(cfg) }.map_err(|e| driver_err(kernel, e))?;
            if splits > 1 {
                self.launch_combine(pop, pmlp, op, rows, heads, hd, splits, width)?;
            }
            // The partial buffers are freed in stream order after the combine pass.
            drop(partials);
        }
        Ok(Tensor::from_device(out, DType::BF16, [nq, width].into()))
    }

    /// Prefill attention over cached keys: `q [nq, heads*96]` for positions `pos0..pos0+nq`
    /// (their K/V already appended) against keys `0..pos0+nq` through `table`, causal with the
    /// sliding window, on the tensor cores (flash kernel in paged mode). For a suffix after a
    /// cached prefix (a second prompt on the same image).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_prefill(
        &self,
        pool: &DevicePagedKv,
        layer: usize,
        q: &Tensor,
        table: &DeviceIndex,
        pos0: usize,
        heads: usize,
        scale: f32,
        window: Option<usize>,
    ) -> Result<Tensor> {
        const OP: &str = "paged_prefill";
        let hd = pool.head_dim;
        if hd != 96 {
            return Err(backend_err(format!(
                "{OP}: head dim {hd} has no kernel (96)"
            )));
        }
        let (qr, width) = self.paged_query(OP, pool, layer, q, table, pos0, heads, window)?;
        let nq = qr.rows;
        let kv_heads = pool.kv_heads();
        let mut out = self.alloc(nq * width * 2)?;
        if nq > 0 {
            let kern = FLASH_PAGED_HD96;
            let tk = pos0 + nq;
            let qtiles = nq.div_ceil(kern.bm());
            let tv = self.index_view(table)?;
            let s = self.stream();
            let (qp, _g1) = qr.view.device_ptr(s);
            let (tp, _g2) = tv.device_ptr(s);
            let (kv, vv) = pool.views()?;
            let (kpp, _g3) = kv.device_ptr(s);
            let (vpp, _g4) = vv.device_ptr(s);
            let off = 2 * pool.block_offset(0, layer) as u64;
            let mut ov = out
                .view_mut::<bf16>(nq * width)
                .ok_or_else(|| backend_err(format!("{OP}: output view")))?;
            let (op, _g5) = ov.device_ptr_mut(s);
            let mut p = FlashParams {
                q: qp,
                k: kpp + off,
                v: vpp + off,
                o: op,
                block_table: tp,
                q_stride: qr.stride as i64,
                o_stride: width as i64,
                block_stride: pool.block_stride() as i64,
                tq: i32_arg(OP, "queries", nq)?,
                tk: i32_arg(OP, "keys", tk)?,
                heads: heads as i32,
                kv_heads: kv_heads as i32,
                causal: 1,
                window: window.map_or(0, |w| w.min(i32::MAX as usize)) as i32,
                q_offset: pos0 as i32,
                block_size: i32_arg(OP, "block_size", pool.cfg.block_size)?,
                scale,
                ..Default::default()
            };
            let splits = self.auto_splits(
                qtiles * heads,
                window.unwrap_or(tk).min(tk).div_ceil(FLASH_BN),
            );
            self.flash_with_splits(
                &kern,
                &mut p,
                (qtiles as u32, heads as u32),
                splits,
                nq,
                heads,
                hd,
                width,
            )?;
        }
        Ok(Tensor::from_device(out, DType::BF16, [nq, width].into()))
    }

    // ------------------------------------------------------------------------ timing

    /// GPU time of the work `f` queues, in milliseconds, measured with CUDA events recorded on
    /// the backend's stream around it (waits for the end event). For benchmarks.
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f32> {
        let ctx = self.stream().context();
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = ctx
            .new_event(flags)
            .map_err(|e| driver_err("creating a timing event", e))?;
        let end = ctx
            .new_event(flags)
            .map_err(|e| driver_err("creating a timing event", e))?;
        start
            .record(self.stream())
            .map_err(|e| driver_err("recording an event", e))?;
        f()?;
        end.record(self.stream())
            .map_err(|e| driver_err("recording an event", e))?;
        start
            .elapsed_ms(&end)
            .map_err(|e| driver_err("reading the event timer", e))
    }
}

impl CudaBackend {
    /// Device-to-device copy bandwidth in GB/s ((read + write) bytes / time), the median of
    /// `reps` copies of `bytes` bytes timed with CUDA events: the memory ceiling benchmarks report
    /// rates against.
    pub fn copy_bandwidth_gbs(&self, bytes: usize, reps: usize) -> Result<f64> {
        let mut src = self.alloc(bytes)?;
        let mut dst = self.alloc(bytes)?;
        let s = self.stream();
        let mut sv = src
            .view_mut::<u8>(bytes)
            .ok_or_else(|| backend_err("copy view"))?;
        let (sp, _g1) = sv.device_ptr_mut(s);
        let mut dv = dst
            .view_mut::<u8>(bytes)
            .ok_or_else(|| backend_err("copy view"))?;
        let (dp, _g2) = dv.device_ptr_mut(s);
        let copy = || {
            // SAFETY: two distinct allocations of `bytes` bytes, queued on their stream.
            unsafe { cudarc::driver::result::memcpy_dtod_async(dp, sp, bytes, s.cu_stream()) }
                .map_err(|e| driver_err("device-to-device copy", e))
        };
        copy()?; // warm-up
        let mut t = Vec::with_capacity(reps.max(1));
        for _ in 0..reps.max(1) {
            t.push(self.time_ms(copy)? as f64);
        }
        t.sort_by(f64::total_cmp);
        let med = t[t.len() / 2];
        Ok(2.0 * bytes as f64 / (med * 1e-3) / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smem_matches_the_kernel_formula() {
        // FlashCfg::SMEM for each instantiation, computed by hand from flash_attn.cuh:
        // (BM + 2*64) * (HDP + 8) * 2 [+ BM * ((KW + 1) + (KW + 8)) * 4].
        assert_eq!(FLASH_HD64.smem(), (128 + 128) * 72 * 2);
        assert_eq!(FLASH_HD72.smem(), (64 + 128) * 88 * 2);
        assert_eq!(FLASH_HD96.smem(), (64 + 128) * 104 * 2);
        assert_eq!(MASKED_HD32.smem(), (128 + 128) * 40 * 2);
        assert_eq!(SAM_WINDOW.smem(), (64 + 128) * 72 * 2 + 64 * (17 + 24) * 4);
        assert_eq!(
            SAM_GLOBAL.smem(),
            (128 + 128) * 72 * 2 + 128 * (65 + 72) * 4
        );
        assert_eq!(
            SAM_GLOBAL_BM64.smem(),
            (64 + 128) * 72 * 2 + 64 * (65 + 72) * 4
        );
        // Only the global SAM kernels need the opt-in above 48 KiB: the 128-row one fits A100 and
        // H100 (163 / 227 KiB), the 64-row one the 99 KiB of sm_86 / sm_89.
        for k in [
            FLASH_HD64,
            FLASH_HD72,
            FLASH_HD96,
            FLASH_PAGED_HD96,
            MASKED_HD32,
            SAM_WINDOW,
        ] {
            assert!(k.smem() <= DEFAULT_SMEM_LIMIT, "{}", k.name);
        }
        assert!(SAM_GLOBAL.smem() <= 163 * 1024);
        assert!(SAM_GLOBAL_BM64.smem() <= 99 * 1024);
    }

    #[test]
    fn attention_kernels_are_registered() {
        for k in ATTENTION_KERNELS {
            assert!(
                super::super::kernels::KERNEL_NAMES.contains(k),
                "{k} missing from KERNEL_NAMES"
            );
        }
    }

    #[test]
    fn block_tables_map_released_blocks_to_minus_one() {
        assert_eq!(block_table_i32(&[None, Some(3), Some(0)]), vec![-1, 3, 0]);
    }
}
