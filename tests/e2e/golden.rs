//! Golden outputs: the teacher at temperature 0, a fixed number of tokens, exact text.
//!
//! The expected file `tests/golden/teacher-f32.json` is written by the test itself when run with
//! `QUILL_BLESS=1 cargo test --release -p quill --test e2e golden`, never by hand.

use quill::{GenerateOptions, Generator, SamplingOptions, TokenBuf};

use crate::support::model;

const PROMPTS: &[&str] = &[
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
];
const TOKENS: usize = 24;
const GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/golden/teacher-f32.json"
);

#[test]
fn greedy_continuations_match_the_golden_file() {
    let m = model();
    let opts = GenerateOptions {
        sampling: SamplingOptions::greedy(),
        max_tokens: TOKENS,
        stop: vec![],
    };
    let mut got = serde_json::Map::new();
    for prompt in PROMPTS {
        let mut s = m.session().unwrap();
        let mut history = TokenBuf::new();
        let ids = m.tokenizer.encode(prompt, true);
        let eos = m.manifest().eos_token_ids.clone();
        let mut g = Generator::new(&mut s, &m.tokenizer, &eos, &mut history, &ids, &opts).unwrap();
        let mut text = String::new();
        g.run(|t| text.push_str(t)).unwrap();
        got.insert(prompt.to_string(), text.into());
    }
    let got = serde_json::Value::Object(got);
    if std::env::var_os("QUILL_BLESS").is_some() {
        std::fs::write(GOLDEN, serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
        return;
    }
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(GOLDEN).expect("the golden file (write it with QUILL_BLESS=1)"),
    )
    .unwrap();
    for prompt in PROMPTS {
        assert_eq!(
            got[prompt], want[prompt],
            "\nprompt:   {prompt:?}\nexpected: {}\ngot:      {}\n",
            want[prompt], got[prompt]
        );
    }
}
