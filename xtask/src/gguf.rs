//! A reader for GGUF checkpoints (llama.cpp's format), enough to export llama-family decoders.
//!
//! It parses the header, the metadata key/values and the tensor table, and dequantizes the tensor
//! types quill accepts as a source (F32, F16, BF16, Q8_0, Q4_0, Q4_1) to float32. Tensors keep
//! GGUF's row-major layout: a tensor listed with `ne = [576, 1536]` is 1536 rows of 576 values, i.e.
//! a PyTorch `nn.Linear` weight of shape `(out = 1536, in = 576)`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U64(v) => Some(*v),
            Value::I64(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F64(v) => Some(*v),
            Value::U64(v) => Some(*v as f64),
            Value::I64(v) => Some(*v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The tensor element types quill can dequantize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl TensorType {
    fn from_code(code: u32) -> Option<TensorType> {
        Some(match code {
            0 => TensorType::F32,
            1 => TensorType::F16,
            2 => TensorType::Q4_0,
            3 => TensorType::Q4_1,
            8 => TensorType::Q8_0,
            30 => TensorType::Bf16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block)
    fn block(self) -> (usize, usize) {
        match self {
            TensorType::F32 => (1, 4),
            TensorType::F16 | TensorType::Bf16 => (1, 2),
            TensorType::Q4_0 => (32, 18),
            TensorType::Q4_1 => (32, 20),
            TensorType::Q8_0 => (32, 34),
        }
    }
}

/// Where a tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `ne[0]` is the contiguous (innermost) dimension.
    pub ne: Vec<usize>,
    pub ty: TensorType,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.ne.iter().product()
    }
}

/// A GGUF file held in memory.
pub struct Gguf {
    pub path: PathBuf,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
    data: Vec<u8>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).context("length overflow")?;
        ensure!(
            end <= self.buf.len(),
            "unexpected end of file at byte {} (wanted {} more bytes, file has {})",
            self.pos,
            n,
            self.buf.len()
        );
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn len(&mut self) -> Result<usize> {
        let n = self.u64()?;
        // A length beyond the file cannot be honest; refuse before allocating for it.
        ensure!(
            n <= self.buf.len() as u64,
            "corrupt length {n} at byte {}",
            self.pos - 8
        );
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.len()?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(self.u8()? as u64),
            1 => Value::I64(self.u8()? as i8 as i64),
            2 => Value::U64(self.u16()? as u64),
            3 => Value::I64(self.u16()? as i16 as i64),
            4 => Value::U64(self.u32()? as u64),
            5 => Value::I64(self.u32()? as i32 as i64),
            6 => Value::F64(f32::from_bits(self.u32()?) as f64),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::Str(self.string()?),
            9 => {
                ensure!(depth < 4, "metadata arrays nested too deep");
                let item_ty = self.u32()?;
                let n = self.len()?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            other => bail!("unknown metadata value type {other}"),
        })
    }
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Gguf> {
        let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(path, data).with_context(|| format!("parsing GGUF file {}", path.display()))
    }

    /// Parses a GGUF file already in memory; `path` names it in errors.
    pub fn parse(path: &Path, data: Vec<u8>) -> Result<Gguf> {
        let mut c = Cursor { buf: &data, pos: 0 };
        let magic = c.take(4).context("file too short for a GGUF header")?;
        ensure!(
            magic == MAGIC,
            "not a GGUF file: magic is {magic:?}, expected \"GGUF\""
        );
        let version = c.u32()?;
        ensure!(
            (2..=3).contains(&version),
            "GGUF version {version} is not supported (2 or 3)"
        );
        let n_tensors = c.len()?;
        let n_kv = c.len()?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let value = c
                .value(ty, 0)
                .with_context(|| format!("metadata key {key}"))?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()? as usize;
            ensure!(n_dims <= 4, "tensor {name} has {n_dims} dimensions");
            let mut ne = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                ne.push(c.len()?);
            }
            let code = c.u32()?;
            let ty = TensorType::from_code(code).with_context(|| {
                format!(
                    "tensor {name} has GGUF type {code}; quill reads F32, F16, BF16, Q8_0, Q4_0 \
                     and Q4_1 (requantize the checkpoint with llama.cpp's llama-quantize)"
                )
            })?;
            let offset = c.u64()? as usize;
            infos.push((name, ne, ty, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_ALIGNMENT);
        // An alignment of 0 would divide by zero, a huge one overflow.
        ensure!(
            (1..=1 << 16).contains(&alignment),
            "general.alignment is {alignment}, expected 1 to 65536"
        );
        let alignment = alignment as usize;
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, ne, ty, offset) in infos {
            // Sizes come from the file: checked arithmetic, so that a corrupt dimension or
            // offset is an error rather than an overflow.
            let n = ne
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .with_context(|| format!("tensor {name}: dimensions {ne:?} overflow"))?;
            let (block_elems, block_bytes) = ty.block();
            ensure!(
                n.is_multiple_of(block_elems),
                "tensor {name}: {n} elements is not a whole number of {ty:?} blocks"
            );
            let n_bytes = (n / block_elems).checked_mul(block_bytes);
            let start = data_start.checked_add(offset);
            let end = n_bytes.zip(start).and_then(|(b, s)| s.checked_add(b));
            let (Some(n_bytes), Some(start), Some(end)) = (n_bytes, start, end) else {
                bail!("tensor {name}: offset {offset} or size of {n} elements overflows");
            };
            ensure!(
                end <= data.len(),
                "tensor {name} ends at byte {end} but the file has {} bytes: the file is truncated",
                data.len()
            );
            tensors.insert(
                name.clone(),
                TensorInfo {
                    name,
                    ne,
                    ty,
                    offset: start,
                    n_bytes,
                },
            );
        }
        Ok(Gguf {
            path: path.to_owned(),
            metadata,
            tensors,
            data,
        })
    }

    pub fn meta(&self, key: &str) -> Result<&Value> {
        self.metadata
            .get(key)
            .with_context(|| format!("{}: metadata key {key} is missing", self.path.display()))
    }

    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        self.meta(key)?
            .as_u64()
            .with_context(|| format!("metadata {key} is not an integer"))
    }

    pub fn meta_f64(&self, key: &str) -> Result<f64> {
        self.meta(key)?
            .as_f64()
            .with_context(|| format!("metadata {key} is not a number"))
    }

    pub fn meta_str(&self, key: &str) -> Result<&str> {
        self.meta(key)?
            .as_str()
            .with_context(|| format!("metadata {key} is not a string"))
    }

    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .with_context(|| format!("{}: tensor {name} is missing", self.path.display()))
    }

    /// Dequantizes a tensor to float32, in GGUF's row-major order.
    pub fn f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.info(name)?;
        let raw = &self.data[info.offset..info.offset + info.n_bytes];
        Ok(dequantize(info.ty, raw, info.n_elements()))
    }
}

