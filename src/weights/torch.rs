//! Reading PyTorch checkpoints written by `torch.save` (the zip format of torch >= 1.6), without
//! Python.
//!
//! The file is a zip archive (entries stored uncompressed, 64-byte aligned) with one folder
//! whose name varies (the file stem at save time, e.g. `pytorch_model/` or `archive/`):
//!
//! | entry | content |
//! |---|---|
//! | `<dir>/data.pkl` | the pickled object; tensors refer to their storages by a persistent id |
//! | `<dir>/data/<key>` | the raw bytes of storage `key` (little-endian elements) |
//! | `<dir>/byteorder` | `little` or `big` (absent in files from torch < 1.10: little) |
//! | `<dir>/version`, `.format_version`, ... | not needed |
//!
//! A tensor is pickled as `torch._utils._rebuild_tensor_v2(storage, storage_offset, size,
//! stride, requires_grad, backward_hooks[, metadata])`, where `storage` is the result of a
//! `BINPERSID` on the tuple `('storage', torch.<Type>Storage, key, location, numel)`. Several
//! tensors may share one storage at different offsets; a tensor may be a non-contiguous view.
//!
//! The pickle is run by a small stack machine written here for the subset of the protocol that
//! `torch.save` uses (protocols 2 to 5, binary opcodes). Only the globals a state dict needs are
//! accepted (`collections.OrderedDict`, the `torch._utils._rebuild_*` functions, the storage
//! types, `_codecs.encode`); anything else is an error naming it, so nothing in the file can
//! run code or build arbitrary objects. Containers live in an arena (values refer to them by
//! index), so deep or cyclic structures cannot overflow the stack.
//!
//! The file is memory-mapped; stored entries are read in place (a 9 GB checkpoint is never
//! loaded into memory). Deflated entries (a repacked archive) are decompressed into memory.
//! Every size and offset read from the file is checked against the data it points into before
//! it is used.
//!
//! What is accepted as the state dict: the top-level dict when it holds tensors, else the dict
//! under `module`, `state_dict` or `model` (DeepSpeed saves `{'module': state_dict}` in some
//! modes). A leading `module.` is stripped from the tensor names. Entries that are not tensors
//! are listed in [`TorchCheckpoint::non_tensor_keys`].

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use crate::weights::TensorSource;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn werr(path: &Path, msg: impl Into<String>) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

// ------------------------------------------------------------------------------------ dtypes

/// Element type of a torch storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TorchDType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl TorchDType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            TorchDType::F64 | TorchDType::I64 => 8,
            TorchDType::F32 | TorchDType::I32 => 4,
            TorchDType::F16 | TorchDType::BF16 | TorchDType::I16 => 2,
            TorchDType::I8 | TorchDType::U8 | TorchDType::Bool => 1,
        }
    }

    /// torch's spelling (`torch.float32` without the `torch.`).
    pub fn name(self) -> &'static str {
        match self {
            TorchDType::F64 => "float64",
            TorchDType::F32 => "float32",
            TorchDType::F16 => "float16",
            TorchDType::BF16 => "bfloat16",
            TorchDType::I64 => "int64",
            TorchDType::I32 => "int32",
            TorchDType::I16 => "int16",
            TorchDType::I8 => "int8",
            TorchDType::U8 => "uint8",
            TorchDType::Bool => "bool",
        }
    }

    /// The dtype of a legacy storage class (`torch.BFloat16Storage` -> bf16).
    pub fn from_storage_type(name: &str) -> Option<TorchDType> {
        Some(match name {
            "DoubleStorage" => TorchDType::F64,
            "FloatStorage" => TorchDType::F32,
            "HalfStorage" => TorchDType::F16,
            "BFloat16Storage" => TorchDType::BF16,
            "LongStorage" => TorchDType::I64,
            "IntStorage" => TorchDType::I32,
            "ShortStorage" => TorchDType::I16,
            "CharStorage" => TorchDType::I8,
            "ByteStorage" => TorchDType::U8,
            "BoolStorage" => TorchDType::Bool,
            _ => return None,
        })
    }

    pub fn is_float(self) -> bool {
        matches!(
            self,
            TorchDType::F64 | TorchDType::F32 | TorchDType::F16 | TorchDType::BF16
        )
    }

    /// The runtime dtype with the same element type, if there is one.
    pub fn to_dtype(self) -> Option<DType> {
        match self {
            TorchDType::F32 => Some(DType::F32),
            TorchDType::F16 => Some(DType::F16),
            TorchDType::BF16 => Some(DType::BF16),
            _ => None,
        }
    }
}

impl std::fmt::Display for TorchDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

// ------------------------------------------------------------------------------------ conversion

/// f32 -> bf16 bits as torch's `.to(torch.bfloat16)` rounds an f32 tensor on the CPU: nearest,
/// ties to even; every NaN becomes 0xFFFF (what ATen's vectorised conversion writes).
///
/// NaN bits are not something torch keeps consistent: f16 sources (and f64 ones on some paths)
/// go through the scalar `c10::BFloat16` constructor, which writes 0x7FC0. The conversion here
/// follows that split (f32: 0xFFFF, f16 / f64: 0x7FC0); either way a NaN stays a NaN.
#[inline]
pub fn bf16_bits_from_f32(x: f32) -> u16 {
    if x.is_nan() {
        return 0xFFFF;
    }
    let u = x.to_bits();
    let bias = ((u >> 16) & 1) + 0x7FFF;
    (u.wrapping_add(bias) >> 16) as u16
}

#[inline]
fn elem_to_f32(b: &[u8], from: TorchDType) -> f32 {
    match from {
        TorchDType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        TorchDType::F16 => half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        TorchDType::BF16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
        // torch converts double to bf16 / f16 through float (c10's constructors take a float).
        TorchDType::F64 => {
            f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
        }
        _ => 0.0,
    }
}

/// What to do with the elements while copying them out of a storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Conv {
    /// Raw bytes in the stored dtype.
    Copy,
    /// Converted to a runtime dtype (floating-point sources only).
    To(DType),
}

/// Appends `src` (whole elements of `from`) to `out`, converted as `conv` says.
fn convert_into(src: &[u8], from: TorchDType, conv: Conv, out: &mut Vec<u8>) {
    let es = from.size_in_bytes();
    match conv {
        Conv::Copy => out.extend_from_slice(src),
        Conv::To(to) if from.to_dtype() == Some(to) => out.extend_from_slice(src),
        Conv::To(DType::BF16) => {
            let scalar_nan = from != TorchDType::F32;
            for e in src.chunks_exact(es) {
                let x = elem_to_f32(e, from);
                let b = if scalar_nan && x.is_nan() {
                    0x7FC0
                } else {
                    bf16_bits_from_f32(x)
                };
                out.extend_from_slice(&b.to_le_bytes());
            }
        }
        Conv::To(DType::F16) => {
            for e in src.chunks_exact(es) {
                let h = half::f16::from_f32(elem_to_f32(e, from));
                out.extend_from_slice(&h.to_bits().to_le_bytes());
            }
        }
        Conv::To(DType::F32) => {
            for e in src.chunks_exact(es) {
                out.extend_from_slice(&elem_to_f32(e, from).to_le_bytes());
            }
        }
    }
}

// ------------------------------------------------------------------------------------ tensors

