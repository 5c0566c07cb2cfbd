//! The FFN's online rotation as one op.
//!
//! An int8 bundle rotates the FFN's hidden activations before quantizing them for the down
//! projection (`x · Q`, `Q = A ⊗ B` a Hadamard of order 1536 = 12 × 128, see the exporter's
//! `rotate_online`), written in ONNX as `Reshape (1, S, 12, 128) → MatMul(·, B) →
//! MatMul(Aᵀ, ·) → Reshape (1, S, 1536)`. tract runs the two products as batched matrix
//! products of 12 rows each (with a packing step and axis moves around them): 42 ms of a
//! 128-token prefill, 28 M multiply-adds per layer run at 20 GFLOP/s. [`KronRotation`] does
//! both products per token in AVX-512 registers, split over quill's threads.
//!
//! **Invariant:** each output value is the sum tract computes, in tract's order — its matrix
//! kernels start every sum at zero and add one fused multiply-add per term, in the order of the
//! shared axis — so the result is bit for bit tract's (checked by the e2e test
//! `quant::quill_int8_kernel_and_tract_compute_the_same_logits`). Installed only where the CPU
//! has AVX-512 F; elsewhere (the ARM boards) tract keeps the products.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::einsum::EinSum;

use crate::pool::{Pool, SendPtr};

/// Columns per register block: four AVX-512 registers of 16 floats.
const COLS: usize = 64;
/// Rows per register block (4 × 4 accumulators).
const ROWS: usize = 4;

/// `y (…, a·b) = x (…, a·b) · (A ⊗ B)`: per token, `Y = Aᵀ · (X · B)` with `X` the token's
/// `(a, b)` view.
#[derive(Debug, Clone)]
pub struct KronRotation {
    /// Aᵀ, `(a, a)` row-major.
    a_t: Arc<Vec<f32>>,
    /// B, `(b, b)` row-major.
    b: Arc<Vec<f32>>,
    a: usize,
    nb: usize,
    pool: Option<Arc<Pool>>,
}

impl std::hash::Hash for KronRotation {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.a, self.nb, Arc::as_ptr(&self.b) as usize).hash(state)
    }
}

impl PartialEq for KronRotation {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.a_t, &other.a_t) && Arc::ptr_eq(&self.b, &other.b)
    }
}
impl Eq for KronRotation {}

impl KronRotation {
    /// `None` unless the shapes fit the register blocks (a a multiple of 4, b of 64).
    pub fn new(a_t: Vec<f32>, a: usize, b: Vec<f32>, nb: usize) -> Option<KronRotation> {
        (a > 0
            && nb > 0
            && a.is_multiple_of(ROWS)
            && nb.is_multiple_of(COLS)
            && a_t.len() == a * a
            && b.len() == nb * nb)
            .then(|| KronRotation {
                a_t: Arc::new(a_t),
                b: Arc::new(b),
                a,
                nb,
                pool: None,
            })
    }

    /// Tokens split over `pool`'s threads.
    pub fn with_pool(mut self, pool: Option<Arc<Pool>>) -> KronRotation {
        self.pool = pool;
        self
    }

    /// Width of a token row: a · b.
    pub fn width(&self) -> usize {
        self.a * self.nb
    }

    /// `y (m, a·b) = x (m, a·b) · (A ⊗ B)`, with the best kernel this CPU has.
    pub fn run(&self, x: &[f32], y: &mut [f32]) {
        let w = self.width();
        assert_eq!(x.len(), y.len());
        assert!(x.len().is_multiple_of(w));
        let m = x.len() / w;
        match self.pool.as_deref() {
            Some(pool) if pool.threads() > 1 && m > 1 => {
                let parts = pool.threads().min(m);
                let y_ptr = SendPtr(y.as_mut_ptr());
                let y_ptr = &y_ptr;
                pool.run(&|i| {
                    if i >= parts {
                        return;
                    }
                    let rows = m * i / parts..m * (i + 1) / parts;
                    // SAFETY: the parts' row ranges are disjoint and inside `y` (m rows of w).
                    let ys = unsafe {
                        std::slice::from_raw_parts_mut(y_ptr.0.add(rows.start * w), rows.len() * w)
                    };
                    self.run_rows(&x[rows.start * w..rows.end * w], ys);
                });
            }
            _ => self.run_rows(x, y),
        }
    }

