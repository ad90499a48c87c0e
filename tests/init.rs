//! The random model writer (`xsam init`), the checkpoint tensor table, and the synthesised
//! tokenizer.

use std::collections::BTreeMap;
use std::path::Path;
use xsam::init::{write_random_model, write_random_model_with, InitOptions};
use xsam::model::check_weights;
use xsam::model::names::{checkpoint_tensors, param_counts, Module, LOGIT_SCALE_INIT};
use xsam::{Config, DType, Error, Weights};

fn tiny() -> Config {
    Config::preset("tiny").unwrap()
}

fn read_all(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn tiny_model_loads_back_with_every_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny();
    let s = write_random_model(&cfg, dir.path(), 1, false).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    // config.json round-trips and validates.
    let back = Config::load(dir.path()).unwrap();
    assert_eq!(back, cfg);
    back.validate().unwrap();

    let specs = checkpoint_tensors(&cfg);
    let w = Weights::load(dir.path()).unwrap();
    assert_eq!(w.len(), specs.len(), "no extra and no missing tensors");
    assert_eq!(s.tensors, specs.len());
    let mut params = 0u64;
    for spec in &specs {
        let info = w
            .info(&spec.name)
            .unwrap_or_else(|| panic!("missing {}", spec.name));
        assert_eq!(info.shape, spec.shape, "{}", spec.name);
        assert_eq!(info.dtype, Some(DType::BF16), "{}", spec.name);
        let t = w.get(&spec.name, &spec.shape).unwrap();
        params += t.numel() as u64;
    }
    assert_eq!(params, s.params);
    let table: usize = param_counts(&specs).iter().map(|(_, all, _)| all).sum();
    assert_eq!(params, table as u64);
    check_weights(&w, &cfg).unwrap();

    // Values: logit_scale, norm weights around 1, weights within ±1/sqrt(fan_in).
    let ls = w
        .get_f32("segmentor.logit_scale", &[1])
        .unwrap()
        .to_scalar_f32()
        .unwrap();
    assert!((ls - LOGIT_SCALE_INIT).abs() < 0.01, "{ls}");
    let n = w
        .get_f32("llm.model.norm.weight", &[64])
        .unwrap()
        .to_vec_f32()
        .unwrap();
    assert!(n.iter().all(|&x| (0.89..=1.11).contains(&x)), "{n:?}");
    assert!(n.iter().any(|&x| x != 1.0));
    let q = w
        .get_f32("llm.model.layers.0.self_attn.qkv_proj.weight", &[192, 64])
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let a = 1.0 / 8.0 + 1e-3;
    assert!(q.iter().all(|&x| x.abs() <= a));
    let mean = q.iter().sum::<f32>() / q.len() as f32;
    let var = q.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / q.len() as f32;
    assert!(mean.abs() < 0.01, "{mean}");
    assert!(
        (var.sqrt() - 0.125 / 3f32.sqrt()).abs() < 0.005,
        "{}",
        var.sqrt()
    );

    // Needed tensors can go missing only with a clear error.
    let mut partial: Vec<(String, xsam::Tensor)> = specs
        .iter()
        .filter(|s| s.name != "segmentor.encoder.layers.2.attn.rel_pos_h")
        .map(|s| (s.name.clone(), w.get_any(&s.name).unwrap()))
        .collect();
    let pw = Weights::from_tensors(partial.clone(), "partial");
    match check_weights(&pw, &cfg).unwrap_err() {
        Error::MissingTensor { name, .. } => {
            assert_eq!(name, "segmentor.encoder.layers.2.attn.rel_pos_h")
        }
        e => panic!("{e:?}"),
    }
    // ... and a mis-shaped one names expected and found.
    let bad = xsam::Tensor::zeros([1, 64], DType::BF16);
    for (n, t) in partial.iter_mut() {
        if n == "bg_embeds.weight" {
            *t = bad.clone();
        }
    }
    partial.push((
        "segmentor.encoder.layers.2.attn.rel_pos_h".into(),
        w.get_any("segmentor.encoder.layers.2.attn.rel_pos_h")
            .unwrap(),
    ));
    match check_weights(&Weights::from_tensors(partial.clone(), "p"), &cfg).unwrap_err() {
        Error::TensorShape {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, "bg_embeds.weight");
            assert_eq!(expected, vec![1, 32]);
            assert_eq!(found, vec![1, 64]);
        }
        e => panic!("{e:?}"),
    }
    // Unused tensors may be absent.
    let needed: Vec<_> = specs
        .iter()
        .filter(|s| s.needed)
        .map(|s| (s.name.clone(), w.get_any(&s.name).unwrap()))
        .collect();
    assert!(needed.len() < specs.len());
    check_weights(&Weights::from_tensors(needed, "needed"), &cfg).unwrap();
}

