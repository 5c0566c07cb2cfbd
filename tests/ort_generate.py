"""Greedy generation with a quill bundle's model.onnx in onnxruntime, feeding each step's
present.* back as past_key_values.*; prints the generated token ids as a JSON array.
Usage: python3 ort_generate.py BUNDLE_DIR NEW_TOKENS ID [ID …]"""
import json
import sys

import numpy as np
import onnxruntime as ort


def main() -> None:
    bundle, new_tokens = sys.argv[1], int(sys.argv[2])
    ids = [int(i) for i in sys.argv[3:]]
    cfg = json.load(open(f"{bundle}/manifest.json"))["config"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(f"{bundle}/model.onnx", opts, providers=["CPUExecutionProvider"])
    n_layers = cfg["n_layers"]
    past = {}
    for layer in range(n_layers):
        for kind in ("key", "value"):
            past[f"past_key_values.{layer}.{kind}"] = np.zeros(
                (1, cfg["n_kv_heads"], 0, cfg["head_dim"]), dtype=np.float32
            )
    outputs = ["logits"] + [
        f"present.{layer}.{kind}" for layer in range(n_layers) for kind in ("key", "value")
    ]
    feed = ids
    generated = []
    for _ in range(new_tokens):
        res = sess.run(outputs, {"input_ids": np.array([feed], dtype=np.int64), **past})
        nxt = int(np.argmax(res[0][0, -1]))
        generated.append(nxt)
        for i, name in enumerate(outputs[1:]):
            past[name.replace("present.", "past_key_values.")] = res[1 + i]
        feed = [nxt]
    json.dump(generated, sys.stdout)


if __name__ == "__main__":
    main()
