//! `xsam convert`: the `torch.save` reader against files written by torch itself
//! (`reference/make_fixtures_convert.py`), the conversion to a model directory, and the errors.

use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use xsam::convert::{convert_checkpoint, plan_conversion, ConvertOptions};
use xsam::model::check_weights;
use xsam::model::names::checkpoint_tensors;
use xsam::tokenizer::{check_tokenizer, load_tokenizer, synthesize_base_tokenizer};
use xsam::weights::torch::{bf16_bits_from_f32, TorchCheckpoint, TorchDType};
use xsam::{Config, DType, Error, Weights};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/convert")
        .join(name)
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The micro geometry of `micro_manifest.json` (the config the micro checkpoint was made for).
fn micro_config() -> Config {
    let m = json(&fixture("micro_manifest.json"));
    Config::from_json_str(&m["config"].to_string()).unwrap()
}

fn msg(e: &Error) -> String {
    e.to_string()
}

/// Writes the base (32011-token) tokenizer into `dir`.
fn base_tokenizer(dir: &Path) -> PathBuf {
    let p = dir.join("phi3_tokenizer.json");
    synthesize_base_tokenizer()
        .unwrap()
        .save(&p, false)
        .unwrap();
    p
}

fn micro_opts() -> ConvertOptions {
    ConvertOptions {
        config: Some(micro_config()),
        ..ConvertOptions::default()
    }
}

// ------------------------------------------------------------------------------------ manifest

/// Regenerates the tensor list of `micro_manifest.json` from its config (run after a change of
/// the tensor table, then rerun `reference/make_fixtures_convert.py`).
#[test]
#[ignore]
fn write_micro_manifest() {
    let path = fixture("micro_manifest.json");
    let m = json(&path);
    let cfg = micro_config();
    // The config as it is (pretty), then one tensor per line so diffs stay readable.
    let lines: Vec<String> = checkpoint_tensors(&cfg)
        .iter()
        .map(|s| {
            serde_json::json!({"name": s.name, "shape": s.shape, "needed": s.needed}).to_string()
        })
        .collect();
    let text = format!(
        "{{\n\"config\": {},\n\"tensors\": [\n{}\n]\n}}\n",
        serde_json::to_string_pretty(&m["config"]).unwrap(),
        lines.join(",\n")
    );
    std::fs::write(&path, text).unwrap();
}

