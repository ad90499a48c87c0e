//! End-to-end requests on the CPU through the public API (`Model` → `Session` → `run`), with the
//! tiny preset's random weights written by the crate's init code into a temporary directory:
//! session creation (the image side: both encoders, projectors, connector, pixel decoder and the
//! LLM prefix), one request per task on a ready session, the first request including its
//! session, and a second prompt on the same image (session reuse).
//!
//! Run: `cargo bench --bench end_to_end`. `XSAM_BENCH_MODEL=<model dir>` runs the same benches
//! on another model directory (e.g. one from `xsam init --preset full`; expect minutes per
//! iteration there).

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;
use xsam::image::GreyImage;
use xsam::task::templates::Task;
use xsam::{render, Device, Model, Request};

/// A rectangle `[x0, x1) × [y0, y1)` as a visual prompt.
fn rect(w: usize, h: usize, x0: usize, y0: usize, x1: usize, y1: usize) -> GreyImage {
    let mut d = vec![0u8; w * h];
    for y in y0..y1 {
        d[y * w + x0..y * w + x1].fill(255);
    }
    GreyImage::new(w, h, d).expect("prompt")
}

/// One request per task; segmentation tasks in forced mode (the answer is fixed, so the time
/// does not depend on what random weights would generate).
fn requests(w: usize, h: usize) -> Vec<(&'static str, Request)> {
    let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let forced = |task| Request {
        forced: true,
        threshold: 0.0,
        ..Request::new(task)
    };
    vec![
        (
            "referring",
            Request {
                text: Some("the red circle".into()),
                ..forced(Task::Referring)
            },
        ),
        (
            "reasoning",
            Request {
                text: Some("What is round?".into()),
                ..forced(Task::Reasoning)
            },
        ),
        (
            "semantic",
            Request {
                classes: list(&["circle", "box", "sky"]),
                ..forced(Task::Semantic)
            },
        ),
        (
            "panoptic",
            Request {
                classes: list(&["circle", "box"]),
                stuff: list(&["sky", "ground"]),
                ..forced(Task::Panoptic)
            },
        ),
        (
            "gcg",
            Request {
                answer: Some("<p>A red circle</p> next to <p>a blue box</p>. <SEG>.".into()),
                ..Request::new(Task::Gcg)
            },
        ),
        (
            "interactive",
            Request {
                vprompts: vec![rect(w, h, w / 5, h / 3, w / 2, h * 2 / 3)],
                ..forced(Task::Interactive)
            },
        ),
        (
            "vgd",
            Request {
                vprompts: vec![
                    rect(w, h, w / 5, h / 3, w / 2, h * 2 / 3),
                    rect(w, h, w * 2 / 3, h / 4, w * 4 / 5, h / 2),
                ],
                ..forced(Task::Vgd)
            },
        ),
        (
            "conversation_8_tokens",
            Request {
                text: Some("What shapes are in this picture?".into()),
                max_new_tokens: 8,
                ..Request::new(Task::Conversation)
            },
        ),
    ]
}

fn bench(c: &mut Criterion) {
    // The temporary directory lives until the end of the bench.
    let (_tmp, dir): (Option<tempfile::TempDir>, PathBuf) =
        match std::env::var_os("XSAM_BENCH_MODEL") {
            Some(d) => (None, PathBuf::from(d)),
            None => {
                let t = tempfile::tempdir().expect("tempdir");
                let d = t.path().join("model-tiny");
                xsam::init::write_random_preset("tiny", &d, &Default::default())
                    .expect("tiny model");
                (Some(t), d)
            }
        };
    let model = Model::load(&dir, Device::Cpu).expect("model");
    let (w, h) = (640, 480);
    let image = render::demo_image(w, h, 0);

    let mut g = c.benchmark_group("end_to_end_cpu");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));

    g.bench_function("session_create_640x480", |b| {
        b.iter(|| black_box(model.session(&image).expect("session")))
    });

    let mut session = model.session(&image).expect("session");
    for (name, req) in requests(w, h) {
        g.bench_function(format!("request/{name}"), |b| {
            b.iter(|| black_box(session.run(&req).expect("request")))
        });
    }

    // Image to masks for one referring prompt, then a second prompt on the same image.
    let first = Request {
        text: Some("the red circle".into()),
        forced: true,
        ..Request::new(Task::Referring)
    };
    let second = Request {
        text: Some("the blue box".into()),
        ..first.clone()
    };
    g.bench_function("referring/first_prompt (session + request)", |b| {
        b.iter(|| {
            let mut s = model.session(&image).expect("session");
            black_box(s.run(&first).expect("request"))
        })
    });
    g.bench_function("referring/second_prompt_same_image", |b| {
        b.iter(|| black_box(session.run(&second).expect("request")))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
