//! The library front door: [`Model::load`] a model directory, open a [`Session`] on an image (the
//! image side runs once), then [`Session::run`] any number of [`Request`]s on it.
//!
//! Flow of one request (interfaces.md §2, §5; architecture notes §6.3-§6.4, §12-§13): question
//! (first template) → chat prompt → chunked tokenization → splice (image block = SigLIP tokens
//! then SAM tokens; `<region>` = region-sampler vectors) → Phi-3 (forced answer in the same
//! prefill, or greedy generation) → `llm_projector` at the `<p>`..`</p>` spans and the `<SEG>`
//! token → mask decoder → task post-processing → the §4 JSON.
//!
//! Session reuse: the KV blocks of the shared prefix (BOS, `<|user|>\n` and the image block:
//! every token before the question's chunk) are computed once per session; each request forks
//! that sequence in the paged cache and runs only its suffix.

use crate::backend::cuda::CudaBackend;
use crate::graph::{CudaExecutor, DeviceWeights, Executor, GraphExecutor, Outputs, Plan};
use crate::hooks::{poll, LoadProgress, RunHooks};
use crate::image::{preprocess_prompt_mask, preprocess_sam, preprocess_siglip, Filter};
use crate::image::{GreyImage, RgbImage, SamInput};
use crate::kv::{KvConfig, PagedKvCache, SeqId};
use crate::model::class_head::{phrase_spans, positions, ClassHead};
use crate::model::connector::Connector;
use crate::model::mask_decoder::MaskDecoder;
use crate::model::phi3::Phi3;
use crate::model::pixel_decoder::{PixelDecoder, PixelDecoderOutput};
use crate::model::projector::Projector;
use crate::model::region::RegionSampler;
use crate::model::sam::SamEncoder;
use crate::model::siglip::SiglipEncoder;
use crate::model::splice::splice;
use crate::task::masks::{BitMask, MaskGeometry};
use crate::task::postprocess::{self, ClassInfo, MaskResult, Prediction};
use crate::task::prompt::{chat_prompt, encode_chunks, encode_text, PromptToken};
use crate::task::result::{ResultJson, Timings};
use crate::task::templates::{question, QuestionInput, Task, DEFAULT_FORCED_ANSWER};
use crate::{Config, Device, Error, MemoryPlan, Result, Tensor, Weights};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tokenizers::Tokenizer;

/// KV cache block size (tokens).
const KV_BLOCK: usize = 16;

/// A loaded model: configuration, tokenizer and every stage.
pub struct Model {
    pub(crate) cfg: Config,
    tokenizer: Tokenizer,
    pub(crate) sam: SamEncoder,
    pub(crate) siglip: SiglipEncoder,
    pub(crate) visual_proj: Projector,
    pub(crate) seg_proj: Projector,
    pub(crate) connector: Connector,
    pub(crate) pixel_decoder: PixelDecoder,
    pub(crate) mask_decoder: MaskDecoder,
    pub(crate) class_head: ClassHead,
    pub(crate) llm: Phi3,
    sampler: RegionSampler,
    /// Bytes of the mapped weight files.
    weights_bytes: u64,
    /// The weights on the GPU for `Device::Cuda`, shared by every session's executor.
    device: Option<Arc<DeviceWeights>>,
    /// On the GPU, the executor of the image side (SAM, SigLIP, projectors, connector, pixel
    /// decoder), kept by the model so that its captured CUDA graphs (fixed image size) are
    /// replayed for every session's image instead of being captured per session. Sessions that
    /// open concurrently take turns on it (one stream anyway).
    image_exec: Option<std::sync::Mutex<CudaExecutor>>,
}

/// A session's graph executor: the CPU one, or the CUDA one on the model's device weights.
enum SessionExecutor {
    Cpu(Executor),
    Cuda(Box<CudaExecutor>),
}

impl GraphExecutor for SessionExecutor {
    fn run_with_kv(
        &mut self,
        graph: &crate::graph::Graph,
        plan: &Plan,
        inputs: &[(crate::graph::NodeId, &Tensor)],
        kv: Option<(&mut PagedKvCache, SeqId)>,
    ) -> Result<Outputs> {
        match self {
            SessionExecutor::Cpu(e) => e.run_with_kv(graph, plan, inputs, kv),
            SessionExecutor::Cuda(e) => e.run_with_kv(graph, plan, inputs, kv),
        }
    }
}

/// One request on a session's image.
#[derive(Clone, Debug)]
pub struct Request {
    pub task: Task,
    /// Classes (things) for semantic / instance / panoptic.
    pub classes: Vec<String>,
    /// Stuff classes (panoptic; appended after `classes` for semantic / instance).
    pub stuff: Vec<String>,
    /// The question (conversation), expression (referring), sentence (reasoning).
    pub text: Option<String>,
    /// Visual prompts, each the size of the image it refers to.
    pub vprompts: Vec<GreyImage>,
    /// Cross-image vgd: the image the visual prompts are drawn on.
    pub vprompt_image: Option<RgbImage>,
    /// Forced mode with this answer.
    pub answer: Option<String>,
    /// Forced mode with [`DEFAULT_FORCED_ANSWER`] when `answer` is `None`.
    pub forced: bool,
    /// Generation bound (default 512).
    pub max_new_tokens: usize,
    /// Score threshold for instance / panoptic / vgd / interactive (default 0.5).
    pub threshold: f64,
    /// Collect the interfaces.md §3 intermediates in [`Output::dump`].
    pub dump: bool,
}

impl Default for Request {
    fn default() -> Self {
        Request {
            task: Task::Conversation,
            classes: vec![],
            stuff: vec![],
            text: None,
            vprompts: vec![],
            vprompt_image: None,
            answer: None,
            forced: false,
            max_new_tokens: 512,
            threshold: 0.5,
            dump: false,
        }
    }
}

