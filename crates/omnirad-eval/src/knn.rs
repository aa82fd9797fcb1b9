//! Weighted k-NN classifier on frozen embeddings (DINO's `knn_classifier`): cosine similarity,
//! the k nearest training samples vote with weight exp(sim / T).

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use crate::metrics::normalize_rows;

#[derive(Debug, Clone, Copy)]
pub struct KnnConfig {
    pub k: usize,
    pub temperature: f64,
}

impl Default for KnnConfig {
    fn default() -> Self {
        Self {
            k: 20,
            temperature: 0.07,
        }
    }
}

fn l2_normalize(x: ArrayView2<f32>) -> Array2<f64> {
    let mut x = x.mapv(|v| v as f64);
    for mut row in x.rows_mut() {
        let n = row.dot(&row).sqrt().max(1e-12);
        row.mapv_inplace(|v| v / n);
    }
    x
}

/// Class scores [N_test, C] from training embeddings and labels. `labels` has one column of
/// class ids (single-label) or C columns of 0/1 flags (`multi_label`); scores sum to 1 per row
/// for single-label tasks and are per-label weighted means for multi-label ones.
pub fn knn_scores(
    train: ArrayView2<f32>,
    train_labels: ArrayView2<i64>,
    test: ArrayView2<f32>,
    classes: usize,
    multi_label: bool,
    cfg: KnnConfig,
) -> Array2<f64> {
    let (tr, te) = (l2_normalize(train), l2_normalize(test));
    let k = cfg.k.min(tr.nrows()).max(1);
    let rows: Vec<Vec<f64>> = (0..te.nrows())
        .into_par_iter()
        .map(|i| {
            let q = te.row(i);
            let sims = tr.dot(&q);
            let mut idx: Vec<usize> = (0..sims.len()).collect();
            idx.select_nth_unstable_by(k - 1, |&a, &b| sims[b].total_cmp(&sims[a]));
            let mut votes = vec![0.0; classes];
            let mut total = 0.0;
            for &j in &idx[..k] {
                let w = (sims[j] / cfg.temperature).exp();
                total += w;
                if multi_label {
                    for (c, v) in votes.iter_mut().enumerate() {
                        *v += w * (train_labels[[j, c]] == 1) as u8 as f64;
                    }
                } else {
                    votes[train_labels[[j, 0]] as usize] += w;
                }
            }
            if multi_label {
                votes.iter_mut().for_each(|v| *v /= total);
            }
            votes
        })
        .collect();
    let out =
        Array2::from_shape_vec((rows.len(), classes), rows.concat()).expect("classes per row");
    if multi_label {
        out
    } else {
        normalize_rows(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn votes_are_weighted_by_similarity() {
        let train = array![[1.0f32, 0.0], [0.9, 0.1], [0.0, 1.0]];
        let labels = array![[0i64], [0], [1]];
        let test = array![[1.0f32, 0.05], [0.0, 1.0]];
        let s = knn_scores(
            train.view(),
            labels.view(),
            test.view(),
            2,
            false,
            KnnConfig {
                k: 3,
                temperature: 0.07,
            },
        );
        assert!(s[[0, 0]] > 0.99 && s[[1, 1]] > 0.99);
        // By hand for query 2 = (0, 1): sims 0, 0.1104 (0.1/|(0.9,0.1)|), 1.
        let (a, b, c) = (
            (0.0f64 / 0.07).exp(),
            ((0.1 / (0.82f64).sqrt()) / 0.07).exp(),
            (1.0f64 / 0.07).exp(),
        );
        assert!((s[[1, 0]] - (a + b) / (a + b + c)).abs() < 1e-9);
        assert!((s.row(0).sum() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn k_limits_the_neighbours() {
        let train = array![[1.0f32, 0.0], [0.0, 1.0], [0.0, 1.0]];
        let labels = array![[0i64], [1], [1]];
        let s = knn_scores(
            train.view(),
            labels.view(),
            array![[1.0f32, 0.0]].view(),
            2,
            false,
            KnnConfig {
                k: 1,
                temperature: 0.07,
            },
        );
        assert_eq!(s.row(0).to_vec(), vec![1.0, 0.0]);
    }
}
