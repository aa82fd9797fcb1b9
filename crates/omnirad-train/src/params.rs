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
