//! `omnirad viz`: how an encoder (or two, side by side) organises a set of images: 2-D
//! projections as PNG and SVG scatter plots, and cluster-quality measures against the labels,
//! the modality and the source dataset as JSON and markdown.
//!
//! OUT/{pca,tsne,umap}.{png,svg}   one panel per model, coloured by --color-by
//! OUT/metrics.json, OUT/metrics.md

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use ndarray::{Array2, Axis};
use omnirad_eval::cluster::{cluster_quality, encode, ClusterQuality};
use omnirad_eval::projection::{project, Projection};
use plotters::prelude::*;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use crate::retrieve::{embed_inputs, EncodeArgs};
use crate::ReadArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ColorBy {
    Label,
    Modality,
    Dataset,
}

#[derive(Args, Debug)]
pub struct VizArgs {
    /// One model, or two separated by a comma (e.g. vit_pico,runs/pico/teacher).
    #[arg(long, value_delimiter = ',', required = true)]
    pub model: Vec<String>,
    /// Files, folders, manifests or npz files (repeatable; each one is a "dataset"); PATH=MODALITY
    /// sets the modality of images that do not record one (e.g. drive/images=fundus).
    #[arg(long, required = true)]
    pub input: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "modality")]
    pub color_by: ColorBy,
    #[arg(long, value_delimiter = ',', default_value = "pca,tsne,umap", value_parser = Projection::parse)]
    pub projections: Vec<Projection>,
    /// At most this many images per input (a seeded sample), to keep t-SNE/UMAP quick.
    #[arg(long, default_value_t = 1000, value_parser = crate::at_least_one)]
    pub max_per_input: usize,
    /// Neighbours for k-NN purity.
    #[arg(long, default_value_t = 10, value_parser = crate::at_least_one)]
    pub k: usize,
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub enc: EncodeArgs,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// One image's groups under each colouring.
#[derive(Clone)]
struct Groups {
    label: Option<String>,
    modality: String,
    dataset: String,
}

/// The input's file or folder name, with its parent when two inputs share a name
/// (drive/training/images and drive/testing/images → training/images, testing/images).
fn dataset_name(p: &Path, all: &[PathBuf]) -> String {
    let base = |p: &Path| {
        let (p, _) = crate::retrieve::input_spec(p);
        let name = |q: &Path| {
            q.file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("input")
                .to_string()
        };
        let parent = p.parent().map(name).unwrap_or_default();
        (name(&p), format!("{parent}/{}", name(&p)))
    };
    let (short, long) = base(p);
    if all.iter().filter(|q| base(q).0 == short).count() > 1 {
        long
    } else {
        short
    }
}

#[derive(Serialize)]
struct Row {
    model: String,
    grouping: ColorBy,
    #[serde(flatten)]
    q: ClusterQuality,
}

pub fn run(a: &VizArgs) -> Result<()> {
    if a.model.len() > 2 {
        bail!(
            "--model takes one model or two to compare, not {}",
            a.model.len()
        );
    }
    let font = load_font()?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut panels = Vec::new();
    let mut rows = Vec::new();
    for model in &a.model {
        let parts = embed_inputs(&a.enc, model, &a.input, &a.read, a.read.split)?;
        let mut values = Vec::new();
        let mut groups = Vec::new();
        for (input, e) in a.input.iter().zip(&parts) {
            let mut idx: Vec<usize> = (0..e.metas.len()).collect();
            if idx.len() > a.max_per_input {
                idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(a.enc.seed));
                idx.truncate(a.max_per_input);
                idx.sort();
            }
            let ds = dataset_name(input, &a.input);
            for i in idx {
                let m = &e.metas[i];
                values.push(e.values.row(i).to_owned());
                groups.push(Groups {
                    label: (!m.labels.is_empty()).then(|| {
                        let l: Vec<String> = m.labels.iter().map(|v| v.to_string()).collect();
                        // Labels of different datasets are different classes.
                        if a.input.len() > 1 {
                            format!("{ds}:{}", l.join(";"))
                        } else {
                            l.join(";")
                        }
                    }),
                    modality: m.modality.name().to_string(),
                    dataset: ds.clone(),
                });
            }
        }
        if values.len() < 3 {
            bail!(
                "{} readable image(s): need at least 3 to project",
                values.len()
            );
        }
        let d = values[0].len();
        let x = Array2::from_shape_vec((values.len(), d), values.into_iter().flatten().collect())
            .expect("n × d");
        let views = [
            (
                ColorBy::Label,
                groups
                    .iter()
                    .map(|g| g.label.clone())
                    .collect::<Option<Vec<_>>>(),
            ),
            (
                ColorBy::Modality,
                Some(groups.iter().map(|g| g.modality.clone()).collect()),
            ),
            (
                ColorBy::Dataset,
                Some(groups.iter().map(|g| g.dataset.clone()).collect()),
            ),
        ];
        for (grouping, names) in &views {
            let Some(names) = names else { continue };
            let (ids, n) = encode(names);
            if n < 2 {
                continue;
            }
            rows.push(Row {
                model: model.clone(),
                grouping: *grouping,
                q: cluster_quality(x.view(), &ids, a.k, a.enc.seed),
            });
        }
        let colour: Vec<String> = match a.color_by {
            ColorBy::Label => groups
                .iter()
                .map(|g| g.label.clone())
                .collect::<Option<Vec<_>>>()
                .context("--color-by label: some images have no label (use a manifest or npz)")?,
            ColorBy::Modality => groups.iter().map(|g| g.modality.clone()).collect(),
            ColorBy::Dataset => groups.iter().map(|g| g.dataset.clone()).collect(),
        };
        let coords: Vec<(Projection, Array2<f64>)> = a
            .projections
            .iter()
            .map(|&p| {
                eprintln!("{model}: {} of {} images", p.name(), x.nrows());
                (p, project(x.view(), p))
            })
            .collect();
        panels.push((model.clone(), colour, coords));
    }
    for (k, &p) in a.projections.iter().enumerate() {
        let title = |m: &str| {
            format!(
                "{} of {m} ({} pooling), by {}",
                p.name(),
                pool_name(&a.enc),
                group_name(a.color_by)
            )
        };
        let data: Vec<(String, &Vec<String>, &Array2<f64>)> = panels
            .iter()
            .map(|(m, c, xy)| (title(m), c, &xy[k].1))
            .collect();
        let stem = a.out.join(format!("{:?}", p).to_lowercase());
        scatter(&data, p.name(), &stem.with_extension("png"), font, false)?;
        scatter(&data, p.name(), &stem.with_extension("svg"), font, true)?;
    }
    let mut md = format!(
        "Embedding quality ({} pooling; {} images per input at most; k = {}). Silhouette (cosine) and NMI/ARI of k-means: higher is better; Davies–Bouldin: lower is better.\n\n| model | grouping | groups | silhouette | Davies–Bouldin | k-NN purity | NMI | ARI |\n|---|---|---|---|---|---|---|---|\n",
        pool_name(&a.enc),
        a.max_per_input,
        a.k
    );
    for r in &rows {
        md += &format!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            r.model,
            group_name(r.grouping),
            r.q.groups,
            r.q.silhouette,
            r.q.davies_bouldin,
            r.q.knn_purity,
            r.q.nmi,
            r.q.ari
        );
    }
    print!("{md}");
    crate::atomic::write(&a.out.join("metrics.md"), &md)?;
    crate::atomic::write(
        &a.out.join("metrics.json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    eprintln!("plots and metrics written to {}", a.out.display());
    Ok(())
}

fn group_name(g: ColorBy) -> &'static str {
    match g {
        ColorBy::Label => "label",
        ColorBy::Modality => "modality",
        ColorBy::Dataset => "dataset",
    }
}

