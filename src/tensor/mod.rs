//! `Tensor`: a shape, a dtype and a view (strides + offset) into shared storage.
//!
//! Storage is host memory (owned vectors, or a slice of a memory-mapped weights file) or device
//! memory owned by the CUDA backend. Views (`narrow`, `transpose`, `permute`, `reshape` of a
//! contiguous tensor) share the storage and cost nothing; `contiguous` copies when needed.

mod dtype;
mod shape;

pub use dtype::{DType, Element};
pub use shape::Shape;

use crate::{Error, Result};
use half::{bf16, f16};
use std::sync::Arc;

/// Host memory. `Mapped` points into a memory-mapped safetensors file (read-only).
pub enum HostData {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    Mapped {
        map: Arc<memmap2::Mmap>,
        /// Byte range of the tensor inside the map; checked against the map length at creation
        /// and aligned to the element size (the loader copies unaligned tensors instead).
        start: usize,
        len: usize,
        dtype: DType,
    },
}

pub enum Storage {
    Host(HostData),
    Device(crate::backend::cuda::DeviceBuffer),
}

impl HostData {
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::BF16(_) => DType::BF16,
            HostData::F16(_) => DType::F16,
            HostData::Mapped { dtype, .. } => *dtype,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match self {
            HostData::F32(v) => bytemuck::cast_slice(v),
            HostData::BF16(v) => bytemuck::cast_slice(v),
            HostData::F16(v) => bytemuck::cast_slice(v),
            HostData::Mapped {
                map, start, len, ..
            } => &map[*start..*start + *len],
        }
    }

    /// Number of elements held.
    pub fn len(&self) -> usize {
        self.bytes().len() / self.dtype().size_in_bytes()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    dtype: DType,
    shape: Shape,
    strides: Vec<usize>,
    offset: usize,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({}, {}, {})",
            self.shape,
            self.dtype,
            if self.is_host() { "host" } else { "device" }
        )
    }
}

fn check_len(op: &'static str, shape: &Shape, len: usize) -> Result<()> {
    match shape.checked_numel() {
        Some(n) if n == len => Ok(()),
        _ => Err(Error::shape(
            op,
            format!("shape {shape} does not hold {len} elements"),
        )),
    }
}

impl Tensor {
    // ---------------------------------------------------------------- construction

    fn from_host(data: HostData, shape: Shape) -> Self {
        let strides = shape.contiguous_strides();
        Tensor {
            dtype: data.dtype(),
            storage: Arc::new(Storage::Host(data)),
            shape,
            strides,
            offset: 0,
        }
    }

