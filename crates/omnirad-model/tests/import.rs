//! Parity with the reference implementations on committed fixtures
//! (tests/fixtures/make_fixtures.py: HF transformers 5.17, timm 1.0.29, torch 2.11, fp32).

use std::path::PathBuf;

use burn::tensor::{Tensor, TensorData};
use omnirad_model::{import_checkpoint, load_imported, Cpu, Ffn, PosInterp};
use safetensors::SafeTensors;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tensor(st: &SafeTensors, k: &str) -> (Vec<usize>, Vec<f32>) {
    let v = st.tensor(k).unwrap_or_else(|_| panic!("fixture lacks {k}"));
    (
        v.shape().to_vec(),
        v.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    )
}

/// Max abs difference relative to the reference's max magnitude.
fn rel_err(ours: Vec<f32>, reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    ours.iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
        / scale
}

/// Class token, patch tokens and block-0 output at both sizes within 1e-4 relative error.
fn check(name: &str, heads: Option<usize>, want: PosInterp) {
    let imp = import_checkpoint(&fixture(name), None, heads).unwrap();
    assert_eq!(imp.config.vit.pos_interp, want);
    let dev = Default::default();
    let model = load_imported::<Cpu>(&imp, false, &dev).unwrap();
    let io_name = format!("{}_io.safetensors", name.trim_end_matches(".pth"));
    let bytes = std::fs::read(fixture(&io_name)).unwrap();
    let io = SafeTensors::deserialize(&bytes).unwrap();
    for tag in ["native", "interp"] {
        let (shape, x) = tensor(&io, &format!("x_{tag}"));
        let x = Tensor::<Cpu, 4>::from_data(
            TensorData::new(x, [shape[0], shape[1], shape[2], shape[3]]),
            &dev,
        );
        let out = model.forward_features(x, None, &[0], false);
        let vec = |t: Tensor<Cpu, 3>| t.into_data().to_vec::<f32>().unwrap();
        let cls = out.cls.into_data().to_vec::<f32>().unwrap();
        for (key, ours) in [
            ("cls", cls),
            ("patches", vec(out.patches)),
            ("block0", vec(out.intermediates[0].clone())),
        ] {
            let (_, reference) = tensor(&io, &format!("{tag}_{key}"));
            let e = rel_err(ours, &reference);
            assert!(e < 1e-4, "{name} {tag} {key}: relative error {e}");
        }
    }
}

#[test]
fn hf_dinov2_matches_transformers() {
    check("hf_dinov2", None, PosInterp::Bicubic);
}

#[test]
fn hf_dinov2_with_registers_matches_transformers() {
    let imp = import_checkpoint(&fixture("hf_dinov2_reg"), None, None).unwrap();
    assert!(!imp.heads_assumed, "config.json gives the heads");
    assert_eq!(
        (
            imp.config.vit.num_registers,
            imp.config.vit.num_heads,
            imp.config.vit.patch_size
        ),
        (4, 2, 4)
    );
    check("hf_dinov2_reg", None, PosInterp::BicubicAntialias);
}

#[test]
fn timm_patch16_matches_timm() {
    check("timm_p16", Some(2), PosInterp::BicubicAntialias);
}

#[test]
fn timm_patch14_matches_timm() {
    check("timm_p14", Some(2), PosInterp::BicubicAntialias);
}

#[test]
fn hf_dinov2_swiglu_matches_transformers() {
    let imp = import_checkpoint(&fixture("hf_dinov2_swiglu"), None, None).unwrap();
    // HF's Dinov2SwiGLUFFN: hidden 4·32 → (⌊128·2/3⌋ + 7) / 8 · 8 = 88 gated features.
    assert_eq!(imp.config.vit.ffn, Ffn::SwiGlu);
    assert_eq!(imp.config.vit.mlp_ratio * 32.0, 88.0);
    check("hf_dinov2_swiglu", None, PosInterp::Bicubic);
}

#[test]
fn timm_giant_layout_with_registers_and_no_class_position_matches_timm() {
    let imp = import_checkpoint(&fixture("timm_p14_reg_swiglu"), None, Some(2)).unwrap();
    let v = &imp.config.vit;
    assert_eq!((v.ffn, v.num_registers, v.img_size), (Ffn::SwiGlu, 4, 56));
    check("timm_p14_reg_swiglu", Some(2), PosInterp::BicubicAntialias);
}

#[test]
fn timm_position_table_over_prefix_tokens_matches_timm() {
    let imp = import_checkpoint(&fixture("timm_p16_reg_prefixpos"), None, Some(2)).unwrap();
    assert_eq!(
        (imp.config.vit.num_registers, imp.config.vit.img_size),
        (2, 48)
    );
    check(
        "timm_p16_reg_prefixpos",
        Some(2),
        PosInterp::BicubicAntialias,
    );
}

