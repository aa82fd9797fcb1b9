//! Per-iteration schedules, as DINOv2's `CosineScheduler`:
//! ```text
//! v(i) = start + (base − start)·i/(W − 1)                 i < W   (linear warm-up, both ends included)
//!        final + ½(base − final)(1 + cos(π·(i − W)/(T − W)))  W ≤ i < T
//!        final                                           i ≥ T
//! ```

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cosine {
    pub base: f64,
    pub final_value: f64,
    pub total: usize,
    pub warmup: usize,
    pub start_warmup: f64,
}

impl Cosine {
    pub fn new(base: f64, final_value: f64, total: usize) -> Self {
        Self {
            base,
            final_value,
            total,
            warmup: 0,
            start_warmup: 0.0,
        }
    }

    pub fn with_warmup(mut self, warmup: usize, start: f64) -> Self {
        self.warmup = warmup;
        self.start_warmup = start;
        self
    }

    pub fn at(&self, i: usize) -> f64 {
        if i >= self.total {
            return self.final_value;
        }
        if i < self.warmup {
            return if self.warmup == 1 {
                self.start_warmup
            } else {
                self.start_warmup
                    + (self.base - self.start_warmup) * i as f64 / (self.warmup - 1) as f64
            };
        }
        let i = i - self.warmup;
        let n = self.total.saturating_sub(self.warmup).max(1);
        self.final_value
            + 0.5
                * (self.base - self.final_value)
                * (1.0 + (std::f64::consts::PI * i as f64 / n as f64).cos())
    }
}
