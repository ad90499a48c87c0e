//! `config.json`: the model geometry (interfaces.md §1, normative).
//!
//! Parsing reads the JSON into a `serde_json::Value` and then each section field by field, so that
//! every missing field, wrong type and unknown key is reported at once with its full path
//! (`sam.window_size: invalid type: string "14", expected usize`), not only the first one.
//! [`Config::validate`] then checks the geometry (divisibility, layer indexes in range, head dims,
//! supported values) and also reports every violation at once. Loading runs both.

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use std::path::Path;

/// Reads one field of a section: the value, its default when absent, or `None` after
/// recording a problem.
fn field<T: DeserializeOwned>(
    obj: &Map<String, Value>,
    section: &str,
    name: &str,
    default: Option<T>,
    problems: &mut Vec<String>,
) -> Option<T> {
    match obj.get(name) {
        None => {
            if default.is_none() {
                problems.push(format!("{section}.{name}: missing"));
            }
            default
        }
        Some(v) => match T::deserialize(v) {
            Ok(x) => Some(x),
            Err(e) => {
                let mut shown = v.to_string();
                if shown.len() > 60 {
                    let cut = (0..=60)
                        .rev()
                        .find(|&i| shown.is_char_boundary(i))
                        .unwrap_or(0);
                    shown.truncate(cut);
                    shown.push_str("...");
                }
                problems.push(format!("{section}.{name}: {e} (found {shown})"));
                None
            }
        },
    }
}

