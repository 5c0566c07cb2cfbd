#!/usr/bin/env python3
"""Writes the small seed corpora in fuzz/corpus/ that need no model: serial frames, typed lines,
text snippets, id sequences, manifests. The tiny bundle's and GGUF seeds come from the
bundle_loader target itself (see RELIABILITY.md). Re-running it rewrites the same files."""
import json, os, struct, zlib

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    path = os.path.join(HERE, "corpus", target, name)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def s(text):
    b = text.encode()
    return varint(len(b)) + b


def cobs(data):
    out, block = bytearray(), bytearray()
    for b in data:
        if b == 0:
            out += bytes([len(block) + 1]) + block
            block = bytearray()
        else:
            block.append(b)
            if len(block) == 254:
                out += bytes([255]) + block
                block = bytearray()
    out += bytes([len(block) + 1]) + block
    return bytes(out)


def frame(payload):
    return cobs(payload + struct.pack("<I", zlib.crc32(payload))) + b"\0"


none = b"\0"
some = lambda b: b"\1" + b
sampling_default = none * 7
sampling_full = (some(varint(32)) + some(struct.pack("<f", 0.7)) + some(varint(40))
                 + some(struct.pack("<f", 0.9)) + some(struct.pack("<f", 0.05))
                 + some(struct.pack("<f", 1.1)) + some(varint(12345678901)))
requests = {
    "ping": b"\0" + varint(0xDEADBEEF),
    "info": b"\1",
    "generate": b"\2" + varint(7) + s("Once upon a time") + b"\0" + sampling_default,
    "generate_chat": b"\2" + varint(300) + s("What is the capital of France? é ✓") + b"\1" + sampling_full,
    "cancel": b"\3" + varint(7),
    "reset": b"\4",
}
responses = {
    "pong": b"\0" + varint(42),
    "token": b"\2" + varint(7) + s(" Paris"),
    "done": b"\3" + varint(7) + b"\0" + b"".join(varint(x) for x in [5, 12, 80, 400, 17, 2048]),
    "error": b"\4" + some(varint(7)) + b"\5" + s("prompt is 900 tokens; the context holds 512"),
    "reset_done": b"\5",
}
for name, p in {**{"req_" + k: v for k, v in requests.items()},
                **{"resp_" + k: v for k, v in responses.items()}}.items():
    put("frame_decoder", name, frame(p))
# A stream: noise, a half frame, a good frame, a corrupted frame, two frames back to back.
good = frame(requests["generate"])
bad = bytearray(good)
bad[5] ^= 0x10
put("frame_decoder", "stream_noise", b"\x13\x37\xff" + good[:9] + b"\0" + good + bytes(bad)
    + frame(requests["ping"]) + frame(requests["cancel"]))
put("frame_decoder", "long_prompt", frame(b"\2" + varint(1) + s("x" * 384) + b"\0" + sampling_default))
put("frame_decoder", "oversized", b"\x01" * 520 + b"\0")

lines = {
    "plain": b"hello world\r",
    "crlf": b"/help\r\n/reset\r\nTell me a story.\n",
    "arrows": b"ab\x1b[A\x1b[B\x1b[1;5Cc\x1bOPd\r",
    "edit": b"helo\x7f\x7flo wrold\x17world\x08\x08ld\r",
    "ctrl": b"junk\x15ok\x03again\r\x04\x11\x13",
    "utf8": "naïve café ✓ 日本語\x7f\r".encode(),
    "bad_utf8": b"ab\xff\xfe\xc3\r",
    "noise": b"a\x01\x02\x1b\x1b[999999999999m\x1b]0;title\x07b\r",
    "long": b"\x00" + b"0123456789abcdefXYZ" * 40 + b"\r\nok\r",
}
for name, data in lines.items():
    put("line_editor", name, b"\x00" + data)
    put("line_editor", name + "_big", b"\x01" + data)

texts = {
    "english": "The quick brown fox jumps over the lazy dog. It's 12:30, isn't it?",
    "code": "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n\t\t  \n",
    "unicode": "naïve café — 日本語のテキスト 🦀🦀 Ελληνικά عربى",
    "special": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
    "digits": "3.14159 2718281828 ٣٤٥ ①②",
    "spaces": "   leading  and   trailing   \n\n\r\n  ",
}
for name, t in texts.items():
    put("tokenizer", "plain_" + name, b"\x00" + t.encode())
    put("tokenizer", "special_" + name, b"\x01" + t.encode())
put("tokenizer", "ids_small", b"\x02" + b"".join(struct.pack("<I", i) for i in [1, 2, 3, 100, 256, 4000, 49151]))
put("tokenizer", "ids_any", b"\x03" + b"".join(struct.pack("<I", i) for i in [0, 0xFFFFFFFF, 49152, 2**31, 5]))