#[test]
fn deterministic_for_a_seed() {
    let cfg = tiny();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    write_random_model(&cfg, a.path(), 42, false).unwrap();
    write_random_model(&cfg, b.path(), 42, false).unwrap();
    write_random_model(&cfg, c.path(), 43, false).unwrap();
    let (fa, fb, fc) = (read_all(a.path()), read_all(b.path()), read_all(c.path()));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    assert!(fa == fb, "same seed, same bytes");
    assert_ne!(fa["model.safetensors"], fc["model.safetensors"]);
    assert_eq!(fa["tokenizer.json"], fc["tokenizer.json"]);
    assert_eq!(fa["config.json"], fc["config.json"]);
}

#[test]
fn sharded_random_model_matches_single_file() {
    let cfg = tiny();
    let single = tempfile::tempdir().unwrap();
    let sharded = tempfile::tempdir().unwrap();
    write_random_model(&cfg, single.path(), 5, false).unwrap();
    let opts = InitOptions {
        seed: 5,
        max_shard_bytes: 1_000_000,
        ..Default::default()
    };
    let s = write_random_model_with(&cfg, sharded.path(), &opts).unwrap();
    assert!(s.weights.files.len() > 2, "{:?}", s.weights.files);
    assert!(s.weights.index.is_some());
    assert!(!sharded.path().join("model.safetensors").exists());
    let w1 = Weights::load(single.path()).unwrap();
    let w2 = Weights::load(sharded.path()).unwrap();
    assert_eq!(w1.len(), w2.len());
    for n in w1.names() {
        let t1 = w1.get_any(n).unwrap();
        let t2 = w2.get_any(n).unwrap();
        assert_eq!(t1.to_bytes().unwrap(), t2.to_bytes().unwrap(), "{n}");
    }
    check_weights(&w2, &cfg).unwrap();
}

#[test]
fn refuses_non_empty_directory_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "keep me").unwrap();
    let e = write_random_model(&tiny(), dir.path(), 0, false).unwrap_err();
    assert!(e.is_user_input());
    assert!(e.to_string().contains("not empty"), "{e}");
    // With force: written, stale model files replaced, other files kept.
    std::fs::write(dir.path().join("model-00001-of-00002.safetensors"), "stale").unwrap();
    let opts = InitOptions {
        force: true,
        ..Default::default()
    };
    write_random_model_with(&tiny(), dir.path(), &opts).unwrap();
    assert!(!dir.path().join("model-00001-of-00002.safetensors").exists());
    assert!(dir.path().join("notes.txt").exists());
    Weights::load(dir.path()).unwrap();
    // A file in place of the directory.
    let f = dir.path().join("notes.txt");
    assert!(write_random_model(&tiny(), &f, 0, false)
        .unwrap_err()
        .is_user_input());
    // An invalid config is refused before anything is written.
    let mut bad = tiny();
    bad.sam.window_size = 0;
    let out = dir.path().join("bad");
    assert!(matches!(
        write_random_model(&bad, &out, 0, false),
        Err(Error::Config { .. })
    ));
    assert!(!out.exists());
}

