//! A benchmark's finished runs, one JSON line each in `OUT.runs.jsonl` beside its table, so an
//! interrupted `bench medmnist` / `bench medsegbench` run again with the same settings reuses
//! them and trains only what is missing. A line is reused only under the same key: the
//! benchmark's settings (every argument that changes a result, and the model files' stamps)
//! plus what names the run (data file and stamp, seed or head).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub struct RunLog<T> {
    path: Option<PathBuf>,
    settings: String,
    done: Vec<Finished<T>>,
}

#[derive(Serialize, Deserialize)]
struct Finished<T> {
    key: String,
    run: String,
    result: T,
}

impl<T: Serialize + DeserializeOwned + Clone> RunLog<T> {
    /// The log beside `out` (nothing is kept without it).
    pub fn open(out: Option<&Path>, settings: String) -> Result<Self> {
        let Some(out) = out else {
            return Ok(Self {
                path: None,
                settings,
                done: vec![],
            });
        };
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let path = out.with_extension("runs.jsonl");
        let mut done = Vec::new();
        if let Ok(text) = std::fs::read_to_string(&path) {
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                match serde_json::from_str::<Finished<T>>(line) {
                    Ok(f) => done.push(f),
                    Err(e) => eprintln!(
                        "{} line {}: not a finished run ({e}); ignored",
                        path.display(),
                        i + 1
                    ),
                }
            }
        }
        Ok(Self {
            path: Some(path),
            settings,
            done,
        })
    }

    fn key(&self, id: &str) -> String {
        use md5::{Digest, Md5};
        let text = format!("{}|{id}", self.settings);
        format!("{:x}", Md5::digest(text.as_bytes()))
    }

    /// The result of an earlier run `id` (`run` names it in messages) under these settings.
    pub fn get(&self, run: &str, id: &str) -> Option<T> {
        let key = self.key(id);
        let f = self.done.iter().find(|f| f.key == key)?;
        eprintln!(
            "{run}: finished earlier ({})",
            self.path.as_ref()?.display()
        );
        Some(f.result.clone())
    }

    /// Keeps `result` of run `id`, rewriting the log atomically.
    pub fn record(&mut self, run: &str, id: &str, result: &T) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let key = self.key(id);
        self.done.retain(|f| f.key != key);
        self.done.push(Finished {
            key,
            run: run.to_string(),
            result: result.clone(),
        });
        let mut text = String::new();
        for f in &self.done {
            text += &serde_json::to_string(f)?;
            text.push('\n');
        }
        crate::atomic::write(path, text)
    }
}
