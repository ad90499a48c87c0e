//! Phi-3 against transformers' `Phi3ForCausalLM` (reference/make_fixtures_phi3.py): prefill
//! hidden states and logits, 32 greedy steps through the paged KV cache, inside and across the
//! sliding window (48), with and without injected embedding vectors.
//!
//! Tolerance: relative error ||a-b|| / ||b|| <= 1e-4. Both sides compute in f32; the reference is
//! within 6e-7 of an f64 evaluation, and our reductions differ from PyTorch's only in summation
//! order (~1e-6 relative), so 1e-4 leaves room without hiding a wrong formula (swapping GELU
//! flavours or a window off by one moves outputs by 1e-2 or more here).

use xsam::graph::Executor;
use xsam::kv::PagedKvCache;
use xsam::model::phi3::Phi3;
use xsam::{Config, Tensor, Weights};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/phi3_tiny");

struct Fx {
    bytes: Vec<u8>,
    meta: serde_json::Value,
}

impl Fx {
    fn load() -> Fx {
        Fx {
            bytes: std::fs::read(format!("{FIXTURE}.safetensors")).unwrap(),
            meta: serde_json::from_str(
                &std::fs::read_to_string(format!("{FIXTURE}.json")).unwrap(),
            )
            .unwrap(),
        }
    }
    fn raw(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        (t.shape().to_vec(), t.data().to_vec())
    }
    fn f32s(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (s, d) = self.raw(name);
        (s, bytemuck::pod_collect_to_vec(&d))
    }
    fn i64s(&self, name: &str) -> Vec<i64> {
        bytemuck::pod_collect_to_vec(&self.raw(name).1)
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|x| x.is_finite()), "non-finite output");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn model(fx: &Fx) -> Phi3 {
    let mut cfg = Config::preset("tiny").unwrap().llm;
    let l = &fx.meta["config"]["llm"];
    cfg.vocab_size = l["vocab_size"].as_u64().unwrap() as usize;
    cfg.hidden_size = l["hidden_size"].as_u64().unwrap() as usize;
    cfg.intermediate_size = l["intermediate_size"].as_u64().unwrap() as usize;
    cfg.num_hidden_layers = l["num_hidden_layers"].as_u64().unwrap() as usize;
    cfg.num_attention_heads = l["num_attention_heads"].as_u64().unwrap() as usize;
    cfg.num_key_value_heads = l["num_key_value_heads"].as_u64().unwrap() as usize;
    cfg.rms_norm_eps = l["rms_norm_eps"].as_f64().unwrap();
    cfg.rope_theta = l["rope_theta"].as_f64().unwrap();
    cfg.max_position_embeddings = l["max_position_embeddings"].as_u64().unwrap() as usize;
    cfg.sliding_window = l["sliding_window"].as_u64().unwrap() as usize;
    let w = Weights::load(format!("{FIXTURE}.safetensors")).unwrap();
    Phi3::load(&w.pp("llm"), &cfg).unwrap()
}

fn cache(m: &Phi3) -> PagedKvCache {
    PagedKvCache::new(m.kv_config(16, 64 << 20).unwrap()).unwrap()
}

