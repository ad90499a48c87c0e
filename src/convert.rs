//! `xsam convert`: the released X-SAM checkpoint (`pytorch_model.bin`, a `torch.save` zip of
//! the flat bf16 state dict, architecture notes §15) plus Phi-3's `tokenizer.json` to a model
//! directory (interfaces.md §1): sharded safetensors, `config.json`, and the tokenizer with
//! X-SAM's `<SEG>`, `<p>`, `</p>` at ids 32011..=32013.
//!
//! * Tensors are matched against the checkpoint table of the config
//!   ([`checkpoint_tensors`]): every needed tensor must be there with its shape (all problems
//!   are reported at once); unused ones (SAM neck, SigLIP head, ...) are written when present;
//!   names the table does not know (e.g. `segmentor.class_predictor.*` of the stage-1 file)
//!   are skipped and listed in the summary.
//! * Every tensor is written as bf16 (kept as is when it is bf16 already; f32 / f16 / f64 are
//!   rounded as torch's `.to(torch.bfloat16)` rounds), streamed from the memory-mapped
//!   checkpoint, so memory stays small whatever the checkpoint size.
//! * Nothing is written before the checkpoint, the tokenizer and the config have been checked;
//!   `config.json` is written last, so a directory with a `config.json` holds a complete model.

use crate::error::{Error, Result};
use crate::model::names::{checkpoint_tensors, TensorSpec};
use crate::model::Config;
use crate::tensor::DType;
use crate::weights::torch::{TorchCheckpoint, TorchSource};
use crate::weights::{write_model_weights, NamedSource, WrittenWeights, DEFAULT_SHARD_BYTES};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// Options of [`convert_checkpoint`].
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Geometry of the checkpoint; `None` means the released one (`Config::preset("full")`).
    pub config: Option<Config>,
    /// Shard size limit (4 GB by default); one `model.safetensors` when everything fits.
    pub max_shard_bytes: u64,
    /// Show a progress bar (bytes written) on stderr.
    pub progress: bool,
    /// Write into a non-empty directory, replacing the model files already there.
    pub force: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            config: None,
            max_shard_bytes: DEFAULT_SHARD_BYTES,
            progress: false,
            force: false,
        }
    }
}

/// Which checkpoint tensors go into the model directory.
#[derive(Clone, Debug)]
pub struct ConversionPlan {
    /// Tensors to write, in table order.
    pub tensors: Vec<TensorSpec>,
    /// Checkpoint tensors the table does not know (not written).
    pub skipped: Vec<String>,
    /// Unused tensors of the table with another shape or a non-float dtype in the checkpoint
    /// (not written: nothing reads them; "name: reason").
    pub skipped_unused: Vec<String>,
    /// Unused tensors of the table that the checkpoint lacks (allowed).
    pub absent_unused: Vec<String>,
}

/// What [`convert_checkpoint`] did.
#[derive(Clone, Debug)]
pub struct ConvertSummary {
    pub dir: PathBuf,
    pub config: Config,
    /// Tensors and parameters written.
    pub tensors: usize,
    pub params: u64,
    /// Source dtype (torch spelling) -> number of written tensors that had it; everything but
    /// `bfloat16` was converted.
    pub source_dtypes: BTreeMap<String, usize>,
    pub skipped: Vec<String>,
    pub skipped_unused: Vec<String>,
    pub absent_unused: Vec<String>,
    /// Entries of the state dict that are not tensors (ignored).
    pub non_tensor_keys: Vec<String>,
    /// The key the state dict was under (`module` when DeepSpeed wrapped it).
    pub wrapper: Option<String>,
    /// Whether `<SEG>`, `<p>`, `</p>` were added (false: the tokenizer had them already).
    pub tokens_added: bool,
    pub weights: WrittenWeights,
}

/// At most this many problems are listed in an error.
const MAX_LISTED: usize = 20;