#[test]
fn original_dinov2_code_matches_including_its_interpolation_offset() {
    let imp = import_checkpoint(&fixture("dinov2_reg_swiglu.pth"), None, Some(2)).unwrap();
    let v = &imp.config.vit;
    assert_eq!((v.ffn, v.num_registers, v.depth), (Ffn::SwiGlu, 4, 2));
    check(
        "dinov2_reg_swiglu.pth",
        Some(2),
        PosInterp::BicubicDinov2Offset,
    );
}

#[test]
fn mismatched_checkpoints_are_clear_errors() {
    let imp = import_checkpoint(&fixture("timm_p16"), None, Some(2)).unwrap();
    let mut cfg = imp.config.clone();
    cfg.vit.depth = 3;
    let bad = omnirad_model::Imported {
        config: cfg,
        weights: imp.weights.clone(),
        source: imp.source.clone(),
        heads_assumed: false,
    };
    let e = load_imported::<Cpu>(&bad, false, &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("missing tensor 'blocks.2.attn.qkv.weight'") && e.contains("model.safetensors"),
        "{e}"
    );
    // --allow-partial keeps the new block's initial values.
    assert!(load_imported::<Cpu>(&bad, true, &Default::default()).is_ok());
    let e = import_checkpoint(&fixture("nowhere"), None, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("nowhere"), "{e}");
}

#[test]
fn pytorch_pickles_give_the_same_weights_as_safetensors() {
    // HF pytorch_model.bin holds exactly hf_dinov2's tensors.
    let bin = import_checkpoint(&fixture("hf_dinov2_bin"), None, None).unwrap();
    let st = import_checkpoint(&fixture("hf_dinov2"), None, None).unwrap();
    assert_eq!(bin.config, st.config);
    assert!(
        bin.weights == st.weights,
        "pytorch_model.bin and model.safetensors imported differently"
    );

    // A DINOv2 training checkpoint: the teacher's backbone (not the student, not the DINO head).
    let pth = import_checkpoint(&fixture("dinov2_train_p16.pth"), None, Some(2)).unwrap();
    let timm = import_checkpoint(&fixture("timm_p16"), None, Some(2)).unwrap();
    assert_eq!(pth.config.vit.pos_interp, PosInterp::BicubicDinov2Offset);
    assert_eq!(
        pth.config.vit,
        omnirad_model::VitConfig {
            pos_interp: PosInterp::BicubicDinov2Offset,
            ..timm.config.vit.clone()
        }
    );
    assert!(
        pth.weights == timm.weights,
        "teacher backbone differs from the timm weights it was made from"
    );
    load_imported::<Cpu>(&pth, false, &Default::default()).unwrap();
}

#[test]
fn corrupt_or_non_finite_checkpoints_are_clear_errors() {
    let dir_guard = tempfile::tempdir().unwrap();
    let dir = dir_guard.path();
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint at all").unwrap();
    let e = import_checkpoint(&junk, None, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("junk.safetensors") && e.contains("not a safetensors file"),
        "{e}"
    );

    let nan = dir.join("nan.safetensors");
    let bytes: Vec<u8> = [1.0f32, f32::NAN]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &bytes).unwrap();
    std::fs::write(
        &nan,
        safetensors::serialize([("cls_token", view)], None).unwrap(),
    )
    .unwrap();
    let e = import_checkpoint(&nan, None, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("nan.safetensors") && e.contains("'cls_token' contains NaN/Inf"),
        "{e}"
    );

    let pth = dir.join("broken.pth");
    std::fs::write(&pth, b"PK\x03\x04 truncated zip").unwrap();
    let e = import_checkpoint(&pth, None, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("broken.pth") && e.contains("not a readable PyTorch checkpoint"),
        "{e}"
    );
}

#[test]
fn position_tables_that_fit_no_grid_are_clear_errors() {
    // timm_p16's tensors with 7 positions: neither g², 1 + g² nor (no registers) 1 + R + g².
    let bytes = std::fs::read(fixture("timm_p16/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let pos: Vec<u8> = vec![0u8; 7 * 32 * 4];
    let tensors: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            if k == "pos_embed" {
                let bad = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![1, 7, 32],
                    &pos,
                )
                .unwrap();
                (k, bad)
            } else {
                (k, v)
            }
        })
        .collect();
    let dir_guard = tempfile::tempdir().unwrap();
    let dir = dir_guard.path();
    let f = dir.join("badpos.safetensors");
    std::fs::write(&f, safetensors::serialize(tensors, None).unwrap()).unwrap();
    let e = import_checkpoint(&f, None, Some(2))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("badpos.safetensors") && e.contains("pos_embed has 7 positions"),
        "{e}"
    );
}
