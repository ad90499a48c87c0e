//! Device memory management: pool statistics, the memory budget check, weight upload in bf16 and
//! device-to-device copies into existing buffers.
//!
//! Allocations come from the device's default stream-ordered pool (`cuMemAllocAsync`), whose
//! release threshold the backend sets to "never" at open: freed blocks stay in the pool and are
//! handed out again, so a repeated forward pass does not call into the driver's allocator. The
//! pool's reserved size is what the process holds on the card; `pool_stats` reports it.

use super::context::{backend_err, driver_err, CudaBackend};
use crate::tensor::{HostData, Storage};
use crate::{DType, Error, Result, Tensor};
use cudarc::driver::{result as cu, sys, DevicePtr, DevicePtrMut};
use half::{bf16, f16};

/// Bytes of bf16 staged on the host per copy in `upload_bf16`.
pub const UPLOAD_CHUNK_BYTES: usize = 64 << 20;

/// The device's default memory pool and the graph memory pool, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Memory the default pool holds from the driver now / at most so far.
    pub reserved: u64,
    pub reserved_high: u64,
    /// Memory of live allocations from the default pool now / at most so far.
    pub used: u64,
    pub used_high: u64,
    /// Memory the device holds for CUDA graph allocations (made inside a capture).
    pub graph_reserved: u64,
    pub graph_used: u64,
}

/// Sum of the parts, or `Err` naming all of them when it exceeds `free`. Pure (unit-tested).
pub fn budget_check(parts: &[(&str, usize)], free: usize, total: usize) -> Result<()> {
    let sum = parts
        .iter()
        .try_fold(0usize, |acc, &(_, b)| acc.checked_add(b));
    let fits = sum.is_some_and(|s| s <= free);
    if fits {
        return Ok(());
    }
    let list = parts
        .iter()
        .map(|(name, b)| format!("{name} {}", human_bytes(*b as u128)))
        .collect::<Vec<_>>()
        .join(" + ");
    let need = parts.iter().map(|&(_, b)| b as u128).sum::<u128>();
    Err(Error::OutOfMemory(format!(
        "cuda: the model does not fit on this card: needs {} ({list}), the card has {} free of {}",
        human_bytes(need),
        human_bytes(free as u128),
        human_bytes(total as u128)
    )))
}

/// `1536 MiB`-style size (binary units, one decimal above KiB).
pub fn human_bytes(b: u128) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The element ranges `upload_bf16` copies one at a time: `[start, end)` of at most
/// `chunk_elems` elements each, covering `0..n`.
pub fn chunk_ranges(n: usize, chunk_elems: usize) -> impl Iterator<Item = (usize, usize)> {
    let step = chunk_elems.max(1);
    (0..n.div_ceil(step)).map(move |i| (i * step, ((i + 1) * step).min(n)))
}

/// Host elements `[start, end)` of `bytes` (little-endian `dtype`) as bf16, appended to `out`.
/// Reads unaligned bytes (a mapped file gives no alignment guarantee) without copying twice.
fn convert_to_bf16(bytes: &[u8], dtype: DType, start: usize, end: usize, out: &mut Vec<bf16>) {
    let es = dtype.size_in_bytes();
    let src = &bytes[start * es..end * es];
    out.clear();
    match dtype {
        DType::BF16 => out.extend(
            src.chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))),
        ),
        DType::F16 => out
            .extend(src.chunks_exact(2).map(|c| {
                bf16::from_f32(f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            })),
        DType::F32 => out.extend(
            src.chunks_exact(4)
                .map(|c| bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        ),
    }
}

impl CudaBackend {
    fn default_pool(&self) -> Result<sys::CUmemoryPool> {
        let ctx = self.stream().context();
        ctx.bind_to_thread()
            .map_err(|e| driver_err("binding the context", e))?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: out-parameter call on the context's device.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
            .result()
            .map_err(|e| driver_err("cuDeviceGetDefaultMemPool", e))?;
        Ok(pool)
    }

