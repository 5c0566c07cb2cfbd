//! The int8 linear layer as one op: per-token quantization, quill's int8 product and the
//! dequantization, fused.
//!
//! The exporter writes each int8 linear in standard ONNX, so that onnxruntime runs the bundle:
//!
//! ```text
//! amax = max(max|x|, 1e-12)                    (…, m, 1)  per token
//! q    = Cast<i8>(Round(x · 127/amax))         (…, m, k)
//! y    = Cast<f32>(MatMulInteger(q, W)) · w_scale · amax/127      (…, m, n)
//! ```
//!
//! tract runs that as about ten ops, eight of them full passes over an (m, k) or (m, n)
//! tensor; in prefill they took about a third of the time. [`QuantizedLinear`] does it in one
//! op: each row of x is quantized into a scratch buffer, multiplied by [`Int8Linear`] (split
//! over quill's threads), and the int32 sums are turned into floats in place in the output.
//!
//! **Invariant:** every floating-point operation is the one tract performs on the unfused
//! graph, in the same order (tract declutters `a / b` into `a · recip(b)`; `1/127` is folded
//! to a constant), so the fused op's output is bit for bit the unfused graph's, and ARM boards,
//! where the graph is left to tract, keep giving the same tokens. The e2e test
//! `quant::quill_int8_kernel_and_tract_compute_the_same_logits` checks it.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::element_wise::{ElementWiseMiniOp, ElementWiseOp};
use tract_onnx::tract_core::ops::math::{Abs, Max, Mul, Recip, RoundHalfToEven};
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};

use crate::kernels::Int8Linear;

/// `y (…, m, n) f32 = dequantize(quantize(x (…, m, k) f32) · W)`, see the module docs.
#[derive(Debug, Clone)]
pub struct QuantizedLinear {
    linear: Int8Linear,
    /// `w_scale` per output channel, (n).
    w_scale: Arc<Vec<f32>>,
}

impl std::hash::Hash for QuantizedLinear {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.linear.hash(state);
        Arc::as_ptr(&self.w_scale).hash(state);
    }
}

impl PartialEq for QuantizedLinear {
    fn eq(&self, other: &Self) -> bool {
        self.linear == other.linear && Arc::ptr_eq(&self.w_scale, &other.w_scale)
    }
}
impl Eq for QuantizedLinear {}

impl QuantizedLinear {
    /// `linear` with the per-channel weight scales `w_scale` (n).
    pub fn new(linear: Int8Linear, w_scale: Vec<f32>) -> Option<QuantizedLinear> {
        (w_scale.len() == linear.n()).then(|| QuantizedLinear {
            linear,
            w_scale: Arc::new(w_scale),
        })
    }

    /// The int8 product inside.
    pub fn linear(&self) -> &Int8Linear {
        &self.linear
    }

    /// `y (m, n) = dequantize(quantize(x (m, k)) · W)`.
    pub fn run(&self, x: &[f32], y: &mut [f32]) {
        let (k, n) = (self.linear.k(), self.linear.n());
        let m = x.len() / k;
        assert_eq!(x.len(), m * k);
        assert_eq!(y.len(), m * n);
        // The quantized rows are a temporary of this call, as the tensors of the ops this one
        // replaces were: a long-lived scratch that grows with the longest prompt seen gets
        // reallocated at the heap's top in the middle of a server's life, and the freed hole
        // below it stays resident (the serial soak test's server grew 6 MB in a CI run).
        let mut q = vec![0i8; m * k]; // (m, k)
        let mut scales = vec![0f32; m]; // (m) amax/127
        quantize_rows(x, k, &mut q, &mut scales);
        // The int32 sums go into y's own memory (same size), then become floats in place.
        // SAFETY: f32 and i32 have the same size and alignment, every bit pattern is a valid
        // i32, and `y` is not used through its f32 view while `sums` lives.
        let sums = unsafe { std::slice::from_raw_parts_mut(y.as_mut_ptr() as *mut i32, y.len()) };
        self.linear.run_on(&q, sums, self.linear.pool());
        dequantize_rows(y, n, &self.w_scale, &scales);
    }
}

