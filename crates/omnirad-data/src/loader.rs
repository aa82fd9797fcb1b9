//! Batching: items are decoded and preprocessed in parallel (rayon) and batches are produced
//! one ahead on a background thread, so decoding overlaps with the model's work. Memory stays
//! bounded by the batch also for items that hold many images (volumes, cine loops).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use ndarray::Array3;
use rayon::prelude::*;

use crate::error::panic_message;
use crate::image::{Image, Meta};
use crate::preprocess::Preprocess;
use crate::source::{Item, ReadOptions};

/// A batch ready for the model: `data` is [N, C, S, S] row-major.
#[derive(Debug, Clone)]
pub struct Batch {
    pub data: Vec<f32>,
    pub shape: [usize; 4],
    pub metas: Vec<Meta>,
    /// How many items this batch was made from.
    pub items: usize,
    /// Items that failed to load: (id, error message).
    pub failed: Vec<(String, String)>,
}

type Loaded = Result<Vec<(Array3<f32>, Meta)>, (String, String)>;

fn preprocessed(item: &Item, read: &ReadOptions, pre: &Preprocess) -> Loaded {
    caught(|| {
        let imgs = item.load(read).map_err(|e| e.to_string())?;
        Ok(imgs
            .into_iter()
            .map(|im| (pre.apply(&im), im.meta))
            .collect())
    })
    .map_err(|e| (item.id(), e))
}

/// `f`'s result, with a panic reported as an error: one would otherwise end the job, or a
/// loader thread's stream early (which looks like a shorter dataset).
fn caught<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        Err(format!(
            "internal error: {}",
            panic_message(payload.as_ref())
        ))
    })
}

fn batch_of(results: Vec<Loaded>, pre: &Preprocess) -> Batch {
    let (s, c) = (pre.size, pre.channels);
    let mut batch = Batch {
        data: Vec::new(),
        shape: [0, c, s, s],
        metas: Vec::new(),
        items: results.len(),
        failed: Vec::new(),
    };
    for r in results {
        match r {
            Ok(imgs) => {
                for (a, meta) in imgs {
                    batch.data.extend(a.iter());
                    batch.metas.push(meta);
                }
            }
            Err(f) => batch.failed.push(f),
        }
    }
    batch.shape[0] = batch.metas.len();
    batch
}

/// Loads `items`, keeping every image an item yields (a multi-frame item gives several rows).
pub fn load_batch(items: &[Item], read: &ReadOptions, pre: &Preprocess) -> Batch {
    let results = items
        .par_iter()
        .map(|it| preprocessed(it, read, pre))
        .collect();
    batch_of(results, pre)
}

/// Loads `items` in order through `load`, decoding one item per thread at a time, and yields
/// them in chunks that end once they hold `max` items or `max` images (`images` counts an
/// item's). A folder of CT volumes gives hundreds of slices per item: a chunk of 32 of them
/// would hold 32 decoded volumes.
pub fn grouped<'a, T: Send + 'a>(
    items: &'a [Item],
    max: usize,
    load: impl Fn(&Item) -> T + Sync + 'a,
    images: impl Fn(&T) -> usize + 'a,
) -> impl Iterator<Item = Vec<T>> + 'a {
    let max = max.max(1);
    let group = rayon::current_num_threads().clamp(1, max);
    let mut rest = items;
    std::iter::from_fn(move || {
        let mut chunk: Vec<T> = Vec::new();
        let mut held = 0;
        while !rest.is_empty() && chunk.len() < max && held < max {
            let (now, tail) = rest.split_at(group.min(max - chunk.len()).min(rest.len()));
            rest = tail;
            let loaded: Vec<T> = now.par_iter().map(&load).collect();
            held += loaded.iter().map(&images).sum::<usize>();
            chunk.extend(loaded);
        }
        (!chunk.is_empty()).then_some(chunk)
    })
}

/// Each item's id and images (or error message, a panic included), in chunks as [`grouped`]
/// makes them.
pub fn image_chunks<'a>(
    items: &'a [Item],
    max: usize,
    read: &'a ReadOptions,
) -> impl Iterator<Item = Vec<(String, Result<Vec<Image>, String>)>> + 'a {
    let load = |it: &Item| (it.id(), caught(|| it.load(read).map_err(|e| e.to_string())));
    grouped(items, max, load, |(_, r)| r.as_ref().map_or(0, Vec::len))
}

/// Iterates batches of up to `batch_items` items (fewer when they hold `batch_items` images
/// already), prefetching up to `prefetch` batches.
pub fn batches(
    items: Arc<Vec<Item>>,
    batch_items: usize,
    read: ReadOptions,
    pre: Preprocess,
    prefetch: usize,
) -> Receiver<Batch> {
    let (tx, rx) = sync_channel(prefetch.max(1));
    std::thread::spawn(move || {
        let load = |it: &Item| preprocessed(it, &read, &pre);
        let count = |r: &Loaded| r.as_ref().map_or(0, |v| v.len());
        for chunk in grouped(&items, batch_items, load, count) {
            if tx.send(batch_of(chunk, &pre)).is_err() {
                break;
            }
        }
    });
    rx
}
