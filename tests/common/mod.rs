//! Fixture access shared by the encoder and preprocessing tests: the `case*` tensors (u8, i64,
//! f32) straight from the safetensors file, the JSON sidecar, and error measures.
#![allow(dead_code)]

use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

pub fn fixture_path(stem: &str, ext: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{stem}.{ext}"))
}

/// One fixture file held in memory.
pub struct Fixture {
    pub stem: String,
    bytes: Vec<u8>,
    pub json: serde_json::Value,
}

impl Fixture {
    pub fn open(stem: &str) -> Fixture {
        let bytes = std::fs::read(fixture_path(stem, "safetensors")).expect("fixture file");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture_path(stem, "json")).expect("sidecar"))
                .expect("sidecar json");
        Fixture {
            stem: stem.to_string(),
            bytes,
            json,
        }
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("safetensors header")
    }

    pub fn has(&self, name: &str) -> bool {
        self.st().tensor(name).is_ok()
    }

    fn raw(&self, name: &str, dtype: Dtype) -> (Vec<u8>, Vec<usize>) {
        let st = self.st();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("{}: no tensor {name}", self.stem));
        assert_eq!(t.dtype(), dtype, "{}: {name}", self.stem);
        (t.data().to_vec(), t.shape().to_vec())
    }

    pub fn u8(&self, name: &str) -> (Vec<u8>, Vec<usize>) {
        self.raw(name, Dtype::U8)
    }

    pub fn i64(&self, name: &str) -> (Vec<i64>, Vec<usize>) {
        let (b, s) = self.raw(name, Dtype::I64);
        (
            b.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            s,
        )
    }

    pub fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let (b, s) = self.raw(name, Dtype::F32);
        (
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            s,
        )
    }

    /// `case{n}.image` as an RGB image.
    pub fn image(&self, case: usize) -> xsam::image::RgbImage {
        let (d, s) = self.u8(&format!("case{case}.image"));
        xsam::image::RgbImage::new(s[1], s[0], d).unwrap()
    }

    pub fn cases(&self) -> &Vec<serde_json::Value> {
        self.json["cases"].as_array().expect("cases")
    }

    /// The `config` section as an xsam config JSON string.
    pub fn config_json(&self) -> String {
        self.json["config"].to_string()
    }
}

/// `||a - b|| / ||b||` in f64.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .fold(0.0, f64::max)
}

/// The tiny preset with this fixture's `sam` / `vision` sections swapped in, through the real
/// config parser (unvalidated: the preset's other sections refer to its own layer counts).
pub fn config_from(fx: &Fixture) -> xsam::Config {
    let mut v: serde_json::Value =
        serde_json::from_str(&xsam::Config::preset("tiny").unwrap().to_json_string()).unwrap();
    for sec in ["sam", "vision"] {
        if let Some(s) = fx.json["config"].get(sec) {
            v[sec] = s.clone();
        }
    }
    xsam::Config::parse_unvalidated(&v.to_string(), &fx.stem).unwrap()
}

/// The fixture's tensor as an xsam f32 tensor.
pub fn tensor(fx: &Fixture, name: &str) -> xsam::Tensor {
    let (d, s) = fx.f32(name);
    xsam::Tensor::from_f32(d, s).unwrap()
}

/// The encoders' tensors of a random model for `cfg`, in memory: the same generator, names,
/// shapes and bf16 values `xsam init` writes (src/init.rs), without the 9 GB round trip
/// through the disk. Only tensors inference reads (`needed`) under the two encoder scopes.
pub fn random_encoder_weights(cfg: &xsam::Config, seed: u64) -> xsam::Weights {
    use xsam::weights::TensorSource;
    let tensors: Vec<(String, xsam::Tensor)> = xsam::model::checkpoint_tensors(cfg)
        .into_iter()
        .filter(|s| {
            s.needed
                && (s.name.starts_with("segmentor.encoder.")
                    || s.name.starts_with("visual_encoder.vision_model."))
        })
        .map(|spec| {
            let (name, shape) = (spec.name.clone(), spec.shape.clone());
            let src = xsam::init::RandomTensor::new(spec, seed);
            let mut bytes = Vec::new();
            src.write_data(&mut bytes).unwrap();
            let data: Vec<half::bf16> = bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                .collect();
            (name, xsam::Tensor::from_vec(data, shape).unwrap())
        })
        .collect();
    xsam::Weights::from_tensors(tensors, "random encoder weights")
}

/// A deterministic smooth test picture with edges (`width x height`).
pub fn test_picture(width: usize, height: usize) -> xsam::image::RgbImage {
    let mut data = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let (fx, fy) = (x as f32 / width as f32, y as f32 / height as f32);
            let edge = if (x / 37 + y / 53) % 2 == 0 {
                40.0
            } else {
                0.0
            };
            data.push((200.0 * fx + edge) as u8);
            data.push((180.0 * fy + edge) as u8);
            data.push((120.0 + 100.0 * (fx * 9.0).sin() * (fy * 7.0).cos()) as u8);
        }
    }
    xsam::image::RgbImage::new(width, height, data).unwrap()
}
