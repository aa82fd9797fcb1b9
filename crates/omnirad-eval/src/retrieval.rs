//! Image-to-image retrieval: cosine nearest neighbours, exact or through an HNSW graph
//! (hnsw_rs), and the usual retrieval scores by label.
//!
//! For a query with R relevant gallery items (same label) and rel_i = 1 when the i-th result is
//! relevant:
//! ```text
//! P@k      = (1/k) Σ_{i≤k} rel_i
//! Recall@k = 1 if Σ_{i≤k} rel_i > 0 else 0            (CBIR "R@k": a relevant case is shown)
//! AP@k     = (1/min(k, R)) Σ_{i≤k} P@i · rel_i         (0 when R = 0)
//! ```
//! each averaged over queries (mAP@k over queries with R > 0).

use hnsw_rs::prelude::{DistCosine, Hnsw};
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;
use serde::Serialize;

use crate::cluster::l2_rows;

/// Above this many gallery items, `search` goes through HNSW; below, exact search is cheap.
pub const EXACT_LIMIT: usize = 20_000;

/// A searchable gallery of embeddings.
pub struct Gallery {
    x: Array2<f64>,
    hnsw: Option<Hnsw<'static, f32, DistCosine>>,
}

/// Items inserted one by one before the parallel insertion starts.
const SERIAL_SEED: usize = 1024;

impl Gallery {
    /// `approximate`: None picks HNSW above [`EXACT_LIMIT`] items.
    pub fn new(embeddings: ArrayView2<f32>, approximate: Option<bool>) -> Self {
        let x = l2_rows(embeddings);
        let n = x.nrows();
        let hnsw = approximate.unwrap_or(n > EXACT_LIMIT).then(|| {
            let h = Hnsw::<f32, DistCosine>::new(16, n.max(1), 16, 200, DistCosine {});
            let rows: Vec<Vec<f32>> = x
                .rows()
                .into_iter()
                .map(|r| r.iter().map(|&v| v as f32).collect())
                .collect();
            let data: Vec<(&Vec<f32>, usize)> = rows.iter().zip(0..).collect();
            // Concurrent insertion into a near-empty graph can leave early points unlinked (seen:
            // an item unreachable in a 4-item gallery); a serial seed makes the graph connected.
            let seed = data.len().min(SERIAL_SEED);
            for (v, id) in &data[..seed] {
                h.insert((v.as_slice(), *id));
            }
            h.parallel_insert(&data[seed..]);
            h
        });
        Self { x, hnsw }
    }

    pub fn len(&self) -> usize {
        self.x.nrows()
    }

    pub fn is_empty(&self) -> bool {
        self.x.nrows() == 0
    }

    pub fn is_approximate(&self) -> bool {
        self.hnsw.is_some()
    }

    /// The `k` most similar gallery items to each query: (index, cosine similarity), best first.
    pub fn search(&self, queries: ArrayView2<f32>, k: usize) -> Vec<Vec<(usize, f64)>> {
        let q = l2_rows(queries);
        let k = k.min(self.len());
        if let Some(h) = &self.hnsw {
            return q
                .rows()
                .into_iter()
                .collect::<Vec<_>>()
                .par_iter()
                .map(|r| {
                    let v: Vec<f32> = r.iter().map(|&v| v as f32).collect();
                    h.search(&v, k, (2 * k).max(64))
                        .into_iter()
                        .map(|n| (n.d_id, 1.0 - n.distance as f64))
                        .collect()
                })
                .collect();
        }
        // Row by row: O(gallery) memory per query, however many queries there are.
        (0..q.nrows())
            .into_par_iter()
            .map(|i| {
                let mut v: Vec<(usize, f64)> =
                    self.x.dot(&q.row(i)).into_iter().enumerate().collect();
                if k > 0 && k < v.len() {
                    v.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                }
                v.truncate(k);
                v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                v
            })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RetrievalScores {
    pub k: usize,
    pub recall: f64,
    pub precision: f64,
    pub map: f64,
}

/// Scores at each cut-off in `ks` for ranked results (`ranked[q]` = gallery indices, best first,
/// at least max(ks) long where the gallery allows).
pub fn retrieval_scores<L: PartialEq>(
    ranked: &[Vec<usize>],
    query_labels: &[L],
    gallery_labels: &[L],
    ks: &[usize],
) -> Vec<RetrievalScores> {
    let relevant_total: Vec<usize> = query_labels
        .iter()
        .map(|q| gallery_labels.iter().filter(|g| *g == q).count())
        .collect();
    ks.iter()
        .map(|&k| {
            let (mut rec, mut prec, mut ap_sum, mut ap_n) = (0.0, 0.0, 0.0, 0usize);
            for (qi, r) in ranked.iter().enumerate() {
                let rel: Vec<bool> = r
                    .iter()
                    .take(k)
                    .map(|&g| gallery_labels[g] == query_labels[qi])
                    .collect();
                let hits = rel.iter().filter(|&&b| b).count();
                rec += (hits > 0) as u8 as f64;
                prec += hits as f64 / k as f64;
                let big_r = relevant_total[qi];
                if big_r > 0 {
                    let mut seen = 0;
                    let mut s = 0.0;
                    for (i, &b) in rel.iter().enumerate() {
                        if b {
                            seen += 1;
                            s += seen as f64 / (i + 1) as f64;
                        }
                    }
                    ap_sum += s / k.min(big_r) as f64;
                    ap_n += 1;
                }
            }
            let n = ranked.len().max(1) as f64;
            RetrievalScores {
                k,
                recall: rec / n,
                precision: prec / n,
                map: ap_sum / ap_n.max(1) as f64,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn scores_by_hand() {
        // Query label 1; gallery labels by rank: [0, 1, 1]; 2 relevant in the gallery.
        let g = [0, 1, 1];
        let s = retrieval_scores(&[vec![0, 1, 2]], &[1], &g, &[1, 2, 3]);
        assert_eq!(s[0].recall, 0.0);
        assert_eq!(s[1].recall, 1.0);
        assert!((s[1].precision - 0.5).abs() < 1e-12);
        // AP@2 = (1/2)·(1/2) = 0.25; AP@3 = (1/2)·(1/2 + 2/3) = 7/12.
        assert!((s[1].map - 0.25).abs() < 1e-12);
        assert!((s[2].map - 7.0 / 12.0).abs() < 1e-12);
    }

    #[test]
    fn exact_and_hnsw_agree_on_easy_data() {
        let g = array![
            [1.0f32, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 0.0, 1.0],
            [0.7, 0.7, 0.0]
        ];
        let q = array![[0.9f32, 0.1, 0.0], [0.0, 0.1, 0.9]];
        let exact = Gallery::new(g.view(), Some(false)).search(q.view(), 2);
        let approx = Gallery::new(g.view(), Some(true)).search(q.view(), 2);
        assert_eq!(exact[0][0].0, 0);
        assert_eq!(exact[0][1].0, 3);
        assert_eq!(exact[1][0].0, 2);
        for (e, a) in exact.iter().zip(&approx) {
            let ei: Vec<usize> = e.iter().map(|x| x.0).collect();
            let ai: Vec<usize> = a.iter().map(|x| x.0).collect();
            assert_eq!(ei, ai);
            assert!((e[0].1 - a[0].1).abs() < 1e-5);
        }
    }
}