impl Request {
    pub fn new(task: Task) -> Self {
        Request {
            task,
            ..Default::default()
        }
    }
}

/// What one request produced.
#[derive(Clone, Debug)]
pub struct Output {
    /// The interfaces.md §4 document.
    pub result: ResultJson,
    /// The result masks at image resolution (the JSON's, unencoded).
    pub masks: Vec<MaskResult>,
    /// `(name, f32 tensor)` per interfaces.md §3 when [`Request::dump`] was set.
    pub dump: Vec<(String, Tensor)>,
}

/// Device memory of a CUDA session (see [`Session::device_usage`]).
#[derive(Clone, Debug)]
pub struct DeviceUsage {
    pub weights_bytes: usize,
    pub kv_bytes: usize,
    pub peak_activation_bytes: usize,
    /// Op kind -> nodes run on the CPU because no kernel takes their shape.
    pub fallbacks: Vec<(String, usize)>,
}

/// The SAM input, the kept SAM hidden states and the seg-projector tokens of one image.
type SamSide = (SamInput, Vec<(usize, Tensor)>, Tensor);

/// Everything the image side computed.
struct ImageSide {
    sam_input: SamInput,
    siglip_pixels: Tensor,
    sam_hidden: Vec<(usize, Tensor)>,
    siglip_hidden: Vec<(usize, Tensor)>,
    /// `[1, Nv, D]`, `[1, Ns, D]`.
    proj_visual: Tensor,
    proj_seg: Tensor,
    connector: Vec<Tensor>,
    pixel: PixelDecoderOutput,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

impl Model {
    /// Loads `config.json`, the weights and `tokenizer.json` from `dir` and builds every stage.
    pub fn load(dir: impl AsRef<Path>, device: Device) -> Result<Model> {
        Self::load_with_progress(dir, device, &mut |_| true)
    }

    /// [`load`](Self::load), reporting progress in [0, 1] as it goes: 0 at the start, then after
    /// the config, the tokenizer, each weight file mapped and checked, and each stage built (in
    /// proportion to its weight bytes); never decreasing, exactly 1.0 last. `progress` returning
    /// false cancels the load with [`Error::Aborted`].
    pub fn load_with_progress(
        dir: impl AsRef<Path>,
        device: Device,
        progress: &mut dyn FnMut(f32) -> bool,
    ) -> Result<Model> {
        let dir = dir.as_ref();
        // Open the GPU first: without one, `--device cuda` fails before any loading.
        let backend = match device {
            Device::Cpu => None,
            Device::Cuda(i) => Some(Arc::new(CudaBackend::new(i)?)),
        };
        if !dir.is_dir() {
            return Err(Error::Input(format!(
                "model directory {} does not exist (create one with `xsam init` or `xsam convert`)",
                dir.display()
            )));
        }
        let mut progress = LoadProgress::new(progress);
        progress.report(0.0)?;
        let cfg = Config::load(dir)?;
        progress.report(0.02)?;
        let tokenizer = crate::tokenizer::load_tokenizer(dir)?;
        crate::tokenizer::check_tokenizer(&tokenizer, &cfg)?;
        progress.report(0.10)?;
        let weights = Weights::load_with_progress(dir, &mut |done, total| {
            progress.report(0.10 + 0.15 * done as f32 / total.max(1) as f32)
        })?;
        crate::model::check_weights(&weights, &cfg)?;
        progress.report(0.27)?;
        let root = weights.root();
        // The stages, in the order built: the rest of the way in proportion to weight bytes.
        let all = weights.bytes_under("").max(1);
        let sam_b = weights.bytes_under("segmentor.encoder.");
        let siglip_b = weights.bytes_under("visual_encoder.vision_model.");
        let llm_b = weights.bytes_under("llm.");
        let heads_b = all.saturating_sub(sam_b + siglip_b + llm_b);
        let mut done = 0u64;
        // On a GPU the upload takes the last part of the way.
        let build_span = if backend.is_some() { 0.40 } else { 0.72 };
        let mut built = |p: &mut LoadProgress, bytes: u64| {
            done += bytes;
            p.report(0.27 + build_span * (done as f32 / all as f32).min(1.0))
        };
        let sam = SamEncoder::for_xsam(&cfg, &root.pp("segmentor.encoder"))?;
        built(&mut progress, sam_b)?;
        let siglip = SiglipEncoder::for_xsam(&cfg.vision, &root.pp("visual_encoder.vision_model"))?;
        built(&mut progress, siglip_b)?;
        let visual_proj = Projector::visual(&root, &cfg)?;
        let seg_proj = Projector::seg(&root, &cfg)?;
        let connector = Connector::load(&root, &cfg)?;
        let pixel_decoder = PixelDecoder::load(&root, &cfg)?;
        let mask_decoder = MaskDecoder::load(&root, &cfg)?;
        let class_head = ClassHead::load(&root, &cfg)?;
        built(&mut progress, heads_b)?;
        let llm = Phi3::load(&root.pp("llm"), &cfg.llm)?;
        built(&mut progress, llm_b)?;
        let mut model = Model {
            sam,
            siglip,
            visual_proj,
            seg_proj,
            connector,
            pixel_decoder,
            mask_decoder,
            class_head,
            llm,
            sampler: RegionSampler::new(cfg.region_sampler.num_points),
            weights_bytes: weights.mapped_bytes(),
            tokenizer,
            cfg,
            device: None,
            image_exec: None,
        };
        if let Some(b) = backend {
            model.check_device_budget(&weights, &b)?;
            let dw = DeviceWeights::new(b);
            let total = DeviceWeights::bf16_bytes(&weights);
            let bar = crate::progress::bytes_bar(total as u64, "uploading weights", true);
            let base = 0.27 + 0.40;
            let mut cancelled = None;
            dw.preload(&weights, &mut |done, _| {
                bar.set_position(done as u64);
                let f = done as f32 / total.max(1) as f32;
                if cancelled.is_none() {
                    if let Err(e) = progress.report(base + (0.99 - base) * f.min(1.0)) {
                        cancelled = Some(e);
                    }
                }
            })?;
            bar.finish_and_clear();
            if let Some(e) = cancelled {
                return Err(e);
            }
            let dw = Arc::new(dw);
            model.image_exec = Some(std::sync::Mutex::new(CudaExecutor::new(dw.clone())));
            model.device = Some(dw);
        }
        progress.report(1.0)?;
        Ok(model)
    }

