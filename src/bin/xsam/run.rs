//! `xsam run` (interfaces.md §3) and `xsam demo`.

use std::path::{Path, PathBuf};
use std::time::Instant;
use xsam::image::{load_image, load_mask, RgbImage};
use xsam::render;
use xsam::task::postprocess::MaskResult;
use xsam::task::templates::{question, QuestionInput, Task};
use xsam::{Device, Error, Model, Output, Request, Result, Session};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Model directory (config.json, weights, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The image (PNG, JPEG or WebP).
    #[arg(long)]
    image: PathBuf,
    /// conversation, semantic, instance, panoptic, referring, reasoning, gcg, interactive, vgd.
    #[arg(long)]
    task: String,
    /// Classes (things) for semantic / instance / panoptic: "a, b, c".
    #[arg(long)]
    classes: Option<String>,
    /// Stuff classes for panoptic: "d, e".
    #[arg(long)]
    stuff: Option<String>,
    /// The question (conversation), expression (referring), sentence (reasoning).
    #[arg(long)]
    prompt: Option<String>,
    /// A visual prompt mask (repeatable): any nonzero pixel is on; same size as its image.
    #[arg(long)]
    vprompt: Vec<PathBuf>,
    /// Cross-image vgd: the image the --vprompt masks are drawn on.
    #[arg(long)]
    vprompt_image: Option<PathBuf>,
    /// Forced-answer mode with this answer.
    #[arg(long)]
    answer: Option<String>,
    /// Forced-answer mode with the default answer "Sure, <SEG>." (as the benchmarks).
    #[arg(long)]
    forced: bool,
    /// Generation bound.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Score threshold for instance / panoptic / vgd / interactive.
    #[arg(long, default_value_t = 0.5)]
    threshold: f64,
    /// cpu, cuda or cuda:N. Default: cpu (the CUDA pipeline is not wired up yet; `cuda` is
    /// reported as unavailable).
    #[arg(long)]
    device: Option<String>,
    /// Write the intermediates of interfaces.md §3 (f32 safetensors).
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Write the result JSON here (default: stdout).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write one binary mask PNG per result, a colour overlay and its legend into this directory.
    #[arg(long)]
    png: Option<PathBuf>,
    /// No progress on stderr.
    #[arg(long)]
    quiet: bool,
}

fn split_list(s: &Option<String>) -> Vec<String> {
    match s {
        None => vec![],
        Some(s) => s.split(',').map(|c| c.trim().to_string()).collect(),
    }
}

fn device(d: &Option<String>) -> Result<Device> {
    let dev = match d.as_deref() {
        // The default (docs/interfaces.md): CUDA when a usable GPU and compiled kernels exist.
        None | Some("auto") => match xsam::backend::cuda::cuda_available() {
            Ok(name) => {
                eprintln!(
                    "note: --device not given: using cuda:0 ({name}); --device cpu to override"
                );
                return Ok(Device::Cuda(0));
            }
            Err(_) => Device::Cpu,
        },
        Some(s) => s.parse()?,
    };
    if let Device::Cuda(i) = dev {
        // No usable GPU is a user error, in one line, before anything is loaded.
        if let Err(e) = xsam::backend::cuda::CudaBackend::new(i) {
            return Err(Error::Input(format!(
                "--device {dev}: CUDA is not usable here: {e}"
            )));
        }
    }
    Ok(dev)
}

/// Progress lines on stderr unless quiet.
struct Progress {
    quiet: bool,
}

impl Progress {
    /// Runs `f` with a spinner (shown only on a terminal); on success prints one line with
    /// the time taken, on failure nothing (the error is the only line).
    fn step<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.quiet {
            return f();
        }
        let t = Instant::now();
        let bar = spinner(what.to_string());
        let r = f();
        bar.finish_and_clear();
        if r.is_ok() {
            eprintln!("{what}: {:.2} s", t.elapsed().as_secs_f64());
        }
        r
    }
}

fn spinner(msg: String) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_message(msg);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

fn run_request(session: &mut Session, req: &Request, quiet: bool, label: &str) -> Result<Output> {
    if quiet {
        return session.run(req);
    }
    let bar = spinner(format!("{label}: prompt prefill"));
    let mut n = 0usize;
    let r = session.run_with_progress(req, &mut |_| {
        n += 1;
        bar.set_message(format!("{label}: generated {n} token(s)"));
    });
    bar.finish_and_clear();
    r
}

