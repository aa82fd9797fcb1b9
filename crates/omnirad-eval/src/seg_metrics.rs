//! Segmentation metrics: Dice and IoU per class, per image and over the whole dataset.
//!
//! For class c with TP, FP, FN counted over the valid pixels (inside the field of view, when the
//! dataset has one):
//! ```text
//! Dice_c = 2·TP / (2·TP + FP + FN)        IoU_c = TP / (TP + FP + FN)
//! ```
//! - A class absent from both prediction and target (TP + FP + FN = 0) scores 1 on that image:
//!   predicting nothing where there is nothing is right. An empty prediction on a non-empty
//!   target, or the reverse, scores 0.
//! - Per image: the image's score; `dice`/`iou` are the mean over images of the mean over the
//!   **foreground** classes 1..C (background excluded; it is in the per-class lists).
//! - Pooled (`dice_pooled`/`iou_pooled`): counts summed over all pixels of all images first, as
//!   DRIVE/CHASE vessel papers report.

use ndarray::{ArrayView2, Zip};
use serde::{Deserialize, Serialize};

/// Pixel counts of one class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub tp: u64,
    pub fp: u64,
    pub fn_: u64,
}

impl Counts {
    pub fn dice(&self) -> f64 {
        let d = 2 * self.tp + self.fp + self.fn_;
        if d == 0 {
            1.0
        } else {
            2.0 * self.tp as f64 / d as f64
        }
    }

    pub fn iou(&self) -> f64 {
        let d = self.tp + self.fp + self.fn_;
        if d == 0 {
            1.0
        } else {
            self.tp as f64 / d as f64
        }
    }

    fn add(&mut self, o: &Counts) {
        self.tp += o.tp;
        self.fp += o.fp;
        self.fn_ += o.fn_;
    }
}

/// Per-class counts of `pred` against `target` (class indices), over pixels where `valid` holds.
/// Panics if shapes differ (callers resize first). Labels ≥ `classes` count as wrong everywhere.
pub fn class_counts(
    pred: ArrayView2<u8>,
    target: ArrayView2<u8>,
    valid: Option<ArrayView2<bool>>,
    classes: usize,
) -> Vec<Counts> {
    assert_eq!(pred.dim(), target.dim(), "prediction and target shapes");
    let mut c = vec![Counts::default(); classes];
    let mut count = |p: u8, t: u8| {
        let (p, t) = (p as usize, t as usize);
        if p == t {
            if p < classes {
                c[p].tp += 1;
            }
        } else {
            if p < classes {
                c[p].fp += 1;
            }
            if t < classes {
                c[t].fn_ += 1;
            }
        }
    };
    match valid {
        Some(v) => {
            assert_eq!(v.dim(), pred.dim(), "valid-mask shape");
            Zip::from(pred).and(target).and(v).for_each(|&p, &t, &v| {
                if v {
                    count(p, t)
                }
            })
        }
        None => Zip::from(pred).and(target).for_each(|&p, &t| count(p, t)),
    }
    c
}

/// Everything `SegEvaluator::finish` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegScores {
    /// Mean over images of the mean foreground Dice.
    pub dice: f64,
    pub iou: f64,
    /// Dice/IoU of the pooled counts, mean over foreground classes.
    pub dice_pooled: f64,
    pub iou_pooled: f64,
    /// Per class (background first), mean over images.
    pub dice_per_class: Vec<f64>,
    pub iou_per_class: Vec<f64>,
    /// Mean foreground Dice of each image, in the order added.
    pub per_image_dice: Vec<f64>,
    pub images: usize,
}

/// Accumulates images one at a time (full-size masks need not be kept).
#[derive(Debug, Clone)]
pub struct SegEvaluator {
    classes: usize,
    pooled: Vec<Counts>,
    per_image: Vec<Vec<Counts>>,
}

impl SegEvaluator {
    /// `classes` includes background (a binary task has 2).
    pub fn new(classes: usize) -> Self {
        assert!(
            classes >= 2,
            "a segmentation task has background and ≥ 1 class"
        );
        Self {
            classes,
            pooled: vec![Counts::default(); classes],
            per_image: Vec::new(),
        }
    }

    pub fn add(
        &mut self,
        pred: ArrayView2<u8>,
        target: ArrayView2<u8>,
        valid: Option<ArrayView2<bool>>,
    ) {
        let c = class_counts(pred, target, valid, self.classes);
        for (p, x) in self.pooled.iter_mut().zip(&c) {
            p.add(x);
        }
        self.per_image.push(c);
    }