    /// What this model and one open session on it hold in memory (see [`MemoryPlan`]).
    pub fn memory_plan(&self) -> Result<MemoryPlan> {
        // The prefix as `session` splices it: its tokens with the image block in place of <image>.
        let prefix_len =
            self.prefix_tokens()?.len().saturating_sub(1) + self.cfg.num_image_tokens();
        let kv = self.kv_config(prefix_len)?;
        Ok(MemoryPlan {
            weights: self.weights_bytes,
            kv_pool: (kv.num_blocks * kv.bytes_per_block(4)) as u64,
            arena: crate::memory::arena_bytes(self, prefix_len)? as u64,
        })
    }

    /// The device this model runs on.
    pub fn device(&self) -> Device {
        match &self.device {
            Some(d) => Device::Cuda(d.backend().ordinal()),
            None => Device::Cpu,
        }
    }

    /// The model's weights on the GPU (`None` on the CPU).
    pub fn device_weights(&self) -> Option<&Arc<DeviceWeights>> {
        self.device.as_ref()
    }

    /// A fresh executor for this model's device.
    fn executor(&self) -> SessionExecutor {
        match &self.device {
            Some(d) => SessionExecutor::Cuda(Box::new(CudaExecutor::new(d.clone()))),
            None => SessionExecutor::Cpu(Executor::new()),
        }
    }

    /// A KV cache of `cfg`: on the GPU only the bookkeeping lives on the host.
    fn new_kv_cache(&self, cfg: KvConfig) -> Result<PagedKvCache> {
        match &self.device {
            Some(_) => Ok(PagedKvCache::metadata_only(cfg)),
            None => PagedKvCache::new(cfg),
        }
    }

