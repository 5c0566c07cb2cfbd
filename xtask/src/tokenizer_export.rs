//! The GGUF's tokenizer metadata → a Hugging Face `tokenizer.json`.
//!
//! Writing the standard format lets an independent implementation (the PyPI `tokenizers`
//! package) load exactly what quill loads, which is how the test vectors are produced.

use anyhow::{Context, Result, bail, ensure};
use quill::bundle::ChatTemplate;
use serde_json::{Value as Json, json};

use crate::gguf::{Gguf, Value};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

pub struct ExportedTokenizer {
    pub json: Json,
    pub eos_ids: Vec<u32>,
    pub chat: Option<ChatTemplate>,
}

fn strings(v: &Value, key: &str) -> Result<Vec<String>> {
    v.as_array()
        .with_context(|| format!("{key} is not an array"))?
        .iter()
        .map(|s| {
            s.as_str()
                .map(str::to_owned)
                .with_context(|| format!("{key} holds a non-string"))
        })
        .collect()
}

pub fn from_gguf(g: &Gguf) -> Result<ExportedTokenizer> {
    let model = g.meta_str("tokenizer.ggml.model")?;
    ensure!(
        model == "gpt2",
        "tokenizer model is {model:?}; quill reads byte-level BPE tokenizers (\"gpt2\")"
    );
    let tokens = strings(g.meta("tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens")?;
    let merges = strings(g.meta("tokenizer.ggml.merges")?, "tokenizer.ggml.merges")?;
    let types: Vec<u64> = match g.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .as_array()
            .context("token_type is not an array")?
            .iter()
            .map(|t| t.as_u64().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let pre = g.meta_str("tokenizer.ggml.pre").unwrap_or("default");
    // The pre-tokenizers quill implements: GPT-2's regex, optionally after splitting every digit.
    let pre_tokenizer = match pre {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]}),
        "gpt2" | "default" => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
        }
        other => bail!(
            "pre-tokenizer {other:?} is not supported; quill implements \"gpt2\" and \"smollm\""
        ),
    };

    let mut vocab = serde_json::Map::new();
    for (id, tok) in tokens.iter().enumerate() {
        vocab.insert(tok.clone(), json!(id));
    }
    let mut added = Vec::new();
    for (id, (tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty == TOKEN_TYPE_CONTROL
            }));
        }
    }

    let mut eos_ids = Vec::new();
    if let Ok(eos) = g.meta_u64("tokenizer.ggml.eos_token_id") {
        eos_ids.push(eos as u32);
    }
    // Chat models end a turn with their EOS (`<|im_end|>`); plain text ends with `<|endoftext|>`.
    for name in ["<|endoftext|>", "<|im_end|>", "<|eot_id|>"] {
        if let Some(id) = tokens.iter().position(|t| t == name)
            && !eos_ids.contains(&(id as u32))
        {
            eos_ids.push(id as u32);
        }
    }

    let chat = match g.meta_str("tokenizer.chat_template") {
        Ok(t) if t.contains("<|im_start|>") => Some(ChatTemplate {
            format: "chatml".to_string(),
            default_system: default_system_prompt(t),
            template: t.to_string(),
        }),
        _ => None,
    };

    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges
        }
    });
    Ok(ExportedTokenizer {
        json,
        eos_ids,
        chat,
    })
}

/// The system message a ChatML template inserts when the conversation has none.
fn default_system_prompt(template: &str) -> Option<String> {
    let start = "<|im_start|>system\n";
    let i = template.find(start)? + start.len();
    let end = template[i..].find("<|im_end|>")?;
    Some(template[i..i + end].to_string())
}