fn pool_name(e: &EncodeArgs) -> String {
    format!("{:?}", e.pool).to_lowercase()
}

/// plotters draws text with ab_glyph and needs a TrueType font; none is shipped (third-party
/// data), so a system one is used: OMNIRAD_FONT, or a common path per OS.
fn load_font() -> Result<&'static str> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("OMNIRAD_FONT")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.extend(
        [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
            "/System/Library/Fonts/Supplemental/Arial.ttf",
            "/Library/Fonts/Arial.ttf",
            "C:\\Windows\\Fonts\\arial.ttf",
        ]
        .map(PathBuf::from),
    );
    for c in &candidates {
        if let Ok(bytes) = std::fs::read(c) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return Ok("sans-serif");
            }
        }
    }
    bail!(
        "no TrueType font found for plot text (tried {}); set OMNIRAD_FONT=/path/to/font.ttf or install fonts-dejavu",
        candidates.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// Tableau-10, readable on white and distinguishable in print.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn scatter(
    panels: &[(String, &Vec<String>, &Array2<f64>)],
    axis: &str,
    path: &Path,
    font: &str,
    svg: bool,
) -> Result<()> {
    let (w, h) = (720 * panels.len() as u32, 640);
    crate::atomic::write_with(path, |tmp| {
        if svg {
            return draw_panels(
                SVGBackend::new(tmp, (w, h)).into_drawing_area(),
                panels,
                axis,
                font,
            );
        }
        let mut buf = vec![0u8; (w * h * 3) as usize];
        draw_panels(
            BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area(),
            panels,
            axis,
            font,
        )?;
        let img = image::RgbImage::from_raw(w, h, buf).expect("w × h × 3 buffer");
        img.save_with_format(tmp, image::ImageFormat::Png)
            .with_context(|| format!("writing {}", tmp.display()))
    })
}

fn draw_panels<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    panels: &[(String, &Vec<String>, &Array2<f64>)],
    axis: &str,
    font: &str,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing the plot: {e}");
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((1, panels.len()));
    for (area, (title, colour, xy)) in areas.iter().zip(panels) {
        let (xs, ys) = (xy.column(0), xy.column(1));
        let range = |v: ndarray::ArrayView1<f64>| {
            let (lo, hi) = v
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                    (a.min(x), b.max(x))
                });
            let pad = ((hi - lo) * 0.05).max(1e-9);
            (lo - pad)..(hi + pad)
        };
        let mut chart = ChartBuilder::on(area)
            .caption(title, (font, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(range(xs), range(ys))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(format!("{axis} 1"))
            .y_desc(format!("{axis} 2"))
            .label_style((font, 14))
            .axis_desc_style((font, 16))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        for c in colour.iter() {
            let n = names.len();
            names.entry(c.as_str()).or_insert(n);
        }
        let order: Vec<&str> = names.keys().copied().collect();
        for (gi, name) in order.iter().enumerate() {
            let col = PALETTE[gi % PALETTE.len()];
            let pts = xy
                .axis_iter(Axis(0))
                .zip(colour.iter())
                .filter(|(_, c)| c.as_str() == *name)
                .map(|(p, _)| Circle::new((p[0], p[1]), 3, col.mix(0.7).filled()));
            chart
                .draw_series(pts)
                .map_err(err)?
                .label(format!(
                    "{name} ({})",
                    colour.iter().filter(|c| c.as_str() == *name).count()
                ))
                .legend(move |(x, y)| Circle::new((x + 6, y), 5, col.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font((font, 14))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
