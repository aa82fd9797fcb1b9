//! 2-D projections of embeddings for plots: PCA, t-SNE (bhtsne, Barnes-Hut) and UMAP (umap-rs
//! on a cosine k-NN graph). All start from L2-normalised rows; t-SNE and UMAP are initialised
//! from the PCA projection (as scikit-learn's t-SNE and umap-learn's spectral start aim to be:
//! a global layout first), which makes t-SNE deterministic. UMAP's negative sampling draws from
//! a thread RNG, so its layout differs slightly between runs; the metrics never use it.

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
            let k = 15.min(n - 1);
            let nb = knn_cosine(&x, k);
            let idx = Array2::from_shape_fn((n, k), |(i, j)| nb[i][j].0 as u32);
            // Euclidean distance between unit vectors, √(2 − 2·cos), as UMAP's graph expects a metric.
            let dist = Array2::from_shape_fn((n, k), |(i, j)| {
                (2.0 - 2.0 * nb[i][j].1).max(0.0).sqrt() as f32
            });
            let data = x.mapv(|v| v as f32);
            let init = Array2::from_shape_vec((n, 2), scaled_init(&pca, 10.0)).expect("n × 2");
            let config = umap_rs::UmapConfig {
                n_components: 2,
                graph: umap_rs::GraphParams {
                    n_neighbors: k,
                    ..Default::default()
                },
                ..Default::default()
            };
            let model =
                umap_rs::Umap::new(config).fit(data.view(), idx.view(), dist.view(), init.view());
            model.into_embedding().mapv(f64::from)
        }
    }
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
