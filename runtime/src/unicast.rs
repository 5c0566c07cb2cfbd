//! Element-wise `Add` and `Mul` of two f32 tensors of the same shape, in one pass.
//!
//! tract's code generation turns such a binary op into its `OptBinUnicast` (a vectorized
//! kernel) only when it can prove the tensors hold more than 32 elements. With the sequence
//! length symbolic, `S · 576` cannot be compared with 32, so the residual `Add`s and the FFN's
//! `Mul` (`silu(gate) · up`) stayed generic `TypedBinOp`s, evaluated through ndarray's
//! broadcasting at 1.5–1.8 ns an element: 15–19 ms of a 128-token prefill of the int8
//! teacher (89 ops over `(1, 128, 576)` and `(1, 128, 1536)`), against 2 ms for tract's `Silu`
//! over the same data. [`Unicast`] computes `c = a op b` in one pass the compiler vectorizes.
//!
//! Each element is one IEEE operation, so the result is the generic op's bit for bit (tested
//! below). Installed on tract's optimized model, where the rewrite finds the ops codegen left
//! generic; the ONNX file is untouched.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::math::{Add, Mul};

/// Which operation.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Kind {
    Add,
    Mul,
}

/// `c = a + b` or `c = a · b`, f32, `a` and `b` of one shape.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct Unicast {
    pub kind: Kind,
}

impl Unicast {
    /// `c[i] = a[i] op b[i]` (the three of one length).
    pub fn run(&self, a: &[f32], b: &[f32], c: &mut [f32]) {
        assert!(a.len() == c.len() && b.len() == c.len());
        match self.kind {
            Kind::Add => {
                for ((c, a), b) in c.iter_mut().zip(a).zip(b) {
                    *c = a + b;
                }
            }
            Kind::Mul => {
                for ((c, a), b) in c.iter_mut().zip(a).zip(b) {
                    *c = a * b;
                }
            }
        }
    }
}

impl Unicast {
    /// `c[i] = c[i] op b[i]`.
    pub fn run_in_place(&self, c: &mut [f32], b: &[f32]) {
        assert_eq!(c.len(), b.len());
        match self.kind {
            Kind::Add => {
                for (c, b) in c.iter_mut().zip(b) {
                    *c += b;
                }
            }
            Kind::Mul => {
                for (c, b) in c.iter_mut().zip(b) {
                    *c *= b;
                }
            }
        }
    }
}

impl Op for Unicast {
    fn name(&self) -> StaticName {
        "QuillUnicast".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}", self.kind)])
    }

    op_as_typed_op!();
}

impl EvalOp for Unicast {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (a, b) = args_2!(inputs);
        ensure!(
            a.shape() == b.shape(),
            "element-wise {:?} of shapes {:?} and {:?}: expected the same shape",
            self.kind,
            a.shape(),
            b.shape()
        );
        // The result goes into an operand that no one else holds (the plan lets go of a value
        // before its last user runs): no new buffer to fault in, a third less memory traffic.
        // Both operations commute, bit for bit.
        let (mut c, other) = if a.is_exclusive() {
            (a.into_tensor(), b)
        } else if b.is_exclusive() {
            (b.into_tensor(), a)
        } else {
            let shape: TVec<usize> = a.shape().into();
            // SAFETY: `run` writes every element.
            let mut c = unsafe { Tensor::uninitialized::<f32>(&shape)? };
            self.run(
                a.try_as_plain_ram()?.as_slice::<f32>()?,
                b.try_as_plain_ram()?.as_slice::<f32>()?,
                c.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
            );
            return Ok(tvec!(c.into_tvalue()));
        };
        self.run_in_place(
            c.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
            other.try_as_plain_ram()?.as_slice::<f32>()?,
        );
        Ok(tvec!(c.into_tvalue()))
    }
}