/// Declares a config section: the struct (serialisable, field order = JSON order) and a
/// field-by-field parser. `field: Type = default` marks an optional field.
macro_rules! section {
    (
        $(#[$m:meta])*
        pub struct $name:ident [$sec:literal] {
            $( $(#[$fm:meta])* pub $field:ident : $ty:ty $(= $default:expr)? ),* $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Serialize)]
        pub struct $name {
            $( $(#[$fm])* pub $field: $ty, )*
        }

        impl $name {
            pub const SECTION: &'static str = $sec;
            const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];

            fn parse(v: Option<&Value>, problems: &mut Vec<String>) -> Option<Self> {
                let Some(v) = v else {
                    problems.push(format!("section `{}`: missing", $sec));
                    return None;
                };
                let Some(obj) = v.as_object() else {
                    problems.push(format!("section `{}`: must be an object, found {}", $sec, v));
                    return None;
                };
                for k in obj.keys() {
                    if !Self::FIELDS.contains(&k.as_str()) {
                        problems.push(format!(
                            "{}.{}: unknown field (expected one of: {})",
                            $sec, k, Self::FIELDS.join(", ")
                        ));
                    }
                }
                $( let $field: Option<$ty> =
                    field(obj, $sec, stringify!($field), None $( .or(Some($default)) )?, problems); )*
                Some(Self { $( $field: $field?, )* })
            }
        }
    };
}

section! {
    /// Phi-3 (`Phi3Config` subset).
    pub struct LlmConfig ["llm"] {
        pub vocab_size: usize,
        pub hidden_size: usize,
        pub intermediate_size: usize,
        pub num_hidden_layers: usize,
        pub num_attention_heads: usize,
        pub num_key_value_heads: usize,
        pub rms_norm_eps: f64,
        pub rope_theta: f64,
        pub max_position_embeddings: usize,
        /// A query at position i attends to key j iff `0 <= i - j < sliding_window`.
        pub sliding_window: usize,
        pub bos_token_id: usize,
    }
}

/// Resampling filter of the SigLIP preprocessing (PIL semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resample {
    Bilinear,
    Bicubic,
}

section! {
    /// SigLIP image encoder (`SiglipVisionConfig` subset).
    pub struct VisionConfig ["vision"] {
        pub hidden_size: usize,
        pub intermediate_size: usize,
        pub num_hidden_layers: usize,
        pub num_attention_heads: usize,
        pub image_size: usize,
        pub patch_size: usize,
        pub layer_norm_eps: f64,
        /// Index into `hidden_states` (embeddings + one entry per layer); negative counts from
        /// the end.
        pub select_layer: i64,
        pub resample: Resample = Resample::Bilinear,
    }
}

section! {
    /// SAM ViT segmentation encoder (`SamVisionConfig` subset).
    pub struct SamConfig ["sam"] {
        pub hidden_size: usize,
        pub mlp_dim: usize,
        pub num_hidden_layers: usize,
        pub num_attention_heads: usize,
        pub image_size: usize,
        pub patch_size: usize,
        pub window_size: usize,
        /// 0-based indexes of the blocks with global attention.
        pub global_attn_indexes: Vec<usize>,
        pub layer_norm_eps: f64,
    }
}

section! {
    pub struct ProjectorConfig ["projector"] {
        /// Index into the SAM `hidden_states`; negative counts from the end (-2 = the output of
        /// the second-to-last block).
        pub seg_select_layer: i64,
        /// Pixel-shuffle ratio before the seg projector (0.5 = 2x2 tokens merged).
        pub seg_downsample_ratio: f64,
    }
}

section! {
    pub struct ConnectorConfig ["connector"] {
        /// Indexes into the SAM `hidden_states` (1-based block outputs), one per feature level,
        /// highest resolution first.
        pub select_layers: Vec<usize>,
        /// Pixel-shuffle factor of each level: 2 (up), 1, 0.5 (down).
        pub scale_factors: Vec<f64>,
        pub hidden_size: usize,
    }
}

section! {
    /// Mask2Former pixel decoder and transformer decoder (subset).
    pub struct DecoderConfig ["decoder"] {
        pub hidden_dim: usize,
        pub mask_feature_size: usize,
        pub num_queries: usize,
        pub encoder_layers: usize,
        pub encoder_feedforward_dim: usize,
        /// Hugging Face convention: the decoder has `decoder_layers - 1` layers.
        pub decoder_layers: usize,
        pub dim_feedforward: usize,
        pub num_attention_heads: usize,
        pub encoder_n_points: usize,
        pub num_feature_levels: usize,
        pub group_norm_groups: usize,
    }
}

section! {
    pub struct TokenConfig ["tokens"] {
        pub seg: u32,
        pub phrase_start: u32,
        pub phrase_end: u32,
        pub end: u32,
    }
}

section! {
    pub struct RegionSamplerConfig ["region_sampler"] {
        pub num_points: usize,
    }
}

/// The whole model geometry. Field names and nesting are those of `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    pub model_type: String,
    pub llm: LlmConfig,
    pub vision: VisionConfig,
    pub sam: SamConfig,
    pub projector: ProjectorConfig,
    pub connector: ConnectorConfig,
    pub decoder: DecoderConfig,
    pub tokens: TokenConfig,
    pub region_sampler: RegionSamplerConfig,
}

/// The released X-SAM geometry: exactly the JSON of interfaces.md §1.
pub const FULL_PRESET_JSON: &str = r#"{
  "model_type": "xsam",
  "llm": {
    "vocab_size": 32014, "hidden_size": 3072, "intermediate_size": 8192,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
    "sliding_window": 2047, "bos_token_id": 1
  },
  "vision": {
    "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
    "num_attention_heads": 16, "image_size": 384, "patch_size": 14, "layer_norm_eps": 1e-6,
    "select_layer": -2, "resample": "bilinear"
  },
  "sam": {
    "hidden_size": 1024, "mlp_dim": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 1024, "patch_size": 16, "window_size": 14, "global_attn_indexes": [5, 11, 17, 23],
    "layer_norm_eps": 1e-6
  },
  "projector": { "seg_select_layer": -2, "seg_downsample_ratio": 0.5 },
  "connector": { "select_layers": [12, 18, 24], "scale_factors": [2.0, 1.0, 0.5], "hidden_size": 512 },
  "decoder": {
    "hidden_dim": 256, "mask_feature_size": 256, "num_queries": 200, "encoder_layers": 6,
    "encoder_feedforward_dim": 1024, "decoder_layers": 10, "dim_feedforward": 2048,
    "num_attention_heads": 8, "encoder_n_points": 4, "num_feature_levels": 3, "group_norm_groups": 32
  },
  "tokens": { "seg": 32011, "phrase_start": 32012, "phrase_end": 32013, "end": 32007 },
  "region_sampler": { "num_points": 256 }
}"#;

/// The test geometry: the same architecture with small numbers, chosen to exercise the awkward
/// paths: SAM grid 8 with window 3 (padded windows), global blocks not last, SigLIP with an
/// unused last layer, an LLM sliding window shorter than a typical prompt, and 4 decoder layers
/// (`decoder_layers` 5) so the level cycle wraps. Token ids are the real ones (vocab 32014).
pub const TINY_PRESET_JSON: &str = r#"{
  "model_type": "xsam",
  "llm": {
    "vocab_size": 32014, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
    "sliding_window": 48, "bos_token_id": 1
  },
  "vision": {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 2, "image_size": 56, "patch_size": 14, "layer_norm_eps": 1e-6,
    "select_layer": -2, "resample": "bilinear"
  },
  "sam": {
    "hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
    "image_size": 128, "patch_size": 16, "window_size": 3, "global_attn_indexes": [1, 3],
    "layer_norm_eps": 1e-6
  },
  "projector": { "seg_select_layer": -2, "seg_downsample_ratio": 0.5 },
  "connector": { "select_layers": [2, 3, 4], "scale_factors": [2.0, 1.0, 0.5], "hidden_size": 16 },
  "decoder": {
    "hidden_dim": 32, "mask_feature_size": 32, "num_queries": 10, "encoder_layers": 2,
    "encoder_feedforward_dim": 64, "decoder_layers": 5, "dim_feedforward": 64,
    "num_attention_heads": 4, "encoder_n_points": 4, "num_feature_levels": 3, "group_norm_groups": 8
  },
  "tokens": { "seg": 32011, "phrase_start": 32012, "phrase_end": 32013, "end": 32007 },
  "region_sampler": { "num_points": 16 }
}"#;

/// Names accepted by [`Config::preset`].
pub const PRESETS: &[&str] = &["full", "tiny"];

/// A pixel-shuffle factor (architecture notes §5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shuffle {
    /// s = 2: spatial x2, channels / 4.
    Up2,
    /// s = 1: identity.
    Identity,
    /// s = 0.5: spatial / 2, channels x4.
    Down2,
}

