//! Cluster-quality measures against scikit-learn on a committed fixture
//! (`tests/fixtures/make_cluster_fixture.py`).

use ndarray::Array2;
use omnirad_eval::cluster::{
    ari, davies_bouldin, knn_cosine, knn_purity, l2_rows, nmi, silhouette_cosine,
};

#[test]
fn matches_sklearn() {
    let text = include_str!("fixtures/cluster_sklearn.json");
    let f: serde_json::Value = serde_json::from_str(text).unwrap();
    let rows: Vec<Vec<f32>> = serde_json::from_value(f["x"].clone()).unwrap();
    let labels: Vec<usize> = serde_json::from_value(f["labels"].clone()).unwrap();
    let other: Vec<usize> = serde_json::from_value(f["other"].clone()).unwrap();
    let x = Array2::from_shape_vec((rows.len(), rows[0].len()), rows.concat()).unwrap();
    let xn = l2_rows(x.view());
    let close = |name: &str, ours: f64| {
        let want = f[name].as_f64().unwrap();
        assert!(
            (ours - want).abs() <= 1e-9 * want.abs().max(1.0),
            "{name}: {ours} vs sklearn {want}"
        );
    };
    close("silhouette_cosine", silhouette_cosine(&xn, &labels));
    close("davies_bouldin_normalised", davies_bouldin(&xn, &labels));
    let k = f["k"].as_u64().unwrap() as usize;
    close("knn_purity", knn_purity(&knn_cosine(&xn, k), &labels));
    close("nmi", nmi(&labels, &other));
    close("ari", ari(&labels, &other));
}
