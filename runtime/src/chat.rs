//! Chat conversations in the model's template (ChatML: `<|im_start|>role\n…<|im_end|>\n`).
//!
//! The template's markers are encoded as special tokens; what the user typed is encoded as plain
//! text, so typing `<|im_end|>` cannot forge a turn boundary.

use crate::bundle::Manifest;
use crate::tokenizer::{TokenId, Tokenizer};

/// Renders conversation turns to tokens.
#[derive(Debug, Clone)]
pub struct ChatFormat {
    system: Option<String>,
    im_end: TokenId,
}

impl ChatFormat {
    /// The bundle's chat format, if it has one quill can render. `system` replaces the
    /// template's default system message.
    pub fn from_manifest(
        m: &Manifest,
        tok: &Tokenizer,
        system: Option<String>,
    ) -> Option<ChatFormat> {
        let chat = m.chat.as_ref().filter(|c| c.format == "chatml")?;
        let im_end = tok.token_id("<|im_end|>")?;
        tok.token_id("<|im_start|>")?;
        Some(ChatFormat {
            system: system.or_else(|| chat.default_system.clone()),
            im_end,
        })
    }

    /// Tokens for a user message and the opening of the assistant's reply, continuing a
    /// conversation whose tokens so far are `history` (empty for the first turn).
    pub fn user_turn(&self, tok: &Tokenizer, history: &[TokenId], message: &str) -> Vec<TokenId> {
        let mut out = Vec::new();
        match history.last() {
            None => {
                if let Some(system) = &self.system {
                    out.extend(tok.encode("<|im_start|>system\n", true));
                    out.extend(tok.encode(system, false));
                    out.extend(tok.encode("<|im_end|>\n", true));
                }
            }
            // The reply ended with <|im_end|>: close the line.
            Some(&t) if t == self.im_end => out.extend(tok.encode("\n", true)),
            // The reply was cut short (token limit): close the turn.
            Some(_) => out.extend(tok.encode("<|im_end|>\n", true)),
        }
        out.extend(tok.encode("<|im_start|>user\n", true));
        out.extend(tok.encode(message, false));
        out.extend(tok.encode("<|im_end|>\n<|im_start|>assistant\n", true));
        out
    }
}
