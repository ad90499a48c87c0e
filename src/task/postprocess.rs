//! Task post-processing: the decoder's final class logits `[Q, K+1]` (bg last) and mask logits
//! `[Q, h, w]` → the result masks of each task (interfaces.md §4-§5, architecture notes §13).
//!
//! Follows X-SAM's `postprocess_fns` (branch AAAI26_Archive: `genseg`, `refseg`/`reaseg`, `gcgseg`,
//! `intseg`, `vgdseg`) with the fixed choices of interfaces.md where those differ; each
//! difference is marked `Deviation:` below. Class probabilities are `softmax` over the K+1
//! columns; the bg column is dropped afterwards. Every mask is produced by the
//! upsample-crop-resize routine of [`MaskResizer`], only for the queries a task needs.
//!
//! `segment_id` (all tasks): 1-based position of the mask in the returned list. For panoptic this
//! is the panoptic segment id (segments are numbered in creation order); for gcg it equals the
//! official id (phrase index + 1). Tie rules where the official code relies on unspecified torch
//! order: every argmax takes the first maximum, sorts are stable on the query (then class) index.

use super::masks::{sigmoid, BitMask, MaskGeometry, MaskResizer};
use crate::backend::cpu::softmax_rows;
use crate::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Whether a class is a countable thing or amorphous stuff (panoptic).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskKind {
    Thing,
    Stuff,
}

/// One class of the class table (in prompt order: class index k = the k-th `<p>` span).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassInfo {
    /// The JSON label (the name as the user gave it, stripped).
    pub name: String,
    pub kind: MaskKind,
}

impl ClassInfo {
    pub fn thing(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind: MaskKind::Thing,
        }
    }

    pub fn stuff(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind: MaskKind::Stuff,
        }
    }
}

/// One result mask at image resolution.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskResult {
    pub label: String,
    pub class_index: usize,
    /// Unrounded f32 score (the JSON rounds to 6 decimals).
    pub score: f32,
    pub kind: MaskKind,
    /// 1-based; see the module docs.
    pub segment_id: u32,
    /// `H0 × W0`.
    pub mask: BitMask,
}

/// The decoder's last prediction for one image.
#[derive(Clone, Copy, Debug)]
pub struct Prediction<'a> {
    /// `[Q, K+1]`, the bg column last.
    pub class_logits: &'a [f32],
    /// `[Q, h, w]` with `(h, w) = geometry.grid`.
    pub mask_logits: &'a [f32],
    pub num_queries: usize,
    pub geometry: MaskGeometry,
}

impl Prediction<'_> {
    /// K (classes without bg), after checking every length.
    pub fn num_classes(&self) -> Result<usize> {
        self.geometry.validate()?;
        let q = self.num_queries;
        if q == 0 {
            return Err(Error::shape("postprocess", "no queries"));
        }
        if !self.class_logits.len().is_multiple_of(q) || self.class_logits.len() / q < 2 {
            return Err(Error::shape(
                "postprocess",
                format!(
                    "class logits have {} values, not [{q}, K+1] with K >= 1",
                    self.class_logits.len()
                ),
            ));
        }
        let want = q * self.geometry.grid_len();
        if self.mask_logits.len() != want {
            return Err(Error::shape(
                "postprocess",
                format!(
                    "mask logits have {} values, [{q}, {}, {}] needs {want}",
                    self.mask_logits.len(),
                    self.geometry.grid.0,
                    self.geometry.grid.1
                ),
            ));
        }
        Ok(self.class_logits.len() / q - 1)
    }

    fn query_logits(&self, q: usize) -> &[f32] {
        let n = self.geometry.grid_len();
        &self.mask_logits[q * n..(q + 1) * n]
    }
}

/// Class probabilities without bg, `[Q, K]`: softmax over the K+1 columns, then the last dropped.
pub fn class_probs(class_logits: &[f32], num_queries: usize) -> Result<Vec<f32>> {
    if num_queries == 0 || !class_logits.len().is_multiple_of(num_queries) {
        return Err(Error::shape(
            "class_probs",
            format!("{} logits for {num_queries} queries", class_logits.len()),
        ));
    }
    let cols = class_logits.len() / num_queries;
    if cols < 2 {
        return Err(Error::shape("class_probs", "need K+1 >= 2 columns"));
    }
    let mut p = class_logits.to_vec();
    softmax_rows(&mut p, cols)?;
    Ok(p.chunks_exact(cols)
        .flat_map(|r| r[..cols - 1].iter().copied())
        .collect())
}

