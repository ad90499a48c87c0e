//! Phi-3-mini, the LLM (architecture notes §6): pre-norm decoder layers with fused `qkv_proj`
//! and `gate_up_proj`, RMSNorm, rotate-half RoPE, SiLU-gated MLP, causal attention with a
//! sliding window (`0 <= i - j < sliding_window`), K/V in the paged cache.
//!
//! A forward takes input embeddings (text rows from `embed_tokens`, image and region vectors
//! spliced in by the caller) and returns the post-final-norm hidden state of every position,
//! which X-SAM reads at `<p>`, `</p>` and `<SEG>`, plus the logits of the last position.

use crate::graph::{Graph, GraphExecutor, NodeId, Op, Plan};
use crate::kv::{KvConfig, PagedKvCache, SeqId};
use crate::model::config::LlmConfig;
use crate::weights::VarBuilder;
use crate::{backend::cpu, Error, Result, Tensor};

struct Layer {
    input_layernorm: Tensor,
    qkv_proj: Tensor,
    o_proj: Tensor,
    post_attention_layernorm: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
}

pub struct Phi3 {
    cfg: LlmConfig,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
}

/// What one forward returns.
pub struct Forward {
    /// `[T, hidden]`, after the final RMSNorm.
    pub hidden: Tensor,
    /// `[vocab]`, the prediction after the last position.
    pub last_logits: Vec<f32>,
}

/// Result of greedy generation.
pub struct Generation {
    /// Generated ids, including the final end token when generation stopped on it.
    pub ids: Vec<u32>,
    /// Post-norm hidden states of every fed position: the prompt, then each generated token
    /// that was fed back (the last generated token never is).
    pub hidden: Vec<f32>,
}

impl Phi3 {
    /// Loads from the `llm` scope (`model.*`, `lm_head.*`).
    pub fn load(vb: &VarBuilder, cfg: &LlmConfig) -> Result<Self> {
        let (d, inter, vocab) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let hd = d / cfg.num_attention_heads;
        let kv = cfg.num_key_value_heads * hd;
        let m = vb.pp("model");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = m.pp(format!("layers.{i}"));
                Ok(Layer {
                    input_layernorm: l.get("input_layernorm.weight", &[d])?,
                    qkv_proj: l.get("self_attn.qkv_proj.weight", &[d + 2 * kv, d])?,
                    o_proj: l.get("self_attn.o_proj.weight", &[d, d])?,
                    post_attention_layernorm: l.get("post_attention_layernorm.weight", &[d])?,
                    gate_up_proj: l.get("mlp.gate_up_proj.weight", &[2 * inter, d])?,
                    down_proj: l.get("mlp.down_proj.weight", &[d, inter])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Phi3 {
            cfg: cfg.clone(),
            embed_tokens: m.get("embed_tokens.weight", &[vocab, d])?,
            layers,
            norm: m.get("norm.weight", &[d])?,
            lm_head: vb.get("lm_head.weight", &[vocab, d])?,
        })
    }

    pub fn config(&self) -> &LlmConfig {
        &self.cfg
    }

    pub fn head_dim(&self) -> usize {
        self.cfg.hidden_size / self.cfg.num_attention_heads
    }

    /// KV cache geometry for this model with f32 elements and `budget_bytes` of memory.
    pub fn kv_config(&self, block_size: usize, budget_bytes: usize) -> Result<KvConfig> {
        let kv_dim = self.cfg.num_key_value_heads * self.head_dim();
        KvConfig::from_budget(
            self.cfg.num_hidden_layers,
            kv_dim,
            block_size,
            4,
            budget_bytes,
        )
    }

    /// Rows of `embed_tokens` for `ids`, as f32 `[n, hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let d = self.cfg.hidden_size;
        let mut out = vec![0f32; ids.len() * d];
        cpu::gather_rows(
            cpu::WeightRef::from_tensor(&self.embed_tokens)?,
            d,
            ids,
            &mut out,
        )?;
        Ok(out)
    }

