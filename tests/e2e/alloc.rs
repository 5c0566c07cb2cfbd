//! The decode loop allocates nothing in quill's own code: every allocation of a decode step
//! happens inside tract's forward pass, which this test counts and reports.

use std::cell::Cell;

use quill::{
    Decoder, GenerateError, GenerateOptions, Generator, SamplingOptions, Session, Step, TokenBuf,
};

use crate::support::{allocations, model};

/// Wraps the real session and counts the allocations made inside its forward pass.
struct Counted<'a> {
    inner: &'a mut Session,
    inside: &'a Cell<u64>,
}

impl Decoder for Counted<'_> {
    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], GenerateError> {
        let before = allocations();
        let r = self.inner.forward(tokens);
        self.inside.set(self.inside.get() + allocations() - before);
        r
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn context(&self) -> usize {
        self.inner.context()
    }
}

fn g_inputs(g: &Generator<'_, Counted<'_>>) -> u64 {
    g.decoder().inner.input_allocations()
}

#[test]
fn decode_steps_allocate_only_inside_tract() {
    let m = model();
    let mut session = m.session().unwrap();
    let inside = Cell::new(0);
    let mut dec = Counted {
        inner: &mut session,
        inside: &inside,
    };
    let opts = GenerateOptions {
        // Sampling with every filter, and a stop string, to exercise all of the loop.
        sampling: SamplingOptions {
            temperature: 0.9,
            top_k: 50,
            top_p: 0.9,
            min_p: 0.02,
            repeat_penalty: 1.1,
            seed: 3,
            ..Default::default()
        },
        max_tokens: 100,
        stop: vec!["never appears in the output #@!".into()],
    };
    let ids = m
        .tokenizer
        .encode("Here is a long story about a lighthouse keeper:", false);
    let mut history = TokenBuf::new();
    // No end-of-sequence tokens: the loop runs the whole measured length.
    let mut g = Generator::new(&mut dec, &m.tokenizer, &[], &mut history, &ids, &opts).unwrap();
    // Warm-up: the prefill and a few decode steps.
    for _ in 0..4 {
        assert!(matches!(g.step().unwrap(), Step::Text(_)));
    }
    let inputs_before = g_inputs(&g);
    let mut quill = Vec::new();
    let mut tract = Vec::new();
    for _ in 0..40 {
        let (a0, t0) = (allocations(), inside.get());
        assert!(matches!(g.step().unwrap(), Step::Text(_)));
        let (all, in_tract) = (allocations() - a0, inside.get() - t0);
        quill.push(all - in_tract);
        tract.push(in_tract);
    }
    // Inside the forward pass, quill's own part (the token input) reuses one tensor.
    assert_eq!(
        g_inputs(&g),
        inputs_before,
        "decode steps allocated token-input tensors"
    );
    tract.sort_unstable();
    eprintln!(
        "allocations per decode step: quill {:?}; tract median {} (min {}, max {})",
        quill,
        tract[tract.len() / 2],
        tract[0],
        tract[tract.len() - 1]
    );
    assert!(
        tract[0] > 0,
        "tract allocates its activations: a zero count means the counter is broken"
    );
    assert!(
        quill.iter().all(|&n| n == 0),
        "quill's own code allocated in the decode loop: {quill:?}"
    );
}
