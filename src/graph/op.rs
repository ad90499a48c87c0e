//! The closed set of operations a graph can hold, with their shape rules.
//!
//! Layout conventions (all row-major, activations f32 on the CPU):
//! - row-wise ops (norms, activations, softmax, linear) work on the last dimension;
//! - image ops take channels-first `[.., C, H, W]` (convs, resize, norms-2d) except pixel-shuffle,
//!   which is channels-last `[.., H, W, C]` as in X-SAM;
//! - attention takes `q [Tq, heads*hd]`, `k [Tk, heads*hd]`, `v [Tk, heads*vd]`.

use crate::{Shape, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unary {
    GeluErf,
    GeluTanh,
    Relu,
    Silu,
}

#[derive(Debug, Clone)]
pub enum Op {
    /// Fed at run time.
    Input(Shape),
    /// Constant weights (any dtype), read where they are.
    Weight(Tensor),
    /// `x[.., k] · w[n, k]ᵀ (+ b[n])`; inputs `x, w[, b]`.
    Linear,
    /// `a[m, k] · b[k, n]` (or `b[n, k]` when transposed).
    MatMul {
        b_transposed: bool,
    },
    /// `a[B, m, k] · b[B, k, n]` (or `b[B, n, k]`).
    BatchedMatMul {
        b_transposed: bool,
    },
    /// Over the last dim; inputs `x[, w, b]`.
    LayerNorm {
        eps: f32,
    },
    /// SAM's LayerNorm2d over channels of `[.., C, H, W]`; inputs `x, w, b`.
    LayerNorm2d {
        eps: f32,
    },
    /// Over `[.., C, H, W]`; inputs `x, w, b`.
    GroupNorm {
        groups: usize,
        eps: f32,
    },
    /// Phi-3's RMSNorm; inputs `x, w`.
    RmsNorm {
        eps: f32,
    },
    Unary(Unary),
    /// `[.., 2I]` (gate | up) -> `[.., I]`.
    SiluGate,
    /// Over the last dim.
    Softmax,
    /// Rotate-half RoPE on `[T, heads*head_dim]`, token t at position `pos_offset + t`.
    Rope {
        heads: usize,
        head_dim: usize,
        theta: f32,
        pos_offset: usize,
    },
    /// Inputs `x[.., Cin, H, W], w[Cout, Cin, kh, kw][, b]`.
    Conv2d {
        stride: usize,
        pad: usize,
    },
    ResizeBilinear {
        out_h: usize,
        out_w: usize,
        align_corners: bool,
    },
    /// X-SAM pixel-shuffle 0.5 on channels-last `[.., H, W, C]` -> `[.., H/2, W/2, 4C]`.
    PixelShuffleDown,
    /// X-SAM pixel-shuffle 2 on channels-last `[.., H, W, C]` -> `[.., 2H, 2W, C/4]`.
    PixelShuffleUp,
    /// Inputs `q, k, v[, keep]` where `keep [Tq, Tk]` is nonzero where attention is allowed.
    Attention {
        heads: usize,
        scale: f32,
        causal: bool,
        window: Option<usize>,
        q_offset: usize,
    },
    /// Phi-3 attention through the paged KV cache of the executor's sequence: inputs
    /// `q [T, heads*hd], k [T, kv_dim], v [T, kv_dim]` (RoPE applied) for the tokens at positions
    /// `pos0..pos0+T`, whose slots the caller has already appended. Writes K/V into `layer`'s
    /// blocks, then attends causally with the sliding window.
    PagedAttention {
        layer: usize,
        pos0: usize,
        heads: usize,
        head_dim: usize,
        scale: f32,
        window: Option<usize>,
    },
    Add,
    Mul,
    /// `x[.., c] + row[c]`.
    AddRow,
    Scale(f32),
    Concat {
        axis: usize,
    },
    /// A view: same buffer, new shape.
    Reshape(Shape),
    Permute(Vec<usize>),
    Narrow {
        axis: usize,
        start: usize,
        len: usize,
    },
    /// Rows of a `[rows, cols]` table (embedding lookup).
    Gather {
        ids: Vec<u32>,
    },
    // ---- image encoders (feat/enc) ----
    /// SAM ViT attention with window partition and decomposed relative positions
    /// (`backend::cpu::sam_attention`): inputs `qkv [grid_h*grid_w, 3C], rel_pos_h [2Kh-1, hd],
    /// rel_pos_w [2Kw-1, hd][, qkv_bias [3C]]` -> `[grid_h*grid_w, C]`; K = `window` or the grid
    /// (global). Padded window positions are zero tokens through the qkv linear (= the bias).
    SamAttention {
        heads: usize,
        window: Option<usize>,
        grid_h: usize,
        grid_w: usize,
    },
    // ---- end image encoders ----
    // ---- segmentation ops (feat/seg): see `SegOp` at the end of this file ----
    Seg(SegOp),
    // ---- end segmentation ops ----
}

fn same(a: &Shape, b: &Shape, what: &str) -> Result<(), String> {
    if a != b {
        return Err(format!("{what}: shapes {a} and {b} differ"));
    }
    Ok(())
}

fn rank_at_least(s: &Shape, r: usize, what: &str) -> Result<(), String> {
    if s.rank() < r {
        return Err(format!("{what} needs rank >= {r}, got {s}"));
    }
    Ok(())
}

fn with_last(s: &Shape, n: usize) -> Shape {
    let mut d = s.dims().to_vec();
    if let Some(l) = d.last_mut() {
        *l = n;
    }
    Shape::new(d)
}

impl Op {
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Input(_) => "input",
            Op::Weight(_) => "weight",
            Op::Linear => "linear",
            Op::MatMul { .. } => "matmul",
            Op::BatchedMatMul { .. } => "batched_matmul",
            Op::LayerNorm { .. } => "layer_norm",
            Op::LayerNorm2d { .. } => "layer_norm_2d",
            Op::GroupNorm { .. } => "group_norm",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Unary(_) => "unary",
            Op::SiluGate => "silu_gate",
            Op::Softmax => "softmax",
            Op::Rope { .. } => "rope",
            Op::Conv2d { .. } => "conv2d",
            Op::ResizeBilinear { .. } => "resize_bilinear",
            Op::PixelShuffleDown => "pixel_shuffle_down",
            Op::PixelShuffleUp => "pixel_shuffle_up",
            Op::Attention { .. } => "attention",
            Op::PagedAttention { .. } => "paged_attention",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::AddRow => "add_row",
            Op::Scale(_) => "scale",
            Op::Concat { .. } => "concat",
            Op::Reshape(_) => "reshape",
            Op::Permute(_) => "permute",
            Op::Narrow { .. } => "narrow",
            Op::Gather { .. } => "gather",
            Op::SamAttention { .. } => "sam_attention",
            Op::Seg(s) => s.kind(),
        }
    }

    /// Views share their input's buffer instead of owning one.
    pub fn is_view(&self) -> bool {
        matches!(self, Op::Reshape(_))
    }

    /// Whether the node owns an arena buffer (constants are read in place).
    pub fn needs_buffer(&self) -> bool {
        !matches!(self, Op::Weight(_)) && !self.is_view()
    }

    pub fn infer_shape(&self, ins: &[&Shape]) -> Result<Shape, String> {
        let want = |n: std::ops::RangeInclusive<usize>| -> Result<(), String> {
            if n.contains(&ins.len()) {
                Ok(())
            } else {
                Err(format!("expects {n:?} inputs, got {}", ins.len()))
            }
        };
        match self {
            Op::Input(s) => {
                want(0..=0)?;
                Ok(s.clone())
            }
            Op::Weight(t) => {
                want(0..=0)?;
                Ok(t.shape().clone())
            }
            Op::Linear => {
                want(2..=3)?;
                let (x, w) = (ins[0], ins[1]);
                rank_at_least(x, 1, "x")?;
                if w.rank() != 2 || w.dims()[1] != x.last() {
                    return Err(format!("x {x} does not match weight {w} ([n, k])"));
                }
                if ins.len() == 3 && ins[2].dims() != [w.dims()[0]] {
                    return Err(format!("bias {} does not match weight {w}", ins[2]));
                }
                Ok(with_last(x, w.dims()[0]))
            }
            Op::MatMul { b_transposed } => {
                want(2..=2)?;
                let (a, b) = (ins[0].dims(), ins[1].dims());
                if a.len() != 2 || b.len() != 2 {
                    return Err("matmul takes 2-D operands".into());
                }
                let (bk, n) = if *b_transposed {
                    (b[1], b[0])
                } else {
                    (b[0], b[1])
                };
                if a[1] != bk {
                    return Err(format!("inner dims differ: {a:?} x {b:?}"));
                }
                Ok(Shape::new(vec![a[0], n]))
            }
            Op::BatchedMatMul { b_transposed } => {
                want(2..=2)?;
                let (a, b) = (ins[0].dims(), ins[1].dims());
                if a.len() != 3 || b.len() != 3 || a[0] != b[0] {
                    return Err(format!(
                        "batched matmul takes [B,m,k] x [B,..]: {a:?} x {b:?}"
                    ));
                }
                let (bk, n) = if *b_transposed {
                    (b[2], b[1])
                } else {
                    (b[1], b[2])
                };
                if a[2] != bk {
                    return Err(format!("inner dims differ: {a:?} x {b:?}"));
                }
                Ok(Shape::new(vec![a[0], a[1], n]))
            }
            Op::LayerNorm { .. } => {
                if ins.len() != 1 && ins.len() != 3 {
                    return Err("layer_norm takes x or x, w, b".into());
                }
                for p in &ins[1..] {
                    if p.dims() != [ins[0].last()] {
                        return Err(format!("param {p} does not match {}", ins[0]));
                    }
                }
                Ok(ins[0].clone())
            }
            Op::LayerNorm2d { .. } | Op::GroupNorm { .. } => {
                want(3..=3)?;
                rank_at_least(ins[0], 3, "x")?;
                let c = ins[0].dims()[ins[0].rank() - 3];
                for p in &ins[1..] {
                    if p.dims() != [c] {
                        return Err(format!("param {p} does not match channels {c}"));
                    }
                }
                if let Op::GroupNorm { groups, .. } = self {
                    if *groups == 0 || !c.is_multiple_of(*groups) {
                        return Err(format!("{c} channels not divisible into {groups} groups"));
                    }
                }
                Ok(ins[0].clone())
            }
            Op::RmsNorm { .. } => {
                want(2..=2)?;
                if ins[1].dims() != [ins[0].last()] {
                    return Err(format!("weight {} does not match {}", ins[1], ins[0]));
                }
                Ok(ins[0].clone())
            }
            Op::Unary(_) | Op::Softmax | Op::Scale(_) => {
                want(1..=1)?;
                Ok(ins[0].clone())
            }
            Op::SiluGate => {
                want(1..=1)?;
                if !ins[0].last().is_multiple_of(2) {
                    return Err(format!("last dim of {} is odd", ins[0]));
                }
                Ok(with_last(ins[0], ins[0].last() / 2))
            }
            Op::Rope {
                heads, head_dim, ..
            } => {
                want(1..=1)?;
                if ins[0].rank() != 2 || ins[0].last() != heads * head_dim || head_dim % 2 != 0 {
                    return Err(format!("rope on {} with {heads}x{head_dim}", ins[0]));
                }
                Ok(ins[0].clone())
            }
            Op::Conv2d { stride, pad } => {
                want(2..=3)?;
                let (x, w) = (ins[0].dims(), ins[1].dims());
                if x.len() < 3 || w.len() != 4 || x[x.len() - 3] != w[1] || *stride == 0 {
                    return Err(format!("conv2d of {x:?} with weight {w:?}"));
                }
                if ins.len() == 3 && ins[2].dims() != [w[0]] {
                    return Err(format!("bias {} does not match weight {w:?}", ins[2]));
                }
                let (h, wd) = (x[x.len() - 2] + 2 * pad, x[x.len() - 1] + 2 * pad);
                if h < w[2] || wd < w[3] {
                    return Err(format!("kernel {w:?} larger than padded input {x:?}"));
                }
                let mut d = x[..x.len() - 3].to_vec();
                d.extend([w[0], (h - w[2]) / stride + 1, (wd - w[3]) / stride + 1]);
                Ok(Shape::new(d))
            }
            Op::ResizeBilinear { out_h, out_w, .. } => {
                want(1..=1)?;
                rank_at_least(ins[0], 3, "x")?;
                let mut d = ins[0].dims().to_vec();
                let r = d.len();
                d[r - 2] = *out_h;
                d[r - 1] = *out_w;
                Ok(Shape::new(d))
            }
            Op::PixelShuffleDown | Op::PixelShuffleUp => {
                want(1..=1)?;
                rank_at_least(ins[0], 3, "x")?;
                let mut d = ins[0].dims().to_vec();
                let r = d.len();
                if matches!(self, Op::PixelShuffleDown) {
                    d[r - 3] = d[r - 3].div_ceil(2);
                    d[r - 2] = d[r - 2].div_ceil(2);
                    d[r - 1] *= 4;
                } else {
                    if !d[r - 1].is_multiple_of(4) {
                        return Err(format!("channels of {} not divisible by 4", ins[0]));
                    }
                    d[r - 3] *= 2;
                    d[r - 2] *= 2;
                    d[r - 1] /= 4;
                }
                Ok(Shape::new(d))
            }
            Op::Attention { heads, .. } => {
                want(3..=4)?;
                let (q, k, v) = (ins[0].dims(), ins[1].dims(), ins[2].dims());
                if q.len() != 2 || k.len() != 2 || v.len() != 2 || *heads == 0 {
                    return Err("attention takes 2-D q, k, v".into());
                }
                if q[1] != k[1] || k[0] != v[0] || q[1] % heads != 0 || v[1] % heads != 0 {
                    return Err(format!("q {q:?}, k {k:?}, v {v:?} with {heads} heads"));
                }
                if ins.len() == 4 && ins[3].dims() != [q[0], k[0]] {
                    return Err(format!("mask {} is not [Tq, Tk]", ins[3]));
                }
                Ok(Shape::new(vec![q[0], v[1]]))
            }
            Op::PagedAttention {
                heads, head_dim, ..
            } => {
                want(3..=3)?;
                let (q, k, v) = (ins[0].dims(), ins[1].dims(), ins[2].dims());
                if q.len() != 2
                    || q[1] != heads * head_dim
                    || k != v
                    || k.len() != 2
                    || k[0] != q[0]
                {
                    return Err(format!("q {q:?}, k {k:?}, v {v:?} with {heads}x{head_dim}"));
                }
                Ok(ins[0].clone())
            }
            Op::Add | Op::Mul => {
                want(2..=2)?;
                same(ins[0], ins[1], "elementwise")?;
                Ok(ins[0].clone())
            }
            Op::AddRow => {
                want(2..=2)?;
                if ins[1].dims() != [ins[0].last()] {
                    return Err(format!("row {} does not match {}", ins[1], ins[0]));
                }
                Ok(ins[0].clone())
            }
            Op::Concat { axis } => {
                if ins.is_empty() {
                    return Err("concat of nothing".into());
                }
                let r = ins[0].rank();
                if *axis >= r {
                    return Err(format!("axis {axis} out of range for {}", ins[0]));
                }
                let mut d = ins[0].dims().to_vec();
                for s in &ins[1..] {
                    let ok = s.rank() == r
                        && s.dims()
                            .iter()
                            .enumerate()
                            .all(|(i, &x)| i == *axis || x == d[i]);
                    if !ok {
                        return Err(format!("cannot concat {} and {s} on axis {axis}", ins[0]));
                    }
                    d[*axis] += s.dims()[*axis];
                }
                Ok(Shape::new(d))
            }
            Op::Reshape(s) => {
                want(1..=1)?;
                if s.checked_numel() != Some(ins[0].numel()) {
                    return Err(format!("cannot reshape {} into {s}", ins[0]));
                }
                Ok(s.clone())
            }
            Op::Permute(p) => {
                want(1..=1)?;
                let r = ins[0].rank();
                let mut seen = vec![false; r];
                if p.len() != r
                    || p.iter()
                        .any(|&i| i >= r || std::mem::replace(&mut seen[i], true))
                {
                    return Err(format!("{p:?} is not a permutation of {r} dims"));
                }
                Ok(Shape::new(
                    p.iter().map(|&i| ins[0].dims()[i]).collect::<Vec<_>>(),
                ))
            }
            Op::Narrow { axis, start, len } => {
                want(1..=1)?;
                let d = ins[0].dims();
                if *axis >= d.len() || start + len > d[*axis] {
                    return Err(format!("narrow {start}+{len} on axis {axis} of {}", ins[0]));
                }
                let mut d = d.to_vec();
                d[*axis] = *len;
                Ok(Shape::new(d))
            }
            Op::Gather { ids } => {
                want(1..=1)?;
                if ins[0].rank() != 2 {
                    return Err(format!("gather table {} is not 2-D", ins[0]));
                }
                let rows = ins[0].dims()[0];
                if let Some(bad) = ids.iter().find(|&&i| i as usize >= rows) {
                    return Err(format!("id {bad} out of range for {rows} rows"));
                }
                Ok(Shape::new(vec![ids.len(), ins[0].dims()[1]]))
            }
            // ---- image encoders (feat/enc) ----
            Op::SamAttention {
                heads,
                window,
                grid_h,
                grid_w,
            } => {
                want(3..=4)?;
                let qkv = ins[0].dims();
                let t = grid_h * grid_w;
                if qkv.len() != 2 || qkv[0] != t || !qkv[1].is_multiple_of(3) || t == 0 {
                    return Err(format!("qkv {} is not [{grid_h}*{grid_w}, 3C]", ins[0]));
                }
                let c = qkv[1] / 3;
                if *heads == 0 || !c.is_multiple_of(*heads) || *window == Some(0) {
                    return Err(format!(
                        "{heads} heads over {c} channels, window {window:?}"
                    ));
                }
                let hd = c / heads;
                let (sh, sw) = window.map_or((*grid_h, *grid_w), |w| (w, w));
                for (s, side, what) in [(ins[1], sh, "rel_pos_h"), (ins[2], sw, "rel_pos_w")] {
                    if s.dims() != [2 * side - 1, hd] {
                        return Err(format!("{what} {s} is not [{}, {hd}]", 2 * side - 1));
                    }
                }
                if ins.len() == 4 && ins[3].dims() != [3 * c] {
                    return Err(format!("qkv bias {} is not [{}]", ins[3], 3 * c));
                }
                Ok(Shape::new(vec![t, c]))
            } // ---- end image encoders ----
            Op::Seg(s) => s.infer_shape(ins),
        }
    }
}