impl TypedOp for Unicast {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Replaces each generic `Add` / `Mul` of two f32 operands whose facts have the same shape
/// with a [`Unicast`]; returns how many.
pub fn use_unicast(model: &mut TypedModel) -> TractResult<usize> {
    let mut found = Vec::new();
    for node in model.nodes() {
        let Some(op) = node.op_as::<TypedBinOp>() else {
            continue;
        };
        let kind = if op.0.is::<Add>() {
            Kind::Add
        } else if op.0.is::<Mul>() {
            Kind::Mul
        } else {
            continue;
        };
        let [a, b] = node.inputs[..] else { continue };
        let (fa, fb) = (model.outlet_fact(a)?, model.outlet_fact(b)?);
        let f32_out = node.outputs[0].fact.datum_type == f32::datum_type();
        if fa.datum_type == f32::datum_type()
            && fb.datum_type == f32::datum_type()
            && f32_out
            && fa.shape == fb.shape
            && fa.konst.is_none()
            && fb.konst.is_none()
        {
            found.push((node.id, kind));
        }
    }
    for &(id, kind) in &found {
        let node = model.node(id);
        let patch = TypedModelPatch::replace_single_op(
            model,
            node,
            &node.inputs.clone(),
            Unicast { kind },
        )?;
        patch.apply(model)?;
    }
    Ok(found.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generic op's result through tract's own evaluation.
    fn tract(kind: Kind, a: &Tensor, b: &Tensor) -> Tensor {
        let op: Box<dyn tract_onnx::tract_core::ops::binary::BinMiniOp> = match kind {
            Kind::Add => Box::new(Add),
            Kind::Mul => Box::new(Mul),
        };
        let out = TypedBinOp(op, None)
            .eval_out_of_plan(tvec!(a.clone().into_tvalue(), b.clone().into_tvalue()))
            .unwrap()
            .unwrap();
        out[0].clone().into_tensor()
    }

    #[test]
    fn unicast_is_the_generic_op_bit_for_bit() {
        let mut s = 99u32;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            // Any bit pattern: every exponent, both signs, subnormals, infinities and NaNs.
            f32::from_bits(s)
        };
        for shape in [&[1usize, 3, 576][..], &[1, 7, 1536], &[5]] {
            let n: usize = shape.iter().product();
            let a = Tensor::from_shape(shape, &(0..n).map(|_| rnd()).collect::<Vec<_>>()).unwrap();
            let b = Tensor::from_shape(shape, &(0..n).map(|_| rnd()).collect::<Vec<_>>()).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                let v = t.try_as_plain_ram().unwrap();
                v.as_slice::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            };
            for kind in [Kind::Add, Kind::Mul] {
                let want = tract(kind, &a, &b);
                // Operands held elsewhere too (`ta`, `tb` live on: a new buffer), then b alone
                // exclusive (the result in b's buffer), then a.
                let (ta, tb) = (a.clone().into_tvalue(), b.clone().into_tvalue());
                let shared = Unicast { kind }
                    .eval_out_of_plan(tvec!(ta.clone(), tb.clone()))
                    .unwrap()
                    .unwrap()[0]
                    .clone()
                    .into_tensor();
                let in_b = Unicast { kind }
                    .eval_out_of_plan(tvec!(ta.clone(), b.clone().into_tvalue()))
                    .unwrap()
                    .unwrap()[0]
                    .clone()
                    .into_tensor();
                let got = Unicast { kind }
                    .eval_out_of_plan(tvec!(a.clone().into_tvalue(), tb.clone()))
                    .unwrap()
                    .unwrap()[0]
                    .clone()
                    .into_tensor();
                // NaNs compare by being NaN (which NaN an operation returns is the CPU's).
                let nan = |x: u32| f32::from_bits(x).is_nan();
                let same = |x: &Tensor, y: &Tensor| {
                    assert_eq!(x.shape(), y.shape());
                    for (g, w) in bits(x).iter().zip(bits(y)) {
                        assert!(*g == w || nan(*g) && nan(w), "{kind:?}: {g:#x} vs {w:#x}");
                    }
                };
                same(&shared, &want);
                same(&in_b, &want);
                same(&got, &want);
            }
        }
    }

    #[test]
    fn operands_of_two_shapes_are_refused() {
        let a = Tensor::from_shape(&[2, 3], &[0f32; 6]).unwrap();
        let b = Tensor::from_shape(&[3, 2], &[0f32; 6]).unwrap();
        let err = Unicast { kind: Kind::Add }
            .eval_out_of_plan(tvec!(a.into_tvalue(), b.into_tvalue()))
            .unwrap_err();
        assert!(err.to_string().contains("expected the same shape"), "{err}");
    }
}
