//! The embedding lookup as quill's op, so that its table can stay in a file.
//!
//! An int8 bundle's embedding is a `Gather` of token rows from a constant `(vocab, d)` int8
//! table: 28 MB for the teacher, of which a prompt reads a few hundred rows. tract holds the
//! table in memory. [`Embedding`] does the same lookup from a [`Table`] that is either that
//! tensor (a load from the ONNX graph) or a read-only memory map of the load cache's tables
//! file (`packed.rs`), whose pages the system reads as rows are looked up and can drop again:
//! a warm load's resident memory no longer counts the table (int8 teacher: 28 of about
//! 210 MB). Same rows, bit for bit; a token id outside the table is an error, not a panic.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::Gather;
use tract_onnx::tract_core::ops::konst::Const;

/// Where tables start in the tables file: page-aligned, so each can be mapped on its own.
pub const TABLE_ALIGN: usize = 4096;

/// The bytes of an embedding table, `(rows, cols)` int8 row-major.
#[derive(Debug)]
pub enum Table {
    /// The graph's constant.
    Tensor(Arc<Tensor>),
    /// `len` bytes at `offset` of a mapped file.
    Mapped {
        map: Arc<Mapping>,
        offset: usize,
        len: usize,
    },
}

impl Table {
    pub fn bytes(&self) -> &[i8] {
        match self {
            Table::Tensor(t) => t
                .try_as_plain_ram()
                .ok()
                .and_then(|t| t.as_slice::<i8>().ok())
                .unwrap_or(&[]),
            Table::Mapped { map, offset, len } => {
                map.bytes().get(*offset..offset + len).unwrap_or(&[])
            }
        }
    }
}

/// A read-only private memory map of a whole file (a plain read into memory where there is
/// no `mmap`).
#[derive(Debug)]
pub struct Mapping {
    ptr: *const i8,
    len: usize,
    #[cfg(not(unix))]
    vec: Vec<i8>,
}

// SAFETY: the mapping is read-only and lives as long as the value; nothing writes through it.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` (its whole length, checked by the caller).
    pub fn new(file: &std::fs::File, len: usize) -> std::io::Result<Mapping> {
        if len == 0 {
            return Ok(Mapping {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len: 0,
                #[cfg(not(unix))]
                vec: Vec::new(),
            });
        }
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: a read-only private mapping of an open file; the result is checked. The
            // load cache replaces files by renaming new ones over them, never by writing into
            // them, so the mapped bytes do not change.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE,
                    file.as_raw_fd(),
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            Ok(Mapping {
                ptr: ptr as *const i8,
                len,
            })
        }
        #[cfg(not(unix))]
        {
            use std::io::{Read, Seek};
            let mut bytes = vec![0u8; len];
            let mut file = file;
            file.seek(std::io::SeekFrom::Start(0))?;
            file.read_exact(&mut bytes)?;
            let vec: Vec<i8> = bytes.into_iter().map(|b| b as i8).collect();
            Ok(Mapping {
                ptr: vec.as_ptr(),
                len,
                vec,
            })
        }
    }

    pub fn bytes(&self) -> &[i8] {
        // SAFETY: `len` readable bytes at `ptr` for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        #[cfg(unix)]
        if self.len > 0 {
            // SAFETY: the mapping made in `new`, unmapped once.
            unsafe {
                libc::munmap(self.ptr as *mut libc::c_void, self.len);
            }
        }
    }
}

/// `out (…ids, cols) i8 = table[ids]`, negative ids counted from the end (as ONNX `Gather`).
#[derive(Debug, Clone)]
pub struct Embedding {
    rows: usize,
    cols: usize,
    table: Arc<Table>,
    /// Where the table goes in the load cache's tables file.
    at: usize,
}

impl PartialEq for Embedding {
    fn eq(&self, other: &Self) -> bool {
        (self.rows, self.cols, self.at) == (other.rows, other.cols, other.at)
            && Arc::ptr_eq(&self.table, &other.table)
    }
}
impl Eq for Embedding {}

