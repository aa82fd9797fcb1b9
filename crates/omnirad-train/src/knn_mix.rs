//! A fine-tuned classifier interpolated with a k-NN vote in its own feature space (Jia et al.
//! 2021, "Rethinking Nearest Neighbors for Visual Classification"):
//!
//!   p(x) = (1 − λ)·p_head(x) + λ·p_kNN(x),
//!
//! p_kNN the weighted vote of the k training images nearest to x by cosine similarity of the
//! fine-tuned encoder's features (weights exp(sim / T), [`omnirad_eval::knn_scores`]). λ is a
//! hyperparameter chosen on the selection split from {0, 0.1, …, 1} by the fine-tune's own
//! selection score; ties go to the smaller λ, so the head stays alone unless the vote helps.

use ndarray::{Array2, ArrayView2};
use omnirad_eval::{evaluate, knn_scores, KnnConfig, Metrics, TaskKind};
use serde::{Deserialize, Serialize};

use crate::finetune::{probability_loss, Selection};

/// The mix a bundle predicts with: λ and the vote's k and temperature.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KnnMix {
    pub lambda: f64,
    pub k: usize,
    pub temperature: f64,
}

impl KnnMix {
    pub fn knn(&self) -> KnnConfig {
        KnnConfig {
            k: self.k,
            temperature: self.temperature,
        }
    }
}

/// What one fine-tuned model votes with: its features of the training images, and their labels
/// ([N, 1] class ids or [N, C] 0/1 flags).
#[derive(Debug, Clone)]
pub struct KnnBank {
    pub features: Array2<f32>,
    pub labels: Array2<i64>,
}

/// The k-NN vote [N, C] for images whose features under each model are `features` (one array
/// per model, in the order of `banks`), averaged over the models.
pub fn votes(
    banks: &[KnnBank],
    features: &[Array2<f32>],
    classes: usize,
    multi: bool,
    knn: KnnConfig,
) -> Array2<f64> {
    assert_eq!(banks.len(), features.len(), "one bank per model");
    let mut sum: Option<Array2<f64>> = None;
    for (bank, f) in banks.iter().zip(features) {
        let v = knn_scores(
            bank.features.view(),
            bank.labels.view(),
            f.view(),
            classes,
            multi,
            knn,
        );
        sum = Some(match sum {
            Some(s) => s + v,
            None => v,
        });
    }
    sum.expect("at least one model") / banks.len() as f64
}

/// (1 − λ)·head + λ·votes, row by row.
pub fn mix(head: ArrayView2<f64>, votes: ArrayView2<f64>, lambda: f64) -> Array2<f64> {
    assert_eq!(head.dim(), votes.dim(), "one vote per head score");
    &head * (1.0 - lambda) + &votes * lambda
}

/// The λ of {0, 0.1, …, 1} whose mix of `head` and `votes` scores best on `labels` by `select`
/// (ties to the smaller λ), with the metrics of that mix.
pub fn choose_lambda(
    head: ArrayView2<f64>,
    votes: ArrayView2<f64>,
    labels: ArrayView2<i64>,
    task: TaskKind,
    select: Selection,
) -> (f64, Metrics) {
    let multi = task == TaskKind::MultiLabel;
    let mut best: Option<(f64, f64, Metrics)> = None;
    for step in 0..=10 {
        let lambda = step as f64 / 10.0;
        let p = mix(head, votes, lambda);
        let m = evaluate(task, labels, p.view());
        let score = select.score(&m, probability_loss(p.view(), labels, multi));
        if best.as_ref().is_none_or(|(s, _, _)| score > *s) {
            best = Some((score, lambda, m));
        }
    }
    let (_, lambda, m) = best.expect("eleven candidates");
    (lambda, m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn mix_is_the_convex_combination() {
        let m = mix(
            array![[0.8, 0.2], [0.4, 0.6]].view(),
            array![[0.0, 1.0], [1.0, 0.0]].view(),
            0.25,
        );
        let want = array![[0.6, 0.4], [0.55, 0.45]];
        assert!((&m - &want).iter().all(|d| d.abs() < 1e-12), "{m}");
    }

    #[test]
    fn the_vote_is_taken_only_where_it_helps_on_val() {
        let labels = array![[0i64], [1], [0], [1]];
        let right = array![[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]];
        let wrong = array![[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]];
        let task = TaskKind::Binary;
        // A vote that is always wrong: every λ ≥ 0.5 loses ACC, λ < 0.5 ties with the head → 0.
        let (l, m) = choose_lambda(
            right.view(),
            wrong.view(),
            labels.view(),
            task,
            Selection::Acc,
        );
        assert_eq!((l, m.acc), (0.0, 1.0));
        // A head that is always wrong and a right vote: ACC is 1 from the first λ where the
        // vote outweighs the head on every row. Row 4: 0.6λ + 0.4(1−λ) > 0.5 needs λ > 0.5;
        // rows 1–3 need λ > 0.5 too (0.9 vs 0.1, 0.8 vs 0.2, 0.7 vs 0.3 mirrored), so λ = 0.6.
        let (l, m) = choose_lambda(
            wrong.view(),
            right.view(),
            labels.view(),
            task,
            Selection::Acc,
        );
        assert_eq!((l, m.acc), (0.6, 1.0));
        // By loss the vote alone is best: the loss falls monotonically towards λ = 1.
        let (l, _) = choose_lambda(
            wrong.view(),
            right.view(),
            labels.view(),
            task,
            Selection::Loss,
        );
        assert_eq!(l, 1.0);
    }
}
