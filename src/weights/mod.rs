//! Model weights: safetensors files mapped into memory, looked up by name.
//!
//! * [`Weights::load`] opens a model directory (`model.safetensors`, or the shards listed by
//!   `model.safetensors.index.json`), a single `.safetensors` file, or an index file.
//! * Tensors are zero-copy views of the map ([`Tensor::from_mmap`]); a tensor whose data is not
//!   aligned for its element type (possible in files from other writers) is copied on access.
//! * [`VarBuilder`] scopes names: `w.pp("segmentor.encoder").pp("layers").pp(3).get("attn.qkv.weight",
//!   &[3 * c, c])` looks up `segmentor.encoder.layers.3.attn.qkv.weight` and checks its shape.
//! * Every failure is an [`Error`]: `MissingTensor` (full name and where it was looked for),
//!   `TensorShape` (full name, expected and found shape), or `Weights` (file and what is wrong
//!   with it). Nothing here panics on a bad file.
//! * [`torch::TorchCheckpoint`] reads PyTorch's `torch.save` files (zip + pickle) for
//!   `xsam convert`.

mod safetensors;
pub mod torch;
mod writer;

pub use writer::{
    shard_name, write_model_weights, write_safetensors, NamedSource, TensorSource, WrittenWeights,
    DEFAULT_SHARD_BYTES, INDEX_FILE, SINGLE_FILE,
};

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use half::{bf16, f16};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

enum Entry {
    Mapped {
        file: usize,
        start: usize,
        len: usize,
        dtype: std::result::Result<DType, String>,
        shape: Vec<usize>,
    },
    Owned(Tensor),
}

struct File {
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
    metadata: Option<HashMap<String, String>>,
}

struct Inner {
    /// What was opened (directory, file or index); used in `MissingTensor` messages.
    location: PathBuf,
    files: Vec<File>,
    entries: BTreeMap<String, Entry>,
}

/// A set of named tensors. Cheap to clone (shared).
#[derive(Clone)]
pub struct Weights {
    inner: Arc<Inner>,
}

/// What the header says about one tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub shape: Vec<usize>,
    /// `None` for a dtype the runtime does not compute with (the header spelling is in
    /// `dtype_name`); reading such a tensor is an error.
    pub dtype: Option<DType>,
    pub dtype_name: String,
    /// File holding the tensor (`None` for in-memory weights).
    pub file: Option<PathBuf>,
}

fn werr(path: &Path, msg: impl Into<String>) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Weights({}, {} tensors in {} files)",
            self.inner.location.display(),
            self.inner.entries.len(),
            self.inner.files.len()
        )
    }
}

impl Weights {
    // ------------------------------------------------------------------ opening

    /// Opens a model directory, a `.safetensors` file or a `*.index.json` file.
    ///
    /// In a directory, `model.safetensors.index.json` is used when present, else
    /// `model.safetensors`.
    pub fn load(path: impl AsRef<Path>) -> Result<Weights> {
        Self::load_with_progress(path, &mut |_, _| Ok(()))
    }