    fn run_rows(&self, x: &[f32], y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 F (checked just above).
            return unsafe { self.run_avx512(x, y) };
        }
        self.run_portable(x, y)
    }

    /// Plain Rust, the same sums in the same order (`mul_add`): any CPU, and the tests'
    /// reference.
    pub fn run_portable(&self, x: &[f32], y: &mut [f32]) {
        let (a, nb) = (self.a, self.nb);
        let mut t = vec![0f32; a * nb];
        for (xr, yr) in x.chunks_exact(a * nb).zip(y.chunks_exact_mut(a * nb)) {
            // T = X · B: T[i][j] = Σ_k X[i][k] · B[k][j].
            for i in 0..a {
                for j in 0..nb {
                    let mut s = 0f32;
                    for k in 0..nb {
                        s = xr[i * nb + k].mul_add(self.b[k * nb + j], s);
                    }
                    t[i * nb + j] = s;
                }
            }
            // Y = Aᵀ · T: Y[i][j] = Σ_k Aᵀ[i][k] · T[k][j].
            for i in 0..a {
                for j in 0..nb {
                    let mut s = 0f32;
                    for k in 0..a {
                        s = self.a_t[i * a + k].mul_add(t[k * nb + j], s);
                    }
                    yr[i * nb + j] = s;
                }
            }
        }
    }

    /// [`KronRotation::run_portable`] in AVX-512 registers: blocks of 4 rows × 64 columns, 16
    /// accumulators, each column's sum one `vfmadd` per term in order.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, x: &[f32], y: &mut [f32]) {
        let (a, nb) = (self.a, self.nb);
        let mut t = vec![0f32; a * nb]; // (a, nb): one token's X · B
        for (xr, yr) in x.chunks_exact(a * nb).zip(y.chunks_exact_mut(a * nb)) {
            // SAFETY: `block` reads rows < a of `lhs` (stride = depth) and of `rhs` (stride
            // nb, depth rows), and writes rows < a of `out` (stride nb); all are a × nb or
            // nb × nb / a × a as passed.
            unsafe {
                block4x64(xr, nb, &self.b, &mut t, a, nb);
                block4x64(&self.a_t, a, &t, yr, a, nb);
            }
        }
    }
}

/// `out (rows, nb) = lhs (rows, depth) · rhs (depth, nb)`, each sum from zero, one fused
/// multiply-add per term in order of the shared axis.
///
/// # Safety
/// AVX-512 F; `rows` a multiple of 4, `nb` of 64; `lhs` holds rows × depth, `rhs` depth × nb,
/// `out` rows × nb.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block4x64(
    lhs: &[f32],
    depth: usize,
    rhs: &[f32],
    out: &mut [f32],
    rows: usize,
    nb: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(lhs.len() >= rows * depth && rhs.len() >= depth * nb && out.len() >= rows * nb);
    for r0 in (0..rows).step_by(ROWS) {
        for c0 in (0..nb).step_by(COLS) {
            // SAFETY: rows r0..r0+4 < rows, columns c0..c0+64 ≤ nb, k < depth.
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); 4]; ROWS];
                for k in 0..depth {
                    let b = rhs.as_ptr().add(k * nb + c0);
                    let bv = [
                        _mm512_loadu_ps(b),
                        _mm512_loadu_ps(b.add(16)),
                        _mm512_loadu_ps(b.add(32)),
                        _mm512_loadu_ps(b.add(48)),
                    ];
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let xv = _mm512_set1_ps(*lhs.get_unchecked((r0 + r) * depth + k));
                        for (c, acc) in acc.iter_mut().enumerate() {
                            *acc = _mm512_fmadd_ps(xv, bv[c], *acc);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    let o = out.as_mut_ptr().add((r0 + r) * nb + c0);
                    for (c, v) in acc.iter().enumerate() {
                        _mm512_storeu_ps(o.add(16 * c), *v);
                    }
                }
            }
        }
    }
}

impl Op for KronRotation {
    fn name(&self) -> StaticName {
        "QuillKronRotation".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{} ⊗ {}", self.a, self.nb)])
    }

    op_as_typed_op!();
}