    /// Reserved and used bytes of the device's default pool and of its graph memory.
    pub fn pool_stats(&self) -> Result<PoolStats> {
        if !self.stream().context().has_async_alloc() {
            return Err(backend_err(
                "pool_stats: this device has no stream-ordered memory pool",
            ));
        }
        let pool = self.default_pool()?;
        let pool_attr = |a: sys::CUmemPool_attribute| -> Result<u64> {
            let mut v: u64 = 0;
            // SAFETY: the *_MEM_* pool attributes are cuuint64_t, which `v` is.
            unsafe { cu::mem_pool::get_attribute(pool, a, (&mut v as *mut u64).cast()) }
                .map_err(|e| driver_err("cuMemPoolGetAttribute", e))?;
            Ok(v)
        };
        let dev = self.stream().context().cu_device();
        let graph_attr = |a: sys::CUgraphMem_attribute| -> Result<u64> {
            let mut v: u64 = 0;
            // SAFETY: the graph memory attributes are cuuint64_t, which `v` is.
            unsafe { sys::cuDeviceGetGraphMemAttribute(dev, a, (&mut v as *mut u64).cast()) }
                .result()
                .map_err(|e| driver_err("cuDeviceGetGraphMemAttribute", e))?;
            Ok(v)
        };
        use sys::CUgraphMem_attribute as G;
        use sys::CUmemPool_attribute as A;
        Ok(PoolStats {
            reserved: pool_attr(A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
            reserved_high: pool_attr(A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
            used: pool_attr(A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
            used_high: pool_attr(A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            graph_reserved: graph_attr(G::CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT)?,
            graph_used: graph_attr(G::CU_GRAPH_MEM_ATTR_USED_MEM_CURRENT)?,
        })
    }

    /// Checks that `parts` (name, bytes: weights, arena, KV pool...) fit in the card's free
    /// memory now; `Error::OutOfMemory` naming every part and the card's free/total otherwise.
    pub fn check_budget(&self, parts: &[(&str, usize)]) -> Result<()> {
        let (free, total) = self.mem_info()?;
        budget_check(parts, free, total)
            .map_err(|e| Error::OutOfMemory(format!("{} ({})", e, self.device_name())))
    }

    /// A device bf16 copy of `t` (f32, f16 or bf16; host, possibly a mapped file, or device).
    /// Host data is converted on the host in chunks of `UPLOAD_CHUNK_BYTES` of bf16 and copied
    /// chunk by chunk; `progress` gets the number of source bytes done after each chunk. A device
    /// tensor is cast on the device (progress reports it as one chunk).
    pub fn upload_bf16(&self, t: &Tensor, progress: &mut dyn FnMut(usize)) -> Result<Tensor> {
        const OP: &str = "upload_bf16";
        let src_bytes = t.numel() * t.dtype().size_in_bytes();
        if let Storage::Device(b) = t.storage() {
            self.check_device(OP, b)?;
            let out = self.cast(t, DType::BF16)?;
            progress(src_bytes);
            return Ok(out);
        }
        // Strided host views are made contiguous first (weights are contiguous: no copy).
        let owned;
        let t = if t.is_contiguous() {
            t
        } else {
            owned = t.contiguous()?;
            &owned
        };
        let host: &HostData = match t.storage() {
            Storage::Host(h) => h,
            Storage::Device(_) => return Err(backend_err(format!("{OP}: storage changed"))),
        };
        let dtype = t.dtype();
        let es = dtype.size_in_bytes();
        let n = t.numel();
        let all = host.bytes();
        let start = t.offset() * es;
        let bytes = all
            .get(start..start + n * es)
            .ok_or_else(|| backend_err(format!("{OP}: {t:?} exceeds its host storage")))?;
        let mut buf = self.alloc(n * 2)?;
        let stream = self.stream().clone();
        let base = {
            let (p, _sync) = buf.slice_mut().device_ptr_mut(&stream);
            p
        };
        let mut staging: Vec<bf16> = Vec::with_capacity((UPLOAD_CHUNK_BYTES / 2).min(n));
        for (s, e) in chunk_ranges(n, UPLOAD_CHUNK_BYTES / 2) {
            convert_to_bf16(bytes, dtype, s, e, &mut staging);
            // A copy from pageable memory returns once the driver has staged the source, so the
            // staging vector can be refilled right after (the DMA overlaps the next conversion).
            // SAFETY: [s, e) elements of bf16 at `base` lie inside the n*2-byte allocation.
            unsafe { cu::memcpy_htod_async(base + (s * 2) as u64, &staging, stream.cu_stream()) }
                .map_err(|err| driver_err(&format!("{OP}: copying {} bytes", (e - s) * 2), err))?;
            progress(e * es);
        }
        if n == 0 {
            progress(0);
        }
        Ok(Tensor::from_device(buf, DType::BF16, t.shape().clone()))
    }

    /// Copies the contiguous device tensor `src` into the memory of `dst` (same dtype and
    /// element count, contiguous, this device), in stream order.
    ///
    /// `dst` is written through a shared reference: device memory is outside Rust's aliasing
    /// rules and all work is ordered on the backend's one stream. This is how results leave a
    /// captured CUDA graph: the graph writes into buffers allocated before the capture.
    pub fn copy_into(&self, src: &Tensor, dst: &Tensor) -> Result<()> {
        const OP: &str = "copy_into";
        if src.dtype() != dst.dtype() {
            return Err(Error::DType {
                op: OP,
                expected: dst.dtype().to_string(),
                found: src.dtype().to_string(),
            });
        }
        if src.numel() != dst.numel() {
            return Err(Error::shape(
                OP,
                format!("{} into {}: sizes differ", src.shape(), dst.shape()),
            ));
        }
        let es = src.dtype().size_in_bytes();
        let bytes = src.numel() * es;
        let addr = |t: &Tensor| -> Result<u64> {
            let b = match t.storage() {
                Storage::Device(b) => b,
                Storage::Host(_) => {
                    return Err(backend_err(format!("{OP}: {t:?} is on the host")));
                }
            };
            self.check_device(OP, b)?;
            if !t.is_contiguous() {
                return Err(Error::shape(OP, format!("{t:?} is not contiguous")));
            }
            let v = b
                .view::<u8>(t.offset() * es, bytes)
                .ok_or_else(|| backend_err(format!("{OP}: {t:?} exceeds its buffer")))?;
            let (p, _sync) = v.device_ptr(self.stream());
            Ok(p)
        };
        let (s, d) = (addr(src)?, addr(dst)?);
        if bytes == 0 || s == d {
            return Ok(());
        }
        // SAFETY: both ranges were checked against their buffers; same device and stream.
        unsafe { cu::memcpy_dtod_async(d, s, bytes, self.stream().cu_stream()) }
            .map_err(|e| driver_err(OP, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_names_every_part_and_the_card() {
        let parts = [
            ("weights", 7usize << 30),
            ("arena", 512 << 20),
            ("kv pool", 1 << 30),
        ];
        assert!(budget_check(&parts, 9 << 30, 80 << 30).is_ok());
        let err = budget_check(&parts, 8 << 30, 24 << 30).unwrap_err();
        assert!(matches!(err, Error::OutOfMemory(_)));
        let msg = err.to_string();
        for want in [
            "weights 7.0 GiB",
            "arena 512.0 MiB",
            "kv pool 1.0 GiB",
            "needs 8.5 GiB",
            "8.0 GiB free of 24.0 GiB",
        ] {
            assert!(msg.contains(want), "{want:?} missing from {msg:?}");
        }
    }

    #[test]
    fn budget_overflow_is_an_error_not_a_wrap() {
        let parts = [("a", usize::MAX), ("b", 2)];
        assert!(budget_check(&parts, usize::MAX, usize::MAX).is_err());
    }

    #[test]
    fn chunks_cover_the_range_once() {
        for (n, c) in [
            (0, 4),
            (1, 4),
            (4, 4),
            (5, 4),
            (1000, 7),
            (33_554_433, 33_554_432),
        ] {
            let r: Vec<_> = chunk_ranges(n, c).collect();
            assert_eq!(r.len(), n.div_ceil(c));
            let mut next = 0;
            for &(s, e) in &r {
                assert_eq!(s, next);
                assert!(e > s && e - s <= c);
                next = e;
            }
            assert_eq!(next, n);
        }
    }

    #[test]
    fn host_conversion_rounds_like_half() {
        let vals = [1.0f32, -2.5, 1.234_567_9, 1e-3, 65504.0, -0.0];
        let mut out = Vec::new();
        let f32_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        convert_to_bf16(&f32_bytes, DType::F32, 1, 5, &mut out);
        let want: Vec<bf16> = vals[1..5].iter().map(|&v| bf16::from_f32(v)).collect();
        assert_eq!(out, want);
        // Unaligned f16 source (offset by one byte inside a larger buffer).
        let h: Vec<u8> = std::iter::once(0u8)
            .chain(vals.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()))
            .collect();
        convert_to_bf16(&h[1..], DType::F16, 0, vals.len(), &mut out);
        let want: Vec<bf16> = vals
            .iter()
            .map(|&v| bf16::from_f32(f16::from_f32(v).to_f32()))
            .collect();
        assert_eq!(out, want);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(17), "17 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
