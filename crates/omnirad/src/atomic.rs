//! Outputs appear whole or not at all: each is written beside its target and renamed over it,
//! so an interrupted job never leaves a truncated file for a reader, or its own resume, to trust.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// `write` fills a temporary path; on success it replaces `path`.
pub fn write_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    write(&tmp)?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

pub fn write(path: &Path, contents: impl AsRef<[u8]>) -> Result<()> {
    write_with(path, |tmp| {
        std::fs::write(tmp, contents).with_context(|| format!("writing {}", tmp.display()))
    })
}