/// One tensor of the checkpoint: where its elements are in which storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TorchTensor {
    /// Name in the state dict (a leading `module.` removed).
    pub name: String,
    pub dtype: TorchDType,
    pub shape: Vec<usize>,
    /// Element strides (torch's `stride()`).
    pub stride: Vec<usize>,
    /// Offset of the first element in the storage, in elements.
    pub offset: usize,
    /// Storage key (the file `data/<key>` of the archive).
    pub storage: String,
}

impl TorchTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Row-major with no gaps (dimensions of size 1 may have any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected = expected.saturating_mul(d);
        }
        true
    }

    pub fn byte_len(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }
}

/// Bytes of one storage: a range of the mapped file, or decompressed data.
enum StorageBytes {
    Mapped { start: usize, len: usize },
    Owned(Vec<u8>),
}

struct StorageData {
    dtype: TorchDType,
    numel: usize,
    bytes: StorageBytes,
}

/// A `torch.save` checkpoint opened for reading (see the module docs).
pub struct TorchCheckpoint {
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
    storages: HashMap<String, StorageData>,
    tensors: Vec<TorchTensor>,
    by_name: HashMap<String, usize>,
    archive_dir: String,
    wrapper: Option<String>,
    stripped_module_prefix: bool,
    non_tensor_keys: Vec<String>,
}

impl std::fmt::Debug for TorchCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TorchCheckpoint({}, {} tensors in {} storages)",
            self.path.display(),
            self.tensors.len(),
            self.storages.len()
        )
    }
}

/// Where a zip entry's data is.
struct ZipEntry {
    index: usize,
    data_start: Option<u64>,
    compressed: u64,
    size: u64,
    method: zip::CompressionMethod,
    encrypted: bool,
}

/// Elements copied per chunk while streaming (1 Mi elements).
const CHUNK_ELEMS: usize = 1 << 20;