    /// The graph of one forward over `t` tokens starting at position `pos0`.
    fn build(&self, t: usize, pos0: usize) -> Result<(Graph, NodeId, NodeId, NodeId)> {
        let c = &self.cfg;
        let (d, heads, hd) = (c.hidden_size, c.num_attention_heads, self.head_dim());
        let kv = c.num_key_value_heads * hd;
        let eps = c.rms_norm_eps as f32;
        let mut g = Graph::new();
        let input = g.input("llm.inputs_embeds", [t, d])?;
        let mut x = input;
        for (i, l) in self.layers.iter().enumerate() {
            let p = |s: &str| format!("llm.layers.{i}.{s}");
            let w_in = g.weight(p("input_layernorm"), l.input_layernorm.clone())?;
            let h = g.push(p("attn_norm"), Op::RmsNorm { eps }, &[x, w_in])?;
            let w_qkv = g.weight(p("qkv_proj"), l.qkv_proj.clone())?;
            let qkv = g.push(p("qkv"), Op::Linear, &[h, w_qkv])?;
            let q = g.push(
                p("q"),
                Op::Narrow {
                    axis: 1,
                    start: 0,
                    len: d,
                },
                &[qkv],
            )?;
            let k = g.push(
                p("k"),
                Op::Narrow {
                    axis: 1,
                    start: d,
                    len: kv,
                },
                &[qkv],
            )?;
            let v = g.push(
                p("v"),
                Op::Narrow {
                    axis: 1,
                    start: d + kv,
                    len: kv,
                },
                &[qkv],
            )?;
            let rope = |heads| Op::Rope {
                heads,
                head_dim: hd,
                theta: c.rope_theta as f32,
                pos_offset: pos0,
            };
            let q = g.push(p("q_rope"), rope(heads), &[q])?;
            let k = g.push(p("k_rope"), rope(c.num_key_value_heads), &[k])?;
            let attn = Op::PagedAttention {
                layer: i,
                pos0,
                heads,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                window: Some(c.sliding_window),
            };
            let a = g.push(p("attn"), attn, &[q, k, v])?;
            let w_o = g.weight(p("o_proj"), l.o_proj.clone())?;
            let o = g.push(p("attn_out"), Op::Linear, &[a, w_o])?;
            x = g.push(p("attn_residual"), Op::Add, &[x, o])?;
            let w_post = g.weight(
                p("post_attention_layernorm"),
                l.post_attention_layernorm.clone(),
            )?;
            let h = g.push(p("mlp_norm"), Op::RmsNorm { eps }, &[x, w_post])?;
            let w_gu = g.weight(p("gate_up_proj"), l.gate_up_proj.clone())?;
            let gu = g.push(p("gate_up"), Op::Linear, &[h, w_gu])?;
            let act = g.push(p("act"), Op::SiluGate, &[gu])?;
            let w_down = g.weight(p("down_proj"), l.down_proj.clone())?;
            let m = g.push(p("mlp_out"), Op::Linear, &[act, w_down])?;
            x = g.push(p("out"), Op::Add, &[x, m])?;
        }
        let w_norm = g.weight("llm.norm", self.norm.clone())?;
        let hidden = g.push("llm.final_hidden", Op::RmsNorm { eps }, &[x, w_norm])?;
        let last = g.push(
            "llm.last_hidden",
            Op::Narrow {
                axis: 0,
                start: t - 1,
                len: 1,
            },
            &[hidden],
        )?;
        let w_head = g.weight("llm.lm_head", self.lm_head.clone())?;
        let logits = g.push("llm.last_logits", Op::Linear, &[last, w_head])?;
        g.mark_output(hidden);
        g.mark_output(logits);
        Ok((g, input, hidden, logits))
    }

    /// Arena bytes of one forward over `t` tokens at position `pos0` (the planner's peak).
    pub fn forward_peak_bytes(&self, t: usize, pos0: usize) -> Result<usize> {
        let (g, ..) = self.build(t, pos0)?;
        Ok(Plan::new(&g, &[])?.peak_bytes)
    }

