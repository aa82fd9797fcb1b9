//! How well an embedding space groups labelled data (scikit-learn's definitions, checked
//! against it on a committed fixture).
//!
//! With x̂ = x/‖x‖ (all measures use L2-normalised embeddings; cosine distance d = 1 − x̂·ŷ):
//! - silhouette: s_i = (b_i − a_i) / max(a_i, b_i), a_i the mean cosine distance to the rest of
//!   i's group, b_i the smallest mean distance to another group; 0 for singletons; mean over i.
//! - Davies–Bouldin (Euclidean on x̂): centroids c_k, scatter S_k = mean ‖x̂ − c_k‖;
//!   DB = mean_k max_{j≠k} (S_k + S_j)/‖c_k − c_j‖. Lower is better.
//! - k-NN purity: the fraction of each point's k nearest neighbours (cosine, itself excluded)
//!   that share its group, averaged.
//! - NMI (arithmetic normalisation) and ARI of k-means clusters (k = number of groups, k-means++
//!   seeded, best of 4 restarts by inertia) against the groups.

use std::collections::HashMap;

use ndarray::{Array2, ArrayView2, Axis};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;

/// Rows scaled to unit length.
pub fn l2_rows(x: ArrayView2<f32>) -> Array2<f64> {
    let mut x = x.mapv(|v| v as f64);
    for mut r in x.rows_mut() {
        let n = r.dot(&r).sqrt().max(1e-12);
        r.mapv_inplace(|v| v / n);
    }
    x
}

/// Group labels as 0..G indices (first-seen order).
pub fn encode<T: std::hash::Hash + Eq + Clone>(labels: &[T]) -> (Vec<usize>, usize) {
    let mut ids = HashMap::new();
    let v = labels
        .iter()
        .map(|l| {
            let n = ids.len();
            *ids.entry(l.clone()).or_insert(n)
        })
        .collect();
    (v, ids.len())
}

/// Cosine similarities of row i to every row, one row at a time: O(N) memory rather than the
/// N×N matrix, so tens of thousands of embeddings fit.
fn row_sims(x: &Array2<f64>, i: usize) -> ndarray::Array1<f64> {
    x.dot(&x.row(i))
}

pub fn silhouette_cosine(x: &Array2<f64>, labels: &[usize]) -> f64 {
    let g = labels.iter().max().map_or(0, |m| m + 1);
    let n = x.nrows();
    let s: Vec<f64> = (0..n)
        .into_par_iter()
        .map(|i| {
            let sims = row_sims(x, i);
            let mut sum = vec![0.0; g];
            let mut cnt = vec![0usize; g];
            for j in 0..n {
                if j != i {
                    sum[labels[j]] += 1.0 - sims[j];
                    cnt[labels[j]] += 1;
                }
            }
            let own = labels[i];
            if cnt[own] == 0 {
                return 0.0;
            }
            let a = sum[own] / cnt[own] as f64;
            let b = (0..g)
                .filter(|&k| k != own && cnt[k] > 0)
                .map(|k| sum[k] / cnt[k] as f64)
                .fold(f64::INFINITY, f64::min);
            if !b.is_finite() {
                return 0.0;
            }
            let m = a.max(b);
            if m > 0.0 {
                (b - a) / m
            } else {
                0.0
            }
        })
        .collect();
    s.iter().sum::<f64>() / n.max(1) as f64
}

fn centroids(x: &Array2<f64>, labels: &[usize], g: usize) -> (Array2<f64>, Vec<usize>) {
    let mut c = Array2::zeros((g, x.ncols()));
    let mut cnt = vec![0usize; g];
    for (row, &l) in x.rows().into_iter().zip(labels) {
        let mut cr = c.row_mut(l);
        cr += &row;
        cnt[l] += 1;
    }
    for (mut r, &n) in c.rows_mut().into_iter().zip(&cnt) {
        if n > 0 {
            r /= n as f64;
        }
    }
    (c, cnt)
}

fn dist(a: ndarray::ArrayView1<f64>, b: ndarray::ArrayView1<f64>) -> f64 {
    a.iter()
        .zip(b)
        .map(|(p, q)| (p - q) * (p - q))
        .sum::<f64>()
        .sqrt()
}

