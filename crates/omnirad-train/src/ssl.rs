//! The DINOv2 meta-architecture: a student ViT + heads trained by gradient, a teacher copy updated
//! as an exponential moving average, and one training step that combines
//!
//! ```text
//! L = w_dino · DINO(student class tokens of every view, teacher targets of the other global views)
//!   + w_ibot · iBOT(student masked patch tokens, teacher targets of the same unmasked patches)
//!   + w_koleo · Σ_global-crops KoLeo(student class tokens)
//! θ_teacher ← m·θ_teacher + (1 − m)·θ_student          after every optimiser step
//! ```
//! The teacher sees the global crops unmasked; the student sees the same crops with the masked
//! patch embeddings replaced by the mask token, plus the local crops.

use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use omnirad_model::dino_head::l2_normalize;
use omnirad_model::{
    CheckpointStrategy, DinoHead, DinoHeadConfig, NoCheckpointing, Precision, Train, Vit, VitConfig,
};
use serde::{Deserialize, Serialize};

use crate::loss::{cross_entropy, ibot_patch_loss, koleo_loss, sinkhorn_knopp, Center};
use crate::optim::{AdamW, ParamGroup, StepSettings};
use crate::params;

#[derive(Module, Debug)]
pub struct SslModel<B: Backend> {
    pub backbone: Vit<B>,
    pub dino_head: DinoHead<B>,
    /// A separate iBOT head; `None` shares the DINO head (DINOv2's default for ViT-S/B).
    pub ibot_head: Option<DinoHead<B>>,
}

impl<B: Backend> SslModel<B> {
    pub fn init(
        vit: &VitConfig,
        head: &DinoHeadConfig,
        separate_ibot_head: bool,
        device: &B::Device,
    ) -> Self {
        Self {
            backbone: vit.init(device),
            dino_head: head.init(device),
            ibot_head: separate_ibot_head.then(|| head.init(device)),
        }
    }