fn check_classes(what: &str, got: usize, k: usize) -> Result<()> {
    if got != k {
        return Err(Error::Input(format!(
            "{what}: {got} classes given but the class logits have {k} (+ bg)"
        )));
    }
    Ok(())
}

/// First maximum of `v` (index, value); `None` when empty.
fn first_argmax(v: impl Iterator<Item = f32>) -> Option<(usize, f32)> {
    v.enumerate().fold(None, |best, (i, x)| match best {
        Some((_, b)) if x > b => Some((i, x)),
        None => Some((i, x)),
        _ => best,
    })
}

/// Binary masks and mean-sigmoid scores of the given queries at image resolution
/// (instance-style: binary = logit > 0; score = Σ sigmoid·binary / (Σ binary + 1e-6)).
fn instance_masks(
    pred: &Prediction,
    resizer: &MaskResizer,
    queries: &[usize],
) -> Result<HashMap<usize, (BitMask, f32)>> {
    let (ih, iw) = pred.geometry.image;
    let maps: Vec<Result<(usize, (BitMask, f32))>> = queries
        .par_iter()
        .map(|&q| {
            let m = resizer.resize_one(pred.query_logits(q))?;
            let bits = BitMask::from_map(ih, iw, &m, |v| v > 0.0)?;
            let (sum, n) = m
                .iter()
                .filter(|&&v| v > 0.0)
                .fold((0f64, 0usize), |(s, n), &v| (s + sigmoid(v) as f64, n + 1));
            let score = sum as f32 / (n as f32 + 1e-6);
            Ok((q, (bits, score)))
        })
        .collect();
    maps.into_iter().collect()
}

/// Binary masks `sigmoid(logit) > 0.5` of the given queries at image resolution.
fn sigmoid_masks(
    pred: &Prediction,
    resizer: &MaskResizer,
    queries: &[usize],
) -> Result<HashMap<usize, BitMask>> {
    let (ih, iw) = pred.geometry.image;
    let maps: Vec<Result<(usize, BitMask)>> = queries
        .par_iter()
        .map(|&q| {
            let m = resizer.resize_one(pred.query_logits(q))?;
            Ok((q, BitMask::from_map(ih, iw, &m, |v| sigmoid(v) > 0.5)?))
        })
        .collect();
    maps.into_iter().collect()
}

fn unique_sorted(mut v: Vec<usize>) -> Vec<usize> {
    v.sort_unstable();
    v.dedup();
    v
}