pub fn davies_bouldin(x: &Array2<f64>, labels: &[usize]) -> f64 {
    let g = labels.iter().max().map_or(0, |m| m + 1);
    let (c, cnt) = centroids(x, labels, g);
    let mut scatter = vec![0.0; g];
    for (row, &l) in x.rows().into_iter().zip(labels) {
        scatter[l] += dist(row, c.row(l));
    }
    for (s, &n) in scatter.iter_mut().zip(&cnt) {
        *s /= n.max(1) as f64;
    }
    let mut total = 0.0;
    for i in 0..g {
        let mut worst: f64 = 0.0;
        for j in 0..g {
            if i != j {
                let d = dist(c.row(i), c.row(j));
                // sklearn: coinciding centroids count as infinitely far (ratio 0).
                let r = if d > 0.0 {
                    (scatter[i] + scatter[j]) / d
                } else {
                    0.0
                };
                worst = worst.max(r);
            }
        }
        total += worst;
    }
    total / g.max(1) as f64
}

/// Indices of each row's `k` most cosine-similar other rows, most similar first.
pub fn knn_cosine(x: &Array2<f64>, k: usize) -> Vec<Vec<(usize, f64)>> {
    (0..x.nrows())
        .into_par_iter()
        .map(|i| {
            let mut v: Vec<(usize, f64)> = row_sims(x, i)
                .iter()
                .copied()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .collect();
            let k = k.min(v.len());
            if k > 0 && k < v.len() {
                v.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            }
            v.truncate(k);
            v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            v
        })
        .collect()
}

pub fn knn_purity(neighbours: &[Vec<(usize, f64)>], labels: &[usize]) -> f64 {
    let n = neighbours.len().max(1) as f64;
    neighbours
        .iter()
        .enumerate()
        .map(|(i, nb)| {
            if nb.is_empty() {
                return 0.0;
            }
            nb.iter().filter(|(j, _)| labels[*j] == labels[i]).count() as f64 / nb.len() as f64
        })
        .sum::<f64>()
        / n
}

/// Lloyd's k-means with k-means++ seeding; the best of `restarts` by inertia.
pub fn kmeans(x: &Array2<f64>, k: usize, restarts: usize, seed: u64) -> Vec<usize> {
    let n = x.nrows();
    let k = k.clamp(1, n.max(1));
    let mut best: Option<(f64, Vec<usize>)> = None;
    for r in 0..restarts.max(1) {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(r as u64));
        let mut centres = vec![rng.random_range(0..n)];
        let mut d2: Vec<f64> = (0..n)
            .map(|i| dist(x.row(i), x.row(centres[0])).powi(2))
            .collect();
        while centres.len() < k {
            let total: f64 = d2.iter().sum();
            let next = if total <= 0.0 {
                rng.random_range(0..n)
            } else {
                let mut t = rng.random_range(0.0..total);
                d2.iter()
                    .position(|&d| {
                        t -= d;
                        t < 0.0
                    })
                    .unwrap_or(n - 1)
            };
            centres.push(next);
            for (i, d) in d2.iter_mut().enumerate() {
                *d = d.min(dist(x.row(i), x.row(next)).powi(2));
            }
        }
        let mut c = x.select(Axis(0), &centres);
        let mut assign = vec![0usize; n];
        for _ in 0..100 {
            let new: Vec<usize> = (0..n)
                .into_par_iter()
                .map(|i| {
                    (0..k)
                        .min_by(|&a, &b| {
                            dist(x.row(i), c.row(a)).total_cmp(&dist(x.row(i), c.row(b)))
                        })
                        .unwrap_or(0)
                })
                .collect();
            let changed = new != assign;
            assign = new;
            let (nc, cnt) = centroids(x, &assign, k);
            // An emptied cluster keeps its old centre.
            for ((mut row, new_row), &m) in c.rows_mut().into_iter().zip(nc.rows()).zip(&cnt) {
                if m > 0 {
                    row.assign(&new_row);
                }
            }
            if !changed {
                break;
            }
        }
        let inertia: f64 = (0..n)
            .map(|i| dist(x.row(i), c.row(assign[i])).powi(2))
            .sum();
        if best.as_ref().is_none_or(|(b, _)| inertia < *b) {
            best = Some((inertia, assign));
        }
    }
    best.map(|b| b.1).unwrap_or_default()
}

