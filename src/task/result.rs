//! The result JSON of interfaces.md §4.
//!
//! Keys, in this order: `task`, `text`, `token_ids`, `image {width, height}`, `masks [{label,
//! class_index, score, kind, segment_id, rle {size, counts}}]`, `timings_ms {stage: ms}`.
//! Scores are rounded to 6 decimals (§5.14; the same value as Python's `round(float(s), 6)`).
//! `segment_id` is written for every task: the panoptic segment id for panoptic, else the
//! 1-based position in `masks` (so referring / reasoning / interactive always have 1, as in the
//! §4 example). `kind` is `thing` except for stuff classes (panoptic, or semantic / instance
//! given `--stuff`). Timings keep the order they were recorded in.

use super::postprocess::{MaskKind, MaskResult};
use super::rle::{encode, Rle};
use crate::{Error, Result};
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultJson {
    pub task: String,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub image: ImageSize,
    pub masks: Vec<MaskJson>,
    pub timings_ms: Timings,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSize {
    pub width: usize,
    pub height: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaskJson {
    pub label: String,
    pub class_index: usize,
    pub score: f64,
    pub kind: MaskKind,
    pub segment_id: u32,
    pub rle: Rle,
}

/// Stage timings in milliseconds, serialised as a JSON object in insertion order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timings(pub Vec<(String, f64)>);

impl Timings {
    pub fn push(&mut self, stage: impl Into<String>, ms: f64) {
        self.0.push((stage.into(), ms));
    }
}

impl Serialize for Timings {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Timings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Timings;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of stage name to milliseconds")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<Timings, A::Error> {
                let mut t = Timings::default();
                while let Some((k, v)) = a.next_entry::<String, f64>()? {
                    t.0.push((k, v));
                }
                Ok(t)
            }
        }
        d.deserialize_map(V)
    }
}

/// `round(x, 6)` as Python does it for the f32 score widened to f64 (correctly rounded decimal).
pub fn round6(x: f32) -> f64 {
    let x = x as f64;
    if !x.is_finite() {
        return x;
    }
    format!("{x:.6}").parse().unwrap_or(x)
}

impl MaskJson {
    pub fn from_result(r: &MaskResult) -> Self {
        Self {
            label: r.label.clone(),
            class_index: r.class_index,
            score: round6(r.score),
            kind: r.kind,
            segment_id: r.segment_id,
            rle: encode(&r.mask),
        }
    }
}

impl ResultJson {
    /// The §4 document for one run; `width`, `height` are the original image's.
    pub fn new(
        task: impl Into<String>,
        text: impl Into<String>,
        token_ids: Vec<u32>,
        width: usize,
        height: usize,
        masks: &[MaskResult],
        timings_ms: Timings,
    ) -> Self {
        Self {
            task: task.into(),
            text: text.into(),
            token_ids,
            image: ImageSize { width, height },
            masks: masks.iter().map(MaskJson::from_result).collect(),
            timings_ms,
        }
    }

    pub fn to_json_string(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::Input(format!("result JSON: {e}")))
    }

    pub fn to_json_pretty(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::Input(format!("result JSON: {e}")))
    }
}
