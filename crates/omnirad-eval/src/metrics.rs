//! Classification metrics exactly as MedMNIST's evaluator and OmniRad's tables define them.
//!
//! - ACC: binary — score of class 1 > 0.5; multi-class — arg-max; multi-label — mean over labels
//!   of per-label accuracy at 0.5.
//! - AUC (ROC, Mann–Whitney form with tied scores sharing their average rank):
//!   binary — on the class-1 score; multi-class — unweighted mean of one-vs-rest AUCs;
//!   multi-label — mean of per-label AUCs. A class without positives or without negatives has
//!   no AUC and is left out of the mean (`auc_classes` says how many counted).
//! - macro-F1 (sklearn `f1_score(average="macro", zero_division=0)`) on arg-max predictions:
//!   F1_c = 2·TP/(2·TP + FP + FN), 0 when the denominator is 0; mean over all classes.

use ndarray::{Array2, ArrayView1, ArrayView2};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TaskKind {
    Binary,
    MultiClass,
    MultiLabel,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metrics {
    pub acc: f64,
    pub auc: f64,
    pub auc_classes: usize,
    pub macro_f1: f64,
    pub precision: Vec<f64>,
    pub recall: Vec<f64>,
    /// `confusion[true][pred]` (single-label tasks only).
    pub confusion: Vec<Vec<usize>>,
}

/// ROC AUC of `scores` for the 0/1 `truth`; None when one class is absent.
pub fn roc_auc(truth: &[bool], scores: &[f64]) -> Option<f64> {
    let n_pos = truth.iter().filter(|&&t| t).count();
    let n_neg = truth.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_pos += (i..=j).filter(|&k| truth[idx[k]]).count() as f64 * avg_rank;
        i = j + 1;
    }
    Some((rank_sum_pos - (n_pos * (n_pos + 1)) as f64 / 2.0) / (n_pos * n_neg) as f64)
}

fn argmax(row: ArrayView1<f64>) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f64::MIN),
            |best, (i, &v)| if v > best.1 { (i, v) } else { best },
        )
        .0
}

/// a / b, and 0 for an empty denominator (a class never predicted has precision 0).
fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// `labels`: `[N]` class ids for single-label tasks, `[N, L]` 0/1 for multi-label (as a 2D array
/// with one column for single-label). `scores`: [N, C] probabilities.
pub fn evaluate(task: TaskKind, labels: ArrayView2<i64>, scores: ArrayView2<f64>) -> Metrics {
    let (n, c) = scores.dim();
    assert_eq!(labels.nrows(), n, "one label row per score row");
    if task == TaskKind::MultiLabel {
        let mut accs = Vec::new();
        let mut aucs = Vec::new();
        for l in 0..c {
            let truth: Vec<bool> = labels.column(l).iter().map(|&v| v == 1).collect();
            let s: Vec<f64> = scores.column(l).to_vec();
            accs.push(
                truth
                    .iter()
                    .zip(&s)
                    .filter(|(t, s)| **t == (**s > 0.5))
                    .count() as f64
                    / n as f64,
            );
            aucs.extend(roc_auc(&truth, &s));
        }
        // Per label at the 0.5 threshold.
        let (mut precision, mut recall, mut f1) = (vec![], vec![], vec![]);
        for l in 0..c {
            let (mut tp, mut fp, mut fnn) = (0, 0, 0);
            for i in 0..n {
                match (labels[[i, l]] == 1, scores[[i, l]] > 0.5) {
                    (true, true) => tp += 1,
                    (false, true) => fp += 1,
                    (true, false) => fnn += 1,
                    _ => {}
                }
            }
            precision.push(ratio(tp, tp + fp));
            recall.push(ratio(tp, tp + fnn));
            f1.push(ratio(2 * tp, 2 * tp + fp + fnn));
        }
        return Metrics {
            acc: accs.iter().sum::<f64>() / c as f64,
            auc: aucs.iter().sum::<f64>() / aucs.len().max(1) as f64,
            auc_classes: aucs.len(),
            macro_f1: f1.iter().sum::<f64>() / c as f64,
            precision,
            recall,
            confusion: vec![],
        };
    }
    let truth: Vec<usize> = labels.column(0).iter().map(|&v| v as usize).collect();
    let pred: Vec<usize> = match task {
        TaskKind::Binary => scores
            .column(1)
            .iter()
            .map(|&s| (s > 0.5) as usize)
            .collect(),
        _ => scores.rows().into_iter().map(argmax).collect(),
    };
    let mut confusion = vec![vec![0usize; c]; c];
    for (&t, &p) in truth.iter().zip(&pred) {
        confusion[t][p] += 1;
    }
    let (mut precision, mut recall, mut f1) = (vec![], vec![], vec![]);
    // Class k's row and column of the confusion matrix: an index reads clearer than iterators.
    #[allow(clippy::needless_range_loop)]
    for k in 0..c {
        let tp = confusion[k][k];
        let fp: usize = (0..c).filter(|&t| t != k).map(|t| confusion[t][k]).sum();
        let fnn: usize = (0..c).filter(|&p| p != k).map(|p| confusion[k][p]).sum();
        precision.push(ratio(tp, tp + fp));
        recall.push(ratio(tp, tp + fnn));
        f1.push(ratio(2 * tp, 2 * tp + fp + fnn));
    }
    let aucs: Vec<f64> = match task {
        TaskKind::Binary => {
            let t: Vec<bool> = truth.iter().map(|&v| v == 1).collect();
            roc_auc(&t, &scores.column(1).to_vec())
                .into_iter()
                .collect()
        }
        _ => (0..c)
            .filter_map(|k| {
                let t: Vec<bool> = truth.iter().map(|&v| v == k).collect();
                roc_auc(&t, &scores.column(k).to_vec())
            })
            .collect(),
    };
    Metrics {
        acc: truth.iter().zip(&pred).filter(|(t, p)| t == p).count() as f64 / n as f64,
        auc: aucs.iter().sum::<f64>() / aucs.len().max(1) as f64,
        auc_classes: aucs.len(),
        macro_f1: f1.iter().sum::<f64>() / c as f64,
        precision,
        recall,
        confusion,
    }
}