    /// [`load`](Self::load), calling `on_file(done, total)` after each file is mapped and its
    /// header validated; an error from it stops the load with that error.
    pub fn load_with_progress(
        path: impl AsRef<Path>,
        on_file: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Weights> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| werr(path, format!("cannot open: {e}")))?;
        if meta.is_dir() {
            let index = path.join(INDEX_FILE);
            let single = path.join(SINGLE_FILE);
            if index.is_file() {
                Self::load_index_at(&index, path, on_file)
            } else if single.is_file() {
                Self::load_files(&[single], path, on_file)
            } else {
                Err(werr(
                    path,
                    format!("the directory has neither {SINGLE_FILE} nor {INDEX_FILE}"),
                ))
            }
        } else if path.to_string_lossy().ends_with(".json") {
            Self::load_index_at(path, path, on_file)
        } else {
            Self::load_files(&[path.to_path_buf()], path, on_file)
        }
    }

    /// Opens a sharded checkpoint from its Hugging Face index file
    /// (`{"metadata": {...}, "weight_map": {"tensor name": "shard file name"}}`).
    pub fn load_index(index: impl AsRef<Path>) -> Result<Weights> {
        let index = index.as_ref();
        Self::load_index_at(index, index, &mut |_, _| Ok(()))
    }

    fn load_index_at(
        index: &Path,
        location: &Path,
        on_file: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Weights> {
        let text = std::fs::read_to_string(index)
            .map_err(|e| werr(index, format!("cannot read index: {e}")))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| werr(index, format!("index is not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| werr(index, "index has no `weight_map` object"))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shard_names: Vec<&str> = Vec::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                werr(
                    index,
                    format!("weight_map entry for `{name}` is not a file name"),
                )
            })?;
            // Shards live next to the index: a plain file name, nothing that walks elsewhere.
            let plain = Path::new(file)
                .file_name()
                .is_some_and(|f| f == std::ffi::OsStr::new(file));
            if !plain || file == ".." || file == "." {
                return Err(werr(
                    index,
                    format!("weight_map entry for `{name}`: `{file}` is not a plain file name"),
                ));
            }
            if !shard_names.contains(&file) {
                shard_names.push(file);
            }
        }
        shard_names.sort_unstable();
        let mut paths = Vec::with_capacity(shard_names.len());
        for s in &shard_names {
            let p = dir.join(s);
            if !p.is_file() {
                return Err(werr(
                    index,
                    format!(
                        "shard `{s}` listed in the index is missing ({})",
                        p.display()
                    ),
                ));
            }
            paths.push(p);
        }
        let w = Self::load_files(&paths, location, on_file)?;
        // Every listed tensor must be in the shard the index names.
        for (name, file) in map {
            let file = file.as_str().unwrap_or_default();
            let found = match w.inner.entries.get(name) {
                Some(Entry::Mapped { file: f, .. }) => {
                    w.inner.files[*f].path.file_name() == Some(std::ffi::OsStr::new(file))
                }
                _ => false,
            };
            if !found {
                return Err(werr(
                    index,
                    format!("the index puts tensor `{name}` in `{file}`, which does not hold it"),
                ));
            }
        }
        Ok(w)
    }

    /// Opens one or more safetensors files as one set of weights (a name may appear only once).
    pub fn from_files(paths: &[PathBuf]) -> Result<Weights> {
        let location = paths.first().cloned().unwrap_or_default();
        Self::load_files(paths, &location, &mut |_, _| Ok(()))
    }

    fn load_files(
        paths: &[PathBuf],
        location: &Path,
        on_file: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Weights> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = BTreeMap::new();
        for (fi, p) in paths.iter().enumerate() {
            let mf = safetensors::map_file(p)?;
            for e in mf.entries {
                if entries.contains_key(&e.name) {
                    return Err(werr(
                        p,
                        format!("tensor `{}` also appears in an earlier file", e.name),
                    ));
                }
                entries.insert(
                    e.name,
                    Entry::Mapped {
                        file: fi,
                        start: e.start,
                        len: e.len,
                        dtype: e.dtype,
                        shape: e.shape,
                    },
                );
            }
            files.push(File {
                path: mf.path,
                map: mf.map,
                metadata: mf.metadata,
            });
            on_file(fi + 1, paths.len())?;
        }
        Ok(Weights {
            inner: Arc::new(Inner {
                location: location.to_path_buf(),
                files,
                entries,
            }),
        })
    }

    /// In-memory weights (tests, converted checkpoints). `location` appears in error messages.
    pub fn from_tensors(
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        location: impl Into<PathBuf>,
    ) -> Weights {
        let entries = tensors
            .into_iter()
            .map(|(n, t)| (n, Entry::Owned(t)))
            .collect();
        Weights {
            inner: Arc::new(Inner {
                location: location.into(),
                files: Vec::new(),
                entries,
            }),
        }
    }

    // ------------------------------------------------------------------ queries

    /// Where the weights came from.
    pub fn location(&self) -> &Path {
        &self.inner.location
    }

    /// The files mapped, in order.
    pub fn files(&self) -> Vec<&Path> {
        self.inner.files.iter().map(|f| f.path.as_path()).collect()
    }

    /// The `__metadata__` map of the header of file `i` (in [`Weights::files`] order).
    pub fn file_metadata(&self, i: usize) -> Option<&HashMap<String, String>> {
        self.inner.files.get(i)?.metadata.as_ref()
    }

    /// Data bytes of the tensors whose names start with `prefix` ("" = all of them).
    pub fn bytes_under(&self, prefix: &str) -> u64 {
        self.inner
            .entries
            .range(prefix.to_string()..)
            .take_while(|(n, _)| n.starts_with(prefix))
            .map(|(_, e)| match e {
                Entry::Mapped { len, .. } => *len as u64,
                Entry::Owned(t) => (t.numel() * t.dtype().size_in_bytes()) as u64,
            })
            .sum()
    }

    /// Bytes of the mapped files (what the weights occupy once paged in; 0 in memory).
    pub fn mapped_bytes(&self) -> u64 {
        self.inner.files.iter().map(|f| f.map.len() as u64).sum()
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.inner.entries.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.inner.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.entries.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.inner.entries.contains_key(name)
    }

    /// Shape and dtype of a tensor, without touching its data.
    pub fn info(&self, name: &str) -> Option<TensorInfo> {
        Some(match self.inner.entries.get(name)? {
            Entry::Mapped {
                file, dtype, shape, ..
            } => TensorInfo {
                shape: shape.clone(),
                dtype: dtype.as_ref().ok().copied(),
                dtype_name: match dtype {
                    Ok(d) => d.safetensors_name().to_string(),
                    Err(s) => s.clone(),
                },
                file: Some(self.inner.files[*file].path.clone()),
            },
            Entry::Owned(t) => TensorInfo {
                shape: t.dims().to_vec(),
                dtype: Some(t.dtype()),
                dtype_name: t.dtype().safetensors_name().to_string(),
                file: None,
            },
        })
    }

    fn missing(&self, name: &str) -> Error {
        Error::MissingTensor {
            name: name.to_string(),
            location: self.inner.location.display().to_string(),
        }
    }

    /// The tensor `name` (full name), in its stored dtype, without a shape check.
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        match self
            .inner
            .entries
            .get(name)
            .ok_or_else(|| self.missing(name))?
        {
            Entry::Owned(t) => Ok(t.clone()),
            Entry::Mapped {
                file,
                start,
                len,
                dtype,
                shape,
            } => {
                let f = &self.inner.files[*file];
                let dtype = match dtype {
                    Ok(d) => *d,
                    Err(s) => {
                        return Err(werr(
                            &f.path,
                            format!(
                            "tensor `{name}` has dtype {s}; only F32, BF16 and F16 are supported"
                        ),
                        ))
                    }
                };
                let (start, len) = (*start, *len);
                let bytes = f.map.get(start..start.saturating_add(len)).ok_or_else(|| {
                    werr(&f.path, format!("tensor `{name}`: data outside the file"))
                })?;
                let aligned = (bytes.as_ptr() as usize).is_multiple_of(dtype.size_in_bytes());
                let r = if aligned {
                    Tensor::from_mmap(f.map.clone(), start, len, dtype, shape.clone())
                } else {
                    match dtype {
                        DType::F32 => Tensor::from_vec(
                            bytemuck::pod_collect_to_vec::<u8, f32>(bytes),
                            shape.clone(),
                        ),
                        DType::BF16 => Tensor::from_vec(
                            bytemuck::pod_collect_to_vec::<u8, bf16>(bytes),
                            shape.clone(),
                        ),
                        DType::F16 => Tensor::from_vec(
                            bytemuck::pod_collect_to_vec::<u8, f16>(bytes),
                            shape.clone(),
                        ),
                    }
                };
                r.map_err(|e| werr(&f.path, format!("tensor `{name}`: {e}")))
            }
        }
    }

    /// The tensor `name` (full name), checking its shape.
    pub fn get(&self, name: &str, dims: &[usize]) -> Result<Tensor> {
        self.check_shape(name, dims)?;
        self.get_any(name)
    }

    /// The tensor `name` with shape `dims`, converted to `dtype` (a no-op view when it already
    /// has that dtype).
    pub fn get_as(&self, name: &str, dims: &[usize], dtype: DType) -> Result<Tensor> {
        let t = self.get(name, dims)?;
        if t.dtype() == dtype {
            Ok(t)
        } else {
            t.to_dtype(dtype)
        }
    }

    /// The tensor `name` with shape `dims`, converted to f32.
    pub fn get_f32(&self, name: &str, dims: &[usize]) -> Result<Tensor> {
        self.get_as(name, dims, DType::F32)
    }

    /// `Ok` when `name` exists with shape `dims` (data untouched).
    pub fn check_shape(&self, name: &str, dims: &[usize]) -> Result<()> {
        let found = match self
            .inner
            .entries
            .get(name)
            .ok_or_else(|| self.missing(name))?
        {
            Entry::Mapped { shape, .. } => shape.as_slice(),
            Entry::Owned(t) => t.dims(),
        };
        if found != dims {
            return Err(Error::TensorShape {
                name: name.to_string(),
                expected: dims.to_vec(),
                found: found.to_vec(),
            });
        }
        Ok(())
    }

    /// A scoped view: names are looked up under `prefix.`.
    pub fn pp(&self, prefix: impl std::fmt::Display) -> VarBuilder {
        VarBuilder {
            weights: self.clone(),
            prefix: prefix.to_string(),
        }
    }

    /// The unscoped view.
    pub fn root(&self) -> VarBuilder {
        VarBuilder {
            weights: self.clone(),
            prefix: String::new(),
        }
    }

    /// Metadata-free summary: tensor name -> shape (for tests and tools).
    pub fn shapes(&self) -> HashMap<String, Vec<usize>> {
        self.names()
            .filter_map(|n| Some((n.to_string(), self.info(n)?.shape)))
            .collect()
    }
}