impl TorchCheckpoint {
    /// Opens a `torch.save` file: maps it, reads the archive directory and runs the pickle.
    /// Storage data is not read until a tensor is.
    pub fn open(path: impl AsRef<Path>) -> Result<TorchCheckpoint> {
        let path = path.as_ref();
        let err = |m: String| werr(path, m);
        let file = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| err(format!("cannot read metadata: {e}")))?;
        if meta.is_dir() {
            return Err(err(
                "is a directory; expected a torch.save file (pytorch_model.bin)".into(),
            ));
        }
        if meta.len() == 0 {
            return Err(err(
                "empty file; expected a torch.save zip archive (pytorch_model.bin)".into(),
            ));
        }
        // SAFETY: the map is read-only; the file must not be modified while it is open (the
        // same contract as the safetensors loader).
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| err(format!("cannot map into memory: {e}")))?;
        let map = Arc::new(map);
        let bytes: &[u8] = &map;

        let mut archive = match zip::ZipArchive::new(std::io::Cursor::new(bytes)) {
            Ok(a) => a,
            Err(e) => return Err(err(not_zip_message(bytes, &e))),
        };

        // The directory of entries.
        let mut entries: HashMap<String, ZipEntry> = HashMap::with_capacity(archive.len());
        let mut order: Vec<String> = Vec::with_capacity(archive.len());
        for i in 0..archive.len() {
            let f = archive
                .by_index_raw(i)
                .map_err(|e| err(format!("damaged zip archive (entry {i}): {e}")))?;
            let name = f.name().to_string();
            entries.insert(
                name.clone(),
                ZipEntry {
                    index: i,
                    data_start: f.data_start(),
                    compressed: f.compressed_size(),
                    size: f.size(),
                    method: f.compression(),
                    encrypted: f.encrypted(),
                },
            );
            order.push(name);
        }

        // data.pkl: the one nearest the root.
        let mut pkls: Vec<&String> = order
            .iter()
            .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
            .collect();
        pkls.sort_by_key(|n| n.matches('/').count());
        let pkl_name = match pkls.as_slice() {
            [] => {
                let mut shown: Vec<&str> = order.iter().take(8).map(String::as_str).collect();
                if order.len() > 8 {
                    shown.push("...");
                }
                return Err(err(format!(
                    "the zip archive has no data.pkl, so it is not a torch.save checkpoint \
                     (entries: {})",
                    if shown.is_empty() {
                        "none".to_string()
                    } else {
                        shown.join(", ")
                    }
                )));
            }
            [one] => (*one).clone(),
            [a, b, ..] if a.matches('/').count() == b.matches('/').count() => {
                return Err(err(format!(
                    "the zip archive has several data.pkl entries (`{a}`, `{b}`); expected one"
                )))
            }
            [a, ..] => (*a).clone(),
        };
        let archive_dir = pkl_name[..pkl_name.len() - "data.pkl".len()].to_string();

        let mut load = |name: &str| -> Result<StorageBytes> {
            let e = entries
                .get(name)
                .ok_or_else(|| err(format!("no entry `{name}`")))?;
            entry_bytes(path, &mut archive, bytes.len(), name, e)
        };

        // Byte order.
        let byteorder_name = format!("{archive_dir}byteorder");
        if entries.contains_key(&byteorder_name) {
            let b = load(&byteorder_name)?;
            let text = match &b {
                StorageBytes::Mapped { start, len } => &bytes[*start..*start + *len],
                StorageBytes::Owned(v) => v.as_slice(),
            };
            match text {
                b"little" => {}
                b"big" => {
                    return Err(err(
                        "the checkpoint was saved on a big-endian machine; only little-endian \
                         checkpoints are supported"
                            .into(),
                    ))
                }
                other => {
                    return Err(err(format!(
                        "unexpected byteorder record `{}`",
                        String::from_utf8_lossy(&other[..other.len().min(32)])
                    )))
                }
            }
        }

        // The pickle.
        let pkl = load(&pkl_name)?;
        let pkl_bytes = match &pkl {
            StorageBytes::Mapped { start, len } => &bytes[*start..*start + *len],
            StorageBytes::Owned(v) => v.as_slice(),
        };
        let un = pickle::unpickle(pkl_bytes).map_err(|m| err(format!("{pkl_name}: {m}")))?;
        let sd = pickle::state_dict(&un).map_err(|m| err(format!("{pkl_name}: {m}")))?;

        // Tensors, names, storages.
        let mut tensors: Vec<TorchTensor> = Vec::with_capacity(sd.tensors.len());
        let mut by_name: HashMap<String, usize> = HashMap::with_capacity(sd.tensors.len());
        let mut storages: HashMap<String, StorageData> = HashMap::new();
        let mut originals: Vec<String> = Vec::with_capacity(sd.tensors.len());
        let strip = sd.tensors.iter().any(|(k, _)| k.starts_with("module."));
        for (key, t) in &sd.tensors {
            let name = key.strip_prefix("module.").unwrap_or(key).to_string();
            let st = &t.storage;
            // The storage: its file, dtype and size, checked once.
            match storages.get(&st.key) {
                Some(s) => {
                    if s.dtype != st.dtype || s.numel as u64 != st.numel {
                        return Err(err(format!(
                            "storage `{}` is used as {} x {} and as {} x {}",
                            st.key, s.numel, s.dtype, st.numel, st.dtype
                        )));
                    }
                }
                None => {
                    let file = format!("{archive_dir}data/{}", st.key);
                    if !entries.contains_key(&file) {
                        return Err(err(format!(
                            "storage `{}` (used by tensor `{name}`) has no data file `{file}` in \
                             the archive",
                            st.key
                        )));
                    }
                    let data = load(&file)?;
                    let have = match &data {
                        StorageBytes::Mapped { len, .. } => *len as u64,
                        StorageBytes::Owned(v) => v.len() as u64,
                    };
                    let need = st.numel.checked_mul(st.dtype.size_in_bytes() as u64);
                    if need.is_none_or(|n| n > have) {
                        return Err(err(format!(
                            "storage `{}` (used by tensor `{name}`) should hold {} elements of {} \
                             but its data file `{file}` has {have} bytes",
                            st.key, st.numel, st.dtype
                        )));
                    }
                    storages.insert(
                        st.key.clone(),
                        StorageData {
                            dtype: st.dtype,
                            numel: st.numel as usize,
                            bytes: data,
                        },
                    );
                }
            }
            let tensor = check_view(&name, t).map_err(err)?;
            match by_name.get(&name) {
                Some(&i) => {
                    // A key set twice: the last value wins (Python's dict semantics); two keys
                    // that differ only by the `module.` prefix are ambiguous.
                    if originals[i] != *key {
                        return Err(err(format!(
                            "tensor `{name}` appears twice, as `{}` and as `{key}`",
                            originals[i]
                        )));
                    }
                    tensors[i] = tensor;
                }
                None => {
                    by_name.insert(name, tensors.len());
                    tensors.push(tensor);
                    originals.push(key.clone());
                }
            }
        }
        if tensors.is_empty() {
            return Err(err(format!("{pkl_name}: the state dict holds no tensors")));
        }
        Ok(TorchCheckpoint {
            path: path.to_path_buf(),
            map,
            storages,
            tensors,
            by_name,
            archive_dir,
            wrapper: sd.wrapper,
            stripped_module_prefix: strip,
            non_tensor_keys: sd.non_tensor_keys,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All tensors, in the order of the state dict.
    pub fn tensors(&self) -> &[TorchTensor] {
        &self.tensors
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    pub fn get(&self, name: &str) -> Option<&TorchTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The folder of the archive (`archive/`, `pytorch_model/`, ...), with its trailing slash.
    pub fn archive_dir(&self) -> &str {
        &self.archive_dir
    }

    /// The key the state dict was found under (`module` for DeepSpeed's wrapping), if any.
    pub fn wrapper(&self) -> Option<&str> {
        self.wrapper.as_deref()
    }

    /// Whether the names carried a leading `module.` (removed).
    pub fn stripped_module_prefix(&self) -> bool {
        self.stripped_module_prefix
    }

    /// Keys of the state dict whose values are not tensors (ignored).
    pub fn non_tensor_keys(&self) -> &[String] {
        &self.non_tensor_keys
    }

    /// Whether tensor `name` is read in place from the mapped file (`false`: its entry was
    /// compressed and is held in memory); `None` for an unknown name.
    pub fn reads_in_place(&self, name: &str) -> Option<bool> {
        let t = self.get(name)?;
        let s = self.storages.get(&t.storage)?;
        Some(matches!(s.bytes, StorageBytes::Mapped { .. }))
    }

    /// Number of distinct storages the tensors use.
    pub fn num_storages(&self) -> usize {
        self.storages.len()
    }

    fn tensor(&self, name: &str) -> Result<&TorchTensor> {
        self.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            location: self.path.display().to_string(),
        })
    }

    fn storage_bytes(&self, key: &str) -> Result<&[u8]> {
        let s = self
            .storages
            .get(key)
            .ok_or_else(|| werr(&self.path, format!("storage `{key}` is not loaded")))?;
        Ok(match &s.bytes {
            StorageBytes::Mapped { start, len } => &self.map[*start..*start + *len],
            StorageBytes::Owned(v) => v.as_slice(),
        })
    }

    /// Streams the elements of `t` in row-major order to `out`, converted as `conv` says.
    fn stream(&self, t: &TorchTensor, conv: Conv, out: &mut dyn Write) -> Result<()> {
        if let Conv::To(to) = conv {
            if !t.dtype.is_float() {
                return Err(werr(
                    &self.path,
                    format!(
                        "tensor `{}` has dtype {}; only floating-point tensors can be converted \
                         to {to}",
                        t.name, t.dtype
                    ),
                ));
            }
        }
        let n = t.numel();
        if n == 0 {
            return Ok(());
        }
        let src = self.storage_bytes(&t.storage)?;
        let es = t.dtype.size_in_bytes();
        let ioerr = |e: std::io::Error| Error::io(format!("writing tensor `{}`", t.name), e);
        let mut buf: Vec<u8> = Vec::with_capacity(CHUNK_ELEMS.min(n) * 4);
        if t.is_contiguous() {
            // `check_view` proved offset + numel <= storage numel.
            let data = &src[t.offset * es..(t.offset + n) * es];
            let passthrough = match conv {
                Conv::Copy => true,
                Conv::To(d) => t.dtype.to_dtype() == Some(d),
            };
            for chunk in data.chunks(CHUNK_ELEMS * es) {
                if passthrough {
                    out.write_all(chunk).map_err(ioerr)?;
                } else {
                    buf.clear();
                    convert_into(chunk, t.dtype, conv, &mut buf);
                    out.write_all(&buf).map_err(ioerr)?;
                }
            }
            return Ok(());
        }
        // A strided view: walk the rows (all dimensions but the last) with an odometer.
        let rank = t.shape.len();
        let inner = t.shape[rank - 1];
        let inner_stride = t.stride[rank - 1];
        let mut idx = vec![0usize; rank - 1];
        loop {
            let base = t.offset
                + idx
                    .iter()
                    .zip(&t.stride)
                    .map(|(&i, &s)| i * s)
                    .sum::<usize>();
            if inner_stride == 1 {
                convert_into(
                    &src[base * es..(base + inner) * es],
                    t.dtype,
                    conv,
                    &mut buf,
                );
            } else {
                for j in 0..inner {
                    let e = base + j * inner_stride;
                    convert_into(&src[e * es..(e + 1) * es], t.dtype, conv, &mut buf);
                }
            }
            if buf.len() >= CHUNK_ELEMS * 4 {
                out.write_all(&buf).map_err(ioerr)?;
                buf.clear();
            }
            // Next row.
            let mut d = rank - 1;
            loop {
                if d == 0 {
                    out.write_all(&buf).map_err(ioerr)?;
                    return Ok(());
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }

    /// Materialising more elements than the storage holds is only possible with zero strides
    /// (an expanded view); refused, so an allocation is always bounded by data in the file.
    fn check_materialise(&self, t: &TorchTensor, elem_bytes: usize) -> Result<usize> {
        let have = self.storages.get(&t.storage).map_or(0, |s| s.numel);
        if t.numel() > have {
            return Err(werr(
                &self.path,
                format!(
                    "tensor `{}` (size {:?}, stride {:?}) has more elements than its storage \
                     ({have}); expanded views are not supported",
                    t.name, t.shape, t.stride
                ),
            ));
        }
        Ok(t.numel() * elem_bytes)
    }

    /// The elements of tensor `name`, contiguous, as raw little-endian bytes of its dtype.
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let t = self.tensor(name)?;
        let len = self.check_materialise(t, t.dtype.size_in_bytes())?;
        let mut out = Vec::with_capacity(len);
        self.stream(t, Conv::Copy, &mut out)?;
        Ok(out)
    }

    /// Tensor `name` in its stored dtype (f32, f16 or bf16), contiguous.
    pub fn read(&self, name: &str) -> Result<Tensor> {
        let t = self.tensor(name)?;
        let dtype = t.dtype.to_dtype().ok_or_else(|| {
            werr(
                &self.path,
                format!(
                    "tensor `{name}` has dtype {}; use read_as or read_bytes",
                    t.dtype
                ),
            )
        })?;
        self.read_as(name, dtype)
    }

    /// Tensor `name` converted to `dtype` (as torch's `.to(dtype)` rounds), contiguous.
    pub fn read_as(&self, name: &str, dtype: DType) -> Result<Tensor> {
        let t = self.tensor(name)?;
        let len = self.check_materialise(t, dtype.size_in_bytes())?;
        let mut out = Vec::with_capacity(len);
        self.stream(t, Conv::To(dtype), &mut out)?;
        let shape = t.shape.clone();
        let r = match dtype {
            DType::F32 => Tensor::from_vec(bytemuck::pod_collect_to_vec::<u8, f32>(&out), shape),
            DType::F16 => {
                Tensor::from_vec(bytemuck::pod_collect_to_vec::<u8, half::f16>(&out), shape)
            }
            DType::BF16 => {
                Tensor::from_vec(bytemuck::pod_collect_to_vec::<u8, half::bf16>(&out), shape)
            }
        };
        r.map_err(|e| werr(&self.path, format!("tensor `{name}`: {e}")))
    }

    /// A [`TensorSource`] writing tensor `name` converted to `dtype`, streamed from the file
    /// (bounded memory whatever the tensor size).
    pub fn source(&self, name: &str, dtype: DType) -> Result<TorchSource<'_>> {
        let t = self.tensor(name)?;
        if !t.dtype.is_float() {
            return Err(werr(
                &self.path,
                format!(
                    "tensor `{name}` has dtype {}; only floating-point tensors can be converted",
                    t.dtype
                ),
            ));
        }
        Ok(TorchSource {
            ckpt: self,
            tensor: t,
            dtype,
        })
    }
}

/// A checkpoint tensor written as another dtype (see [`TorchCheckpoint::source`]).
pub struct TorchSource<'a> {
    ckpt: &'a TorchCheckpoint,
    tensor: &'a TorchTensor,
    dtype: DType,
}