/// Semantic segmentation (interfaces.md §5.6; `genseg_process_fn`, "sem").
///
/// At canvas resolution `seg[k] = Σ_q p(q,k)·sigmoid(upsampled logit_q)`, then crop and bilinear
/// resize of the class maps to the image, per-pixel argmax over k (first maximum). One mask per
/// class that wins a pixel, in class order; score = mean of that class's resized map over its
/// pixels (the spec's score; the official code reports none).
///
/// Computed in strips of image rows: for each strip only the crop rows it reads are upsampled
/// (all queries), combined with one matrix product and resized, so memory stays
/// `O((Q + K) · rows · neww)` instead of `K · S²`.
pub fn semantic(pred: &Prediction, classes: &[ClassInfo]) -> Result<Vec<MaskResult>> {
    let k = pred.num_classes()?;
    check_classes("semantic", classes.len(), k)?;
    let qn = pred.num_queries;
    let probs = class_probs(pred.class_logits, qn)?;
    // [K, Q] for out[K, N] = pT[K, Q] · sig[Q, N].
    let mut pt = vec![0.0f32; k * qn];
    for q in 0..qn {
        for c in 0..k {
            pt[c * qn + q] = probs[q * k + c];
        }
    }
    let resizer = MaskResizer::new(pred.geometry)?;
    let (ih, iw) = pred.geometry.image;
    let sw = pred.geometry.scaled.1;

    // Strip size: about 48 MB of crop-row buffers.
    let budget_rows = ((48usize << 20) / (4 * sw * (qn + k)).max(1)).max(2);
    let mut labels = vec![0u32; ih * iw];
    let mut sums = vec![0f64; k];
    let mut counts = vec![0usize; k];
    let mut sig: Vec<f32> = Vec::new();
    let mut seg: Vec<f32> = Vec::new();
    let mut y = 0;
    while y < ih {
        // Grow the strip while its crop rows fit the budget (at least one image row).
        let mut end = y + 1;
        while end < ih && resizer.crop_rows_for(y..end + 1).len() <= budget_rows {
            end += 1;
        }
        let cr = resizer.crop_rows_for(y..end);
        let n = cr.len() * sw;
        sig.resize(qn * n, 0.0);
        sig.par_chunks_mut(n).enumerate().for_each(|(q, s)| {
            resizer.crop_rows(pred.query_logits(q), cr.clone(), s);
            s.iter_mut().for_each(|v| *v = sigmoid(*v));
        });
        seg.resize(k * n, 0.0);
        crate::backend::cpu::matmul(&pt, &sig, &mut seg, k, qn, n, false)?;
        // Resize every class map's rows and take the per-pixel argmax.
        let strip: Vec<(Vec<u32>, Vec<f64>, Vec<usize>)> = (y..end)
            .into_par_iter()
            .map(|yy| {
                let mut best_v = vec![f32::NEG_INFINITY; iw];
                let mut best_k = vec![0u32; iw];
                let mut row = vec![0.0f32; iw];
                for c in 0..k {
                    resizer.image_row_from_crop(&seg[c * n..(c + 1) * n], cr.start, yy, &mut row);
                    for x in 0..iw {
                        // First maximum.
                        if c == 0 || row[x] > best_v[x] {
                            best_v[x] = row[x];
                            best_k[x] = c as u32;
                        }
                    }
                }
                let mut s = vec![0f64; k];
                let mut cnt = vec![0usize; k];
                for x in 0..iw {
                    s[best_k[x] as usize] += best_v[x] as f64;
                    cnt[best_k[x] as usize] += 1;
                }
                (best_k, s, cnt)
            })
            .collect();
        for (i, (row, s, cnt)) in strip.into_iter().enumerate() {
            labels[(y + i) * iw..(y + i + 1) * iw].copy_from_slice(&row);
            for c in 0..k {
                sums[c] += s[c];
                counts[c] += cnt[c];
            }
        }
        y = end;
    }

    let mut masks: Vec<BitMask> = (0..k)
        .map(|c| {
            if counts[c] > 0 {
                BitMask::new(ih, iw)
            } else {
                BitMask::new(0, 0)
            }
        })
        .collect();
    for (i, &c) in labels.iter().enumerate() {
        masks[c as usize].set_index(i, true);
    }
    let mut out = Vec::new();
    for (c, mask) in masks.into_iter().enumerate() {
        if counts[c] == 0 {
            continue;
        }
        out.push(MaskResult {
            label: classes[c].name.clone(),
            class_index: c,
            score: (sums[c] / counts[c] as f64) as f32,
            kind: classes[c].kind,
            segment_id: out.len() as u32 + 1,
            mask,
        });
    }
    Ok(out)
}

/// Instance segmentation and VGD (interfaces.md §5.7; `genseg_process_fn` "ins",
/// `vgdseg_process_fn`).
///
/// Candidates: the top-Q `(query, class)` pairs of the flattened `[Q, K]` probabilities. Binary
/// mask = logit > 0 at image resolution; score = p · mean sigmoid inside (eps 1e-6). Kept when
/// the mask is non-empty and `score >= threshold` (compared in f64, as the official
/// `pred_scores[j].item() >= threshold`). Output in score-descending order.
///
/// Deviations: the official top-k is unsorted (`sorted=False`) and its instance list unordered;
/// here the top-Q is taken by (probability desc, flat index asc) and the output sorted by
/// (score desc, query asc, class asc). Masks are computed only for pairs with `p >= threshold`
/// (exact: the mean sigmoid is at most 1, so a pair below cannot reach the threshold).
pub fn instance(
    pred: &Prediction,
    classes: &[ClassInfo],
    threshold: f64,
) -> Result<Vec<MaskResult>> {
    let k = pred.num_classes()?;
    check_classes("instance", classes.len(), k)?;
    let qn = pred.num_queries;
    let probs = class_probs(pred.class_logits, qn)?;
    let mut order: Vec<usize> = (0..qn * k).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    order.truncate(qn);
    let pairs: Vec<usize> = order
        .into_iter()
        .filter(|&f| probs[f] as f64 >= threshold)
        .collect();
    let resizer = MaskResizer::new(pred.geometry)?;
    let queries = unique_sorted(pairs.iter().map(|&f| f / k).collect());
    let masks = instance_masks(pred, &resizer, &queries)?;

    let mut kept: Vec<(usize, f32)> = pairs
        .iter()
        .filter_map(|&f| {
            let (bits, ms) = &masks[&(f / k)];
            let score = probs[f] * ms;
            (!bits.is_clear() && score as f64 >= threshold).then_some((f, score))
        })
        .collect();
    kept.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(kept
        .into_iter()
        .enumerate()
        .map(|(i, (f, score))| {
            let c = f % k;
            MaskResult {
                label: classes[c].name.clone(),
                class_index: c,
                score,
                kind: classes[c].kind,
                segment_id: i as u32 + 1,
                mask: masks[&(f / k)].0.clone(),
            }
        })
        .collect())
}