#[test]
fn micro_manifest_matches_the_table() {
    let m = json(&fixture("micro_manifest.json"));
    let cfg = micro_config();
    let table: Vec<(String, Vec<usize>, bool)> = checkpoint_tensors(&cfg)
        .into_iter()
        .map(|s| (s.name, s.shape, s.needed))
        .collect();
    let listed: Vec<(String, Vec<usize>, bool)> = m["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                serde_json::from_value(t["shape"].clone()).unwrap(),
                t["needed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed, table,
        "the tensor table changed: run `cargo test --test convert -- --ignored \
         write_micro_manifest`, then `.venv-ref/bin/python reference/make_fixtures_convert.py`"
    );
}

// ------------------------------------------------------------------------------------ reader

const READER_FILES: [&str; 4] = [
    "reader_flat.bin",
    "reader_module.bin",
    "reader_prefixed.bin",
    "reader_deflated.bin",
];

fn expected_reader() -> (Vec<u8>, Vec<String>) {
    let bytes = std::fs::read(fixture("reader_expected.safetensors")).unwrap();
    let names = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(|s| s.to_string())
        .collect();
    (bytes, names)
}

fn st_dtype(d: safetensors::Dtype) -> TorchDType {
    match d {
        safetensors::Dtype::F64 => TorchDType::F64,
        safetensors::Dtype::F32 => TorchDType::F32,
        safetensors::Dtype::F16 => TorchDType::F16,
        safetensors::Dtype::BF16 => TorchDType::BF16,
        safetensors::Dtype::I64 => TorchDType::I64,
        other => panic!("unexpected dtype {other:?}"),
    }
}

#[test]
fn reader_matches_torch_bit_exact_in_every_wrapping() {
    let (bytes, names) = expected_reader();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let originals: Vec<&String> = names.iter().filter(|n| !n.starts_with("bf16.")).collect();
    assert_eq!(originals.len(), 15);
    for file in READER_FILES {
        let ck = TorchCheckpoint::open(fixture(file)).unwrap();
        assert_eq!(ck.len(), originals.len(), "{file}");
        match file {
            "reader_module.bin" => assert_eq!(ck.wrapper(), Some("module")),
            _ => assert_eq!(ck.wrapper(), None, "{file}"),
        }
        assert_eq!(ck.stripped_module_prefix(), file == "reader_prefixed.bin");
        assert!(ck.non_tensor_keys().is_empty(), "{file}");
        for name in &originals {
            let want = st.tensor(name).unwrap();
            let t = ck
                .get(name)
                .unwrap_or_else(|| panic!("{file}: missing {name}"));
            assert_eq!(t.dtype, st_dtype(want.dtype()), "{file} {name}");
            assert_eq!(t.shape, want.shape(), "{file} {name}");
            let got = ck.read_bytes(name).unwrap();
            assert!(got == want.data(), "{file} {name}: bytes differ");
            // Stored entries are read in place; the deflated copy from memory.
            assert_eq!(
                ck.reads_in_place(name),
                Some(file != "reader_deflated.bin"),
                "{file} {name}"
            );
        }
    }
}

#[test]
fn reader_views_and_shared_storage() {
    let ck = TorchCheckpoint::open(fixture("reader_flat.bin")).unwrap();
    assert!(ck.archive_dir().ends_with('/'));
    let lin2 = ck
        .get("segmentor.encoder.layers.0.mlp.lin2.weight")
        .unwrap();
    assert_eq!(
        (lin2.shape.as_slice(), lin2.stride.as_slice()),
        (&[32, 64][..], &[1, 32][..])
    );
    assert!(!lin2.is_contiguous());
    let pos = ck.get("segmentor.encoder.pos_embed").unwrap();
    assert_eq!(pos.shape, [1, 8, 8, 32]);
    assert!(!pos.is_contiguous());
    let a = ck.get("segmentor.decoder.queries_embedder.weight").unwrap();
    let b = ck.get("segmentor.decoder.queries_features.weight").unwrap();
    assert_eq!(a.storage, b.storage);
    assert_eq!((a.offset, b.offset), (64, 384));
    let strided = ck
        .get("segmentor.encoder.layers.0.layer_norm1.weight")
        .unwrap();
    assert_eq!((strided.stride[0], strided.offset), (2, 1));
    let empty = ck.get("extra.empty").unwrap();
    assert_eq!((empty.shape.as_slice(), empty.numel()), (&[0, 4][..], 0));
    assert!(ck.get("extra.scalar").unwrap().shape.is_empty());
    assert_eq!(
        ck.get("extra.num_batches_tracked").unwrap().dtype,
        TorchDType::I64
    );
    // 15 tensors, 14 storages (the two slices share one).
    assert_eq!(ck.num_storages(), 14);

    // read() gives runtime tensors for f32 / f16 / bf16, in the stored dtype.
    let t = ck
        .read("segmentor.decoder.queries_features.weight")
        .unwrap();
    assert_eq!((t.dtype(), t.dims()), (DType::BF16, &[10, 32][..]));
    let t = ck
        .read("segmentor.encoder.layers.0.mlp.lin2.weight")
        .unwrap();
    assert_eq!((t.dtype(), t.dims()), (DType::F32, &[32, 64][..]));
    // int64 and f64 cannot be read as runtime tensors; converting int64 is an error.
    let e = ck.read("extra.num_batches_tracked").unwrap_err();
    assert!(msg(&e).contains("int64"), "{e}");
    let e = ck
        .source("extra.num_batches_tracked", DType::BF16)
        .err()
        .unwrap();
    assert!(msg(&e).contains("only floating-point"), "{e}");
    let e = ck.read("no.such.tensor").unwrap_err();
    assert!(matches!(e, Error::MissingTensor { .. }), "{e}");
}

#[test]
fn bf16_conversion_matches_torch() {
    let (bytes, names) = expected_reader();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut n = 0;
    for file in READER_FILES {
        let ck = TorchCheckpoint::open(fixture(file)).unwrap();
        for name in names.iter().filter_map(|n| n.strip_prefix("bf16.")) {
            let want = st.tensor(&format!("bf16.{name}")).unwrap();
            let got = ck.read_as(name, DType::BF16).unwrap();
            assert_eq!(got.dims(), want.shape(), "{name}");
            let got: Vec<u16> = bytemuck::pod_collect_to_vec(&got.to_bytes().unwrap());
            let want: Vec<u16> = bytemuck::pod_collect_to_vec(want.data());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // Bit-exact, except that NaN bits are path-dependent in torch itself.
                let nan = |b: u16| b & 0x7F80 == 0x7F80 && b & 0x7F != 0;
                assert!(
                    g == w || (nan(*g) && nan(*w)),
                    "{file} {name}[{i}]: {g:#06x}, torch {w:#06x}"
                );
            }
            assert_eq!(got.len(), want.len());
            n += 1;
        }
    }
    assert_eq!(n, 4 * 14);
    // The NaN rule torch's CPU kernel uses (every NaN -> 0xFFFF) and ties to even.
    assert_eq!(bf16_bits_from_f32(f32::from_bits(0x7FC0_0000)), 0xFFFF);
    assert_eq!(bf16_bits_from_f32(f32::from_bits(0x3F80_8000)), 0x3F80);
    assert_eq!(bf16_bits_from_f32(f32::from_bits(0x3F81_8000)), 0x3F82);
}

