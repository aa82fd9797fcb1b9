//! Parameters by path (`backbone.blocks.0.attn.qkv.weight`): read all of a module's tensors, or
//! rebuild a module with new values. Used by the EMA teacher update and by checkpoints.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

/// A flattened parameter and its shape.
pub struct Named<B: Backend> {
    pub path: String,
    pub shape: Vec<usize>,
    pub value: Tensor<B, 1>,
}

/// Every float parameter of `module`, in visiting order.
pub fn collect<B: Backend, M: Module<B>>(module: &M) -> Vec<Named<B>> {
    struct V<B: Backend> {
        path: Vec<String>,
        out: Vec<Named<B>>,
    }
    impl<B: Backend> ModuleVisitor<B> for V<B> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let t = param.val();
            let shape = t.dims().to_vec();
            let n = shape.iter().product::<usize>();
            self.out.push(Named {
                path: self.path.join("."),
                shape,
                value: t.reshape([n]),
            });
        }
    }
    let mut v = V {
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

/// Rebuilds `module` with `f(path, flattened value)` for every float parameter; `f` returns the
/// new flattened value (same length). Gradient tracking of each parameter is kept.
pub fn replace<B, M, F>(module: M, f: F) -> M
where
    B: Backend,
    M: Module<B>,
    F: FnMut(&str, Tensor<B, 1>) -> Tensor<B, 1>,
{
    struct R<F> {
        path: Vec<String>,
        f: F,
    }
    impl<B: Backend, F: FnMut(&str, Tensor<B, 1>) -> Tensor<B, 1>> ModuleMapper<B> for R<F> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let require_grad = tensor.is_require_grad();
            let shape = tensor.dims();
            let n = shape.iter().product::<usize>();
            let new = (self.f)(&self.path.join("."), tensor.reshape([n])).reshape(shape);
            let new = if require_grad {
                new.require_grad()
            } else {
                new
            };
            Param::from_mapped_value(id, new, mapper)
        }
    }
    module.map(&mut R {
        path: Vec::new(),
        f,
    })
}

/// θ_t ← m·θ_t + (1 − m)·θ_s for every parameter of `target` that `source` has under the same
/// path (the others are kept): the DINO teacher update and fine-tuning's weight average.
pub fn ema<B: Backend, M: Module<B>>(target: M, source: &M, m: f64) -> M {
    let source: std::collections::HashMap<String, Tensor<B, 1>> = collect(source)
        .into_iter()
        .map(|p| (p.path, p.value))
        .collect();
    replace(target, |path, t| match source.get(path) {
        Some(s) => t * m + s.clone() * (1.0 - m),
        None => t,
    })
}

/// The element-wise mean of modules of one architecture: a uniform model soup (Wortsman et al.
/// 2022), one model with the inference cost of one.
pub fn mean<B: Backend, M: Module<B>>(modules: Vec<M>) -> M {
    let mut modules = modules.into_iter();
    let mut soup = modules.next().expect("the mean of no modules");
    for (j, m) in modules.enumerate() {
        // Soup of j + 1 modules → soup of j + 2: weights (j + 1)/(j + 2) and 1/(j + 2).
        soup = ema(soup, &m, (j + 1) as f64 / (j + 2) as f64);
    }
    soup
}

/// Marks every float parameter as trainable. Needed after `from_inner`: parameters made with
/// `Param::from_tensor` on a non-autodiff backend (tokens, position table, LayerScale, …) carry
/// `require_grad = false` into the autodiff module and would silently never train.
pub fn trainable<B: AutodiffBackend, M: Module<B>>(module: M) -> M {
    trainable_where(module, |_| true)
}

/// Trains the parameters whose path satisfies `keep` and freezes the others (no gradients).
pub fn trainable_where<B: AutodiffBackend, M: Module<B>>(
    module: M,
    keep: impl Fn(&str) -> bool,
) -> M {
    struct T<F> {
        path: Vec<String>,
        keep: F,
    }
    impl<B: Backend, F: Fn(&str) -> bool> ModuleMapper<B> for T<F> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let on = (self.keep)(&self.path.join("."));
            param.set_require_grad(on)
        }
    }
    module.map(&mut T {
        path: Vec::new(),
        keep,
    })
}

/// Draws every lazily initialised parameter now. burn's `Linear`/`Conv2d` parameters are
/// initialised on first use, and a clone taken before that re-draws its own random values: a
/// teacher cloned from a fresh student would start as a *different* network.
pub fn materialize<B: Backend, M: Module<B>>(module: &M) {
    struct V;
    impl<B: Backend> ModuleVisitor<B> for V {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut V);
}

#[cfg(test)]
mod tests {
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::{Tensor, TensorData};
    use omnirad_model::Cpu;

    use super::*;

    #[test]
    fn mean_is_the_element_wise_average_of_every_parameter() {
        let dev = Default::default();
        let layer = |w: [f32; 4], b: [f32; 2]| {
            let mut l: Linear<Cpu> = LinearConfig::new(2, 2).init(&dev);
            l.weight =
                Param::from_tensor(Tensor::from_data(TensorData::new(w.to_vec(), [2, 2]), &dev));
            l.bias = Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(b.to_vec(), [2]),
                &dev,
            )));
            l
        };
        let soup = mean(vec![
            layer([1.0, 2.0, 3.0, 4.0], [0.0, 3.0]),
            layer([4.0, 2.0, 0.0, -2.0], [3.0, 0.0]),
            layer([1.0, 5.0, 3.0, 1.0], [6.0, -3.0]),
        ]);
        let values = |t: Tensor<Cpu, 1>| t.into_data().to_vec::<f32>().unwrap();
        let got: Vec<(String, Vec<f32>)> = collect(&soup)
            .into_iter()
            .map(|p| (p.path, values(p.value)))
            .collect();
        assert_eq!(got.len(), 2);
        for (path, v) in got {
            let want = if path == "weight" {
                vec![2.0, 3.0, 2.0, 1.0]
            } else {
                vec![3.0, 0.0]
            };
            for (a, b) in v.iter().zip(&want) {
                assert!((a - b).abs() < 1e-6, "{path}: {v:?} != {want:?}");
            }
        }
    }
}