// ==================================================================================================
// Segmentation ops (feat/seg): the pixel decoder's deformable attention and the pieces of the
// masked-attention decoder and class head that the general ops do not cover.
// ==================================================================================================

#[derive(Debug, Clone, PartialEq)]
pub enum SegOp {
    /// Multi-scale deformable attention (`backend::cpu::ms_deform_attn`). Inputs
    /// `value [Σ h·w, heads·hd]`, `offsets [Nq, heads·levels·points·2]`,
    /// `logits [Nq, heads·levels·points]` and optionally `reference [Nq, 2]`; without it the
    /// queries are the value tokens (`Nq = Σ h·w`) with references at their pixel centres.
    /// Output `[Nq, heads·hd]`.
    MsDeformAttn {
        heads: usize,
        points: usize,
        /// `(h, w)` per level, in the order of the value rows.
        levels: Vec<(usize, usize)>,
    },
    /// Mask2Former's attention mask: 1 where `sigmoid(x) >= 0.5` (attend), 0 where it blocks.
    MaskKeep,
    /// `x / max(||x||₂, eps)` over the last dim (`F.normalize`).
    L2Normalize { eps: f32 },
    /// `min(max(x, min), max)`.
    Clamp { min: f32, max: f32 },
}

impl SegOp {
    pub fn kind(&self) -> &'static str {
        match self {
            SegOp::MsDeformAttn { .. } => "ms_deform_attn",
            SegOp::MaskKeep => "mask_keep",
            SegOp::L2Normalize { .. } => "l2_normalize",
            SegOp::Clamp { .. } => "clamp",
        }
    }

    pub fn infer_shape(&self, ins: &[&Shape]) -> Result<Shape, String> {
        match self {
            SegOp::MsDeformAttn {
                heads,
                points,
                levels,
            } => {
                if ins.len() != 3 && ins.len() != 4 {
                    return Err(format!("expects 3 or 4 inputs, got {}", ins.len()));
                }
                let (v, o, l) = (ins[0].dims(), ins[1].dims(), ins[2].dims());
                let nv: usize = levels.iter().map(|&(h, w)| h * w).sum();
                let lp = levels.len() * points;
                if v.len() != 2 || v[0] != nv || *heads == 0 || v[1] % heads != 0 {
                    return Err(format!(
                        "value {v:?} is not [{nv}, heads*hd] for {heads} heads"
                    ));
                }
                let nq = o.first().copied().unwrap_or(0);
                if o != [nq, heads * lp * 2] || l != [nq, heads * lp] {
                    return Err(format!(
                        "offsets {o:?} / logits {l:?} do not match {heads} heads x {lp} points"
                    ));
                }
                if ins.len() == 4 {
                    if ins[3].dims() != [nq, 2] {
                        return Err(format!("reference {} is not [{nq}, 2]", ins[3]));
                    }
                } else if nq != nv {
                    return Err(format!(
                        "{nq} queries without references need {nv} (= value rows)"
                    ));
                }
                Ok(Shape::new(vec![nq, v[1]]))
            }
            SegOp::MaskKeep | SegOp::L2Normalize { .. } | SegOp::Clamp { .. } => {
                if ins.len() != 1 {
                    return Err(format!("expects 1 input, got {}", ins.len()));
                }
                Ok(ins[0].clone())
            }
        }
    }
}