impl EvalOp for KronRotation {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        ensure!(
            x.shape().last() == Some(&self.width()),
            "rotation input {:?}, expected rows of {}",
            x.shape(),
            self.width()
        );
        let shape: TVec<usize> = x.shape().into();
        let x = x.try_as_plain_ram()?.as_slice::<f32>()?;
        // SAFETY: `run` writes every element.
        let mut y = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        self.run(x, y.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for KronRotation {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Replaces each `Reshape (…, a·b) → (…, a, b) → EinSum with constant B → EinSum with constant
/// Aᵀ → Reshape (…, a·b)` chain (the exporter's online rotation, decluttered by tract) with a
/// [`KronRotation`]; returns how many. Does nothing without AVX-512 F.
pub fn use_kron_rotation(model: &mut TypedModel, pool: Option<Arc<Pool>>) -> TractResult<usize> {
    #[cfg(target_arch = "x86_64")]
    let have = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let have = false;
    if !have {
        return Ok(0);
    }
    let mut found = Vec::new();
    for id in model.eval_order()? {
        if let Some(m) = match_rotation(model, id)? {
            found.push(m);
        }
    }
    let n = found.len();
    for (first, last, op) in found {
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, model.node(first).inputs[0])?;
        let name = model.node(last).name.clone();
        let y = patch.wire_node(name, op.with_pool(pool.clone()), &[x])?[0];
        patch.shunt_outside(model, OutletId::new(last, 0), y)?;
        patch.apply(model)?;
    }
    if n > 0 {
        model.compact()?;
    }
    Ok(n)
}

/// The chain starting at the `Reshape` `id`: (first node, last node, the op replacing them).
///
/// The chain is `Reshape (…, a·b) → (…, a, b)`, then only axis changes (moves, reshapes, unit
/// axes) and two `EinSum`s, each with one f32 constant operand, then the inverse `Reshape`.
/// tract gives it two forms: straight from the ONNX graph (`abmk,kn->bmn` then
/// `mk,bkn->abmn`), and from the load cache's NNEF, where the batched products are folded into
/// plain ones between merges and moves. Both contract the b axis with B `(b, b)` first, then
/// the a axis with Aᵀ `(a, a)`; which axis of each constant is the contracted one is read from
/// the `EinSum`'s axes (a constant laid out (out, in) is transposed).
fn match_rotation(
    model: &TypedModel,
    id: usize,
) -> TractResult<Option<(usize, usize, KronRotation)>> {
    let node = model.node(id);
    let Some(AxisOp::Reshape(at, from, to)) = node.op_as::<AxisOp>() else {
        return Ok(None);
    };
    let x_fact = model.outlet_fact(node.inputs[0])?;
    let rank = x_fact.rank();
    if x_fact.datum_type != DatumType::F32 || rank == 0 || *at != rank - 1 || from.len() != 1 {
        return Ok(None);
    }
    let dims: Vec<usize> = to.iter().filter_map(|d| d.to_usize().ok()).collect();
    let [a, nb] = dims[..] else {
        return Ok(None);
    };
    if to.len() != 2 || from[0].to_usize().ok() != Some(a * nb) {
        return Ok(None);
    }
    // The chain's axes are told apart by their sizes only (the moves and reshapes between the
    // products are not followed axis by axis): the two factors must differ in size, and no
    // other axis of the input may have either size (the sequence axis is symbolic in quill's
    // graphs). Anything ambiguous stays with tract.
    if a == nb
        || x_fact.shape[..rank - 1]
            .iter()
            .any(|d| d.to_usize().is_ok_and(|d| d == a || d == nb))
    {
        return Ok(None);
    }
    let mut cur = id;
    let mut products = Vec::new();
    let mut steps = 0;
    let back = loop {
        let Some(next) = only_user(model, cur) else {
            return Ok(None);
        };
        let n = model.node(next);
        if let Some(op) = n.op_as::<AxisOp>() {
            if n.inputs.len() != 1 {
                return Ok(None);
            }
            if let AxisOp::Reshape(at2, from2, to2) = op
                && *at2 == rank - 1
                && from2 == to
                && to2 == from
            {
                break next;
            }
        } else if n.op_is::<EinSum>() && products.len() < 2 {
            products.push(next);
        } else {
            return Ok(None);
        }
        steps += 1;
        if steps > 32 {
            return Ok(None);
        }
        cur = next;
    };
    let [by_b, by_a] = products[..] else {
        return Ok(None);
    };
    let (Some(b), Some(a_t)) = (
        product_constant(model, by_b, nb, false)?,
        product_constant(model, by_a, a, true)?,
    ) else {
        return Ok(None);
    };
    // The replaced chain's output has the input's shape.
    if model.outlet_fact(OutletId::new(back, 0))?.shape != x_fact.shape {
        return Ok(None);
    }
    Ok(KronRotation::new(a_t, a, b, nb).map(|op| (id, back, op)))
}

/// The only node reading `id`'s output, if exactly one does and it is not a model output.
fn only_user(model: &TypedModel, id: usize) -> Option<usize> {
    crate::qlinear::only_successor(model, OutletId::new(id, 0), |_| true).map(|n| n.id)
}

/// The `(n, n)` f32 constant operand of the float `EinSum` `id` (the other operand being the
/// chain's data), as `M[in][out]` (`out_major: false`) or `M[out][in]` (`true`), where `in` is
/// the contracted axis; `None` if the product is anything else.
fn product_constant(
    model: &TypedModel,
    id: usize,
    n: usize,
    out_major: bool,
) -> TractResult<Option<Vec<f32>>> {
    let node = model.node(id);
    let Some(e) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    if e.q_params.is_some() || node.inputs.len() != 2 {
        return Ok(None);
    }
    let facts = model.node_input_facts(id)?;
    let Some(c) = (0..2).find(|&i| facts[i].konst.is_some()) else {
        return Ok(None);
    };
    if facts[1 - c].konst.is_some() {
        return Ok(None);
    }
    let k = facts[c].konst.clone().expect("checked");
    if k.datum_type() != DatumType::F32 || k.len() != n * n {
        return Ok(None);
    }
    // The constant's two axes of size n: one contracted (in the data, not in the output), one
    // kept (in the output, not in the data); every other axis has size 1.
    let (ins, outs) = e.axes.to_strs();
    let (cs, ds, os): (Vec<char>, &str, &str) = (ins[c].chars().collect(), &ins[1 - c], &outs[0]);
    if cs.len() != k.rank() {
        return Ok(None);
    }
    let (mut contracted, mut kept) = (None, None);
    for (pos, (&ch, &dim)) in cs.iter().zip(k.shape()).enumerate() {
        match (dim, ds.contains(ch), os.contains(ch)) {
            (1, _, _) => {}
            (d, true, false) if d == n && contracted.is_none() => contracted = Some(pos),
            (d, false, true) if d == n && kept.is_none() => kept = Some(pos),
            _ => return Ok(None),
        }
    }
    let (Some(pin), Some(pout)) = (contracted, kept) else {
        return Ok(None);
    };
    let data = k.try_as_plain_ram()?.as_slice::<f32>()?;
    // Stored (in, out) when the contracted axis comes first.
    let stored_in_major = pin < pout;
    Ok(Some(if stored_in_major != out_major {
        data.to_vec()
    } else {
        (0..n * n).map(|i| data[(i % n) * n + i / n]).collect()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_kernel_is_the_portable_one_bit_for_bit() {
        let mut s = 0x1234_5678u32;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 20001) as f32 / 10000.0 - 1.0
        };
        let (a, nb) = (12, 128);
        let a_t: Vec<f32> = (0..a * a).map(|_| rnd()).collect();
        let b: Vec<f32> = (0..nb * nb).map(|_| rnd()).collect();
        let op = KronRotation::new(a_t, a, b, nb).unwrap();
        let pool = Arc::new(Pool::new(2));
        let op2 = op.clone().with_pool(Some(pool));
        for m in [1, 3, 17] {
            let x: Vec<f32> = (0..m * a * nb).map(|_| rnd()).collect();
            let (mut y1, mut y2, mut y3) = (
                vec![0f32; x.len()],
                vec![0f32; x.len()],
                vec![0f32; x.len()],
            );
            op.run_portable(&x, &mut y1);
            op.run(&x, &mut y2);
            op2.run(&x, &mut y3);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(&y1) == bits(&y2), "{m} rows: vector kernel differs");
            assert!(bits(&y1) == bits(&y3), "{m} rows: 2 threads differ");
        }
        assert!(KronRotation::new(vec![0.0; 9], 3, vec![0.0; 64 * 64], 64).is_none());
    }
}
