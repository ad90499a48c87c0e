//! The whole pipeline on the tiny random model: every task end to end with well-formed results,
//! session reuse (image side once, same results as a fresh session), and the forked-prefix
//! suffix prefill against a full prefill.

use std::path::PathBuf;
use std::sync::OnceLock;
use xsam::image::{GreyImage, RgbImage};
use xsam::task::result::ResultJson;
use xsam::task::rle;
use xsam::task::templates::Task;
use xsam::{Config, Device, Model, Request};

fn model_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // a fixed place under the target dir (rewritten each run, so nothing accumulates)
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pipeline-test");
        let cfg = Config::preset("tiny").unwrap();
        let opts = xsam::init::InitOptions {
            seed: 7,
            force: true,
            ..Default::default()
        };
        xsam::init::write_random_model_with(&cfg, dir.join("model"), &opts).unwrap();
        dir
    })
}

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load(model_dir().join("model"), Device::Cpu).unwrap())
}

/// Shapes on a gradient, `w x h`.
fn image(w: usize, h: usize, seed: u8) -> RgbImage {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let mut p = [
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                seed.wrapping_mul(37),
            ];
            if (x as i64 - w as i64 / 3).pow(2) + (y as i64 - h as i64 / 2).pow(2)
                < (h as i64 / 4).pow(2)
            {
                p = [220, 40, 40];
            }
            if x > w * 3 / 5 && x < w * 9 / 10 && y > h / 5 && y < h * 3 / 5 {
                p = [40, 200, 60];
            }
            data.extend_from_slice(&p);
        }
    }
    RgbImage::new(w, h, data).unwrap()
}

/// A rectangle `[x0, x1) x [y0, y1)` as a visual prompt.
fn rect(w: usize, h: usize, x0: usize, y0: usize, x1: usize, y1: usize) -> GreyImage {
    let mut d = vec![0u8; w * h];
    for y in y0..y1 {
        for x in x0..x1 {
            d[y * w + x] = 255;
        }
    }
    GreyImage::new(w, h, d).unwrap()
}

fn check_well_formed(r: &ResultJson, w: usize, h: usize) {
    assert_eq!((r.image.width, r.image.height), (w, h));
    let json = r.to_json_string().unwrap();
    let back: ResultJson = serde_json::from_str(&json).unwrap();
    assert_eq!(&back.masks, &r.masks);
    for m in &r.masks {
        assert_eq!(m.rle.size, [h, w]);
        assert_eq!(m.rle.counts.iter().sum::<u64>(), (w * h) as u64);
        assert!(rle::decode(&m.rle).is_ok());
        assert!(m.score.is_finite());
    }
    assert!(r.timings_ms.0.iter().any(|(k, _)| k == "sam_encoder"));
}

fn requests(w: usize, h: usize) -> Vec<Request> {
    let classes = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut out = vec![];
    let mut r = Request::new(Task::Conversation);
    r.text = Some("What is in the image?".into());
    r.max_new_tokens = 6;
    out.push(r);
    for t in [Task::Semantic, Task::Instance] {
        let mut r = Request::new(t);
        r.classes = classes(&["Red circle", "green-box"]);
        r.forced = true;
        r.threshold = 0.0;
        out.push(r);
    }
    let mut r = Request::new(Task::Panoptic);
    r.classes = classes(&["circle"]);
    r.stuff = classes(&["background-other-merged"]);
    r.forced = true;
    r.threshold = 0.0;
    out.push(r);
    let mut r = Request::new(Task::Referring);
    r.text = Some("  The Red Circle ".into());
    r.forced = true;
    out.push(r);
    let mut r = Request::new(Task::Reasoning);
    r.text = Some("What is round?".into());
    r.forced = true;
    out.push(r);
    let mut r = Request::new(Task::Gcg);
    r.answer = Some("<p>A red circle</p> next to <p>a green box</p>. <SEG>.".into());
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
    out
}

