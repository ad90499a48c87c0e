//! `xsam`: the command line.
//!
//! Exit status: 0 on success, 2 for bad input (a one-line message on stderr naming the problem;
//! clap's own usage errors also exit 2), 1 for internal errors. Never a panic.
//!
//! Each subcommand is an `Args` struct plus a `run_*` function returning `xsam::Result`; add new
//! ones to [`Command`] and [`dispatch`].

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[path = "xsam/run.rs"]
mod run;
use run::{run_demo, run_run, DemoArgs, RunArgs};
#[path = "xsam/bench.rs"]
mod bench;
use bench::{run_bench, BenchArgs};

#[derive(Parser, Debug)]
#[command(name = "xsam", version, about = "Inference runtime for X-SAM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run one task on one image (interfaces.md §3) and print or write the result JSON.
    Run(RunArgs),
    /// Tour every task on a built-in drawn image (a cached tiny random model unless --model).
    Demo(DemoArgs),
    /// Write a random model directory (config.json, weights, tokenizer.json) for tests and
    /// benchmarks.
    Init(InitArgs),
    /// Convert the released PyTorch checkpoint (pytorch_model.bin) and Phi-3's tokenizer.json
    /// into a model directory (bf16 safetensors sharded at 4 GB, config.json, tokenizer.json
    /// with <SEG>, <p>, </p> added).
    Convert(ConvertArgs),
    /// Warm repeats of each task on a drawn image (a model directory, or random weights of a
    /// preset written once): a table per stage and end to end, printed last.
    Bench(BenchArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Preset {
    /// The released X-SAM geometry (~9.25 GB of bf16 weights, sharded at 4 GB).
    Full,
    /// The same architecture with small numbers (a few MB).
    Tiny,
}

impl Preset {
    fn name(self) -> &'static str {
        match self {
            Preset::Full => "full",
            Preset::Tiny => "tiny",
        }
    }
}

#[derive(clap::Args, Debug)]
struct InitArgs {
    /// Model geometry.
    #[arg(long, value_enum)]
    preset: Preset,
    /// Output directory (created if absent; must be empty unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random weights (same seed, same bytes).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// No progress bar and no summary.
    #[arg(long)]
    quiet: bool,
    /// Write into a non-empty directory, replacing the model files there.
    #[arg(long)]
    force: bool,
}

fn run_init(a: &InitArgs) -> xsam::Result<()> {
    let opts = xsam::init::InitOptions {
        seed: a.seed,
        progress: !a.quiet,
        force: a.force,
        ..Default::default()
    };
    let start = std::time::Instant::now();
    let s = xsam::init::write_random_preset(a.preset.name(), &a.out, &opts)?;
    if !a.quiet {
        let files = s.weights.files.len() + usize::from(s.weights.index.is_some());
        eprintln!(
            "wrote {} preset to {}: {} tensors, {} parameters, {:.2} GB in {} weight file(s), {:.1} s",
            a.preset.name(),
            s.dir.display(),
            s.tensors,
            s.params,
            s.weights.file_bytes as f64 / 1e9,
            files,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
struct ConvertArgs {
    /// The torch.save checkpoint (`pytorch_model.bin` of hao9610/X-SAM, s3_mixed_finetune).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Phi-3-mini-4k-instruct's `tokenizer.json` (32011 tokens).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Output model directory (created if absent; must be empty unless --force).
    #[arg(long)]
    out: PathBuf,
    /// config.json of the checkpoint's geometry (default: the released X-SAM geometry).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Write into a non-empty directory, replacing the model files there.
    #[arg(long)]
    force: bool,
    /// No progress bar, warnings or summary.
    #[arg(long)]
    quiet: bool,
}

/// `a, b, c and 4 more`.
fn some_names(names: &[String], n: usize) -> String {
    let mut s = names
        .iter()
        .take(n)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > n {
        s.push_str(&format!(" and {} more", names.len() - n));
    }
    s
}

fn run_convert(a: &ConvertArgs) -> xsam::Result<()> {
    let config = match &a.config {
        Some(p) => Some(xsam::Config::load(p)?),
        None => None,
    };
    let opts = xsam::convert::ConvertOptions {
        config,
        progress: !a.quiet,
        force: a.force,
        ..Default::default()
    };
    let start = std::time::Instant::now();
    let s = xsam::convert::convert_checkpoint(&a.checkpoint, &a.tokenizer, &a.out, &opts)?;
    if !a.quiet {
        if !s.skipped.is_empty() {
            eprintln!(
                "warning: skipped {} checkpoint tensor(s) X-SAM inference does not use: {}",
                s.skipped.len(),
                some_names(&s.skipped, 5)
            );
        }
        if !s.skipped_unused.is_empty() {
            eprintln!(
                "warning: skipped {} unused tensor(s) that do not match the table: {}",
                s.skipped_unused.len(),
                some_names(&s.skipped_unused, 3)
            );
        }
        if !s.non_tensor_keys.is_empty() {
            eprintln!(
                "warning: ignored {} state-dict entr(ies) that are not tensors: {}",
                s.non_tensor_keys.len(),
                some_names(&s.non_tensor_keys, 5)
            );
        }
        let dtypes = s
            .source_dtypes
            .iter()
            .map(|(d, n)| format!("{n} {d}"))
            .collect::<Vec<_>>()
            .join(", ");
        let files = s.weights.files.len() + usize::from(s.weights.index.is_some());
        eprintln!(
            "converted {} to {}: {} tensors ({dtypes}; written as bf16), {} parameters, \
             {:.2} GB in {} weight file(s), {:.1} s",
            a.checkpoint.display(),
            s.dir.display(),
            s.tensors,
            s.params,
            s.weights.file_bytes as f64 / 1e9,
            files,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn dispatch(cli: &Cli) -> xsam::Result<()> {
    match &cli.command {
        Command::Run(a) => run_run(a),
        Command::Demo(a) => run_demo(a),
        Command::Init(a) => run_init(a),
        Command::Convert(a) => run_convert(a),
        Command::Bench(a) => run_bench(a),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help / --version print and exit 0; usage errors exit 2.
            let code = e.exit_code();
            let _ = e.print();
            return ExitCode::from(code.clamp(0, 255) as u8);
        }
    };
    // A panic is a bug: report it in one line and exit 1, never 101.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("xsam: internal error (a bug, please report it): {msg}{at}");
    }));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dispatch(&cli)));
    match outcome {
        Err(_) => ExitCode::from(1),
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            // One line: flatten multi-line messages (config problems) with "; ".
            let msg = e
                .to_string()
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("xsam: error: {msg}");
            if e.is_user_input() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
