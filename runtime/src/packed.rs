//! quill's int8 kernel in the load cache: an NNEF form of [`Int8Linear`] and the file of
//! packed weights kept beside the cache's tar.
//!
//! Where quill's int8 kernels are installed, the cache keeps the graph *after* installing
//! them. Each `QuillInt8Linear` goes into the NNEF graph as
//! `quill_int8_linear(input, k, n, at, column_offsets)`: where its packed weights start in the
//! weights file, and its `128 · Σₖ W[k][j]` as a small tensor. The weights file is the load's
//! arena as it is, every packed weight in order (135 MB for the int8 teacher). A warm load
//! reads it straight into a new arena of huge pages ([`read_weights`], on a second thread
//! while tract reads the graph): the weights are never tract tensors, never packed again, and
//! never held twice (the cold load reads the ONNX weights, packs them and gives the originals
//! back page by page). tract's reader builds a [`PackedRef`] placeholder for each op;
//! [`install`] turns the placeholders into [`Int8Linear`]s over the arena's ranges.
//!
//! The int8 embedding table ([`Embedding`], `quill_embedding(ids, rows, cols, at)`) goes into
//! a third file, the tables file, which a warm load memory-maps instead of reading
//! ([`map_tables`]): only the rows a conversation uses become resident.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use tract_nnef::internal::*;

use crate::arena::{Arena, Weights};
use crate::embedding::{Embedding, Mapping, TABLE_ALIGN, Table};
use crate::kernels::Int8Linear;

/// The NNEF name of [`Int8Linear`].
const OP_NAME: &str = "quill_int8_linear";

/// The NNEF name of [`Embedding`].
const EMBEDDING: &str = "quill_embedding";

/// The NNEF registry of quill's ops (the load cache reads and writes graphs with it).
pub fn registry() -> Registry {
    let mut reg = Registry::new("quill")
        .with_doc("quill's int8 matrix kernel; its packed weights are in the load cache's")
        .with_doc("weights file, at byte `at`.");
    reg.register_dumper(dump);
    reg.register_primitive(
        OP_NAME,
        &[
            TypeName::Integer.tensor().named("input"),
            TypeName::Integer.named("k"),
            TypeName::Integer.named("n"),
            TypeName::Integer.named("at"),
            TypeName::Integer.tensor().named("column_offsets"),
        ],
        &[("output", TypeName::Integer.tensor())],
        load,
    );
    reg.register_dumper(dump_embedding);
    reg.register_primitive(
        EMBEDDING,
        &[
            TypeName::Integer.tensor().named("ids"),
            TypeName::Integer.named("rows"),
            TypeName::Integer.named("cols"),
            TypeName::Integer.named("at"),
        ],
        &[("output", TypeName::Integer.tensor())],
        load_embedding,
    );
    crate::saved_binary::register(&mut reg);
    reg
}

fn dump_embedding(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &Embedding,
) -> TractResult<Option<Arc<RValue>>> {
    let ids = ast.mapping[&node.inputs[0]].clone();
    let (rows, cols) = op.dims();
    Ok(Some(invocation(
        EMBEDDING,
        &[ids],
        &[
            ("rows", numeric(rows)),
            ("cols", numeric(cols)),
            ("at", numeric(op.at())),
        ],
    )))
}

fn load_embedding(
    builder: &mut ModelBuilder,
    invocation: &ResolvedInvocation,
) -> TractResult<Value> {
    let ids = invocation.named_arg_as(builder, "ids")?;
    let rows: usize = invocation.named_arg_as(builder, "rows")?;
    let cols: usize = invocation.named_arg_as(builder, "cols")?;
    let at: usize = invocation.named_arg_as(builder, "at")?;
    builder.wire(TableRef { rows, cols, at }, &[ids])
}

/// An [`Embedding`] read from the cache's graph, before its table is mapped ([`install`]);
/// it cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRef {
    rows: usize,
    cols: usize,
    /// Where its `rows · cols` bytes start in the tables file.
    at: usize,
}

impl Op for TableRef {
    fn name(&self) -> StaticName {
        "QuillTableRef".into()
    }

    op_as_typed_op!();
}

impl EvalOp for TableRef {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, _inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        bail!("quill's embedding was read from the load cache but its table was never mapped")
    }
}

impl TypedOp for TableRef {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.to_tvec();
        shape.push(self.cols.into());
        Ok(tvec!(i8::fact(&shape)))
    }

    as_op!();
}

