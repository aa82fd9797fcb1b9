//! `pretrain.toml`: every hyperparameter of a run, on top of a named preset.
//!
//! Presets: `dinov2` (the DINOv2 defaults, ViT-S/14), `omnirad` (the same with global crops only
//! and schedules that finish inside its 10 epochs), `xr0` (X-ray: no left-right flips, no saturation
//! jitter; image + patch objectives). A file sets `preset = "…"` and overrides any key; unknown
//! keys are errors.

use std::path::{Path, PathBuf};

use omnirad_data::Normalize;
use omnirad_model::VitConfig;
use serde::{Deserialize, Serialize};

use crate::optim::ParamGroup;
use crate::schedule::Cosine;
use crate::ssl::{LossConfig, StepValues};

pub const PRESETS: &[&str] = &["dinov2", "omnirad", "xr0"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    pub preset: String,
    pub model: ModelSection,
    pub head: HeadSection,
    pub loss: LossConfig,
    pub mask: MaskSection,
    pub crops: CropsSection,
    pub optim: OptimSection,
    pub data: DataSection,
    pub run: RunSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A ViT preset (`vit_pico`, `vit_s14`, …), used when there is no `init`.
    pub arch: String,
    /// Start from these weights (model directory, checkpoint, or preset) instead of random init.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
    pub drop_path_rate: f64,
    pub drop_path_uniform: bool,
    /// Overrides of the `arch` preset, for custom sizes (ignored with `init`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed_dim: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub img_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_overlap: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_registers: Option<usize>,
    /// LayerScale initial value; 0 disables LayerScale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_scale_init: Option<f64>,
    /// `bf16`: the encoder's matmuls and attention and the heads' linears in bf16 on f32
    /// weights (mixed precision).
    #[serde(default)]
    pub precision: omnirad_model::Precision,
}