/// Dequantizes `n` elements of type `ty` from `raw`, following ggml's reference kernels.
pub fn dequantize(ty: TensorType, raw: &[u8], n: usize) -> Vec<f32> {
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    let mut out = Vec::with_capacity(n);
    match ty {
        TensorType::F32 => out.extend(
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        TensorType::F16 => out.extend(raw.chunks_exact(2).map(f16)),
        TensorType::Bf16 => out.extend(
            raw.chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        // Block of 32: f16 scale d, 32 × i8; x = q·d.
        TensorType::Q8_0 => {
            for block in raw.chunks_exact(34) {
                let d = f16(&block[0..2]);
                out.extend(block[2..].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        // Block of 32: f16 d, 16 bytes of nibbles; element j < 16 is the low nibble of byte j,
        // element j + 16 the high nibble; x = (q − 8)·d.
        TensorType::Q4_0 => {
            for block in raw.chunks_exact(18) {
                let d = f16(&block[0..2]);
                let qs = &block[2..];
                out.extend(qs.iter().map(|&q| ((q & 0x0f) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
        }
        // Block of 32: f16 d, f16 m, 16 bytes of nibbles (same order as Q4_0); x = q·d + m.
        TensorType::Q4_1 => {
            for block in raw.chunks_exact(20) {
                let d = f16(&block[0..2]);
                let m = f16(&block[2..4]);
                let qs = &block[4..];
                out.extend(qs.iter().map(|&q| (q & 0x0f) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
        }
    }
    debug_assert_eq!(out.len(), n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_follows_ggml_layout() {
        // d = 0.5, m = -1.0; byte j holds element j (low nibble) and j + 16 (high nibble).
        let mut block = Vec::new();
        block.extend(half::f16::from_f32(0.5).to_le_bytes());
        block.extend(half::f16::from_f32(-1.0).to_le_bytes());
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let x = dequantize(TensorType::Q4_1, &block, 32);
        assert_eq!(x[0], -1.0);
        assert_eq!(x[3], 0.5);
        assert_eq!(x[16], 15.0 * 0.5 - 1.0);
        assert_eq!(x[31], -1.0);
    }

    #[test]
    fn q8_0_and_q4_0_blocks() {
        let mut block = Vec::new();
        block.extend(half::f16::from_f32(0.25).to_le_bytes());
        block.extend((0..32i8).map(|q| (q - 16) as u8));
        let x = dequantize(TensorType::Q8_0, &block, 32);
        assert_eq!(x[0], -4.0);
        assert_eq!(x[31], 15.0 * 0.25);

        let mut block = Vec::new();
        block.extend(half::f16::from_f32(2.0).to_le_bytes());
        block.extend([0x80u8; 16]);
        let x = dequantize(TensorType::Q4_0, &block, 32);
        assert_eq!(x[0], -16.0);
        assert_eq!(x[16], 0.0);
    }

    /// A GGUF with `general.alignment` = `alignment` and one F32 tensor `t` of dims `ne` at
    /// `offset`, followed by `data` bytes of zeros.
    fn header(alignment: u32, ne: &[u64], offset: u64, data: usize) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes()); // tensors
        b.extend(1u64.to_le_bytes()); // key/values
        b.extend(17u64.to_le_bytes());
        b.extend(b"general.alignment");
        b.extend(4u32.to_le_bytes()); // u32
        b.extend(alignment.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(b"t");
        b.extend((ne.len() as u32).to_le_bytes());
        for d in ne {
            b.extend(d.to_le_bytes());
        }
        b.extend(0u32.to_le_bytes()); // F32
        b.extend(offset.to_le_bytes());
        b.resize(b.len() + data, 0);
        b
    }

    /// Regressions from the GGUF fuzz target (fuzz/fuzz_targets/gguf.rs): each was a panic.
    #[test]
    fn corrupt_alignment_sizes_and_offsets_are_errors() {
        let ok = Gguf::parse(Path::new("x"), header(8, &[4], 0, 64)).unwrap();
        assert_eq!(ok.f32("t").unwrap(), vec![0.0; 4]);
        // Dimensions are each at most the file's size; four of 70 000 overflow a u64.
        let big = 70_000;
        for (bytes, expected) in [
            (header(0, &[4], 0, 64), "general.alignment is 0"),
            (header(u32::MAX, &[4], 0, 64), "general.alignment"),
            (header(8, &[4], u64::MAX - 8, 64), "overflows"),
            (header(8, &[big; 4], 0, big as usize), "overflow"),
            (header(8, &[big, big], 0, big as usize), "truncated"),
        ] {
            let err = Gguf::parse(Path::new("x"), bytes).err().unwrap();
            assert!(format!("{err:#}").contains(expected), "{err:#}");
        }
    }

    #[test]
    fn rejects_non_gguf_and_truncated_files() {
        let err = Gguf::parse(Path::new("x"), b"ONNXgarbage".to_vec())
            .err()
            .unwrap();
        assert!(err.to_string().contains("not a GGUF file"), "{err}");
        let err = Gguf::parse(Path::new("x"), b"GG".to_vec()).err().unwrap();
        assert!(format!("{err:#}").contains("too short"), "{err:#}");
    }
}