fn dump(ast: &mut IntoAst, node: &TypedNode, op: &Int8Linear) -> TractResult<Option<Arc<RValue>>> {
    let input = ast.mapping[&node.inputs[0]].clone();
    let (k, n) = op.dims();
    let offsets = ast.konst_variable(
        format!("{}.column_offsets", node.name),
        &rctensor1(op.column_offsets()),
    )?;
    Ok(Some(invocation(
        OP_NAME,
        &[input],
        &[
            ("k", numeric(k)),
            ("n", numeric(n)),
            ("at", numeric(op.packed().start())),
            ("column_offsets", offsets.as_ref().clone()),
        ],
    )))
}

fn load(builder: &mut ModelBuilder, invocation: &ResolvedInvocation) -> TractResult<Value> {
    let input = invocation.named_arg_as(builder, "input")?;
    let k: usize = invocation.named_arg_as(builder, "k")?;
    let n: usize = invocation.named_arg_as(builder, "n")?;
    let at: usize = invocation.named_arg_as(builder, "at")?;
    let column_offsets: Arc<Tensor> = invocation.named_arg_as(builder, "column_offsets")?;
    ensure!(
        column_offsets.datum_type() == i32::datum_type() && column_offsets.shape() == [n],
        "{OP_NAME}: column_offsets is {:?}, expected i32 [{n}]",
        column_offsets
    );
    builder.wire(
        PackedRef {
            k,
            n,
            at,
            column_offsets,
        },
        &[input],
    )
}

/// An [`Int8Linear`] read from the cache's graph, before its weights are attached
/// ([`install`]); it cannot run.
#[derive(Debug, Clone)]
pub struct PackedRef {
    k: usize,
    n: usize,
    /// Where its `k · n` packed bytes start in the weights file.
    at: usize,
    /// `(n) i32`
    column_offsets: Arc<Tensor>,
}

impl PartialEq for PackedRef {
    fn eq(&self, other: &Self) -> bool {
        (self.k, self.n, self.at) == (other.k, other.n, other.at)
    }
}
impl Eq for PackedRef {}

impl Op for PackedRef {
    fn name(&self) -> StaticName {
        "QuillPackedRef".into()
    }

    op_as_typed_op!();
}

impl EvalOp for PackedRef {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, _inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        bail!("quill's int8 op was read from the load cache but its weights were never attached")
    }
}

impl TypedOp for PackedRef {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.to_tvec();
        let last = shape.last_mut().context("a rank-0 input")?;
        ensure!(
            *last == self.k.to_dim(),
            "input width {last} for k={}",
            self.k
        );
        *last = self.n.into();
        Ok(tvec!(i32::fact(&shape)))
    }

    as_op!();
}

/// Replaces every [`PackedRef`] of `model` by an [`Int8Linear`] over its range of `weights`
/// (the whole weights file, [`read_weights`]), and every [`TableRef`] by an [`Embedding`] over
/// its range of `tables` (the mapped tables file, [`map_tables`]); returns how many of the
/// first. The packed ranges must not overlap and must end with the weights file.
pub fn install(
    model: &mut TypedModel,
    weights: Option<Weights>,
    tables: Option<Arc<Mapping>>,
) -> TractResult<usize> {
    for id in 0..model.nodes().len() {
        let Some(r) = model.node(id).op_as::<TableRef>().cloned() else {
            continue;
        };
        let map = tables
            .clone()
            .context("the cached graph has an embedding but there is no tables file")?;
        let len = r
            .rows
            .checked_mul(r.cols)
            .context("an embedding of impossible size")?;
        ensure!(
            r.at.checked_add(len)
                .is_some_and(|end| end <= map.bytes().len()),
            "an embedding table at byte {} runs past the tables file ({} bytes)",
            r.at,
            map.bytes().len()
        );
        let table = Table::Mapped {
            map,
            offset: r.at,
            len,
        };
        let op = Embedding::new(r.rows, r.cols, table, r.at).context("an empty embedding")?;
        model.node_mut(id).op = Box::new(op);
    }
    install_packed(model, weights)
}