/// `q (m, k) = round(x · 127/amax)` and `scales (m) = amax/127`, per row, as tract computes them.
fn quantize_rows(x: &[f32], k: usize, q: &mut [i8], scales: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
    {
        // SAFETY: the CPU has AVX-512 F and BW (checked just above).
        return unsafe { quantize_rows_avx512(x, k, q, scales) };
    }
    quantize_rows_body(x, k, q, scales)
}

/// [`quantize_rows_body`] in AVX-512 registers, 16 values at a time (the compiler left the
/// maximum and the saturating cast scalar: 1.3 ns a value, 26 ms of a 128-token prefill).
/// The same operations on each value: `max` of absolute values (exact in any order; a NaN is
/// skipped, as `f32::max` does), one multiply, rounding half to even, and a conversion that is
/// exact for |v| ≤ 127 (a NaN becomes 0, as `as i8` makes it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_rows_avx512(x: &[f32], k: usize, q: &mut [i8], scales: &mut [f32]) {
    use std::arch::x86_64::*;
    if !k.is_multiple_of(16) {
        return quantize_rows_body(x, k, q, scales);
    }
    for ((xr, qr), s) in x.chunks_exact(k).zip(q.chunks_exact_mut(k)).zip(scales) {
        let (xs, _) = xr.as_chunks::<16>();
        let (qs, _) = qr.as_chunks_mut::<16>();
        // SAFETY: every load reads one whole 16-value chunk of `xr`, every store writes one
        // 16-byte chunk of `qr`.
        unsafe {
            let mut m = _mm512_setzero_ps();
            for c in xs {
                let a = _mm512_abs_ps(_mm512_loadu_ps(c.as_ptr()));
                // maxps returns its second operand when either is NaN: a NaN is skipped.
                m = _mm512_max_ps(a, m);
            }
            let amax = _mm512_reduce_max_ps(m).max(1e-12);
            let inv = _mm512_set1_ps(127f32 * amax.recip());
            for (c, d) in xs.iter().zip(qs) {
                let v = _mm512_mul_ps(_mm512_loadu_ps(c.as_ptr()), inv);
                let r =
                    _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                // cvtps gives i32::MIN for a NaN; its low byte is 0, which `vpmovdb` keeps.
                let i = _mm512_cvtps_epi32(r);
                _mm_storeu_si128(d.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(i));
            }
            *s = amax * 127f32.recip();
        }
    }
}

#[inline(always)]
fn quantize_rows_body(x: &[f32], k: usize, q: &mut [i8], scales: &mut [f32]) {
    for ((xr, qr), s) in x.chunks_exact(k).zip(q.chunks_exact_mut(k)).zip(scales) {
        // ReduceMax(Abs(x)), then Max(·, 1e-12).
        let amax = xr.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        // Div(127, amax) decluttered by tract into Mul(127, Recip(amax)).
        let inv = 127f32 * amax.recip();
        for (q, &v) in qr.iter_mut().zip(xr) {
            // Mul, Round (half to even), Cast to i8 (|v · inv| ≤ 127 by construction).
            *q = (v * inv).round_ties_even() as i8;
        }
        // Div(amax, 127) decluttered into Mul(amax, recip(127)), the constant folded.
        *s = amax * 127f32.recip();
    }
}

/// `y (m, n) = ((sums as f32) · w_scale) · x_scale`, where `y` holds the int32 sums' bits.
fn dequantize_rows(y: &mut [f32], n: usize, w_scale: &[f32], scales: &[f32]) {
    for (yr, &s) in y.chunks_exact_mut(n).zip(scales) {
        for (v, &w) in yr.iter_mut().zip(w_scale) {
            *v = (v.to_bits() as i32 as f32 * w) * s;
        }
    }
}

