//! quill's tokenizer against token ids from Hugging Face `tokenizers`
//! (`tests/vectors/make_tokenizer_vectors.py`), and round trips.

use serde_json::Value;

use crate::support::model;

#[test]
fn token_ids_match_hugging_face_tokenizers() {
    let tok = &model().tokenizer;
    let vectors: Value =
        serde_json::from_str(include_str!("../vectors/tokenizer.json")).expect("vectors parse");
    let mut failures = Vec::new();
    for v in vectors.as_array().unwrap() {
        let text = v["text"].as_str().unwrap();
        let want: Vec<u32> = v["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, v["special"].as_bool().unwrap());
        if got != want {
            failures.push(format!(
                "text:     {text:?}\nexpected: {want:?}\ngot:      {got:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn decode_round_trips_utf8_split_across_tokens() {
    let tok = &model().tokenizer;
    for text in [
        "naïve café 🙂👍🏽 日本語",
        "Ελληνικά\n\n  x",
        "ends with space ",
    ] {
        let ids = tok.encode(text, false);
        assert_eq!(tok.decode(&ids, false), text);
    }
    // A rare CJK character is split into byte-level tokens: no single token decodes to valid
    // UTF-8, the sequence does.
    let ids = tok.encode("齉", false);
    assert!(ids.len() > 1, "{ids:?}");
    assert!(
        ids.iter()
            .all(|&i| std::str::from_utf8(tok.token_bytes(i)).is_err())
    );
    assert_eq!(tok.decode(&ids, false), "齉");
}

#[test]
fn special_tokens_only_when_asked() {
    let tok = &model().tokenizer;
    let im_start = tok.token_id("<|im_start|>").unwrap();
    assert_eq!(tok.encode("<|im_start|>", true), vec![im_start]);
    let plain = tok.encode("<|im_start|>", false);
    assert!(!plain.contains(&im_start) && plain.len() > 1, "{plain:?}");
    assert!(tok.is_special(im_start));
}