fn install_packed(model: &mut TypedModel, weights: Option<Weights>) -> TractResult<usize> {
    let mut refs: Vec<(usize, usize)> = model
        .nodes()
        .iter()
        .filter_map(|node| node.op_as::<PackedRef>().map(|r| (r.at, node.id)))
        .collect();
    refs.sort_unstable();
    let Some(mut rest) = weights else {
        ensure!(
            refs.is_empty(),
            "the cached graph has {} packed int8 ops but there is no weights file",
            refs.len()
        );
        return Ok(0);
    };
    let mut at = 0;
    for &(_, id) in &refs {
        let r = model
            .node(id)
            .op_as::<PackedRef>()
            .expect("collected above")
            .clone();
        ensure!(
            r.at >= at,
            "packed weights at byte {}, expected {at} or after (the ranges overlap)",
            r.at
        );
        let len =
            r.k.checked_mul(r.n)
                .context("packed weights of impossible size")?;
        let past_the_end = || format!("packed weights at byte {} run past the weights file", r.at);
        // A gap (zeros in the file) is skipped.
        let (_, tail) = rest.split_at(r.at - at).with_context(past_the_end)?;
        let (packed, tail) = tail.split_at(len).with_context(past_the_end)?;
        rest = tail;
        at = r.at + len;
        let offsets = r
            .column_offsets
            .try_as_plain_ram()?
            .as_slice::<i32>()?
            .to_vec();
        let op = Int8Linear::from_packed(r.k, r.n, packed, offsets)
            .with_context(|| format!("no int8 kernel for k={} n={}", r.k, r.n))?;
        model.node_mut(id).op = Box::new(op);
    }
    ensure!(
        rest.is_empty(),
        "the weights file has {} bytes after the last op's",
        rest.len()
    );
    Ok(refs.len())
}

/// Writes the packed weights of every [`Int8Linear`] of `model` to `w` at their offsets in the
/// arena (zeros where a range is no longer used): the weights file. Returns the bytes written
/// (0: the model has none).
pub fn write_weights(model: &TypedModel, w: &mut impl Write) -> anyhow::Result<usize> {
    let mut ops: Vec<&Int8Linear> = model
        .nodes()
        .iter()
        .filter_map(|node| node.op_as::<Int8Linear>())
        .collect();
    ops.sort_unstable_by_key(|op| op.packed().start());
    let mut at = 0;
    for op in ops {
        let packed = op.packed();
        anyhow::ensure!(
            packed.start() >= at,
            "packed weights at byte {} of the arena overlap the previous ones (up to {at})",
            packed.start()
        );
        w.write_all(&vec![0u8; packed.start() - at])?;
        // SAFETY: i8 and u8 have the same size, alignment and valid bit patterns.
        let bytes =
            unsafe { std::slice::from_raw_parts(packed.as_ptr().cast::<u8>(), packed.len()) };
        w.write_all(bytes)?;
        at = packed.start() + packed.len();
    }
    Ok(at)
}

/// Writes the table of every [`Embedding`] of `model` to `w` at its `at`, zeros between: the
/// tables file. Returns the bytes written (0: the model has none).
pub fn write_tables(model: &TypedModel, w: &mut impl Write) -> anyhow::Result<usize> {
    let mut ops: Vec<&Embedding> = model
        .nodes()
        .iter()
        .filter_map(|node| node.op_as::<Embedding>())
        .collect();
    ops.sort_unstable_by_key(|op| op.at());
    let mut at = 0;
    for op in ops {
        anyhow::ensure!(
            op.at() >= at && op.at().is_multiple_of(TABLE_ALIGN),
            "an embedding table at byte {}, expected {at} or after, page-aligned",
            op.at()
        );
        w.write_all(&vec![0u8; op.at() - at])?;
        let table = op.table();
        // SAFETY: i8 and u8 have the same size, alignment and valid bit patterns.
        let bytes = unsafe { std::slice::from_raw_parts(table.as_ptr().cast::<u8>(), table.len()) };
        w.write_all(bytes)?;
        at = op.at() + table.len();
    }
    Ok(at)
}

/// The tables file at `path`, memory-mapped after its bytes are checked (read through a small
/// buffer: from the page cache, without making the mapping resident); `None` if the file has
/// another size or its CRC-32 is not `crc`.
pub fn map_tables(path: &Path, len: usize, crc: u32) -> anyhow::Result<Option<Arc<Mapping>>> {
    let Some(mut file) = open(path)? else {
        return Ok(None);
    };
    if file.metadata()?.len() != len as u64 {
        return Ok(None);
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        file.read_exact(&mut buf[..n])
            .with_context(|| format!("reading {}", path.display()))?;
        hasher.update(&buf[..n]);
        left -= n;
    }
    if hasher.finalize() != crc {
        return Ok(None);
    }
    let map = Mapping::new(&file, len).with_context(|| format!("mapping {}", path.display()))?;
    Ok(Some(Arc::new(map)))
}