impl Op for QuantizedLinear {
    fn name(&self) -> StaticName {
        "QuillQuantizedLinear".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("k={} n={}", self.linear.k(), self.linear.n())])
    }

    op_as_typed_op!();
}

impl EvalOp for QuantizedLinear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let shape = self.linear.output_shape(x.shape())?;
        let x = x.try_as_plain_ram()?.as_slice::<f32>()?;
        // SAFETY: every element is written by `run` (the kernel writes every output column of
        // every row, then the dequantization rewrites each in place).
        let mut y = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        self.run(x, y.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for QuantizedLinear {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.to_tvec();
        let rank = shape.len();
        shape[rank - 1] = self.linear.n().into();
        Ok(tvec!(f32::fact(&shape)))
    }

    as_op!();
}

/// Fuses each [`Int8Linear`] with the per-token quantization before it and the dequantization
/// after it into a [`QuantizedLinear`], where the graph has exactly the exporter's form;
/// returns how many. Anything else is left as it is.
pub fn fuse_quantization(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    loop {
        let mut found = Vec::new();
        for id in model.eval_order()? {
            if let Some(m) = match_linear(model, id)? {
                found.push(m);
            }
        }
        if found.is_empty() {
            break;
        }
        for m in found {
            let op = QuantizedLinear::new(m.linear, m.w_scale)
                .expect("match_linear checked the scale's length");
            let mut patch = TypedModelPatch::default();
            let x = patch.tap_model(model, m.x)?;
            let name = model.node(m.last).name.clone();
            let y = patch.wire_node(name, op, &[x])?[0];
            patch.shunt_outside(model, OutletId::new(m.last, 0), y)?;
            patch.apply(model)?;
            fused += 1;
        }
        model.compact()?;
    }
    Ok(fused)
}

/// One [`Int8Linear`] in the exporter's form.
struct Matched {
    /// The float input x, (…, m, k).
    x: OutletId,
    linear: Int8Linear,
    w_scale: Vec<f32>,
    /// The last node of the dequantization (`· x_scale`), whose output the fused op replaces.
    last: usize,
}

