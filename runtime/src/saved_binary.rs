//! Elementwise binary ops in the load cache, read back without the casts tract adds.
//!
//! tract-nnef reads every `mul`, `add`, … with a cast on each operand, to the type the op
//! computes in, even when that is already the operand's type. On the int8 teacher's cached
//! graph that is 1,636 of the 4,963 nodes a warm load reads: each is named by a scan of every
//! node read so far, typed, then removed again by declutter — a third of a warm load's time
//! on the critical path. So before an entry is written, the binary ops whose operands have
//! one type and one rank (what such a cast leaves unchanged) are written as
//! `quill_binary(a, b, op = "Mul")`, and read back as tract's op itself. After declutter the
//! graph is the one tract's own form gives (the cache test compares logits bit for bit).
//!
//! Only [`for_saving`]'s copy holds [`Saved`]; the graph quill runs never does.

use tract_nnef::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::math;

const OP_NAME: &str = "quill_binary";

/// tract's binary op named `name` ([`BinMiniOp::name`]), for those quill writes.
fn op_named(name: &str) -> Option<TypedBinOp> {
    Some(match name {
        "Add" => math::add(),
        "Sub" => math::sub(),
        "Mul" => math::mul(),
        "Div" => math::div(),
        "Max" => math::max(),
        "Min" => math::min(),
        _ => return None,
    })
}

/// Adds `quill_binary` to quill's NNEF registry.
pub fn register(reg: &mut Registry) {
    reg.register_dumper(dump);
    reg.register_primitive(
        OP_NAME,
        &[
            TypeName::Scalar.tensor().named("a"),
            TypeName::Scalar.tensor().named("b"),
            TypeName::String.named("op"),
        ],
        &[("output", TypeName::Scalar.tensor())],
        load,
    );
}

/// A copy of `model` with every binary op that tract's reader would wrap in no-op casts
/// replaced by [`Saved`], for writing to the cache.
pub fn for_saving(model: &TypedModel) -> TractResult<TypedModel> {
    let mut saved = model.clone();
    for id in 0..saved.nodes().len() {
        let node = saved.node(id);
        let Some(op) = node.op_as::<TypedBinOp>() else {
            continue;
        };
        if op.1.is_some() || op_named(op.0.name()).is_none() || node.inputs.len() != 2 {
            continue;
        }
        let (a, b) = (
            saved.outlet_fact(node.inputs[0])?,
            saved.outlet_fact(node.inputs[1])?,
        );
        let dt = a.datum_type;
        let plain = dt.is_float() || dt.is_integer() && !dt.is_quantized();
        let computes_in_it = op.0.operating_datum_type(dt, dt).is_ok_and(|o| o == dt);
        if plain && b.datum_type == dt && a.rank() == b.rank() && computes_in_it {
            let op = Saved(op.clone());
            saved.node_mut(id).op = Box::new(op);
        }
    }
    Ok(saved)
}

/// A binary op of the copy written to the cache; it runs as the op it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved(TypedBinOp);

impl Op for Saved {
    fn name(&self) -> StaticName {
        "QuillSavedBinary".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Saved {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        EvalOp::eval(&self.0, ctx, inputs)
    }
}

impl TypedOp for Saved {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.0.output_facts(inputs)
    }

    as_op!();
}

fn dump(ast: &mut IntoAst, node: &TypedNode, op: &Saved) -> TractResult<Option<Arc<RValue>>> {
    let a = ast.mapping[&node.inputs[0]].clone();
    let b = ast.mapping[&node.inputs[1]].clone();
    Ok(Some(invocation(
        OP_NAME,
        &[a, b],
        &[("op", string(op.0.0.name()))],
    )))
}

/// `quill_binary(a, b, op)` as tract's op. An inline scalar operand may come back in another
/// type than it was written in (NNEF literals carry none): it is cast to the other operand's.
fn load(builder: &mut ModelBuilder, invocation: &ResolvedInvocation) -> TractResult<Value> {
    let mut a: OutletId = invocation.named_arg_as(builder, "a")?;
    let mut b: OutletId = invocation.named_arg_as(builder, "b")?;
    let name: String = invocation.named_arg_as(builder, "op")?;
    let op = op_named(&name).with_context(|| format!("{OP_NAME}: unknown op {name:?}"))?;
    let (a_fact, b_fact) = (builder.model.outlet_fact(a)?, builder.model.outlet_fact(b)?);
    let (a_dt, b_dt) = (a_fact.datum_type, b_fact.datum_type);
    if a_dt != b_dt {
        let literal = |f: &TypedFact| f.konst.is_some() && f.shape.volume().is_one();
        if literal(b_fact) {
            b = builder.wire_as_outlets(tract_onnx::tract_core::ops::cast::cast(a_dt), &[b])?[0];
        } else if literal(a_fact) {
            a = builder.wire_as_outlets(tract_onnx::tract_core::ops::cast::cast(b_dt), &[a])?[0];
        } else {
            bail!("{OP_NAME} {name}: operands of types {a_dt:?} and {b_dt:?}");
        }
    }
    builder.wire(op, &[a, b])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nnef() -> tract_nnef::framework::Nnef {
        tract_nnef::nnef().with_registry(crate::packed::registry())
    }

    fn ops(model: &TypedModel) -> Vec<String> {
        model
            .nodes()
            .iter()
            .map(|n| n.op.name().to_string())
            .collect()
    }

    /// `x · 2.5 + x` and `max(x, i)` (i an integer input: another type) through the cache's
    /// form and back: the same values, and no cast but the one the type change needs.
    #[test]
    fn binary_ops_come_back_without_casts() {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([2, 3])).unwrap();
        let i = model.add_source("i", i32::fact([2, 3])).unwrap();
        let c = model.add_const("c", rctensor2(&[[2.5f32]])).unwrap();
        let y = model.wire_node("y", math::mul(), &[x, c]).unwrap()[0];
        let z = model.wire_node("z", math::add(), &[y, x]).unwrap()[0];
        let f = model
            .wire_node(
                "f",
                tract_onnx::tract_core::ops::cast::cast(f32::datum_type()),
                &[i],
            )
            .unwrap()[0];
        let m = model.wire_node("m", math::max(), &[z, f]).unwrap()[0];
        model.select_output_outlets(&[m]).unwrap();

        let saved = for_saving(&model).unwrap();
        let names = ops(&saved);
        assert_eq!(
            names.iter().filter(|n| *n == "QuillSavedBinary").count(),
            3,
            "{names:?}"
        );
        let mut tar = vec![];
        nnef().write_to_tar(&saved, &mut tar).unwrap();
        let back = nnef().model_for_read(&mut tar.as_slice()).unwrap();
        let names = ops(&back);
        assert_eq!(
            names.iter().filter(|n| *n == "Cast").count(),
            1,
            "{names:?}"
        );
        assert!(!names.iter().any(|n| n == "QuillSavedBinary"), "{names:?}");

        let inputs = || {
            tvec!(
                tensor2(&[[1f32, -2., 3.], [0.5, 8., -1.]]).into_tvalue(),
                tensor2(&[[0i32, 0, 20], [1, -5, 0]]).into_tvalue(),
            )
        };
        let run = |m: TypedModel| {
            m.into_runnable()
                .unwrap()
                .run(inputs())
                .unwrap()
                .remove(0)
                .into_tensor()
        };
        let expected = tensor2(&[[3.5f32, 0., 20.], [1.75, 28., 0.]]);
        assert_eq!(run(model), expected);
        assert_eq!(run(back), expected);
    }
}
