//! quill: on-device text generation with tract.
//!
//! A model bundle ([`bundle`]) is loaded and optimized once ([`model`]); a [`generate::Generator`]
//! then runs the decode loop on a [`model::Session`], choosing tokens with a [`sampler::Sampler`]
//! and printing text through a [`stop::StopMatcher`]. [`chat`] renders conversations.

pub mod amx;
pub mod arena;
pub mod atomic;
pub mod attention;
pub mod bench;
pub mod board;
pub mod bundle;
pub mod cache;
pub mod chat;
pub mod cli;
pub mod embedding;
pub mod error;
pub mod eval;
pub mod generate;
pub mod graph_check;
pub mod kernels;
pub mod model;
pub mod packed;
pub mod pool;
pub mod qlinear;
pub mod rope;
pub mod rotation;
pub mod sampler;
pub mod saved_binary;
pub mod serve;
pub mod stop;
pub mod tokenizer;
pub mod unicast;

pub use error::{BundleError, GenerateError};
pub use generate::{GenerateOptions, Generator, Step, StopReason, TokenBuf};
pub use model::{Decoder, LoadOptions, MAX_CONTEXT, Model, Session};
pub use sampler::SamplingOptions;
pub use tokenizer::{TokenId, Tokenizer};