// ---------------------------------------------------------------------------------- tokenizer

#[test]
fn tokenizer_layout_and_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    xsam::tokenizer::write_tokenizer(&path).unwrap();
    let tok = tokenizers::Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.get_vocab_size(true), 32014);
    assert_eq!(tok.get_vocab_size(false), 32000);
    let ids = [
        ("<unk>", 0),
        ("<s>", 1),
        ("</s>", 2),
        ("<0x00>", 3),
        ("<0x0A>", 13),
        ("<0xFF>", 258),
        ("<|endoftext|>", 32000),
        ("<|assistant|>", 32001),
        ("<|placeholder1|>", 32002),
        ("<|placeholder4|>", 32005),
        ("<|system|>", 32006),
        ("<|end|>", 32007),
        ("<|placeholder5|>", 32008),
        ("<|placeholder6|>", 32009),
        ("<|user|>", 32010),
        ("<SEG>", 32011),
        ("<p>", 32012),
        ("</p>", 32013),
    ];
    for (t, id) in ids {
        assert_eq!(tok.token_to_id(t), Some(id), "{t}");
        assert_eq!(tok.id_to_token(id).as_deref(), Some(t));
    }
    // <p>cat</p> keeps the tags at the ends.
    let enc = tok.encode("<p>cat</p>", false).unwrap();
    let e = enc.get_ids();
    assert!(e.len() >= 3, "{e:?}");
    assert_eq!(e[0], 32012);
    assert_eq!(*e.last().unwrap(), 32013);
    // Special tokens inside text; the newline after <|user|> stays text (byte fallback 0x0A).
    let enc = tok.encode("<|user|>\n<SEG> ok<|end|>", false).unwrap();
    let e = enc.get_ids();
    assert_eq!(e[0], 32010);
    assert!(e.contains(&32011));
    assert_eq!(*e.last().unwrap(), 32007);
    assert!(e.contains(&13), "{e:?}");
    // Legacy Llama normalisation (as Phi-3's tokenizer.json): every text piece between added
    // tokens gets "▁" prepended, so text right after a special token decodes with a space.
    let ids = tok
        .encode("Sure, <SEG>.", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(tok.decode(&ids, false).unwrap(), "Sure, <SEG> .");
    assert_eq!(tok.decode(&ids, true).unwrap(), "Sure,  .");
    // ASCII and non-ASCII round trips.
    for text in [
        "Sure, the segmentation result is good.",
        "Can you segment the image based on the following categories: cat, dog?",
        "a  b\tc 123 !?#~",
        "naïve café – 東京",
    ] {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert!(
            ids.iter().all(|&i| i != 0),
            "no <unk> for {text:?}: {ids:?}"
        );
        let back = tok.decode(&ids, false).unwrap();
        assert_eq!(back, text);
    }
    // Known words are single tokens.
    let ids = tok.encode("segment", false).unwrap().get_ids().to_vec();
    assert_eq!(ids.len(), 1, "{ids:?}");

    // The loader, and its errors.
    let t2 = xsam::tokenizer::load_tokenizer(dir.path()).unwrap();
    assert_eq!(t2.get_vocab_size(true), 32014);
    xsam::tokenizer::check_tokenizer(&t2, &tiny()).unwrap();
    let mut cfg = tiny();
    cfg.tokens.seg = 32012;
    cfg.tokens.phrase_start = 32011;
    let e = xsam::tokenizer::check_tokenizer(&t2, &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("<SEG>") && e.contains("<p>"), "{e}");
    std::fs::write(dir.path().join("bad.json"), "{\"model\": 3}").unwrap();
    let e = xsam::tokenizer::load_tokenizer(dir.path().join("bad.json")).unwrap_err();
    assert!(matches!(e, Error::Tokenizer(_)) && e.is_user_input());
    assert!(e.to_string().contains("bad.json"), "{e}");
    let e = xsam::tokenizer::load_tokenizer(dir.path().join("absent.json")).unwrap_err();
    assert!(e.to_string().contains("absent.json"), "{e}");
}

