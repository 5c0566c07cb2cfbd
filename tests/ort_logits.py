"""Runs a quill bundle's model.onnx in onnxruntime with an empty KV cache and prints the logits
of the last position as a JSON array. Usage: python3 ort_logits.py BUNDLE_DIR ID [ID …]"""
import json
import sys

import numpy as np
import onnxruntime as ort


def main() -> None:
    bundle, ids = sys.argv[1], [int(i) for i in sys.argv[2:]]
    manifest = json.load(open(f"{bundle}/manifest.json"))
    cfg = manifest["config"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(f"{bundle}/model.onnx", opts, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([ids], dtype=np.int64)}
    empty = np.zeros((1, cfg["n_kv_heads"], 0, cfg["head_dim"]), dtype=np.float32)
    for layer in range(cfg["n_layers"]):
        feeds[f"past_key_values.{layer}.key"] = empty
        feeds[f"past_key_values.{layer}.value"] = empty
    logits = sess.run(["logits"], feeds)[0]
    json.dump(logits[0, -1].tolist(), sys.stdout)


if __name__ == "__main__":
    main()