impl Shuffle {
    pub fn from_factor(s: f64) -> Option<Shuffle> {
        if s == 2.0 {
            Some(Shuffle::Up2)
        } else if s == 1.0 {
            Some(Shuffle::Identity)
        } else if s == 0.5 {
            Some(Shuffle::Down2)
        } else {
            None
        }
    }

    /// Output size of a side of length `n`.
    pub fn side(self, n: usize) -> usize {
        match self {
            Shuffle::Up2 => n * 2,
            Shuffle::Identity => n,
            Shuffle::Down2 => n / 2,
        }
    }

    /// Channels after the shuffle of `c` channels.
    pub fn channels(self, c: usize) -> usize {
        match self {
            Shuffle::Up2 => c / 4,
            Shuffle::Identity => c,
            Shuffle::Down2 => c * 4,
        }
    }

    /// `c * s` (the connector's last conv output channels for input width `c`).
    pub fn scale(self, c: usize) -> usize {
        match self {
            Shuffle::Up2 => c * 2,
            Shuffle::Identity => c,
            Shuffle::Down2 => c / 2,
        }
    }
}

/// Resolves a `hidden_states` index (`num_layers + 1` entries; negative = from the end).
fn resolve_layer(sel: i64, num_layers: usize) -> Option<usize> {
    let n = num_layers as i64 + 1;
    let k = if sel < 0 { n + sel } else { sel };
    (0..n).contains(&k).then_some(k as usize)
}