// ---------------------------------------------------------------------------------- full table

/// §15.4 of the architecture notes, typed in as the independent reference.
#[test]
fn full_table_matches_the_published_counts() {
    let cfg = Config::preset("full").unwrap();
    let specs = checkpoint_tensors(&cfg);
    let counts: BTreeMap<Module, (usize, usize)> = param_counts(&specs)
        .into_iter()
        .map(|(m, a, n)| (m, (a, n)))
        .collect();
    let expect = [
        (Module::Llm, 3_820_772_352, 3_820_772_352),
        (Module::Vision, 428_225_600, 397_745_440),
        (Module::Sam, 308_278_272, 307_425_280),
        (Module::VisualProjector, 12_982_272, 12_982_272),
        (Module::SegProjector, 22_026_240, 22_026_240),
        (Module::LlmProjector, 852_480, 852_480),
        (Module::Connector, 10_499_072, 10_499_072),
        (Module::PixelDecoder, 6_101_440, 6_101_440),
        (Module::Decoder, 14_509_824, 14_509_824),
        (Module::ClassHead, 257, 257),
        // Not a §15.4 row: the SAM prompt-encoder buffer [2, 128].
        (Module::SamPromptEmbedding, 256, 0),
    ];
    for (m, all, needed) in expect {
        assert_eq!(counts[&m], (all, needed), "{m:?}");
    }
    let total: usize = counts
        .iter()
        .filter(|(m, _)| **m != Module::SamPromptEmbedding)
        .map(|(_, (a, _))| a)
        .sum();
    assert_eq!(total, 4_624_247_809);
    assert_eq!((total as f64 / 1e9 * 1000.0).round() / 1000.0, 4.624);
    let needed: usize = counts.values().map(|(_, n)| n).sum();
    assert_eq!((needed as f64 / 1e9 * 1000.0).round() / 1000.0, 4.593);
    // bf16 bytes ≈ 9.25 GB.
    let bytes = 2 * specs.iter().map(|s| s.numel()).sum::<usize>();
    assert_eq!((bytes as f64 / 1e9 * 100.0).round() / 100.0, 9.25);
    // §15.4 sub-rows.
    let layer0: usize = specs
        .iter()
        .filter(|s| s.name.starts_with("llm.model.layers.0."))
        .map(|s| s.numel())
        .sum();
    assert_eq!(layer0, 113_252_352);
    let neck: usize = specs
        .iter()
        .filter(|s| s.name.starts_with("segmentor.encoder.neck."))
        .map(|s| s.numel())
        .sum();
    assert_eq!(neck, 852_992);
    let level = |l: usize| -> usize {
        specs
            .iter()
            .filter(|s| s.name.starts_with(&format!("seg_connector.model.{l}.")))
            .map(|s| s.numel())
            .sum()
    };
    assert_eq!(
        (level(0), level(1), level(2)),
        (3_938_304, 3_411_968, 3_148_800)
    );
}