// ------------------------------------------------------------------------------------ convert

#[test]
fn micro_checkpoint_converts_to_a_loadable_model() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = base_tokenizer(tmp.path());
    let expected = json(&fixture("micro_expected.json"));
    let cfg = micro_config();

    // Single file and sharded output hold the same tensors.
    for (sub, shard) in [("single", u64::MAX), ("sharded", 100_000)] {
        let out = tmp.path().join(sub);
        let opts = ConvertOptions {
            max_shard_bytes: shard,
            ..micro_opts()
        };
        let s = convert_checkpoint(fixture("micro.bin"), &tok, &out, &opts).unwrap();
        assert_eq!(s.skipped, ["segmentor.class_predictor.weight"]);
        assert_eq!(
            s.absent_unused,
            expected["omitted"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        );
        assert!(s.skipped_unused.is_empty());
        assert!(s.tokens_added);
        assert_eq!(s.wrapper, None);
        let mixed: Vec<&str> = s.source_dtypes.keys().map(String::as_str).collect();
        assert_eq!(mixed, ["bfloat16", "float16", "float32"]);
        assert_eq!(s.weights.index.is_some(), sub == "sharded");
        if sub == "sharded" {
            assert!(s.weights.files.len() >= 3, "{:?}", s.weights.files);
        }

        // The directory loads with the normal loaders and checks.
        let w = Weights::load(&out).unwrap();
        let back = Config::load(&out).unwrap();
        assert_eq!(back, cfg);
        check_weights(&w, &back).unwrap();
        let specs = checkpoint_tensors(&cfg);
        assert_eq!(w.len(), specs.len() - s.absent_unused.len());
        assert_eq!(s.tensors, w.len());
        let tensors = expected["tensors"].as_object().unwrap();
        for name in w.names() {
            let info = w.info(name).unwrap();
            assert_eq!(info.dtype, Some(DType::BF16), "{name}");
            let want = &tensors[name];
            assert_eq!(
                serde_json::to_value(&info.shape).unwrap(),
                want["shape"],
                "{name}"
            );
            let bytes = w.get_any(name).unwrap().to_bytes().unwrap();
            assert_eq!(
                sha256_hex(&bytes),
                want["bf16_sha256"].as_str().unwrap(),
                "{name} (stored as {})",
                want["dtype"]
            );
        }

        let t = load_tokenizer(&out).unwrap();
        check_tokenizer(&t, &back).unwrap();
        assert_eq!(t.get_vocab_size(true), 32014);
        for (s, id) in [
            ("<SEG>", 32011),
            ("<p>", 32012),
            ("</p>", 32013),
            ("<|end|>", 32007),
        ] {
            assert_eq!(t.token_to_id(s), Some(id), "{s}");
        }
        let enc = t.encode("<p>cat</p><SEG>", false).unwrap();
        assert_eq!(enc.get_ids()[0], 32012);
        assert!(enc.get_ids().contains(&32013) && enc.get_ids().contains(&32011));
    }
}