impl LlmConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }
    /// Rows of the fused `qkv_proj` weight: (heads + 2 kv heads) x head_dim.
    pub fn qkv_rows(&self) -> usize {
        (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim()
    }
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }
    /// Patches per side ("valid" convolution: 384 / 14 -> 27).
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
    /// `select_layer` as an index into `hidden_states` (0 = embeddings, k = output of layer k,
    /// 1-based); also the number of encoder layers that must run.
    pub fn select_index(&self) -> Option<usize> {
        resolve_layer(self.select_layer, self.num_hidden_layers)
    }
}

impl SamConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }
    /// Tokens per side of the encoder grid (64 for 1024 / 16).
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }
    pub fn is_global(&self, layer: usize) -> bool {
        self.global_attn_indexes.contains(&layer)
    }
    /// Side of the attention input of block `layer` (window or full grid); the rel-pos tables
    /// have `2 * side - 1` rows.
    pub fn attn_side(&self, layer: usize) -> usize {
        if self.is_global(layer) {
            self.grid()
        } else {
            self.window_size
        }
    }
}

impl DecoderConfig {
    /// Layers of the masked-attention decoder (`decoder_layers - 1`).
    pub fn num_layers(&self) -> usize {
        self.decoder_layers.saturating_sub(1)
    }
}

impl Config {
    /// A named preset: `full` (the released geometry) or `tiny` (tests).
    pub fn preset(name: &str) -> Result<Config> {
        let json = match name {
            "full" => FULL_PRESET_JSON,
            "tiny" => TINY_PRESET_JSON,
            _ => {
                return Err(Error::Input(format!(
                    "unknown preset `{name}` (expected one of: {})",
                    PRESETS.join(", ")
                )))
            }
        };
        Self::parse(json, &format!("<preset {name}>"))
    }

    /// Reads, parses and validates `config.json` (a file, or a model directory holding one).
    pub fn load(path: impl AsRef<Path>) -> Result<Config> {
        let mut path = path.as_ref().to_path_buf();
        if path.is_dir() {
            path = path.join("config.json");
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("reading config {}", path.display()), e))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates a config from JSON text.
    pub fn from_json_str(json: &str) -> Result<Config> {
        Self::parse(json, "<string>")
    }