#[test]
fn full_table_shapes_match_the_checkpoint_notes() {
    let cfg = Config::preset("full").unwrap();
    let specs = checkpoint_tensors(&cfg);
    let by_name: BTreeMap<&str, &xsam::model::TensorSpec> =
        specs.iter().map(|s| (s.name.as_str(), s)).collect();
    assert_eq!(by_name.len(), specs.len(), "names are unique");
    let shape = |n: &str| -> Vec<usize> {
        by_name
            .get(n)
            .unwrap_or_else(|| panic!("no tensor {n}"))
            .shape
            .clone()
    };
    let needed = |n: &str| by_name[n].needed;
    // §15.3, row by row.
    assert_eq!(shape("llm.model.embed_tokens.weight"), [32014, 3072]);
    assert_eq!(shape("llm.model.layers.31.input_layernorm.weight"), [3072]);
    assert_eq!(
        shape("llm.model.layers.0.self_attn.qkv_proj.weight"),
        [9216, 3072]
    );
    assert_eq!(
        shape("llm.model.layers.0.self_attn.o_proj.weight"),
        [3072, 3072]
    );
    assert_eq!(
        shape("llm.model.layers.0.mlp.gate_up_proj.weight"),
        [16384, 3072]
    );
    assert_eq!(
        shape("llm.model.layers.0.mlp.down_proj.weight"),
        [3072, 8192]
    );
    assert_eq!(shape("llm.model.norm.weight"), [3072]);
    assert_eq!(shape("llm.lm_head.weight"), [32014, 3072]);
    assert!(!by_name.contains_key("llm.model.layers.32.input_layernorm.weight"));
    assert!(!by_name.contains_key("llm.model.layers.0.self_attn.qkv_proj.bias"));

    let v = "visual_encoder.vision_model";
    assert_eq!(
        shape(&format!("{v}.embeddings.patch_embedding.weight")),
        [1152, 3, 14, 14]
    );
    assert_eq!(
        shape(&format!("{v}.embeddings.position_embedding.weight")),
        [729, 1152]
    );
    assert_eq!(
        shape(&format!("{v}.encoder.layers.25.mlp.fc1.weight")),
        [4304, 1152]
    );
    assert!(needed(&format!("{v}.encoder.layers.25.mlp.fc1.weight")));
    assert!(!needed(&format!("{v}.encoder.layers.26.mlp.fc1.weight")));
    assert!(!needed(&format!("{v}.post_layernorm.weight")));
    assert_eq!(shape(&format!("{v}.head.probe")), [1, 1, 1152]);
    assert_eq!(
        shape(&format!("{v}.head.attention.in_proj_weight")),
        [3456, 1152]
    );
    assert!(!needed(&format!("{v}.head.mlp.fc2.bias")));

    assert_eq!(
        shape("segmentor.encoder.patch_embed.projection.weight"),
        [1024, 3, 16, 16]
    );
    assert_eq!(shape("segmentor.encoder.pos_embed"), [1, 64, 64, 1024]);
    for i in 0..24 {
        let want = if [5, 11, 17, 23].contains(&i) {
            127
        } else {
            27
        };
        for t in ["rel_pos_h", "rel_pos_w"] {
            assert_eq!(
                shape(&format!("segmentor.encoder.layers.{i}.attn.{t}")),
                [want, 64]
            );
        }
    }
    assert_eq!(
        shape("segmentor.encoder.layers.0.attn.qkv.weight"),
        [3072, 1024]
    );
    assert_eq!(
        shape("segmentor.encoder.layers.0.mlp.lin1.weight"),
        [4096, 1024]
    );
    assert_eq!(
        shape("segmentor.encoder.neck.conv1.weight"),
        [256, 1024, 1, 1]
    );
    assert_eq!(
        shape("segmentor.encoder.neck.conv2.weight"),
        [256, 256, 3, 3]
    );
    assert!(!needed("segmentor.encoder.neck.layer_norm2.bias"));
    assert_eq!(
        shape("segmentor.shared_image_embedding.positional_embedding"),
        [2, 128]
    );
    assert!(!needed(
        "segmentor.shared_image_embedding.positional_embedding"
    ));

    assert_eq!(shape("segmentor.pixel_decoder.level_embed"), [3, 256]);
    let ip = "segmentor.pixel_decoder.input_projections";
    assert_eq!(shape(&format!("{ip}.0.0.weight")), [256, 2048, 1, 1]);
    assert_eq!(shape(&format!("{ip}.1.0.weight")), [256, 1024, 1, 1]);
    assert_eq!(shape(&format!("{ip}.2.0.weight")), [256, 512, 1, 1]);
    assert_eq!(shape(&format!("{ip}.2.1.weight")), [256]);
    let el = "segmentor.pixel_decoder.encoder.layers.5.self_attn";
    assert_eq!(shape(&format!("{el}.sampling_offsets.weight")), [192, 256]);
    assert_eq!(shape(&format!("{el}.attention_weights.weight")), [96, 256]);
    assert!(!by_name.contains_key("segmentor.pixel_decoder.encoder.layers.6.fc1.weight"));
    assert_eq!(
        shape("segmentor.pixel_decoder.mask_projection.weight"),
        [256, 256, 1, 1]
    );
    assert_eq!(
        shape("segmentor.pixel_decoder.adapter_1.0.weight"),
        [256, 512, 1, 1]
    );
    assert!(!by_name.contains_key("segmentor.pixel_decoder.adapter_1.0.bias"));
    assert_eq!(
        shape("segmentor.pixel_decoder.layer_1.0.weight"),
        [256, 256, 3, 3]
    );

    assert_eq!(
        shape("segmentor.decoder.queries_embedder.weight"),
        [200, 256]
    );
    assert_eq!(
        shape("segmentor.decoder.queries_features.weight"),
        [200, 256]
    );
    assert_eq!(shape("segmentor.decoder.level_embed.weight"), [3, 256]);
    let dl = "segmentor.decoder.decoder.layers";
    assert_eq!(
        shape(&format!("{dl}.8.cross_attn.in_proj_weight")),
        [768, 256]
    );
    assert_eq!(shape(&format!("{dl}.8.cross_attn.in_proj_bias")), [768]);
    assert_eq!(shape(&format!("{dl}.8.fc1.weight")), [2048, 256]);
    assert!(!by_name.contains_key(&format!("{dl}.9.fc1.weight").as_str()));
    assert_eq!(shape("segmentor.decoder.decoder.layernorm.weight"), [256]);
    assert_eq!(
        shape("segmentor.decoder.decoder.mask_predictor.mask_embedder.2.0.weight"),
        [256, 256]
    );
    assert_eq!(shape("segmentor.logit_scale"), [1]);
    assert_eq!(shape("visual_projector.model.0.weight"), [3072, 1152]);
    assert_eq!(shape("seg_projector.model.0.weight"), [3072, 4096]);
    assert_eq!(shape("seg_projector.model.2.weight"), [3072, 3072]);
    assert_eq!(shape("llm_projector.model.0.weight"), [256, 3072]);
    assert_eq!(shape("llm_projector.model.2.weight"), [256, 256]);
    assert_eq!(
        shape("seg_connector.model.0.model.4.weight"),
        [2048, 512, 1, 1]
    );
    assert_eq!(
        shape("seg_connector.model.2.model.4.weight"),
        [512, 512, 1, 1]
    );
    assert_eq!(
        shape("seg_connector.model.1.model.2.weight"),
        [512, 512, 3, 3]
    );
    assert!(!by_name.contains_key("seg_connector.model.0.model.0.bias"));
    assert_eq!(shape("bg_embeds.weight"), [1, 256]);

    // Every name belongs to one of the documented prefixes.
    let prefixes = [
        "llm.",
        "visual_encoder.vision_model.",
        "segmentor.encoder.",
        "segmentor.pixel_decoder.",
        "segmentor.decoder.",
        "segmentor.logit_scale",
        "segmentor.shared_image_embedding.",
        "visual_projector.model.",
        "seg_projector.model.",
        "llm_projector.model.",
        "seg_connector.model.",
        "bg_embeds.weight",
    ];
    for s in &specs {
        assert!(prefixes.iter().any(|p| s.name.starts_with(p)), "{}", s.name);
    }
}