/// A prefix-scoped view of [`Weights`] (`candle`'s `VarBuilder` idea). Cheap to clone.
#[derive(Clone, Debug)]
pub struct VarBuilder {
    weights: Weights,
    prefix: String,
}

impl VarBuilder {
    /// A view one level deeper: `vb.pp("layers").pp(3)` scopes to `<prefix>.layers.3`.
    pub fn pp(&self, sub: impl std::fmt::Display) -> VarBuilder {
        VarBuilder {
            weights: self.weights.clone(),
            prefix: self.full_name(&sub.to_string()),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// `prefix.name` (or `name` at the root; `prefix` when `name` is empty).
    pub fn full_name(&self, name: &str) -> String {
        match (self.prefix.is_empty(), name.is_empty()) {
            (true, _) => name.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}.{}", self.prefix, name),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains(&self.full_name(name))
    }

    pub fn info(&self, name: &str) -> Option<TensorInfo> {
        self.weights.info(&self.full_name(name))
    }

    /// The tensor, checking its shape; errors name the full tensor name.
    pub fn get(&self, name: &str, dims: &[usize]) -> Result<Tensor> {
        self.weights.get(&self.full_name(name), dims)
    }

    /// The tensor without a shape check.
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        self.weights.get_any(&self.full_name(name))
    }

    /// The tensor, shape-checked and converted to f32.
    pub fn get_f32(&self, name: &str, dims: &[usize]) -> Result<Tensor> {
        self.weights.get_f32(&self.full_name(name), dims)
    }

    /// The tensor, shape-checked and converted to `dtype`.
    pub fn get_as(&self, name: &str, dims: &[usize], dtype: DType) -> Result<Tensor> {
        self.weights.get_as(&self.full_name(name), dims, dtype)
    }

    pub fn check_shape(&self, name: &str, dims: &[usize]) -> Result<()> {
        self.weights.check_shape(&self.full_name(name), dims)
    }
}
