//! Task post-processing against the PyTorch reference (reference/make_fixtures_post.py →
//! tests/fixtures/post/*.json), COCO RLE, and the §4 result JSON.

use serde_json::Value;
use xsam::task::masks::{BitMask, MaskGeometry};
use xsam::task::postprocess::{self, ClassInfo, MaskKind, MaskResult, Prediction};
use xsam::task::result::{round6, ResultJson, Timings};
use xsam::task::rle::{self, Rle};

fn fixture(task: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/post/{task}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn pair(v: &Value) -> (usize, usize) {
    let a = v.as_array().unwrap();
    (
        a[0].as_u64().unwrap() as usize,
        a[1].as_u64().unwrap() as usize,
    )
}

fn rle_of(v: &Value) -> Rle {
    serde_json::from_value(v.clone()).unwrap()
}

fn kind_of(s: &str) -> MaskKind {
    match s {
        "thing" => MaskKind::Thing,
        "stuff" => MaskKind::Stuff,
        _ => panic!("kind {s}"),
    }
}

fn classes(case: &Value) -> Vec<ClassInfo> {
    case["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ClassInfo {
            name: c["name"].as_str().unwrap().to_string(),
            kind: kind_of(c["kind"].as_str().unwrap()),
        })
        .collect()
}

struct Inputs {
    class_logits: Vec<f32>,
    mask_logits: Vec<f32>,
    num_queries: usize,
    geometry: MaskGeometry,
}

impl Inputs {
    fn of(case: &Value) -> Self {
        Self {
            class_logits: f32s(&case["class_logits"]),
            mask_logits: f32s(&case["mask_logits"]),
            num_queries: case["num_queries"].as_u64().unwrap() as usize,
            geometry: MaskGeometry {
                grid: pair(&case["grid"]),
                canvas: case["canvas"].as_u64().unwrap() as usize,
                scaled: pair(&case["scaled"]),
                image: pair(&case["image"]),
            },
        }
    }

    fn pred(&self) -> Prediction<'_> {
        Prediction {
            class_logits: &self.class_logits,
            mask_logits: &self.mask_logits,
            num_queries: self.num_queries,
            geometry: self.geometry,
        }
    }
}

/// Compares results with the fixture's expected list; returns the smallest mask IoU.
fn check(case: &Value, got: &[MaskResult]) -> f64 {
    let name = case["name"].as_str().unwrap();
    let want = case["expected"].as_array().unwrap();
    assert_eq!(
        got.len(),
        want.len(),
        "{name}: {} masks, expected {}: {:?}",
        got.len(),
        want.len(),
        got.iter()
            .map(|r| (r.class_index, r.score))
            .collect::<Vec<_>>()
    );
    let (ih, iw) = pair(&case["image"]);
    let mut min_iou = 1.0f64;
    let mut max_ds = 0.0f64;
    let mut xor = 0usize;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.label, w["label"].as_str().unwrap(), "{name}[{i}] label");
        assert_eq!(
            g.class_index as u64,
            w["class_index"].as_u64().unwrap(),
            "{name}[{i}] class_index"
        );
        assert_eq!(
            g.kind,
            kind_of(w["kind"].as_str().unwrap()),
            "{name}[{i}] kind"
        );
        assert_eq!(
            g.segment_id as u64,
            w["segment_id"].as_u64().unwrap(),
            "{name}[{i}] segment_id"
        );
        let ws = w["score"].as_f64().unwrap();
        max_ds = max_ds.max((g.score as f64 - ws).abs());
        assert!(
            (g.score as f64 - ws).abs() <= 2e-3,
            "{name}[{i}] score {} vs {ws}",
            g.score
        );
        assert_eq!(
            (g.mask.height(), g.mask.width()),
            (ih, iw),
            "{name}[{i}] size"
        );
        let wm = rle::decode(&rle_of(&w["rle"])).unwrap();
        let iou = g.mask.iou(&wm).unwrap();
        assert!(
            iou >= 0.98,
            "{name}[{i}] mask IoU {iou} ({} vs {} pixels)",
            g.mask.count_ones(),
            wm.count_ones()
        );
        min_iou = min_iou.min(iou);
        xor += g.mask.count_ones() + wm.count_ones() - 2 * intersection(&g.mask, &wm);
    }
    // Stricter than the IoU bound: an order-of-operations mistake (e.g. sigmoid after the image
    // resize in semantic) moves many pixels; float-order differences move a few at most.
    assert!(
        xor as f64 <= (0.001 * (ih * iw) as f64).max(2.0),
        "{name}: {xor} pixels differ from the reference in all"
    );
    eprintln!(
        "{name}: {} masks, min IoU {min_iou}, max score diff {max_ds:.2e}",
        got.len()
    );
    min_iou
}

