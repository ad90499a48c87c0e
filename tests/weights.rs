//! Weights loading (single file, sharded), scoped lookup, and clear errors for every kind of bad
//! file or config. Every failure here is a `Result`, never a panic.

use half::{bf16, f16};
use std::path::{Path, PathBuf};
use xsam::weights::{
    write_model_weights, write_safetensors, NamedSource, TensorSource, INDEX_FILE,
};
use xsam::{Config, DType, Error, Tensor, Weights};

fn sample_tensors() -> Vec<(String, Tensor)> {
    vec![
        (
            "enc.layers.0.w".to_string(),
            Tensor::from_f32((0..6).map(|x| x as f32).collect(), [2, 3]).unwrap(),
        ),
        (
            "enc.layers.0.b".to_string(),
            Tensor::from_vec(vec![bf16::from_f32(1.5), bf16::from_f32(-2.0)], [2]).unwrap(),
        ),
        (
            "enc.layers.1.w".to_string(),
            Tensor::from_vec(
                (0..4)
                    .map(|x| f16::from_f32(x as f32 * 0.25))
                    .collect::<Vec<_>>(),
                [2, 2],
            )
            .unwrap(),
        ),
        (
            "head.scale".to_string(),
            Tensor::from_f32(vec![2.5], [1]).unwrap(),
        ),
    ]
}

fn named(ts: &[(String, Tensor)]) -> Vec<NamedSource<'_>> {
    ts.iter()
        .map(|(n, t)| NamedSource::new(n.clone(), t as &dyn TensorSource))
        .collect()
}

fn write_single(dir: &Path) -> PathBuf {
    let ts = sample_tensors();
    let path = dir.join("model.safetensors");
    write_safetensors(&path, &named(&ts), None, &mut |_| {}).unwrap();
    path
}

fn weights_err(r: xsam::Result<Weights>) -> Error {
    match r {
        Ok(w) => panic!("expected an error, loaded {w:?}"),
        Err(e) => e,
    }
}

#[test]
fn single_file_roundtrip_and_scoped_lookup() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_single(dir.path());
    for w in [
        Weights::load(&path).unwrap(),
        Weights::load(dir.path()).unwrap(),
    ] {
        assert_eq!(w.len(), 4);
        let t = w.get("enc.layers.0.w", &[2, 3]).unwrap();
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(t.to_vec_f32().unwrap(), vec![0., 1., 2., 3., 4., 5.]);

        let vb = w.pp("enc").pp("layers").pp(0);
        assert_eq!(vb.prefix(), "enc.layers.0");
        assert!(vb.contains("w") && vb.contains("b") && !vb.contains("x"));
        let b = vb.get("b", &[2]).unwrap();
        assert_eq!(b.dtype(), DType::BF16);
        assert_eq!(b.to_vec_f32().unwrap(), vec![1.5, -2.0]);
        let bf = vb.get_f32("b", &[2]).unwrap();
        assert_eq!(bf.dtype(), DType::F32);
        assert_eq!(bf.f32s().unwrap(), &[1.5, -2.0]);

        let h = w.pp("enc.layers.1").get_any("w").unwrap();
        assert_eq!(h.dtype(), DType::F16);
        assert_eq!(h.dims(), &[2, 2]);
        assert_eq!(h.to_vec_f32().unwrap(), vec![0.0, 0.25, 0.5, 0.75]);
        assert_eq!(
            w.root()
                .get("head.scale", &[1])
                .unwrap()
                .to_scalar_f32()
                .unwrap(),
            2.5
        );

        let info = w.info("enc.layers.0.b").unwrap();
        assert_eq!(info.shape, vec![2]);
        assert_eq!(info.dtype, Some(DType::BF16));
    }
}

