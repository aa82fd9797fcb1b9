//! 2-D projections of embeddings for plots: PCA, t-SNE (bhtsne, Barnes-Hut) and UMAP
//! (umap-rs's fuzzy graph on a cosine k-NN, exact or from HNSW above 20 000 points; our layout
//! step). All start from L2-normalised rows;
//! t-SNE and UMAP are initialised from the PCA projection (scikit-learn's t-SNE `init="pca"`;
//! umap-learn's spectral start plays the same role: a global layout first). UMAP's layout is
//! seeded and deterministic; bhtsne's parallel gradient sums may differ in the last digits
//! between runs. The quality metrics never use the projections.

use ndarray::{Array1, Array2, ArrayView2, Axis};
use serde::{Deserialize, Serialize};

use crate::cluster::{knn_cosine, l2_rows};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Projection {
    Pca,
    Tsne,
    Umap,
}

impl Projection {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "pca" => Ok(Self::Pca),
            "tsne" | "t-sne" => Ok(Self::Tsne),
            "umap" => Ok(Self::Umap),
            _ => Err(format!("unknown projection '{s}' (pca, tsne, umap)")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Pca => "PCA",
            Self::Tsne => "t-SNE",
            Self::Umap => "UMAP",
        }
    }
}

/// Top-2 principal components by power iteration with deflation on the covariance: two
/// eigenvectors of a D×D matrix do not justify a LAPACK dependency.
pub fn pca2(x: &Array2<f64>) -> Array2<f64> {
    let n = x.nrows().max(1) as f64;
    let mean = x
        .mean_axis(Axis(0))
        .unwrap_or_else(|| Array1::zeros(x.ncols()));
    let c = x - &mean;
    let mut cov = c.t().dot(&c) / n;
    let d = cov.nrows();
    let mut out = Array2::zeros((x.nrows(), 2));
    for k in 0..2.min(d) {
        // A fixed, non-degenerate start keeps the result deterministic.
        let mut v = Array1::from_shape_fn(d, |i| 1.0 + (i as f64 * 0.618).fract());
        let mut lambda = 0.0;
        for _ in 0..500 {
            let w = cov.dot(&v);
            let norm = w.dot(&w).sqrt();
            if norm < 1e-300 {
                break;
            }
            let next = w / norm;
            let delta = (&next - &v).mapv(f64::abs).sum();
            v = next;
            lambda = norm;
            if delta < 1e-12 {
                break;
            }
        }
        // Sign convention: the largest-magnitude loading is positive (as sklearn's svd_flip).
        let imax = v
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .map_or(0, |m| m.0);
        if v[imax] < 0.0 {
            v.mapv_inplace(|a| -a);
        }
        out.column_mut(k).assign(&c.dot(&v));
        let vv = v.clone().insert_axis(Axis(1));
        cov = cov - vv.dot(&vv.t()) * lambda;
    }
    out
}

fn scaled_init(p: &Array2<f64>, std: f64) -> Vec<f32> {
    let s = p.column(0).std(0.0).max(1e-12);
    p.iter().map(|&v| (v / s * std) as f32).collect()
}

/// 2-D coordinates [N, 2] of `embeddings`.
pub fn project(embeddings: ArrayView2<f32>, how: Projection) -> Array2<f64> {
    let x = l2_rows(embeddings);
    let n = x.nrows();
    let pca = pca2(&x);
    if how == Projection::Pca || n < 5 {
        return pca;
    }
    match how {
        Projection::Pca => pca,
        Projection::Tsne => {
            let rows: Vec<Vec<f32>> = x
                .rows()
                .into_iter()
                .map(|r| r.iter().map(|&v| v as f32).collect())
                .collect();
            let perplexity = 30f32.min((n as f32 - 1.0) / 3.0).max(1.0);
            let mut t: bhtsne::tSNE<f32, Vec<f32>> = bhtsne::tSNE::new(&rows);
            t.embedding_dim(2)
                .perplexity(perplexity)
                .epochs(1000)
                // sklearn's init="pca" scales the start to std 1e-4.
                .initial_embedding(scaled_init(&pca, 1e-4))
                .barnes_hut(0.5, |a, b| {
                    a.iter()
                        .zip(b)
                        .map(|(p, q)| (p - q) * (p - q))
                        .sum::<f32>()
                        .sqrt()
                });
            Array2::from_shape_vec((n, 2), t.embedding().into_iter().map(f64::from).collect())
                .expect("n × 2")
        }
        Projection::Umap => {
            // umap-learn's k-NN lists start with the point itself (distance 0); 15 in all.
            let k = 15.min(n);
            let nb = if n > crate::retrieval::EXACT_LIMIT {
                // Large sets: neighbours from an HNSW graph (the point itself dropped).
                crate::retrieval::Gallery::new(embeddings, Some(true))
                    .search(embeddings, k)
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| r.into_iter().filter(|e| e.0 != i).take(k - 1).collect())
                    .collect()
            } else {
                knn_cosine(&x, k - 1)
            };
            let entry = |i: usize, j: usize| if j == 0 { (i, 1.0) } else { nb[i][j - 1] };
            let idx = Array2::from_shape_fn((n, k), |(i, j)| entry(i, j).0 as u32);
            // Euclidean distance between unit vectors, √(2 − 2·cos), as UMAP's graph expects a metric.
            let dist = Array2::from_shape_fn((n, k), |(i, j)| {
                (2.0 - 2.0 * entry(i, j).1).max(0.0).sqrt() as f32
            });
            let data = x.mapv(|v| v as f32);
            // umap-learn scales its initial layout into a box of side 10.
            let m = pca.iter().fold(1e-12f64, |a, v| a.max(v.abs()));
            let init = pca.mapv(|v| (v / m * 10.0) as f32);
            let config = umap_rs::UmapConfig {
                n_components: 2,
                graph: umap_rs::GraphParams {
                    n_neighbors: k,
                    ..Default::default()
                },
                ..Default::default()
            };
            let manifold =
                umap_rs::Umap::new(config).learn_manifold(data.view(), idx.view(), dist.view());
            let (a, b) = manifold.curve_params();
            let mut edges = Vec::new();
            for (i, row) in manifold.graph().outer_iterator().enumerate() {
                for (j, &w) in row.iter() {
                    edges.push((i, j, w as f64));
                }
            }
            umap_layout(&edges, init.mapv(f64::from), a as f64, b as f64, 500, 0)
        }
    }
}

