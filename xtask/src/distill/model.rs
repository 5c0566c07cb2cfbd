//! The llama decoder in candle, for training: the student (trainable `Var`s, ops that have a
//! backward pass) and the teacher (plain tensors, candle's fused inference ops).
//!
//! Layout matches quill's exported graph: weights `(out, in)` as in [`crate::llama`], Q/K rows
//! in rotate-half order (the GGUF permutation already undone), tied head = embedding.
//! Shapes: `B` sequences of `T` tokens, `D` model width, `H`/`KV` query/key-value heads of `hd`.

use std::cell::RefCell;

use candle_core::{D, Device, Result, Tensor, Var};

use super::qat::{self, FakeQuant, Site};
use crate::llama::{Block, LlamaConfig, LlamaWeights, Matrix};

/// The names of a block's tensors, in checkpoint order (`blk.{i}.{name}`).
pub const BLOCK_TENSORS: [&str; 9] = [
    "attn_norm",
    "wq",
    "wk",
    "wv",
    "wo",
    "ffn_norm",
    "w_gate",
    "w_up",
    "w_down",
];

/// A decoder's tensors: trainable (`Var`) for the student, constant for the teacher.
pub struct Decoder {
    pub config: LlamaConfig,
    /// (vocab, D); tied head. Constant when `freeze_embedding`.
    pub embedding: Var,
    pub train_embedding: bool,
    /// Per block, [`BLOCK_TENSORS`] order; norms (D), linears (out, in).
    pub blocks: Vec<[Var; 9]>,
    /// (D)
    pub output_norm: Var,
    /// Rotary tables (context, hd/2).
    cos: Tensor,
    sin: Tensor,
    /// Whether this decoder is trained (composite ops with gradients) or only run.
    trainable: bool,
    /// Set while healing with fake quantization ([`qat`]).
    fake_quant: RefCell<Option<FakeQuant>>,
}

fn matrix(m: &Matrix, dev: &Device) -> Result<Var> {
    Var::from_tensor(&Tensor::from_slice(&m.data, (m.rows, m.cols), dev)?)
}

fn vector(v: &[f32], dev: &Device) -> Result<Var> {
    Var::from_tensor(&Tensor::from_slice(v, v.len(), dev)?)
}

fn to_matrix(t: &Tensor) -> Result<Matrix> {
    let (rows, cols) = t.dims2()?;
    Ok(Matrix {
        rows,
        cols,
        data: t.flatten_all()?.to_vec1()?,
    })
}

