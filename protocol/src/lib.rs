//! quill's serial wire protocol, shared by the server (`quill serve --mode binary`) and its
//! clients (`quill client`, a microcontroller).
//!
//! Messages ([`Request`], [`Response`]) are serde types encoded with `postcard`, each in one
//! frame: COBS with a CRC-32, ended by a zero byte ([`frame`]). Every size is bounded, nothing
//! allocates, and only `core` is needed: the crate builds for `thumbv7em-none-eabihf`. The
//! `defmt` feature derives `defmt::Format` on every message for logging on the microcontroller.
//! [`Client`] speaks the protocol over any `embedded-io` port.

#![cfg_attr(not(test), no_std)]
// Messages are fixed-size values by design (no heap on a microcontroller): an error that carries
// the server's report, or a request that carries its prompt, is as large as it says.
#![allow(clippy::result_large_err, clippy::large_enum_variant)]

pub mod client;
pub mod frame;
pub mod message;

pub use client::{Client, ClientError};
pub use frame::{FrameDecoder, FrameError, MAX_FRAME, MAX_PAYLOAD, crc32, decode, encode};
pub use message::*;