#[test]
fn converted_tokenizer_is_the_synthesised_one() {
    // Adding the three tokens to the base gives the same tokenizer `xsam init` writes.
    let tmp = tempfile::tempdir().unwrap();
    let tok = base_tokenizer(tmp.path());
    let out = tmp.path().join("m");
    convert_checkpoint(fixture("micro.bin"), &tok, &out, &micro_opts()).unwrap();
    let full = tmp.path().join("full.json");
    xsam::tokenizer::write_tokenizer(&full).unwrap();
    assert_eq!(
        json(&out.join("tokenizer.json")),
        json(&full),
        "tokenizer.json differs from the synthesised one"
    );
    // A tokenizer that already has the tokens at the right ids is accepted as is.
    let out2 = tmp.path().join("m2");
    let s = convert_checkpoint(fixture("micro.bin"), &full, &out2, &micro_opts()).unwrap();
    assert!(!s.tokens_added);
}

#[test]
fn geometry_mismatch_lists_the_problems() {
    let ck = TorchCheckpoint::open(fixture("micro.bin")).unwrap();
    // The released geometry: every needed tensor has another shape.
    let e = plan_conversion(&ck, &Config::preset("full").unwrap()).unwrap_err();
    let m = msg(&e);
    assert!(matches!(e, Error::Weights { .. }));
    assert!(m.contains("does not match the model geometry"), "{m}");
    assert!(
        m.contains("tensor `llm.model.embed_tokens.weight`: expected shape [32014, 3072], found [32014, 2]"),
        "{m}"
    );
    assert!(m.contains("missing tensor `llm.model.layers.1."), "{m}");
    assert!(m.contains("... and "), "{m}");
    assert_eq!(
        m.matches("\n  - ").count(),
        21,
        "20 problems and the count: {m}"
    );

    // A convert with the default (full) config fails before writing anything.
    let tmp = tempfile::tempdir().unwrap();
    let tok = base_tokenizer(tmp.path());
    let out = tmp.path().join("out");
    let e = convert_checkpoint(fixture("micro.bin"), &tok, &out, &ConvertOptions::default())
        .unwrap_err();
    assert!(msg(&e).contains("does not match"), "{e}");
    assert!(!out.exists());

    // One needed tensor missing: named with its shape.
    let mut cfg = micro_config();
    cfg.decoder.num_queries = 3;
    let e = plan_conversion(&ck, &cfg).unwrap_err();
    let m = msg(&e);
    assert!(m.contains("(2 problems"), "{m}");
    assert!(
        m.contains("tensor `segmentor.decoder.queries_embedder.weight`: expected shape [3, 8], found [2, 8]"),
        "{m}"
    );
}