#[test]
fn sharded_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let ts = sample_tensors();
    // 24 bytes per shard: the f32 [2,3] tensor alone fills one.
    let out = write_model_weights(dir.path(), &named(&ts), 24, &mut |_| {}).unwrap();
    assert_eq!(out.files.len(), 2, "{:?}", out.files);
    assert_eq!(out.data_bytes, 24 + 4 + 8 + 4);
    let index = out.index.clone().unwrap();
    assert!(index.ends_with(INDEX_FILE));
    let idx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    assert_eq!(idx["metadata"]["total_size"], 40);
    assert_eq!(idx["weight_map"].as_object().unwrap().len(), 4);
    let first = out.files[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(first.starts_with("model-00001-of-0000"), "{first}");

    for w in [
        Weights::load(dir.path()).unwrap(),
        Weights::load(&index).unwrap(),
    ] {
        assert_eq!(w.len(), 4);
        assert_eq!(w.files().len(), out.files.len());
        for (n, t) in &ts {
            let got = w.get(n, t.dims()).unwrap();
            assert_eq!(got.dtype(), t.dtype());
            assert_eq!(got.to_vec_f32().unwrap(), t.to_vec_f32().unwrap());
        }
    }
    // A limit large enough for everything gives the single file.
    let dir2 = tempfile::tempdir().unwrap();
    let out2 = write_model_weights(dir2.path(), &named(&ts), 1 << 20, &mut |_| {}).unwrap();
    assert!(out2.index.is_none());
    assert!(dir2.path().join("model.safetensors").is_file());
}

#[test]
fn truncated_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_single(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let cuts = [
        0,
        1,
        4,
        7,
        8,
        9,
        8 + n / 2,
        8 + n - 1,
        8 + n,
        8 + n + 1,
        bytes.len() - 1,
    ];
    for &cut in &cuts {
        let p = dir.path().join(format!("cut{cut}.safetensors"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = weights_err(Weights::load(&p));
        assert!(matches!(e, Error::Weights { .. }), "cut {cut}: {e:?}");
        assert!(e.is_user_input());
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("cut{cut}.safetensors")),
            "cut {cut}: {msg}"
        );
        assert!(msg.contains("truncated"), "cut {cut}: {msg}");
    }
    // Trailing garbage is named as such.
    let p = dir.path().join("long.safetensors");
    let mut long = bytes.clone();
    long.extend_from_slice(&[0; 3]);
    std::fs::write(&p, &long).unwrap();
    let msg = weights_err(Weights::load(&p)).to_string();
    assert!(msg.contains("trailing"), "{msg}");
}