impl Decoder {
    /// A decoder holding a copy of `w`. `trainable`: built for backpropagation.
    pub fn new(w: &LlamaWeights, trainable: bool, train_embedding: bool) -> Result<Decoder> {
        let dev = Device::Cpu;
        let c = &w.config;
        let blocks = w
            .blocks
            .iter()
            .map(|b| {
                Ok([
                    vector(&b.attn_norm, &dev)?,
                    matrix(&b.wq, &dev)?,
                    matrix(&b.wk, &dev)?,
                    matrix(&b.wv, &dev)?,
                    matrix(&b.wo, &dev)?,
                    vector(&b.ffn_norm, &dev)?,
                    matrix(&b.w_gate, &dev)?,
                    matrix(&b.w_up, &dev)?,
                    matrix(&b.w_down, &dev)?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        // Rotate-half tables: angle(pos, i) = pos · θ^(−2i/hd), i < hd/2.
        let (ctx, hd) = (c.context_length.min(8192), c.head_dim);
        let mut angles = Vec::with_capacity(ctx * hd / 2);
        for p in 0..ctx {
            for i in 0..hd / 2 {
                let freq = (c.rope_theta as f64).powf(-(2.0 * i as f64) / hd as f64);
                angles.push((p as f64 * freq) as f32);
            }
        }
        let angles = Tensor::from_vec(angles, (ctx, hd / 2), &dev)?;
        Ok(Decoder {
            config: c.clone(),
            embedding: matrix(&w.embedding, &dev)?,
            train_embedding,
            blocks,
            output_norm: vector(&w.output_norm, &dev)?,
            cos: angles.cos()?,
            sin: angles.sin()?,
            trainable,
            fake_quant: RefCell::new(None),
        })
    }

    /// From now on the forward pass rounds weights and activations as the int8 export will.
    pub fn enable_fake_quant(&self) -> anyhow::Result<()> {
        let mut fq = FakeQuant::new(&self.config, crate::export::ROTATION_SEED)?;
        fq.refresh(&self.blocks)?;
        *self.fake_quant.borrow_mut() = Some(fq);
        Ok(())
    }

    pub fn fake_quant_on(&self) -> bool {
        self.fake_quant.borrow().is_some()
    }

    /// Recomputes the fake-quantized weights after the weights changed (an optimizer step).
    pub fn refresh_fake_quant(&self) -> Result<()> {
        if let Some(fq) = self.fake_quant.borrow_mut().as_mut() {
            fq.refresh(&self.blocks)?;
        }
        Ok(())
    }

    /// The trainable variables with their checkpoint names.
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let mut v = Vec::new();
        if self.train_embedding {
            v.push(("embedding".to_string(), &self.embedding));
        }
        for (i, b) in self.blocks.iter().enumerate() {
            for (name, var) in BLOCK_TENSORS.iter().zip(b) {
                v.push((format!("blk.{i}.{name}"), var));
            }
        }
        v.push(("output_norm".to_string(), &self.output_norm));
        v
    }

    /// Every tensor (trainable or not) by checkpoint name: what a checkpoint stores.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .named_vars()
            .into_iter()
            .map(|(n, t)| (n, t.as_tensor().clone()))
            .collect();
        if !self.train_embedding {
            v.push(("embedding".to_string(), self.embedding.as_tensor().clone()));
        }
        v
    }

    /// Replaces every tensor with the checkpoint's tensor of the same name and shape.
    pub fn load(&self, tensors: &std::collections::HashMap<String, Tensor>) -> anyhow::Result<()> {
        for (name, t) in self.named_tensors() {
            let src = tensors
                .get(&name)
                .ok_or_else(|| anyhow::anyhow!("the checkpoint has no tensor {name}"))?;
            anyhow::ensure!(
                src.shape() == t.shape(),
                "checkpoint tensor {name} is {:?}, the student's is {:?}",
                src.shape(),
                t.shape()
            );
            let var = self.var(&name).expect("every named tensor has its var");
            var.set(src)?;
        }
        Ok(())
    }

    fn var(&self, name: &str) -> Option<&Var> {
        match name {
            "embedding" => Some(&self.embedding),
            "output_norm" => Some(&self.output_norm),
            _ => {
                let rest = name.strip_prefix("blk.")?;
                let (i, t) = rest.split_once('.')?;
                let i: usize = i.parse().ok()?;
                let j = BLOCK_TENSORS.iter().position(|n| *n == t)?;
                self.blocks.get(i).map(|b| &b[j])
            }
        }
    }

    /// The weights back in [`LlamaWeights`] form, for the exporter.
    pub fn to_weights(&self) -> Result<LlamaWeights> {
        let v = |t: &Var| -> Result<Vec<f32>> { t.as_tensor().to_vec1() };
        let m = |t: &Var| to_matrix(t.as_tensor());
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                Ok(Block {
                    attn_norm: v(&b[0])?,
                    wq: m(&b[1])?,
                    wk: m(&b[2])?,
                    wv: m(&b[3])?,
                    wo: m(&b[4])?,
                    ffn_norm: v(&b[5])?,
                    w_gate: m(&b[6])?,
                    w_up: m(&b[7])?,
                    w_down: m(&b[8])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embedding = m(&self.embedding)?;
        let mut config = self.config.clone();
        config.n_layers = blocks.len();
        Ok(LlamaWeights {
            config,
            lm_head: embedding.clone(),
            embedding,
            blocks,
            output_norm: v(&self.output_norm)?,
        })
    }

    fn rms_norm(&self, x: &Tensor, w: &Var) -> Result<Tensor> {
        let eps = self.config.rms_eps;
        if self.trainable {
            candle_nn::ops::rms_norm_slow(x, w.as_tensor(), eps)
        } else {
            candle_nn::ops::rms_norm(x, w.as_tensor(), eps)
        }
    }

    fn rope(&self, x: &Tensor, t: usize) -> Result<Tensor> {
        let (cos, sin) = (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?);
        if self.trainable {
            candle_nn::rotary_emb::rope_slow(x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
        }
    }

    fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        if self.trainable {
            candle_nn::ops::softmax(x, D::Minus1)
        } else {
            candle_nn::ops::softmax_last_dim(x)
        }
    }

    /// Logits (B, T, vocab) for tokens (B, T), and when `hidden` is set the residual stream
    /// entering every block plus the final one (n_layers + 1 tensors of (B, T, D)).
    pub fn forward(&self, tokens: &Tensor, mut hidden: Option<&mut Vec<Tensor>>) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = tokens.dims2()?;
        let (d, hd, nh, nkv) = (c.d_model, c.head_dim, c.n_heads, c.n_kv_heads);
        let group = nh / nkv;
        // A frozen embedding is detached: no gradient is computed for its 28 M entries.
        let emb = if self.train_embedding {
            self.embedding.as_tensor().clone()
        } else {
            self.embedding.as_tensor().detach()
        };
        // (B·T, D)
        let mut x = emb.index_select(&tokens.flatten_all()?, 0)?;
        // Causal mask (T, T): 0 on and below the diagonal, −inf above.
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), x.device())?;
        let scale = 1.0 / (hd as f64).sqrt();
        let linear = |x: &Tensor, w: &Tensor| x.matmul(&w.t()?);
        let fq = self.fake_quant.borrow();
        let fq = fq.as_ref();
        // A norm and the linears reading it: with fake quantization, the norm's gain is folded
        // into them and their input rounded, as in the int8 graph.
        let read = |x: &Tensor,
                    gain: &Var,
                    ws: &[(&Var, usize)],
                    bi: usize|
         -> Result<(Tensor, Vec<Tensor>)> {
            match fq {
                None => Ok((
                    self.rms_norm(x, gain)?,
                    ws.iter().map(|(w, _)| w.as_tensor().clone()).collect(),
                )),
                Some(fq) => {
                    let xn = candle_nn::ops::rms_norm_slow(x, &fq.ones, self.config.rms_eps)?;
                    let ws = ws
                        .iter()
                        .map(|(w, j)| qat::fold(w, gain)? + fq.delta_of(bi, *j))
                        .collect::<Result<_>>()?;
                    Ok((fq.activation(&xn, Site::Residual)?, ws))
                }
            }
        };
        let plain = |w: &Var, bi: usize, j: usize| -> Result<Tensor> {
            match fq {
                None => Ok(w.as_tensor().clone()),
                Some(fq) => w.as_tensor() + fq.delta_of(bi, j),
            }
        };
        let seen = |x: Tensor, site: Site| -> Result<Tensor> {
            match fq {
                None => Ok(x),
                Some(fq) => fq.activation(&x, site),
            }
        };
        for (bi, blk) in self.blocks.iter().enumerate() {
            if let Some(h) = hidden.as_deref_mut() {
                h.push(x.reshape((b, t, d))?);
            }
            let (h, w) = read(&x, &blk[0], &[(&blk[1], 0), (&blk[2], 1), (&blk[3], 2)], bi)?;
            // (B, heads, T, hd)
            let heads = |w: &Tensor, n: usize| -> Result<Tensor> {
                linear(&h, w)?
                    .reshape((b, t, n, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = self.rope(&heads(&w[0], nh)?, t)?;
            let k = self.rope(&heads(&w[1], nkv)?, t)?;
            let v = heads(&w[2], nkv)?;
            // Grouped-query attention: each key/value head serves `group` query heads.
            let repeat = |x: Tensor| -> Result<Tensor> {
                if group == 1 {
                    return Ok(x);
                }
                x.unsqueeze(2)?
                    .expand((b, nkv, group, t, hd))?
                    .reshape((b, nh, t, hd))
            };
            let (k, v) = (repeat(k)?, repeat(v)?);
            // (B, H, T, T)
            let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            let att = self.softmax(&att)?;
            // (B, H, T, hd) → (B·T, H·hd)
            let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b * t, nh * hd))?;
            let o = seen(o, Site::AttentionOut)?;
            x = (x + linear(&o, &plain(&blk[4], bi, 3)?)?)?;
            let (h, w) = read(&x, &blk[5], &[(&blk[6], 4), (&blk[7], 5)], bi)?;
            let gate = candle_nn::ops::silu(&linear(&h, &w[0])?)?;
            let up = linear(&h, &w[1])?;
            let act = seen((gate * up)?, Site::Ffn)?;
            x = (x + linear(&act, &plain(&blk[8], bi, 6)?)?)?;
        }
        if let Some(h) = hidden {
            h.push(x.reshape((b, t, d))?);
        }
        let x = match fq {
            None => self.rms_norm(&x, &self.output_norm)?,
            Some(fq) => {
                let xn = candle_nn::ops::rms_norm_slow(&x, &fq.ones, self.config.rms_eps)?;
                fq.activation(&xn, Site::Residual)?
                    .broadcast_mul(&self.output_norm.as_tensor().unsqueeze(0)?)?
            }
        };
        x.matmul(&emb.t()?)?.reshape((b, t, c.vocab_size))
    }
}

/// A `(rows, cols)` tensor of token ids from windows of equal length.
pub fn batch(windows: &[&[u32]]) -> Result<Tensor> {
    let t = windows.first().map_or(0, |w| w.len());
    let flat: Vec<u32> = windows.iter().flat_map(|w| w.iter().copied()).collect();
    Tensor::from_vec(flat, (windows.len(), t), &Device::Cpu)
}

/// Mean over positions of log-softmax cross-entropy: logits (N, V), targets (N) u32.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
    picked.neg()?.mean_all()
}