fn match_linear(model: &TypedModel, id: usize) -> TractResult<Option<Matched>> {
    let node = model.node(id);
    let Some(linear) = node.op_as::<Int8Linear>() else {
        return Ok(None);
    };
    // Input side: Cast<i8> ← Round ← Mul(x, inv).
    let Some(cast) = producer(model, node.inputs[0], |n| is_cast(n, DatumType::I8)) else {
        return Ok(None);
    };
    let Some(round) = producer(model, cast.inputs[0], is_unary::<RoundHalfToEven>) else {
        return Ok(None);
    };
    let Some(scaled) = producer(model, round.inputs[0], is_binary::<Mul>) else {
        return Ok(None);
    };
    // inv = Mul(127, Recip(amax)) with amax = Max(Reduce<Max>(Abs(x)), 1e-12), either operand
    // order; the other operand of `scaled` is x.
    let mut found = None;
    for (xi, ii) in [(0, 1), (1, 0)] {
        let (x, inv) = (scaled.inputs[xi], scaled.inputs[ii]);
        if let Some(amax) = inverse_scale(model, inv)?
            && amax_of(model, amax, x)?
        {
            found = Some((x, amax));
        }
    }
    let Some((x, amax)) = found else {
        return Ok(None);
    };
    if model.outlet_fact(x)?.datum_type != DatumType::F32 {
        return Ok(None);
    }
    // Output side: Cast<f32> → Mul(·, w_scale) → Mul(·, Mul(amax, 1/127)), each the only user.
    let Some(to_f32) = only_successor(model, OutletId::new(id, 0), |n| is_cast(n, DatumType::F32))
    else {
        return Ok(None);
    };
    let Some(by_w) = only_successor(model, OutletId::new(to_f32.id, 0), is_binary::<Mul>) else {
        return Ok(None);
    };
    let other = |n: &TypedNode, from: usize| {
        n.inputs
            .iter()
            .find(|i| i.node != from)
            .copied()
            .filter(|_| n.inputs.len() == 2)
    };
    let Some(w_scale) = other(by_w, to_f32.id) else {
        return Ok(None);
    };
    let n = linear.n();
    let Some(w_scale) = model.outlet_fact(w_scale)?.konst.clone() else {
        return Ok(None);
    };
    if w_scale.datum_type() != DatumType::F32
        || w_scale.len() != n
        || w_scale.shape().last() != Some(&n)
    {
        return Ok(None);
    }
    let Some(by_x) = only_successor(model, OutletId::new(by_w.id, 0), is_binary::<Mul>) else {
        return Ok(None);
    };
    let Some(x_scale) = other(by_x, by_w.id) else {
        return Ok(None);
    };
    let Some(xs) = producer(model, x_scale, is_binary::<Mul>) else {
        return Ok(None);
    };
    let recip127 = 127f32.recip();
    let xs_ok = (xs.inputs[0] == amax && is_uniform(model, xs.inputs[1], recip127)?)
        || (xs.inputs[1] == amax && is_uniform(model, xs.inputs[0], recip127)?);
    // The fused op's output must have the shape the replaced one had.
    let x_fact = model.outlet_fact(x)?;
    let y_fact = model.outlet_fact(OutletId::new(by_x.id, 0))?;
    let mut expected: TVec<TDim> = x_fact.shape.to_tvec();
    if let Some(last) = expected.last_mut() {
        *last = n.into();
    }
    if !xs_ok || y_fact.datum_type != DatumType::F32 || *y_fact.shape != *expected {
        return Ok(None);
    }
    Ok(Some(Matched {
        x,
        linear: linear.clone(),
        w_scale: w_scale.try_as_plain_ram()?.as_slice::<f32>()?.to_vec(),
        last: by_x.id,
    }))
}

/// If `inv` is `Mul(127, Recip(amax))` with `amax = Max(r, 1e-12)`, the outlet `amax`.
fn inverse_scale(model: &TypedModel, inv: OutletId) -> TractResult<Option<OutletId>> {
    let Some(mul) = producer(model, inv, is_binary::<Mul>) else {
        return Ok(None);
    };
    for (ci, ri) in [(0, 1), (1, 0)] {
        if is_uniform(model, mul.inputs[ci], 127.0)?
            && let Some(recip) = producer(model, mul.inputs[ri], is_unary::<Recip>)
        {
            return Ok(Some(recip.inputs[0]));
        }
    }
    Ok(None)
}