    /// Runs `embeds [T, hidden]` at the end of sequence `seq`, appending their K/V.
    pub fn forward(
        &self,
        exec: &mut dyn GraphExecutor,
        cache: &mut PagedKvCache,
        seq: SeqId,
        embeds: &Tensor,
    ) -> Result<Forward> {
        let d = self.cfg.hidden_size;
        let t = embeds.dim(0)?;
        if embeds.dims() != [t, d] || t == 0 {
            return Err(Error::shape(
                "phi3.forward",
                format!("embeds {} is not [T>0, {d}]", embeds.shape()),
            ));
        }
        let pos0 = cache.len(seq)?;
        if pos0 + t > self.cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "prompt too long: {} tokens exceed the LLM context of {}",
                pos0 + t,
                self.cfg.max_position_embeddings
            )));
        }
        let (g, input, hidden, logits) = self.build(t, pos0)?;
        let plan = Plan::new(&g, &[])?;
        cache.append(seq, t)?;
        let out = exec.run_with_kv(&g, &plan, &[(input, embeds)], Some((&mut *cache, seq)))?;
        // No later query can see keys before (next position - window + 1).
        cache.release_before(seq, (pos0 + t + 1).saturating_sub(self.cfg.sliding_window))?;
        Ok(Forward {
            hidden: out.get(hidden)?.clone(),
            last_logits: out.get(logits)?.to_vec_f32()?,
        })
    }

    /// `lm_head` on post-norm hidden rows `[n, hidden]`: logits `[n * vocab]` (used to report
    /// the prediction after the prompt when the prompt was run together with a forced answer).
    pub fn logits(&self, exec: &mut dyn GraphExecutor, hidden: &Tensor) -> Result<Vec<f32>> {
        let d = self.cfg.hidden_size;
        let n = hidden.dim(0)?;
        if hidden.dims() != [n, d] {
            return Err(Error::shape(
                "phi3.logits",
                format!("hidden {} is not [n, {d}]", hidden.shape()),
            ));
        }
        let mut g = Graph::new();
        let input = g.input("llm.hidden", [n, d])?;
        let w = g.weight("llm.lm_head", self.lm_head.clone())?;
        let out = g.push("llm.logits", Op::Linear, &[input, w])?;
        g.mark_output(out);
        let plan = Plan::new(&g, &[])?;
        exec.run(&g, &plan, &[(input, hidden)])?
            .get(out)?
            .to_vec_f32()
    }

    /// Greedy generation after a prompt: stops at `end_id` (kept in the ids) or after
    /// `max_new_tokens`. `on_token` sees each id as it is produced.
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &self,
        exec: &mut dyn GraphExecutor,
        cache: &mut PagedKvCache,
        seq: SeqId,
        prompt: &Tensor,
        max_new_tokens: usize,
        end_id: u32,
        mut on_token: impl FnMut(u32),
    ) -> Result<Generation> {
        self.generate_with(
            exec,
            cache,
            seq,
            prompt,
            max_new_tokens,
            end_id,
            &mut on_token,
            &mut |_| Ok(()),
        )
    }

    /// [`generate`](Self::generate) with `before_step(k)` called after the prefill (k = 0) and
    /// before decode step k (once k ids exist); an error from it (an abort) ends the generation
    /// with that error.
    #[allow(clippy::too_many_arguments)]
    pub fn generate_with(
        &self,
        exec: &mut dyn GraphExecutor,
        cache: &mut PagedKvCache,
        seq: SeqId,
        prompt: &Tensor,
        max_new_tokens: usize,
        end_id: u32,
        on_token: &mut dyn FnMut(u32),
        before_step: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<Generation> {
        let d = self.cfg.hidden_size;
        let first = self.forward(exec, cache, seq, prompt)?;
        before_step(0)?;
        let mut hidden = first.hidden.to_vec_f32()?;
        let mut logits = first.last_logits;
        let mut ids = vec![];
        while ids.len() < max_new_tokens {
            let next = argmax(&logits);
            ids.push(next);
            on_token(next);
            if next == end_id || ids.len() == max_new_tokens {
                break;
            }
            before_step(ids.len())?;
            let e = Tensor::from_f32(self.embed(&[next])?, [1, d])?;
            let f = self.forward(exec, cache, seq, &e)?;
            hidden.extend(f.hidden.to_vec_f32()?);
            logits = f.last_logits;
        }
        Ok(Generation { ids, hidden })
    }
}

/// Index of the first maximum (torch.argmax's tie rule).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}
