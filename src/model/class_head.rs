//! The decoder's conditioning from the LLM (architecture notes §6.4, §11): the post-final-norm
//! LLM hidden states go through `llm_projector`; each `<p>`..`</p>` span (both tags included)
//! is averaged into a phrase embedding, the state at `<SEG>` becomes the `<SEG>` embedding, and
//! the class table is `[phrases..., bg_embeds]`. The cosine logits themselves are computed in
//! the mask decoder's prediction head (`exp(logit_scale) · cos`, clamped to ±500).

use crate::graph::GraphExecutor;
use crate::model::config::{Config, TokenConfig};
use crate::model::projector::Projector;
use crate::weights::VarBuilder;
use crate::{Error, Result, Tensor};

/// `(start, end)` positions (inclusive) of every `<p>`..`</p>` span in `ids`, in order. A `<p>`
/// without a closing tag, or a `</p>` without an opening one, is ignored; a second `<p>` before
/// the `</p>` restarts the span.
pub fn phrase_spans(ids: &[u32], phrase_start: u32, phrase_end: u32) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut open = None;
    for (i, &t) in ids.iter().enumerate() {
        if t == phrase_start {
            open = Some(i);
        } else if t == phrase_end {
            if let Some(s) = open.take() {
                spans.push((s, i));
            }
        }
    }
    spans
}

/// Positions of `token` in `ids`.
pub fn positions(ids: &[u32], token: u32) -> Vec<usize> {
    ids.iter()
        .enumerate()
        .filter(|(_, &t)| t == token)
        .map(|(i, _)| i)
        .collect()
}

/// What the decoder needs from one LLM pass.
#[derive(Clone, Debug)]
pub struct Conditioning {
    /// `proj.cond_embeds` `[K, E]`.
    pub cond_embeds: Tensor,
    /// `proj.seg_embed` `[E]`.
    pub seg_embed: Tensor,
    /// `class_table` `[K+1, E]`: the phrases, then the background embedding.
    pub class_table: Tensor,
}

/// `llm_projector` and `bg_embeds`.
#[derive(Clone, Debug)]
pub struct ClassHead {
    llm_projector: Projector,
    /// `[E]`.
    bg: Vec<f32>,
    tokens: TokenConfig,
}

impl ClassHead {
    pub fn load(root: &VarBuilder, cfg: &Config) -> Result<Self> {
        let e = cfg.decoder.hidden_dim;
        Ok(ClassHead {
            llm_projector: Projector::llm(root, cfg)?,
            bg: root.get_f32("bg_embeds.weight", &[1, e])?.to_vec_f32()?,
            tokens: cfg.tokens.clone(),
        })
    }

    pub fn dim(&self) -> usize {
        self.bg.len()
    }

    /// `llm_projector` (for planning its graph).
    pub fn projector(&self) -> &Projector {
        &self.llm_projector
    }

    /// `proj.llm`: the projected states `[T, E]` of hidden states `[T, D]`.
    pub fn project(&self, exec: &mut dyn GraphExecutor, hidden: &Tensor) -> Result<Tensor> {
        self.llm_projector.forward(exec, "proj.llm", hidden)
    }

    /// Mean of the projected rows `start..=end` of each span: `[K, E]`.
    pub fn phrase_embeddings(
        &self,
        projected: &Tensor,
        spans: &[(usize, usize)],
    ) -> Result<Tensor> {
        let e = self.dim();
        let t = rows(projected, e)?;
        let x = projected.to_vec_f32()?;
        let mut out = Vec::with_capacity(spans.len() * e);
        for &(s, en) in spans {
            if s > en || en >= t {
                return Err(Error::Input(format!(
                    "phrase span {s}..={en} is outside the {t} projected states"
                )));
            }
            let n = (en - s + 1) as f32;
            let mut acc = vec![0f32; e];
            for r in s..=en {
                for (a, &v) in acc.iter_mut().zip(&x[r * e..(r + 1) * e]) {
                    *a += v;
                }
            }
            out.extend(acc.iter().map(|a| a / n));
        }
        Tensor::from_f32(out, [spans.len(), e])
    }

    /// The projected state at `position`: `[E]`.
    pub fn seg_embedding(&self, projected: &Tensor, position: usize) -> Result<Tensor> {
        let e = self.dim();
        let t = rows(projected, e)?;
        if position >= t {
            return Err(Error::Input(format!(
                "<SEG> position {position} is outside the {t} projected states"
            )));
        }
        Tensor::from_f32(
            projected.to_vec_f32()?[position * e..(position + 1) * e].to_vec(),
            [e],
        )
    }

    /// `[cond_embeds; bg]`: `[K+1, E]`.
    pub fn class_table(&self, cond_embeds: &Tensor) -> Result<Tensor> {
        let e = self.dim();
        let k = rows(cond_embeds, e)?;
        let mut v = cond_embeds.to_vec_f32()?;
        v.extend_from_slice(&self.bg);
        Tensor::from_f32(v, [k + 1, e])
    }

    /// Everything from one LLM pass: `hidden` `[T, D]` (post-final-norm states of the fed
    /// positions) and the ids at those positions. Needs exactly one `<SEG>` (the generic tasks'
    /// rule; use the lower-level functions for several).
    pub fn condition(
        &self,
        exec: &mut dyn GraphExecutor,
        hidden: &Tensor,
        ids: &[u32],
    ) -> Result<Conditioning> {
        if hidden.rank() != 2 || hidden.dims()[0] != ids.len() {
            return Err(Error::Input(format!(
                "hidden states {} do not match {} ids",
                hidden.shape(),
                ids.len()
            )));
        }
        let seg = positions(ids, self.tokens.seg);
        if seg.len() != 1 {
            return Err(Error::Input(format!(
                "expected exactly one <SEG> token, found {}",
                seg.len()
            )));
        }
        let proj = self.project(exec, hidden)?;
        let spans = phrase_spans(ids, self.tokens.phrase_start, self.tokens.phrase_end);
        let cond_embeds = self.phrase_embeddings(&proj, &spans)?;
        Ok(Conditioning {
            seg_embed: self.seg_embedding(&proj, seg[0])?,
            class_table: self.class_table(&cond_embeds)?,
            cond_embeds,
        })
    }
}

fn rows(t: &Tensor, e: usize) -> Result<usize> {
    if t.rank() != 2 || t.dims()[1] != e {
        return Err(Error::shape(
            "class_head",
            format!("{} is not [rows, {e}]", t.shape()),
        ));
    }
    Ok(t.dims()[0])
}