#[test]
fn refuses_non_empty_output_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = base_tokenizer(tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("model-00001-of-00009.safetensors"), b"stale").unwrap();
    let e = convert_checkpoint(fixture("micro.bin"), &tok, &out, &micro_opts()).unwrap_err();
    assert!(msg(&e).contains("not empty"), "{e}");
    let opts = ConvertOptions {
        force: true,
        ..micro_opts()
    };
    convert_checkpoint(fixture("micro.bin"), &tok, &out, &opts).unwrap();
    assert!(!out.join("model-00001-of-00009.safetensors").exists());
    Weights::load(&out).unwrap();
}

// ------------------------------------------------------------------------------------ errors

fn open_err(bytes: &[u8]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.bin");
    std::fs::write(&p, bytes).unwrap();
    let e = TorchCheckpoint::open(&p).unwrap_err();
    assert!(matches!(e, Error::Weights { .. }), "{e:?}");
    assert!(e.is_user_input());
    msg(&e)
}

/// Replaces every occurrence of `from` with `to` (same length).
fn patch(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut v = bytes.to_vec();
    let mut n = 0;
    let mut i = 0;
    while i + from.len() <= v.len() {
        if &v[i..i + from.len()] == from {
            v[i..i + from.len()].copy_from_slice(to);
            n += 1;
            i += from.len();
        } else {
            i += 1;
        }
    }
    assert!(n > 0, "pattern not found");
    v
}