/// Row-normalises non-negative votes into probabilities (uniform for an all-zero row).
pub fn normalize_rows(mut v: Array2<f64>) -> Array2<f64> {
    for mut row in v.rows_mut() {
        let s: f64 = row.sum();
        let k = row.len() as f64;
        row.mapv_inplace(|x| if s > 0.0 { x / s } else { 1.0 / k });
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn auc_by_hand_with_ties() {
        // Positives {0.8, 0.4}, negatives {0.4, 0.1}: pairs (0.8>0.4) 1, (0.8>0.1) 1,
        // (0.4=0.4) 0.5, (0.4>0.1) 1 -> 3.5 / 4.
        let auc = roc_auc(&[true, true, false, false], &[0.8, 0.4, 0.4, 0.1]).unwrap();
        assert!((auc - 0.875).abs() < 1e-12);
        assert_eq!(roc_auc(&[true, true], &[0.1, 0.2]), None);
        assert_eq!(roc_auc(&[true, false], &[0.1, 0.9]), Some(0.0));
    }

    #[test]
    fn binary_metrics_by_hand() {
        let labels = array![[1], [1], [0], [0], [1]];
        let scores = array![[0.2, 0.8], [0.6, 0.4], [0.6, 0.4], [0.9, 0.1], [0.3, 0.7]];
        let m = evaluate(TaskKind::Binary, labels.view(), scores.view());
        // Predictions 1,0,0,0,1 -> 4/5 correct.
        assert!((m.acc - 0.8).abs() < 1e-12);
        assert_eq!(m.confusion, vec![vec![2, 0], vec![1, 2]]);
        // Class 0: TP 2, FP 1, FN 0 -> F1 4/5; class 1: TP 2, FP 0, FN 1 -> 4/5.
        assert!((m.macro_f1 - 0.8).abs() < 1e-12);
        // Scores for class 1: positives {0.8, 0.4, 0.7}, negatives {0.4, 0.1}:
        // wins 2+2+... = (0.8:2) + (0.4: 0.5 + 1) + (0.7: 2) = 5.5 of 6.
        assert!((m.auc - 5.5 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn multiclass_f1_counts_a_class_never_predicted_as_zero() {
        let labels = array![[0], [1], [2], [2]];
        let scores = array![
            [0.9, 0.1, 0.0],
            [0.2, 0.7, 0.1],
            [0.1, 0.8, 0.1],
            [0.1, 0.2, 0.7]
        ];
        let m = evaluate(TaskKind::MultiClass, labels.view(), scores.view());
        assert!((m.acc - 0.75).abs() < 1e-12);
        // F1: class0 1, class1 2·1/(2+1+0)=2/3, class2 2·1/(2+0+1)=2/3.
        assert!((m.macro_f1 - (1.0 + 2.0 / 3.0 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        let absent = evaluate(
            TaskKind::MultiClass,
            array![[0], [0], [1]].view(),
            array![[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.6, 0.4, 0.0]].view(),
        );
        // Class 1 is never predicted (F1 0) and class 2 never occurs (F1 0, no AUC).
        assert!((absent.macro_f1 - (0.8 + 0.0 + 0.0) / 3.0).abs() < 1e-12);
        assert_eq!(absent.auc_classes, 2);
    }

    #[test]
    fn multilabel_auc_is_the_mean_over_labels() {
        let labels = array![[1, 0], [0, 1], [1, 1], [0, 0]];
        let scores = array![[0.9, 0.2], [0.1, 0.6], [0.7, 0.4], [0.3, 0.5]];
        let m = evaluate(TaskKind::MultiLabel, labels.view(), scores.view());
        // Label 0: perfect (1.0). Label 1: positives {0.6, 0.4}, negatives {0.2, 0.5}: 3/4.
        assert!((m.auc - (1.0 + 0.75) / 2.0).abs() < 1e-12);
        // Label accuracies at 0.5: label0 4/4, label1: preds 0,1,0,0 vs 0,1,1,0 -> 3/4.
        assert!((m.acc - 0.875).abs() < 1e-12);
        // Label 1 at 0.5: tp 1, fp 0, fn 1 -> precision 1, recall 1/2, F1 2/3; label 0 perfect.
        assert_eq!(
            (m.precision.clone(), m.recall.clone()),
            (vec![1.0, 1.0], vec![1.0, 0.5])
        );
        assert!((m.macro_f1 - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
    }
}
