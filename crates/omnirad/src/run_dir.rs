//! A training run's directory, shared by `segment train`, `finetune` and `probe`:
//! `run.json` (the settings; `--resume` must match them), `history.jsonl` (one line per epoch)
//! and `checkpoint.safetensors` (written after every epoch, removed once the bundle is written).

use std::cell::Cell;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

pub const CHECKPOINT: &str = "checkpoint.safetensors";

pub struct RunDir<'a> {
    pub dir: &'a Path,
    /// Continue from the checkpoint instead of starting afresh.
    pub resume: bool,
    /// Stop after this epoch (the checkpoint is kept).
    pub stop_after: Option<usize>,
    /// The last epoch `go_on` was asked about: when training stops, the one it stopped after
    /// (later than `stop_after` when a run resumed past it, as it always makes one epoch).
    last_epoch: Cell<usize>,
}

impl<'a> RunDir<'a> {
    pub fn new(dir: &'a Path, resume: bool, stop_after: Option<usize>) -> Self {
        Self {
            dir,
            resume,
            stop_after,
            last_epoch: Cell::new(0),
        }
    }

    /// Records `settings` for a new run, or checks a resumed run's against them.
    pub fn start(&self, settings: &serde_json::Value) -> Result<()> {
        std::fs::create_dir_all(self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let run_json = self.dir.join("run.json");
        if !self.resume {
            return crate::atomic::write(&run_json, serde_json::to_string_pretty(settings)?);
        }
        let before: serde_json::Value = std::fs::read_to_string(&run_json)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .with_context(|| {
                format!(
                    "--resume: no run in {} (run.json missing)",
                    self.dir.display()
                )
            })?;
        if &before != settings {
            bail!(
                "--resume: the settings differ from the run in {} (see its run.json)",
                self.dir.display()
            );
        }
        Ok(())
    }

    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join(CHECKPOINT)
    }

    /// `history.jsonl`, rewritten with the epochs a resumed run already has.
    pub fn history<T: Serialize>(&self, done: &[T]) -> Result<History> {
        let path = self.dir.join("history.jsonl");
        let mut f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        for l in done {
            writeln!(f, "{}", serde_json::to_string(l)?)?;
        }
        Ok(History(f))
    }

    /// After the bundle is written: the checkpoint has served its purpose (it can be as large
    /// as four copies of the model).
    pub fn finish(&self) {
        let _ = std::fs::remove_file(self.checkpoint());
    }

    /// Whether training goes on after `epoch`.
    pub fn go_on(&self, epoch: usize) -> bool {
        self.last_epoch.set(epoch);
        self.stop_after.is_none_or(|n| epoch < n)
    }

    pub fn stopped_after(&self) -> usize {
        self.last_epoch.get()
    }

    /// A soup's or an ensemble's run stops where its member's did.
    pub fn stopped_with(&self, member: &RunDir) {
        self.last_epoch.set(member.stopped_after());
    }

    pub fn stopped_message(&self) -> String {
        format!(
            "stopped after epoch {}; continue with --resume (checkpoint in {})",
            self.stopped_after(),
            self.checkpoint().display()
        )
    }
}

pub struct History(File);

impl History {
    /// Appends an epoch's line; a failed write loses only that line of the log, so it is
    /// reported and training goes on.
    pub fn push<T: Serialize>(&mut self, line: &T) {
        let r = serde_json::to_string(line)
            .map_err(std::io::Error::other)
            .and_then(|l| writeln!(self.0, "{l}"));
        if let Err(e) = r {
            eprintln!("history.jsonl: {e}");
        }
    }
}
