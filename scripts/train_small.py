#!/usr/bin/env python3
"""Train a small GPT-2 that has learned some English, so that quantization quality
figures (perplexity, top-1 agreement) mean something. Real weights cannot be
downloaded here; this model is what `docs/performance.md`'s quality table is measured on.

Corpus: the text documentation Debian installs (`/usr/share/common-licenses`,
`/usr/share/doc/**`: copyright files, READMEs, changelogs, gzipped ones included),
deduplicated by content. A held-out part (every 20th document, by a hash of its
path, never trained on) is written to `--eval-out` for `batchgen eval`.

    python3 scripts/train_small.py --encoder DIR_WITH_encoder.json_AND_vocab.bpe \
        --out /tmp/gpt2-trained --eval-out /tmp/heldout.txt --minutes 12

Writes a transformers checkpoint folder (config.json, model.safetensors in float32,
tokenizer.json) that `batchgen serve --model` and `batchgen eval` read directly.
Needs torch and transformers (not needed by the tests).
"""
import argparse
import gzip
import hashlib
import math
import os
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixture import tokenizer_from  # noqa: E402


def documents(roots, max_bytes):
    seen = set()
    for root in roots:
        for dirpath, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    continue
                try:
                    if name.endswith(".gz"):
                        with gzip.open(path, "rb") as f:
                            raw = f.read(max_bytes)
                    elif "." not in name or name.endswith((".txt", ".md", ".rst")) or name.isupper():
                        with open(path, "rb") as f:
                            raw = f.read(max_bytes)
                    else:
                        continue
                    text = raw.decode("utf-8")
                except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
                    continue
                if len(text) < 200 or sum(c.isalpha() for c in text) < 0.5 * len(text.replace(" ", "")) * 0.8:
                    continue
                digest = hashlib.sha256(text.encode()).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                yield path, text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--eval-out", required=True)
    ap.add_argument("--minutes", type=float, default=12)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--corpus-mb", type=float, default=6)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 2)
    tok = tokenizer_from(args.encoder, args.out)
    train_text, eval_text, size = [], [], 0
    for path, text in documents(["/usr/share/common-licenses", "/usr/share/doc"], 200_000):
        held_out = hashlib.sha256(path.encode()).digest()[0] % 20 == 0
        (eval_text if held_out else train_text).append(text)
        size += len(text)
        if size > args.corpus_mb * 1e6:
            break
    with open(args.eval_out, "w") as f:
        f.write("\n\n".join(eval_text))
    print(f"corpus: {len(train_text)} training documents, {len(eval_text)} held out "
          f"({sum(map(len, eval_text)) / 1e3:.0f} kB) -> {args.eval_out}", file=sys.stderr)
    ids = []
    for text in train_text:
        ids.extend(tok(text)["input_ids"] + [tok.eos_token_id])
    data = torch.tensor(ids)
    print(f"training tokens: {len(ids)}", file=sys.stderr)
    cfg = GPT2Config(n_layer=args.layers, n_head=args.heads, n_embd=args.width, n_positions=args.context,
                     bos_token_id=50256, eos_token_id=50256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    deadline = time.time() + args.minutes * 60
    model.train()
    step, seen, ctx, start = 0, 0, args.context, time.time()
    while time.time() < deadline:
        # Warm-up 100 steps, then a cosine over the expected number of steps.
        elapsed = (time.time() - start) / (args.minutes * 60)
        lr = 1e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(elapsed, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(data) - ctx - 1, (args.batch,))
        x = torch.stack([data[s:s + ctx] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        seen += x.numel()
        if step % 50 == 0:
            print(f"step {step} tokens {seen} loss {loss.item():.3f} lr {lr:.2e} "
                  f"({seen / (time.time() - start):.0f} tokens/s)", file=sys.stderr, flush=True)
    model.eval()
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"saved {args.out} after {step} steps, {seen} tokens, last loss {loss.item():.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