#[test]
fn every_task_runs_end_to_end() {
    let (w, h) = (48, 36);
    let img = image(w, h, 1);
    let mut s = model().session(&img).unwrap();
    let end = model().config().tokens.end;
    for req in requests(w, h) {
        let out = s.run(&req).unwrap();
        let r = &out.result;
        check_well_formed(r, w, h);
        assert_eq!(r.task, req.task.name());
        match req.task {
            Task::Conversation => {
                assert!(r.masks.is_empty());
                assert!(!r.token_ids.is_empty() && r.token_ids.len() <= 6);
            }
            Task::Semantic => {
                assert!(!r.masks.is_empty());
                assert!(r
                    .masks
                    .iter()
                    .all(|m| m.label == "Red circle" || m.label == "green-box"));
                // every pixel belongs to exactly one class
                let total: usize = out.masks.iter().map(|m| m.mask.count_ones()).sum();
                assert_eq!(total, w * h);
            }
            Task::Instance | Task::Vgd => {
                assert!(r.masks.windows(2).all(|p| p[0].score >= p[1].score));
                if req.task == Task::Vgd {
                    assert!(r
                        .masks
                        .iter()
                        .all(|m| m.label == format!("region {}", m.class_index + 1)));
                }
            }
            Task::Panoptic => {
                for m in &r.masks {
                    let want = if m.class_index == 0 { "thing" } else { "stuff" };
                    assert_eq!(serde_json::to_value(m.kind).unwrap(), want);
                }
            }
            Task::Referring => {
                assert_eq!(r.masks.len(), 1);
                assert_eq!(r.masks[0].label, "The Red Circle");
            }
            Task::Reasoning | Task::Interactive => assert_eq!(r.masks.len(), 1),
            Task::Gcg => {
                let labels: Vec<&str> = r.masks.iter().map(|m| m.label.as_str()).collect();
                assert_eq!(labels, ["A red circle", "a green box"]);
            }
        }
        if req.task != Task::Conversation {
            // forced: the answer ids end with <|end|>, the text has no <|end|>
            assert_eq!(*r.token_ids.last().unwrap(), end);
            assert!(!r.text.contains("<|end|>"));
            assert!(r.text.contains("<SEG>"), "{}", r.text);
        }
    }
    assert_eq!(s.image_side_runs(), 1);
}

#[test]
fn generate_mode_segmentation_is_well_formed() {
    let (w, h) = (30, 40);
    let img = image(w, h, 2);
    let mut s = model().session(&img).unwrap();
    for mut req in requests(w, h) {
        req.forced = false;
        req.answer = None;
        req.max_new_tokens = 5;
        let r = s.run(&req).unwrap().result;
        check_well_formed(&r, w, h);
        assert!(r.token_ids.len() <= 5);
    }
}

fn strip_timings(mut r: ResultJson) -> ResultJson {
    r.timings_ms.0.clear();
    r
}

