//! `xsam run` and `xsam demo` through the built binary: a successful run with every output,
//! exit code 2 with a one-line message for each kind of bad input, and a fuzz-style sweep of
//! random arguments and random file bytes that must never end in a panic (exit 101).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use xsam::image::{GreyImage, RgbImage};
use xsam::render;

const BIN: &str = env!("CARGO_BIN_EXE_xsam");

/// One tiny random model and a few input files, written once per test binary.
struct Env {
    dir: PathBuf,
    model: PathBuf,
    image: PathBuf,
    prompt: PathBuf,
    prompt_small: PathBuf,
    prompt_empty: PathBuf,
    not_image: PathBuf,
}

fn env() -> &'static Env {
    static E: OnceLock<Env> = OnceLock::new();
    E.get_or_init(|| {
        // a fixed place under the target dir (rewritten each run, so nothing accumulates)
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-test");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("model");
        let cfg = xsam::Config::preset("tiny").unwrap();
        xsam::init::write_random_model(&cfg, &model, 3, false).unwrap();
        let (w, h) = (64, 48);
        let image = dir.join("image.png");
        render::save_rgb(&image, &render::demo_image(w, h, 0)).unwrap();
        let prompt = dir.join("prompt.png");
        render::save_grey(&prompt, &render::ellipse_prompt(w, h, 0.3, 0.5, 0.1, 0.1)).unwrap();
        let prompt_small = dir.join("prompt_small.png");
        render::save_grey(
            &prompt_small,
            &render::ellipse_prompt(w - 1, h, 0.3, 0.5, 0.1, 0.1),
        )
        .unwrap();
        let prompt_empty = dir.join("prompt_empty.png");
        render::save_grey(
            &prompt_empty,
            &GreyImage::new(w, h, vec![0; w * h]).unwrap(),
        )
        .unwrap();
        let not_image = dir.join("notes.png");
        std::fs::write(&not_image, b"this is not an image\n").unwrap();
        Env {
            dir,
            model,
            image,
            prompt,
            prompt_small,
            prompt_empty,
            not_image,
        }
    })
}