/// Whether `amax` is `Max(Reduce<Max, last axis>(Abs(x)), 1e-12)`.
fn amax_of(model: &TypedModel, amax: OutletId, x: OutletId) -> TractResult<bool> {
    let Some(max) = producer(model, amax, is_binary::<Max>) else {
        return Ok(false);
    };
    let rank = model.outlet_fact(x)?.rank();
    for (ri, ci) in [(0, 1), (1, 0)] {
        if !is_uniform(model, max.inputs[ci], 1e-12)? {
            continue;
        }
        let reduce = producer(model, max.inputs[ri], |n| {
            n.op_as::<Reduce>()
                .is_some_and(|r| r.reducer == Reducer::Max && *r.axes == [rank - 1])
        });
        if let Some(reduce) = reduce
            && let Some(abs) = producer(model, reduce.inputs[0], is_unary::<Abs>)
            && abs.inputs[0] == x
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The node producing `outlet` if `pred` holds for it.
fn producer(
    model: &TypedModel,
    outlet: OutletId,
    pred: impl Fn(&TypedNode) -> bool,
) -> Option<&TypedNode> {
    let n = model.node(outlet.node);
    (outlet.slot == 0 && pred(n)).then_some(n)
}

/// The one node reading `outlet`, if there is exactly one and `pred` holds for it.
pub(crate) fn only_successor(
    model: &TypedModel,
    outlet: OutletId,
    pred: impl Fn(&TypedNode) -> bool,
) -> Option<&TypedNode> {
    let succ = &model.node(outlet.node).outputs[outlet.slot].successors;
    if succ.len() != 1 || model.outputs.contains(&outlet) {
        return None;
    }
    let n = model.node(succ[0].node);
    pred(n).then_some(n)
}

fn is_cast(n: &TypedNode, to: DatumType) -> bool {
    n.op_as::<Cast>().is_some_and(|c| c.to == to)
}

fn is_unary<T: ElementWiseMiniOp>(n: &TypedNode) -> bool {
    n.op_as::<ElementWiseOp>().is_some_and(|e| e.0.is::<T>())
}

fn is_binary<T: tract_onnx::tract_core::ops::binary::BinMiniOp>(n: &TypedNode) -> bool {
    n.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<T>()) && n.inputs.len() == 2
}

/// Whether `outlet` is a constant with every element equal to `value`.
fn is_uniform(model: &TypedModel, outlet: OutletId, value: f32) -> TractResult<bool> {
    let fact = model.outlet_fact(outlet)?;
    let Some(k) = fact.konst.as_ref().or(fact.uniform.as_ref()) else {
        return Ok(false);
    };
    Ok(k.datum_type() == DatumType::F32
        && k.try_as_plain_ram()?
            .as_slice::<f32>()?
            .iter()
            .all(|&v| v == value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_rounds_half_to_even_and_saturates_nothing() {
        // 127/2 = 63.5 → 64 (even); the row's largest magnitude maps to ±127 exactly.
        let x = [2.0f32, 1.0, -2.0, 0.0, -1.0];
        let mut q = [0i8; 5];
        let mut s = [0f32; 1];
        quantize_rows(&x, 5, &mut q, &mut s);
        assert_eq!(q, [127, 64, -127, 0, -64]);
        assert_eq!(s[0], 2.0 * 127f32.recip());
        // An all-zero row keeps the 1e-12 floor: zeros, no NaN.
        let mut q = [1i8; 3];
        quantize_rows(&[0.0; 3], 3, &mut q, &mut s);
        assert_eq!(q, [0, 0, 0]);
        assert!(s[0] > 0.0);
    }

    #[test]
    fn vector_quantization_is_the_scalar_one_bit_for_bit() {
        let mut seed = 0x9e37_79b9u32;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        // Rows of 48 and 576 (the vector path) and 20 (not a multiple of 16: scalar anyway);
        // magnitudes from 1e-30 to 1e30, exact halves after scaling, zeros of both signs, NaN.
        for k in [48usize, 576, 20] {
            let m = 9;
            let mut x: Vec<f32> = (0..m * k)
                .map(|_| {
                    let r = rnd();
                    let mag = 10f32.powi((r % 61) as i32 - 30);
                    (((r >> 8) % 2001) as f32 - 1000.0) / 1000.0 * mag
                })
                .collect();
            x[..k].fill(0.0); // an all-zero row
            x[k] = -0.0;
            x[2 * k..2 * k + 3].copy_from_slice(&[127.0, 63.5, -0.5]); // halves: 63.5, -0.5
            x[3 * k + 1] = f32::NAN;
            let (mut q1, mut s1) = (vec![0i8; m * k], vec![0f32; m]);
            let (mut q2, mut s2) = (vec![0i8; m * k], vec![0f32; m]);
            quantize_rows(&x, k, &mut q1, &mut s1); // the vector one where the CPU has it
            quantize_rows_body(&x, k, &mut q2, &mut s2);
            assert_eq!(q1, q2, "k = {k}");
            assert_eq!(
                s1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                s2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "k = {k}"
            );
        }
    }
}