impl ModelSection {
    /// The encoder architecture: the `arch` preset with the overrides applied.
    pub fn vit(&self) -> Result<VitConfig, String> {
        let mut c = VitConfig::preset(&self.arch).ok_or_else(|| {
            format!(
                "model.arch {:?} is not a ViT preset ({})",
                self.arch,
                omnirad_model::vit::PRESETS.join(", ")
            )
        })?;
        let set = |slot: &mut usize, v: Option<usize>| {
            if let Some(v) = v {
                *slot = v;
            }
        };
        set(&mut c.embed_dim, self.embed_dim);
        set(&mut c.depth, self.depth);
        set(&mut c.num_heads, self.num_heads);
        set(&mut c.patch_size, self.patch_size);
        set(&mut c.img_size, self.img_size);
        set(&mut c.patch_overlap, self.patch_overlap);
        set(&mut c.num_registers, self.num_registers);
        if let Some(ls) = self.layer_scale_init {
            c.layer_scale_init = (ls > 0.0).then_some(ls);
        }
        c.drop_path_rate = self.drop_path_rate;
        c.drop_path_uniform = self.drop_path_uniform;
        c.validate()?;
        Ok(c)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadSection {
    /// DINO head weights to continue from (RAD-DINO's `dino_head.safetensors`, a DINOv2 training
    /// `.pth`, or a folder holding `dino_head.safetensors`); by default the `model.init` folder's
    /// `dino_head.safetensors` when there is one. Its sizes replace the ones below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
    pub prototypes: usize,
    pub hidden_dim: usize,
    pub bottleneck_dim: usize,
    pub nlayers: usize,
    pub separate_ibot_head: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskSection {
    /// Fraction of global-crop images that get a mask.
    pub probability: f64,
    pub min_ratio: f64,
    pub max_ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CropsSection {
    pub n_global: usize,
    pub global_size: usize,
    pub global_scale: (f64, f64),
    pub n_local: usize,
    pub local_size: usize,
    pub local_scale: (f64, f64),
    /// X-ray recipe: no left-right flips (laterality), no saturation jitter.
    pub xray: bool,
    /// Overrides of the DINOv2 photometric recipe, for all crops (small images need milder
    /// ones: a σ = 2 px blur erases a 28 px MedMNIST image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blur_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solarize_p: Option<f64>,
    /// Brightness and contrast jitter strength (DINOv2: 0.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f32>,
}

impl CropsSection {
    /// Crops cut into whole patches (an `--init` model's patch size is known only once loaded,
    /// so the data pipeline checks again).
    pub(crate) fn check_patch_multiple(&self, patch_size: usize) -> Result<(), String> {
        let local = (self.n_local > 0).then_some(("local", self.local_size));
        for (which, size) in [Some(("global", self.global_size)), local]
            .into_iter()
            .flatten()
        {
            if !size.is_multiple_of(patch_size) {
                return Err(format!(
                    "crops.{which}_size = {size} must be a multiple of the model's patch size {patch_size}"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScaling {
    /// lr = base · √(B / 1024) (DINOv2).
    Sqrt,
    /// lr = base · B / 256 (DINO v1).
    Linear,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    pub epochs: usize,
    /// Steps per epoch; 0 = one pass over the data (items / effective batch).
    pub epoch_length: usize,
    /// Images per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step (effective batch = batch_size · accumulate).
    pub accumulate: usize,
    pub base_lr: f64,
    pub lr_scaling: LrScaling,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub weight_decay: f64,
    pub weight_decay_end: f64,
    pub momentum_teacher: f64,
    pub momentum_teacher_end: f64,
    pub teacher_temp: f64,
    pub warmup_teacher_temp: f64,
    pub warmup_teacher_temp_epochs: f64,
    /// Global gradient-norm limit; 0 disables clipping.
    pub clip_grad: f64,
    pub freeze_last_layer_epochs: f64,
    pub layer_decay: f64,
    pub patch_embed_lr_mult: f64,
    /// Recompute the student's memory-bound activations (norms, GELU, elementwise ops) in the
    /// backward pass instead of keeping them: the same step with less memory, a few % slower.
    #[serde(default)]
    pub grad_checkpoint: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    /// Anything `omnirad embed` reads: folder, file, CSV manifest, npz.
    pub path: PathBuf,
    /// Relative sampling weight of this source.
    #[serde(default = "one")]
    pub weight: f64,
    /// npz split to use.
    #[serde(default = "train")]
    pub split: String,
}

fn one() -> f64 {
    1.0
}
fn train() -> String {
    "train".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub sources: Vec<SourceSection>,
    pub normalize: Normalize,
    /// DICOM window: `file`, a preset (`lung`, …), `C,W` or `pct:LO,HI`.
    pub window: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    pub seed: u64,
    pub checkpoint_every: usize,
    /// Also keep the teacher of every N-th step in `OUT/teacher-stepN/` (0: only the latest), to
    /// evaluate it along the run as DINOv2 does.
    pub keep_teacher_every: usize,
    /// Official MedMNIST files on which every kept teacher is scored by the k-NN probe (fitted
    /// on train, scored on val) into `OUT/eval.jsonl`; the best mean val macro-F1 so far is
    /// kept in `OUT/teacher-best/`, so the checkpoint to fine-tune is chosen without reading test.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eval_knn: Vec<PathBuf>,
    /// Collapse warnings fire when prototypes used or embedding std fall below these.
    pub min_prototypes_used: f64,
    pub min_embedding_std: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("unknown preset {0:?} (known: {known})", known = PRESETS.join(", "))]
    Preset(String),
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

impl PretrainConfig {
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let dinov2 = Self {
            preset: "dinov2".into(),
            model: ModelSection {
                arch: "vit_s14".into(),
                init: None,
                drop_path_rate: 0.3,
                drop_path_uniform: true,
                embed_dim: None,
                depth: None,
                num_heads: None,
                patch_size: None,
                patch_overlap: None,
                img_size: None,
                num_registers: None,
                layer_scale_init: None,
                precision: Default::default(),
            },
            head: HeadSection {
                init: None,
                prototypes: 65_536,
                hidden_dim: 2048,
                bottleneck_dim: 256,
                nlayers: 3,
                separate_ibot_head: false,
            },
            loss: LossConfig::default(),
            mask: MaskSection {
                probability: 0.5,
                min_ratio: 0.1,
                max_ratio: 0.5,
            },
            crops: CropsSection {
                n_global: 2,
                global_size: 224,
                global_scale: (0.32, 1.0),
                n_local: 8,
                local_size: 98,
                local_scale: (0.05, 0.32),
                xray: false,
                blur_p: None,
                solarize_p: None,
                jitter: None,
            },
            optim: OptimSection {
                epochs: 100,
                epoch_length: 1250,
                batch_size: 64,
                accumulate: 1,
                base_lr: 4e-3,
                lr_scaling: LrScaling::Sqrt,
                min_lr: 1e-6,
                warmup_epochs: 10.0,
                weight_decay: 0.04,
                weight_decay_end: 0.4,
                momentum_teacher: 0.992,
                momentum_teacher_end: 1.0,
                teacher_temp: 0.07,
                warmup_teacher_temp: 0.04,
                warmup_teacher_temp_epochs: 30.0,
                clip_grad: 3.0,
                freeze_last_layer_epochs: 1.0,
                layer_decay: 0.9,
                patch_embed_lr_mult: 0.2,
                grad_checkpoint: false,
            },
            data: DataSection {
                sources: Vec::new(),
                normalize: Normalize::Imagenet,
                window: "file".into(),
            },
            run: RunSection {
                seed: 0,
                checkpoint_every: 500,
                keep_teacher_every: 0,
                eval_knn: Vec::new(),
                min_prototypes_used: 2.0,
                min_embedding_std: 0.05,
            },
        };
        match name {
            "dinov2" => Ok(dinov2),
            // Global crops only; 10 epochs, so warm-ups that end inside the run (the stock
            // 10/30-epoch warm-ups would never finish).
            "omnirad" => {
                let mut c = dinov2;
                c.preset = "omnirad".into();
                c.crops.n_local = 0;
                c.optim.epochs = 10;
                c.optim.warmup_epochs = 1.0;
                c.optim.warmup_teacher_temp_epochs = 3.0;
                Ok(c)
            }
            "xr0" => {
                let mut c = dinov2;
                c.preset = "xr0".into();
                c.crops.xray = true;
                Ok(c)
            }
            other => Err(ConfigError::Preset(other.into())),
        }
    }

    /// Reads `path` over its preset (`preset_override` wins over the file's `preset`). Relative
    /// source and weight paths are taken relative to the file's folder and made absolute, so the
    /// resolved copy a run keeps in its own folder (read again by `--resume`) still finds them.
    pub fn load(path: &Path, preset_override: Option<&str>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.into(),
            source,
        })?;
        let parse_err = |msg: String| ConfigError::Parse {
            path: path.into(),
            msg,
        };
        let user: toml::Table = toml::from_str(&text).map_err(|e| parse_err(e.to_string()))?;
        let preset = preset_override
            .map(str::to_string)
            .or_else(|| {
                user.get("preset")
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "dinov2".into());
        // A preset named in the file is the file's error; one from --preset is the caller's.
        let preset_cfg = Self::preset(&preset).map_err(|e| match preset_override {
            None => parse_err(e.to_string()),
            Some(_) => e,
        })?;
        let base = toml::Table::try_from(preset_cfg).map_err(|e| parse_err(e.to_string()))?;
        let mut merged = toml::Value::Table(base);
        merge(&mut merged, toml::Value::Table(user));
        if let toml::Value::Table(t) = &mut merged {
            t.insert("preset".into(), toml::Value::String(preset));
        }
        let mut cfg: Self = merged
            .try_into()
            .map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let dir = std::path::absolute(dir.unwrap_or(Path::new(".")))
            .map_err(|e| parse_err(format!("resolving its folder: {e}")))?;
        for s in &mut cfg.data.sources {
            if s.path.is_relative() {
                s.path = dir.join(&s.path);
            }
        }
        for p in &mut cfg.run.eval_knn {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        // Weights given as relative paths are found the same way (preset names stay as they are).
        for spec in [&mut cfg.model.init, &mut cfg.head.init]
            .into_iter()
            .flatten()
        {
            let p = dir.join(&*spec);
            if Path::new(spec.as_str()).is_relative() && p.exists() {
                *spec = p.display().to_string();
            }
        }
        cfg.validate().map_err(|msg| ConfigError::Invalid {
            path: path.into(),
            msg,
        })?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Refuses sizes whose weights or one step's crops could not be allocated: they would end
    /// the process with an allocation failure before the first step.
    fn memory_check(&self, vit: &VitConfig) -> Result<(), String> {
        let h = &self.head;
        let heads = if h.init.is_some() {
            0.0
        } else {
            let one = omnirad_model::DinoHeadConfig {
                in_dim: vit.embed_dim,
                out_dim: h.prototypes,
                hidden_dim: h.hidden_dim,
                bottleneck_dim: h.bottleneck_dim,
                nlayers: h.nlayers,
            }
            .num_params();
            one * if h.separate_ibot_head { 2.0 } else { 1.0 }
        };
        // Weights and optimiser state live on the device, which may hold more than the host;
        // the host must still hold one copy of the weights (checkpoints are written from it).
        let weights = vit.num_params() + heads;
        let c = &self.crops;
        let side = |n: usize, size: usize| n as f64 * (size as f64).powi(2);
        // A step's micro-batches are all made before it runs.
        let images = self.optim.batch_size as f64 * self.optim.accumulate as f64;
        let crops = images
            * vit.in_chans as f64
            * (side(c.n_global, c.global_size) + side(c.n_local, c.local_size));
        let bytes = 4.0 * (weights + crops);
        if !omnirad_data::can_allocate(bytes) {
            return Err(format!(
                "the model's weights and one step's crops need {:.1} GB: more than this \
                 machine can allocate (model, head, crops and batch sizes)",
                bytes * 1e-9
            ));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), String> {
        let (c, o) = (&self.crops, &self.optim);
        if c.n_global == 0 || c.n_global + c.n_local < 2 {
            return Err("need at least one global crop and two views in all (crops.n_global, crops.n_local)".into());
        }
        if o.batch_size == 0 || o.accumulate == 0 || o.epochs == 0 {
            return Err(
                "optim.batch_size, optim.accumulate and optim.epochs must be positive".into(),
            );
        }
        type Range = (fn(f64) -> bool, &'static str);
        const POSITIVE: Range = (|v| v > 0.0, "> 0");
        const NON_NEGATIVE: Range = (|v| v >= 0.0, ">= 0");
        const UNIT: Range = (|v| (0.0..=1.0).contains(&v), "in [0, 1]");
        const DECAY: Range = (|v| v > 0.0 && v <= 1.0, "in (0, 1]");
        const BELOW_ONE: Range = (|v| (0.0..1.0).contains(&v), "in [0, 1)");
        let (l, m) = (&self.loss, &self.mask);
        let mut ranges = vec![
            ("optim.base_lr", o.base_lr, POSITIVE),
            ("optim.min_lr", o.min_lr, NON_NEGATIVE),
            ("optim.warmup_epochs", o.warmup_epochs, NON_NEGATIVE),
            ("optim.weight_decay", o.weight_decay, NON_NEGATIVE),
            ("optim.weight_decay_end", o.weight_decay_end, NON_NEGATIVE),
            ("optim.momentum_teacher", o.momentum_teacher, UNIT),
            ("optim.momentum_teacher_end", o.momentum_teacher_end, UNIT),
            ("optim.teacher_temp", o.teacher_temp, POSITIVE),
            ("optim.warmup_teacher_temp", o.warmup_teacher_temp, POSITIVE),
            (
                "optim.warmup_teacher_temp_epochs",
                o.warmup_teacher_temp_epochs,
                NON_NEGATIVE,
            ),
            ("optim.clip_grad", o.clip_grad, NON_NEGATIVE),
            (
                "optim.freeze_last_layer_epochs",
                o.freeze_last_layer_epochs,
                NON_NEGATIVE,
            ),
            ("optim.layer_decay", o.layer_decay, DECAY),
            (
                "optim.patch_embed_lr_mult",
                o.patch_embed_lr_mult,
                NON_NEGATIVE,
            ),
            ("model.drop_path_rate", self.model.drop_path_rate, BELOW_ONE),
            ("loss.dino_weight", l.dino_weight, NON_NEGATIVE),
            ("loss.ibot_weight", l.ibot_weight, NON_NEGATIVE),
            ("loss.koleo_weight", l.koleo_weight, NON_NEGATIVE),
            ("loss.student_temp", l.student_temp, POSITIVE),
            ("loss.center_momentum", l.center_momentum, UNIT),
            ("mask.probability", m.probability, UNIT),
            ("mask.min_ratio", m.min_ratio, UNIT),
            ("mask.max_ratio", m.max_ratio, UNIT),
            ("crops.global_scale[0]", c.global_scale.0, DECAY),
            ("crops.global_scale[1]", c.global_scale.1, DECAY),
        ];
        if c.n_local > 0 {
            ranges.push(("crops.local_scale[0]", c.local_scale.0, DECAY));
            ranges.push(("crops.local_scale[1]", c.local_scale.1, DECAY));
        }
        let optional = [
            (
                "model.layer_scale_init",
                self.model.layer_scale_init,
                NON_NEGATIVE,
            ),
            ("crops.blur_p", c.blur_p, UNIT),
            ("crops.solarize_p", c.solarize_p, UNIT),
            ("crops.jitter", c.jitter.map(f64::from), UNIT),
        ];
        ranges.extend(
            optional
                .into_iter()
                .filter_map(|(n, v, r)| Some((n, v?, r))),
        );
        if let Some((name, v, (_, want))) = ranges
            .iter()
            .find(|(_, v, (ok, _))| !(v.is_finite() && ok(*v)))
        {
            return Err(format!("{name} = {v} must be {want}"));
        }
        if c.global_scale.0 > c.global_scale.1
            || (c.n_local > 0 && c.local_scale.0 > c.local_scale.1)
        {
            return Err("crops.global_scale and crops.local_scale are [min, max] ranges".into());
        }
        let h = &self.head;
        if h.init.is_none()
            && [h.prototypes, h.hidden_dim, h.bottleneck_dim, h.nlayers].contains(&0)
        {
            return Err(
                "head.prototypes, hidden_dim, bottleneck_dim and nlayers must be positive".into(),
            );
        }
        if c.global_size == 0 || (c.n_local > 0 && c.local_size == 0) {
            return Err("crops.global_size and crops.local_size must be positive".into());
        }
        let channels = if self.model.init.is_none() {
            let vit = self.model.vit()?;
            c.check_patch_multiple(vit.patch_size)?;
            self.memory_check(&vit)?;
            Some(vit.in_chans)
        } else {
            None
        };
        self.data
            .normalize
            .validate(channels)
            .map_err(|e| format!("data.{e}"))?;
        if self.data.sources.is_empty() {
            return Err("no [[data.sources]]".into());
        }
        if !self.run.eval_knn.is_empty() && self.run.keep_teacher_every == 0 {
            return Err("run.eval_knn scores the kept teachers: set run.keep_teacher_every".into());
        }
        if let Some(p) =
            self.run.eval_knn.iter().find(|p| {
                omnirad_data::medmnist::parse_file_name(p).is_none_or(|(info, _)| info.is_3d)
            })
        {
            return Err(format!(
                "run.eval_knn: {} is not named like an official 2D MedMNIST file ({{name}}.npz or {{name}}_{{size}}.npz)",
                p.display()
            ));
        }
        if let Some(s) = self
            .data
            .sources
            .iter()
            .find(|s| !(s.weight > 0.0 && s.weight.is_finite()))
        {
            return Err(format!(
                "data source {}: weight must be positive",
                s.path.display()
            ));
        }
        if self.mask.min_ratio > self.mask.max_ratio {
            return Err("mask.min_ratio must be ≤ mask.max_ratio".into());
        }
        if self.loss.koleo_weight > 0.0 && o.batch_size < 2 {
            return Err("KoLeo needs optim.batch_size ≥ 2".into());
        }
        Ok(())
    }

    pub fn effective_batch(&self) -> usize {
        self.optim.batch_size * self.optim.accumulate
    }

    pub fn peak_lr(&self) -> f64 {
        let b = self.effective_batch() as f64;
        self.optim.base_lr
            * match self.optim.lr_scaling {
                LrScaling::Sqrt => (b / 1024.0).sqrt(),
                LrScaling::Linear => b / 256.0,
                LrScaling::None => 1.0,
            }
    }
}

/// Values of every schedule at each step of a run of `epochs × epoch_length` steps.
#[derive(Debug, Clone)]
pub struct Schedules {
    pub total_steps: usize,
    pub lr: Cosine,
    pub wd: Cosine,
    pub momentum: Cosine,
    pub teacher_temp: Cosine,
    pub freeze_last_layer: usize,
}

impl Schedules {
    pub fn new(cfg: &PretrainConfig, epoch_length: usize) -> Self {
        let o = &cfg.optim;
        let total = o.epochs * epoch_length;
        let ep = |e: f64| (e * epoch_length as f64).round() as usize;
        let tt_warm = ep(o.warmup_teacher_temp_epochs).min(total);
        Self {
            total_steps: total,
            lr: Cosine::new(cfg.peak_lr(), o.min_lr, total)
                .with_warmup(ep(o.warmup_epochs).min(total), 0.0),
            wd: Cosine::new(o.weight_decay, o.weight_decay_end, total),
            momentum: Cosine::new(o.momentum_teacher, o.momentum_teacher_end, total),
            // Linear from the warm-up value to the final one, then constant.
            teacher_temp: Cosine::new(o.teacher_temp, o.teacher_temp, tt_warm)
                .with_warmup(tt_warm, o.warmup_teacher_temp),
            freeze_last_layer: ep(o.freeze_last_layer_epochs),
        }
    }

    pub fn at(&self, step: usize) -> StepValues {
        StepValues {
            lr: self.lr.at(step),
            weight_decay: self.wd.at(step),
            momentum: self.momentum.at(step),
            teacher_temp: self.teacher_temp.at(step),
            freeze_last_layer: step < self.freeze_last_layer,
        }
    }
}

/// DINOv2's parameter groups for a ViT of `depth` blocks under `backbone.`:
/// LR × decay^(depth + 1 − layer) with layer 0 = patch embedding, position table and tokens,
/// layer i + 1 = block i, depth + 1 = final norm and heads; the patch embedding gets an extra
/// multiplier; biases, norms, LayerScale, the position table and the tokens have no weight decay.
pub fn param_group(
    path: &str,
    depth: usize,
    layer_decay: f64,
    patch_embed_mult: f64,
) -> ParamGroup {
    let rest = path.strip_prefix("backbone.");
    let layer = match rest {
        Some(r)
            if r.starts_with("patch_embed")
                || ["cls_token", "pos_embed", "mask_token", "reg_token"].contains(&r) =>
        {
            0
        }
        Some(r) if r.starts_with("blocks.") => r
            .split('.')
            .nth(1)
            .and_then(|i| i.parse::<usize>().ok())
            .map_or(depth + 1, |i| i + 1),
        _ => depth + 1,
    };
    let mut lr_mult = layer_decay.powi((depth + 1 - layer) as i32);
    if rest.is_some_and(|r| r.starts_with("patch_embed")) {
        lr_mult *= patch_embed_mult;
    }
    let last = path.rsplit('.').next().unwrap_or(path);
    // Unlike the DINOv2 code (which decays them), the position table and the tokens get no
    // weight decay, as in timm's `no_weight_decay`: they are embeddings, not weights.
    let no_wd = matches!(
        last,
        "bias" | "beta" | "gamma" | "pos_embed" | "cls_token" | "mask_token" | "reg_token"
    ) || path.split('.').any(|s| s.contains("norm"));
    ParamGroup {
        lr_mult,
        wd_mult: if no_wd { 0.0 } else { 1.0 },
    }
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}