    /// Fails with `Error::OutOfMemory` naming the parts when the weights (bf16), a session's KV
    /// pool (bf16) and the planner's peak activations (f32, see [`MemoryPlan`]) do not fit the
    /// card's free memory.
    fn check_device_budget(&self, weights: &Weights, b: &CudaBackend) -> Result<()> {
        let w = DeviceWeights::bf16_bytes(weights);
        let plan = self.memory_plan()?;
        // memory_plan counts the CPU's f32 KV pool; the device pool holds bf16.
        let kv = (plan.kv_pool / 2) as usize;
        b.check_budget(&[
            ("weights (bf16)", w),
            ("KV pool (bf16)", kv),
            ("activations (planned peak, f32)", plan.arena as usize),
        ])
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Opens a session on `image`: runs the image side once (preprocessing, SAM, SigLIP,
    /// projectors, connector, pixel decoder) and the LLM over the shared prompt prefix.
    pub fn session(&self, image: &RgbImage) -> Result<Session<'_>> {
        let mut exec = self.executor();
        let mut timings = Timings::default();
        let side =
            self.with_image_executor(&mut exec, |m, e| m.image_side(e, image, &mut timings))?;

        let t = Instant::now();
        let prefix_tokens = self.prefix_tokens()?;
        let image_block = image_block(&side)?;
        let spliced = splice(&self.llm, &prefix_tokens, Some(&image_block), &[])?;
        let mut cache = self.new_kv_cache(self.kv_config(spliced.ids.len())?)?;
        let prefix_seq = cache.new_sequence();
        let fwd = self
            .llm
            .forward(&mut exec, &mut cache, prefix_seq, &spliced.embeds)?;
        timings.push("llm_prefix", ms(t));
        Ok(Session {
            model: self,
            exec,
            cache,
            prefix_seq,
            prefix_tokens,
            prefix_embeds: spliced.embeds,
            prefix_hidden: fwd.hidden,
            side,
            image_size: (image.height, image.width),
            runs: 1,
            timings,
        })
    }

    /// The cheap checks of a request on an image of `(height, width)`, without running
    /// anything: its inputs (classes, text, visual prompts and their sizes) and that the prompt
    /// (image block and forced answer included) fits the LLM context. [`Session::run`] checks
    /// the same; calling this first avoids encoding an image for a request that must fail.
    pub fn check_request(&self, req: &Request, image_hw: (usize, usize)) -> Result<()> {
        check_request_inputs(req)?;
        let q = question(
            req.task,
            &QuestionInput {
                classes: &req.classes,
                stuff: &req.stuff,
                text: req.text.as_deref(),
                regions: req.vprompts.len(),
            },
        )?;
        let hw = req
            .vprompt_image
            .as_ref()
            .map_or(image_hw, |i| (i.height, i.width));
        for (i, m) in req.vprompts.iter().enumerate() {
            if (m.height, m.width) != hw {
                return Err(Error::Input(format!(
                    "visual prompt {} is {}x{} (w x h) but its image is {}x{}",
                    i + 1,
                    m.width,
                    m.height,
                    hw.1,
                    hw.0
                )));
            }
        }
        let tokens = encode_chunks(
            &self.tokenizer,
            &chat_prompt(&q),
            self.cfg.llm.bos_token_id as u32,
        )?;
        let mut n: usize = tokens
            .iter()
            .map(|t| match t {
                PromptToken::Image => self.cfg.num_image_tokens(),
                _ => 1,
            })
            .sum();
        if req.forced || req.answer.is_some() {
            let answer = req.answer.as_deref().unwrap_or(DEFAULT_FORCED_ANSWER);
            n += encode_text(&self.tokenizer, &format!("{answer}<|end|>"))?.len();
        }
        let ctx = self.cfg.llm.max_position_embeddings;
        if n > ctx {
            return Err(Error::Input(format!(
                "prompt too long: {n} positions (image block included) exceed the LLM context of {ctx}"
            )));
        }
        Ok(())
    }

    /// BOS, the chat template's text before `<image>`, then the image placeholder.
    fn prefix_tokens(&self) -> Result<Vec<PromptToken>> {
        let all = encode_chunks(
            &self.tokenizer,
            &chat_prompt(""),
            self.cfg.llm.bos_token_id as u32,
        )?;
        let at = all
            .iter()
            .position(|t| *t == PromptToken::Image)
            .ok_or_else(|| Error::Graph("the chat prompt has no <image>".into()))?;
        Ok(all[..=at].to_vec())
    }

    /// Room for the prefix plus one request under the sliding window (the forward releases
    /// blocks that fall out of it), with slack for copy-on-write.
    fn kv_config(&self, prefix_len: usize) -> Result<KvConfig> {
        let l = &self.cfg.llm;
        let live = l.max_position_embeddings.min(l.sliding_window + KV_BLOCK);
        let blocks = prefix_len.div_ceil(KV_BLOCK) + live.div_ceil(KV_BLOCK) + 4;
        let per_block = self.llm.kv_config(KV_BLOCK, usize::MAX)?.bytes_per_block(4);
        self.llm.kv_config(KV_BLOCK, blocks * per_block)
    }

    /// Runs `f` on the model's image-side executor (GPU), else on `fallback` (the session's).
    fn with_image_executor<T>(
        &self,
        fallback: &mut dyn GraphExecutor,
        f: impl FnOnce(&Self, &mut dyn GraphExecutor) -> Result<T>,
    ) -> Result<T> {
        match &self.image_exec {
            Some(m) => {
                let mut guard = m.lock().map_err(|_| Error::Backend {
                    backend: "cuda",
                    msg: "the image-side executor was poisoned by an earlier panic".into(),
                })?;
                f(self, &mut *guard)
            }
            None => f(self, fallback),
        }
    }

    fn sam_side(
        &self,
        exec: &mut dyn GraphExecutor,
        image: &RgbImage,
        timings: &mut Timings,
    ) -> Result<SamSide> {
        let t = Instant::now();
        let sam_input = preprocess_sam(image, self.cfg.sam.image_size)?;
        timings.push("preprocess_sam", ms(t));
        let t = Instant::now();
        let hidden = self.sam.forward(exec, &sam_input.pixel_values)?;
        timings.push("sam_encoder", ms(t));
        let t = Instant::now();
        let k = self.cfg.seg_select_index();
        let hs = find_state(&hidden, k, "sam")?;
        let proj_seg = self.seg_proj.forward(exec, "proj.seg", hs)?;
        timings.push("seg_projector", ms(t));
        Ok((sam_input, hidden, proj_seg))
    }

    fn image_side(
        &self,
        exec: &mut dyn GraphExecutor,
        image: &RgbImage,
        timings: &mut Timings,
    ) -> Result<ImageSide> {
        let (sam_input, sam_hidden, proj_seg) = self.sam_side(exec, image, timings)?;

        let t = Instant::now();
        let siglip_pixels = preprocess_siglip(
            image,
            self.cfg.vision.image_size,
            Filter::from(self.cfg.vision.resample),
        )?;
        timings.push("preprocess_siglip", ms(t));
        let t = Instant::now();
        let siglip_hidden = self.siglip.forward(exec, &siglip_pixels)?;
        timings.push("siglip_encoder", ms(t));
        let t = Instant::now();
        let k = self.cfg.vision.select_index().unwrap_or(0);
        let proj_visual = self.visual_proj.forward(
            exec,
            "proj.visual",
            find_state(&siglip_hidden, k, "siglip")?,
        )?;
        timings.push("visual_projector", ms(t));

        let t = Instant::now();
        let levels = self
            .cfg
            .connector
            .select_layers
            .iter()
            .map(|&k| find_state(&sam_hidden, k, "sam"))
            .collect::<Result<Vec<_>>>()?;
        let connector = self.connector.forward(exec, &levels)?;
        timings.push("connector", ms(t));
        let t = Instant::now();
        let refs: Vec<&Tensor> = connector.iter().collect();
        let pixel = self.pixel_decoder.forward(exec, &refs)?;
        timings.push("pixel_decoder", ms(t));
        Ok(ImageSide {
            sam_input,
            siglip_pixels,
            sam_hidden,
            siglip_hidden,
            proj_visual,
            proj_seg,
            connector,
            pixel,
        })
    }
}

/// Visual prompts only where the task takes them, a finite threshold.
fn check_request_inputs(req: &Request) -> Result<()> {
    if !req.task.uses_regions() && !req.vprompts.is_empty() {
        return Err(Error::Input(format!(
            "task `{}` does not take visual prompts (--vprompt is for interactive and vgd)",
            req.task.name()
        )));
    }
    if req.vprompt_image.is_some() && req.task != Task::Vgd {
        return Err(Error::Input(
            "--vprompt-image is only for cross-image vgd".into(),
        ));
    }
    if !req.threshold.is_finite() {
        return Err(Error::Input(format!(
            "threshold {} is not a number",
            req.threshold
        )));
    }
    Ok(())
}

fn find_state<'a>(hs: &'a [(usize, Tensor)], k: usize, what: &str) -> Result<&'a Tensor> {
    hs.iter()
        .find(|(i, _)| *i == k)
        .map(|(_, t)| t)
        .ok_or_else(|| Error::Graph(format!("{what} hidden state {k} was not kept")))
}

