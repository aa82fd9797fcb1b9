//! Batching: items are decoded and preprocessed in parallel (rayon) and batches are produced
//! one ahead on a background thread, so decoding overlaps with the model's work.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use rayon::prelude::*;

use crate::error::panic_message;
use crate::image::Meta;
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

/// Loads `items`, keeping every image an item yields (a multi-frame item gives several rows).
pub fn load_batch(items: &[Item], read: &ReadOptions, pre: &Preprocess) -> Batch {
    let results: Vec<_> = items
        .par_iter()
        .map(|it| {
            it.load(read)
                .map(|imgs| {
                    imgs.into_iter()
                        .map(|im| (pre.apply(&im), im.meta))
                        .collect::<Vec<_>>()
                })
                .map_err(|e| (it.id(), e.to_string()))
        })
        .collect();
    let (s, c) = (pre.size, pre.channels);
    let mut batch = Batch {
        data: Vec::new(),
        shape: [0, c, s, s],
        metas: Vec::new(),
        items: items.len(),
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

/// Iterates batches of `batch_items` items, prefetching up to `prefetch` batches.
pub fn batches(
    items: Arc<Vec<Item>>,
    batch_items: usize,
    read: ReadOptions,
    pre: Preprocess,
    prefetch: usize,
) -> Receiver<Batch> {
    let (tx, rx) = sync_channel(prefetch.max(1));
    std::thread::spawn(move || {
        for chunk in items.chunks(batch_items.max(1)) {
            // A panic here would end the stream early and look like a shorter dataset; report
            // the chunk's items as failed instead, so the job counts them like unreadable files.
            let batch = catch_unwind(AssertUnwindSafe(|| load_batch(chunk, &read, &pre)))
                .unwrap_or_else(|payload| {
                    let why = format!("internal error: {}", panic_message(payload.as_ref()));
                    let mut b = load_batch(&[], &read, &pre);
                    b.items = chunk.len();
                    b.failed = chunk.iter().map(|it| (it.id(), why.clone())).collect();
                    b
                });
            if tx.send(batch).is_err() {
                break;
            }
        }
    });
    rx
}