/// Panoptic segmentation (interfaces.md §5.9; `genseg_process_fn` "pan" → HF `compute_segments`).
///
/// Per query (score, class) = first max over the bg-dropped probabilities; keep `score >
/// threshold` (strict, in f32 as the official tensor comparison). Each kept query's map is
/// `sigmoid(resized logit) · score`; per-pixel argmax over the kept queries (first maximum). In
/// query order a query becomes a segment when its argmax area > 0, `area(map >= 0.5) > 0` and
/// `area / area(map >= 0.5) > 0.8` — the ratio computed in f32 then compared in f64, as
/// `area_ratio.item() > 0.8` on torch's float32 division (so a ratio of exactly 4/5 passes).
/// Stuff classes merge into one segment per class whose score is the creating query's.
///
/// Deviation: HF reuses the merged stuff segment's id as its running counter, so a thing created
/// after a merge can take an id already in use; here ids count segments in creation order
/// (1, 2, 3, ...), one id per segment.
pub fn panoptic(
    pred: &Prediction,
    classes: &[ClassInfo],
    threshold: f64,
) -> Result<Vec<MaskResult>> {
    let k = pred.num_classes()?;
    check_classes("panoptic", classes.len(), k)?;
    let qn = pred.num_queries;
    let probs = class_probs(pred.class_logits, qn)?;
    let thr = threshold as f32;
    // (query, score, class) of the kept queries in query order.
    let kept: Vec<(usize, f32, usize)> = (0..qn)
        .filter_map(|q| {
            let (c, s) = first_argmax(probs[q * k..(q + 1) * k].iter().copied())?;
            (s > thr).then_some((q, s, c))
        })
        .collect();
    if kept.is_empty() {
        return Ok(vec![]);
    }
    let resizer = MaskResizer::new(pred.geometry)?;
    let (ih, iw) = pred.geometry.image;
    let nk = kept.len();

    // Row blocks in parallel: argmax labels and the per-query `map >= 0.5` counts.
    const BLOCK: usize = 16;
    let mut labels = vec![0u32; ih * iw];
    let orig: Vec<usize> = labels
        .par_chunks_mut(BLOCK * iw)
        .enumerate()
        .map(|(b, lab)| {
            let ys = b * BLOCK..(b * BLOCK + lab.len() / iw);
            let mut best = vec![f32::NEG_INFINITY; lab.len()];
            let mut map = vec![0.0f32; lab.len()];
            let mut scratch = Vec::new();
            let mut counts = vec![0usize; nk];
            for (j, &(q, s, _)) in kept.iter().enumerate() {
                resizer.image_rows(pred.query_logits(q), ys.clone(), &mut scratch, &mut map);
                for ((m, bv), l) in map.iter().zip(best.iter_mut()).zip(lab.iter_mut()) {
                    let v = sigmoid(*m) * s;
                    counts[j] += (v >= 0.5) as usize;
                    if j == 0 || v > *bv {
                        *bv = v;
                        *l = j as u32;
                    }
                }
            }
            counts
        })
        .reduce(
            || vec![0usize; nk],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        );
    let mut area = vec![0usize; nk];
    for &l in &labels {
        area[l as usize] += 1;
    }

    // Segments in query order; stuff merged per class.
    let mut seg_of_kept: Vec<Option<usize>> = vec![None; nk];
    let mut segments: Vec<(usize, f32)> = Vec::new(); // (class, score)
    let mut stuff_seg: HashMap<usize, usize> = HashMap::new();
    for (j, &(_, s, c)) in kept.iter().enumerate() {
        let exists = area[j] > 0 && orig[j] > 0 && ((area[j] as f32 / orig[j] as f32) as f64) > 0.8;
        if !exists {
            continue;
        }
        let stuff = classes[c].kind == MaskKind::Stuff;
        let id = match stuff_seg.get(&c) {
            Some(&id) if stuff => id,
            _ => {
                segments.push((c, s));
                segments.len() - 1
            }
        };
        if stuff {
            stuff_seg.insert(c, id);
        }
        seg_of_kept[j] = Some(id);
    }
    let mut masks: Vec<BitMask> = segments.iter().map(|_| BitMask::new(ih, iw)).collect();
    for (i, &l) in labels.iter().enumerate() {
        if let Some(sid) = seg_of_kept[l as usize] {
            masks[sid].set_index(i, true);
        }
    }
    Ok(segments
        .into_iter()
        .zip(masks)
        .enumerate()
        .map(|(i, ((c, s), mask))| MaskResult {
            label: classes[c].name.clone(),
            class_index: c,
            score: s,
            kind: classes[c].kind,
            segment_id: i as u32 + 1,
            mask,
        })
        .collect())
}

