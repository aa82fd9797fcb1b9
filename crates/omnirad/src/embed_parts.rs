//! An embedding or prediction job's finished batches on disk (`OUT.parts/`), so a long job
//! over a large archive that is stopped (`--stop-after`) or killed continues where it was when
//! run again.
//! Parts are written every 30 s and when the job stops: `part-FIRST.npy` (the rows) and
//! `part-FIRST.json` (which items they cover, their metadata and failures). The JSON is written
//! last, so a part without it does not count. A part is reused only under the same job key
//! (settings and the exact item list).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ndarray::{Array2, Ix2};
use omnirad_data::{Item, Meta};
use serde::{Deserialize, Serialize};

pub struct Parts {
    pub dir: PathBuf,
    /// Everything but the item list that the embeddings depend on.
    pub settings: String,
    /// Stop after this many items (the parts are kept; the next run continues).
    pub stop_after: Option<usize>,
}

#[derive(Serialize, Deserialize)]
struct PartInfo {
    key: String,
    first: usize,
    items: usize,
    dim: usize,
    metas: Vec<Meta>,
    failed: Vec<(String, String)>,
}

/// What earlier runs finished, in item order.
#[derive(Default)]
pub struct Done {
    pub items: usize,
    pub dim: usize,
    pub values: Vec<f32>,
    pub metas: Vec<Meta>,
    pub failed: Vec<(String, String)>,
}

/// What identifies a resumable job: its `settings` and exact item list, hashed.
pub fn job_key(settings: &str, items: &[Item]) -> String {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    h.update(settings.as_bytes());
    for it in items {
        h.update(format!("{it:?}\n").as_bytes());
    }
    format!("{:x}", h.finalize())
}

impl Parts {
    /// The key of this job over `items`.
    pub fn key(&self, items: &[Item]) -> String {
        job_key(&self.settings, items)
    }

    fn file(&self, first: usize, ext: &str) -> PathBuf {
        self.dir.join(format!("part-{first:010}.{ext}"))
    }

    /// The contiguous run of parts from item 0 written under `key`; parts of another job are
    /// removed, anything unreadable or after a gap is ignored (and rewritten).
    pub fn load(&self, key: &str) -> Result<Done> {
        let mut infos = Vec::new();
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read_to_string(&p)
                .ok()
                .and_then(|t| serde_json::from_str::<PartInfo>(&t).ok())
            {
                Some(info) if info.key == key => infos.push(info),
                Some(_) => {
                    eprintln!(
                        "{}: parts of another job (other settings or inputs); starting over",
                        self.dir.display()
                    );
                    std::fs::remove_dir_all(&self.dir)
                        .with_context(|| format!("removing {}", self.dir.display()))?;
                    return Ok(Done::default());
                }
                None => eprintln!("{}: unreadable part; ignored", p.display()),
            }
        }
        infos.sort_by_key(|i| i.first);
        let mut done = Done::default();
        for info in infos {
            if info.first != done.items {
                break;
            }
            let rows = if info.metas.is_empty() {
                Array2::zeros((0, info.dim))
            } else {
                let p = self.file(info.first, "npy");
                match omnirad_data::npy::read_npy::<f32, Ix2>(&p) {
                    Ok(a) if a.nrows() == info.metas.len() && a.ncols() == info.dim => a,
                    _ => {
                        eprintln!("{}: unreadable or incomplete; ignored", p.display());
                        break;
                    }
                }
            };
            if !info.metas.is_empty() {
                if done.dim != 0 && done.dim != info.dim {
                    break;
                }
                done.dim = info.dim;
            }
            done.values.extend(rows.iter());
            done.items += info.items;
            done.metas.extend(info.metas);
            done.failed.extend(info.failed);
        }
        Ok(done)
    }

    /// Writes the part of `items` items starting at item `first`.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &self,
        key: &str,
        first: usize,
        items: usize,
        dim: usize,
        values: &[f32],
        metas: &[Meta],
        failed: &[(String, String)],
    ) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        if !metas.is_empty() {
            let rows = Array2::from_shape_vec((metas.len(), dim), values.to_vec())
                .expect("one row per image");
            crate::atomic::write_with(&self.file(first, "npy"), |tmp| {
                ndarray_npy::write_npy(tmp, &rows)
                    .with_context(|| format!("writing {}", tmp.display()))
            })?;
        }
        let info = PartInfo {
            key: key.to_string(),
            first,
            items,
            dim,
            metas: metas.to_vec(),
            failed: failed.to_vec(),
        };
        crate::atomic::write(&self.file(first, "json"), serde_json::to_string(&info)?)
    }

    pub fn stopped_message(&self) -> String {
        format!(
            "stopped after {} items; run the same command again to continue (finished parts in {})",
            self.stop_after.unwrap_or(0),
            self.dir.display()
        )
    }

    /// After the outputs are written.
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `OUT.parts` beside an output file.
pub fn dir_for(out: &Path) -> PathBuf {
    PathBuf::from(format!("{}.parts", out.display()))
}
