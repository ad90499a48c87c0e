//! End to end, every task, on the tiny random model (issue 6, first "done when" bullet).
//!
//! Expected results come from the Python reference pipeline (`reference/pipeline.py`, written by
//! `reference/make_fixtures_e2e.py` into `tests/fixtures/e2e/`): masks IoU >= 0.98, labels, class
//! indexes, kinds and segment ids equal, scores within 2e-3, token ids and text equal.
//! The model directory is regenerated with `xsam::init::write_random_model` (tiny preset, the
//! fixture's seed) and its files must have the SHA-256 the fixture recorded.

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use xsam::image::{GreyImage, RgbImage};
use xsam::session::{Model, Request};
use xsam::task::rle::{self, Rle};
use xsam::task::templates::Task;
use xsam::{Config, Device};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/e2e")
}

fn sha256_hex(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The uint8 arrays of `inputs.safetensors`: name → (shape, bytes).
fn inputs() -> std::collections::HashMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(fixture_dir().join("inputs.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::U8, "{name}");
            (name, (view.shape().to_vec(), view.data().to_vec()))
        })
        .collect()
}

fn rgb(inp: &std::collections::HashMap<String, (Vec<usize>, Vec<u8>)>, name: &str) -> RgbImage {
    let (shape, data) = &inp[name];
    assert_eq!(shape.len(), 3, "{name}");
    RgbImage::new(shape[1], shape[0], data.clone()).unwrap()
}

fn grey(inp: &std::collections::HashMap<String, (Vec<usize>, Vec<u8>)>, name: &str) -> GreyImage {
    let (shape, data) = &inp[name];
    assert_eq!(shape.len(), 2, "{name}");
    GreyImage::new(shape[1], shape[0], data.clone()).unwrap()
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

fn mask_of(v: &Value) -> Rle {
    serde_json::from_value(v["rle"].clone()).unwrap()
}

/// Intersection over union of two RLE masks (1.0 when both are empty).
fn iou(a: &Rle, b: &Rle) -> f64 {
    assert_eq!(a.size, b.size);
    let (ma, mb) = (rle::decode(a).unwrap(), rle::decode(b).unwrap());
    let n = a.size[0] * a.size[1];
    let (mut inter, mut union) = (0usize, 0usize);
    for i in 0..n {
        let (x, y) = (ma.get_index(i), mb.get_index(i));
        inter += (x && y) as usize;
        union += (x || y) as usize;
    }
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// Compares one result with the expected JSON; returns the problems found (empty = pass) and
/// (min IoU, max score difference) for the report.
fn compare(got: &Value, exp: &Value, iou_min: f64, score_tol: f64) -> (Vec<String>, f64, f64) {
    let mut errs = vec![];
    for key in ["task", "text", "token_ids", "image"] {
        if got[key] != exp[key] {
            errs.push(format!("{key}: got {} expected {}", got[key], exp[key]));
        }
    }
    let (g, e) = (
        got["masks"].as_array().unwrap(),
        exp["masks"].as_array().unwrap(),
    );
    let (mut min_iou, mut max_diff) = (1.0f64, 0.0f64);
    if g.len() != e.len() {
        let short = |ms: &Vec<Value>| -> Vec<String> {
            ms.iter()
                .map(|m| format!("{}#{}:{}", m["label"], m["class_index"], m["score"]))
                .collect()
        };
        errs.push(format!(
            "{} masks, expected {}: got {:?} expected {:?}",
            g.len(),
            e.len(),
            short(g),
            short(e)
        ));
        return (errs, f64::NAN, f64::NAN);
    }
    for (i, (gm, em)) in g.iter().zip(e).enumerate() {
        for key in ["label", "class_index", "kind", "segment_id"] {
            if gm[key] != em[key] {
                errs.push(format!(
                    "mask {i} {key}: got {} expected {}",
                    gm[key], em[key]
                ));
            }
        }
        let d = (gm["score"].as_f64().unwrap() - em["score"].as_f64().unwrap()).abs();
        max_diff = max_diff.max(d);
        if d > score_tol {
            errs.push(format!(
                "mask {i} score: got {} expected {} (|diff| {d:.2e})",
                gm["score"], em["score"]
            ));
        }
        let (gr, er) = (mask_of(gm), mask_of(em));
        if gr.size != er.size {
            errs.push(format!(
                "mask {i} size {:?} expected {:?}",
                gr.size, er.size
            ));
            continue;
        }
        let v = iou(&gr, &er);
        min_iou = min_iou.min(v);
        if v < iou_min {
            errs.push(format!("mask {i} IoU {v:.4} < {iou_min}"));
        }
    }
    (errs, min_iou, max_diff)
}

#[test]
fn every_task_matches_the_python_reference() {
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("cases.json")).unwrap())
            .unwrap();
    let seed = doc["model"]["seed"].as_u64().unwrap();
    let dir = tempfile::tempdir().unwrap();
    xsam::init::write_random_model(&Config::preset("tiny").unwrap(), dir.path(), seed, false)
        .unwrap();
    for (file, want) in doc["model"]["sha256"].as_object().unwrap() {
        assert_eq!(
            sha256_hex(&dir.path().join(file)),
            want.as_str().unwrap(),
            "{file} of the regenerated tiny model differs from the one the reference ran on \
             (xsam init changed? regenerate with reference/make_fixtures_e2e.py)"
        );
    }
    let iou_min = doc["comparison"]["mask_iou_min"].as_f64().unwrap();
    let score_tol = doc["comparison"]["score_tol"].as_f64().unwrap();

    let model = Model::load(dir.path(), Device::Cpu).unwrap();
    let inp = inputs();
    let mut sessions = std::collections::HashMap::new();
    let mut failures = vec![];
    for case in doc["cases"].as_array().unwrap() {
        let c = &case["inputs"];
        let name = c["name"].as_str().unwrap();
        let image_name = c["image"].as_str().unwrap().to_string();
        let mut req = Request::new(c["task"].as_str().unwrap().parse::<Task>().unwrap());
        req.classes = strings(c, "classes");
        req.stuff = strings(c, "stuff");
        req.text = c.get("text").and_then(Value::as_str).map(str::to_string);
        req.vprompts = strings(c, "vprompts")
            .iter()
            .map(|n| grey(&inp, n))
            .collect();
        req.vprompt_image = c
            .get("vprompt_image")
            .and_then(Value::as_str)
            .map(|n| rgb(&inp, n));
        req.answer = c.get("answer").and_then(Value::as_str).map(str::to_string);
        req.forced = c.get("forced").and_then(Value::as_bool).unwrap_or(false);
        req.max_new_tokens = c
            .get("max_new_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(512) as usize;
        req.threshold = c.get("threshold").and_then(Value::as_f64).unwrap_or(0.5);
        // one session per image, reused across requests (as the CLI and demo do)
        let session = sessions
            .entry(image_name.clone())
            .or_insert_with(|| model.session(&rgb(&inp, &image_name)).unwrap());
        let out = match session.run(&req) {
            Ok(o) => o,
            Err(e) => {
                failures.push(format!("{name}: error {e}"));
                continue;
            }
        };
        let got = serde_json::to_value(&out.result).unwrap();
        let (errs, min_iou, max_diff) = compare(&got, &case["expected"], iou_min, score_tol);
        eprintln!(
            "{name:>18}: {} masks, min IoU {min_iou:.4}, max |score diff| {max_diff:.2e}{}",
            got["masks"].as_array().map_or(0, Vec::len),
            if errs.is_empty() { "" } else { "  FAIL" }
        );
        failures.extend(errs.into_iter().map(|e| format!("{name}: {e}")));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