    fn parse(json: &str, origin: &str) -> Result<Config> {
        let cfg = Self::parse_unvalidated(json, origin)?;
        let problems = cfg.problems();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(Error::Config {
                path: origin.to_string(),
                problems,
            })
        }
    }

    /// Parses without the geometry checks (still reports every missing / mistyped / unknown
    /// field at once).
    pub fn parse_unvalidated(json: &str, origin: &str) -> Result<Config> {
        let err = |problems: Vec<String>| Error::Config {
            path: origin.to_string(),
            problems,
        };
        let v: Value =
            serde_json::from_str(json).map_err(|e| err(vec![format!("not valid JSON: {e}")]))?;
        let Some(obj) = v.as_object() else {
            return Err(err(vec!["the top level must be a JSON object".to_string()]));
        };
        let mut p = Vec::new();
        const TOP: &[&str] = &[
            "model_type",
            "llm",
            "vision",
            "sam",
            "projector",
            "connector",
            "decoder",
            "tokens",
            "region_sampler",
        ];
        for k in obj.keys() {
            if !TOP.contains(&k.as_str()) {
                p.push(format!(
                    "{k}: unknown top-level key (expected one of: {})",
                    TOP.join(", ")
                ));
            }
        }
        let model_type = match obj.get("model_type") {
            None => {
                p.push("model_type: missing (expected \"xsam\")".to_string());
                None
            }
            // Another name is reported by the geometry checks, together with the rest.
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                p.push(format!(
                    "model_type: must be the string \"xsam\", found {other}"
                ));
                None
            }
        };
        let llm = LlmConfig::parse(obj.get("llm"), &mut p);
        let vision = VisionConfig::parse(obj.get("vision"), &mut p);
        let sam = SamConfig::parse(obj.get("sam"), &mut p);
        let projector = ProjectorConfig::parse(obj.get("projector"), &mut p);
        let connector = ConnectorConfig::parse(obj.get("connector"), &mut p);
        let decoder = DecoderConfig::parse(obj.get("decoder"), &mut p);
        let tokens = TokenConfig::parse(obj.get("tokens"), &mut p);
        let region_sampler = RegionSamplerConfig::parse(obj.get("region_sampler"), &mut p);
        if !p.is_empty() {
            return Err(err(p));
        }
        // All Some when no problem was recorded.
        match (
            model_type,
            llm,
            vision,
            sam,
            projector,
            connector,
            decoder,
            tokens,
            region_sampler,
        ) {
            (
                Some(model_type),
                Some(llm),
                Some(vision),
                Some(sam),
                Some(projector),
                Some(connector),
                Some(decoder),
                Some(tokens),
                Some(region_sampler),
            ) => Ok(Config {
                model_type,
                llm,
                vision,
                sam,
                projector,
                connector,
                decoder,
                tokens,
                region_sampler,
            }),
            _ => Err(err(vec!["incomplete config".to_string()])),
        }
    }

    /// The config as pretty JSON (what `config.json` holds).
    pub fn to_json_string(&self) -> String {
        // Serialising plain structs of numbers and strings cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Writes `config.json` text to `path`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_json_string() + "\n")
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    /// Checks the geometry; `Err(Error::Config)` lists every violation.
    pub fn validate(&self) -> Result<()> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Config {
                path: "<config>".to_string(),
                problems,
            })
        }
    }

    /// Every geometry violation, one message each (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        macro_rules! check {
            ($cond:expr, $($arg:tt)*) => {
                if !$cond {
                    p.push(format!($($arg)*));
                }
            };
        }
        let pos = |p: &mut Vec<String>, name: &str, v: usize| {
            if v == 0 {
                p.push(format!("{name} must be at least 1"));
            }
        };
        let eps = |p: &mut Vec<String>, name: &str, v: f64| {
            if !(v.is_finite() && v > 0.0) {
                p.push(format!("{name} must be a positive number, got {v}"));
            }
        };

        check!(
            self.model_type == "xsam",
            "model_type: unsupported model type `{}` (expected \"xsam\")",
            self.model_type
        );

        // ---- llm
        let l = &self.llm;
        for (n, v) in [
            ("llm.vocab_size", l.vocab_size),
            ("llm.hidden_size", l.hidden_size),
            ("llm.intermediate_size", l.intermediate_size),
            ("llm.num_hidden_layers", l.num_hidden_layers),
            ("llm.num_attention_heads", l.num_attention_heads),
            ("llm.num_key_value_heads", l.num_key_value_heads),
            ("llm.max_position_embeddings", l.max_position_embeddings),
            ("llm.sliding_window", l.sliding_window),
        ] {
            pos(&mut p, n, v);
        }
        eps(&mut p, "llm.rms_norm_eps", l.rms_norm_eps);
        eps(&mut p, "llm.rope_theta", l.rope_theta);
        if l.num_attention_heads > 0 {
            check!(
                l.hidden_size.is_multiple_of(l.num_attention_heads),
                "llm.hidden_size {} is not divisible by llm.num_attention_heads {}",
                l.hidden_size,
                l.num_attention_heads
            );
            check!(
                l.head_dim().is_multiple_of(2),
                "llm head dim {} (hidden_size / num_attention_heads) must be even for RoPE",
                l.head_dim()
            );
        }
        if l.num_key_value_heads > 0 {
            check!(
                l.num_attention_heads.is_multiple_of(l.num_key_value_heads),
                "llm.num_attention_heads {} is not a multiple of llm.num_key_value_heads {}",
                l.num_attention_heads,
                l.num_key_value_heads
            );
        }
        check!(
            l.bos_token_id < l.vocab_size,
            "llm.bos_token_id {} is outside the vocabulary ({})",
            l.bos_token_id,
            l.vocab_size
        );

        // ---- vision
        let v = &self.vision;
        for (n, x) in [
            ("vision.hidden_size", v.hidden_size),
            ("vision.intermediate_size", v.intermediate_size),
            ("vision.num_hidden_layers", v.num_hidden_layers),
            ("vision.num_attention_heads", v.num_attention_heads),
            ("vision.patch_size", v.patch_size),
        ] {
            pos(&mut p, n, x);
        }
        eps(&mut p, "vision.layer_norm_eps", v.layer_norm_eps);
        if v.num_attention_heads > 0 {
            check!(
                v.hidden_size.is_multiple_of(v.num_attention_heads),
                "vision.hidden_size {} is not divisible by vision.num_attention_heads {}",
                v.hidden_size,
                v.num_attention_heads
            );
        }
        check!(
            v.image_size >= v.patch_size && v.patch_size > 0,
            "vision.image_size {} is smaller than vision.patch_size {}",
            v.image_size,
            v.patch_size
        );
        check!(
            v.select_index().is_some(),
            "vision.select_layer {} is out of range for {} layers (hidden_states has {} entries)",
            v.select_layer,
            v.num_hidden_layers,
            v.num_hidden_layers + 1
        );

        // ---- sam
        let s = &self.sam;
        for (n, x) in [
            ("sam.hidden_size", s.hidden_size),
            ("sam.mlp_dim", s.mlp_dim),
            ("sam.num_hidden_layers", s.num_hidden_layers),
            ("sam.num_attention_heads", s.num_attention_heads),
            ("sam.patch_size", s.patch_size),
            ("sam.window_size", s.window_size),
        ] {
            pos(&mut p, n, x);
        }
        eps(&mut p, "sam.layer_norm_eps", s.layer_norm_eps);
        if s.num_attention_heads > 0 {
            check!(
                s.hidden_size.is_multiple_of(s.num_attention_heads),
                "sam.hidden_size {} is not divisible by sam.num_attention_heads {}",
                s.hidden_size,
                s.num_attention_heads
            );
        }
        if s.patch_size > 0 {
            check!(
                s.image_size.is_multiple_of(s.patch_size) && s.image_size > 0,
                "sam.image_size {} is not a positive multiple of sam.patch_size {}",
                s.image_size,
                s.patch_size
            );
        }
        let grid = s.grid();
        for (i, &g) in s.global_attn_indexes.iter().enumerate() {
            check!(
                g < s.num_hidden_layers,
                "sam.global_attn_indexes[{i}] = {g} is out of range for {} layers (0-based)",
                s.num_hidden_layers
            );
            check!(
                !s.global_attn_indexes[..i].contains(&g),
                "sam.global_attn_indexes lists {g} twice"
            );
        }

        // ---- projector
        let pr = &self.projector;
        check!(
            resolve_layer(pr.seg_select_layer, s.num_hidden_layers).is_some(),
            "projector.seg_select_layer {} is out of range for {} SAM layers (hidden_states has {} entries)",
            pr.seg_select_layer,
            s.num_hidden_layers,
            s.num_hidden_layers + 1
        );
        match Shuffle::from_factor(pr.seg_downsample_ratio) {
            None => p.push(format!(
                "projector.seg_downsample_ratio must be 2, 1 or 0.5, got {}",
                pr.seg_downsample_ratio
            )),
            Some(Shuffle::Down2) => check!(
                grid.is_multiple_of(2),
                "projector.seg_downsample_ratio 0.5 needs an even SAM grid, got {grid} \
                 (sam.image_size / sam.patch_size)"
            ),
            Some(Shuffle::Up2) => check!(
                s.hidden_size.is_multiple_of(4),
                "projector.seg_downsample_ratio 2 needs sam.hidden_size divisible by 4, got {}",
                s.hidden_size
            ),
            Some(Shuffle::Identity) => {}
        }

        // ---- decoder
        let d = &self.decoder;
        for (n, x) in [
            ("decoder.hidden_dim", d.hidden_dim),
            ("decoder.mask_feature_size", d.mask_feature_size),
            ("decoder.num_queries", d.num_queries),
            ("decoder.encoder_layers", d.encoder_layers),
            ("decoder.encoder_feedforward_dim", d.encoder_feedforward_dim),
            ("decoder.decoder_layers", d.decoder_layers),
            ("decoder.dim_feedforward", d.dim_feedforward),
            ("decoder.num_attention_heads", d.num_attention_heads),
            ("decoder.group_norm_groups", d.group_norm_groups),
        ] {
            pos(&mut p, n, x);
        }
        if d.num_attention_heads > 0 {
            check!(
                d.hidden_dim.is_multiple_of(d.num_attention_heads),
                "decoder.hidden_dim {} is not divisible by decoder.num_attention_heads {}",
                d.hidden_dim,
                d.num_attention_heads
            );
        }
        if d.group_norm_groups > 0 {
            check!(
                d.hidden_dim.is_multiple_of(d.group_norm_groups),
                "decoder.group_norm_groups {} does not divide decoder.hidden_dim {}",
                d.group_norm_groups,
                d.hidden_dim
            );
        }
        check!(
            d.encoder_n_points == 4,
            "decoder.encoder_n_points must be 4 (the only supported value), got {}",
            d.encoder_n_points
        );
        check!(
            d.num_feature_levels == 3,
            "decoder.num_feature_levels must be 3 (the only supported value), got {}",
            d.num_feature_levels
        );

        // ---- connector
        let c = &self.connector;
        pos(&mut p, "connector.hidden_size", c.hidden_size);
        check!(
            c.select_layers.len() == d.num_feature_levels,
            "connector.select_layers has {} entries, decoder.num_feature_levels is {}",
            c.select_layers.len(),
            d.num_feature_levels
        );
        check!(
            c.scale_factors.len() == c.select_layers.len(),
            "connector.scale_factors has {} entries, connector.select_layers has {}",
            c.scale_factors.len(),
            c.select_layers.len()
        );
        for (i, &k) in c.select_layers.iter().enumerate() {
            check!(
                (1..=s.num_hidden_layers).contains(&k),
                "connector.select_layers[{i}] = {k} is out of range 1..={} (SAM block outputs)",
                s.num_hidden_layers
            );
        }
        let mut prev: Option<f64> = None;
        for (i, &f) in c.scale_factors.iter().enumerate() {
            match Shuffle::from_factor(f) {
                None => p.push(format!(
                    "connector.scale_factors[{i}] must be 2, 1 or 0.5, got {f}"
                )),
                Some(Shuffle::Up2 | Shuffle::Down2) => check!(
                    s.hidden_size.is_multiple_of(2),
                    "connector.scale_factors[{i}] = {f} needs an even sam.hidden_size, got {}",
                    s.hidden_size
                ),
                Some(Shuffle::Identity) => {}
            }
            if Shuffle::from_factor(f) == Some(Shuffle::Down2) {
                check!(
                    grid.is_multiple_of(2),
                    "connector.scale_factors[{i}] = 0.5 needs an even SAM grid, got {grid}"
                );
            }
            if let Some(pf) = prev {
                if f >= pf {
                    p.push(format!(
                        "connector.scale_factors must decrease (highest resolution level first), got {:?}",
                        c.scale_factors
                    ));
                }
            }
            prev = Some(f);
        }

        // ---- tokens
        let t = &self.tokens;
        for (n, id) in [
            ("tokens.seg", t.seg),
            ("tokens.phrase_start", t.phrase_start),
            ("tokens.phrase_end", t.phrase_end),
            ("tokens.end", t.end),
        ] {
            check!(
                (id as usize) < l.vocab_size,
                "{n} = {id} is outside the vocabulary (llm.vocab_size {})",
                l.vocab_size
            );
        }
        let ids = [t.seg, t.phrase_start, t.phrase_end, t.end];
        for i in 0..ids.len() {
            for j in i + 1..ids.len() {
                check!(ids[i] != ids[j], "tokens: id {} is used twice", ids[i]);
            }
        }

        pos(
            &mut p,
            "region_sampler.num_points",
            self.region_sampler.num_points,
        );
        p
    }

    // ---------------------------------------------------------------- derived geometry

    /// SAM `hidden_states` index feeding the seg projector (resolved; valid configs only).
    pub fn seg_select_index(&self) -> usize {
        resolve_layer(self.projector.seg_select_layer, self.sam.num_hidden_layers).unwrap_or(0)
    }

    /// Seg projector shuffle.
    pub fn seg_shuffle(&self) -> Shuffle {
        Shuffle::from_factor(self.projector.seg_downsample_ratio).unwrap_or(Shuffle::Identity)
    }

    /// Seg projector input width (SAM channels after the shuffle).
    pub fn seg_projector_in(&self) -> usize {
        self.seg_shuffle().channels(self.sam.hidden_size)
    }

    /// Number of SAM-derived LLM tokens per image.
    pub fn num_seg_tokens(&self) -> usize {
        let side = self.seg_shuffle().side(self.sam.grid());
        side * side
    }

    /// Image tokens spliced into the LLM input per image (SigLIP then SAM).
    pub fn num_image_tokens(&self) -> usize {
        self.vision.num_patches() + self.num_seg_tokens()
    }

    /// Per connector level (highest resolution first): the shuffle.
    pub fn connector_shuffles(&self) -> Vec<Shuffle> {
        self.connector
            .scale_factors
            .iter()
            .map(|&f| Shuffle::from_factor(f).unwrap_or(Shuffle::Identity))
            .collect()
    }

    /// Per connector level: output channels (= pixel decoder `feature_channels`).
    pub fn connector_out_channels(&self) -> Vec<usize> {
        self.connector_shuffles()
            .iter()
            .map(|s| s.channels(s.scale(self.sam.hidden_size)))
            .collect()
    }

    /// Per connector level: output side length.
    pub fn connector_out_sides(&self) -> Vec<usize> {
        self.connector_shuffles()
            .iter()
            .map(|s| s.side(self.sam.grid()))
            .collect()
    }

    /// Number of SAM blocks that must run (the deepest hidden state any consumer reads).
    pub fn sam_layers_needed(&self) -> usize {
        self.connector
            .select_layers
            .iter()
            .copied()
            .chain([self.seg_select_index()])
            .max()
            .unwrap_or(0)
            .min(self.sam.num_hidden_layers)
    }

    /// Number of SigLIP layers that must run.
    pub fn vision_layers_needed(&self) -> usize {
        self.vision
            .select_index()
            .unwrap_or(self.vision.num_hidden_layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_validate() {
        for name in PRESETS {
            let c = Config::preset(name).unwrap();
            assert!(c.problems().is_empty(), "{name}: {:?}", c.problems());
            let back = Config::from_json_str(&c.to_json_string()).unwrap();
            assert_eq!(back, c);
        }
        assert!(Config::preset("huge").is_err());
    }

    #[test]
    fn full_preset_is_the_interface_json() {
        let c = Config::preset("full").unwrap();
        let a: Value = serde_json::to_value(&c).unwrap();
        let b: Value = serde_json::from_str(FULL_PRESET_JSON).unwrap();
        assert_eq!(a, b);
        assert_eq!(c.seg_select_index(), 23);
        assert_eq!(c.vision.select_index(), Some(26));
        assert_eq!(c.vision.num_patches(), 729);
        assert_eq!(c.num_seg_tokens(), 1024);
        assert_eq!(c.num_image_tokens(), 1753);
        assert_eq!(c.connector_out_channels(), vec![512, 1024, 2048]);
        assert_eq!(c.connector_out_sides(), vec![128, 64, 32]);
        assert_eq!(c.seg_projector_in(), 4096);
        assert_eq!(c.decoder.num_layers(), 9);
        assert_eq!(c.llm.qkv_rows(), 9216);
    }

    #[test]
    fn resolve() {
        assert_eq!(resolve_layer(-2, 24), Some(23));
        assert_eq!(resolve_layer(-1, 24), Some(24));
        assert_eq!(resolve_layer(-25, 24), Some(0));
        assert_eq!(resolve_layer(-26, 24), None);
        assert_eq!(resolve_layer(25, 24), None);
    }
}