    /// A contiguous tensor owning `data`.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        check_len("from_vec", &shape, data.len())?;
        // Element is implemented for exactly these three types; cast_vec is free for the match.
        let host = match T::DTYPE {
            DType::F32 => HostData::F32(bytemuck::allocation::cast_vec(data)),
            DType::BF16 => HostData::BF16(bytemuck::allocation::cast_vec(data)),
            DType::F16 => HostData::F16(bytemuck::allocation::cast_vec(data)),
        };
        Ok(Self::from_host(host, shape))
    }

    pub fn from_f32(data: Vec<f32>, shape: impl Into<Shape>) -> Result<Self> {
        Self::from_vec(data, shape)
    }

    pub fn from_slice<T: Element>(data: &[T], shape: impl Into<Shape>) -> Result<Self> {
        Self::from_vec(data.to_vec(), shape)
    }

    pub fn zeros(shape: impl Into<Shape>, dtype: DType) -> Self {
        let shape = shape.into();
        let n = shape.numel();
        let host = match dtype {
            DType::F32 => HostData::F32(vec![0.0; n]),
            DType::BF16 => HostData::BF16(vec![bf16::ZERO; n]),
            DType::F16 => HostData::F16(vec![f16::ZERO; n]),
        };
        Self::from_host(host, shape)
    }

    pub fn scalar(x: f32) -> Self {
        Self::from_host(HostData::F32(vec![x]), Shape::new(vec![]))
    }

    /// A tensor viewing `len` bytes at `start` of a memory map. Fails if the range is outside
    /// the map, does not match the shape, or is not aligned for the element type.
    pub fn from_mmap(
        map: Arc<memmap2::Mmap>,
        start: usize,
        len: usize,
        dtype: DType,
        shape: impl Into<Shape>,
    ) -> Result<Self> {
        let shape = shape.into();
        let end = start
            .checked_add(len)
            .filter(|&e| e <= map.len())
            .ok_or_else(|| Error::shape("from_mmap", "byte range outside the mapped file"))?;
        let _ = end;
        let esize = dtype.size_in_bytes();
        if !len.is_multiple_of(esize) {
            return Err(Error::shape(
                "from_mmap",
                "byte length not a multiple of the element size",
            ));
        }
        check_len("from_mmap", &shape, len / esize)?;
        if !(map.as_ptr() as usize + start).is_multiple_of(esize) {
            return Err(Error::shape("from_mmap", "unaligned tensor data"));
        }
        Ok(Self::from_host(
            HostData::Mapped {
                map,
                start,
                len,
                dtype,
            },
            shape,
        ))
    }

    /// A tensor backed by device memory (used by the CUDA backend).
    pub fn from_device(
        buf: crate::backend::cuda::DeviceBuffer,
        dtype: DType,
        shape: Shape,
    ) -> Self {
        let strides = shape.contiguous_strides();
        Tensor {
            storage: Arc::new(Storage::Device(buf)),
            dtype,
            shape,
            strides,
            offset: 0,
        }
    }

    // ---------------------------------------------------------------- accessors

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    pub fn rank(&self) -> usize {
        self.shape.rank()
    }

    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn is_host(&self) -> bool {
        matches!(*self.storage, Storage::Host(_))
    }

    /// `dim` in `0..rank`, or an error naming the op.
    pub fn dim(&self, d: usize) -> Result<usize> {
        self.dims()
            .get(d)
            .copied()
            .ok_or_else(|| Error::shape("dim", format!("dim {d} out of range for {}", self.shape)))
    }

    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&d, &s) in self.dims().iter().zip(&self.strides).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }

    fn host(&self) -> Result<&HostData> {
        match &*self.storage {
            Storage::Host(h) => Ok(h),
            Storage::Device(_) => Err(Error::Backend {
                backend: "cpu",
                msg: "tensor lives on the device; copy it to the host first".into(),
            }),
        }
    }

    /// The contiguous elements of a host tensor whose dtype is `T`.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        if T::DTYPE != self.dtype {
            return Err(Error::DType {
                op: "as_slice",
                expected: T::DTYPE.to_string(),
                found: self.dtype.to_string(),
            });
        }
        if !self.is_contiguous() {
            return Err(Error::shape("as_slice", "tensor is not contiguous"));
        }
        let bytes = self.host()?.bytes();
        let all: &[T] = bytemuck::try_cast_slice(bytes)
            .map_err(|e| Error::shape("as_slice", format!("cannot view bytes: {e}")))?;
        Ok(&all[self.offset..self.offset + self.numel()])
    }

    /// Shorthand for `as_slice::<f32>()`.
    pub fn f32s(&self) -> Result<&[f32]> {
        self.as_slice::<f32>()
    }

    /// All elements in logical (row-major) order, widened to f32. Works for any strides.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        fn gather<T: Element>(t: &Tensor, all: &[T]) -> Vec<f32> {
            if t.is_contiguous() {
                return all[t.offset..t.offset + t.numel()]
                    .iter()
                    .map(|x| x.to_f32())
                    .collect();
            }
            let mut out = Vec::with_capacity(t.numel());
            for_each_index(t.dims(), &t.strides, t.offset, |i| {
                out.push(all[i].to_f32())
            });
            out
        }
        let h = self.host()?;
        let bytes = h.bytes();
        Ok(match self.dtype {
            DType::F32 => gather::<f32>(self, cast_or_copy(bytes).as_ref()),
            DType::BF16 => gather::<bf16>(self, cast_or_copy(bytes).as_ref()),
            DType::F16 => gather::<f16>(self, cast_or_copy(bytes).as_ref()),
        })
    }

    /// Scalar value of a one-element tensor.
    pub fn to_scalar_f32(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::shape(
                "to_scalar",
                format!("tensor {} is not a scalar", self.shape),
            ));
        }
        Ok(self.to_vec_f32()?[0])
    }

    // ---------------------------------------------------------------- views

    /// Same data, new shape. Requires a contiguous tensor (call `contiguous` first otherwise).
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.checked_numel() != Some(self.numel()) {
            return Err(Error::shape(
                "reshape",
                format!("cannot reshape {} into {}", self.shape, shape),
            ));
        }
        let t = if self.is_contiguous() {
            self.clone()
        } else {
            self.contiguous()?
        };
        Ok(Tensor {
            strides: shape.contiguous_strides(),
            shape,
            ..t
        })
    }

    /// Elements `start..start+len` along `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        let d = self.dim(dim)?;
        if start.checked_add(len).is_none_or(|e| e > d) {
            return Err(Error::shape(
                "narrow",
                format!(
                    "range {start}..{} outside dim {dim} of {}",
                    start + len,
                    self.shape
                ),
            ));
        }
        let mut dims = self.dims().to_vec();
        dims[dim] = len;
        Ok(Tensor {
            offset: self.offset + start * self.strides[dim],
            shape: Shape::new(dims),
            ..self.clone()
        })
    }

    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let r = self.rank();
        let mut seen = vec![false; r];
        if perm.len() != r
            || perm
                .iter()
                .any(|&p| p >= r || std::mem::replace(&mut seen[p], true))
        {
            return Err(Error::shape(
                "permute",
                format!("{perm:?} is not a permutation of {r} dims"),
            ));
        }
        Ok(Tensor {
            shape: Shape::new(perm.iter().map(|&p| self.dims()[p]).collect::<Vec<_>>()),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
            ..self.clone()
        })
    }

    pub fn transpose(&self, a: usize, b: usize) -> Result<Tensor> {
        let mut perm: Vec<usize> = (0..self.rank()).collect();
        if a >= perm.len() || b >= perm.len() {
            return Err(Error::shape(
                "transpose",
                format!("dims {a},{b} out of range for {}", self.shape),
            ));
        }
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// A contiguous copy (or the tensor itself when it already is contiguous).
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        let h = self.host()?;
        let bytes = h.bytes();
        fn gather<T: Element>(t: &Tensor, all: &[T]) -> Vec<T> {
            let mut out = Vec::with_capacity(t.numel());
            for_each_index(t.dims(), &t.strides, t.offset, |i| out.push(all[i]));
            out
        }
        match self.dtype {
            DType::F32 => Tensor::from_vec(
                gather::<f32>(self, cast_or_copy(bytes).as_ref()),
                self.shape.clone(),
            ),
            DType::BF16 => Tensor::from_vec(
                gather::<bf16>(self, cast_or_copy(bytes).as_ref()),
                self.shape.clone(),
            ),
            DType::F16 => Tensor::from_vec(
                gather::<f16>(self, cast_or_copy(bytes).as_ref()),
                self.shape.clone(),
            ),
        }
    }

    /// A contiguous copy converted to `dtype` (round to nearest even when narrowing).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype {
            return self.contiguous();
        }
        let v = self.to_vec_f32()?;
        let shape = self.shape.clone();
        match dtype {
            DType::F32 => Tensor::from_vec(v, shape),
            DType::BF16 => {
                Tensor::from_vec(v.into_iter().map(bf16::from_f32).collect::<Vec<_>>(), shape)
            }
            DType::F16 => {
                Tensor::from_vec(v.into_iter().map(f16::from_f32).collect::<Vec<_>>(), shape)
            }
        }
    }

    /// Raw little-endian bytes of a contiguous host tensor (for writing files).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let t = self.contiguous()?;
        let esize = t.dtype.size_in_bytes();
        let bytes = t.host()?.bytes();
        Ok(bytes[t.offset * esize..(t.offset + t.numel()) * esize].to_vec())
    }
}