/// Referring and reasoning segmentation (interfaces.md §5.11; `refseg_process_fn`).
///
/// Needs exactly one class (the expression) plus bg. q* = first argmax of p(q, 0); score =
/// p(q*); mask = sigmoid(resized logit of q*) > 0.5. Always exactly one mask (possibly empty).
/// Deviation: the official segment id is 0; here 1 (the module's 1-based rule).
pub fn referring(pred: &Prediction, label: &str) -> Result<Vec<MaskResult>> {
    let k = pred.num_classes()?;
    check_classes("referring", 1, k)?;
    let probs = class_probs(pred.class_logits, pred.num_queries)?;
    let (q, score) = first_argmax(probs.iter().copied())
        .ok_or_else(|| Error::shape("referring", "no queries"))?;
    let resizer = MaskResizer::new(pred.geometry)?;
    let mask = sigmoid_masks(pred, &resizer, &[q])?
        .remove(&q)
        .ok_or_else(|| Error::shape("referring", "mask missing"))?;
    Ok(vec![MaskResult {
        label: label.to_string(),
        class_index: 0,
        score,
        kind: MaskKind::Thing,
        segment_id: 1,
        mask,
    }])
}

/// Grounded conversation generation (interfaces.md §5.10; `gcgseg_process_fn`).
///
/// Per phrase k: q_k = first argmax over queries of p(q, k), score = p(q_k, k), binary =
/// sigmoid(resized logit of q_k) > 0.5. The binaries are painted into a label map in phrase
/// order (later phrases overwrite earlier ones) and each phrase's mask is its region of that
/// map. One result per phrase, even when its region ends up empty.
pub fn gcg(pred: &Prediction, phrases: &[String]) -> Result<Vec<MaskResult>> {
    let k = pred.num_classes()?;
    check_classes("gcg", phrases.len(), k)?;
    let qn = pred.num_queries;
    let probs = class_probs(pred.class_logits, qn)?;
    let best: Vec<(usize, f32)> = (0..k)
        .map(|c| {
            first_argmax((0..qn).map(|q| probs[q * k + c]))
                .ok_or_else(|| Error::shape("gcg", "no queries"))
        })
        .collect::<Result<_>>()?;
    let resizer = MaskResizer::new(pred.geometry)?;
    let bins = sigmoid_masks(
        pred,
        &resizer,
        &unique_sorted(best.iter().map(|b| b.0).collect()),
    )?;
    let (ih, iw) = pred.geometry.image;
    let mut masks: Vec<BitMask> = (0..k).map(|_| BitMask::new(ih, iw)).collect();
    let bin_of: Vec<&BitMask> = best.iter().map(|b| &bins[&b.0]).collect();
    // Painting in phrase order = each pixel belongs to the last phrase whose binary covers it.
    for i in 0..ih * iw {
        if let Some(c) = (0..k).rev().find(|&c| bin_of[c].get_index(i)) {
            masks[c].set_index(i, true);
        }
    }
    Ok(masks
        .into_iter()
        .enumerate()
        .map(|(c, mask)| MaskResult {
            label: phrases[c].clone(),
            class_index: c,
            score: best[c].1,
            kind: MaskKind::Thing,
            segment_id: c as u32 + 1,
            mask,
        })
        .collect())
}