fn intersection(a: &BitMask, b: &BitMask) -> usize {
    let (h, w) = (a.height(), a.width());
    (0..h * w)
        .filter(|&i| a.get_index(i) && b.get_index(i))
        .count()
}

fn cases(task: &str) -> Vec<Value> {
    let fx = fixture(task);
    let cs = fx["cases"].as_array().unwrap().clone();
    assert!(!cs.is_empty());
    cs
}

#[test]
fn semantic_matches_reference() {
    for case in cases("semantic") {
        let inp = Inputs::of(&case);
        let got = postprocess::semantic(&inp.pred(), &classes(&case)).unwrap();
        check(&case, &got);
    }
}

#[test]
fn instance_and_vgd_match_reference() {
    let mut variants = vec![];
    for case in cases("instance") {
        let inp = Inputs::of(&case);
        let thr = case["threshold"].as_f64().unwrap();
        let got = postprocess::instance(&inp.pred(), &classes(&case), thr).unwrap();
        check(&case, &got);
        // score-descending order
        assert!(got.windows(2).all(|w| w[0].score >= w[1].score));
        variants.push(case["variant"].as_str().unwrap().to_string());
    }
    assert!(variants.iter().any(|v| v == "vgd"));
}

#[test]
fn panoptic_matches_reference() {
    for case in cases("panoptic") {
        let inp = Inputs::of(&case);
        let thr = case["threshold"].as_f64().unwrap();
        let got = postprocess::panoptic(&inp.pred(), &classes(&case), thr).unwrap();
        check(&case, &got);
        // segments are disjoint
        for (i, a) in got.iter().enumerate() {
            for b in &got[i + 1..] {
                assert_eq!(a.mask.iou(&b.mask).unwrap(), 0.0);
            }
        }
    }
}

#[test]
fn referring_and_reasoning_match_reference() {
    for case in cases("referring") {
        let inp = Inputs::of(&case);
        let got = postprocess::referring(&inp.pred(), case["label"].as_str().unwrap()).unwrap();
        assert_eq!(got.len(), 1);
        check(&case, &got);
    }
}

