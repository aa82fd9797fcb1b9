//! DINO head: the weight-normalised prototype layer by hand, and the DINOv2-layout file
//! written after pretraining read back to the same function.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};
use omnirad_model::dino_head::WeightNormLinear;
use omnirad_model::{import_dino_head, save_dino_head, Cpu, DinoHeadConfig};

type B = Cpu;

fn t2(v: Vec<f32>, shape: [usize; 2]) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(v, shape), &Default::default())
}

#[test]
fn weight_norm_linear_by_hand() {
    // Rows v = [3, 4] (‖v‖ = 5, g = 2) and [0, -2] (‖v‖ = 2, g = 1): weights [1.2, 1.6], [0, -1].
    let l = WeightNormLinear::<B> {
        weight_g: Param::from_tensor(t2(vec![2.0, 1.0], [2, 1])),
        weight_v: Param::from_tensor(t2(vec![3.0, 4.0, 0.0, -2.0], [2, 2])),
    };
    let y: Vec<f32> = l
        .forward(t2(vec![1.0, 2.0], [1, 2]))
        .into_data()
        .to_vec()
        .unwrap();
    assert!(
        (y[0] - (1.2 + 3.2)).abs() < 1e-6 && (y[1] + 2.0).abs() < 1e-6,
        "{y:?}"
    );
}

#[test]
fn head_logits_are_cosines_scaled_by_g() {
    // With g = 1 every logit is the cosine between the bottleneck output and a prototype.
    B::seed(&Default::default(), 0);
    let cfg = DinoHeadConfig {
        in_dim: 16,
        out_dim: 32,
        hidden_dim: 24,
        bottleneck_dim: 8,
        nlayers: 3,
    };
    let head = cfg.init::<B>(&Default::default());
    let x = Tensor::<B, 2>::random([5, 16], Distribution::Default, &Default::default());
    let y: Vec<f32> = head.forward(x).into_data().to_vec().unwrap();
    assert_eq!(y.len(), 5 * 32);
    assert!(y.iter().all(|v| v.abs() <= 1.0 + 1e-5));
}

#[test]
fn saved_head_reads_back_identically_in_dinov2_layout() {
    B::seed(&Default::default(), 1);
    let cfg = DinoHeadConfig {
        in_dim: 16,
        out_dim: 32,
        hidden_dim: 24,
        bottleneck_dim: 8,
        nlayers: 3,
    };
    let head = cfg.init::<B>(&Default::default());
    let dir_guard = tempfile::tempdir().unwrap();
    let dir = dir_guard.path();
    let file = dir.join("dino_head.safetensors");
    save_dino_head(&head, &file).unwrap();
    // PyTorch's names and layouts: Sequential indices 0, 2, 4 and [out, in] weights.
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "last_layer.weight_g",
            "last_layer.weight_v",
            "mlp.0.bias",
            "mlp.0.weight",
            "mlp.2.bias",
            "mlp.2.weight",
            "mlp.4.bias",
            "mlp.4.weight"
        ]
    );
    assert_eq!(st.tensor("mlp.0.weight").unwrap().shape(), [24, 16]);
    assert_eq!(st.tensor("last_layer.weight_v").unwrap().shape(), [32, 8]);
    // Read back (from the folder, as `--init` does) and compare the function.
    let (back, bcfg) = import_dino_head::<B>(dir, &Default::default()).unwrap();
    assert_eq!(bcfg, cfg);
    let x = Tensor::<B, 2>::random([4, 16], Distribution::Default, &Default::default());
    let (a, b): (Vec<f32>, Vec<f32>) = (
        head.forward(x.clone()).into_data().to_vec().unwrap(),
        back.forward(x).into_data().to_vec().unwrap(),
    );
    assert_eq!(a, b);
    // Bad files name the problem.
    std::fs::write(&file, b"not safetensors").unwrap();
    let e = import_dino_head::<B>(&file, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("dino_head.safetensors") && e.contains("safetensors"),
        "{e}"
    );
}

#[test]
fn training_checkpoint_head_is_read_from_the_teacher() {
    // The committed DINOv2 training checkpoint has a (partial) teacher head: a clear error
    // names the missing tensor rather than reading the student's.
    let f = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dinov2_train_p16.pth");
    let e = import_dino_head::<B>(&f, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("mlp"), "{e}");
}

/// DINOv2's own `DINOHead` (make_fixtures.py): RAD-DINO's file layout and torch's newer
/// parametrized weight-norm names give the reference logits.
#[test]
fn dinov2_head_matches_the_reference_code() {
    let fx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let bytes = std::fs::read(fx.join("dino_head_io.safetensors")).unwrap();
    let io = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let read = |k: &str| -> Vec<f32> {
        io.tensor(k)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let (x, want) = (read("x"), read("logits"));
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for file in ["dino_head", "dino_head_parametrized.safetensors"] {
        let (head, cfg) = import_dino_head::<B>(&fx.join(file), &Default::default()).unwrap();
        assert_eq!(
            (
                cfg.in_dim,
                cfg.hidden_dim,
                cfg.bottleneck_dim,
                cfg.out_dim,
                cfg.nlayers
            ),
            (32, 40, 16, 48, 3)
        );
        let got: Vec<f32> = head
            .forward(t2(x.clone(), [4, 32]))
            .into_data()
            .to_vec()
            .unwrap();
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
            / scale;
        assert!(err < 1e-4, "{file}: relative error {err}");
    }
}

#[test]
fn one_layer_head_with_a_bare_linear_mlp_reads() {
    // DINOv2's `_build_mlp` returns a bare Linear for nlayers = 1: keys `mlp.weight` / `mlp.bias`.
    let cfg = DinoHeadConfig {
        in_dim: 8,
        out_dim: 12,
        hidden_dim: 0,
        bottleneck_dim: 6,
        nlayers: 1,
    };
    let head = cfg.init::<B>(&Default::default());
    let dir_guard = tempfile::tempdir().unwrap();
    let dir = dir_guard.path();
    let ours = dir.join("ours.safetensors");
    save_dino_head(&head, &ours).unwrap();
    let bytes = std::fs::read(&ours).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k.replace("mlp.0.", "mlp."), v))
        .collect();
    let file = dir.join("bare.safetensors");
    std::fs::write(&file, safetensors::serialize(renamed, None).unwrap()).unwrap();
    let (back, bcfg) = import_dino_head::<B>(&file, &Default::default()).unwrap();
    assert_eq!(bcfg, cfg);
    let x = Tensor::<B, 2>::random([3, 8], Distribution::Default, &Default::default());
    let (a, b): (Vec<f32>, Vec<f32>) = (
        head.forward(x.clone()).into_data().to_vec().unwrap(),
        back.forward(x).into_data().to_vec().unwrap(),
    );
    assert_eq!(a, b);
}

#[test]
fn num_params_counts_what_init_makes() {
    use burn::module::Module;
    for nlayers in [1, 2, 3] {
        let cfg = DinoHeadConfig {
            in_dim: 8,
            out_dim: 32,
            hidden_dim: 16,
            bottleneck_dim: 4,
            nlayers,
        };
        let made = cfg.init::<B>(&Default::default()).num_params();
        assert_eq!(cfg.num_params(), made as f64, "nlayers {nlayers}");
    }
}