pub fn run_run(a: &RunArgs) -> Result<()> {
    let p = Progress { quiet: a.quiet };
    let task: Task = a.task.parse()?;
    let dev = device(&a.device)?;
    let classes = split_list(&a.classes);
    let stuff = split_list(&a.stuff);
    if (!classes.is_empty() || !stuff.is_empty())
        && !matches!(task, Task::Semantic | Task::Instance | Task::Panoptic)
    {
        return Err(Error::Input(format!(
            "task `{}` does not take --classes or --stuff",
            task.name()
        )));
    }
    if a.prompt.is_some() && !matches!(task, Task::Conversation | Task::Referring | Task::Reasoning)
    {
        return Err(Error::Input(format!(
            "task `{}` does not take --prompt",
            task.name()
        )));
    }
    // Cheap checks before the (possibly long) model load.
    question(
        task,
        &QuestionInput {
            classes: &classes,
            stuff: &stuff,
            text: a.prompt.as_deref(),
            regions: a.vprompt.len(),
        },
    )?;
    let image = load_image(&a.image)?;
    let vprompts = a
        .vprompt
        .iter()
        .map(load_mask)
        .collect::<Result<Vec<_>>>()?;
    let vprompt_image = a.vprompt_image.as_ref().map(load_image).transpose()?;
    let target = vprompt_image.as_ref().unwrap_or(&image);
    for (m, path) in vprompts.iter().zip(&a.vprompt) {
        if (m.width, m.height) != (target.width, target.height) {
            return Err(Error::Input(format!(
                "visual prompt {} is {}x{} but the image it refers to is {}x{}",
                path.display(),
                m.width,
                m.height,
                target.width,
                target.height
            )));
        }
    }
    let req = Request {
        task,
        classes,
        stuff,
        text: a.prompt.clone(),
        vprompts,
        vprompt_image,
        answer: a.answer.clone(),
        forced: a.forced,
        max_new_tokens: a.max_new_tokens,
        threshold: a.threshold,
        dump: a.dump.is_some(),
    };
    let model = p.step(&format!("loading {}", a.model.display()), || {
        Model::load(&a.model, dev)
    })?;
    model.check_request(&req, (image.height, image.width))?;
    let mut session = p.step(
        &format!("encoding the image ({}x{})", image.width, image.height),
        || model.session(&image),
    )?;
    let out = run_request(&mut session, &req, a.quiet, task.name())?;
    if let Some(path) = &a.dump {
        xsam::session::write_dump(path, &out.dump)?;
    }
    if let Some(dir) = &a.png {
        write_pngs(dir, &image, &out.masks)?;
    }
    let json = out.result.to_json_pretty()?;
    match &a.json {
        Some(path) => std::fs::write(path, json + "\n")
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?,
        None => println!("{json}"),
    }
    Ok(())
}

/// `mask_01.png`, ... (binary), `overlay.png` and `legend.json` in `dir`.
fn write_pngs(dir: &Path, image: &RgbImage, masks: &[MaskResult]) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    for (i, m) in masks.iter().enumerate() {
        render::save_mask(dir.join(format!("mask_{:02}.png", i + 1)), &m.mask)?;
    }
    let (ov, legend) = render::overlay(image, masks);
    render::save_rgb(dir.join("overlay.png"), &ov)?;
    write_legend(&dir.join("legend.json"), &legend)
}

fn write_legend(path: &Path, legend: &[(String, [u8; 3])]) -> Result<()> {
    let v: Vec<serde_json::Value> = legend
        .iter()
        .enumerate()
        .map(|(i, (l, c))| {
            serde_json::json!({"mask": format!("mask_{:02}.png", i + 1), "label": l, "color": c})
        })
        .collect();
    let s = serde_json::to_string_pretty(&v).unwrap_or_default();
    std::fs::write(path, s + "\n").map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Model directory to tour (default: a tiny random model, created once under --out).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Output directory for the images, overlays and JSON.
    #[arg(long, default_value = "xsam-demo")]
    out: PathBuf,
    /// Score threshold (default: 0.5 with --model, 0 for the random model so masks show up).
    #[arg(long)]
    threshold: Option<f64>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// Only the table.
    #[arg(long)]
    quiet: bool,
}

const DEMO_W: usize = 320;
const DEMO_H: usize = 240;