fn xsam(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Exit 2, one line on stderr containing `needle`.
fn assert_bad(args: &[&str], needle: &str) {
    let o = xsam(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?}: stderr {err}");
    // progress lines may come first; the error is one line, the last one
    let lines: Vec<&str> = err.trim_end().lines().collect();
    let errors = lines.iter().filter(|l| l.contains("error")).count();
    assert_eq!(errors, 1, "{args:?}: {err}");
    let last = lines.last().copied().unwrap_or("");
    assert!(last.starts_with("xsam: error: "), "{args:?}: {err}");
    assert!(
        last.to_lowercase().contains(&needle.to_lowercase()),
        "{args:?}: `{needle}` not in {err}"
    );
}

#[test]
fn run_writes_json_pngs_and_dump() {
    let e = env();
    let out = e.dir.join("out-run");
    let json = out.join("r.json");
    let dump = out.join("d.safetensors");
    std::fs::create_dir_all(&out).unwrap();
    let o = xsam(&[
        "run",
        "--model",
        s(&e.model),
        "--image",
        s(&e.image),
        "--task",
        "vgd",
        "--vprompt",
        s(&e.prompt),
        "--vprompt",
        s(&e.prompt),
        "--forced",
        "--threshold",
        "0",
        "--json",
        s(&json),
        "--png",
        s(&out.join("png")),
        "--dump",
        s(&dump),
        "--quiet",
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.stderr.is_empty(),
        "--quiet: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["task"], "vgd");
    assert_eq!(r["image"]["width"], 64);
    let n = r["masks"].as_array().unwrap().len();
    assert!(n > 0);
    assert!(out.join("png/overlay.png").is_file());
    assert!(out.join("png/legend.json").is_file());
    assert!(out.join(format!("png/mask_{n:02}.png")).is_file());
    let w = xsam::Weights::load(&dump).unwrap();
    for name in [
        "region.vectors",
        "llm.final_hidden",
        "final.mask_logits",
        "proj.seg",
    ] {
        assert!(w.contains(name), "{name}");
    }

    // JSON on stdout without --json
    let o = xsam(&[
        "run",
        "--model",
        s(&e.model),
        "--image",
        s(&e.image),
        "--task",
        "conversation",
        "--prompt",
        "hello?",
        "--max-new-tokens",
        "3",
        "--quiet",
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["masks"].as_array().unwrap().len(), 0);
    assert!(r["token_ids"].as_array().unwrap().len() <= 3);
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let e = env();
    let (m, img) = (s(&e.model), s(&e.image));
    let missing = e.dir.join("no-such-model");
    assert_bad(
        &[
            "run",
            "--model",
            s(&missing),
            "--image",
            img,
            "--task",
            "semantic",
            "--classes",
            "a",
        ],
        "does not exist",
    );
    // a model directory without its tokenizer / weights / config
    for f in ["tokenizer.json", "model.safetensors", "config.json"] {
        let broken = e.dir.join(format!("broken-{f}"));
        std::fs::create_dir_all(&broken).unwrap();
        for g in ["tokenizer.json", "model.safetensors", "config.json"] {
            if g != f {
                std::fs::copy(e.model.join(g), broken.join(g)).unwrap();
            }
        }
        assert_bad(
            &[
                "run",
                "--model",
                s(&broken),
                "--image",
                img,
                "--task",
                "referring",
                "--prompt",
                "x",
            ],
            f.split('.').next().unwrap(),
        );
    }
    assert_bad(
        &["run", "--model", m, "--image", img, "--task", "segment"],
        "unknown task",
    );
    for t in ["semantic", "instance", "panoptic"] {
        assert_bad(
            &["run", "--model", m, "--image", img, "--task", t],
            "--classes",
        );
    }
    assert_bad(
        &[
            "run",
            "--model",
            m,
            "--image",
            img,
            "--task",
            "panoptic",
            "--classes",
            "a",
        ],
        "--stuff",
    );
    assert_bad(
        &[
            "run",
            "--model",
            m,
            "--image",
            img,
            "--task",
            "semantic",
            "--classes",
            "a, , b",
        ],
        "empty",
    );
    assert_bad(
        &[
            "run",
            "--model",
            m,
            "--image",
            img,
            "--task",
            "interactive",
            "--vprompt",
            s(&e.prompt_small),
        ],
        "63x48",
    );
    assert_bad(
        &[
            "run",
            "--model",
            m,
            "--image",
            img,
            "--task",
            "vgd",
            "--vprompt",
            s(&e.prompt_empty),
        ],
        "empty",
    );
    assert_bad(
        &["run", "--model", m, "--image", img, "--task", "vgd"],
        "--vprompt",
    );
    let huge = "tell me more ".repeat(2000);
    assert_bad(
        &[
            "run",
            "--model",
            m,
            "--image",
            img,
            "--task",
            "conversation",
            "--prompt",
            &huge,
        ],
        "too long",
    );
    assert_bad(
        &[
            "run",
            "--model",
            m,
            "--image",
            s(&e.not_image),
            "--task",
            "referring",
            "--prompt",
            "x",
        ],
        "image",
    );
    assert_bad(
        &[
            "run",
            "--model",
            m,
            "--image",
            s(&e.dir.join("nope.png")),
            "--task",
            "gcg",
        ],
        "nope.png",
    );
    assert_bad(
        &[
            "run",
            "--model",
            m,
            "--image",
            img,
            "--task",
            "referring",
            "--prompt",
            "x",
            "--device",
            "tpu",
        ],
        "device",
    );
}

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[self.below(v.len())]
    }
}

#[test]
fn random_arguments_and_bytes_never_panic() {
    let e = env();
    let fuzz = e.dir.join("fuzz");
    std::fs::create_dir_all(&fuzz).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // random byte files, some starting with a PNG signature
    let mut files: Vec<String> = vec![];
    for i in 0..12 {
        let n = rng.below(300);
        let mut b: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        if i % 3 == 0 {
            let mut sig = b"\x89PNG\r\n\x1a\n".to_vec();
            sig.extend(b);
            b = sig;
        }
        let p = fuzz.join(format!("f{i}.png"));
        std::fs::write(&p, b).unwrap();
        files.push(p.to_str().unwrap().to_string());
    }
    // a valid 1x1 image and a mask of the wrong size, for combinations that get further
    let tiny = fuzz.join("tiny.png");
    render::save_rgb(&tiny, &RgbImage::filled(1, 1, [9, 9, 9])).unwrap();
    files.push(s(&tiny).to_string());
    files.push(s(&e.image).to_string());
    files.push(s(&e.prompt).to_string());
    files.push(s(&e.prompt_empty).to_string());
    let file_refs: Vec<&str> = files.iter().map(String::as_str).collect();
    let tasks = [
        "conversation",
        "semantic",
        "instance",
        "panoptic",
        "referring",
        "reasoning",
        "gcg",
        "interactive",
        "vgd",
        "",
        "SEMANTIC",
        "vgd ",
        "💥",
    ];
    let texts = [
        "", " ", "a", "a, b", ",,,", "<p>x</p>", "<image>", "<SEG>", "<region>", "-", "é",
    ];
    let nums = [
        "0",
        "1",
        "-1",
        "3",
        "nan",
        "1e309",
        "0.5",
        "18446744073709551616",
        "x",
    ];
    let opts = [
        "--classes",
        "--stuff",
        "--prompt",
        "--vprompt",
        "--vprompt-image",
        "--answer",
        "--max-new-tokens",
        "--threshold",
        "--device",
        "--forced",
        "--quiet",
        "--bogus",
    ];
    let mut cases: Vec<Vec<String>> = vec![];
    for _ in 0..260 {
        let mut a: Vec<String> = vec!["run".into()];
        if rng.below(8) != 0 {
            a.push("--model".into());
            a.push(if rng.below(6) == 0 {
                s(&fuzz).into()
            } else {
                s(&e.model).into()
            });
        }
        if rng.below(8) != 0 {
            a.push("--image".into());
            // half the time the real image, so runs get past decoding
            if rng.below(2) == 0 {
                a.push(s(&e.image).into());
            } else {
                a.push(rng.pick(&file_refs).into());
            }
        }
        // plausible task inputs, so many runs reach the model
        if rng.below(2) == 0 {
            let pick = rng.below(4);
            let mut push = |k: &str, v: String| {
                a.push(k.into());
                a.push(v);
            };
            match pick {
                0 => push("--classes", rng.pick(&texts).to_string() + ", cat"),
                1 => push("--prompt", rng.pick(&texts).to_string() + " dog"),
                2 => push("--vprompt", s(&e.prompt).into()),
                _ => {
                    push("--classes", "cat, dog".into());
                    push("--stuff", rng.pick(&texts).to_string() + "sky");
                }
            }
        }
        if rng.below(10) != 0 {
            a.push("--task".into());
            a.push(rng.pick(&tasks).into());
        }
        for _ in 0..rng.below(5) {
            let o = rng.pick(&opts);
            a.push(o.into());
            match o {
                "--forced" | "--quiet" => {}
                "--vprompt" | "--vprompt-image" => a.push(rng.pick(&file_refs).into()),
                "--max-new-tokens" | "--threshold" => a.push(rng.pick(&nums).into()),
                "--device" => a.push(rng.pick(&["cpu", "cuda", "cuda:7", "gpu"]).into()),
                _ => a.push(rng.pick(&texts).into()),
            }
        }
        // keep generation short so the sweep stays fast
        a.push("--max-new-tokens".into());
        a.push("2".into());
        a.push("--json".into());
        a.push(s(&fuzz.join("out.json")).into());
        cases.push(a);
    }
    // other subcommands with junk
    for _ in 0..40 {
        let sub = rng.pick(&["init", "convert", "demo", "nope", "--help"]);
        let mut a = vec![sub.to_string()];
        for _ in 0..rng.below(4) {
            a.push(
                rng.pick(&["--out", "--preset", "tiny", "--checkpoint", "--model"])
                    .into(),
            );
            a.push(rng.pick(&file_refs).into());
        }
        if sub == "demo" {
            a.push("--out".into());
            a.push(s(&fuzz.join("demo")).into());
            a.push("--quiet".into());
        }
        cases.push(a);
    }
    let start = std::time::Instant::now();
    let chunks: Vec<Vec<Vec<String>>> = cases
        .chunks(cases.len().div_ceil(4))
        .map(<[_]>::to_vec)
        .collect();
    let ok = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for chunk in &chunks {
            let ok = &ok;
            sc.spawn(move || {
                for a in chunk {
                    let o = Command::new(BIN).args(a).output().unwrap();
                    let code = o.status.code();
                    assert!(
                        code == Some(0) || code == Some(2) || code == Some(1),
                        "{a:?}: exit {code:?}\n{}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                    assert_ne!(
                        code,
                        Some(1),
                        "{a:?}: internal error\n{}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                    if code == Some(0) {
                        ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    println!(
        "{} cases ({} succeeded) in {:.1} s",
        cases.len(),
        ok.into_inner(),
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn demo_runs_every_task() {
    let e = env();
    let out = e.dir.join("demo");
    let o = xsam(&["demo", "--out", s(&out), "--quiet"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for t in [
        "conversation",
        "semantic",
        "instance",
        "panoptic",
        "referring",
        "reasoning",
        "gcg",
        "interactive",
        "vgd",
    ] {
        assert!(stdout.contains(t), "{t} missing from the table:\n{stdout}");
        assert!(out.join(format!("{t}.json")).is_file());
        assert!(out.join(format!("{t}.png")).is_file());
    }
    assert!(stdout.contains("RANDOM weights"));
    // cached: the second run does not recreate the model
    let o = xsam(&["demo", "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("creating a tiny random model"));
}