/// A file with a hand-written header and `data_len` zero bytes of data.
fn raw_file(dir: &Path, name: &str, header: &[u8], data_len: usize) -> PathBuf {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.extend(std::iter::repeat_n(0u8, data_len));
    let p = dir.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

#[test]
fn bad_headers_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Header length larger than the file.
    let mut b = 1_000_000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    let p = d.join("long_header.safetensors");
    std::fs::write(&p, b).unwrap();
    let msg = weights_err(Weights::load(&p)).to_string();
    assert!(
        msg.contains("header length 1000000") && msg.contains("past the end"),
        "{msg}"
    );

    // Absurd header length (u64::MAX).
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    let p = d.join("huge_header.safetensors");
    std::fs::write(&p, b).unwrap();
    assert!(matches!(
        weights_err(Weights::load(&p)),
        Error::Weights { .. }
    ));

    // Bad JSON.
    let p = raw_file(d, "bad_json.safetensors", b"{\"a\": {\"dtype\": ", 0);
    let msg = weights_err(Weights::load(&p)).to_string();
    assert!(msg.contains("not valid safetensors JSON"), "{msg}");

    // Valid JSON, not a safetensors header.
    let p = raw_file(d, "not_header.safetensors", b"[1, 2, 3]", 0);
    assert!(matches!(
        weights_err(Weights::load(&p)),
        Error::Weights { .. }
    ));

    // Not UTF-8.
    let p = raw_file(d, "binary.safetensors", &[0xff, 0xfe, 0x00, 0x01], 0);
    let msg = weights_err(Weights::load(&p)).to_string();
    assert!(msg.contains("UTF-8"), "{msg}");

    // Data offsets past the end of the file.
    let h = br#"{"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#;
    let p = raw_file(d, "short_data.safetensors", h, 8);
    let msg = weights_err(Weights::load(&p)).to_string();
    assert!(
        msg.contains("truncated") && msg.contains("16 bytes"),
        "{msg}"
    );

    // Offsets inconsistent with the shape.
    let h = br#"{"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}"#;
    let p = raw_file(d, "bad_size.safetensors", h, 12);
    let msg = weights_err(Weights::load(&p)).to_string();
    assert!(msg.contains("does not match its shape"), "{msg}");

    // Overlapping / gapped offsets.
    let h = br#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}"#;
    let p = raw_file(d, "gap.safetensors", h, 12);
    assert!(matches!(
        weights_err(Weights::load(&p)),
        Error::Weights { .. }
    ));

    // Shape whose size overflows.
    let h =
        br#"{"a": {"dtype": "F32", "shape": [18446744073709551615, 2], "data_offsets": [0, 4]}}"#;
    let p = raw_file(d, "overflow.safetensors", h, 4);
    assert!(matches!(
        weights_err(Weights::load(&p)),
        Error::Weights { .. }
    ));

    // Not a file at all.
    let e = weights_err(Weights::load(d.join("absent.safetensors")));
    assert!(e.to_string().contains("absent.safetensors"), "{e}");
    // An empty directory.
    let empty = d.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let msg = weights_err(Weights::load(&empty)).to_string();
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn unsupported_dtype_and_unaligned_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // An I64 tensor loads (it may be an unused buffer) but cannot be read.
    let h = br#"{"ids": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}"#;
    let p = raw_file(d, "i64.safetensors", h, 16);
    let w = Weights::load(&p).unwrap();
    let info = w.info("ids").unwrap();
    assert_eq!(info.dtype, None);
    assert_eq!(info.dtype_name, "I64");
    let msg = w.get_any("ids").unwrap_err().to_string();
    assert!(msg.contains("ids") && msg.contains("I64"), "{msg}");

    // Header of odd length (7 bytes of JSON would not parse; pad to 61 with a space): the bf16
    // data then starts at an odd offset and must be copied, not viewed.
    let mut h = br#"{"x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}"#.to_vec();
    if h.len().is_multiple_of(2) {
        h.push(b' ');
    }
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(&h);
    for v in [1.0f32, -3.0, 0.5] {
        b.extend_from_slice(&bf16::from_f32(v).to_le_bytes());
    }
    let p = d.join("unaligned.safetensors");
    std::fs::write(&p, b).unwrap();
    let w = Weights::load(&p).unwrap();
    let t = w.get("x", &[3]).unwrap();
    assert_eq!(t.to_vec_f32().unwrap(), vec![1.0, -3.0, 0.5]);
    assert_eq!(
        w.get_f32("x", &[3]).unwrap().f32s().unwrap(),
        &[1.0, -3.0, 0.5]
    );
}

#[test]
fn missing_and_misshaped_tensors_name_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_single(dir.path());
    let w = Weights::load(&path).unwrap();
    let vb = w.pp("enc.layers.0");

    let e = vb.get("nope", &[1]).unwrap_err();
    match &e {
        Error::MissingTensor { name, location } => {
            assert_eq!(name, "enc.layers.0.nope");
            assert!(location.contains("model.safetensors"));
        }
        other => panic!("{other:?}"),
    }
    assert!(e.is_user_input());
    assert!(e.to_string().contains("enc.layers.0.nope"));
    assert!(vb.get_any("nope").is_err());

    let e = vb.get("w", &[3, 2]).unwrap_err();
    match &e {
        Error::TensorShape {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, "enc.layers.0.w");
            assert_eq!(expected, &vec![3, 2]);
            assert_eq!(found, &vec![2, 3]);
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("enc.layers.0.w") && msg.contains("[3, 2]") && msg.contains("[2, 3]"),
        "{msg}"
    );
    assert!(vb.get_f32("w", &[6]).is_err());
}

