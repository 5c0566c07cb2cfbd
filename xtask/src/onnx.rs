//! A small builder for ONNX graphs on top of tract-onnx's own protobuf types.
//!
//! Names are generated (`n0`, `n1`, …) except where the caller gives one, which is how graph
//! inputs, outputs and initializers get their public names.

use tract_onnx::pb;

/// ONNX operator set the exported graphs target: 23 is the first with the standard `Attention`
/// operator, which tract maps to its fused attention (and in-place KV cache).
pub const OPSET: i64 = 23;
/// IR version matching opset 23 (ONNX 1.18).
pub const IR_VERSION: i64 = 11;

/// A dimension of a graph input or output.
#[derive(Debug, Clone)]
pub enum Dim {
    Fixed(i64),
    Named(&'static str),
}

#[derive(Debug, Clone, Copy)]
pub enum Elem {
    F32,
    F16,
    I8,
    I32,
    I64,
}

impl Elem {
    /// The ONNX `TensorProto.DataType` code (also the `to` attribute of `Cast`).
    pub fn code(self) -> i32 {
        use pb::tensor_proto::DataType as T;
        (match self {
            Elem::F32 => T::Float,
            Elem::F16 => T::Float16,
            Elem::I8 => T::Int8,
            Elem::I32 => T::Int32,
            Elem::I64 => T::Int64,
        }) as i32
    }
}

/// An attribute value.
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

/// Initializers at least this big go to the external data file (when there is one).
const EXTERNAL_MIN_BYTES: usize = 1024;
/// Alignment of each tensor in the external data file.
const EXTERNAL_ALIGN: usize = 64;

#[derive(Default)]
pub struct GraphBuilder {
    graph: pb::GraphProto,
    counter: usize,
    /// ONNX external data: (file name, relative to the graph; its bytes).
    external: Option<(String, Vec<u8>)>,
}

fn value_info(name: &str, elem: Elem, dims: Option<&[Dim]>) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value as DV};
    let shape = dims.map(|dims| pb::TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| Dimension {
                value: Some(match d {
                    Dim::Fixed(n) => DV::DimValue(*n),
                    Dim::Named(s) => DV::DimParam(s.to_string()),
                }),
                ..Default::default()
            })
            .collect(),
    });
    pb::ValueInfoProto {
        name: name.to_string(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem.code(),
                shape,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl GraphBuilder {
    pub fn new(name: &str) -> GraphBuilder {
        GraphBuilder {
            graph: pb::GraphProto {
                name: name.to_string(),
                ..Default::default()
            },
            counter: 0,
            external: None,
        }
    }

    /// Stores large initializers in `file` (ONNX external data) instead of inside the graph:
    /// the graph stays small, and a reader never holds the protobuf and the weights at once.
    pub fn with_external_data(mut self, file: &str) -> GraphBuilder {
        self.external = Some((file.to_string(), Vec::new()));
        self
    }

    /// The external data file's name and bytes, if any (taken out of the builder).
    pub fn take_external_data(&mut self) -> Option<(String, Vec<u8>)> {
        self.external.take()
    }

    pub fn input(&mut self, name: &str, elem: Elem, dims: &[Dim]) -> String {
        self.graph.input.push(value_info(name, elem, Some(dims)));
        name.to_string()
    }

    /// Declares `value` (produced by some node) as a graph output; its shape is left to inference.
    pub fn output(&mut self, value: &str, elem: Elem) {
        self.graph.output.push(value_info(value, elem, None));
    }

    fn fresh(&mut self) -> String {
        self.counter += 1;
        format!("n{}", self.counter)
    }

    pub fn init_f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        assert_eq!(
            dims.iter().product::<usize>(),
            data.len(),
            "initializer {name}"
        );
        let mut raw = Vec::with_capacity(data.len() * 4);
        for x in data {
            raw.extend_from_slice(&x.to_le_bytes());
        }
        self.push_init(name, dims, Elem::F32, raw)
    }

    pub fn init_f16(&mut self, name: &str, dims: &[usize], data: &[half::f16]) -> String {
        assert_eq!(
            dims.iter().product::<usize>(),
            data.len(),
            "initializer {name}"
        );
        let raw = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.push_init(name, dims, Elem::F16, raw)
    }

    pub fn init_i8(&mut self, name: &str, dims: &[usize], data: &[i8]) -> String {
        assert_eq!(
            dims.iter().product::<usize>(),
            data.len(),
            "initializer {name}"
        );
        let raw = data.iter().map(|&x| x as u8).collect();
        self.push_init(name, dims, Elem::I8, raw)
    }

    pub fn init_i64(&mut self, name: &str, dims: &[usize], data: &[i64]) -> String {
        let mut raw = Vec::with_capacity(data.len() * 8);
        for x in data {
            raw.extend_from_slice(&x.to_le_bytes());
        }
        self.push_init(name, dims, Elem::I64, raw)
    }

    fn push_init(&mut self, name: &str, dims: &[usize], elem: Elem, raw: Vec<u8>) -> String {
        let mut t = pb::TensorProto {
            name: name.to_string(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: elem.code(),
            ..Default::default()
        };
        match &mut self.external {
            Some((file, data)) if raw.len() >= EXTERNAL_MIN_BYTES => {
                data.resize(data.len().next_multiple_of(EXTERNAL_ALIGN), 0);
                let entry = |key: &str, value: String| pb::StringStringEntryProto {
                    key: key.to_string(),
                    value,
                };
                t.external_data = vec![
                    entry("location", file.clone()),
                    entry("offset", data.len().to_string()),
                    entry("length", raw.len().to_string()),
                ];
                t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
                data.extend_from_slice(&raw);
            }
            _ => t.raw_data = raw,
        }
        self.graph.initializer.push(t);
        name.to_string()
    }

    /// An anonymous int64 constant (a 1-D tensor, or a scalar when `scalar`).
    pub fn ints(&mut self, values: &[i64]) -> String {
        let name = format!("c{}", self.graph.initializer.len());
        self.init_i64(&name, &[values.len()], values)
    }

    pub fn int_scalar(&mut self, value: i64) -> String {
        let name = format!("c{}", self.graph.initializer.len());
        self.init_i64(&name, &[], &[value])
    }

    pub fn float_scalar(&mut self, value: f32) -> String {
        let name = format!("c{}", self.graph.initializer.len());
        self.init_f32(&name, &[], &[value])
    }

    /// `Cast(x, to)`.
    pub fn cast(&mut self, x: &str, to: Elem) -> String {
        self.op("Cast", &[x], vec![("to", Attr::Int(to.code() as i64))])
    }

    /// Adds a node with one output and returns the output's name.
    pub fn op(&mut self, op_type: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.fresh();
        self.op_named(op_type, inputs, attrs, &out);
        out
    }

    /// Adds a node whose single output has the given name.
    pub fn op_named(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attrs: Vec<(&str, Attr)>,
        out: &str,
    ) {
        self.node(op_type, inputs, attrs, &[out]);
    }

    /// Adds a node with named outputs.
    pub fn node(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attrs: Vec<(&str, Attr)>,
        outputs: &[&str],
    ) {
        use pb::attribute_proto::AttributeType as T;
        let attribute = attrs
            .into_iter()
            .map(|(name, a)| {
                let mut p = pb::AttributeProto {
                    name: name.to_string(),
                    ..Default::default()
                };
                match a {
                    Attr::Int(i) => {
                        p.i = i;
                        p.r#type = T::Int as i32;
                    }
                    Attr::Ints(v) => {
                        p.ints = v;
                        p.r#type = T::Ints as i32;
                    }
                    Attr::Float(f) => {
                        p.f = f;
                        p.r#type = T::Float as i32;
                    }
                }
                p
            })
            .collect();
        let name = format!("{op_type}_{}", self.graph.node.len());
        self.graph.node.push(pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name,
            op_type: op_type.to_string(),
            attribute,
            ..Default::default()
        });
    }

    /// The model; call [`GraphBuilder::take_external_data`] first when using external data.
    pub fn into_model(self, producer: &str) -> pb::ModelProto {
        pb::ModelProto {
            ir_version: IR_VERSION,
            producer_name: producer.to_string(),
            producer_version: env!("CARGO_PKG_VERSION").to_string(),
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            graph: Some(self.graph),
            ..Default::default()
        }
    }
}
