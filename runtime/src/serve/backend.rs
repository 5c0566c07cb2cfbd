//! What the console asks of a model: generate a reply (chat) or a continuation, streaming text
//! and stopping when told; reset the conversation; describe itself.
//!
//! [`ModelBackend`] is the real one. The console is written against [`Backend`] so that its line
//! discipline and framing are unit-tested with a scripted backend; the end-to-end tests run it on
//! the real model.

use crate::chat::ChatFormat;
use crate::error::GenerateError;
use crate::generate::{GenerateOptions, Generator, Stats, Step, StopReason, TokenBuf};
use crate::model::{Decoder, Model, Session};

/// What the text callback tells the generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Cancel,
}

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stopped(StopReason),
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub finish: Finish,
    pub stats: Stats,
}

/// What is being asked.
#[derive(Debug, Clone, Copy)]
pub enum Turn<'a> {
    /// The user's next chat message; the conversation continues.
    Chat(&'a str),
    /// Plain text to continue, on its own (clears the conversation).
    Complete(&'a str),
}

#[derive(Debug, Clone)]
pub struct Description {
    pub name: String,
    pub weights: String,
    pub context: usize,
    pub vocab: usize,
    pub chat: bool,
}

pub trait Backend {
    fn describe(&self) -> Description;
    /// Tokens of the conversation in the context now.
    fn context_used(&self) -> usize;
    fn reset(&mut self) -> Result<(), GenerateError>;
    /// Generates, handing each piece of text to `on_text` as it is produced; stops early when
    /// `on_text` says [`Flow::Cancel`]. On an error the conversation is left as it was before
    /// the call, or cleared if the model failed midway.
    fn generate(
        &mut self,
        turn: Turn<'_>,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> Flow,
    ) -> Result<Outcome, GenerateError>;
}

/// A loaded model with one conversation.
pub struct ModelBackend {
    model: Model,
    session: Session,
    history: TokenBuf,
    chat: Option<ChatFormat>,
    eos: Vec<u32>,
}

impl ModelBackend {
    pub fn new(model: Model, system: Option<String>) -> Result<ModelBackend, GenerateError> {
        let session = model.session()?;
        let chat = ChatFormat::from_manifest(model.manifest(), &model.tokenizer, system);
        let eos = model.manifest().eos_token_ids.clone();
        Ok(ModelBackend {
            model,
            session,
            history: TokenBuf::new(),
            chat,
            eos,
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }
}

impl Backend for ModelBackend {
    fn describe(&self) -> Description {
        let m = self.model.manifest();
        Description {
            name: m.name.clone(),
            weights: m.weights.clone(),
            context: self.session.context(),
            vocab: self.model.tokenizer.vocab_size(),
            chat: self.chat.is_some(),
        }
    }

    fn context_used(&self) -> usize {
        self.history.len()
    }

    fn reset(&mut self) -> Result<(), GenerateError> {
        self.history.clear();
        self.session.reset()
    }

    fn generate(
        &mut self,
        turn: Turn<'_>,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> Flow,
    ) -> Result<Outcome, GenerateError> {
        if let Turn::Complete(_) = turn {
            self.reset()?;
        }
        let tok = &self.model.tokenizer;
        let input = match (turn, &self.chat) {
            (Turn::Chat(msg), Some(chat)) => chat.user_turn(tok, &self.history, msg),
            // Without a chat template a message continues the text so far.
            (Turn::Chat(text), None) | (Turn::Complete(text), _) => tok.encode(text, false),
        };
        let mut generator = Generator::new(
            &mut self.session,
            tok,
            &self.eos,
            &mut self.history,
            &input,
            opts,
        )?;
        let finish = loop {
            match generator.step() {
                Ok(Step::Text(t)) => {
                    if on_text(t) == Flow::Cancel {
                        break Finish::Cancelled;
                    }
                }
                Ok(Step::Done(reason, t)) => {
                    on_text(t);
                    break Finish::Stopped(reason);
                }
                Err(e) => {
                    drop(generator);
                    // The KV cache may hold part of a step: start over rather than guess.
                    let _ = self.reset();
                    return Err(e);
                }
            }
        };
        let stats = generator.stats().clone();
        Ok(Outcome { finish, stats })
    }
}

impl std::fmt::Debug for ModelBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelBackend")
            .field("model", &self.model.manifest().name)
            .field("context_used", &self.history.len())
            .finish()
    }
}
