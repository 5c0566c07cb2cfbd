//! The decode loop: prefill the prompt, then sample, feed back and print token by token.
//!
//! **Invariant:** after [`Generator::new`] and the prefill, [`Generator::step`] allocates nothing
//! in quill's own code: the sequence lives in a fixed-capacity [`TokenBuf`], the sampler and the
//! stop matcher own buffers sized at construction, and the text handed out borrows from them.
//! (tract allocates its activations inside [`Decoder::forward`]; the allocation test reports how
//! much.)

use std::time::{Duration, Instant};

use crate::error::GenerateError;
use crate::model::{Decoder, MAX_CONTEXT};
use crate::sampler::{Sampler, SamplingOptions};
use crate::stop::StopMatcher;
use crate::tokenizer::{TokenId, Tokenizer};

/// A whole sequence (prompt and generated tokens), fixed capacity.
pub type TokenBuf = heapless::Vec<TokenId, MAX_CONTEXT>;

/// Most end-of-sequence tokens a model may declare.
pub const MAX_EOS: usize = 8;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub sampling: SamplingOptions,
    /// Most new tokens; generation also ends when the context is full.
    pub max_tokens: usize,
    pub stop: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            sampling: SamplingOptions::default(),
            max_tokens: 256,
            stop: Vec::new(),
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// A user stop string appeared in the text.
    StopString,
    /// `max_tokens` new tokens were generated.
    MaxTokens,
    /// The sequence filled the model's context.
    ContextFull,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::StopString => "stop",
            StopReason::MaxTokens => "max_tokens",
            StopReason::ContextFull => "context_full",
        }
    }
}

/// One step's outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// A token was generated; this text (possibly empty) is now safe to print.
    Text(&'a str),
    /// Generation is over; this is the last text to print.
    Done(StopReason, &'a str),
}

/// Timings of one generation.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// From the first step's start to the first generated token: the prefill of the prompt.
    pub time_to_first_token: Duration,
    /// All decode steps after the first token.
    pub decode: Duration,
}

impl Stats {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.time_to_first_token.as_secs_f64().max(1e-9)
    }
    /// Decode speed over the tokens after the first.
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

pub struct Generator<'a, D: Decoder> {
    decoder: &'a mut D,
    tokenizer: &'a Tokenizer,
    sampler: Sampler,
    stops: StopMatcher,
    eos: heapless::Vec<TokenId, MAX_EOS>,
    /// The whole sequence; `decoder.len()` of it is in the KV cache, the rest is still to feed.
    history: &'a mut TokenBuf,
    max_tokens: usize,
    stats: Stats,
    started: Option<Instant>,
    done: Option<StopReason>,
}

impl<'a, D: Decoder> Generator<'a, D> {
    /// Appends `input` to `history` and prepares to generate after it. `history` must start
    /// with what the decoder has already cached (empty for a fresh session).
    pub fn new(
        decoder: &'a mut D,
        tokenizer: &'a Tokenizer,
        eos: &[TokenId],
        history: &'a mut TokenBuf,
        input: &[TokenId],
        opts: &GenerateOptions,
    ) -> Result<Self, GenerateError> {
        if opts.max_tokens == 0 {
            return Err(GenerateError::BadOption(
                "max tokens must be at least 1".into(),
            ));
        }
        let sampler = Sampler::new(opts.sampling.clone(), tokenizer.vocab_size())?;
        let stops =
            StopMatcher::new(&opts.stop).map_err(|e| GenerateError::BadOption(e.to_string()))?;
        if history.is_empty() && input.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let context = decoder.context().min(MAX_CONTEXT);
        // Leave room for at least one generated token.
        if history.len() + input.len() >= context {
            return Err(if decoder.is_empty() {
                GenerateError::PromptTooLong {
                    prompt: history.len() + input.len(),
                    context,
                }
            } else {
                GenerateError::ContextFull { context }
            });
        }
        history
            .extend_from_slice(input)
            .expect("checked against the context above");
        let eos = eos.iter().take(MAX_EOS).copied().collect();
        let stats = Stats {
            prompt_tokens: history.len() - decoder.len(),
            ..Stats::default()
        };
        Ok(Generator {
            decoder,
            tokenizer,
            sampler,
            stops,
            eos,
            history,
            max_tokens: opts.max_tokens,
            stats,
            started: None,
            done: None,
        })
    }

    pub fn decoder(&self) -> &D {
        self.decoder
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Feeds the not-yet-cached tokens and samples the next one.
    fn advance(&mut self) -> Result<TokenId, GenerateError> {
        let pending = &self.history[self.decoder.len()..];
        let logits = self.decoder.forward(pending)?;
        Ok(self.sampler.sample(logits, self.history))
    }

    /// Produces the next token's text, or the end of generation.
    pub fn step(&mut self) -> Result<Step<'_>, GenerateError> {
        if let Some(reason) = self.done {
            return Ok(Step::Done(reason, ""));
        }
        let first = self.started.is_none();
        let t0 = *self.started.get_or_insert_with(Instant::now);
        let step_start = Instant::now();
        let token = self.advance()?;
        if first {
            self.stats.time_to_first_token = t0.elapsed();
        } else {
            self.stats.decode += step_start.elapsed();
        }

        if self.eos.contains(&token) {
            // Recorded in the history (a chat turn ends with it) but not printed.
            let _ = self.history.push(token);
            return Ok(self.finish(StopReason::Eos));
        }
        self.stats.generated_tokens += 1;
        self.history
            .push(token)
            .expect("room checked before each step");
        let bytes = if self.tokenizer.is_special(token) {
            &[][..]
        } else {
            self.tokenizer.token_bytes(token)
        };
        if self.stops.push(bytes) {
            self.done = Some(StopReason::StopString);
            return Ok(Step::Done(StopReason::StopString, self.stops.text()));
        }
        let reason = if self.stats.generated_tokens >= self.max_tokens {
            StopReason::MaxTokens
        } else if self.history.len() >= self.decoder.context().min(MAX_CONTEXT) {
            StopReason::ContextFull
        } else {
            return Ok(Step::Text(self.stops.text()));
        };
        // This token's text, then whatever was held back for a stop string that cannot come.
        self.done = Some(reason);
        Ok(Step::Done(reason, self.stops.flush()))
    }

    fn finish(&mut self, reason: StopReason) -> Step<'_> {
        self.done = Some(reason);
        self.stops.clear_text();
        Step::Done(reason, self.stops.flush())
    }

    /// Runs to the end, handing each piece of text to `sink`; returns why it stopped.
    pub fn run(&mut self, mut sink: impl FnMut(&str)) -> Result<StopReason, GenerateError> {
        loop {
            match self.step()? {
                Step::Text(t) => sink(t),
                Step::Done(reason, t) => {
                    sink(t);
                    return Ok(reason);
                }
            }
        }
    }
}