#[test]
fn bad_files_give_clear_errors() {
    let good = std::fs::read(fixture("reader_flat.bin")).unwrap();

    let m = open_err(b"");
    assert!(m.contains("empty file"), "{m}");
    let m = open_err(b"certainly not a checkpoint, just some text\n");
    assert!(m.contains("not a zip archive"), "{m}");
    // A pre-1.6 checkpoint (a bare pickle).
    let m = open_err(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.");
    assert!(m.contains("legacy torch.save"), "{m}");

    // Truncated: the zip directory at the end is gone.
    let m = open_err(&good[..good.len() / 2]);
    assert!(m.contains("damaged zip archive"), "{m}");

    // A zip without data.pkl.
    let m = open_err(&patch(&good, b"/data.pkl", b"/data.pkX"));
    assert!(m.contains("no data.pkl"), "{m}");
    assert!(m.contains("data.pkX"), "lists the entries: {m}");

    // A storage whose data file is missing.
    let m = open_err(&patch(&good, b"/data/3", b"/data/Z"));
    assert!(
        m.contains("storage `3`") && m.contains("has no data file"),
        "{m}"
    );

    // An unsupported global, in a file torch wrote (a pickled argparse.Namespace).
    let e = TorchCheckpoint::open(fixture("reader_global.bin")).unwrap_err();
    assert!(
        msg(&e).contains("unsupported global `argparse.Namespace`"),
        "{e}"
    );
    // One patched into the pickle (same length, so the archive stays valid).
    let m = open_err(&patch(
        &good,
        b"collections\nOrderedDict",
        b"subprocess\nPopen_______",
    ));
    assert!(
        m.contains("unsupported global `subprocess.Popen_______`"),
        "{m}"
    );

    // An unknown opcode: the first opcode after PROTO 2 is GLOBAL `c` in this file.
    let m = open_err(&patch(&good, b"\x80\x02c", b"\x80\x02\xff"));
    assert!(
        m.contains("unsupported pickle opcode unknown (0xff)"),
        "{m}"
    );
    let m = open_err(&patch(&good, b"\x80\x02c", b"\x80\x02\x81"));
    assert!(m.contains("NEWOBJ"), "{m}");

    // A view reaching outside its storage: queries_features' offset 384 -> 0x7f7f.
    let m = open_err(&patch(&good, b"M\x80\x01", b"M\x7f\x7f"));
    assert!(m.contains("outside its storage"), "{m}");

    // A storage file shorter than the pickle says: change one numel (BININT1 96 in the
    // persistent id of the qkv bias... easier: make the bf16 qkv weight claim 3072+ elements).
    let m = open_err(&patch(&good, b"M\x00\x0c", b"M\x00\x7c"));
    assert!(m.contains("data file") && m.contains("bytes"), "{m}");

    // A directory and a missing file.
    let tmp = tempfile::tempdir().unwrap();
    let e = TorchCheckpoint::open(tmp.path()).unwrap_err();
    assert!(msg(&e).contains("directory"), "{e}");
    let e = TorchCheckpoint::open(tmp.path().join("nope.bin")).unwrap_err();
    assert!(msg(&e).contains("cannot open"), "{e}");
}

#[test]
fn damaged_files_never_panic() {
    // Byte flips across the whole file (mostly the pickle and the zip records) and every
    // truncation length class: open may fail but must return an error.
    let good = std::fs::read(fixture("reader_prefixed.bin")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.bin");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut opened = 0;
    for i in 0..400 {
        let mut v = good.clone();
        if i % 4 == 0 {
            v.truncate((next() as usize) % v.len());
        } else {
            for _ in 0..1 + i % 3 {
                let at = (next() as usize) % v.len().min(4096);
                v[at] = next() as u8;
            }
        }
        std::fs::write(&p, &v).unwrap();
        if let Ok(ck) = TorchCheckpoint::open(&p) {
            opened += 1;
            for t in ck.tensors() {
                let _ = ck.read_bytes(&t.name);
            }
        }
    }
    assert!(opened > 0, "some flips land in unused bytes");
}

#[test]
fn tokenizer_with_the_wrong_base_size_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = synthesize_base_tokenizer().unwrap();
    t.add_special_tokens(&[tokenizers::AddedToken::from("<extra>", true)]);
    let p = tmp.path().join("t.json");
    t.save(&p, false).unwrap();
    let out = tmp.path().join("out");
    let e = convert_checkpoint(fixture("micro.bin"), &p, &out, &micro_opts()).unwrap_err();
    let m = msg(&e);
    assert!(matches!(e, Error::Tokenizer(_)));
    assert!(
        m.contains("the base tokenizer has 32012 tokens; Phi-3's has 32011"),
        "{m}"
    );
    assert!(!out.exists(), "nothing written");

    // Not a tokenizer at all, and a missing one.
    std::fs::write(&p, b"{\"not\": \"a tokenizer\"}").unwrap();
    let e = convert_checkpoint(fixture("micro.bin"), &p, &out, &micro_opts()).unwrap_err();
    assert!(msg(&e).contains("not a valid tokenizer.json"), "{e}");
    let e = convert_checkpoint(
        fixture("micro.bin"),
        tmp.path().join("none.json"),
        &out,
        &micro_opts(),
    )
    .unwrap_err();
    assert!(msg(&e).contains("no such file"), "{e}");
}

// ------------------------------------------------------------------------------------ CLI

fn run_cli(args: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_xsam"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn cli_convert() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = base_tokenizer(tmp.path());
    let tok = tok.to_str().unwrap();
    let cfg_path = tmp.path().join("micro_config.json");
    micro_config().save(&cfg_path).unwrap();
    let cfg = cfg_path.to_str().unwrap();
    let bin = fixture("micro.bin");
    let bin = bin.to_str().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();
    let bad_bin = fixture("reader_expected.safetensors");

    let one_line = |args: &[&str], needle: &str| {
        let (code, err) = run_cli(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("xsam: error: "), "{err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    };
    let base = ["convert", "--quiet"];
    let args = |c: &str, t: &str, o: &str, more: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        v.extend(["--checkpoint", c, "--tokenizer", t, "--out", o].map(String::from));
        v.extend(more.iter().map(|s| s.to_string()));
        v
    };
    let call = |v: Vec<String>, needle: &str| {
        let r: Vec<&str> = v.iter().map(String::as_str).collect();
        one_line(&r, needle);
    };
    call(
        args("/no/such/pytorch_model.bin", tok, out_s, &["--config", cfg]),
        "cannot open",
    );
    call(
        args(bad_bin.to_str().unwrap(), tok, out_s, &["--config", cfg]),
        "not a zip archive",
    );
    call(
        args(bin, "/no/such/tokenizer.json", out_s, &["--config", cfg]),
        "no such file",
    );
    call(
        args(bin, tok, out_s, &["--config", "/no/such/config.json"]),
        "config",
    );
    call(
        args(bin, tok, out_s, &[]),
        "does not match the model geometry",
    );
    assert!(!out.exists());
    // clap usage errors exit 2 as well.
    let (code, _) = run_cli(&["convert", "--checkpoint", bin]);
    assert_eq!(code, 2);

    // Success, then a second run into the same directory needs --force.
    let ok: Vec<String> = args(bin, tok, out_s, &["--config", cfg]);
    let r: Vec<&str> = ok.iter().map(String::as_str).collect();
    let (code, err) = run_cli(&r);
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "--quiet prints nothing: {err}");
    check_weights(&Weights::load(&out).unwrap(), &micro_config()).unwrap();
    call(args(bin, tok, out_s, &["--config", cfg]), "not empty");

    // Without --quiet: the summary and the warning about the skipped tensor.
    let mut loud: Vec<String> = ok.iter().filter(|a| *a != "--quiet").cloned().collect();
    loud.push("--force".into());
    let r: Vec<&str> = loud.iter().map(String::as_str).collect();
    let (code, err) = run_cli(&r);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning: skipped 1 checkpoint tensor(s)"),
        "{err}"
    );
    assert!(err.contains("segmentor.class_predictor.weight"), "{err}");
    assert!(err.contains("converted "), "{err}");
}

