#!/usr/bin/env python3
"""Perplexity references for `batchgen eval` (tests/eval.rs), computed with transformers.

Sliding window as transformers documents it ("Perplexity of fixed-length models"):
windows of `window` tokens starting every `stride`, each scoring the tokens after the
previous window's end. The total is the exact sum of the scored tokens' negative
log-likelihoods over their count (the documented loop weights each window's mean by
its target count minus one, an approximation batchgen does not copy).

    python3 scripts/eval_reference.py --model tests/fixtures/gpt2-3l-checkpoint \
        --tokenizer tests/fixtures/tiny-gpt2/tokenizer.json \
        --text tests/fixtures/eval-text.txt --out tests/fixtures/eval-reference.json

Needs torch and transformers (not needed by the tests).
"""
import argparse
import json
import math

import torch
from transformers import GPT2LMHeadModel, GPT2TokenizerFast


def sliding(model, ids, window, stride):
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(x).logits.double()
        # What transformers' loss does: shift, ignore -100, but summed.
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        nll += loss.item()
        count += int((labels[0, 1:] != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tok = GPT2TokenizerFast(tokenizer_file=args.tokenizer)
    model = GPT2LMHeadModel.from_pretrained(args.model, attn_implementation="eager").float().eval()
    ids = tok(open(args.text, encoding="utf-8").read())["input_ids"]
    cases = []
    for window, stride in [(128, 64), (64, 16), (128, 128)]:
        ppl, count = sliding(model, ids, window, stride)
        cases.append({"window": window, "stride": stride, "perplexity": ppl, "scored": count})
        print(window, stride, ppl, count)
    out = {"model": args.model, "text": args.text, "tokens": len(ids), "transformers": __import__("transformers").__version__,
           "cases": cases}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
