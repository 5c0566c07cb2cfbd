"""Writes tests/vectors/tokenizer.json: token ids from Hugging Face `tokenizers` (an independent
implementation) for quill's exported tokenizer.json.

Usage: python3 tests/vectors/make_tokenizer_vectors.py BUNDLE_DIR > tests/vectors/tokenizer.json
(needs `pip install tokenizers`). Never edit the output by hand.
"""
import json
import sys

from tokenizers import Tokenizer

TEXTS = [
    "The capital of France is",
    "Hello, world! How are you doing today?",
    "  leading spaces and trailing  ",
    "tabs\tand\nnewlines\n\n\nparagraphs\r\n",
    "Numbers: 12345, 3.14159, 1,000,000 and 2024-11-29.",
    "x2 = a1b22c333",
    "Don't won't I'm you're they've we'll he'd",
    "naïve café résumé — “quotes” ‘single’ …",
    "日本語のテキストと中文文本",
    "emoji 🙂👍🏽 and ZWJ 👨‍👩‍👧 family",
    "Ελληνικά και русский текст",
    "code: fn main() { println!(\"{}\", x); } // comment",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "a\u0301 combining accent and \u00a0nbsp and \u2003em space",
    "!!!???...---___***",
    "   \n   \n",
    "https://example.com/path?query=1&x=y#frag",
    "UPPER lower MiXeD CaSe",
    "٣ arabic-indic digit and ½ vulgar fraction and Ⅻ roman",
    "",
]

def main() -> None:
    tok = Tokenizer.from_file(f"{sys.argv[1]}/tokenizer.json")
    out = []
    for text in TEXTS:
        # quill encodes user text with special tokens off and templates with them on; the
        # `tokenizers` package always matches added tokens, so plain vectors avoid them.
        ids = tok.encode(text, add_special_tokens=False).ids
        out.append({"text": text, "special": "<|" in text, "ids": ids})
    lines = ",\n ".join(json.dumps(e, ensure_ascii=False) for e in out)
    sys.stdout.write(f"[\n {lines}\n]\n")

if __name__ == "__main__":
    main()
