#!/usr/bin/env python3
"""A random-weight GPT-2 of the real 124M shape as a transformers checkpoint
folder (config.json, model.safetensors in float32, the tokenizer files of the
tiny fixture), made with numpy alone: no torch, no transformers, nothing
downloaded. Random weights run at the speed of trained ones, so this is the
benchmark model when torch is not installed (make_fixture.py --shape 124m
--checkpoint makes the same shape with torch). Weights normal(0, 0.02), layer
norms 1 and 0, biases 0, GELU gelu_new, as GPT2Config's defaults.

    python3 scripts/random_checkpoint.py /tmp/gpt2-124m [--seed 1234]
"""
import argparse
import json
import os
import shutil
import struct

import numpy as np

E, INNER, VOCAB, POSITIONS, LAYERS, HEADS = 768, 3072, 50257, 1024, 12, 12
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tiny-gpt2")
TOKENIZER_FILES = ["tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json",
                   "generation_config.json"]


def tensors():
    t = {"transformer.wte.weight": (VOCAB, E), "transformer.wpe.weight": (POSITIONS, E)}
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        t.update({p + "ln_1.weight": (E,), p + "ln_1.bias": (E,), p + "attn.c_attn.weight": (E, 3 * E),
                  p + "attn.c_attn.bias": (3 * E,), p + "attn.c_proj.weight": (E, E), p + "attn.c_proj.bias": (E,),
                  p + "ln_2.weight": (E,), p + "ln_2.bias": (E,), p + "mlp.c_fc.weight": (E, INNER),
                  p + "mlp.c_fc.bias": (INNER,), p + "mlp.c_proj.weight": (INNER, E), p + "mlp.c_proj.bias": (E,)})
    t.update({"transformer.ln_f.weight": (E,), "transformer.ln_f.bias": (E,)})
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    header, blobs, offset = {}, [], 0
    for name, shape in tensors().items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            a = np.ones(shape, np.float32)
        elif len(shape) == 1:
            a = np.zeros(shape, np.float32)
        else:
            a = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        b = a.astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(os.path.join(args.out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    config = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "bos_token_id": 50256,
              "eos_token_id": 50256, "layer_norm_epsilon": 1e-5, "model_type": "gpt2", "n_embd": E, "n_head": HEADS,
              "n_inner": None, "n_layer": LAYERS, "n_positions": POSITIONS, "n_ctx": POSITIONS,
              "scale_attn_weights": True, "vocab_size": VOCAB, "use_cache": True}
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(FIXTURE, name), os.path.join(args.out, name))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