/// UMAP's layout optimisation (umap-learn `optimize_layout_euclidean`, fit mode): edges sampled
/// in proportion to their weight pull their ends together, 5 random points per sample push the
/// head away, step size 1 → 0 linearly, gradients clipped at ±4. Written here because umap-rs
/// 0.4.5's gradient divides by a·d^(2b+2) + 1 instead of a·d^(2b) + 1 (an extra squared
/// distance), which scatters clusters (see the layout test); its graph construction is used.
fn umap_layout(
    edges: &[(usize, usize, f64)],
    mut y: Array2<f64>,
    a: f64,
    b: f64,
    epochs: usize,
    seed: u64,
) -> Array2<f64> {
    use rand::{Rng, SeedableRng};
    let wmax = edges.iter().fold(0.0f64, |m, e| m.max(e.2));
    let edges: Vec<_> = edges
        .iter()
        .filter(|e| e.2 >= wmax / epochs as f64 && e.0 != e.1)
        .collect();
    let n = y.nrows();
    let per_sample: Vec<f64> = edges.iter().map(|e| wmax / e.2).collect();
    let neg_rate = 5.0;
    let per_negative: Vec<f64> = per_sample.iter().map(|p| p / neg_rate).collect();
    let mut next = per_sample.clone();
    let mut next_neg = per_negative.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let clip = |g: f64| g.clamp(-4.0, 4.0);
    for epoch in 0..epochs {
        let alpha = 1.0 - epoch as f64 / epochs as f64;
        let now = epoch as f64;
        for (e, &&(j, k, _)) in edges.iter().enumerate() {
            if next[e] > now {
                continue;
            }
            let d2 = (y[[j, 0]] - y[[k, 0]]).powi(2) + (y[[j, 1]] - y[[k, 1]]).powi(2);
            if d2 > 0.0 {
                let g = -2.0 * a * b * d2.powf(b - 1.0) / (a * d2.powf(b) + 1.0);
                for c in 0..2 {
                    let step = clip(g * (y[[j, c]] - y[[k, c]])) * alpha;
                    y[[j, c]] += step;
                    y[[k, c]] -= step;
                }
            }
            next[e] += per_sample[e];
            let negatives = ((now - next_neg[e]) / per_negative[e]).max(0.0) as usize;
            for _ in 0..negatives {
                let k = rng.random_range(0..n);
                if k == j {
                    continue;
                }
                let d2 = (y[[j, 0]] - y[[k, 0]]).powi(2) + (y[[j, 1]] - y[[k, 1]]).powi(2);
                let g = if d2 > 0.0 {
                    2.0 * b / ((0.001 + d2) * (a * d2.powf(b) + 1.0))
                } else {
                    0.0
                };
                for c in 0..2 {
                    let step = if g > 0.0 {
                        clip(g * (y[[j, c]] - y[[k, c]]))
                    } else {
                        4.0
                    };
                    y[[j, c]] += step * alpha;
                }
            }
            next_neg[e] += negatives as f64 * per_negative[e];
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn pca_finds_the_main_axis() {
        // Points spread along (1, 1, 0) with a little uncorrelated spread along (0, 0, 1).
        let x = array![
            [1.0, 1.0, 0.1],
            [2.0, 2.0, -0.05],
            [-1.0, -1.0, 0.1],
            [-2.0, -2.0, -0.05],
            [0.0, 0.0, -0.1]
        ];
        let p = pca2(&x);
        // First component: projection on (1,1,0)/√2 of the centred points.
        let want = [1.0, 2.0, -1.0, -2.0, 0.0].map(|v: f64| v * 2f64.sqrt());
        for (a, b) in p.column(0).iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert!(p.column(1).iter().all(|v| v.abs() < 0.2));
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Three separated groups stay separated in every 2-D layout.
    #[test]
    fn layouts_keep_groups_apart() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let (n, d) = (150, 16);
        let labels: Vec<usize> = (0..n).map(|i| i % 3).collect();
        let x = Array2::from_shape_fn((n, d), |(i, j)| {
            let centre = if j % 3 == labels[i] { 3.0 } else { 0.0 };
            centre + rng.random_range(-1.0f32..1.0)
        });
        for how in [Projection::Pca, Projection::Tsne, Projection::Umap] {
            let p = project(x.view(), how);
            // Euclidean neighbours in the plane (cosine is not a distance in 2-D).
            let mut pur = 0.0;
            for i in 0..n {
                let mut dists: Vec<(usize, f64)> = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| {
                        (
                            j,
                            (p[[i, 0]] - p[[j, 0]]).powi(2) + (p[[i, 1]] - p[[j, 1]]).powi(2),
                        )
                    })
                    .collect();
                dists.sort_by(|a, b| a.1.total_cmp(&b.1));
                pur += dists[..10]
                    .iter()
                    .filter(|(j, _)| labels[*j] == labels[i])
                    .count() as f64
                    / 10.0;
            }
            let pur = pur / n as f64;
            eprintln!("{how:?}: 2-D k-NN purity {pur}");
            assert!(pur > 0.9, "{how:?}: {pur}");
        }
    }
}