#[test]
fn broken_sharded_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ts = sample_tensors();
    let out = write_model_weights(d, &named(&ts), 24, &mut |_| {}).unwrap();

    // A shard listed in the index is missing.
    let gone = out.files[1].clone();
    let saved = std::fs::read(&gone).unwrap();
    std::fs::remove_file(&gone).unwrap();
    let msg = weights_err(Weights::load(d)).to_string();
    let gone_name = gone.file_name().unwrap().to_string_lossy().into_owned();
    assert!(msg.contains(&gone_name) && msg.contains("missing"), "{msg}");
    std::fs::write(&gone, saved).unwrap();
    Weights::load(d).unwrap();

    let index_path = d.join(INDEX_FILE);
    let good_index = std::fs::read_to_string(&index_path).unwrap();

    // The index puts a tensor in the wrong shard.
    let mut v: serde_json::Value = serde_json::from_str(&good_index).unwrap();
    let other = out.files[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    v["weight_map"]["head.scale"] = serde_json::Value::String(other);
    std::fs::write(&index_path, v.to_string()).unwrap();
    let msg = weights_err(Weights::load(d)).to_string();
    assert!(msg.contains("head.scale"), "{msg}");

    // A shard name that walks out of the directory.
    let mut v: serde_json::Value = serde_json::from_str(&good_index).unwrap();
    v["weight_map"]["head.scale"] = serde_json::Value::String("../x.safetensors".into());
    std::fs::write(&index_path, v.to_string()).unwrap();
    let msg = weights_err(Weights::load(d)).to_string();
    assert!(msg.contains("not a plain file name"), "{msg}");

    // Bad index JSON, and an index without weight_map.
    std::fs::write(&index_path, "{ nope").unwrap();
    let msg = weights_err(Weights::load(d)).to_string();
    assert!(msg.contains("index") && msg.contains("JSON"), "{msg}");
    std::fs::write(&index_path, r#"{"metadata": {}}"#).unwrap();
    let msg = weights_err(Weights::load(d)).to_string();
    assert!(msg.contains("weight_map"), "{msg}");

    // A truncated shard.
    std::fs::write(&index_path, &good_index).unwrap();
    let bytes = std::fs::read(&out.files[0]).unwrap();
    std::fs::write(&out.files[0], &bytes[..bytes.len() - 2]).unwrap();
    let msg = weights_err(Weights::load(d)).to_string();
    assert!(msg.contains("truncated"), "{msg}");
}

#[test]
fn duplicate_names_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_single(dir.path());
    let b = dir.path().join("b.safetensors");
    std::fs::copy(&a, &b).unwrap();
    let e = weights_err(Weights::from_files(&[a, b]));
    assert!(e.to_string().contains("also appears"), "{e}");
}

