//! Checks a bundle's ONNX graph before tract sees it: every tensor's declared shape and type
//! must match the bytes that hold it, external data must lie inside the bundle's weights file,
//! and float weights must be finite.
//!
//! Why here and not in tract: a graph whose tensor claims `[1 << 40]` floats, or points past the
//! end of its data file, would make a loader allocate what the file cannot justify; a NaN in a
//! norm weight loads fine and prints garbage. These checks cost one pass over the float tensors
//! (the int8 teacher: 0.5 MB of scales and norms; the f32 teacher: all 540 MB, about 0.1 s from
//! the page cache) and none over the int8 weights, which cannot be non-finite.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tract_onnx::pb::{ModelProto, TensorProto, tensor_proto::DataType};

use crate::bundle::WEIGHTS_FILE;

/// Why a graph was refused; `tensor` names the offending initializer.
#[derive(Debug)]
pub struct GraphFault {
    /// The file at fault: the graph itself or its weights file.
    pub file: &'static str,
    pub reason: String,
}

/// Checks every tensor of `model` (initializers and constant attributes, in subgraphs too)
/// against the weights file in `dir`.
pub fn check(model: &ModelProto, dir: &Path) -> Result<(), GraphFault> {
    let graph = model.graph.as_ref().ok_or_else(|| GraphFault {
        file: crate::bundle::GRAPH_FILE,
        reason: "the protobuf holds no graph".into(),
    })?;
    let data_path = dir.join(WEIGHTS_FILE);
    let data = File::open(&data_path).ok();
    let data_len = data
        .as_ref()
        .and_then(|f| f.metadata().ok())
        .map_or(0, |m| m.len());
    let mut checker = Checker {
        data,
        data_len,
        buf: Vec::new(),
    };
    let mut stack = vec![graph];
    while let Some(g) = stack.pop() {
        for t in &g.initializer {
            checker.tensor(t)?;
        }
        for node in &g.node {
            for a in &node.attribute {
                if let Some(t) = &a.t {
                    checker.tensor(t)?;
                }
                for t in &a.tensors {
                    checker.tensor(t)?;
                }
                stack.extend(a.g.as_ref());
                stack.extend(a.graphs.iter());
            }
        }
    }
    Ok(())
}

struct Checker {
    data: Option<File>,
    data_len: u64,
    /// Reused for every float tensor read from the weights file.
    buf: Vec<u8>,
}

fn graph_fault(reason: String) -> GraphFault {
    GraphFault {
        file: crate::bundle::GRAPH_FILE,
        reason,
    }
}

impl Checker {
    fn tensor(&mut self, t: &TensorProto) -> Result<(), GraphFault> {
        let name = &t.name;
        let elem = elem_bytes(t.data_type).ok_or_else(|| {
            graph_fault(format!(
                "tensor {name:?} has data type {}, which quill's graphs never use",
                t.data_type
            ))
        })?;
        let mut count: u64 = 1;
        for &d in &t.dims {
            let d = u64::try_from(d).map_err(|_| {
                graph_fault(format!("tensor {name:?} has a negative dimension {d}"))
            })?;
            count = count.checked_mul(d).ok_or_else(|| {
                graph_fault(format!("tensor {name:?} has shape {:?}: too large", t.dims))
            })?;
        }
        let bytes = count.checked_mul(elem).ok_or_else(|| {
            graph_fault(format!("tensor {name:?} has shape {:?}: too large", t.dims))
        })?;
        let external = t.data_location == Some(1);
        if external {
            let field = |key: &str| {
                t.external_data
                    .iter()
                    .find(|e| e.key == key)
                    .map(|e| e.value.as_str())
            };
            let location = field("location").unwrap_or("");
            if location != WEIGHTS_FILE {
                return Err(graph_fault(format!(
                    "tensor {name:?} reads its data from {location:?}; a bundle keeps all of \
                     them in {WEIGHTS_FILE} beside the graph"
                )));
            }
            let number = |key: &str| -> Result<u64, GraphFault> {
                match field(key) {
                    None => Ok(0),
                    Some(v) => v.parse().map_err(|_| {
                        graph_fault(format!("tensor {name:?} has external {key} {v:?}"))
                    }),
                }
            };
            let offset = number("offset")?;
            let length = match field("length") {
                None => bytes,
                Some(_) => number("length")?,
            };
            if length != bytes {
                return Err(graph_fault(format!(
                    "tensor {name:?} has shape {:?} ({bytes} bytes) but {length} bytes of data",
                    t.dims
                )));
            }
            let end = offset.saturating_add(length);
            if end > self.data_len {
                return Err(GraphFault {
                    file: WEIGHTS_FILE,
                    reason: format!(
                        "tensor {name:?} lies at bytes {offset}..{end} but the file has {}: it \
                         is truncated or belongs to another graph; re-export the bundle",
                        self.data_len
                    ),
                });
            }
            if is_float(t.data_type) {
                self.read_external(offset, length, name)?;
                let buf = std::mem::take(&mut self.buf);
                let r = check_finite(t.data_type, &buf, name);
                self.buf = buf;
                r?;
            }
            return Ok(());
        }
        // Inline data: raw bytes, or one of the typed repeated fields.
        let inline = if !t.raw_data.is_empty() {
            t.raw_data.len() as u64
        } else {
            // Each entry of a typed field is one element, whatever its storage width.
            elem * (t.float_data.len()
                + t.int32_data.len()
                + t.int64_data.len()
                + t.double_data.len()
                + t.uint64_data.len()) as u64
        };
        if inline != bytes {
            return Err(graph_fault(format!(
                "tensor {name:?} has shape {:?} ({bytes} bytes) but holds {inline} bytes",
                t.dims
            )));
        }
        if !t.raw_data.is_empty() {
            check_finite(t.data_type, &t.raw_data, name)?;
        } else if t
            .float_data
            .iter()
            .any(|x| x.is_nan() || (x.is_infinite() && !may_hold_infinity(name)))
        {
            return Err(non_finite(name));
        }
        Ok(())
    }

