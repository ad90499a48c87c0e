//! Writing safetensors files, tensor by tensor.
//!
//! The header is built with the `safetensors` crate's own `Metadata` (so its JSON is exactly what
//! the crate writes and reads). The data is streamed from [`TensorSource`]s: a source may generate
//! its bytes on the fly (the random model writer does), so a file of any size is written with a
//! bounded amount of memory. We do not use `safetensors::serialize_to_file` because its `View`
//! trait has no way to report an error from a source, and no hook for progress.
//!
//! Files are written under a temporary name and renamed into place when complete, so an
//! interrupted write never leaves a truncated file under the final name.

use super::safetensors::dtype_to_st;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use safetensors::tensor::{Metadata, TensorInfo};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Default shard size limit for [`write_model_weights`]: 4 GB (decimal, as Hugging Face counts).
pub const DEFAULT_SHARD_BYTES: u64 = 4_000_000_000;

/// Single-file weights of a model directory.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Index of a sharded model directory (Hugging Face format).
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Name of shard `k` (1-based) of `n`: `model-0000k-of-0000n.safetensors`.
pub fn shard_name(k: usize, n: usize) -> String {
    format!("model-{k:05}-of-{n:05}.safetensors")
}

/// Something that can be written as one tensor of a safetensors file.
pub trait TensorSource {
    fn dtype(&self) -> DType;
    fn shape(&self) -> &[usize];
    /// Writes exactly `numel * dtype size` bytes, little-endian, row-major. The writer checks the
    /// count and fails (rather than writing a corrupt file) when it differs.
    fn write_data(&self, out: &mut dyn Write) -> Result<()>;

    /// Bytes of data this source writes; `None` when the size overflows.
    fn byte_len(&self) -> Option<u64> {
        let n = self
            .shape()
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))?;
        n.checked_mul(self.dtype().size_in_bytes() as u64)
    }
}

impl TensorSource for Tensor {
    fn dtype(&self) -> DType {
        Tensor::dtype(self)
    }
    fn shape(&self) -> &[usize] {
        self.dims()
    }
    fn write_data(&self, out: &mut dyn Write) -> Result<()> {
        let bytes = self.to_bytes()?;
        out.write_all(&bytes)
            .map_err(|e| Error::io("writing tensor data", e))
    }
}

/// A named tensor to write.
pub struct NamedSource<'a> {
    pub name: String,
    pub source: &'a dyn TensorSource,
}

impl<'a> NamedSource<'a> {
    pub fn new(name: impl Into<String>, source: &'a dyn TensorSource) -> Self {
        NamedSource {
            name: name.into(),
            source,
        }
    }
}