#[test]
fn prefill_and_greedy_decode_match_transformers() {
    let fx = Fx::load();
    let m = model(&fx);
    let d = m.config().hidden_size;
    let mut exec = Executor::new();
    for case in fx.meta["cases"].as_array().unwrap() {
        let p = case["key_prefix"].as_str().unwrap();
        let (shape, embeds) = fx.f32s(&format!("{p}inputs_embeds"));
        let ids = fx.i64s(&format!("{p}input_ids"));
        // Our embedding lookup gives the reference's rows wherever a token id was fed.
        for (i, &id) in ids.iter().enumerate() {
            if id >= 0 {
                assert_eq!(
                    m.embed(&[id as u32]).unwrap(),
                    embeds[i * d..(i + 1) * d],
                    "{p} row {i}"
                );
            }
        }
        let prompt = Tensor::from_f32(embeds.clone(), shape.clone()).unwrap();

        let mut kv = cache(&m);
        let seq = kv.new_sequence();
        let want_ids: Vec<u32> = fx
            .i64s(&format!("{p}generated_ids"))
            .iter()
            .map(|&x| x as u32)
            .collect();
        // end_id outside the vocabulary: run exactly 32 steps like the reference.
        let gen = m
            .generate(
                &mut exec,
                &mut kv,
                seq,
                &prompt,
                want_ids.len(),
                u32::MAX,
                |_| {},
            )
            .unwrap();
        assert_eq!(gen.ids, want_ids, "{p} greedy ids");

        let (_, want_hidden) = fx.f32s(&format!("{p}final_hidden"));
        let e = rel_err(&gen.hidden, &want_hidden);
        assert!(
            e <= 1e-4,
            "{p} hidden states of all fed positions: rel err {e}"
        );

        // Prefill alone: hidden states and the first logits.
        let mut kv = cache(&m);
        let seq = kv.new_sequence();
        let f = m.forward(&mut exec, &mut kv, seq, &prompt).unwrap();
        let (_, want) = fx.f32s(&format!("{p}prefill_final_hidden"));
        let e = rel_err(&f.hidden.to_vec_f32().unwrap(), &want);
        assert!(e <= 1e-4, "{p} prefill hidden: rel err {e}");
        let (_, want) = fx.f32s(&format!("{p}last_logits"));
        let e = rel_err(&f.last_logits, &want);
        assert!(e <= 1e-4, "{p} last logits: rel err {e}");
    }
}

#[test]
fn decode_through_the_cache_equals_full_recompute() {
    let fx = Fx::load();
    let m = model(&fx);
    let d = m.config().hidden_size;
    let (_, embeds) = fx.f32s("case_b.inputs_embeds");
    let ids: Vec<u32> = fx
        .i64s("case_b.full_ids")
        .iter()
        .map(|&x| x as u32)
        .collect();
    let all = m.embed(&ids).unwrap();
    let mut exec = Executor::new();
    let mut kv = cache(&m);
    let seq = kv.new_sequence();
    let n0 = embeds.len() / d;
    m.forward(
        &mut exec,
        &mut kv,
        seq,
        &Tensor::from_f32(all[..n0 * d].to_vec(), [n0, d]).unwrap(),
    )
    .unwrap();
    for t in n0..n0 + 12 {
        let step = m
            .forward(
                &mut exec,
                &mut kv,
                seq,
                &Tensor::from_f32(all[t * d..(t + 1) * d].to_vec(), [1, d]).unwrap(),
            )
            .unwrap();
        let mut fresh = cache(&m);
        let s2 = fresh.new_sequence();
        let full = m
            .forward(
                &mut exec,
                &mut fresh,
                s2,
                &Tensor::from_f32(all[..(t + 1) * d].to_vec(), [t + 1, d]).unwrap(),
            )
            .unwrap();
        let e = rel_err(&step.last_logits, &full.last_logits);
        assert!(e <= 1e-5, "step {t}: rel err {e}");
    }
    // Past position 48 the window released early blocks: the cache stays bounded.
    assert!(
        kv.blocks_in_use() <= 48usize.div_ceil(16) + 1,
        "{} blocks",
        kv.blocks_in_use()
    );
}

