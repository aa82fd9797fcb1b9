//! Output file names for per-image outputs (segmentation masks, exported slices), taken from
//! the image ids and unique within one output folder.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use omnirad_data::Item;

/// Output file names unique within one folder, from image ids: the file's path below the input
/// (a folder, or the folder of an input file such as a manifest; subfolders kept; with no input,
/// its name alone) without its extension, then what the id adds after the file (`#3` for a
/// frame, `#axial12` for a slice, `:test[3]` for an npz row); characters other than ASCII
/// letters, digits, `-` and `_` become `_`. A name already given (two files that differ only
/// there, or in their extension) gets `_2`, `_3`, … in the order asked.
pub struct OutputNames {
    root: Option<PathBuf>,
    used: std::collections::HashSet<PathBuf>,
}

impl OutputNames {
    pub fn new(input: Option<&Path>) -> Self {
        let root = input.map(|p| match p.parent() {
            Some(dir) if p.is_file() => dir,
            _ => p,
        });
        Self {
            root: root.map(Path::to_path_buf),
            used: Default::default(),
        }
    }

    /// Marks `name` as given (by an earlier run that a resumed one continues).
    pub fn reserve(&mut self, name: PathBuf) {
        self.used.insert(name);
    }

    pub fn name(&mut self, id: &str) -> PathBuf {
        let clean = |t: &str| {
            t.replace(
                |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_',
                "_",
            )
        };
        // The file is the longest prefix of the id that names one (ids of files with no frames
        // are the path itself).
        let cut = std::iter::once(id.len())
            .chain(id.rmatch_indices(['#', ':']).map(|(i, _)| i))
            .find(|&i| Path::new(&id[..i]).is_file())
            .unwrap_or(id.len());
        let (file, extra) = id.split_at(cut);
        let file = Path::new(file);
        let rel = match self.root.as_ref().and_then(|r| file.strip_prefix(r).ok()) {
            Some(r) if !r.as_os_str().is_empty() => r,
            _ => Path::new(file.file_name().unwrap_or(file.as_os_str())),
        };
        let mut name = PathBuf::new();
        let parts: Vec<_> = rel.iter().filter_map(|c| c.to_str()).collect();
        for (k, part) in parts.iter().enumerate() {
            if k + 1 < parts.len() {
                name.push(clean(part));
                continue;
            }
            let stem = part
                .strip_suffix(".nii.gz")
                .or_else(|| Path::new(part).file_stem().and_then(|s| s.to_str()))
                .unwrap_or(part);
            let extra = clean(extra.trim_start_matches(['#', ':']));
            let extra = extra.trim_end_matches('_');
            name.push(if extra.is_empty() {
                clean(stem)
            } else {
                format!("{}_{extra}", clean(stem))
            });
        }
        if name.as_os_str().is_empty() {
            name.push("image");
        }
        let mut unique = name.clone();
        for k in 2.. {
            if self.used.insert(unique.clone()) {
                break;
            }
            unique = PathBuf::from(format!("{}_{k}", name.display()));
        }
        unique
    }
}

/// `dir/NAME{suffix}` for an [`OutputNames`] name, creating its subfolders.
pub fn output_path(dir: &Path, name: &Path, suffix: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{}{suffix}", name.display()));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    Ok(path)
}

/// Creates the output folder `out` and returns `items` without the files under it when it lies
/// inside the input folder (saying how many were left out), so that a rerun (or a resumed run)
/// does not read its own outputs as inputs.
pub fn outside_outputs(items: Vec<Item>, input: &Path, out: &Path) -> Result<Vec<Item>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let inside = match (std::fs::canonicalize(input), std::fs::canonicalize(out)) {
        (Ok(i), Ok(o)) if input.is_dir() => o.strip_prefix(&i).ok().map(Path::to_path_buf),
        _ => None,
    };
    let Some(rel) = inside else {
        return Ok(items);
    };
    let n = items.len();
    let kept: Vec<Item> = items
        .into_iter()
        .filter(|it| match it {
            Item::File { path, .. } => !path.strip_prefix(input).is_ok_and(|p| p.starts_with(&rel)),
            Item::Npz { .. } => true,
        })
        .collect();
    if kept.len() < n {
        eprintln!(
            "note: left out {} file(s) under {} (this job's outputs)",
            n - kept.len(),
            out.display()
        );
    }
    Ok(kept)
}
