//! Rotary position embedding as one pass.
//!
//! tract-transformers' `ApplyRope` computes `y = x · cos + rotate_half(x) · sin` as four
//! whole-tensor steps (a zeroed copy, the rotated halves with a negation, two products, a sum),
//! each allocating its result: 12 ms of a 128-token prefill of the int8 teacher on one thread
//! for 3 M values. [`Rope`] computes each value in one pass, with the same float operations in
//! the same order (`x · cos`, then `r · sin` with `r = −x[i + d/2]` or `x[i − d/2]`, then their
//! sum, each rounded: no fused multiply-add), so the output is tract's bit for bit (checked by
//! `tests/e2e/quant.rs`, which compares the whole model with and without quill's ops).
//! Installed with quill's kernels on x86-64; elsewhere tract keeps its op.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_transformers::ops::apply_rope::ApplyRope;

/// `y (…, s, d) = x · cos + rotate_half(x) · sin`, with `cos` and `sin` `(…1, s, d)`.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct Rope;

impl Rope {
    /// `y` for `x` of `rows` rows of `d` per position block of `s · d`: row `r` uses the
    /// tables' row `r % s`.
    fn run(x: &[f32], cos: &[f32], sin: &[f32], d: usize, y: &mut [f32]) {
        let half = d / 2;
        let table = cos.len();
        for (b, (xb, yb)) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).enumerate() {
            let at = (b * d) % table;
            let (c, s) = (&cos[at..at + d], &sin[at..at + d]);
            let (x0, x1) = xb.split_at(half);
            let (y0, y1) = yb.split_at_mut(half);
            for i in 0..half {
                y0[i] = x0[i] * c[i] + -x1[i] * s[i];
                y1[i] = x1[i] * c[half + i] + x0[i] * s[half + i];
            }
        }
    }
}

impl Op for Rope {
    fn name(&self) -> StaticName {
        "QuillRope".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Rope {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, cos, sin) = args_3!(inputs);
        let shape: TVec<usize> = x.shape().into();
        let rank = shape.len();
        // The tables must be (…1, s, d) with x (…, s, d); anything else goes to tract's op.
        let fits = |t: &TValue| {
            t.datum_type() == DatumType::F32
                && t.rank() <= rank
                && rank >= 2
                && t.shape()[..t.rank().saturating_sub(2)]
                    .iter()
                    .all(|&n| n == 1)
                && t.shape()[t.rank().saturating_sub(2)..] == shape[rank - 2..]
        };
        let d = shape.last().copied().unwrap_or(0);
        if x.datum_type() != DatumType::F32
            || d == 0
            || !d.is_multiple_of(2)
            || !fits(&cos)
            || !fits(&sin)
            || cos.rank() < 2
        {
            return ApplyRope.eval(_ctx, tvec!(x, cos, sin));
        }
        // SAFETY: `run` writes every element.
        let mut y = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        Self::run(
            x.try_as_plain_ram()?.as_slice::<f32>()?,
            cos.try_as_plain_ram()?.as_slice::<f32>()?,
            sin.try_as_plain_ram()?.as_slice::<f32>()?,
            d,
            y.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
        );
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for Rope {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].datum_type.fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Replaces every f32 `ApplyRope` of an optimized model by a [`Rope`]; returns how many. Does
/// nothing off x86-64 (the boards keep tract's op).
pub fn use_rope(model: &mut TypedModel) -> TractResult<usize> {
    if !cfg!(target_arch = "x86_64") {
        return Ok(0);
    }
    let ids: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| n.op_is::<ApplyRope>() && n.inputs.len() == 3)
        .map(|n| n.id)
        .collect();
    let mut replaced = 0;
    for id in ids {
        let node = model.node(id);
        if model.outlet_fact(node.inputs[0])?.datum_type != DatumType::F32 {
            continue;
        }
        let mut patch = TypedModelPatch::default();
        let taps = patch.taps(model, &node.inputs)?;
        let y = patch.wire_node(&node.name, Rope, &taps)?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), y)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_is_tracts_apply_rope_bit_for_bit() {
        let mut seed = 0x2545_f491u32;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed % 20001) as f32 / 1000.0 - 10.0
        };
        let (h, s, d) = (3, 5, 64);
        let x: Vec<f32> = (0..h * s * d).map(|_| rnd()).collect();
        let cos: Vec<f32> = (0..s * d).map(|_| rnd() / 10.0).collect();
        let sin: Vec<f32> = (0..s * d).map(|_| rnd() / 10.0).collect();
        let inputs = || {
            tvec!(
                Tensor::from_shape(&[1, h, s, d], &x).unwrap().into_tvalue(),
                Tensor::from_shape(&[1, 1, s, d], &cos)
                    .unwrap()
                    .into_tvalue(),
                Tensor::from_shape(&[1, 1, s, d], &sin)
                    .unwrap()
                    .into_tvalue(),
            )
        };
        let ctx = EvalContext::out_of_plan();
        let ours = Rope.eval(&ctx, inputs()).unwrap().remove(0);
        let tracts = ApplyRope.eval(&ctx, inputs()).unwrap().remove(0);
        let bits = |t: &TValue| {
            t.try_as_plain_ram()
                .unwrap()
                .as_slice::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&ours), bits(&tracts));
    }
}