#[test]
fn reader_listing_is_stable() {
    // Order of the state dict is kept (the micro checkpoint is in table order, then the extra).
    let ck = TorchCheckpoint::open(fixture("micro.bin")).unwrap();
    let names: Vec<&str> = ck.names().collect();
    assert_eq!(names.last(), Some(&"segmentor.class_predictor.weight"));
    let dtypes: HashSet<TorchDType> = ck.tensors().iter().map(|t| t.dtype).collect();
    assert_eq!(dtypes.len(), 3, "{dtypes:?}");
}

/// The released checkpoint, when it is on disk (not available offline; ~9.25 GB):
/// `XSAM_CHECKPOINT=.../pytorch_model.bin XSAM_PHI3_TOKENIZER=.../tokenizer.json
/// XSAM_CONVERT_OUT=DIR cargo test --release --test convert -- --ignored released_checkpoint`.
/// Prints what it found (dtypes, skipped names: the open items of the architecture notes §18).
#[test]
#[ignore = "needs the released pytorch_model.bin (XSAM_CHECKPOINT), Phi-3's tokenizer.json \
            (XSAM_PHI3_TOKENIZER) and an output directory (XSAM_CONVERT_OUT)"]
fn released_checkpoint() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("set {k}"));
    let (ck, tok, out) = (
        var("XSAM_CHECKPOINT"),
        var("XSAM_PHI3_TOKENIZER"),
        var("XSAM_CONVERT_OUT"),
    );
    let opts = ConvertOptions {
        progress: true,
        force: true,
        ..ConvertOptions::default()
    };
    let s = convert_checkpoint(&ck, &tok, &out, &opts).unwrap();
    eprintln!(
        "{} tensors, {} params, source dtypes {:?}, wrapper {:?}\nskipped: {:?}\nskipped unused: \
         {:?}\nabsent unused: {:?}\nnon-tensor keys: {:?}",
        s.tensors,
        s.params,
        s.source_dtypes,
        s.wrapper,
        s.skipped,
        s.skipped_unused,
        s.absent_unused,
        s.non_tensor_keys
    );
    let cfg = Config::load(&out).unwrap();
    check_weights(&Weights::load(&out).unwrap(), &cfg).unwrap();
    check_tokenizer(&load_tokenizer(&out).unwrap(), &cfg).unwrap();
}