impl TorchSource<'_> {
    pub fn tensor(&self) -> &TorchTensor {
        self.tensor
    }
}

impl TensorSource for TorchSource<'_> {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }
    fn write_data(&self, out: &mut dyn Write) -> Result<()> {
        self.ckpt.stream(self.tensor, Conv::To(self.dtype), out)
    }
}

/// Checks a tensor view against its storage and converts it to [`TorchTensor`].
fn check_view(name: &str, t: &pickle::TensorRef) -> std::result::Result<TorchTensor, String> {
    let st = &t.storage;
    let bad = |what: String| format!("tensor `{name}`: {what}");
    if t.shape.len() != t.stride.len() {
        return Err(bad(format!(
            "size {:?} and stride {:?} have different lengths",
            t.shape, t.stride
        )));
    }
    let to_usize = |v: u64| usize::try_from(v).ok();
    let shape: Vec<usize> = t
        .shape
        .iter()
        .map(|&d| to_usize(d))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("size does not fit in memory".into()))?;
    let stride: Vec<usize> = t
        .stride
        .iter()
        .map(|&d| to_usize(d))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("stride does not fit in memory".into()))?;
    let offset = to_usize(t.offset).ok_or_else(|| bad("offset too large".into()))?;
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("size {shape:?} overflows")))?;
    if numel > 0 {
        // Index of the last element the view touches.
        let mut last = offset as u128;
        for (&d, &s) in shape.iter().zip(&stride) {
            last += (d as u128 - 1) * s as u128;
        }
        if last >= st.numel as u128 {
            return Err(bad(format!(
                "size {shape:?}, stride {stride:?} and offset {offset} reach element {last}, \
                 outside its storage `{}` of {} elements",
                st.key, st.numel
            )));
        }
    } else if offset as u64 > st.numel {
        return Err(bad(format!(
            "offset {offset} is outside its storage `{}` of {} elements",
            st.key, st.numel
        )));
    }
    Ok(TorchTensor {
        name: name.to_string(),
        dtype: st.dtype,
        shape,
        stride,
        offset,
        storage: st.key.clone(),
    })
}

fn not_zip_message(bytes: &[u8], e: &zip::result::ZipError) -> String {
    if bytes.starts_with(b"PK") {
        format!("damaged zip archive (truncated or corrupt?): {e}")
    } else if bytes.first() == Some(&0x80) {
        "this is a legacy torch.save file (a plain pickle, torch < 1.6), which is not supported; \
         re-save it with a newer torch (`torch.save(torch.load(f), f2)`)"
            .to_string()
    } else {
        format!(
            "not a zip archive ({e}); expected a torch.save checkpoint (pytorch_model.bin, torch \
             >= 1.6)"
        )
    }
}

/// The bytes of a zip entry: in place for stored entries, decompressed for deflated ones.
fn entry_bytes(
    path: &Path,
    archive: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>,
    file_len: usize,
    name: &str,
    e: &ZipEntry,
) -> Result<StorageBytes> {
    let err = |m: String| werr(path, format!("zip entry `{name}`: {m}"));
    if e.encrypted {
        return Err(err("encrypted entries are not supported".into()));
    }
    match e.method {
        zip::CompressionMethod::Stored => {
            if e.compressed != e.size {
                return Err(err(format!(
                    "stored entry with compressed size {} != size {}",
                    e.compressed, e.size
                )));
            }
            let start = e
                .data_start
                .ok_or_else(|| err("data offset unknown".into()))?;
            let end = start.checked_add(e.size);
            match end {
                Some(end) if end <= file_len as u64 => Ok(StorageBytes::Mapped {
                    start: start as usize,
                    len: e.size as usize,
                }),
                _ => Err(err(format!(
                    "data ({} bytes at offset {start}) runs past the end of the file ({file_len} \
                     bytes); the file is truncated",
                    e.size
                ))),
            }
        }
        zip::CompressionMethod::Deflated => {
            // Deflate expands at most ~1032x: refuse sizes no valid stream can reach.
            let max = e.compressed.saturating_mul(1100).saturating_add(1024);
            if e.size > max || e.compressed > file_len as u64 {
                return Err(err(format!(
                    "claims {} bytes from {} compressed bytes",
                    e.size, e.compressed
                )));
            }
            let f = archive
                .by_index(e.index)
                .map_err(|x| err(format!("cannot read: {x}")))?;
            let mut v = Vec::new();
            f.take(e.size)
                .read_to_end(&mut v)
                .map_err(|x| err(format!("cannot decompress: {x}")))?;
            if v.len() as u64 != e.size {
                return Err(err(format!(
                    "decompressed to {} bytes, the directory says {}",
                    v.len(),
                    e.size
                )));
            }
            Ok(StorageBytes::Owned(v))
        }
        m => Err(err(format!(
            "compression method {m} is not supported (torch.save writes uncompressed entries)"
        ))),
    }
}

