//! The whole pipeline with `Device::Cuda(0)` against `Device::Cpu` on the tiny random model:
//! every task gives the same token ids, masks with IoU >= 0.98 and close scores, also for a
//! second request on the same session. Skips without a GPU (tests/gpu/mod.rs).
//!
//! The tiny preset has head dim 16 everywhere, so its attention nodes run through the CUDA
//! executor's CPU fallback; every other op runs on its kernel (bf16 GEMM operands), which is why
//! masks are compared by IoU and scores with a tolerance rather than bit for bit.

mod gpu;

use std::path::PathBuf;
use xsam::image::{GreyImage, RgbImage};
use xsam::task::result::ResultJson;
use xsam::task::rle;
use xsam::task::templates::Task;
use xsam::{Config, Device, Model, Request};

fn model_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda-e2e-model");
    let opts = xsam::init::InitOptions {
        seed: 11,
        force: true,
        ..Default::default()
    };
    xsam::init::write_random_model_with(&Config::preset("tiny").unwrap(), &dir, &opts).unwrap();
    dir
}

fn image(w: usize, h: usize) -> RgbImage {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let inside = (x as i64 - w as i64 / 3).pow(2) + (y as i64 - h as i64 / 2).pow(2)
                < (h as i64 / 4).pow(2);
            let p = if inside {
                [220, 40, 40]
            } else {
                [(x * 255 / w) as u8, (y * 255 / h) as u8, 90]
            };
            data.extend_from_slice(&p);
        }
    }
    RgbImage::new(w, h, data).unwrap()
}

fn rect(w: usize, h: usize, x0: usize, y0: usize, x1: usize, y1: usize) -> GreyImage {
    let mut d = vec![0u8; w * h];
    for y in y0..y1 {
        for x in x0..x1 {
            d[y * w + x] = 255;
        }
    }
    GreyImage::new(w, h, d).unwrap()
}

fn requests(w: usize, h: usize) -> Vec<Request> {
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut out = vec![];
    let mut r = Request::new(Task::Conversation);
    r.text = Some("What is in the image?".into());
    r.max_new_tokens = 8;
    out.push(r);
    for t in [Task::Semantic, Task::Instance] {
        let mut r = Request::new(t);
        r.classes = names(&["red circle", "background"]);
        r.forced = true;
        r.threshold = 0.0;
        out.push(r);
    }
    let mut r = Request::new(Task::Panoptic);
    r.classes = names(&["circle"]);
    r.stuff = names(&["background-other-merged"]);
    r.forced = true;
    r.threshold = 0.0;
    out.push(r);
    for t in [Task::Referring, Task::Reasoning] {
        let mut r = Request::new(t);
        r.text = Some("the red circle".into());
        r.forced = true;
        out.push(r);
    }
    let mut r = Request::new(Task::Gcg);
    r.answer = Some("<p>A red circle</p> on <p>a gradient</p>. <SEG>.".into());
    out.push(r);
    let mut r = Request::new(Task::Interactive);
    r.vprompts = vec![rect(w, h, w / 5, h / 3, w / 2, h * 2 / 3)];
    r.forced = true;
    out.push(r);
    let mut r = Request::new(Task::Vgd);
    r.vprompts = vec![
        rect(w, h, w / 5, h / 3, w / 2, h * 2 / 3),
        rect(w, h, w * 2 / 3, h / 4, w * 4 / 5, h / 2),
    ];
    r.forced = true;
    r.threshold = 0.0;
    out.push(r);
    // Greedy generation on a segmentation task.
    let mut r = Request::new(Task::Referring);
    r.text = Some("the red circle".into());
    r.max_new_tokens = 8;
    out.push(r);
    out
}

