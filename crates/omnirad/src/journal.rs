//! The output list of a resumable item job (`data slices`' manifest.csv, `segment predict`'s
//! masks.csv). After each chunk of items its rows are appended to `LIST.partial.csv`, then
//! `LIST.progress.json` (items done, bytes of rows, failures) is rewritten atomically; so a
//! stopped or killed run continues after its last whole chunk, and rows past `bytes` (from a
//! chunk that did not finish) are cut off.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use omnirad_data::Image;
use serde::{Deserialize, Serialize};

use crate::embed::{failure_text, report_failed, sidecar, write_failed};

/// Items (or, for items that hold many, images) decoded between commits.
pub const CHUNK: usize = 32;

#[derive(Serialize, Deserialize)]
pub struct Progress {
    key: String,
    /// Items done (in the job's item order).
    pub items: usize,
    bytes: u64,
    /// Outputs written.
    pub written: usize,
    pub failed: Vec<(String, String)>,
}

pub struct Journal {
    list: PathBuf,
    partial: PathBuf,
    progress_file: PathBuf,
    pub progress: Progress,
}

impl Journal {
    /// The journal of job `key` (settings and its `items` items) for `list`: an earlier run's,
    /// if it was the same job, each of its rows passed to `on_row` (to reserve the output names
    /// it gave); otherwise a fresh one.
    pub fn open(
        list: &Path,
        key: String,
        items: usize,
        mut on_row: impl FnMut(&str),
    ) -> Result<Self> {
        let (partial, progress_file) =
            (sidecar(list, "partial.csv"), sidecar(list, "progress.json"));
        let earlier = std::fs::read_to_string(&progress_file)
            .ok()
            .and_then(|t| serde_json::from_str::<Progress>(&t).ok());
        let progress = match earlier.filter(|p| p.key == key) {
            Some(p) => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&partial)
                    .with_context(|| format!("opening {}", partial.display()))?;
                f.set_len(p.bytes)
                    .with_context(|| format!("truncating {}", partial.display()))?;
                let rows = std::fs::read_to_string(&partial)
                    .with_context(|| format!("reading {}", partial.display()))?;
                rows.lines().for_each(&mut on_row);
                eprintln!(
                    "continuing after {} of {items} items (rows so far in {})",
                    p.items,
                    partial.display()
                );
                p
            }
            None => {
                if progress_file.exists() {
                    eprintln!(
                        "{}: progress of another job (other settings or inputs); starting over",
                        progress_file.display()
                    );
                }
                let _ = std::fs::remove_file(&partial);
                Progress {
                    key,
                    items: 0,
                    bytes: 0,
                    written: 0,
                    failed: Vec::new(),
                }
            }
        };
        Ok(Self {
            list: list.to_path_buf(),
            partial,
            progress_file,
            progress,
        })
    }

    /// The items still to do, up to `stop_after` items in all.
    pub fn todo(&self, items: usize, stop_after: Option<usize>) -> Range<usize> {
        let done = self.progress.items;
        done..stop_after.map_or(items, |s| s.clamp(done, items))
    }

    /// An item's images; a failure is recorded (None), or with `strict` ends the job.
    pub fn images(
        &mut self,
        id: String,
        loaded: Result<Vec<Image>, String>,
        strict: bool,
    ) -> Result<Option<Vec<Image>>> {
        match loaded {
            Ok(v) => Ok(Some(v)),
            Err(e) if strict => bail!("{} (--strict)", failure_text(&id, &e)),
            Err(e) => {
                self.progress.failed.push((id, e));
                Ok(None)
            }
        }
    }

    /// Records a finished chunk: `items` more items done, their `rows`, `written` outputs.
    pub fn commit(&mut self, items: usize, rows: &str, written: usize) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.partial)
            .with_context(|| format!("opening {}", self.partial.display()))?;
        f.write_all(rows.as_bytes())
            .and_then(|_| f.sync_data())
            .with_context(|| format!("writing {}", self.partial.display()))?;
        let p = &mut self.progress;
        p.items += items;
        p.bytes += rows.len() as u64;
        p.written += written;
        crate::atomic::write(&self.progress_file, serde_json::to_string(p)?)
    }

    /// Ends the run: when it stopped before the last of its `items` items, says how to continue;
    /// otherwise writes the list (`header` line, then every row) and its failures file, removes
    /// the journal's files and reports what was written (`what`: "images", "masks"). Err when
    /// nothing in `input` could be read.
    pub fn close(self, items: usize, header: &str, what: &str, input: &Path) -> Result<()> {
        let p = &self.progress;
        if p.items < items {
            eprintln!(
                "stopped after {} items; run the same command again to continue (progress in {})",
                p.items,
                self.progress_file.display()
            );
            return Ok(());
        }
        let rows = std::fs::read_to_string(&self.partial).unwrap_or_default();
        crate::atomic::write(&self.list, format!("{header}\n{rows}"))?;
        write_failed(&self.list, &p.failed)?;
        let _ = std::fs::remove_file(&self.partial);
        let _ = std::fs::remove_file(&self.progress_file);
        let out = self.list.parent().unwrap_or(Path::new("."));
        eprintln!(
            "{} {what} written to {} (listed in {})",
            p.written,
            out.display(),
            self.list.display()
        );
        report_failed(Some(&self.list), &p.failed);
        if p.written == 0 {
            bail!("{}: no readable images", input.display());
        }
        Ok(())
    }
}