#[test]
fn tiny_table_exercises_the_awkward_paths() {
    let cfg = tiny();
    let specs = checkpoint_tensors(&cfg);
    let has = |n: &str| specs.iter().any(|s| s.name == n);
    let spec = |n: &str| specs.iter().find(|s| s.name == n).unwrap().clone();
    // Window 3 on an 8x8 grid; global blocks 1 and 3.
    assert_eq!(
        spec("segmentor.encoder.layers.0.attn.rel_pos_h").shape,
        [5, 16]
    );
    assert_eq!(
        spec("segmentor.encoder.layers.1.attn.rel_pos_h").shape,
        [15, 16]
    );
    // SigLIP: 3 layers, the last unused.
    assert!(spec("visual_encoder.vision_model.encoder.layers.1.mlp.fc1.weight").needed);
    assert!(!spec("visual_encoder.vision_model.encoder.layers.2.mlp.fc1.weight").needed);
    // 4 decoder layers (decoder_layers 5).
    assert!(has("segmentor.decoder.decoder.layers.3.fc1.weight"));
    assert!(!has("segmentor.decoder.decoder.layers.4.fc1.weight"));
    assert_eq!(cfg.connector_out_channels(), vec![16, 32, 64]);
    assert_eq!(cfg.num_image_tokens(), 16 + 16);
}

