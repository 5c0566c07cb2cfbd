//! The bundle manifest parser (`quill::bundle::parse_manifest`) on arbitrary bytes.
//!
//! Beyond "no panic": invalid UTF-8 is refused by the caller (`fs::read_to_string`), so the
//! input goes through `from_utf8` and is skipped if it is not text. A manifest that is accepted
//! has the format, version, architecture and a supported weight format, lists the graph,
//! weights and tokenizer files, and survives a JSON round trip (serialize, parse again, equal:
//! the manifest's fields are plain data, floats compared as bits). Every error renders a
//! non-empty message that names the file.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use quill::bundle::{self, parse_manifest};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz/manifest.json");
    match parse_manifest(text, path) {
        Ok(m) => {
            assert_eq!(m.format, bundle::FORMAT);
            assert_eq!(m.version, bundle::MANIFEST_VERSION);
            assert_eq!(m.architecture, bundle::ARCHITECTURE);
            assert!(bundle::WEIGHT_FORMATS.contains(&m.weights.as_str()));
            for needed in [
                bundle::GRAPH_FILE,
                bundle::WEIGHTS_FILE,
                bundle::TOKENIZER_FILE,
            ] {
                assert!(m.files.iter().any(|f| f.name == needed));
            }
            let json = serde_json::to_string(&m).expect("a parsed manifest serializes");
            let m2 = parse_manifest(&json, path).expect("a serialized manifest parses");
            assert_eq!(
                serde_json::to_string(&m2).expect("serializes"),
                json,
                "manifest JSON round trip"
            );
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty());
            assert!(
                msg.contains("manifest.json"),
                "error without the file name: {msg}"
            );
        }
    }
});