fn contingency(a: &[usize], b: &[usize]) -> (Vec<Vec<f64>>, Vec<f64>, Vec<f64>) {
    let (ga, gb) = (
        a.iter().max().map_or(0, |m| m + 1),
        b.iter().max().map_or(0, |m| m + 1),
    );
    let mut t = vec![vec![0.0; gb]; ga];
    for (&i, &j) in a.iter().zip(b) {
        t[i][j] += 1.0;
    }
    let ra = t.iter().map(|r| r.iter().sum()).collect();
    let rb = (0..gb).map(|j| t.iter().map(|r| r[j]).sum()).collect();
    (t, ra, rb)
}

/// Normalised mutual information, arithmetic-mean normalisation (sklearn's default).
pub fn nmi(a: &[usize], b: &[usize]) -> f64 {
    let n = a.len() as f64;
    let (t, ra, rb) = contingency(a, b);
    let h = |v: &[f64]| {
        -v.iter()
            .filter(|&&c| c > 0.0)
            .map(|&c| c / n * (c / n).ln())
            .sum::<f64>()
    };
    let (ha, hb) = (h(&ra), h(&rb));
    if ha == 0.0 && hb == 0.0 {
        return 1.0;
    }
    let mut mi = 0.0;
    for (i, row) in t.iter().enumerate() {
        for (j, &c) in row.iter().enumerate() {
            if c > 0.0 {
                mi += c / n * (n * c / (ra[i] * rb[j])).ln();
            }
        }
    }
    (mi / ((ha + hb) / 2.0)).clamp(0.0, 1.0)
}

/// Adjusted Rand index (Hubert & Arabie).
pub fn ari(a: &[usize], b: &[usize]) -> f64 {
    let c2 = |x: f64| x * (x - 1.0) / 2.0;
    let (t, ra, rb) = contingency(a, b);
    let index: f64 = t.iter().flatten().map(|&c| c2(c)).sum();
    let sa: f64 = ra.iter().map(|&c| c2(c)).sum();
    let sb: f64 = rb.iter().map(|&c| c2(c)).sum();
    let expected = sa * sb / c2(a.len() as f64);
    let max = (sa + sb) / 2.0;
    if max == expected {
        return 1.0;
    }
    (index - expected) / (max - expected)
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterQuality {
    pub groups: usize,
    pub silhouette: f64,
    pub davies_bouldin: f64,
    pub knn_purity: f64,
    pub nmi: f64,
    pub ari: f64,
}

/// All measures of the module doc for `embeddings` grouped by `labels`.
pub fn cluster_quality(
    embeddings: ArrayView2<f32>,
    labels: &[usize],
    k: usize,
    seed: u64,
) -> ClusterQuality {
    let x = l2_rows(embeddings);
    let groups = labels.iter().max().map_or(0, |m| m + 1);
    let nb = knn_cosine(&x, k);
    let clusters = kmeans(&x, groups, 4, seed);
    ClusterQuality {
        groups,
        silhouette: silhouette_cosine(&x, labels),
        davies_bouldin: davies_bouldin(&x, labels),
        knn_purity: knn_purity(&nb, labels),
        nmi: nmi(labels, &clusters),
        ari: ari(labels, &clusters),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn known_answers() {
        // Two tight, opposite groups: perfect separation.
        let x = l2_rows(array![[1.0f32, 0.0], [0.99, 0.01], [-1.0, 0.0], [-0.99, -0.01]].view());
        let l = [0, 0, 1, 1];
        assert!(silhouette_cosine(&x, &l) > 0.99);
        assert!(davies_bouldin(&x, &l) < 0.01);
        assert_eq!(knn_purity(&knn_cosine(&x, 1), &l), 1.0);
        let c = kmeans(&x, 2, 2, 0);
        assert_eq!(nmi(&l, &c), 1.0);
        assert_eq!(ari(&l, &c), 1.0);
        // Relabelled clusters are the same partition.
        assert_eq!(ari(&[0, 0, 1, 1], &[1, 1, 0, 0]), 1.0);
        // By hand: a = [0,0,1,1], b = [0,1,0,1]: every pair split → MI 0.
        assert!(nmi(&[0, 0, 1, 1], &[0, 1, 0, 1]).abs() < 1e-12);
        // ARI of that pair: index 0, expected 2·2/6 = 2/3, max 2 → (0 − 2/3)/(2 − 2/3) = −0.5.
        assert!((ari(&[0, 0, 1, 1], &[0, 1, 0, 1]) + 0.5).abs() < 1e-12);
    }
}