    fn read_external(&mut self, offset: u64, length: u64, name: &str) -> Result<(), GraphFault> {
        let io = |e: std::io::Error| GraphFault {
            file: WEIGHTS_FILE,
            reason: format!("reading tensor {name:?}: {e}"),
        };
        let file = self.data.as_ref().ok_or_else(|| GraphFault {
            file: WEIGHTS_FILE,
            reason: "the file cannot be opened".into(),
        })?;
        // `length` was checked against the file's size above, so this allocation is justified.
        self.buf.resize(length as usize, 0);
        file.read_exact_at(&mut self.buf, offset).map_err(io)
    }
}

fn is_float(data_type: i32) -> bool {
    data_type == DataType::Float as i32 || data_type == DataType::Float16 as i32
}

fn non_finite(name: &str) -> GraphFault {
    GraphFault {
        file: WEIGHTS_FILE,
        reason: format!(
            "tensor {name:?} holds NaN or infinite values: the weights are damaged; re-export \
             the bundle"
        ),
    }
}

/// Anonymous constants (the exporter names them `c<N>`) may hold infinities: the causal mask
/// is `-inf` above the diagonal. Named tensors are weights and must be finite. NaN is refused
/// everywhere.
fn may_hold_infinity(name: &str) -> bool {
    name.strip_prefix('c')
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Little-endian f32 or f16 bytes must all be numbers, and finite unless [`may_hold_infinity`].
fn check_finite(data_type: i32, bytes: &[u8], name: &str) -> Result<(), GraphFault> {
    let inf_ok = may_hold_infinity(name);
    let ok = if data_type == DataType::Float as i32 {
        bytes.as_chunks::<4>().0.iter().all(|&c| {
            let x = f32::from_le_bytes(c);
            x.is_finite() || (inf_ok && x.is_infinite())
        })
    } else if data_type == DataType::Float16 as i32 {
        // An f16's five exponent bits are all ones for infinities (zero mantissa) and NaN.
        bytes.as_chunks::<2>().0.iter().all(|&c| {
            let h = u16::from_le_bytes(c);
            h & 0x7c00 != 0x7c00 || (inf_ok && h & 0x03ff == 0)
        })
    } else {
        true
    };
    if ok { Ok(()) } else { Err(non_finite(name)) }
}

/// Bytes per element of the ONNX data types a quill graph may hold.
fn elem_bytes(data_type: i32) -> Option<u64> {
    Some(match DataType::try_from(data_type).ok()? {
        DataType::Float | DataType::Int32 | DataType::Uint32 => 4,
        DataType::Int64 | DataType::Uint64 | DataType::Double => 8,
        DataType::Float16 | DataType::Int16 | DataType::Uint16 | DataType::Bfloat16 => 2,
        DataType::Int8 | DataType::Uint8 | DataType::Bool => 1,
        _ => return None,
    })
}
