use std::path::PathBuf;

/// `../shared/data` beside the repository (override with OMNIRAD_DATA). Missing data fails the
/// test rather than skipping it: these tests exist to check real files.
pub fn data(rel: &str) -> PathBuf {
    let root = std::env::var_os("OMNIRAD_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    let p = root.join(rel);
    assert!(
        p.exists(),
        "test data {} not found (set OMNIRAD_DATA to shared/data)",
        p.display()
    );
    p
}

/// A fresh folder under the system temp dir, removed when the returned guard drops (also when
/// the test fails).
pub fn tmpdir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("omnirad-{name}-"))
        .tempdir()
        .unwrap()
}