pub fn run_demo(a: &DemoArgs) -> Result<()> {
    let p = Progress { quiet: a.quiet };
    let out = &a.out;
    std::fs::create_dir_all(out)
        .map_err(|e| Error::io(format!("creating {}", out.display()), e))?;
    let random = a.model.is_none();
    let model_dir = match &a.model {
        Some(d) => d.clone(),
        None => {
            let d = out.join("model-tiny");
            if !d.join("config.json").is_file() || !d.join("tokenizer.json").is_file() {
                p.step(
                    &format!("creating a tiny random model in {}", d.display()),
                    || {
                        let opts = xsam::init::InitOptions {
                            seed: 0,
                            progress: false,
                            force: true,
                            ..Default::default()
                        };
                        xsam::init::write_random_preset("tiny", &d, &opts).map(|_| ())
                    },
                )?;
            }
            d
        }
    };
    let threshold = a.threshold.unwrap_or(if random { 0.0 } else { 0.5 });
    let dev = device(&a.device)?;

    let image = render::demo_image(DEMO_W, DEMO_H, 0);
    let reference = render::demo_image(DEMO_W, DEMO_H, 1);
    let circle = render::ellipse_prompt(DEMO_W, DEMO_H, 0.28, 0.55, 0.08, 0.1);
    let bx = render::ellipse_prompt(DEMO_W, DEMO_H, 0.67, 0.45, 0.06, 0.12);
    let ref_circle = render::ellipse_prompt(DEMO_W, DEMO_H, 0.7, 0.45, 0.07, 0.1);
    render::save_rgb(out.join("image.png"), &image)?;
    render::save_rgb(out.join("reference.png"), &reference)?;
    render::save_grey(out.join("vprompt-circle.png"), &circle)?;
    render::save_grey(out.join("vprompt-box.png"), &bx)?;
    render::save_grey(out.join("vprompt-reference-circle.png"), &ref_circle)?;

    let model = p.step(&format!("loading {}", model_dir.display()), || {
        Model::load(&model_dir, dev)
    })?;
    let mut session = p.step("encoding the demo image (image side, once)", || {
        model.session(&image)
    })?;

    let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    let base = |task| Request {
        task,
        threshold,
        forced: true,
        ..Request::new(task)
    };
    let tour: Vec<(&str, Request)> = vec![
        (
            "conversation",
            Request {
                text: Some("What shapes are in this picture?".into()),
                forced: false,
                max_new_tokens: 24,
                ..base(Task::Conversation)
            },
        ),
        (
            "semantic",
            Request {
                classes: list(&["red circle", "blue box", "yellow triangle", "sky", "ground"]),
                ..base(Task::Semantic)
            },
        ),
        (
            "instance",
            Request {
                classes: list(&["circle", "box", "triangle"]),
                ..base(Task::Instance)
            },
        ),
        (
            "panoptic",
            Request {
                classes: list(&["circle", "box", "triangle"]),
                stuff: list(&["sky", "ground"]),
                ..base(Task::Panoptic)
            },
        ),
        (
            "referring",
            Request {
                text: Some("the red circle".into()),
                ..base(Task::Referring)
            },
        ),
        (
            "reasoning",
            Request {
                text: Some("Which shape has no corners?".into()),
                ..base(Task::Reasoning)
            },
        ),
        (
            "gcg",
            Request {
                forced: false,
                max_new_tokens: 32,
                ..base(Task::Gcg)
            },
        ),
        (
            "interactive",
            Request {
                vprompts: vec![circle.clone()],
                ..base(Task::Interactive)
            },
        ),
        (
            "vgd",
            Request {
                vprompts: vec![circle.clone(), bx.clone()],
                ..base(Task::Vgd)
            },
        ),
        (
            "vgd-cross-image",
            Request {
                vprompts: vec![ref_circle.clone()],
                vprompt_image: Some(reference.clone()),
                ..base(Task::Vgd)
            },
        ),
    ];

    let mut rows = vec![];
    for (name, req) in &tour {
        let o = run_request(&mut session, req, a.quiet, name)?;
        std::fs::write(
            out.join(format!("{name}.json")),
            o.result.to_json_pretty()? + "\n",
        )
        .map_err(|e| Error::io(format!("writing {name}.json"), e))?;
        let (ov, legend) = render::overlay(&image, &o.masks);
        render::save_rgb(out.join(format!("{name}.png")), &ov)?;
        let t = |k: &str| {
            o.result
                .timings_ms
                .0
                .iter()
                .filter(|(n, _)| n.starts_with(k))
                .map(|(_, v)| v)
                .fold(0.0, |a, b| a + b)
        };
        let labels: Vec<String> = legend.iter().map(|(l, _)| l.clone()).collect();
        rows.push((
            name.to_string(),
            if req.forced { "forced" } else { "generate" },
            o.masks.len(),
            labels.join(", "),
            o.result.text.clone(),
            t("llm_prefill") + t("llm_generate"),
            t("mask_decoder") + t("llm_projector"),
            t("postprocess"),
            t("total_request"),
        ));
    }

    println!();
    println!("image side (once per image), ms:");
    let img_t: Vec<String> = session
        .timings()
        .0
        .iter()
        .map(|(k, v)| format!("{k} {v:.1}"))
        .collect();
    println!("  {}", img_t.join(" | "));
    println!();
    println!(
        "{:<16} {:<8} {:>5}  {:<34} {:<28} {:>8} {:>8} {:>8} {:>8}",
        "task", "mode", "masks", "labels", "text", "llm ms", "dec ms", "post ms", "total"
    );
    for r in &rows {
        println!(
            "{:<16} {:<8} {:>5}  {:<34} {:<28} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
            r.0,
            r.1,
            r.2,
            clip(&r.3, 34),
            clip(&r.4, 28),
            r.5,
            r.6,
            r.7,
            r.8
        );
    }
    println!();
    println!(
        "wrote image.png, reference.png, the visual prompts and <task>.json / <task>.png overlays to {}",
        out.display()
    );
    if random {
        println!(
            "NOTE: this model has RANDOM weights: the pipeline runs end to end, but its masks and text \
             are meaningless.\nFor real results convert the released checkpoint (hao9610/X-SAM on \
             Hugging Face) with `xsam convert --checkpoint pytorch_model.bin --tokenizer \
             tokenizer.json --out model` and run `xsam demo --model model`."
        );
    }
    Ok(())
}

/// One line, at most `n` characters.
fn clip(s: &str, n: usize) -> String {
    let s: String = s.replace('\n', " ");
    if s.chars().count() <= n {
        s
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}