// ---------------------------------------------------------------------------------- CLI

#[test]
fn cli_init_exit_codes() {
    let exe = env!("CARGO_BIN_EXE_xsam");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let run = |args: &[&str]| std::process::Command::new(exe).args(args).output().unwrap();
    let o = run(&[
        "init",
        "--preset",
        "tiny",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Weights::load(&out).unwrap();
    Config::load(&out).unwrap();
    // Again into the now non-empty directory: bad input, one line, exit 2.
    let o = run(&[
        "init",
        "--preset",
        "tiny",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    // --force works.
    let o = run(&[
        "init",
        "--preset",
        "tiny",
        "--out",
        out.to_str().unwrap(),
        "--force",
        "--seed",
        "3",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Unknown preset / missing argument: clap usage errors, exit 2.
    let o = run(&["init", "--preset", "huge", "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["init", "--preset", "tiny"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
}

/// Checks a full-size random model written by hand (`xsam init --preset full --out DIR`):
/// `XSAM_FULL_DIR=DIR cargo test --release --test init -- --ignored full_model_on_disk`.
#[test]
#[ignore = "needs a full model written by `xsam init --preset full` (XSAM_FULL_DIR)"]
fn full_model_on_disk() {
    let Ok(dir) = std::env::var("XSAM_FULL_DIR") else {
        eprintln!("XSAM_FULL_DIR not set; skipping");
        return;
    };
    let cfg = Config::load(&dir).unwrap();
    assert_eq!(cfg, Config::preset("full").unwrap());
    let w = Weights::load(&dir).unwrap();
    assert!(w.files().len() >= 3, "sharded at 4 GB");
    check_weights(&w, &cfg).unwrap();
    let specs = checkpoint_tensors(&cfg);
    assert_eq!(w.len(), specs.len());
    let seed: u64 = std::env::var("XSAM_FULL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    for s in &specs {
        let info = w.info(&s.name).unwrap();
        assert_eq!(
            (info.shape.as_slice(), info.dtype),
            (s.shape.as_slice(), Some(DType::BF16))
        );
        // Small tensors: regenerate and compare the bytes.
        if s.numel() <= 1 << 20 {
            let mut bytes = Vec::new();
            let src = xsam::init::RandomTensor::new(s.clone(), seed);
            xsam::weights::TensorSource::write_data(&src, &mut bytes).unwrap();
            assert_eq!(
                w.get_any(&s.name).unwrap().to_bytes().unwrap(),
                bytes,
                "{}",
                s.name
            );
        }
    }
    let t = w
        .get_f32("llm.model.layers.31.mlp.down_proj.weight", &[3072, 8192])
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let a = 1.0 / (8192f32).sqrt();
    assert!(t.iter().all(|x| x.abs() <= a * 1.01));
    let mean = t.iter().map(|&x| x as f64).sum::<f64>() / t.len() as f64;
    assert!(mean.abs() < 1e-4, "{mean}");
}