/// `[Nv + Ns, D]`: the SigLIP tokens then the SAM tokens.
fn image_block(side: &ImageSide) -> Result<Tensor> {
    let d = side.proj_visual.dims()[2];
    let mut v = side.proj_visual.to_vec_f32()?;
    v.extend(side.proj_seg.to_vec_f32()?);
    let n = v.len() / d;
    Tensor::from_f32(v, [n, d])
}

/// `[1, ..dims]` view of an f32 tensor (for the dump).
fn batch1(t: &Tensor) -> Result<Tensor> {
    let mut dims = vec![1];
    dims.extend_from_slice(t.dims());
    Tensor::from_f32(t.to_vec_f32()?, dims)
}

/// Concatenation of `[a, D]` and `[b, D]` rows.
fn cat_rows(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let d = a.dims()[1];
    let mut v = a.to_vec_f32()?;
    v.extend(b.to_vec_f32()?);
    let n = v.len() / d;
    Tensor::from_f32(v, [n, d])
}

/// A model bound to one image.
pub struct Session<'m> {
    model: &'m Model,
    exec: SessionExecutor,
    cache: PagedKvCache,
    prefix_seq: SeqId,
    prefix_tokens: Vec<PromptToken>,
    /// `[P, D]` spliced prefix and its post-norm states.
    prefix_embeds: Tensor,
    prefix_hidden: Tensor,
    side: ImageSide,
    /// `(height, width)` of the image.
    image_size: (usize, usize),
    runs: usize,
    timings: Timings,
}

/// The LLM part of one request.
struct LlmPass {
    /// Answer ids (forced: the answer and `<|end|>`; generate: every generated id).
    token_ids: Vec<u32>,
    /// Ids of the fed suffix positions (prompt suffix then fed answer ids); `u32::MAX` where a
    /// vector was injected.
    fed_ids: Vec<u32>,
    /// Number of prompt positions in `fed_ids`.
    prompt_len: usize,
    /// `[fed, D]` post-norm states of the fed suffix positions.
    hidden: Tensor,
    /// What the forward returned: `hidden`, preceded by the prefix's states in a fresh run.
    hidden_full: Tensor,
    /// `[fed, D]` spliced suffix input (fed-back generated tokens included).
    embeds: Tensor,
    last_logits: Vec<f32>,
}

impl<'m> Session<'m> {
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// How many times the image side was computed (1: on creation only).
    pub fn image_side_runs(&self) -> usize {
        self.runs
    }

    /// Image-side stage timings (ms), including the shared LLM prefix.
    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    /// On CUDA: device bytes of the weights, this session's KV pool and its activations' high
    /// mark, and the nodes that ran on the CPU (by op kind). `None` on the CPU.
    pub fn device_usage(&self) -> Option<DeviceUsage> {
        let SessionExecutor::Cuda(e) = &self.exec else {
            return None;
        };
        // The image side ran on the model's executor: count its fallbacks and peak too.
        let image = self
            .model
            .image_exec
            .as_ref()
            .and_then(|m| m.lock().ok())
            .map(|g| (g.fallbacks().clone(), g.peak_activation_bytes()));
        let mut fallbacks = e.fallbacks().clone();
        let mut peak = e.peak_activation_bytes();
        if let Some((f, p)) = image {
            for (k, v) in f {
                *fallbacks.entry(k).or_insert(0) += v;
            }
            peak = peak.max(p);
        }
        Some(DeviceUsage {
            weights_bytes: e.weights().bytes(),
            kv_bytes: e.kv_bytes(),
            peak_activation_bytes: peak,
            fallbacks: fallbacks.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        })
    }

    /// `(height, width)` of the session's image.
    /// Tokens of the shared prompt prefix (template + image block) run at session creation.
    pub fn prefix_len(&self) -> usize {
        self.prefix_embeds.dims().first().copied().unwrap_or(0)
    }

    pub fn image_size(&self) -> (usize, usize) {
        self.image_size
    }

    /// Bytes of this session's executor arena (grown to the largest graph run so far); on
    /// CUDA, the peak of live device activations.
    pub fn arena_bytes(&self) -> usize {
        match &self.exec {
            SessionExecutor::Cpu(e) => e.arena_bytes(),
            SessionExecutor::Cuda(e) => e.peak_activation_bytes(),
        }
    }

    /// Bytes of this session's KV pool (allocated when the session was opened: f32 on the CPU,
    /// bf16 on the GPU).
    pub fn kv_pool_bytes(&self) -> usize {
        match &self.exec {
            SessionExecutor::Cpu(_) => {
                let c = self.cache.config();
                c.num_blocks * c.bytes_per_block(4)
            }
            SessionExecutor::Cuda(e) => e.kv_bytes(),
        }
    }

    /// Runs one request.
    pub fn run(&mut self, req: &Request) -> Result<Output> {
        self.run_with_hooks(req, &mut RunHooks::default())
    }