/// Matches the checkpoint against the tensor table of `cfg`. Every missing or mis-shaped needed
/// tensor is reported in one error.
pub fn plan_conversion(ck: &TorchCheckpoint, cfg: &Config) -> Result<ConversionPlan> {
    let specs = checkpoint_tensors(cfg);
    let known: HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let mut problems = Vec::new();
    let mut plan = ConversionPlan {
        tensors: Vec::new(),
        skipped: Vec::new(),
        skipped_unused: Vec::new(),
        absent_unused: Vec::new(),
    };
    for s in specs.iter() {
        match ck.get(&s.name) {
            None if s.needed => {
                problems.push(format!("missing tensor `{}` (shape {:?})", s.name, s.shape))
            }
            None => plan.absent_unused.push(s.name.clone()),
            Some(t) => {
                let issue = if t.shape != s.shape {
                    Some(format!(
                        "tensor `{}`: expected shape {:?}, found {:?}",
                        s.name, s.shape, t.shape
                    ))
                } else if !t.dtype.is_float() {
                    Some(format!(
                        "tensor `{}` has dtype {}; a floating-point dtype is needed",
                        s.name, t.dtype
                    ))
                } else {
                    None
                };
                match issue {
                    Some(m) if s.needed => problems.push(m),
                    Some(m) => plan.skipped_unused.push(m),
                    None => plan.tensors.push(s.clone()),
                }
            }
        }
    }
    plan.skipped = ck
        .names()
        .filter(|n| !known.contains(n))
        .map(str::to_string)
        .collect();
    if problems.is_empty() {
        return Ok(plan);
    }
    let n = problems.len();
    let mut lines: Vec<String> = problems.into_iter().take(MAX_LISTED).collect();
    if n > MAX_LISTED {
        lines.push(format!("... and {} more", n - MAX_LISTED));
    }
    Err(Error::Weights {
        path: ck.path().to_path_buf(),
        msg: format!(
            "the checkpoint does not match the model geometry ({n} problem{}; for a checkpoint \
             of another geometry pass its config.json):\n  - {}",
            if n == 1 { "" } else { "s" },
            lines.join("\n  - ")
        ),
    })
}

/// Converts `checkpoint` (a `torch.save` file) and `tokenizer_json` (Phi-3's tokenizer) into
/// the model directory `out_dir` (created if needed; must be empty unless `force`).
pub fn convert_checkpoint(
    checkpoint: impl AsRef<Path>,
    tokenizer_json: impl AsRef<Path>,
    out_dir: impl AsRef<Path>,
    opts: &ConvertOptions,
) -> Result<ConvertSummary> {
    let dir = out_dir.as_ref();
    let cfg = match &opts.config {
        Some(c) => c.clone(),
        None => Config::preset("full")?,
    };
    cfg.validate()?;

    // The tokenizer first: quick to check.
    let tokenizer_json = tokenizer_json.as_ref();
    if tokenizer_json.is_dir() {
        return Err(Error::Tokenizer(format!(
            "{} is a directory; pass Phi-3's tokenizer.json file",
            tokenizer_json.display()
        )));
    }
    let mut tok = crate::tokenizer::load_tokenizer(tokenizer_json)?;
    let tokens_added = crate::tokenizer::add_xsam_tokens(&mut tok)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?;
    crate::tokenizer::check_tokenizer(&tok, &cfg)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?;

    let ck = TorchCheckpoint::open(checkpoint.as_ref())?;
    let plan = plan_conversion(&ck, &cfg)?;

    crate::init::prepare_dir(dir, opts.force)?;

    let mut source_dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut sources: Vec<TorchSource> = Vec::with_capacity(plan.tensors.len());
    for s in &plan.tensors {
        let src = ck.source(&s.name, DType::BF16)?;
        *source_dtypes
            .entry(src.tensor().dtype.name().to_string())
            .or_default() += 1;
        sources.push(src);
    }
    let named: Vec<NamedSource> = plan
        .tensors
        .iter()
        .zip(&sources)
        .map(|(s, src)| NamedSource::new(s.name.clone(), src))
        .collect();
    let params: u64 = plan.tensors.iter().map(|s| s.numel() as u64).sum();

    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(params * 2);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_message("converting weights");
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut on_bytes = |n: u64| bar.inc(n);
    let written = write_model_weights(dir, &named, opts.max_shard_bytes, &mut on_bytes);
    bar.finish_and_clear();
    let written = written?;

    let tok_path = dir.join("tokenizer.json");
    tok.save(&tok_path, false)
        .map_err(|e| Error::Tokenizer(format!("writing {}: {e}", tok_path.display())))?;
    cfg.save(dir.join("config.json"))?;

    Ok(ConvertSummary {
        dir: dir.to_path_buf(),
        config: cfg,
        tensors: plan.tensors.len(),
        params,
        source_dtypes,
        skipped: plan.skipped,
        skipped_unused: plan.skipped_unused,
        absent_unused: plan.absent_unused,
        non_tensor_keys: ck.non_tensor_keys().to_vec(),
        wrapper: ck.wrapper().map(str::to_string),
        tokens_added,
        weights: written,
    })
}