/// `path` opened for reading; `None` if it is not there (another process may have replaced the
/// entry since its key was read).
fn open(path: &Path) -> anyhow::Result<Option<std::fs::File>> {
    match std::fs::File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::Error::new(e).context(format!("opening {}", path.display()))),
    }
}

/// The weights file at `path` in a new arena (huge pages where Linux gives them), as one range
/// of `len` bytes; `None` if the file has another size or its CRC-32 is not `crc`.
pub fn read_weights(path: &Path, len: usize, crc: u32) -> anyhow::Result<Option<Weights>> {
    let Some(mut file) = open(path)? else {
        return Ok(None);
    };
    if file.metadata()?.len() != len as u64 {
        return Ok(None);
    }
    let arena = Arc::new(Arena::new(len).context("mapping memory for the packed weights")?);
    let mut weights = arena.take(len).expect("the arena is this size");
    let mut hasher = crc32fast::Hasher::new();
    // 8 MB at a time: the CRC runs on bytes still in the cache.
    for chunk in weights.as_bytes_mut().chunks_mut(8 << 20) {
        file.read_exact(chunk)
            .with_context(|| format!("reading {}", path.display()))?;
        hasher.update(chunk);
    }
    Ok((hasher.finalize() == crc).then_some(weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_weights_file_is_read_back_only_with_its_size_and_crc() {
        let path = std::env::temp_dir().join(format!("quill-packed-{}", std::process::id()));
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 256) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let crc = crc32fast::hash(&bytes);
        let read = read_weights(&path, bytes.len(), crc).unwrap().unwrap();
        assert_eq!(read.len(), bytes.len());
        assert!(read.iter().zip(&bytes).all(|(&a, &b)| a as u8 == b));
        assert!(read_weights(&path, bytes.len(), crc ^ 1).unwrap().is_none());
        assert!(read_weights(&path, bytes.len() + 1, crc).unwrap().is_none());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn placeholders_must_not_overlap_nor_leave_bytes_over() {
        let k = 8;
        let n = 32;
        let mut model = TypedModel::default();
        let x = model.add_source("x", i8::fact([1, k])).unwrap();
        let placeholder = |at| PackedRef {
            k,
            n,
            at,
            column_offsets: rctensor1(&[0i32; 32]),
        };
        let a = model.wire_node("a", placeholder(0), &[x]).unwrap()[0];
        // Starts one byte early: the ranges overlap.
        let b = model.wire_node("b", placeholder(k * n - 1), &[x]).unwrap()[0];
        model.select_output_outlets(&[a, b]).unwrap();
        let file = |len| Weights::alone(len).unwrap();
        let err = install(&mut model.clone(), Some(file(2 * k * n - 1)), None).unwrap_err();
        assert!(format!("{err}").contains("overlap"), "{err}");
        assert!(install(&mut model.clone(), None, None).is_err());

        // A gap (a range no longer used when the file was written) is skipped.
        let mut model = TypedModel::default();
        let x = model.add_source("x", i8::fact([1, k])).unwrap();
        let a = model.wire_node("a", placeholder(0), &[x]).unwrap()[0];
        let b = model.wire_node("b", placeholder(2 * k * n), &[x]).unwrap()[0];
        model.select_output_outlets(&[a, b]).unwrap();
        assert!(install(&mut model.clone(), Some(file(3 * k * n - 1)), None).is_err());
        assert_eq!(install(&mut model, Some(file(3 * k * n)), None).unwrap(), 2);
        let b_op = model.node(b.node).op_as::<Int8Linear>().unwrap();
        assert_eq!(b_op.packed().start(), 2 * k * n);

        let mut model = TypedModel::default();
        let x = model.add_source("x", i8::fact([1, k])).unwrap();
        let a = model.wire_node("a", placeholder(0), &[x]).unwrap()[0];
        model.select_output_outlets(&[a]).unwrap();
        // A file longer than its ops.
        assert!(install(&mut model.clone(), Some(file(k * n + 64)), None).is_err());
        assert_eq!(install(&mut model, Some(file(k * n)), None).unwrap(), 1);
        assert!(model.node(a.node).op_is::<Int8Linear>());
    }
}
