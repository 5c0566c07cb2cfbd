//! Generation on the real model: greedy answer, stop strings, seeds, context limits.

use quill::{
    GenerateError, GenerateOptions, Generator, SamplingOptions, Step, StopReason, TokenBuf,
};

use crate::support::model;

/// Runs a generation; returns (streamed text, stop reason, generated tokens).
fn generate(prompt: &str, opts: &GenerateOptions, eos: bool) -> (String, StopReason, Vec<u32>) {
    let m = model();
    let mut s = m.session().unwrap();
    let ids = m.tokenizer.encode(prompt, false);
    let mut history = TokenBuf::new();
    let eos_ids = if eos {
        m.manifest().eos_token_ids.clone()
    } else {
        vec![]
    };
    let mut g = Generator::new(&mut s, &m.tokenizer, &eos_ids, &mut history, &ids, opts).unwrap();
    let mut text = String::new();
    let reason = g.run(|t| text.push_str(t)).unwrap();
    let generated = history[ids.len()..].to_vec();
    (text, reason, generated)
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        sampling: SamplingOptions::greedy(),
        max_tokens,
        stop: vec![],
    }
}

#[test]
fn greedy_answers_paris() {
    let (text, _, _) = generate("The capital of France is", &greedy(8), true);
    assert!(
        text.starts_with(" Paris"),
        "expected ' Paris…', got {text:?}"
    );
}

#[test]
fn stop_string_across_a_token_boundary() {
    let m = model();
    let prompt = "Once upon a time, in a small village, there lived";
    let (full, reason, tokens) = generate(prompt, &greedy(40), false);
    assert_eq!(reason, StopReason::MaxTokens);
    // A stop string made of the last two characters of one token and the first two of the next.
    let piece = |k: usize| m.tokenizer.decode(&tokens[k..k + 1], false);
    let k = (5..tokens.len() - 1)
        .find(|&k| piece(k).chars().count() >= 2 && piece(k + 1).chars().count() >= 2)
        .expect("two adjacent multi-character tokens");
    let (left, right) = (piece(k), piece(k + 1));
    let tail: String = left
        .chars()
        .rev()
        .take(2)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let stop = format!("{tail}{}", right.chars().take(2).collect::<String>());
    let expected = &full[..full.find(&stop).unwrap()];

    let opts = GenerateOptions {
        stop: vec![stop.clone()],
        ..greedy(40)
    };
    let mut s = m.session().unwrap();
    let ids = m.tokenizer.encode(prompt, false);
    let mut history = TokenBuf::new();
    let mut g = Generator::new(&mut s, &m.tokenizer, &[], &mut history, &ids, &opts).unwrap();
    let mut printed = String::new();
    let reason = loop {
        match g.step().unwrap() {
            Step::Text(t) => printed.push_str(t),
            Step::Done(r, t) => {
                printed.push_str(t);
                break r;
            }
        }
        // Whatever has been printed is final: it must be a prefix of the answer.
        assert!(
            expected.starts_with(&printed),
            "printed {printed:?}, which is not a prefix of {expected:?}"
        );
    };
    assert_eq!(reason, StopReason::StopString);
    assert_eq!(printed, expected, "stop string {stop:?}");
}

#[test]
fn same_seed_same_text_other_seed_other_text() {
    let opts = |seed| GenerateOptions {
        sampling: SamplingOptions {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed,
            ..Default::default()
        },
        max_tokens: 24,
        stop: vec![],
    };
    let prompt = "My favourite animal is";
    let a = generate(prompt, &opts(42), false);
    let b = generate(prompt, &opts(42), false);
    let c = generate(prompt, &opts(43), false);
    assert_eq!(a.2, b.2, "same seed, different tokens");
    assert_eq!(a.0, b.0);
    assert_ne!(a.2, c.2, "seeds 42 and 43 gave the same 24 tokens");
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    let m = model();
    let context = m.manifest().context_length;
    let ids = vec![m.tokenizer.encode(" a", false)[0]; context + 5];
    let mut s = m.session().unwrap();
    let mut history = TokenBuf::new();
    let err = Generator::new(&mut s, &m.tokenizer, &[], &mut history, &ids, &greedy(4))
        .err()
        .unwrap();
    assert!(
        matches!(err, GenerateError::PromptTooLong { prompt, context: c } if prompt == context + 5 && c == context),
        "{err}"
    );
    assert!(err.to_string().contains("shorten the prompt"), "{err}");
    assert!(history.is_empty(), "a refused prompt must not be recorded");
}