/// Counts the bytes going through, to check each source wrote what its header entry promised.
struct Counting<'w, W: Write> {
    inner: &'w mut W,
    count: u64,
    progress: &'w mut dyn FnMut(u64),
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        (self.progress)(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn werr(path: &Path, msg: impl Into<String>) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Writes one safetensors file. Tensors are laid out by descending element size then name (what
/// the `safetensors` crate does), which keeps every tensor aligned for its element type.
/// `progress` is called with the number of data bytes written since its last call.
/// Returns the size of the file in bytes.
pub fn write_safetensors(
    path: &Path,
    tensors: &[NamedSource<'_>],
    metadata: Option<HashMap<String, String>>,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    let mut order: Vec<&NamedSource> = tensors.iter().collect();
    order.sort_by(|a, b| {
        b.source
            .dtype()
            .size_in_bytes()
            .cmp(&a.source.dtype().size_in_bytes())
            .then_with(|| a.name.cmp(&b.name))
    });
    for w in order.windows(2) {
        if w[0].name == w[1].name {
            return Err(werr(path, format!("tensor `{}` given twice", w[0].name)));
        }
    }
    let mut infos = Vec::with_capacity(order.len());
    let mut offset = 0usize;
    let mut lens = Vec::with_capacity(order.len());
    for t in &order {
        let len = t
            .source
            .byte_len()
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| werr(path, format!("tensor `{}`: size overflows", t.name)))?;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| werr(path, "total size overflows"))?;
        infos.push((
            t.name.clone(),
            TensorInfo {
                dtype: dtype_to_st(t.source.dtype()),
                shape: t.source.shape().to_vec(),
                data_offsets: (offset, end),
            },
        ));
        lens.push(len as u64);
        offset = end;
    }
    let meta = Metadata::new(metadata, infos)
        .map_err(|e| werr(path, format!("cannot build header: {e}")))?;
    let mut header = serde_json::to_string(&meta)
        .map_err(|e| werr(path, format!("cannot serialise header: {e}")))?
        .into_bytes();
    // Pad with spaces to a multiple of 8 so the data section starts aligned.
    header.resize(header.len().next_multiple_of(8), b' ');

    let tmp = tmp_path(path);
    let result = (|| -> Result<u64> {
        let file =
            std::fs::File::create(&tmp).map_err(|e| werr(&tmp, format!("cannot create: {e}")))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        let ioerr = |e: std::io::Error| werr(&tmp, format!("write failed: {e}"));
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(ioerr)?;
        w.write_all(&header).map_err(ioerr)?;
        for (t, &len) in order.iter().zip(&lens) {
            let mut c = Counting {
                inner: &mut w,
                count: 0,
                progress: &mut *progress,
            };
            t.source.write_data(&mut c)?;
            if c.count != len {
                return Err(werr(
                    path,
                    format!(
                        "tensor `{}`: source wrote {} bytes, its shape and dtype need {len}",
                        t.name, c.count
                    ),
                ));
            }
        }
        let file = w
            .into_inner()
            .map_err(|e| werr(&tmp, format!("write failed: {}", e.error())))?;
        file.sync_all().map_err(ioerr)?;
        Ok(8 + header.len() as u64 + offset as u64)
    })();
    match result {
        Ok(size) => {
            std::fs::rename(&tmp, path)
                .map_err(|e| werr(path, format!("cannot rename {}: {e}", tmp.display())))?;
            Ok(size)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// How [`write_model_weights`] split the tensors.
#[derive(Clone, Debug)]
pub struct WrittenWeights {
    /// Files written (shards in order, or the single file), without the index.
    pub files: Vec<PathBuf>,
    /// The index file, when sharded.
    pub index: Option<PathBuf>,
    /// Total tensor data bytes (the index's `total_size`).
    pub data_bytes: u64,
    /// Total size of the written safetensors files.
    pub file_bytes: u64,
}

/// Writes the weights of a model directory: `model.safetensors` when all data fits in
/// `max_shard_bytes`, else shards `model-0000k-of-0000n.safetensors` (tensors kept in the given
/// order, a new shard started when the next tensor would pass the limit; a tensor larger than
/// the limit gets a shard of its own) plus `model.safetensors.index.json`.
pub fn write_model_weights(
    dir: &Path,
    tensors: &[NamedSource<'_>],
    max_shard_bytes: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<WrittenWeights> {
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in tensors {
        sizes.push(
            t.source
                .byte_len()
                .ok_or_else(|| werr(dir, format!("tensor `{}`: size overflows", t.name)))?,
        );
    }
    let data_bytes: u64 = sizes.iter().sum();
    // Split into groups.
    let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
    let mut start = 0;
    let mut acc = 0u64;
    for (i, &s) in sizes.iter().enumerate() {
        if i > start && acc + s > max_shard_bytes {
            groups.push(start..i);
            start = i;
            acc = 0;
        }
        acc += s;
    }
    groups.push(start..tensors.len());

    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    if groups.len() == 1 {
        let path = dir.join(SINGLE_FILE);
        let size = write_safetensors(&path, tensors, Some(meta), progress)?;
        return Ok(WrittenWeights {
            files: vec![path],
            index: None,
            data_bytes,
            file_bytes: size,
        });
    }
    let n = groups.len();
    let mut files = Vec::with_capacity(n);
    let mut weight_map = serde_json::Map::new();
    let mut file_bytes = 0;
    for (k, g) in groups.iter().enumerate() {
        let name = shard_name(k + 1, n);
        let path = dir.join(&name);
        file_bytes += write_safetensors(&path, &tensors[g.clone()], Some(meta.clone()), progress)?;
        for t in &tensors[g.clone()] {
            weight_map.insert(t.name.clone(), serde_json::Value::String(name.clone()));
        }
        files.push(path);
    }
    // Sorted keys (serde_json::Map is a BTreeMap without `preserve_order`) as HF writes them.
    let index = serde_json::json!({
        "metadata": { "total_size": data_bytes },
        "weight_map": weight_map,
    });
    let index_path = dir.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(&index)
        .map_err(|e| werr(&index_path, format!("cannot serialise index: {e}")))?;
    std::fs::write(&index_path, text + "\n")
        .map_err(|e| werr(&index_path, format!("cannot write: {e}")))?;
    Ok(WrittenWeights {
        files,
        index: Some(index_path),
        data_bytes,
        file_bytes,
    })
}