    /// Runs the encoder's and the heads' products in `p` (parameters stay f32).
    pub fn with_precision(self, p: Precision) -> Self {
        Self {
            backbone: self.backbone.with_precision(p),
            dino_head: self.dino_head.with_precision(p),
            ibot_head: self.ibot_head.map(|h| h.with_precision(p)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Centering {
    /// Softmax of EMA-centred logits (DINO v1, DINOv2 ViT-S/B).
    Center,
    /// Sinkhorn-Knopp, 3 iterations (DINOv2 ViT-L/g, SwAV).
    SinkhornKnopp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    pub dino_weight: f64,
    /// 0 turns masking and the patch objective off.
    pub ibot_weight: f64,
    pub koleo_weight: f64,
    pub student_temp: f64,
    pub centering: Centering,
    pub center_momentum: f64,
    pub sinkhorn_iterations: usize,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            dino_weight: 1.0,
            ibot_weight: 1.0,
            koleo_weight: 0.1,
            student_temp: 0.1,
            centering: Centering::Center,
            center_momentum: 0.9,
            sinkhorn_iterations: 3,
        }
    }
}

/// One micro-batch of B images on the host: crop-major views (all first crops, then all second…).
#[derive(Debug, Clone)]
pub struct SslBatch {
    pub batch: usize,
    pub n_global: usize,
    pub n_local: usize,
    pub globals: Vec<f32>,
    pub global_shape: [usize; 4],
    pub locals: Vec<f32>,
    pub local_shape: [usize; 4],
    /// One row-major patch mask per global image (n_global · B), true = masked.
    pub masks: Vec<Vec<bool>>,
}

/// Schedule values for one step.
#[derive(Debug, Clone, Serialize)]
pub struct StepValues {
    pub lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub teacher_temp: f64,
    pub freeze_last_layer: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepStats {
    pub loss: f64,
    pub dino: f64,
    pub ibot: f64,
    pub koleo: f64,
    pub grad_norm: f64,
    /// Mean entropy of the teacher's class-token targets (nats); 0 when each is one-hot.
    pub teacher_entropy: f64,
    /// exp(entropy of the batch-mean target): how many prototypes the teacher really uses.
    pub prototypes_used: f64,
    /// Per-dimension std over the batch of ℓ2-normalised student class tokens, × √D: about 1 for
    /// a well-spread embedding, 0 when every image maps to the same point.
    pub embedding_std: f64,
}

/// Student (with gradients), EMA teacher, optimizer and centres. `C`: which activations the
/// student's backward pass keeps (see [`Train`]).
pub struct SslTrainer<B: Backend, C: CheckpointStrategy = NoCheckpointing> {
    /// `Some` between calls ([`SslTrainer::student`]): the optimiser step takes the student by
    /// value, and a clone left here would make it copy every parameter before updating it.
    pub student: Option<SslModel<Train<B, C>>>,
    pub teacher: SslModel<B>,
    pub opt: AdamW<B>,
    pub dino_center: Center<B>,
    pub ibot_center: Center<B>,
    pub loss: LossConfig,
    pub clip: Option<f64>,
    pub device: B::Device,
}

impl<B: Backend> SslTrainer<B> {
    /// Teacher = student at the start, as in DINOv2.
    pub fn new(
        student: SslModel<B>,
        loss: LossConfig,
        clip: Option<f64>,
        device: &B::Device,
    ) -> Self {
        Self::with_strategy(student, loss, clip, device)
    }
}

impl<B: Backend, C: CheckpointStrategy> SslTrainer<B, C> {
    /// [`SslTrainer::new`] with the checkpointing strategy `C`.
    pub fn with_strategy(
        student: SslModel<B>,
        loss: LossConfig,
        clip: Option<f64>,
        device: &B::Device,
    ) -> Self {
        let k = student.dino_head.out_dim();
        params::materialize(&student);
        let teacher = student.clone();
        Self {
            student: Some(trainable_student(student)),
            teacher,
            opt: AdamW::new(0.9, 0.999, 1e-8),
            dino_center: Center::new(k, loss.center_momentum, device),
            ibot_center: Center::new(k, loss.center_momentum, device),
            loss,
            clip,
            device: device.clone(),
        }
    }

    fn teacher_targets(&mut self, logits: Tensor<B, 2>, temp: f64, patches: bool) -> Tensor<B, 2> {
        match self.loss.centering {
            Centering::SinkhornKnopp => sinkhorn_knopp(logits, temp, self.loss.sinkhorn_iterations),
            Centering::Center if patches => self.ibot_center.softmax_center(logits, temp),
            Centering::Center => self.dino_center.softmax_center(logits, temp),
        }
    }

    /// Loss terms and collapse statistics of one batch, without an update (the teacher centres
    /// do move, as they would in a step).
    pub fn losses(&mut self, b: &SslBatch, teacher_temp: f64) -> StepStats {
        self.forward(b, teacher_temp).1
    }

    /// Loss terms of one micro-batch (with gradients) and the collapse statistics.
    fn forward(&mut self, b: &SslBatch, temp: f64) -> (Tensor<Train<B, C>, 1>, StepStats) {
        let dev = self.device.clone();
        let (n, ng, nl) = (b.batch, b.n_global, b.n_local);
        let n_img = n * ng;
        let use_ibot = self.loss.ibot_weight > 0.0;

        // Masked token positions (flat over [n_img · patches]) and their per-image weights.
        let np = b.masks.first().map_or(0, Vec::len);
        let mut idx = Vec::new();
        let mut weights = Vec::new();
        if use_ibot {
            for (i, m) in b.masks.iter().enumerate() {
                let count = m.iter().filter(|&&x| x).count();
                for (j, _) in m.iter().enumerate().filter(|(_, &x)| x) {
                    idx.push((i * np + j) as i64);
                    weights.push(1.0 / count as f32);
                }
            }
        }
        let n_masked = idx.len();
        let idx_t = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [n_masked]), &dev);

        // Teacher: unmasked global crops, no gradients.
        let x_t =
            Tensor::<B, 4>::from_data(TensorData::new(b.globals.clone(), b.global_shape), &dev);
        let t_out = self
            .teacher
            .backbone
            .forward_features(x_t, None, &[], false);
        let d = t_out.cls.dims()[1];
        let (t_cls_logits, t_patch_logits) = {
            let t_patch = (n_masked > 0).then(|| {
                t_out
                    .patches
                    .clone()
                    .reshape([n_img * np, d])
                    .select(0, idx_t.clone())
            });
            heads_forward(&self.teacher, t_out.cls.clone(), t_patch)
        };
        let t_cls = self.teacher_targets(t_cls_logits, temp, false);
        let t_patch = t_patch_logits.map(|l| self.teacher_targets(l, temp, true));

        let collapse = collapse_stats(&t_cls);

        // Student: masked global crops + local crops.
        let x_s = Tensor::<Train<B, C>, 4>::from_data(
            TensorData::new(b.globals.clone(), b.global_shape),
            &dev,
        );
        let mask = use_ibot.then(|| {
            let flat: Vec<f32> = b.masks.iter().flatten().map(|&m| m as u8 as f32).collect();
            Tensor::<Train<B, C>, 2>::from_data(TensorData::new(flat, [n_img, np]), &dev)
        });
        let s_out = self
            .student()
            .backbone
            .forward_features(x_s, mask, &[], true);
        let s_patch = (n_masked > 0).then(|| {
            s_out
                .patches
                .clone()
                .reshape([n_img * np, d])
                .select(0, Tensor::from_inner(idx_t))
        });
        let (s_cls_logits, s_patch_logits) =
            heads_forward(self.student(), s_out.cls.clone(), s_patch);

        let st = self.loss.student_temp;
        let t_chunks: Vec<Tensor<Train<B, C>, 2>> = Tensor::from_inner(t_cls).chunk(ng, 0);
        let s_chunks = s_cls_logits.chunk(ng, 0);
        let mut dino = Tensor::<Train<B, C>, 1>::zeros([1], &dev);
        let mut pairs = 0;
        for (i, s) in s_chunks.iter().enumerate() {
            for (j, t) in t_chunks.iter().enumerate() {
                if i != j {
                    dino = dino + cross_entropy(s.clone(), t.clone(), st);
                    pairs += 1;
                }
            }
        }
        if nl > 0 {
            let x_l = Tensor::<Train<B, C>, 4>::from_data(
                TensorData::new(b.locals.clone(), b.local_shape),
                &dev,
            );
            let l_cls = self
                .student()
                .backbone
                .forward_features(x_l, None, &[], true)
                .cls;
            for s in self.student().dino_head.forward(l_cls).chunk(nl, 0) {
                for t in &t_chunks {
                    dino = dino + cross_entropy(s.clone(), t.clone(), st);
                    pairs += 1;
                }
            }
        }
        let dino = dino / pairs.max(1) as f64;

        let ibot = match (s_patch_logits, t_patch) {
            (Some(s), Some(t)) => {
                let w =
                    Tensor::<Train<B, C>, 1>::from_data(TensorData::new(weights, [n_masked]), &dev);
                ibot_patch_loss(s, Tensor::from_inner(t), w, n_img, st)
            }
            _ => Tensor::zeros([1], &dev),
        };

        let koleo = if self.loss.koleo_weight > 0.0 && n >= 2 {
            s_out
                .cls
                .clone()
                .chunk(ng, 0)
                .into_iter()
                .map(koleo_loss)
                .reduce(|a, b| a + b)
                .expect("at least one global crop")
        } else {
            Tensor::zeros([1], &dev)
        };

        let total = dino.clone() * self.loss.dino_weight
            + ibot.clone() * self.loss.ibot_weight
            + koleo.clone() * self.loss.koleo_weight;
        // One device→host read for all seven statistics: on a GPU each read is a sync.
        let [entropy, entropy_of_mean] = collapse;
        let d = s_out.cls.dims()[1] as f64;
        let v: Vec<f64> = Tensor::cat(
            vec![
                total.clone().inner(),
                dino.inner(),
                ibot.inner(),
                koleo.inner(),
                entropy,
                entropy_of_mean,
                embedding_std(s_out.cls.inner()),
            ],
            0,
        )
        .into_data()
        .convert::<f64>()
        .to_vec()
        .expect("f64");
        let stats = StepStats {
            loss: v[0],
            dino: v[1],
            ibot: v[2],
            koleo: v[3],
            teacher_entropy: v[4],
            prototypes_used: v[5].exp(),
            embedding_std: v[6] * d.sqrt(),
            ..StepStats::default()
        };
        (total, stats)
    }

    /// One optimiser step over `micro` micro-batches (gradient accumulation), then the EMA update.
    /// `group` assigns LR / weight-decay multipliers by parameter path.
    pub fn step(
        &mut self,
        micro: &[SslBatch],
        v: &StepValues,
        group: &dyn Fn(&str) -> ParamGroup,
        seed: u64,
    ) -> StepStats {
        // Stochastic depth draws from the backend RNG: seed it per step so a resumed run
        // repeats the same draws.
        B::seed(&self.device, seed);
        let mut acc = GradientsAccumulator::<SslModel<Train<B, C>>>::new();
        let mut sum = StepStats::default();
        for b in micro {
            let (loss, s) = self.forward(b, v.teacher_temp);
            let grads =
                GradientsParams::from_grads((loss / micro.len() as f64).backward(), self.student());
            acc.accumulate(self.student(), grads);
            add_stats(&mut sum, &s, 1.0 / micro.len() as f64);
        }
        let freeze = v.freeze_last_layer;
        let group = |p: &str| {
            let g = group(p);
            if freeze && p.contains("last_layer") {
                ParamGroup { lr_mult: 0.0, ..g }
            } else {
                g
            }
        };
        let settings = StepSettings {
            lr: v.lr,
            weight_decay: v.weight_decay,
            clip: self.clip,
            group: &group,
        };
        let student = self.student.take().expect("a student between steps");
        let (student, norm) = self.opt.step(student, acc.grads(), &settings);
        self.student = Some(student);
        sum.grad_norm = norm;
        self.update_teacher(v.momentum);
        sum
    }

    /// θ_t ← m·θ_t + (1 − m)·θ_s for every parameter (backbone and heads).
    pub fn update_teacher(&mut self, m: f64) {
        let student = self.student().valid();
        // Moved out (the student's handles hold its place), so that the EMA can update the
        // teacher's buffers in place.
        let teacher = std::mem::replace(&mut self.teacher, student.clone());
        self.teacher = params::ema(teacher, &student, m);
    }

    /// The student (with gradients).
    pub fn student(&self) -> &SslModel<Train<B, C>> {
        self.student.as_ref().expect("a student between steps")
    }
}

/// The autodiff student for `inner`, every parameter trainable.
pub fn trainable_student<B: Backend, C: CheckpointStrategy>(
    inner: SslModel<B>,
) -> SslModel<Train<B, C>> {
    params::trainable(SslModel::<Train<B, C>>::from_inner(inner))
}

/// Class-token logits, and patch logits through the iBOT head (or the shared DINO head in one
/// pass, as DINOv2 does).
fn heads_forward<B: Backend>(
    m: &SslModel<B>,
    cls: Tensor<B, 2>,
    patches: Option<Tensor<B, 2>>,
) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
    match (patches, &m.ibot_head) {
        (None, _) => (m.dino_head.forward(cls), None),
        (Some(p), Some(h)) => (m.dino_head.forward(cls), Some(h.forward(p))),
        (Some(p), None) => {
            let nc = cls.dims()[0];
            let np = p.dims()[0];
            let out = m.dino_head.forward(Tensor::cat(vec![cls, p], 0));
            (out.clone().narrow(0, 0, nc), Some(out.narrow(0, nc, np)))
        }
    }
}

/// Mean teacher entropy and the entropy of the mean teacher distribution (its exp: the number
/// of prototypes in use), each [1].
fn collapse_stats<B: Backend>(p: &Tensor<B, 2>) -> [Tensor<B, 1>; 2] {
    let entropy = |p: Tensor<B, 2>| (p.clone() * (p + 1e-12).log()).sum_dim(1).neg();
    [
        entropy(p.clone()).mean(),
        entropy(p.clone().mean_dim(0)).mean(),
    ]
}

/// Mean per-dimension std of the ℓ2-normalised class tokens, [1]; × √D gives ~1 when spread.
fn embedding_std<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 1> {
    let z = l2_normalize(x, 1e-8);
    let var = (z.clone() - z.mean_dim(0)).powi_scalar(2).mean_dim(0);
    var.sqrt().mean()
}

fn add_stats(acc: &mut StepStats, s: &StepStats, w: f64) {
    acc.loss += s.loss * w;
    acc.dino += s.dino * w;
    acc.ibot += s.ibot * w;
    acc.koleo += s.koleo * w;
    acc.teacher_entropy += s.teacher_entropy * w;
    acc.prototypes_used += s.prototypes_used * w;
    acc.embedding_std += s.embedding_std * w;
}