    /// [`run`](Self::run), calling `on_token` for every generated id.
    pub fn run_with_progress(
        &mut self,
        req: &Request,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Output> {
        let mut hooks = RunHooks {
            on_token: Some(on_token),
            should_abort: None,
        };
        self.run_with_hooks(req, &mut hooks)
    }

    /// [`run`](Self::run) with caller hooks: `on_token` sees every generated id, `should_abort`
    /// is polled between stages (see [`RunHooks`]) and stops the run with [`Error::Aborted`]
    /// (no output; the session stays usable).
    pub fn run_with_hooks(&mut self, req: &Request, hooks: &mut RunHooks<'_>) -> Result<Output> {
        hooks.check("before it started")?;
        let total = Instant::now();
        let model = self.model;
        let cfg = &model.cfg;
        let mut timings = self.timings.clone();
        let mut dump: Vec<(String, Tensor)> = vec![];

        let t = Instant::now();
        let (suffix, regions, region_side) = self.prepare(req, &mut dump)?;
        timings.push("prompt", ms(t));
        hooks.check("after the prompt was prepared")?;

        let pass = self.llm_pass(req, &suffix, &regions, true, hooks, &mut timings)?;
        let tok = &model.tokenizer;
        let end = cfg.tokens.end;
        let shown: &[u32] = match pass.token_ids.split_last() {
            Some((&last, rest)) if last == end => rest,
            _ => &pass.token_ids,
        };
        let text = tok
            .decode(shown, false)
            .map_err(|e| Error::Tokenizer(format!("cannot decode the answer: {e}")))?;

        if req.dump {
            self.dump_image_side(&mut dump)?;
            dump.push((
                "llm.inputs_embeds".into(),
                batch1(&cat_rows(&self.prefix_embeds, &pass.embeds)?)?,
            ));
            dump.push((
                "llm.final_hidden".into(),
                batch1(&cat_rows(&self.prefix_hidden, &pass.hidden)?)?,
            ));
            let v = cfg.llm.vocab_size;
            dump.push((
                "llm.last_logits".into(),
                Tensor::from_f32(pass.last_logits.clone(), [v])?,
            ));
        }

        let masks = if req.task.segments() {
            hooks.check("before segmentation")?;
            let canvas = region_side.as_deref();
            self.segment(req, &pass, canvas, &mut dump, &mut timings, hooks)?
        } else {
            vec![]
        };
        timings.push("total_request", ms(total));
        let (h, w) = self.image_size;
        let result = ResultJson::new(
            req.task.name(),
            text,
            pass.token_ids.clone(),
            w,
            h,
            &masks,
            timings,
        );
        Ok(Output {
            result,
            masks,
            dump,
        })
    }

    /// Checks the request and builds the prompt suffix and the region vectors. Returns the
    /// suffix tokens, the region vectors and (interactive) the preprocessed prompt mask.
    #[allow(clippy::type_complexity)]
    fn prepare(
        &mut self,
        req: &Request,
        dump: &mut Vec<(String, Tensor)>,
    ) -> Result<(Vec<PromptToken>, Vec<Vec<f32>>, Option<Vec<u8>>)> {
        let model = self.model;
        let cfg = &model.cfg;
        check_request_inputs(req)?;
        let q = question(
            req.task,
            &QuestionInput {
                classes: &req.classes,
                stuff: &req.stuff,
                text: req.text.as_deref(),
                regions: req.vprompts.len(),
            },
        )?;
        let tokens = encode_chunks(
            &model.tokenizer,
            &chat_prompt(&q),
            cfg.llm.bos_token_id as u32,
        )?;
        let n = self.prefix_tokens.len();
        if tokens.len() < n || tokens[..n] != self.prefix_tokens[..] {
            return Err(Error::Graph(
                "the prompt does not start with the session's cached prefix".into(),
            ));
        }
        let suffix = tokens[n..].to_vec();
        if suffix.contains(&PromptToken::Image) {
            return Err(Error::Input(
                "the prompt text must not contain <image>".into(),
            ));
        }

        // Region vectors: on this image, or (cross-image vgd) on the prompt image.
        let mut regions = vec![];
        let mut prompt_canvas = None;
        if !req.vprompts.is_empty() {
            let s = cfg.sam.image_size;
            let cross;
            let (tokens_map, scaled, hw) = match &req.vprompt_image {
                Some(img) => {
                    let mut tm = Timings::default();
                    let (inp, _, seg) = model
                        .with_image_executor(&mut self.exec, |m, e| m.sam_side(e, img, &mut tm))?;
                    cross = seg;
                    (&cross, inp.scaled_size, (img.height, img.width))
                }
                None => (
                    &self.side.proj_seg,
                    self.side.sam_input.scaled_size,
                    self.image_size,
                ),
            };
            let masks = req
                .vprompts
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    preprocess_prompt_mask(m, hw, scaled, s).map_err(|e| match e {
                        Error::Input(msg) => {
                            Error::Input(format!("visual prompt {}: {msg}", i + 1))
                        }
                        e => e,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<&[u8]> = masks.iter().map(Vec::as_slice).collect();
            let vecs = model.sampler.sample(tokens_map, &refs, s)?;
            let d = cfg.llm.hidden_size;
            regions = vecs.to_vec_f32()?.chunks(d).map(<[f32]>::to_vec).collect();
            if req.dump {
                dump.push(("region.vectors".into(), vecs));
            }
            if req.task == Task::Interactive {
                prompt_canvas = masks.into_iter().next();
            }
        }
        Ok((suffix, regions, prompt_canvas))
    }

    /// Runs the LLM for a request after the prompt suffix; `reuse_prefix` forks the cached
    /// prefix, else the whole prompt is prefilled in a fresh sequence (for tests).
    fn llm_pass(
        &mut self,
        req: &Request,
        suffix: &[PromptToken],
        regions: &[Vec<f32>],
        reuse_prefix: bool,
        hooks: &mut RunHooks<'_>,
        timings: &mut Timings,
    ) -> Result<LlmPass> {
        let model = self.model;
        let cfg = &model.cfg;
        let llm = &model.llm;
        let d = cfg.llm.hidden_size;
        let forced = req.forced || req.answer.is_some();
        let mut tokens = suffix.to_vec();
        let mut answer_ids = vec![];
        if forced {
            let answer = req.answer.as_deref().unwrap_or(DEFAULT_FORCED_ANSWER);
            answer_ids = encode_text(&model.tokenizer, &format!("{answer}<|end|>"))?;
            tokens.extend(answer_ids.iter().map(|&i| PromptToken::Id(i)));
        }
        let t = Instant::now();
        let spliced = splice(llm, &tokens, None, regions)?;
        let prefix_len = self.prefix_embeds.dim(0)?;
        let total = prefix_len + spliced.ids.len();
        let ctx = cfg.llm.max_position_embeddings;
        if total > ctx {
            return Err(Error::Input(format!(
                "prompt too long: {total} positions (image block included) exceed the LLM context of {ctx}"
            )));
        }
        let prompt_len = spliced.ids.len() - answer_ids.len();
        let seq = if reuse_prefix {
            self.cache.fork(self.prefix_seq)?
        } else {
            self.cache.new_sequence()
        };
        let result = (|| -> Result<LlmPass> {
            let exec = &mut self.exec;
            let cache = &mut self.cache;
            let mut embeds = spliced.embeds.clone();
            let mut fed_ids: Vec<u32> = spliced.ids.iter().map(|i| i.unwrap_or(u32::MAX)).collect();
            // A fresh run prefills prefix and suffix as one sequence.
            let input = if reuse_prefix {
                spliced.embeds.clone()
            } else {
                cat_rows(&self.prefix_embeds, &spliced.embeds)?
            };
            let (token_ids, hidden) = if forced {
                let f = llm.forward(exec, cache, seq, &input)?;
                timings.push("llm_prefill", ms(t));
                hooks.check("after the LLM prefill")?;
                (answer_ids.clone(), f.hidden)
            } else {
                // Fed positions = prompt + max_new - 1 must fit the context.
                let max_new = req.max_new_tokens.min(ctx - total + 1);
                let RunHooks {
                    on_token,
                    should_abort,
                } = &mut *hooks;
                let g = llm.generate_with(
                    exec,
                    cache,
                    seq,
                    &input,
                    max_new,
                    cfg.tokens.end,
                    &mut |id| {
                        if let Some(f) = on_token.as_mut() {
                            f(id)
                        }
                    },
                    &mut |k| match k {
                        0 => poll(should_abort, "after the LLM prefill"),
                        1 => poll(should_abort, "after 1 generated token"),
                        _ => poll(should_abort, &format!("after {k} generated tokens")),
                    },
                )?;
                timings.push("llm_generate", ms(t));
                let fed = g.ids.len().saturating_sub(1);
                let back = &g.ids[..fed];
                fed_ids.extend_from_slice(back);
                if !back.is_empty() {
                    embeds = cat_rows(&embeds, &Tensor::from_f32(llm.embed(back)?, [fed, d])?)?;
                }
                let n = g.hidden.len() / d;
                (g.ids, Tensor::from_f32(g.hidden, [n, d])?)
            };
            // The prediction after the prompt: lm_head on the last prompt position.
            let last_logits = if req.dump {
                let off = if reuse_prefix { 0 } else { prefix_len };
                let row = hidden.narrow(0, off + prompt_len - 1, 1)?.contiguous()?;
                llm.logits(exec, &row)?
            } else {
                vec![]
            };
            // Hidden of the suffix only (a fresh run also computed the prefix).
            let n = hidden.dim(0)?;
            let hidden_full = hidden.clone();
            let hidden = if n > fed_ids.len() {
                hidden
                    .narrow(0, n - fed_ids.len(), fed_ids.len())?
                    .contiguous()?
            } else {
                hidden
            };
            Ok(LlmPass {
                token_ids,
                fed_ids,
                prompt_len,
                hidden,
                hidden_full,
                embeds,
                last_logits,
            })
        })();
        self.cache.free(seq)?;
        result
    }

    /// The post-norm LLM states `[T, D]` of every prompt position (forced answer included) for
    /// `req`, computed by forking the cached prefix (`reuse_prefix`) or by a fresh prefill of
    /// the whole prompt. Both must agree; exposed for tests.
    pub fn prompt_hidden(&mut self, req: &Request, reuse_prefix: bool) -> Result<Tensor> {
        let mut dump = vec![];
        let (suffix, regions, _) = self.prepare(req, &mut dump)?;
        let mut r = req.clone();
        r.max_new_tokens = 1;
        let pass = self.llm_pass(
            &r,
            &suffix,
            &regions,
            reuse_prefix,
            &mut RunHooks::default(),
            &mut Timings::default(),
        )?;
        if reuse_prefix {
            cat_rows(&self.prefix_hidden, &pass.hidden)
        } else {
            Ok(pass.hidden_full)
        }
    }

    fn dump_image_side(&self, dump: &mut Vec<(String, Tensor)>) -> Result<()> {
        let s = &self.side;
        dump.push((
            "input.sam_pixel_values".into(),
            s.sam_input.pixel_values.clone(),
        ));
        dump.push(("input.siglip_pixel_values".into(), s.siglip_pixels.clone()));
        for (k, t) in &s.sam_hidden {
            dump.push((format!("sam.hidden_states.{k}"), t.clone()));
        }
        for (k, t) in &s.siglip_hidden {
            dump.push((format!("siglip.hidden_states.{k}"), t.clone()));
        }
        dump.push(("proj.visual".into(), s.proj_visual.clone()));
        dump.push(("proj.seg".into(), s.proj_seg.clone()));
        for (i, t) in s.connector.iter().enumerate() {
            dump.push((format!("connector.level{i}"), t.clone()));
        }
        for (i, t) in s.pixel.multi_scale.iter().enumerate() {
            dump.push((format!("pixel_decoder.multi_scale.{i}"), t.clone()));
        }
        dump.push((
            "pixel_decoder.mask_features".into(),
            s.pixel.mask_features.clone(),
        ));
        Ok(())
    }

    /// Class conditioning, mask decoder and post-processing; no masks (interfaces.md §5.12)
    /// when the answer does not hold exactly one `<SEG>` or referring / reasoning do not have
    /// exactly one phrase.
    fn segment(
        &mut self,
        req: &Request,
        pass: &LlmPass,
        prompt_canvas: Option<&[u8]>,
        dump: &mut Vec<(String, Tensor)>,
        timings: &mut Timings,
        hooks: &mut RunHooks<'_>,
    ) -> Result<Vec<MaskResult>> {
        let model = self.model;
        let cfg = &model.cfg;
        let tk = &cfg.tokens;
        let p = pass.prompt_len;
        let seg: Vec<usize> = positions(&pass.fed_ids[p..], tk.seg)
            .into_iter()
            .map(|i| i + p)
            .collect();
        if seg.len() != 1 {
            return Ok(vec![]);
        }
        let spans: Vec<(usize, usize)> = if req.task == Task::Gcg {
            phrase_spans(&pass.fed_ids, tk.phrase_start, tk.phrase_end)
        } else {
            phrase_spans(&pass.fed_ids[..p], tk.phrase_start, tk.phrase_end)
        };
        let classes: Vec<ClassInfo> = match req.task {
            Task::Semantic | Task::Instance | Task::Panoptic => req
                .classes
                .iter()
                .map(|c| ClassInfo::thing(c.trim()))
                .chain(req.stuff.iter().map(|c| ClassInfo::stuff(c.trim())))
                .collect(),
            Task::Referring | Task::Reasoning => {
                if spans.len() != 1 {
                    return Ok(vec![]);
                }
                vec![ClassInfo::thing(req.text.as_deref().unwrap_or("").trim())]
            }
            Task::Interactive | Task::Vgd => (1..=req.vprompts.len())
                .map(|k| ClassInfo::thing(format!("region {k}")))
                .collect(),
            Task::Gcg => spans
                .iter()
                .map(|&(s, e)| {
                    let ids: Vec<u32> = pass.fed_ids[s + 1..e].to_vec();
                    model
                        .tokenizer
                        .decode(&ids, false)
                        .map(|t| ClassInfo::thing(t.trim()))
                        .map_err(|e| Error::Tokenizer(format!("cannot decode a phrase: {e}")))
                })
                .collect::<Result<_>>()?,
            Task::Conversation => return Ok(vec![]),
        };
        if classes.is_empty() {
            return Ok(vec![]);
        }
        if spans.len() != classes.len() {
            return Err(Error::Input(format!(
                "the prompt has {} <p>..</p> phrases but {} classes were given (class names must not contain <p> or </p>)",
                spans.len(),
                classes.len()
            )));
        }

        let t = Instant::now();
        let ch = &model.class_head;
        let proj = ch.project(&mut self.exec, &pass.hidden)?;
        let cond = ch.phrase_embeddings(&proj, &spans)?;
        let seg_embed = ch.seg_embedding(&proj, seg[0])?;
        let table = ch.class_table(&cond)?;
        timings.push("llm_projector", ms(t));
        hooks.check("before the mask decoder")?;

        let t = Instant::now();
        let ms_refs: Vec<&Tensor> = self.side.pixel.multi_scale.iter().collect();
        let out = model.mask_decoder.forward(
            &mut self.exec,
            &ms_refs,
            &self.side.pixel.mask_features,
            &seg_embed,
            &table,
        )?;
        timings.push("mask_decoder", ms(t));
        if req.dump {
            dump.push(("proj.cond_embeds".into(), cond.clone()));
            dump.push(("proj.seg_embed".into(), seg_embed.clone()));
            dump.push(("class_table".into(), table.clone()));
            dump.push(("final.class_logits".into(), out.class_logits.clone()));
            dump.push(("final.mask_logits".into(), out.mask_logits.clone()));
        }

        hooks.check("before post-processing")?;
        let t = Instant::now();
        let md = out.mask_logits.dims().to_vec();
        let (qn, gh, gw) = match md[..] {
            [q, h, w] => (q, h, w),
            _ => {
                return Err(Error::shape(
                    "mask decoder",
                    format!("mask logits {:?} are not [Q, H, W]", md),
                ))
            }
        };
        let class_logits = out.class_logits.to_vec_f32()?;
        let mask_logits = out.mask_logits.to_vec_f32()?;
        let s = cfg.sam.image_size;
        let pred = Prediction {
            class_logits: &class_logits,
            mask_logits: &mask_logits,
            num_queries: qn,
            geometry: MaskGeometry {
                grid: (gh, gw),
                canvas: s,
                scaled: self.side.sam_input.scaled_size,
                image: self.image_size,
            },
        };
        let thr = req.threshold;
        let masks = match req.task {
            Task::Semantic => postprocess::semantic(&pred, &classes)?,
            Task::Instance | Task::Vgd => postprocess::instance(&pred, &classes, thr)?,
            Task::Panoptic => postprocess::panoptic(&pred, &classes, thr)?,
            Task::Referring | Task::Reasoning => postprocess::referring(&pred, &classes[0].name)?,
            Task::Gcg => {
                let names: Vec<String> = classes.iter().map(|c| c.name.clone()).collect();
                postprocess::gcg(&pred, &names)?
            }
            Task::Interactive => {
                let canvas = prompt_canvas
                    .ok_or_else(|| Error::Input("interactive needs one --vprompt".into()))?;
                let prompt = BitMask::from_u8(s, s, canvas)?;
                postprocess::interactive(&pred, &classes[0].name, thr, &prompt)?
            }
            Task::Conversation => vec![],
        };
        timings.push("postprocess", ms(t));
        Ok(masks)
    }
}

/// Writes `(name, tensor)` pairs as f32 safetensors (the `--dump` file).
pub fn write_dump(path: impl AsRef<Path>, dump: &[(String, Tensor)]) -> Result<()> {
    let path = path.as_ref();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = dump
        .iter()
        .map(|(n, t)| {
            let v = t.to_vec_f32()?;
            Ok((
                n.clone(),
                t.dims().to_vec(),
                bytemuck::cast_slice(&v).to_vec(),
            ))
        })
        .collect::<Result<_>>()?;
    let views = data
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Graph(format!("dump tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        msg: format!("cannot write the dump: {e}"),
    })
}
