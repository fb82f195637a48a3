"""Renders each chat template of deploy/chat-templates/ and tests/fixtures/chat/ over a set of
conversations with transformers' own apply_chat_template (the tiny fixture's tokenizer, its
special tokens), with and without add_generation_prompt, and saves text and token ids to
tests/fixtures/chat-expected.json, which tests/chat.rs must equal token for token.

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install "transformers==4.57.*" jinja2
    /tmp/tfenv/bin/python scripts/make_chat_fixture.py
(no torch needed: only the tokenizer is loaded)
"""
import glob
import json
import os

import transformers
from transformers import AutoTokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tiny-gpt2")

CONVERSATIONS = {
    "one_user": [{"role": "user", "content": "Hello there!"}],
    "with_system": [
        {"role": "system", "content": "  You are terse.  "},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": " 4. "},
        {"role": "user", "content": "And  2+3 ?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why?", "name": "bob"},
    ],
    "unicode": [
        {"role": "user", "content": "你好，世界 👋 \"quoted\" <tag> & 'apostrophe'\nsecond line"},
        {"role": "assistant", "content": "Ça va — très bien."},
        {"role": "user", "content": "STOP here"},
    ],
    "not_alternating": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
}


def main():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    templates = sorted(glob.glob(os.path.join(ROOT, "deploy", "chat-templates", "*.jinja")))
    templates += sorted(glob.glob(os.path.join(ROOT, "tests", "fixtures", "chat", "*.jinja")))
    cases = []
    for path in templates:
        source = open(path, encoding="utf-8").read()
        for name, messages in CONVERSATIONS.items():
            for add in (False, True):
                case = {"template": os.path.relpath(path, ROOT), "conversation": name, "messages": messages,
                        "add_generation_prompt": add}
                try:
                    text = tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                                         add_generation_prompt=add)
                    ids = tokenizer.apply_chat_template(messages, chat_template=source, tokenize=True,
                                                        add_generation_prompt=add)
                    if isinstance(ids, dict):
                        ids = ids["input_ids"]
                    case.update(text=text, ids=list(ids))
                except Exception as e:  # the template refuses the conversation (raise_exception)
                    case.update(error=str(e))
                cases.append(case)
    out = {"transformers": transformers.__version__, "tokenizer": "tests/fixtures/tiny-gpt2", "cases": cases}
    with open(os.path.join(ROOT, "tests", "fixtures", "chat-expected.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{len(cases)} cases, {sum('error' in c for c in cases)} refused by their template")


if __name__ == "__main__":
    main()