#[test]
fn forked_prefix_gives_the_same_results_with_fewer_blocks() {
    let fx = Fx::load();
    let m = model(&fx);
    let d = m.config().hidden_size;
    let ids: Vec<u32> = fx
        .i64s("case_a.full_ids")
        .iter()
        .map(|&x| x as u32)
        .collect();
    let all = m.embed(&ids).unwrap();
    let t = |a: usize, b: usize| Tensor::from_f32(all[a * d..b * d].to_vec(), [b - a, d]).unwrap();
    let mut exec = Executor::new();

    let mut shared = cache(&m);
    let prefix = shared.new_sequence();
    m.forward(&mut exec, &mut shared, prefix, &t(0, 20))
        .unwrap();
    let (a, b) = (shared.fork(prefix).unwrap(), shared.fork(prefix).unwrap());
    let ra = m.forward(&mut exec, &mut shared, a, &t(20, 26)).unwrap();
    let rb = m.forward(&mut exec, &mut shared, b, &t(20, 30)).unwrap();

    let mut indep = cache(&m);
    let (ia, ib) = (indep.new_sequence(), indep.new_sequence());
    let wa = m.forward(&mut exec, &mut indep, ia, &t(0, 26)).unwrap();
    let wb = m.forward(&mut exec, &mut indep, ib, &t(0, 30)).unwrap();
    assert!(rel_err(&ra.last_logits, &wa.last_logits) <= 1e-5);
    assert!(rel_err(&rb.last_logits, &wb.last_logits) <= 1e-5);
    shared.free(prefix).unwrap();
    // Shared: block 0 (16 tokens) once + each fork's copy of block 1 = 3; independent: 2 + 2.
    assert_eq!(shared.blocks_in_use(), 3);
    assert_eq!(indep.blocks_in_use(), 4);
}

#[test]
fn prompt_longer_than_the_context_is_a_clear_error() {
    let fx = Fx::load();
    let m = model(&fx);
    let d = m.config().hidden_size;
    let n = m.config().max_position_embeddings + 1;
    let mut kv = PagedKvCache::new(m.kv_config(16, 256 << 20).unwrap()).unwrap();
    let seq = kv.new_sequence();
    let err = m
        .forward(
            &mut Executor::new(),
            &mut kv,
            seq,
            &Tensor::from_f32(vec![0.0; n * d], [n, d]).unwrap(),
        )
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("too long"), "{err}");
    assert_eq!(kv.blocks_in_use(), 0);
}

#[test]
fn splicing_reproduces_the_reference_inputs_embeds() {
    use xsam::model::splice::splice;
    use xsam::task::prompt::PromptToken;
    let fx = Fx::load();
    let m = model(&fx);
    let d = m.config().hidden_size;
    let ids = fx.i64s("case_c.input_ids");
    let (_, embeds) = fx.f32s("case_c.inputs_embeds");
    let (_, injected) = fx.f32s("case_c.injected_vectors");
    let pos: Vec<usize> = fx
        .i64s("case_c.injected_positions")
        .iter()
        .map(|&p| p as usize)
        .collect();
    // The fixture injects a contiguous block (an image stand-in, id -200) and single vectors (-300).
    let mut tokens = vec![];
    let mut image_rows = vec![];
    let mut regions = vec![];
    for (i, &id) in ids.iter().enumerate() {
        let k = pos.iter().position(|&p| p == i);
        match id {
            -200 => {
                image_rows.extend_from_slice(&injected[k.unwrap() * d..][..d]);
                if i == 0 || ids[i - 1] != -200 {
                    tokens.push(PromptToken::Image);
                }
            }
            -300 => {
                tokens.push(PromptToken::Region(regions.len()));
                regions.push(injected[k.unwrap() * d..][..d].to_vec());
            }
            id => tokens.push(PromptToken::Id(id as u32)),
        }
    }
    let n_img = image_rows.len() / d;
    let image = Tensor::from_f32(image_rows, [n_img, d]).unwrap();
    let s = splice(&m, &tokens, Some(&image), &regions).unwrap();
    assert_eq!(s.embeds.to_vec_f32().unwrap(), embeds);
    assert_eq!(s.image.map(|(p, n)| (p, n)), Some((pos[0], n_img)));
    assert_eq!(s.regions.len(), regions.len());
    // Missing pieces are errors, not panics.
    assert!(splice(&m, &tokens, None, &regions).is_err());
    assert!(splice(&m, &tokens, Some(&image), &[]).is_err());
}