/// View bytes as `T` without copying when aligned, else copy (mapped files give no alignment
/// guarantee for every tensor).
fn cast_or_copy<T: Element>(bytes: &[u8]) -> std::borrow::Cow<'_, [T]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => std::borrow::Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
    }
}

/// Calls `f` with the storage index of every element of a strided view, in row-major order.
pub(crate) fn for_each_index(
    dims: &[usize],
    strides: &[usize],
    offset: usize,
    mut f: impl FnMut(usize),
) {
    if dims.contains(&0) {
        return;
    }
    let r = dims.len();
    let mut idx = vec![0usize; r];
    let mut pos = offset;
    loop {
        f(pos);
        // Odometer increment from the last dimension.
        let mut k = r;
        loop {
            if k == 0 {
                return;
            }
            k -= 1;
            idx[k] += 1;
            pos += strides[k];
            if idx[k] < dims[k] {
                break;
            }
            pos -= strides[k] * dims[k];
            idx[k] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_share_and_copy_correctly() {
        let t = Tensor::from_f32((0..24).map(|x| x as f32).collect(), [2, 3, 4]).unwrap();
        let p = t.permute(&[2, 0, 1]).unwrap();
        assert_eq!(p.dims(), &[4, 2, 3]);
        let v = p.to_vec_f32().unwrap();
        // p[a,b,c] = t[b,c,a] = b*12 + c*4 + a
        for a in 0..4 {
            for b in 0..2 {
                for c in 0..3 {
                    assert_eq!(v[a * 6 + b * 3 + c], (b * 12 + c * 4 + a) as f32);
                }
            }
        }
        let n = t.narrow(2, 1, 2).unwrap();
        assert_eq!(
            n.to_vec_f32().unwrap(),
            vec![1., 2., 5., 6., 9., 10., 13., 14., 17., 18., 21., 22.]
        );
        assert!(!n.is_contiguous());
        assert!(t.narrow(2, 3, 2).is_err());
        assert!(t.reshape([5, 5]).is_err());
        assert!(t.permute(&[0, 0, 1]).is_err());
        let b = t.to_dtype(DType::BF16).unwrap();
        assert_eq!(b.to_vec_f32().unwrap(), t.to_vec_f32().unwrap());
        assert!(Tensor::from_f32(vec![1.0; 5], [2, 3]).is_err());
    }
}
