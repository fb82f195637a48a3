#!/usr/bin/env python3
"""The baseline batchgen's single-stream speed is compared with: a plain ONNX
Runtime greedy loop with a KV cache (present fed back as past), batch 1, in
Python with numpy, on the same model and library.

    python3 scripts/ort_loop.py MODEL_DIR --prompt-tokens 32 --new-tokens 128 --threads 2
Prints tokens/s (prefill included, as a client sees it) and ms per decode step.
"""
import argparse
import json
import os
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    t0 = time.perf_counter()
    sess = ort.InferenceSession(os.path.join(a.model, "model.onnx"), so, providers=["CPUExecutionProvider"])
    print(f"session created in {time.perf_counter() - t0:.2f} s")
    heads, dim = cfg["n_head"], cfg["n_embd"] // cfg["n_head"]
    prompt = (np.arange(a.prompt_tokens, dtype=np.int64) * 7 + 100)[None, :]
    for run in range(a.runs):
        past = {f"past_key_values.{i}.{kv}": np.zeros((1, heads, 0, dim), np.float32)
                for i in range(cfg["n_layer"]) for kv in ("key", "value")}
        ids, n_past = prompt, 0
        start = time.perf_counter()
        steps = []
        for step in range(a.new_tokens):
            s = time.perf_counter()
            seq = ids.shape[1]
            feeds = {"input_ids": ids, "attention_mask": np.ones((1, n_past + seq), np.int64),
                     "position_ids": np.arange(n_past, n_past + seq, dtype=np.int64)[None, :], **past}
            out = sess.run(None, feeds)
            logits = out[0][0, -1]
            nxt = int(np.argmax(logits))
            past = {name: out[1 + j] for j, name in enumerate(past)}
            n_past += seq
            ids = np.array([[nxt]], np.int64)
            if step > 0:
                steps.append(time.perf_counter() - s)
        total = time.perf_counter() - start
        print(f"run {run}: {a.new_tokens} tokens in {total:.3f} s = {a.new_tokens / total:.1f} tokens/s, "
              f"decode step median {1000 * np.median(steps):.2f} ms")


if __name__ == "__main__":
    main()
