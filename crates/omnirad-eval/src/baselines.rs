//! Published reference numbers printed beside ours (facts from the papers; see
//! shared/reference/published-baselines.md for sources and caveats).

/// MedMNIST v2 (Yang et al. 2023, Table 3), test (AUC, ACC):
/// ResNet-18 (28), ResNet-18 (224), ResNet-50 (28), ResNet-50 (224).
pub const MEDMNIST_V2: &[(&str, [(f64, f64); 4])] = &[
    (
        "pathmnist",
        [
            (0.983, 0.907),
            (0.989, 0.909),
            (0.990, 0.911),
            (0.989, 0.892),
        ],
    ),
    (
        "chestmnist",
        [
            (0.768, 0.947),
            (0.773, 0.947),
            (0.769, 0.947),
            (0.773, 0.948),
        ],
    ),
    (
        "dermamnist",
        [
            (0.917, 0.735),
            (0.920, 0.754),
            (0.913, 0.735),
            (0.912, 0.731),
        ],
    ),
    (
        "octmnist",
        [
            (0.943, 0.743),
            (0.958, 0.763),
            (0.952, 0.762),
            (0.958, 0.776),
        ],
    ),
    (
        "pneumoniamnist",
        [
            (0.944, 0.854),
            (0.956, 0.864),
            (0.948, 0.854),
            (0.962, 0.884),
        ],
    ),
    (
        "retinamnist",
        [
            (0.717, 0.524),
            (0.710, 0.493),
            (0.726, 0.528),
            (0.716, 0.511),
        ],
    ),
    (
        "breastmnist",
        [
            (0.901, 0.863),
            (0.891, 0.833),
            (0.857, 0.812),
            (0.866, 0.842),
        ],
    ),
    (
        "bloodmnist",
        [
            (0.998, 0.958),
            (0.998, 0.963),
            (0.997, 0.956),
            (0.997, 0.950),
        ],
    ),
    (
        "tissuemnist",
        [
            (0.930, 0.676),
            (0.933, 0.681),
            (0.931, 0.680),
            (0.932, 0.680),
        ],
    ),
    (
        "organamnist",
        [
            (0.997, 0.935),
            (0.998, 0.951),
            (0.997, 0.935),
            (0.998, 0.947),
        ],
    ),
    (
        "organcmnist",
        [
            (0.992, 0.900),
            (0.994, 0.920),
            (0.992, 0.905),
            (0.993, 0.911),
        ],
    ),
    (
        "organsmnist",
        [
            (0.972, 0.782),
            (0.974, 0.778),
            (0.972, 0.770),
            (0.975, 0.785),
        ],
    ),
];

pub const MEDMNIST_V2_MODELS: [&str; 4] = [
    "ResNet-18 (28)",
    "ResNet-18 (224)",
    "ResNet-50 (28)",
    "ResNet-50 (224)",
];

/// MedMNIST+ (Doerrich et al. 2025): DINO ViT-B/16 linear probe test ACC (%) at 28/64/128/224.
pub const MEDMNIST_PLUS_DINO_LINEAR: &[(&str, [f64; 4])] = &[
    ("breastmnist", [83.33, 85.68, 88.89, 88.68]),
    ("pneumoniamnist", [86.59, 86.43, 90.33, 91.56]),
    ("organamnist", [89.74, 93.91, 94.97, 94.96]),
    ("organcmnist", [88.34, 92.21, 91.82, 92.46]),
    ("organsmnist", [74.25, 78.70, 80.79, 79.27]),
];

/// MedSegBench (Kuş & Aydin, Scientific Data 11:1283, 2024): test Dice of a U-Net trained from
/// scratch, mean of 3 seeds, with these encoders.
pub const MEDSEGBENCH_MODELS: [&str; 5] = [
    "U-Net ResNet-18",
    "U-Net ResNet-50",
    "U-Net EfficientNet-B0",
    "U-Net MobileNetV2",
    "U-Net DenseNet-121",
];

pub const MEDSEGBENCH_DICE: &[(&str, [f64; 5])] = &[
    ("busi", [0.674, 0.632, 0.711, 0.655, 0.695]),
    ("covidquex", [0.740, 0.734, 0.744, 0.742, 0.756]),
    ("fhpsaop", [0.961, 0.957, 0.959, 0.959, 0.960]),
    ("mosmedplus", [0.780, 0.790, 0.781, 0.785, 0.791]),
    ("pandental", [0.961, 0.961, 0.957, 0.950, 0.965]),
    ("promise12", [0.895, 0.888, 0.892, 0.896, 0.900]),
    ("ultrasoundnerve", [0.782, 0.776, 0.787, 0.772, 0.786]),
    ("usforkidney", [0.979, 0.978, 0.981, 0.980, 0.980]),
];
