//! Reading safetensors files through a memory map.
//!
//! The format: 8 bytes little-endian header length `n`, `n` bytes of JSON header
//! (`{"name": {"dtype": "BF16", "shape": [..], "data_offsets": [start, end]}, "__metadata__": {..}}`),
//! then the data section; offsets are relative to the start of the data section and must tile it
//! exactly. The `safetensors` crate validates the header (offsets contiguous, sizes consistent with
//! shape and dtype, data section length equal to what the header describes); this file adds
//! messages that say what is wrong in terms a user can act on (truncated file, not a safetensors
//! file, ...) and turns each entry into a byte range of the map.

use crate::error::{Error, Result};
use crate::tensor::DType;
use memmap2::Mmap;
use safetensors::SafeTensorError;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One tensor of a mapped file: its byte range in the map (absolute, header included).
#[derive(Clone, Debug)]
pub(crate) struct RawEntry {
    pub name: String,
    /// `Ok` for the dtypes the runtime computes with; the header spelling otherwise.
    pub dtype: std::result::Result<DType, String>,
    pub shape: Vec<usize>,
    pub start: usize,
    pub len: usize,
}

/// A memory-mapped safetensors file and the tensors its header lists.
pub(crate) struct MappedFile {
    pub path: PathBuf,
    pub map: Arc<Mmap>,
    pub entries: Vec<RawEntry>,
    /// `__metadata__` of the header, if any.
    pub metadata: Option<std::collections::HashMap<String, String>>,
}

fn werr(path: &Path, msg: impl Into<String>) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn dtype_from_st(d: safetensors::Dtype) -> std::result::Result<DType, String> {
    match d {
        safetensors::Dtype::F32 => Ok(DType::F32),
        safetensors::Dtype::BF16 => Ok(DType::BF16),
        safetensors::Dtype::F16 => Ok(DType::F16),
        other => Err(format!("{other:?}")),
    }
}

pub(crate) fn dtype_to_st(d: DType) -> safetensors::Dtype {
    match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
    }
}

/// Maps `path` and validates its header. Every way a file can be broken ends in
/// `Error::Weights` naming the file; nothing here indexes outside the map.
pub(crate) fn map_file(path: &Path) -> Result<MappedFile> {
    let file = std::fs::File::open(path).map_err(|e| werr(path, format!("cannot open: {e}")))?;
    // SAFETY: the map is read-only. Like every mmap-based loader, we rely on nobody truncating
    // the file while it is mapped (that would fault on access, not corrupt memory safety of the
    // checks below, which all happen against the length the map had when it was created).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| werr(path, format!("cannot map: {e}")))?;
    let (entries, metadata) = parse_header(path, &map)?;
    Ok(MappedFile {
        path: path.to_path_buf(),
        map: Arc::new(map),
        entries,
        metadata,
    })
}

type Parsed = (
    Vec<RawEntry>,
    Option<std::collections::HashMap<String, String>>,
);

/// Parses and validates the header of a whole safetensors file held in `buf`.
pub(crate) fn parse_header(path: &Path, buf: &[u8]) -> Result<Parsed> {
    let file_len = buf.len();
    // Our own first checks give the clearest messages for the common breakages.
    let Some(len_bytes) = buf.get(..8) else {
        return Err(werr(
            path,
            format!(
                "file is {file_len} bytes, shorter than the 8-byte header length \
                 (truncated, or not a safetensors file)"
            ),
        ));
    };
    let mut arr = [0u8; 8];
    arr.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(arr);
    let available = (file_len - 8) as u64;
    if n > available {
        return Err(werr(
            path,
            format!(
                "header length {n} bytes runs past the end of the file ({file_len} bytes): \
                 truncated, or not a safetensors file"
            ),
        ));
    }
    let n = n as usize; // n <= file_len, fits
    let (_n, meta) = safetensors::SafeTensors::read_metadata(buf).map_err(|e| {
        let header = &buf[8..8 + n];
        werr(path, describe_st_error(&e, header, file_len - 8 - n))
    })?;
    let data_start = 8 + n;
    let mut entries = Vec::new();
    for (name, info) in meta.tensors() {
        let (s, e) = info.data_offsets;
        // read_metadata checked that the offsets tile the data section exactly; check again so
        // that no later slice can go out of bounds whatever the crate version does.
        let start = data_start
            .checked_add(s)
            .filter(|_| e >= s)
            .ok_or_else(|| {
                werr(
                    path,
                    format!("tensor `{name}`: bad data offsets [{s}, {e}]"),
                )
            })?;
        let end = data_start
            .checked_add(e)
            .filter(|&end| end <= file_len)
            .ok_or_else(|| {
                werr(
                    path,
                    format!("tensor `{name}`: data offsets [{s}, {e}] lie outside the file"),
                )
            })?;
        entries.push(RawEntry {
            dtype: dtype_from_st(info.dtype),
            shape: info.shape.clone(),
            start,
            len: end - start,
            name,
        });
    }
    entries.sort_by_key(|e| e.start);
    Ok((entries, meta.metadata().clone()))
}

/// A message for a header the safetensors crate rejected.
fn describe_st_error(e: &SafeTensorError, header: &[u8], data_len: usize) -> String {
    match e {
        SafeTensorError::MetadataIncompleteBuffer => {
            // Work out how much data the header describes, to say whether bytes are missing.
            match described_data_len(header) {
                Some(want) if want > data_len => format!(
                    "truncated: the header describes {want} bytes of tensor data but the file \
                     holds {data_len}"
                ),
                Some(want) => format!(
                    "the header describes {want} bytes of tensor data but the file holds \
                     {data_len} (trailing bytes)"
                ),
                None => format!("tensor data does not cover the data section ({e})"),
            }
        }
        SafeTensorError::InvalidHeaderDeserialization(j) => {
            format!("header is not valid safetensors JSON: {j}")
        }
        SafeTensorError::InvalidHeader(u) => format!("header is not valid UTF-8: {u}"),
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor `{name}`: data offsets do not follow the previous tensor's")
        }
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's data size does not match its shape and dtype".to_string()
        }
        other => format!("invalid safetensors header: {other}"),
    }
}

/// The largest end offset in a header (for error messages only).
fn described_data_len(header: &[u8]) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_slice(header).ok()?;
    let obj = v.as_object()?;
    obj.iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .and_then(|m| usize::try_from(m).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_tiny_buffers_are_errors() {
        let p = Path::new("x.safetensors");
        for len in 0..8 {
            let e = parse_header(p, &vec![0u8; len]).unwrap_err().to_string();
            assert!(e.contains("shorter than the 8-byte"), "{e}");
        }
        // Header length 0 and nothing else: not valid JSON.
        let e = parse_header(p, &[0u8; 8]).unwrap_err().to_string();
        assert!(e.contains("x.safetensors"), "{e}");
        // Huge header length.
        let mut b = u64::MAX.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        let e = parse_header(p, &b).unwrap_err().to_string();
        assert!(e.contains("runs past the end"), "{e}");
    }

    #[test]
    fn empty_header_is_a_valid_empty_file() {
        let mut b = 2u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        let (entries, meta) = parse_header(Path::new("e"), &b).unwrap();
        assert!(entries.is_empty());
        assert!(meta.is_none());
    }
}