/// detectron2 box `(x0, y0, x1, y1)` as f32; all zeros for an empty mask.
fn box_f32(m: &BitMask) -> [f32; 4] {
    m.bbox().map_or([0.0; 4], |(x0, y0, x1, y1)| {
        [x0 as f32, y0 as f32, x1 as f32, y1 as f32]
    })
}

/// detectron2 `pairwise_iou` for one pair, in f32.
fn box_iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let area = |r: [f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    if inter > 0.0 {
        inter / (area(a) + area(b) - inter)
    } else {
        0.0
    }
}

/// Interactive segmentation (interfaces.md §5.8; `intseg_process_fn`).
///
/// Needs exactly one class (the region) plus bg. Candidates as in [`instance`] with `threshold`
/// (compared in f32, as the official tensor comparison); if none passes, the single best pair by
/// (score desc, query asc). Candidates ordered by (score desc, query asc); the first maximum of
/// the box IoU with the prompt's box wins. `prompt` is the visual prompt as preprocessed for the
/// model (NEAREST to the scaled size, optionally zero-padded to the canvas): it is cropped to the
/// scaled size and resized NEAREST (torch rules) to the image, as the official code does.
///
/// Deviations: the official keeps every pair with `score >= threshold` or `score == max` (empty
/// masks included) in unsorted top-k order; here empty masks are not candidates unless the
/// fallback picks one, and the order is fixed as above. Official segment id 0; here 1.
pub fn interactive(
    pred: &Prediction,
    label: &str,
    threshold: f64,
    prompt: &BitMask,
) -> Result<Vec<MaskResult>> {
    let k = pred.num_classes()?;
    check_classes("interactive", 1, k)?;
    let g = pred.geometry;
    let (sh, sw) = g.scaled;
    if prompt.height() < sh || prompt.width() < sw {
        return Err(Error::Input(format!(
            "interactive: the prompt mask is {}x{}, smaller than the scaled size {sh}x{sw}",
            prompt.height(),
            prompt.width()
        )));
    }
    let prompt_box = box_f32(&prompt.crop_resize_nearest(sh, sw, g.image.0, g.image.1)?);
    let qn = pred.num_queries;
    let probs = class_probs(pred.class_logits, qn)?;
    let thr = threshold as f32;
    let resizer = MaskResizer::new(g)?;

    // Pairs with p < threshold cannot pass (score <= p); they are computed only for the fallback.
    let first: Vec<usize> = (0..qn).filter(|&q| probs[q] >= thr).collect();
    let mut masks = instance_masks(pred, &resizer, &first)?;
    let score = |masks: &HashMap<usize, (BitMask, f32)>, q: usize| probs[q] * masks[&q].1;
    let mut cands: Vec<(usize, f32)> = first
        .iter()
        .map(|&q| (q, score(&masks, q)))
        .filter(|&(q, s)| s >= thr && !masks[&q].0.is_clear())
        .collect();
    if cands.is_empty() {
        let rest: Vec<usize> = (0..qn).filter(|q| !masks.contains_key(q)).collect();
        masks.extend(instance_masks(pred, &resizer, &rest)?);
        let best = (0..qn)
            .map(|q| (q, score(&masks, q)))
            .reduce(|a, b| if b.1 > a.1 { b } else { a })
            .ok_or_else(|| Error::shape("interactive", "no queries"))?;
        cands = vec![best];
    }
    cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut win = cands[0];
    let mut win_iou = f32::NEG_INFINITY;
    for &(q, s) in &cands {
        let iou = box_iou(box_f32(&masks[&q].0), prompt_box);
        if iou > win_iou {
            win_iou = iou;
            win = (q, s);
        }
    }
    Ok(vec![MaskResult {
        label: label.to_string(),
        class_index: 0,
        score: win.1,
        kind: MaskKind::Thing,
        segment_id: 1,
        mask: masks[&win.0].0.clone(),
    }])
}