fn iou(a: &rle::Rle, b: &rle::Rle) -> f64 {
    let (a, b) = (rle::decode(a).unwrap(), rle::decode(b).unwrap());
    assert_eq!((a.height(), a.width()), (b.height(), b.width()));
    let n = a.height() * a.width();
    let (mut inter, mut union) = (0usize, 0usize);
    for i in 0..n {
        let (x, y) = (a.get_index(i), b.get_index(i));
        inter += usize::from(x && y);
        union += usize::from(x || y);
    }
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// Same ids; every CPU mask has its own GPU mask with the same label, IoU >= 0.98 and a close
/// score (matched rather than zipped: masks are ordered by score, and two near-equal scores may
/// swap places under bf16 rounding).
fn compare(what: &str, cpu: &ResultJson, gpu: &ResultJson) {
    assert_eq!(cpu.token_ids, gpu.token_ids, "{what}: token ids");
    assert_eq!(cpu.masks.len(), gpu.masks.len(), "{what}: mask count");
    let mut used = vec![false; gpu.masks.len()];
    for (i, c) in cpu.masks.iter().enumerate() {
        let best = gpu
            .masks
            .iter()
            .enumerate()
            .filter(|(j, g)| !used[*j] && g.label == c.label)
            .map(|(j, g)| (j, iou(&c.rle, &g.rle), g.score))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let Some((j, v, score)) = best else {
            panic!("{what}: no GPU mask labelled `{}`", c.label);
        };
        assert!(
            v >= 0.98,
            "{what}: mask {i} (`{}`) best IoU {v:.4} < 0.98",
            c.label
        );
        // Scores are sigmoid / softmax probabilities: bf16 GEMM operands move them by ~1e-2.
        assert!(
            score.is_finite() && (c.score - score).abs() <= 2e-2,
            "{what}: mask {i} score {} vs {score}",
            c.score
        );
        used[j] = true;
    }
}

#[test]
fn every_task_on_cuda_matches_the_cpu() {
    let Some(b) = gpu::backend("cuda_e2e", "every_task_on_cuda_matches_the_cpu") else {
        return;
    };
    drop(b);
    let dir = model_dir();
    let cpu = Model::load(&dir, Device::Cpu).unwrap();
    let gpu = Model::load(&dir, Device::Cuda(0)).unwrap();
    assert_eq!(gpu.device(), Device::Cuda(0));
    let (w, h) = (160, 120);
    let img = image(w, h);
    let mut cs = cpu.session(&img).unwrap();
    let mut gs = gpu.session(&img).unwrap();
    for (k, req) in requests(w, h).iter().enumerate() {
        let what = format!("request {k} ({})", req.task.name());
        let c = cs.run(req).unwrap();
        let g = gs.run(req).unwrap();
        compare(&what, &c.result, &g.result);
    }
    // A second request on the same sessions (forked prefix, device KV copy on write).
    let req = &requests(w, h)[4];
    let c = cs.run(req).unwrap();
    let g = gs.run(req).unwrap();
    compare("second referring request", &c.result, &g.result);
    let usage = gs
        .device_usage()
        .expect("a CUDA session reports device usage");
    assert!(usage.weights_bytes > 0 && usage.kv_bytes > 0);
    println!("device usage: {usage:?}");
}

/// On the GPU the image side runs on the model's executor (its captured graphs are replayed for
/// every session): sessions opened one after another on different images, and reopened on the
/// first image, must each match the CPU.
#[test]
fn later_sessions_on_the_shared_image_executor_match_the_cpu() {
    let Some(b) = gpu::backend(
        "cuda_e2e",
        "later_sessions_on_the_shared_image_executor_match_the_cpu",
    ) else {
        return;
    };
    drop(b);
    let dir = model_dir();
    let cpu = Model::load(&dir, Device::Cpu).unwrap();
    let gpu = Model::load(&dir, Device::Cuda(0)).unwrap();
    let (w, h) = (160, 120);
    let req = &requests(w, h)[4];
    let flipped = {
        let im = image(w, h);
        let mut d = im.data.clone();
        d.reverse();
        RgbImage::new(w, h, d).unwrap()
    };
    for (k, img) in [image(w, h), flipped, image(w, h)].iter().enumerate() {
        let c = cpu.session(img).unwrap().run(req).unwrap();
        let g = gpu.session(img).unwrap().run(req).unwrap();
        compare(&format!("session {k}"), &c.result, &g.result);
    }
}

#[test]
fn cpu_sessions_report_no_device_usage() {
    // Pure host: runs everywhere.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda-e2e-cpu-model");
    let opts = xsam::init::InitOptions {
        seed: 3,
        force: true,
        ..Default::default()
    };
    xsam::init::write_random_model_with(&Config::preset("tiny").unwrap(), &dir, &opts).unwrap();
    let m = Model::load(&dir, Device::Cpu).unwrap();
    assert_eq!(m.device(), Device::Cpu);
    assert!(m.device_weights().is_none());
    let s = m.session(&image(64, 48)).unwrap();
    assert!(s.device_usage().is_none());
}