// ------------------------------------------------------------------------------------ pickle

/// The pickle machine (the subset of opcodes and globals a torch state dict uses).
mod pickle {
    use super::TorchDType;
    use std::collections::HashMap;
    use std::rc::Rc;

    type R<T> = std::result::Result<T, String>;

    /// A storage reference (`BINPERSID` of `('storage', type, key, location, numel)`).
    #[derive(Debug, PartialEq)]
    pub struct StorageRef {
        pub dtype: TorchDType,
        pub key: String,
        pub numel: u64,
    }

    /// A tensor as `_rebuild_tensor_v2` describes it.
    #[derive(Debug)]
    pub struct TensorRef {
        pub storage: Rc<StorageRef>,
        pub offset: u64,
        pub shape: Vec<u64>,
        pub stride: Vec<u64>,
    }

    /// The globals that may appear.
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub enum Glob {
        OrderedDict,
        RebuildTensorV2,
        RebuildTensor,
        RebuildParameter,
        RebuildParameterWithState,
        RebuildFromTypeV2,
        TensorType,
        ParameterType,
        Storage(TorchDType),
        CodecsEncode,
    }

    impl Glob {
        fn resolve(module: &str, name: &str) -> Option<Glob> {
            Some(match (module, name) {
                ("collections", "OrderedDict") => Glob::OrderedDict,
                ("torch._utils", "_rebuild_tensor_v2") => Glob::RebuildTensorV2,
                ("torch._utils", "_rebuild_tensor") => Glob::RebuildTensor,
                ("torch._utils", "_rebuild_parameter") => Glob::RebuildParameter,
                ("torch._utils", "_rebuild_parameter_with_state") => {
                    Glob::RebuildParameterWithState
                }
                ("torch._tensor", "_rebuild_from_type_v2") => Glob::RebuildFromTypeV2,
                ("torch", "Tensor") => Glob::TensorType,
                ("torch.nn.parameter", "Parameter") => Glob::ParameterType,
                ("_codecs", "encode") => Glob::CodecsEncode,
                ("torch", s) => Glob::Storage(TorchDType::from_storage_type(s)?),
                _ => return None,
            })
        }
    }

    #[derive(Clone, Debug)]
    pub enum V {
        None,
        Bool(bool),
        Int(i64),
        /// Floats and bytes are parsed but their values are never needed.
        Float,
        Str(Rc<str>),
        Bytes,
        /// A tuple, list or dict in the arena.
        Obj(usize),
        Global(Glob),
        Storage(Rc<StorageRef>),
        Tensor(Rc<TensorRef>),
    }