impl Embedding {
    /// `None` unless `table` holds `rows · cols` bytes.
    pub fn new(rows: usize, cols: usize, table: Table, at: usize) -> Option<Embedding> {
        (rows > 0 && cols > 0 && table.bytes().len() == rows * cols).then(|| Embedding {
            rows,
            cols,
            table: Arc::new(table),
            at,
        })
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn table(&self) -> &[i8] {
        self.table.bytes()
    }

    /// Where the table goes in the tables file.
    pub fn at(&self) -> usize {
        self.at
    }

    fn lookup(&self, ids: &[i64], out: &mut [i8]) -> TractResult<()> {
        let table = self.table();
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(self.cols)) {
            let r = if id < 0 { id + self.rows as i64 } else { id };
            ensure!(
                (0..self.rows as i64).contains(&r),
                "token id {id} is outside the embedding's {} rows",
                self.rows
            );
            row.copy_from_slice(&table[r as usize * self.cols..][..self.cols]);
        }
        Ok(())
    }
}

impl Op for Embedding {
    fn name(&self) -> StaticName {
        "QuillEmbedding".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let kind = match &*self.table {
            Table::Tensor(_) => "in memory",
            Table::Mapped { .. } => "mapped",
        };
        Ok(vec![format!("{}×{} int8, {kind}", self.rows, self.cols)])
    }

    op_as_typed_op!();
}

impl EvalOp for Embedding {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let ids = args_1!(inputs);
        let ids = ids.cast_to::<i64>()?;
        let mut shape: TVec<usize> = ids.shape().into();
        shape.push(self.cols);
        let mut out = Tensor::zero::<i8>(&shape)?;
        self.lookup(
            ids.try_as_plain_ram()?.as_slice::<i64>()?,
            out.try_as_plain_ram_mut()?.as_slice_mut::<i8>()?,
        )?;
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Embedding {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.to_tvec();
        shape.push(self.cols.into());
        Ok(tvec!(i8::fact(&shape)))
    }

    as_op!();
}

/// Replaces every `Gather` along axis 0 of a constant 2-D int8 table by an [`Embedding`] over
/// the same tensor (no copy), the tables laid out in the tables file from byte 0; returns how
/// many.
pub fn use_embedding(model: &mut TypedModel) -> TractResult<usize> {
    let mut at = 0;
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(gather) = node.op_as::<Gather>() else {
            continue;
        };
        if gather.axis != 0 || gather.output_type.is_some() || node.inputs.len() != 2 {
            continue;
        }
        let Some(konst) = model.node(node.inputs[0].node).op_as::<Const>() else {
            continue;
        };
        let table = konst.val().clone();
        let [rows, cols] = *table.shape() else {
            continue;
        };
        if table.datum_type() != i8::datum_type() || !table.is_plain() {
            continue;
        }
        let Some(op) = Embedding::new(rows, cols, Table::Tensor(table), at) else {
            continue;
        };
        at = (at + rows * cols).next_multiple_of(TABLE_ALIGN);
        let (name, ids) = (node.name.clone(), node.inputs[1]);
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, ids)?;
        let y = patch.wire_node(name, op, &[x])?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), y)?;
        patch.apply(model)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_looked_up_and_bad_ids_refused() {
        let table: Vec<i8> = (0..12).collect();
        let t = Arc::new(tensor1(&table).into_shape(&[4, 3]).unwrap());
        let e = Embedding::new(4, 3, Table::Tensor(t), 0).unwrap();
        let mut out = [0i8; 6];
        e.lookup(&[2, -1], &mut out).unwrap();
        assert_eq!(out, [6, 7, 8, 9, 10, 11]);
        let err = e.lookup(&[4], &mut out[..3]).unwrap_err();
        assert!(format!("{err}").contains("token id 4"), "{err}");
        assert!(e.lookup(&[-5], &mut out[..3]).is_err());
    }
}