#[test]
fn gcg_matches_reference() {
    for case in cases("gcg") {
        let inp = Inputs::of(&case);
        let phrases: Vec<String> = case["phrases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect();
        let got = postprocess::gcg(&inp.pred(), &phrases).unwrap();
        check(&case, &got);
    }
}

#[test]
fn interactive_matches_reference() {
    for case in cases("interactive") {
        let inp = Inputs::of(&case);
        let prompt = rle::decode(&rle_of(&case["prompt"])).unwrap();
        let thr = case["threshold"].as_f64().unwrap();
        let label = case["label"].as_str().unwrap();
        let got = postprocess::interactive(&inp.pred(), label, thr, &prompt).unwrap();
        check(&case, &got);
        // The same prompt given unpadded (at the scaled size) gives the same answer.
        let (sh, sw) = inp.geometry.scaled;
        let mut small = BitMask::new(sh, sw);
        for y in 0..sh {
            for x in 0..sw {
                small.set(y, x, prompt.get(y, x));
            }
        }
        let again = postprocess::interactive(&inp.pred(), label, thr, &small).unwrap();
        assert_eq!(again, got);
    }
}

#[test]
fn bad_inputs_are_errors() {
    let geometry = MaskGeometry {
        grid: (4, 4),
        canvas: 16,
        scaled: (16, 12),
        image: (20, 15),
    };
    let class_logits = vec![0.0f32; 3 * 3];
    let mask_logits = vec![1.0f32; 3 * 16];
    let pred = Prediction {
        class_logits: &class_logits,
        mask_logits: &mask_logits,
        num_queries: 3,
        geometry,
    };
    // K = 2 but one class given; referring needs K = 1.
    assert!(postprocess::semantic(&pred, &[ClassInfo::thing("a")]).is_err());
    assert!(postprocess::referring(&pred, "x").is_err());
    // Wrong mask length.
    let short = Prediction {
        mask_logits: &mask_logits[..40],
        ..pred
    };
    assert!(
        postprocess::instance(&short, &[ClassInfo::thing("a"), ClassInfo::thing("b")], 0.5)
            .is_err()
    );
    // Scaled size outside the canvas.
    let bad = Prediction {
        geometry: MaskGeometry {
            scaled: (17, 12),
            ..geometry
        },
        ..pred
    };
    assert!(postprocess::gcg(&bad, &["a".into(), "b".into()]).is_err());
    // A prompt smaller than the scaled size.
    let one = vec![0.0f32; 3 * 2];
    let p1 = Prediction {
        class_logits: &one,
        ..pred
    };
    assert!(postprocess::interactive(&p1, "region 1", 0.5, &BitMask::new(3, 3)).is_err());
}

fn mask_from_rows(rows: &[&str]) -> BitMask {
    let h = rows.len();
    let w = rows[0].len();
    let bytes: Vec<u8> = rows
        .iter()
        .flat_map(|r| r.bytes().map(|b| (b == b'1') as u8))
        .collect();
    BitMask::from_u8(h, w, &bytes).unwrap()
}

#[test]
fn rle_hand_checked_coco_example() {
    // Column-major: col0 = 0,0,1; col1 = 1,1,1; col2 = 1,0,0; col3 = 0,0,1
    // → 0 0 | 1 1 1 1 1 | 0 0 0 0 | 1 → counts [2, 5, 4, 1].
    let m = mask_from_rows(&["0110", "0100", "1101"]);
    let r = rle::encode(&m);
    assert_eq!(r.size, [3, 4]);
    assert_eq!(r.counts, vec![2, 5, 4, 1]);
    assert_eq!(rle::decode(&r).unwrap(), m);
    // First pixel on: a leading zero-length run.
    let full = mask_from_rows(&["11", "11"]);
    assert_eq!(rle::encode(&full).counts, vec![0, 4]);
    // Empty.
    assert_eq!(rle::encode(&BitMask::new(2, 3)).counts, vec![6]);
    // Runs that do not cover the size are an error.
    assert!(rle::decode(&Rle {
        size: [2, 2],
        counts: vec![1, 2]
    })
    .is_err());
}

#[test]
fn rle_round_trip() {
    let (h, w) = (37, 53);
    let mut state = 0x2545f491u32;
    let bytes: Vec<u8> = (0..h * w)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            // runs of mixed lengths
            ((state % 7 < 3) ^ (i % 11 < 4)) as u8
        })
        .collect();
    let m = BitMask::from_u8(h, w, &bytes).unwrap();
    let r = rle::encode(&m);
    assert_eq!(r.counts.iter().sum::<u64>(), (h * w) as u64);
    assert!(r.counts[1..].iter().all(|&c| c > 0));
    let back = rle::decode(&r).unwrap();
    assert_eq!(back, m);
    assert_eq!(back.to_u8(), bytes);
}

#[test]
fn result_json_has_the_interface_shape() {
    let mask = mask_from_rows(&["0110", "0100", "1101"]);
    let results = vec![
        MaskResult {
            label: "the dog".into(),
            class_index: 0,
            score: 0.930_000_1,
            kind: MaskKind::Thing,
            segment_id: 1,
            mask: mask.clone(),
        },
        MaskResult {
            label: "sky".into(),
            class_index: 3,
            score: 0.123_456_78,
            kind: MaskKind::Stuff,
            segment_id: 2,
            mask,
        },
    ];
    let mut timings = Timings::default();
    timings.push("sam_encoder", 12.5);
    timings.push("llm", 3.0);
    timings.push("decoder", 1.25);
    let doc = ResultJson::new(
        "panoptic",
        "Sure, <SEG>.",
        vec![18585, 29892, 32011, 29889, 32007],
        4,
        3,
        &results,
        timings,
    );
    let text = doc.to_json_string().unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let keys = |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    let mut top = keys(&v);
    top.sort();
    assert_eq!(
        top,
        ["image", "masks", "task", "text", "timings_ms", "token_ids"]
    );
    // Keys in the §4 order in the text.
    let pos = |k: &str| text.find(&format!("\"{k}\"")).unwrap();
    assert!(pos("task") < pos("text") && pos("text") < pos("token_ids"));
    assert!(pos("token_ids") < pos("image") && pos("image") < pos("masks"));
    assert!(pos("masks") < pos("timings_ms"));
    assert_eq!(v["task"], "panoptic");
    assert_eq!(v["text"], "Sure, <SEG>.");
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 5);
    assert_eq!(v["image"]["width"], 4);
    assert_eq!(v["image"]["height"], 3);
    let m0 = &v["masks"][0];
    let mut mk = keys(m0);
    mk.sort();
    assert_eq!(
        mk,
        ["class_index", "kind", "label", "rle", "score", "segment_id"]
    );
    assert_eq!(m0["label"], "the dog");
    assert_eq!(m0["kind"], "thing");
    assert_eq!(v["masks"][1]["kind"], "stuff");
    assert_eq!(m0["segment_id"], 1);
    assert_eq!(m0["score"].as_f64().unwrap(), 0.93);
    assert_eq!(v["masks"][1]["score"].as_f64().unwrap(), 0.123457);
    assert_eq!(m0["rle"]["size"], serde_json::json!([3, 4]));
    assert_eq!(m0["rle"]["counts"], serde_json::json!([2, 5, 4, 1]));
    let mut rk = keys(&m0["rle"]);
    rk.sort();
    assert_eq!(rk, ["counts", "size"]);
    // Timings keep their order.
    let t = text.find("\"sam_encoder\"").unwrap();
    assert!(
        t < text.find("\"llm\"").unwrap()
            && text.find("\"llm\"").unwrap() < text.find("\"decoder\"").unwrap()
    );
    assert_eq!(v["timings_ms"]["decoder"].as_f64().unwrap(), 1.25);
    // Round trip.
    let back: ResultJson = serde_json::from_str(&text).unwrap();
    assert_eq!(back, doc);
    // Conversation: no masks.
    let conv = ResultJson::new("conversation", "hi", vec![], 4, 3, &[], Timings::default());
    let cv: Value = serde_json::from_str(&conv.to_json_string().unwrap()).unwrap();
    assert_eq!(cv["masks"], serde_json::json!([]));
}