    pub fn finish(&self) -> SegScores {
        let n = self.per_image.len().max(1) as f64;
        let fg = |v: &[f64]| v[1..].iter().sum::<f64>() / (self.classes - 1) as f64;
        let per_class = |f: fn(&Counts) -> f64| -> Vec<f64> {
            (0..self.classes)
                .map(|k| self.per_image.iter().map(|c| f(&c[k])).sum::<f64>() / n)
                .collect()
        };
        let per_image_dice: Vec<f64> = self
            .per_image
            .iter()
            .map(|c| fg(&c.iter().map(Counts::dice).collect::<Vec<_>>()))
            .collect();
        let per_image_iou: Vec<f64> = self
            .per_image
            .iter()
            .map(|c| fg(&c.iter().map(Counts::iou).collect::<Vec<_>>()))
            .collect();
        SegScores {
            dice: per_image_dice.iter().sum::<f64>() / n,
            iou: per_image_iou.iter().sum::<f64>() / n,
            dice_pooled: fg(&self.pooled.iter().map(Counts::dice).collect::<Vec<_>>()),
            iou_pooled: fg(&self.pooled.iter().map(Counts::iou).collect::<Vec<_>>()),
            dice_per_class: per_class(Counts::dice),
            iou_per_class: per_class(Counts::iou),
            per_image_dice,
            images: self.per_image.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn hand_computed_binary() {
        // target has 3 foreground pixels; prediction hits 2, adds 1 false positive.
        let t = array![[0u8, 1, 1], [0, 1, 0]];
        let p = array![[1u8, 1, 1], [0, 0, 0]];
        let c = class_counts(p.view(), t.view(), None, 2);
        assert_eq!(
            c[1],
            Counts {
                tp: 2,
                fp: 1,
                fn_: 1
            }
        );
        assert_eq!(
            c[0],
            Counts {
                tp: 2,
                fp: 1,
                fn_: 1
            }
        );
        assert!((c[1].dice() - 4.0 / 6.0).abs() < 1e-12);
        assert!((c[1].iou() - 2.0 / 4.0).abs() < 1e-12);
    }

    #[test]
    fn empty_cases() {
        let empty = array![[0u8, 0], [0, 0]];
        let one = array![[0u8, 1], [0, 0]];
        // empty prediction, non-empty target
        assert_eq!(
            class_counts(empty.view(), one.view(), None, 2)[1].dice(),
            0.0
        );
        // non-empty prediction, empty target
        assert_eq!(
            class_counts(one.view(), empty.view(), None, 2)[1].iou(),
            0.0
        );
        // both empty: right
        assert_eq!(
            class_counts(empty.view(), empty.view(), None, 2)[1].dice(),
            1.0
        );
    }

    #[test]
    fn valid_mask_excludes_pixels() {
        let t = array![[1u8, 0], [0, 0]];
        let p = array![[1u8, 1], [1, 0]];
        let v = array![[true, true], [false, false]];
        let c = class_counts(p.view(), t.view(), Some(v.view()), 2);
        assert_eq!(
            c[1],
            Counts {
                tp: 1,
                fp: 1,
                fn_: 0
            }
        );
    }

    #[test]
    fn per_image_vs_pooled_and_multiclass() {
        let mut e = SegEvaluator::new(3);
        // image 1: class 1 perfect (2 px), class 2 absent in both → 1.
        e.add(
            array![[1u8, 1], [0, 0]].view(),
            array![[1u8, 1], [0, 0]].view(),
            None,
        );
        // image 2: class 1 missed (1 px), class 2: tp 1, fp 1.
        e.add(
            array![[0u8, 2], [2, 0]].view(),
            array![[1u8, 2], [0, 0]].view(),
            None,
        );
        let s = e.finish();
        // per image foreground means: (1 + 1)/2 = 1; (0 + 2/3)/2 = 1/3 → 2/3.
        assert!((s.dice - 2.0 / 3.0).abs() < 1e-12, "{}", s.dice);
        // pooled: class 1 tp 2 fn 1 → 4/5; class 2 tp 1 fp 1 → 2/3.
        assert!((s.dice_pooled - (0.8 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert_eq!(s.per_image_dice.len(), 2);
        assert!((s.dice_per_class[2] - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        // IoU image 2 class 2: 1/2.
        assert!((s.iou_per_class[2] - 0.75).abs() < 1e-12);
    }
}
