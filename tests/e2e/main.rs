//! quill's end-to-end tests, on the real SmolLM2-135M-Instruct teacher (fetched and cached on
//! first use, never skipped). One test binary; shared fixtures live in `support`.

mod alloc;
mod atomic;
mod boards;
mod bundle_errors;
mod cache;
mod cli;
mod distill;
mod eval;
mod generate;
mod gguf_types;
mod golden;
mod onnxruntime;
mod parity;
mod quant;
mod serve;
mod soak;
mod support;
mod tokenizer;

/// Counts allocations per thread, so a test can measure what one decode step allocates.
#[global_allocator]
static ALLOCATOR: support::CountingAlloc = support::CountingAlloc;