#[test]
fn scores_round_like_python() {
    assert_eq!(round6(0.5), 0.5);
    assert_eq!(round6(0.123_456_5), 0.123457); // f32 0.1234565 is 0.12345650047...
    assert_eq!(round6(1.0 / 3.0), 0.333333);
    // The fixture's Python-rounded scores agree with ours.
    for task in [
        "instance",
        "panoptic",
        "gcg",
        "referring",
        "interactive",
        "semantic",
    ] {
        for case in cases(task) {
            for e in case["expected"].as_array().unwrap() {
                let s = e["score"].as_f64().unwrap() as f32;
                assert_eq!(round6(s), e["score_rounded"].as_f64().unwrap(), "{task}");
            }
        }
    }
}

/// Timing at the real sizes (Q 200, 128² grid, canvas 1024, a 480×640 image, 150 classes):
/// `cargo test --release --test postprocess -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing_at_real_sizes() {
    let (q, k) = (200usize, 150usize);
    let geometry = MaskGeometry {
        grid: (128, 128),
        canvas: 1024,
        scaled: (768, 1024),
        image: (480, 640),
    };
    let mut state = 1u32;
    let mut rnd = || {
        state = state.wrapping_mul(1664525).wrapping_add(1013904223);
        (state >> 8) as f32 / (1u32 << 24) as f32
    };
    let class_logits: Vec<f32> = (0..q * (k + 1)).map(|_| rnd() * 12.0 - 6.0).collect();
    let mask_logits: Vec<f32> = (0..q * 128 * 128).map(|_| rnd() * 8.0 - 4.0).collect();
    let pred = Prediction {
        class_logits: &class_logits,
        mask_logits: &mask_logits,
        num_queries: q,
        geometry,
    };
    let classes: Vec<ClassInfo> = (0..k)
        .map(|i| {
            if i < 100 {
                ClassInfo::thing(format!("c{i}"))
            } else {
                ClassInfo::stuff(format!("c{i}"))
            }
        })
        .collect();
    let t = std::time::Instant::now();
    let n = postprocess::semantic(&pred, &classes).unwrap().len();
    eprintln!("semantic: {n} masks in {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let n = postprocess::instance(&pred, &classes, 0.0).unwrap().len();
    eprintln!("instance thr 0: {n} masks in {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let n = postprocess::panoptic(&pred, &classes, 0.0).unwrap().len();
    eprintln!("panoptic thr 0: {n} masks in {:?}", t.elapsed());
    let one = &class_logits[..q * 2];
    let p1 = Prediction {
        class_logits: one,
        ..pred
    };
    let t = std::time::Instant::now();
    postprocess::referring(&p1, "x").unwrap();
    eprintln!("referring: {:?}", t.elapsed());
    let mut prompt = BitMask::new(1024, 1024);
    for y in 100..200 {
        for x in 300..420 {
            prompt.set(y, x, true);
        }
    }
    let t = std::time::Instant::now();
    postprocess::interactive(&p1, "region 1", 0.5, &prompt).unwrap();
    eprintln!("interactive: {:?}", t.elapsed());
}