    impl V {
        fn kind(&self) -> &'static str {
            match self {
                V::None => "None",
                V::Bool(_) => "bool",
                V::Int(_) => "int",
                V::Float => "float",
                V::Str(_) => "str",
                V::Bytes => "bytes",
                V::Obj(_) => "container",
                V::Global(_) => "global",
                V::Storage(_) => "storage",
                V::Tensor(_) => "tensor",
            }
        }
    }

    #[derive(Debug)]
    pub enum Obj {
        Tuple(Vec<V>),
        List(Vec<V>),
        Dict(Vec<(V, V)>),
    }

    pub struct Unpickled {
        pub root: V,
        pub objs: Vec<Obj>,
    }

    struct Vm<'a> {
        data: &'a [u8],
        pos: usize,
        stack: Vec<V>,
        marks: Vec<usize>,
        memo: HashMap<u32, V>,
        objs: Vec<Obj>,
        storages: HashMap<String, Rc<StorageRef>>,
    }

    fn opcode_name(op: u8) -> &'static str {
        match op {
            b'(' => "MARK",
            b'.' => "STOP",
            b'0' => "POP",
            b'1' => "POP_MARK",
            b'2' => "DUP",
            b'F' => "FLOAT",
            b'I' => "INT",
            b'J' => "BININT",
            b'K' => "BININT1",
            b'L' => "LONG",
            b'M' => "BININT2",
            b'N' => "NONE",
            b'P' => "PERSID",
            b'Q' => "BINPERSID",
            b'R' => "REDUCE",
            b'S' => "STRING",
            b'T' => "BINSTRING",
            b'U' => "SHORT_BINSTRING",
            b'V' => "UNICODE",
            b'X' => "BINUNICODE",
            b'a' => "APPEND",
            b'b' => "BUILD",
            b'c' => "GLOBAL",
            b'd' => "DICT",
            b'}' => "EMPTY_DICT",
            b'e' => "APPENDS",
            b'g' => "GET",
            b'h' => "BINGET",
            b'i' => "INST",
            b'j' => "LONG_BINGET",
            b'l' => "LIST",
            b']' => "EMPTY_LIST",
            b'o' => "OBJ",
            b'p' => "PUT",
            b'q' => "BINPUT",
            b'r' => "LONG_BINPUT",
            b's' => "SETITEM",
            b't' => "TUPLE",
            b')' => "EMPTY_TUPLE",
            b'u' => "SETITEMS",
            b'G' => "BINFLOAT",
            0x80 => "PROTO",
            0x81 => "NEWOBJ",
            0x82 => "EXT1",
            0x83 => "EXT2",
            0x84 => "EXT4",
            0x85 => "TUPLE1",
            0x86 => "TUPLE2",
            0x87 => "TUPLE3",
            0x88 => "NEWTRUE",
            0x89 => "NEWFALSE",
            0x8a => "LONG1",
            0x8b => "LONG4",
            b'B' => "BINBYTES",
            b'C' => "SHORT_BINBYTES",
            0x8c => "SHORT_BINUNICODE",
            0x8d => "BINUNICODE8",
            0x8e => "BINBYTES8",
            0x8f => "EMPTY_SET",
            0x90 => "ADDITEMS",
            0x91 => "FROZENSET",
            0x92 => "NEWOBJ_EX",
            0x93 => "STACK_GLOBAL",
            0x94 => "MEMOIZE",
            0x95 => "FRAME",
            0x96 => "BYTEARRAY8",
            0x97 => "NEXT_BUFFER",
            0x98 => "READONLY_BUFFER",
            _ => "unknown",
        }
    }

    impl<'a> Vm<'a> {
        fn take(&mut self, n: usize) -> R<&'a [u8]> {
            match self.pos.checked_add(n) {
                Some(end) if end <= self.data.len() => {
                    let s = &self.data[self.pos..end];
                    self.pos = end;
                    Ok(s)
                }
                _ => Err(format!(
                    "truncated pickle: {n} bytes needed at byte {}, {} left",
                    self.pos,
                    self.data.len() - self.pos
                )),
            }
        }
        fn u8(&mut self) -> R<u8> {
            Ok(self.take(1)?[0])
        }
        fn u16(&mut self) -> R<u16> {
            let b = self.take(2)?;
            Ok(u16::from_le_bytes([b[0], b[1]]))
        }
        fn u32(&mut self) -> R<u32> {
            let b = self.take(4)?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        fn u64(&mut self) -> R<u64> {
            let b = self.take(8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            Ok(u64::from_le_bytes(a))
        }
        fn len_u64(&mut self, n: u64) -> R<usize> {
            usize::try_from(n)
                .ok()
                .filter(|&n| n <= self.data.len() - self.pos)
                .ok_or_else(|| {
                    format!(
                        "truncated pickle: a length of {n} at byte {} runs past its end",
                        self.pos
                    )
                })
        }
        fn line(&mut self) -> R<&'a str> {
            let rest = &self.data[self.pos..];
            let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| {
                format!("truncated pickle: unterminated line at byte {}", self.pos)
            })?;
            let s = std::str::from_utf8(&rest[..n])
                .map_err(|_| format!("invalid UTF-8 in a text line at byte {}", self.pos))?;
            self.pos += n + 1;
            Ok(s)
        }
        fn string(&mut self, n: usize) -> R<V> {
            let b = self.take(n)?;
            let s = std::str::from_utf8(b)
                .map_err(|_| format!("invalid UTF-8 in a string before byte {}", self.pos))?;
            Ok(V::Str(Rc::from(s)))
        }

        fn push(&mut self, v: V) {
            self.stack.push(v);
        }
        fn floor(&self) -> usize {
            self.marks.last().copied().unwrap_or(0)
        }
        fn pop(&mut self) -> R<V> {
            if self.stack.len() <= self.floor() {
                return Err(format!("stack underflow at byte {}", self.pos));
            }
            self.stack
                .pop()
                .ok_or_else(|| format!("stack underflow at byte {}", self.pos))
        }
        fn top(&self) -> R<&V> {
            if self.stack.len() <= self.floor() {
                return Err(format!("stack underflow at byte {}", self.pos));
            }
            self.stack
                .last()
                .ok_or_else(|| format!("stack underflow at byte {}", self.pos))
        }
        fn pop_mark(&mut self) -> R<Vec<V>> {
            let m = self
                .marks
                .pop()
                .ok_or_else(|| format!("no MARK before byte {}", self.pos))?;
            Ok(self.stack.split_off(m.min(self.stack.len())))
        }
        fn new_obj(&mut self, o: Obj) -> V {
            self.objs.push(o);
            V::Obj(self.objs.len() - 1)
        }
        fn memo_get(&self, i: u32) -> R<V> {
            self.memo
                .get(&i)
                .cloned()
                .ok_or_else(|| format!("memo entry {i} used before it was set (byte {})", self.pos))
        }
        fn memo_put(&mut self, i: u32) -> R<()> {
            let v = self.top()?.clone();
            self.memo.insert(i, v);
            Ok(())
        }

        fn tuple_items(&self, v: &V, what: &str) -> R<Vec<V>> {
            match v {
                V::Obj(i) => match &self.objs[*i] {
                    Obj::Tuple(t) | Obj::List(t) => Ok(t.clone()),
                    Obj::Dict(_) => Err(format!("{what}: expected a tuple, found a dict")),
                },
                other => Err(format!("{what}: expected a tuple, found {}", other.kind())),
            }
        }

        fn uint(v: &V, what: &str) -> R<u64> {
            match v {
                V::Int(i) if *i >= 0 => Ok(*i as u64),
                V::Int(i) => Err(format!("{what} is negative ({i})")),
                V::Bool(b) => Ok(*b as u64),
                other => Err(format!("{what}: expected an int, found {}", other.kind())),
            }
        }

        fn uints(&self, v: &V, what: &str) -> R<Vec<u64>> {
            self.tuple_items(v, what)?
                .iter()
                .map(|x| Self::uint(x, what))
                .collect()
        }

        fn set_items(&mut self, target: &V, items: Vec<V>) -> R<()> {
            if !items.len().is_multiple_of(2) {
                return Err(format!(
                    "SETITEMS with an odd number of items (byte {})",
                    self.pos
                ));
            }
            let V::Obj(i) = target else {
                return Err(format!(
                    "SETITEM on a {}, not a dict (byte {})",
                    target.kind(),
                    self.pos
                ));
            };
            let Obj::Dict(d) = &mut self.objs[*i] else {
                return Err(format!("SETITEM on a non-dict (byte {})", self.pos));
            };
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                d.push((k, v));
            }
            Ok(())
        }

        fn append_items(&mut self, target: &V, items: Vec<V>) -> R<()> {
            match target {
                V::Obj(i) => match &mut self.objs[*i] {
                    Obj::List(l) => {
                        l.extend(items);
                        Ok(())
                    }
                    _ => Err(format!("APPEND on a non-list (byte {})", self.pos)),
                },
                other => Err(format!("APPEND on a {} (byte {})", other.kind(), self.pos)),
            }
        }

        fn persistent_load(&mut self, pid: V) -> R<V> {
            let items = self.tuple_items(&pid, "persistent id")?;
            let tag = match items.first() {
                Some(V::Str(s)) => s.clone(),
                _ => return Err("persistent id is not a ('storage', ...) tuple".into()),
            };
            if &*tag != "storage" {
                return Err(format!(
                    "unsupported persistent id `{tag}` (only tensor storages are supported)"
                ));
            }
            if items.len() != 5 {
                return Err(format!(
                    "storage persistent id has {} fields, expected 5 (storage, type, key, \
                     location, numel)",
                    items.len()
                ));
            }
            let dtype = match &items[1] {
                V::Global(Glob::Storage(d)) => *d,
                other => {
                    return Err(format!(
                        "storage persistent id: expected a torch storage type, found {}",
                        other.kind()
                    ))
                }
            };
            let key = match &items[2] {
                V::Str(s) => s.to_string(),
                V::Int(i) => i.to_string(),
                other => {
                    return Err(format!(
                        "storage persistent id: expected a key string, found {}",
                        other.kind()
                    ))
                }
            };
            if key.is_empty() || key.contains('/') || key.contains('\\') || key == ".." {
                return Err(format!("storage key `{key}` is not a plain name"));
            }
            let numel = Self::uint(&items[4], "storage numel")?;
            let s = Rc::new(StorageRef { dtype, key, numel });
            // One Rc per key; the same key with another dtype or size is an error.
            if let Some(prev) = self.storages.get(&s.key) {
                if **prev == *s {
                    return Ok(V::Storage(prev.clone()));
                }
                return Err(format!(
                    "storage `{}` is used as {} x {} and as {} x {}",
                    s.key, prev.numel, prev.dtype, s.numel, s.dtype
                ));
            }
            self.storages.insert(s.key.clone(), s.clone());
            Ok(V::Storage(s))
        }

        fn call(&mut self, f: Glob, args: Vec<V>) -> R<V> {
            let arity = |n: &[usize], name: &str| -> R<()> {
                if n.contains(&args.len()) {
                    Ok(())
                } else {
                    Err(format!(
                        "{name} called with {} arguments, expected {:?}",
                        args.len(),
                        n
                    ))
                }
            };
            match f {
                Glob::OrderedDict => {
                    arity(&[0, 1], "collections.OrderedDict")?;
                    let mut pairs = Vec::new();
                    if let Some(a) = args.first() {
                        for p in self.tuple_items(a, "OrderedDict items")? {
                            let kv = self.tuple_items(&p, "OrderedDict item")?;
                            if kv.len() != 2 {
                                return Err("OrderedDict item is not a pair".into());
                            }
                            pairs.push((kv[0].clone(), kv[1].clone()));
                        }
                    }
                    Ok(self.new_obj(Obj::Dict(pairs)))
                }
                Glob::RebuildTensorV2 | Glob::RebuildTensor => {
                    if f == Glob::RebuildTensorV2 {
                        arity(&[6, 7], "torch._utils._rebuild_tensor_v2")?;
                    } else {
                        arity(&[4], "torch._utils._rebuild_tensor")?;
                    }
                    let storage = match &args[0] {
                        V::Storage(s) => s.clone(),
                        other => {
                            return Err(format!(
                                "_rebuild_tensor: expected a storage, found {}",
                                other.kind()
                            ))
                        }
                    };
                    let offset = Self::uint(&args[1], "storage offset")?;
                    let shape = self.uints(&args[2], "tensor size")?;
                    let stride = self.uints(&args[3], "tensor stride")?;
                    Ok(V::Tensor(Rc::new(TensorRef {
                        storage,
                        offset,
                        shape,
                        stride,
                    })))
                }
                Glob::RebuildParameter | Glob::RebuildParameterWithState => {
                    arity(&[3, 4], "torch._utils._rebuild_parameter")?;
                    match &args[0] {
                        V::Tensor(_) => Ok(args[0].clone()),
                        other => Err(format!(
                            "_rebuild_parameter: expected a tensor, found {}",
                            other.kind()
                        )),
                    }
                }
                Glob::RebuildFromTypeV2 => {
                    arity(&[4], "torch._tensor._rebuild_from_type_v2")?;
                    let V::Global(func) = args[0] else {
                        return Err("_rebuild_from_type_v2: the function is not a global".into());
                    };
                    match args[1] {
                        V::Global(Glob::TensorType | Glob::ParameterType) => {}
                        _ => {
                            return Err(
                                "_rebuild_from_type_v2: only torch.Tensor and Parameter are \
                                 supported"
                                    .into(),
                            )
                        }
                    }
                    if !matches!(
                        func,
                        Glob::RebuildTensorV2
                            | Glob::RebuildTensor
                            | Glob::RebuildParameter
                            | Glob::RebuildParameterWithState
                    ) {
                        return Err(format!("_rebuild_from_type_v2 of {func:?}"));
                    }
                    let inner = self.tuple_items(&args[2], "_rebuild_from_type_v2 args")?;
                    self.call(func, inner)
                }
                Glob::CodecsEncode => {
                    arity(&[1, 2], "_codecs.encode")?;
                    // Protocol 2 pickles bytes as encode(latin-1 text, 'latin1').
                    match &args[0] {
                        V::Str(_) => Ok(V::Bytes),
                        _ => Err("_codecs.encode of a non-string".into()),
                    }
                }
                Glob::TensorType | Glob::ParameterType | Glob::Storage(_) => {
                    Err(format!("calling {f:?} is not supported"))
                }
            }
        }

        fn run(&mut self) -> R<V> {
            loop {
                let at = self.pos;
                let op = self.u8()?;
                match op {
                    0x80 => {
                        let p = self.u8()?;
                        if p > 5 {
                            return Err(format!("unsupported pickle protocol {p}"));
                        }
                    }
                    0x95 => {
                        self.u64()?; // FRAME: the frame length; frames are just hints.
                    }
                    b'.' => return self.pop(),
                    b'(' => self.marks.push(self.stack.len()),
                    b'0' => {
                        self.pop()?;
                    }
                    b'1' => {
                        self.pop_mark()?;
                    }
                    b'2' => {
                        let v = self.top()?.clone();
                        self.push(v);
                    }
                    b'N' => self.push(V::None),
                    0x88 => self.push(V::Bool(true)),
                    0x89 => self.push(V::Bool(false)),
                    b'J' => {
                        let v = self.u32()? as i32 as i64;
                        self.push(V::Int(v));
                    }
                    b'K' => {
                        let v = self.u8()? as i64;
                        self.push(V::Int(v));
                    }
                    b'M' => {
                        let v = self.u16()? as i64;
                        self.push(V::Int(v));
                    }
                    0x8a | 0x8b => {
                        let n = if op == 0x8a {
                            self.u8()? as u64
                        } else {
                            self.u32()? as u64
                        };
                        let n = self.len_u64(n)?;
                        let b = self.take(n)?;
                        if n > 8 {
                            return Err(format!("integer of {n} bytes at byte {at} is too large"));
                        }
                        let mut v: i64 = 0;
                        for (i, &x) in b.iter().enumerate() {
                            v |= (x as i64) << (8 * i);
                        }
                        if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                            v -= 1i64 << (8 * n); // sign-extend
                        }
                        self.push(V::Int(v));
                    }
                    b'G' => {
                        self.take(8)?;
                        self.push(V::Float);
                    }
                    b'X' => {
                        let n = self.u32()? as u64;
                        let n = self.len_u64(n)?;
                        let v = self.string(n)?;
                        self.push(v);
                    }
                    0x8c => {
                        let n = self.u8()? as usize;
                        let v = self.string(n)?;
                        self.push(v);
                    }
                    0x8d => {
                        let n = self.u64()?;
                        let n = self.len_u64(n)?;
                        let v = self.string(n)?;
                        self.push(v);
                    }
                    b'T' | b'U' => {
                        // Python 2 `str`: decoded as Latin-1 text.
                        let n = if op == b'T' {
                            self.u32()? as u64
                        } else {
                            self.u8()? as u64
                        };
                        let n = self.len_u64(n)?;
                        let b = self.take(n)?;
                        let s: String = b.iter().map(|&c| c as char).collect();
                        self.push(V::Str(Rc::from(s)));
                    }
                    b'B' | b'C' | 0x8e => {
                        let n = match op {
                            b'B' => self.u32()? as u64,
                            b'C' => self.u8()? as u64,
                            _ => self.u64()?,
                        };
                        let n = self.len_u64(n)?;
                        self.take(n)?;
                        self.push(V::Bytes);
                    }
                    b')' => {
                        let v = self.new_obj(Obj::Tuple(Vec::new()));
                        self.push(v);
                    }
                    b']' => {
                        let v = self.new_obj(Obj::List(Vec::new()));
                        self.push(v);
                    }
                    b'}' => {
                        let v = self.new_obj(Obj::Dict(Vec::new()));
                        self.push(v);
                    }
                    b't' => {
                        let items = self.pop_mark()?;
                        let v = self.new_obj(Obj::Tuple(items));
                        self.push(v);
                    }
                    0x85..=0x87 => {
                        let n = (op - 0x84) as usize;
                        let mut items = Vec::with_capacity(n);
                        for _ in 0..n {
                            items.push(self.pop()?);
                        }
                        items.reverse();
                        let v = self.new_obj(Obj::Tuple(items));
                        self.push(v);
                    }
                    b'l' => {
                        let items = self.pop_mark()?;
                        let v = self.new_obj(Obj::List(items));
                        self.push(v);
                    }
                    b'd' => {
                        let items = self.pop_mark()?;
                        let v = self.new_obj(Obj::Dict(Vec::new()));
                        self.set_items(&v, items)?;
                        self.push(v);
                    }
                    b'a' => {
                        let x = self.pop()?;
                        let target = self.top()?.clone();
                        self.append_items(&target, vec![x])?;
                    }
                    b'e' => {
                        let items = self.pop_mark()?;
                        let target = self.top()?.clone();
                        self.append_items(&target, items)?;
                    }
                    b's' => {
                        let v = self.pop()?;
                        let k = self.pop()?;
                        let target = self.top()?.clone();
                        self.set_items(&target, vec![k, v])?;
                    }
                    b'u' => {
                        let items = self.pop_mark()?;
                        let target = self.top()?.clone();
                        self.set_items(&target, items)?;
                    }
                    b'q' => {
                        let i = self.u8()? as u32;
                        self.memo_put(i)?;
                    }
                    b'r' => {
                        let i = self.u32()?;
                        self.memo_put(i)?;
                    }
                    0x94 => {
                        let i = u32::try_from(self.memo.len())
                            .map_err(|_| "memo too large".to_string())?;
                        self.memo_put(i)?;
                    }
                    b'h' => {
                        let i = self.u8()? as u32;
                        let v = self.memo_get(i)?;
                        self.push(v);
                    }
                    b'j' => {
                        let i = self.u32()?;
                        let v = self.memo_get(i)?;
                        self.push(v);
                    }
                    b'p' | b'g' => {
                        let line = self.line()?;
                        let i: u32 = line
                            .trim()
                            .parse()
                            .map_err(|_| format!("bad memo index `{line}` at byte {at}"))?;
                        if op == b'p' {
                            self.memo_put(i)?;
                        } else {
                            let v = self.memo_get(i)?;
                            self.push(v);
                        }
                    }
                    b'c' => {
                        let module = self.line()?;
                        let name = self.line()?;
                        let g = Glob::resolve(module, name).ok_or_else(|| {
                            format!("unsupported global `{module}.{name}` (byte {at}); a state dict holds only tensors")
                        })?;
                        self.push(V::Global(g));
                    }
                    0x93 => {
                        let name = self.pop()?;
                        let module = self.pop()?;
                        let (V::Str(module), V::Str(name)) = (module, name) else {
                            return Err(format!("STACK_GLOBAL of non-strings (byte {at})"));
                        };
                        let g = Glob::resolve(&module, &name).ok_or_else(|| {
                            format!("unsupported global `{module}.{name}` (byte {at}); a state dict holds only tensors")
                        })?;
                        self.push(V::Global(g));
                    }
                    b'R' => {
                        let args = self.pop()?;
                        let f = self.pop()?;
                        let V::Global(g) = f else {
                            return Err(format!(
                                "REDUCE on a {}, not a callable (byte {at})",
                                f.kind()
                            ));
                        };
                        let args = self.tuple_items(&args, "REDUCE arguments")?;
                        let v = self.call(g, args).map_err(|m| format!("{m} (byte {at})"))?;
                        self.push(v);
                    }
                    b'b' => {
                        // BUILD sets attributes (e.g. a state dict's `_metadata`): not needed.
                        self.pop()?;
                        self.top()?;
                    }
                    b'Q' => {
                        let pid = self.pop()?;
                        let v = self
                            .persistent_load(pid)
                            .map_err(|m| format!("{m} (byte {at})"))?;
                        self.push(v);
                    }
                    _ => {
                        return Err(format!(
                            "unsupported pickle opcode {} (0x{op:02x}) at byte {at}",
                            opcode_name(op)
                        ))
                    }
                }
            }
        }
    }

    pub fn unpickle(data: &[u8]) -> R<Unpickled> {
        let mut vm = Vm {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            objs: Vec::new(),
            storages: HashMap::new(),
        };
        let root = vm.run()?;
        Ok(Unpickled {
            root,
            objs: vm.objs,
        })
    }

    /// The state dict found in an unpickled object.
    pub struct StateDict {
        /// (key as stored, tensor), in order; later duplicates replace earlier ones.
        pub tensors: Vec<(String, Rc<TensorRef>)>,
        pub wrapper: Option<String>,
        pub non_tensor_keys: Vec<String>,
    }

    fn dict_items<'u>(u: &'u Unpickled, v: &V) -> Option<&'u [(V, V)]> {
        match v {
            V::Obj(i) => match &u.objs[*i] {
                Obj::Dict(d) => Some(d.as_slice()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Picks the state dict: the top-level dict if it holds tensors, else the dict under
    /// `module` / `state_dict` / `model` (one level).
    pub fn state_dict(u: &Unpickled) -> R<StateDict> {
        let Some(top) = dict_items(u, &u.root) else {
            return Err(format!(
                "the pickled object is a {}, not a dict of tensors",
                match &u.root {
                    V::Obj(i) => match &u.objs[*i] {
                        Obj::Tuple(_) => "tuple",
                        Obj::List(_) => "list",
                        Obj::Dict(_) => "dict",
                    },
                    other => other.kind(),
                }
            ));
        };
        let has_tensors = |d: &[(V, V)]| d.iter().any(|(_, v)| matches!(v, V::Tensor(_)));
        let mut dict = top;
        let mut wrapper = None;
        if !has_tensors(top) {
            for name in ["module", "state_dict", "model"] {
                let inner = top.iter().rev().find_map(|(k, v)| match k {
                    V::Str(s) if &**s == name => dict_items(u, v),
                    _ => None,
                });
                if let Some(inner) = inner {
                    if has_tensors(inner) {
                        dict = inner;
                        wrapper = Some(name.to_string());
                        break;
                    }
                }
            }
            if wrapper.is_none() {
                let keys: Vec<String> = top
                    .iter()
                    .take(10)
                    .map(|(k, _)| match k {
                        V::Str(s) => format!("`{s}`"),
                        other => other.kind().to_string(),
                    })
                    .collect();
                return Err(format!(
                    "no tensors found: the pickled dict has keys [{}]{}; expected a state dict \
                     (name -> tensor), possibly under `module`",
                    keys.join(", "),
                    if top.len() > 10 { ", ..." } else { "" }
                ));
            }
        }
        let mut tensors = Vec::new();
        let mut non_tensor_keys = Vec::new();
        for (k, v) in dict {
            let key = match k {
                V::Str(s) => s.to_string(),
                V::Int(i) => i.to_string(),
                other => {
                    non_tensor_keys.push(format!("<{} key>", other.kind()));
                    continue;
                }
            };
            match v {
                V::Tensor(t) => tensors.push((key, t.clone())),
                _ => non_tensor_keys.push(key),
            }
        }
        Ok(StateDict {
            tensors,
            wrapper,
            non_tensor_keys,
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn long1_sign_extension() {
            // PROTO 2, LONG1 2 bytes 0xff 0x7f (32767), STOP
            let u = unpickle(&[0x80, 2, 0x8a, 2, 0xff, 0x7f, b'.']).unwrap();
            assert!(matches!(u.root, V::Int(32767)));
            let u = unpickle(&[0x80, 2, 0x8a, 1, 0xff, b'.']).unwrap();
            assert!(matches!(u.root, V::Int(-1)));
            let u = unpickle(&[0x80, 2, 0x8a, 0, b'.']).unwrap();
            assert!(matches!(u.root, V::Int(0)));
        }

        #[test]
        fn garbage_never_panics() {
            // Every prefix of a real pickle, and a few byte soups.
            let real: &[u8] =
                b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01ccollections\nOrderedDict\nq\x02)Rq\x03s.";
            for n in 0..real.len() {
                let _ = unpickle(&real[..n]);
            }
            let mut x: u64 = 88172645463325252;
            for _ in 0..2000 {
                let mut v = Vec::new();
                for _ in 0..64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    v.push((x >> 24) as u8);
                }
                let _ = unpickle(&v);
            }
        }
    }
}