#[test]
fn writer_rejects_inconsistent_sources() {
    struct Liar;
    impl TensorSource for Liar {
        fn dtype(&self) -> DType {
            DType::F32
        }
        fn shape(&self) -> &[usize] {
            &[4]
        }
        fn write_data(&self, out: &mut dyn std::io::Write) -> xsam::Result<()> {
            out.write_all(&[0; 8]).map_err(|e| Error::io("liar", e))
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("liar.safetensors");
    let e = write_safetensors(&p, &[NamedSource::new("x", &Liar)], None, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("wrote 8 bytes"), "{e}");
    assert!(!p.exists(), "no partial file under the final name");
    let t = Tensor::from_f32(vec![1.0], [1]).unwrap();
    let dup = [NamedSource::new("x", &t), NamedSource::new("x", &t)];
    assert!(write_safetensors(&p, &dup, None, &mut |_| {}).is_err());
}

// ------------------------------------------------------------------------------- config

fn config_problems(json: &str) -> Vec<String> {
    match Config::from_json_str(json) {
        Err(Error::Config { problems, .. }) => problems,
        Err(other) => panic!("expected Error::Config, got {other:?}"),
        Ok(_) => panic!("expected an invalid config"),
    }
}

fn tiny_json() -> serde_json::Value {
    serde_json::to_value(Config::preset("tiny").unwrap()).unwrap()
}

#[test]
fn bad_config_reports_every_problem() {
    let mut v = tiny_json();
    v["llm"]["num_attention_heads"] = 5.into(); // 64 % 5
    v["sam"]["image_size"] = 100.into(); // 100 % 16
    v["sam"]["global_attn_indexes"] = serde_json::json!([1, 7]); // 7 >= 4 layers
    v["connector"]["select_layers"] = serde_json::json!([2, 9]); // 9 > 4, and len 2 != 3
    v["connector"]["scale_factors"] = serde_json::json!([2.0, 1.0, 0.25]);
    v["projector"]["seg_select_layer"] = (-9).into();
    v["vision"]["select_layer"] = 4.into(); // 3 layers -> 0..=3
    v["decoder"]["encoder_n_points"] = 8.into();
    v["decoder"]["num_feature_levels"] = 4.into();
    v["decoder"]["group_norm_groups"] = 5.into();
    v["decoder"]["decoder_layers"] = 0.into();
    v["tokens"]["seg"] = 40000.into();
    v["llm"]["sliding_window"] = 0.into();
    let problems = config_problems(&v.to_string());
    let all = problems.join("\n");
    for needle in [
        "llm.hidden_size 64 is not divisible by llm.num_attention_heads 5",
        "sam.image_size 100 is not a positive multiple of sam.patch_size 16",
        "sam.global_attn_indexes[1] = 7",
        "connector.select_layers has 2 entries",
        "connector.select_layers[1] = 9",
        "connector.scale_factors[2] must be 2, 1 or 0.5",
        "projector.seg_select_layer -9",
        "vision.select_layer 4",
        "decoder.encoder_n_points must be 4",
        "decoder.num_feature_levels must be 3",
        "decoder.group_norm_groups 5 does not divide decoder.hidden_dim 32",
        "decoder.decoder_layers must be at least 1",
        "tokens.seg = 40000",
        "llm.sliding_window must be at least 1",
    ] {
        assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
    }
    // The Display lists them one per line, with the origin.
    let e = Config::from_json_str(&v.to_string()).unwrap_err();
    assert!(e.is_user_input());
    assert!(e.to_string().contains("<string>"));
    assert_eq!(e.to_string().lines().count(), problems.len() + 1);
}

#[test]
fn more_geometry_checks() {
    let mut v = tiny_json();
    v["llm"]["num_attention_heads"] = 64.into(); // head dim 1: odd, no RoPE
    v["llm"]["num_key_value_heads"] = 3.into();
    v["sam"]["num_attention_heads"] = 3.into();
    v["sam"]["image_size"] = 112.into(); // grid 7: odd, cannot shuffle down
    v["connector"]["scale_factors"] = serde_json::json!([0.5, 1.0, 2.0]);
    v["model_type"] = "llava".into();
    let all = config_problems(&v.to_string()).join("\n");
    for needle in [
        "must be even for RoPE",
        "not a multiple of llm.num_key_value_heads 3",
        "sam.hidden_size 32 is not divisible by sam.num_attention_heads 3",
        "needs an even SAM grid",
        "must decrease",
        "model_type",
    ] {
        assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
    }
}

#[test]
fn config_json_type_errors_name_the_field() {
    let mut v = tiny_json();
    v["sam"]["window_size"] = "14".into();
    v["llm"].as_object_mut().unwrap().remove("hidden_size");
    v["decoder"]["num_queries"] = (-3).into();
    v["vision"]["resample"] = "nearest".into();
    v["llm"]["hiden_size"] = 64.into();
    v.as_object_mut().unwrap().remove("tokens");
    let all = config_problems(&v.to_string()).join("\n");
    for needle in [
        "sam.window_size: invalid type: string \"14\"",
        "llm.hidden_size: missing",
        "decoder.num_queries: invalid value: integer `-3`",
        "vision.resample: unknown variant `nearest`",
        "llm.hiden_size: unknown field",
        "section `tokens`: missing",
    ] {
        assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
    }
    // Not JSON at all; not an object; optional field defaults.
    let p = config_problems("{ \"model_type\": ");
    assert!(p[0].contains("not valid JSON"), "{p:?}");
    let p = config_problems("[]");
    assert!(p[0].contains("object"), "{p:?}");
    let mut v = tiny_json();
    v["vision"].as_object_mut().unwrap().remove("resample");
    let c = Config::from_json_str(&v.to_string()).unwrap();
    assert_eq!(c.vision.resample, xsam::model::Resample::Bilinear);
}

#[test]
fn config_load_from_file_and_dir() {
    let dir = tempfile::tempdir().unwrap();
    let c = Config::preset("tiny").unwrap();
    c.save(dir.path().join("config.json")).unwrap();
    assert_eq!(Config::load(dir.path()).unwrap(), c);
    assert_eq!(Config::load(dir.path().join("config.json")).unwrap(), c);
    let e = Config::load(dir.path().join("nope.json")).unwrap_err();
    assert!(
        e.is_user_input() && e.to_string().contains("nope.json"),
        "{e}"
    );
    std::fs::write(dir.path().join("bad.json"), "{\"model_type\": \"xsam\"}").unwrap();
    let e = Config::load(dir.path().join("bad.json")).unwrap_err();
    assert!(
        e.to_string().contains("bad.json") && e.to_string().contains("section `llm`"),
        "{e}"
    );
}
