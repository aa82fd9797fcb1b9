//! Block-wise masking for iBOT (BEiT's generator as DINOv2 uses it in `collate_data_and_cast`).
//!
//! Of n images, ⌊n·p⌋ get masks; their target ratios come from consecutive bins of
//! linspace(r_min, r_max, ⌊n·p⌋ + 1), so a batch covers the whole ratio range. Each mask is a union
//! of rectangles (area ≥ `min_patches`, aspect log-uniform in [0.3, 1/0.3]) that never overshoots
//! its target. The list is shuffled so masked images are spread over the crops.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

#[derive(Debug, Clone)]
pub struct BlockMasking {
    pub height: usize,
    pub width: usize,
    pub min_patches: usize,
    /// At most this many patches per rectangle (DINOv2: half the grid).
    pub max_patches: usize,
    pub log_aspect: (f64, f64),
}

impl BlockMasking {
    pub fn new(height: usize, width: usize) -> Self {
        Self {
            height,
            width,
            min_patches: 4,
            max_patches: height * width / 2,
            log_aspect: (0.3f64.ln(), (1.0f64 / 0.3).ln()),
        }
    }

    /// Adds one rectangle of at most `max_new` new cells; returns how many were added.
    fn add_block(&self, mask: &mut [bool], max_new: usize, rng: &mut StdRng) -> usize {
        for _ in 0..10 {
            let (lo, hi) = (self.min_patches as f64, max_new as f64);
            let area = if lo == hi {
                lo
            } else {
                rng.random_range(lo.min(hi)..lo.max(hi))
            };
            let aspect = rng.random_range(self.log_aspect.0..self.log_aspect.1).exp();
            let h = (area * aspect).sqrt().round() as usize;
            let w = (area / aspect).sqrt().round() as usize;
            if w >= self.width || h >= self.height {
                continue;
            }
            let top = rng.random_range(0..=self.height - h);
            let left = rng.random_range(0..=self.width - w);
            let cells =
                || (top..top + h).flat_map(|i| (left..left + w).map(move |j| i * self.width + j));
            let new = cells().filter(|&c| !mask[c]).count();
            if new > 0 && new <= max_new {
                cells().for_each(|c| mask[c] = true);
                return new;
            }
        }
        0
    }

    /// A mask (row-major, true = masked) with up to `target` masked cells.
    pub fn generate(&self, target: usize, rng: &mut StdRng) -> Vec<bool> {
        let mut mask = vec![false; self.height * self.width];
        let mut count = 0;
        while count < target {
            let max_new = (target - count).min(self.max_patches);
            match self.add_block(&mut mask, max_new, rng) {
                0 => break,
                d => count += d,
            }
        }
        mask
    }

    /// Masks for `n` images: ⌊n·probability⌋ with ratios stratified over `ratio`, the rest empty,
    /// in shuffled order.
    pub fn batch(
        &self,
        n: usize,
        probability: f64,
        ratio: (f64, f64),
        rng: &mut StdRng,
    ) -> Vec<Vec<bool>> {
        let cells = self.height * self.width;
        let n_masked = (n as f64 * probability) as usize;
        let step = (ratio.1 - ratio.0) / n_masked.max(1) as f64;
        let mut masks: Vec<Vec<bool>> = (0..n)
            .map(|i| {
                if i < n_masked {
                    let (lo, hi) = (ratio.0 + step * i as f64, ratio.0 + step * (i + 1) as f64);
                    let r = if hi > lo {
                        rng.random_range(lo..hi)
                    } else {
                        lo
                    };
                    self.generate((cells as f64 * r) as usize, rng)
                } else {
                    vec![false; cells]
                }
            })
            .collect();
        masks.shuffle(rng);
        masks
    }
}
