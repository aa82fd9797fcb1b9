//! Sharpness-aware minimisation (SAM; Foret et al. 2021): the gradient that updates θ is taken
//! at the worst nearby point of the batch's loss, to first order, instead of at θ itself:
//! ```text
//! ε = ρ · g / ‖g‖_all              g = ∇L(θ) on the batch
//! θ ← optimizer step with ∇L(θ + ε) on the same batch
//! ```
//! Chen et al. (2022) found ViTs on small data settle in sharp minima that SAM avoids. It costs
//! a second forward and backward pass per step.

use burn::module::{AutodiffModule, ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

use crate::optim::grad_norm;

/// `module` moved to θ + ε (module doc) for the parameters that have a gradient in `grads`;
/// the others are shared unchanged. Parameter ids are kept, so gradients taken on the result
/// update the original module. None when the gradient is zero (no direction to go) or not finite
/// (the plain step then meets the run's NaN check).
pub fn ascend<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    module: M,
    grads: &GradientsParams,
    rho: f64,
) -> Option<M> {
    let norm = grad_norm::<AB, M>(&module, grads);
    if norm == 0.0 || !norm.is_finite() {
        return None;
    }
    Some(module.map(&mut Ascend {
        grads,
        scale: rho / norm,
    }))
}

struct Ascend<'a> {
    grads: &'a GradientsParams,
    scale: f64,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for Ascend<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(g) = self.grads.get::<AB::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let moved = tensor.inner() + g * self.scale;
        Param::from_mapped_value(id, Tensor::from_inner(moved).require_grad(), mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Autodiff;
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::{Distribution, TensorData, Tolerance};
    use omnirad_model::Cpu;

    type Ad = Autodiff<Cpu>;

    #[derive(Module, Debug)]
    struct Net<B: burn::tensor::backend::Backend> {
        fc: Linear<B>,
    }

    /// ε is ρ·g/‖g‖ for every parameter (weight and bias together in the norm), and gradients
    /// taken at θ + ε are found under the original module's parameter ids.
    #[test]
    fn moves_each_parameter_by_rho_along_the_normalised_gradient() {
        let dev = Default::default();
        let net = Net::<Ad> {
            fc: LinearConfig::new(3, 2).init(&dev),
        };
        let x = Tensor::<Ad, 2>::random([4, 3], Distribution::Normal(0.0, 1.0), &dev);
        let loss = net.fc.forward(x.clone()).powi_scalar(2).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        let gw = grads.get::<Cpu, 2>(net.fc.weight.id).unwrap();
        let gb = grads
            .get::<Cpu, 1>(net.fc.bias.as_ref().unwrap().id)
            .unwrap();
        let norm = (gw.clone().powi_scalar(2).sum() + gb.clone().powi_scalar(2).sum())
            .into_scalar()
            .sqrt();
        let rho = 0.05;
        let moved = ascend(net.clone(), &grads, rho).unwrap();
        let tol = Tolerance::<f32>::rel_abs(1e-5, 1e-7);
        let want = net.fc.weight.val().inner() + gw * (rho as f32 / norm);
        moved
            .fc
            .weight
            .val()
            .inner()
            .into_data()
            .assert_approx_eq::<f32>(&want.into_data(), tol);
        let step: TensorData = (moved.fc.bias.as_ref().unwrap().val().inner()
            - net.fc.bias.as_ref().unwrap().val().inner())
        .into_data();
        step.assert_approx_eq::<f32>(&(gb * (rho as f32 / norm)).into_data(), tol);

        let loss = moved.fc.forward(x).powi_scalar(2).sum();
        let again = GradientsParams::from_grads(loss.backward(), &moved);
        assert!(again.get::<Cpu, 2>(net.fc.weight.id).is_some());
    }

    #[test]
    fn a_zero_gradient_has_no_direction() {
        let dev = Default::default();
        let net = Net::<Ad> {
            fc: LinearConfig::new(3, 2).init(&dev),
        };
        let loss = net.fc.forward(Tensor::<Ad, 2>::zeros([4, 3], &dev)).sum() * 0.0;
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        assert!(ascend(net, &grads, 0.05).is_none());
    }
}
