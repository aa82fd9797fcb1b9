//! `omnirad`: read medical images, run radiology foundation models, write what they produce.

mod bench;
mod demo;
mod device;
mod embed;
mod info;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use omnirad_data::dicom::Window;
use omnirad_data::nifti::SliceAxis;
use omnirad_data::{ReadOptions, Split};

#[derive(Parser)]
#[command(
    name = "omnirad",
    version,
    about = "Radiology foundation models in one binary: DICOM-native, CPU and CUDA."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// What a file holds: format, modality, size, frames, transfer syntax, pixel statistics.
    Info {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Dataset file checks.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
    /// Embeddings (class token and/or mean patch token) for a file, folder, manifest or npz split.
    Embed(embed::EmbedArgs),
    /// The main job end to end on an embedded default (synthetic phantoms, or --data files).
    Demo(demo::DemoArgs),
    /// Throughput measurements (see BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        cmd: bench::BenchCmd,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Check a MedMNIST npz against the official md5 and split sizes.
    Verify {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// Reader options shared by commands that read images.
#[derive(Args, Clone, Debug)]
pub struct ReadArgs {
    /// npz split to read.
    #[arg(long, default_value = "test", value_parser = Split::parse)]
    pub split: Split,
    /// DICOM/CT window: file, lung, mediastinum, bone, brain, abdomen, liver, CENTER,WIDTH or pct:LO,HI.
    #[arg(long, default_value = "file", value_parser = Window::parse)]
    pub window: Window,
    /// NIfTI slicing axis: axial, coronal or sagittal.
    #[arg(long, default_value = "axial", value_parser = SliceAxis::parse)]
    pub axis: SliceAxis,
    /// For 4D NIfTI: the one time point to read (default: all).
    #[arg(long)]
    pub time: Option<usize>,
}

impl ReadArgs {
    pub fn options(&self) -> ReadOptions {
        ReadOptions {
            window: self.window.clone(),
            slice_axis: self.axis,
            time: self.time,
            split: self.split,
            ..Default::default()
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Info { file, json } => info::run(&file, json),
        Cmd::Data {
            cmd: DataCmd::Verify { file, json },
        } => info::verify(&file, json),
        Cmd::Embed(a) => embed::run(&a),
        Cmd::Demo(a) => demo::run(&a),
        Cmd::Bench { cmd } => bench::run(cmd),
    }
}