#[test]
fn session_reuse_skips_the_image_side_and_matches_a_fresh_session() {
    let (w, h) = (40, 40);
    let img = image(w, h, 3);
    let reqs = requests(w, h);
    let mut s = model().session(&img).unwrap();
    let first: Vec<ResultJson> = reqs
        .iter()
        .map(|r| strip_timings(s.run(r).unwrap().result))
        .collect();
    // again on the same session, in reverse order
    for (r, want) in reqs.iter().zip(&first).rev() {
        assert_eq!(
            &strip_timings(s.run(r).unwrap().result),
            want,
            "{:?}",
            r.task
        );
    }
    assert_eq!(s.image_side_runs(), 1);
    // a fresh session per request gives the same results
    for (r, want) in reqs.iter().zip(&first) {
        let mut fresh = model().session(&img).unwrap();
        assert_eq!(
            &strip_timings(fresh.run(r).unwrap().result),
            want,
            "{:?}",
            r.task
        );
        assert_eq!(fresh.image_side_runs(), 1);
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn forked_prefix_equals_a_full_prefill() {
    let (w, h) = (36, 28);
    let img = image(w, h, 4);
    let mut s = model().session(&img).unwrap();
    for req in requests(w, h) {
        let a = s.prompt_hidden(&req, true).unwrap();
        let b = s.prompt_hidden(&req, false).unwrap();
        assert_eq!(a.dims(), b.dims());
        let e = rel_err(&a.to_vec_f32().unwrap(), &b.to_vec_f32().unwrap());
        assert!(e <= 1e-5, "{:?}: rel err {e:.3e}", req.task);
    }
}

#[test]
fn cross_image_vgd_and_dump() {
    let (w, h) = (32, 24);
    let img = image(w, h, 5);
    let other = image(20, 30, 6);
    let mut s = model().session(&img).unwrap();
    let mut req = Request::new(Task::Vgd);
    req.vprompts = vec![rect(20, 30, 2, 2, 12, 14)];
    req.vprompt_image = Some(other.clone());
    req.forced = true;
    req.threshold = 0.0;
    req.dump = true;
    let out = s.run(&req).unwrap();
    check_well_formed(&out.result, w, h);
    let names: Vec<&str> = out.dump.iter().map(|(n, _)| n.as_str()).collect();
    for n in [
        "input.sam_pixel_values",
        "input.siglip_pixel_values",
        "proj.visual",
        "proj.seg",
        "region.vectors",
        "llm.inputs_embeds",
        "llm.final_hidden",
        "llm.last_logits",
        "proj.cond_embeds",
        "proj.seg_embed",
        "class_table",
        "connector.level0",
        "pixel_decoder.multi_scale.2",
        "pixel_decoder.mask_features",
        "final.class_logits",
        "final.mask_logits",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    let get = |n: &str| &out.dump.iter().find(|(k, _)| k == n).unwrap().1;
    let cfg = model().config();
    let d = cfg.llm.hidden_size;
    let t = get("llm.inputs_embeds").dims()[1];
    assert_eq!(get("llm.inputs_embeds").dims(), [1, t, d]);
    assert_eq!(get("llm.final_hidden").dims(), [1, t, d]);
    assert_eq!(get("region.vectors").dims(), [1, d]);
    assert_eq!(get("class_table").dims()[0], 2);
    // the prompt mask outside its own image size is an error
    req.vprompts = vec![rect(w, h, 2, 2, 12, 14)];
    assert!(s.run(&req).unwrap_err().is_user_input());
    let path = model_dir().join("dump.safetensors");
    xsam::session::write_dump(&path, &out.dump).unwrap();
    assert!(xsam::Weights::load(&path)
        .unwrap()
        .contains("final.mask_logits"));
}

#[test]
fn bad_requests_are_input_errors() {
    let (w, h) = (32, 32);
    let img = image(w, h, 7);
    let mut s = model().session(&img).unwrap();
    let mut bad = vec![];
    bad.push(Request::new(Task::Semantic)); // no classes
    let mut r = Request::new(Task::Semantic);
    r.classes = vec!["a".into(), " ".into()];
    bad.push(r);
    let mut r = Request::new(Task::Interactive);
    r.vprompts = vec![rect(w, h, 0, 0, 0, 0)]; // empty
    bad.push(r);
    let mut r = Request::new(Task::Vgd);
    r.vprompts = vec![rect(w + 1, h, 0, 0, 4, 4)]; // wrong size
    bad.push(r);
    let mut r = Request::new(Task::Conversation);
    r.text = Some("word ".repeat(5000));
    bad.push(r);
    for r in bad {
        let e = s
            .run(&r)
            .err()
            .unwrap_or_else(|| panic!("{:?} passed", r.task));
        assert!(e.is_user_input(), "{:?}: {e}", r.task);
        // the cheap pre-check catches all but the empty-after-resize prompt
        if r.task != Task::Interactive {
            let e = model().check_request(&r, (h, w)).unwrap_err();
            assert!(e.is_user_input(), "{:?}: {e}", r.task);
        }
    }
    for r in requests(w, h) {
        model().check_request(&r, (h, w)).unwrap();
    }
}

/// `(polls seen, error)` of a run whose abort poll answers true on poll `stop_at` (1-based; 0:
/// never), with the ids the token hook saw.
fn run_stopping_at(
    session: &mut xsam::Session<'_>,
    req: &Request,
    stop_at: usize,
) -> (usize, Vec<u32>, xsam::Result<xsam::Output>) {
    let polls = std::cell::Cell::new(0usize);
    let mut ids = vec![];
    let mut on_token = |id| ids.push(id);
    let mut should_abort = || {
        polls.set(polls.get() + 1);
        polls.get() == stop_at
    };
    let mut hooks = xsam::RunHooks {
        on_token: Some(&mut on_token),
        should_abort: Some(&mut should_abort),
    };
    let out = session.run_with_hooks(req, &mut hooks);
    (polls.get(), ids, out)
}

fn aborted_message(r: xsam::Result<xsam::Output>) -> String {
    match r {
        Err(e @ xsam::Error::Aborted(_)) => {
            assert!(!e.is_user_input(), "an abort is not a user-input error");
            e.to_string()
        }
        Err(e) => panic!("expected Error::Aborted, got {e}"),
        Ok(_) => panic!("expected Error::Aborted, got a result"),
    }
}

#[test]
fn the_abort_poll_stops_a_run_between_stages_and_the_session_stays_usable() {
    let (w, h) = (64, 48);
    let mut session = model().session(&image(w, h, 1)).unwrap();

    // Forced segmentation: the polls come in this order, one each.
    let mut referring = Request::new(Task::Referring);
    referring.text = Some("the red circle".into());
    referring.forced = true;
    let (polls, _, plain) = run_stopping_at(&mut session, &referring, 0);
    let plain = strip_timings(plain.unwrap().result);
    let stages = [
        "before it started",
        "after the prompt was prepared",
        "after the LLM prefill",
        "before segmentation",
        "before the mask decoder",
        "before post-processing",
    ];
    assert_eq!(polls, stages.len());
    for (i, at) in stages.iter().enumerate() {
        let (polls, _, r) = run_stopping_at(&mut session, &referring, i + 1);
        assert_eq!(polls, i + 1, "no poll after the one that stopped the run");
        let msg = aborted_message(r);
        assert!(msg.contains(at), "poll {}: `{msg}` lacks `{at}`", i + 1);
    }

    // Generation: after the prefill, one poll before every decode step.
    let mut conv = Request::new(Task::Conversation);
    conv.text = Some("What is in the image?".into());
    conv.max_new_tokens = 6;
    let (_, ids, full) = run_stopping_at(&mut session, &conv, 0);
    let full = strip_timings(full.unwrap().result);
    assert!(
        ids.len() >= 3,
        "the tiny model ended after {} tokens",
        ids.len()
    );
    // polls: start, prompt, prefill, then after token 1, after token 2
    let (polls, seen, r) = run_stopping_at(&mut session, &conv, 5);
    assert_eq!((polls, seen.as_slice()), (5, &ids[..2]));
    let msg = aborted_message(r);
    assert!(msg.contains("after 2 generated tokens"), "{msg}");

    // Aborted at the first poll: nothing ran.
    let (polls, seen, r) = run_stopping_at(&mut session, &conv, 1);
    assert_eq!((polls, seen.len()), (1, 0));
    assert!(aborted_message(r).contains("before it started"));

    // Nothing an abort left behind changes later runs.
    let again = session.run(&referring).unwrap();
    assert_eq!(strip_timings(again.result), plain);
    let again = session.run(&conv).unwrap();
    assert_eq!(strip_timings(again.result), full);
}

#[test]
fn load_progress_is_monotone_ends_at_one_and_can_cancel() {
    let dir = model_dir().join("model");
    let mut seen = vec![];
    Model::load_with_progress(&dir, Device::Cpu, &mut |p| {
        seen.push(p);
        true
    })
    .unwrap();
    assert_eq!(seen.first(), Some(&0.0));
    assert_eq!(seen.last(), Some(&1.0));
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    let between = seen.iter().filter(|&&p| p > 0.0 && p < 1.0).count();
    assert!(between >= 4, "few intermediate values: {seen:?}");

    // Cancelled part way: the callback is not called again and no model comes back.
    let mut calls = 0;
    let r = Model::load_with_progress(&dir, Device::Cpu, &mut |p| {
        calls += 1;
        p < 0.2
    });
    match r {
        Err(e @ xsam::Error::Aborted(_)) => assert!(e.to_string().contains("cancelled")),
        Err(e) => panic!("expected Error::Aborted, got {e}"),
        Ok(_) => panic!("the cancelled load returned a model"),
    }
    let first_at_or_above = seen.iter().position(|&p| p >= 0.2).unwrap() + 1;
    assert_eq!(calls, first_at_or_above);
    assert!(calls > 1);
}

#[test]
fn memory_plan_covers_the_weight_files_the_kv_pool_and_the_arena() {
    let m = model();
    let plan = m.memory_plan().unwrap();
    let files: u64 = std::fs::read_dir(model_dir().join("model"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(plan.weights, files);

    let (w, h) = (64, 48);
    let mut session = m.session(&image(w, h, 2)).unwrap();
    assert_eq!(session.kv_pool_bytes() as u64, plan.kv_pool);
    for req in requests(w, h) {
        session.run(&req).unwrap();
    }
    let used = session.arena_bytes() as u64;
    eprintln!("memory plan {plan:?}, arena used after every task {used}");
    assert!(used > 0 && used <= plan.arena, "{used} > {}", plan.arena);

    assert!(plan.check(plan.total()).is_ok());
    let err = plan.check(plan.weights + 1).unwrap_err();
    assert!(matches!(err, xsam::Error::OutOfMemory(_)));
    assert!(err.to_string().contains("the KV pool does not"), "{err}");
}
