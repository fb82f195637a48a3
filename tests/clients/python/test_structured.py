"""Structured outputs through the official `openai` package: OpenAI's response_format (also as the
package's own `parse` helper with a pydantic model) and vLLM's extra fields, on completions and
chat. The fixture's weights are random, so only the constraint makes an answer parse; every answer
that ends ("stop") is checked with Python's `jsonschema` (formats asserted), `re` or by hand."""

import json
import os
import re

import jsonschema
import openai
import pydantic
import pytest

import client
from test_client import free_port, serve, stop

CORPUS = json.load(open(os.path.join(client.ROOT, "tests", "fixtures", "structured", "schemas.json")))
CHATML = os.path.join(client.ROOT, "deploy", "chat-templates", "chatml.jinja")


@pytest.fixture(scope="module")
def oc():
    http = free_port()
    proc, _ = serve("--http-listen", f"127.0.0.1:{http}", "--chat-template", CHATML)
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="not-needed", max_retries=0)
    yield api, api.models.list().data[0].id
    stop(proc)


def check(schema, text):
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    validator.validate(json.loads(text))


def test_every_schema_of_the_corpus_through_response_format(oc):
    api, model = oc
    done = 0
    for name, schema in CORPUS.items():
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        r = api.chat.completions.create(model=model, messages=[{"role": "user", "content": f"A {name}, please."}],
                                        response_format=fmt, max_tokens=120, temperature=0.7, seed=3, n=2)
        for c in r.choices:
            if c.finish_reason == "stop":
                check(schema, c.message.content)
                done += 1
            else:
                assert c.finish_reason == "length"
    # Strings and numbers without bounds let the random model wander past 120 tokens at times.
    assert done >= len(CORPUS) * 2 * 0.4, done


def test_the_packages_parse_helper_gets_its_pydantic_model_back(oc):
    api, model = oc

    class Point(pydantic.BaseModel):
        x: int = pydantic.Field(ge=0, le=99)
        y: int = pydantic.Field(ge=-9, le=9)
        label: str = pydantic.Field(max_length=6)

    r = api.chat.completions.parse(model=model, messages=[{"role": "user", "content": "A point."}],
                                   response_format=Point, max_tokens=60, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "stop", c.message.content
    assert isinstance(c.message.parsed, Point)
    assert c.message.parsed == Point.model_validate_json(c.message.content)


def test_json_object_mode_on_completions_and_a_streamed_answer(oc):
    api, model = oc
    r = api.completions.create(model=model, prompt="JSON:", max_tokens=80, temperature=0,
                               extra_body={"response_format": {"type": "json_object"}})
    text = r.choices[0].text
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")
    schema = CORPUS["invoice"]
    fmt = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": schema}}
    chunks = list(api.chat.completions.create(model=model, messages=[{"role": "user", "content": "An invoice."}],
                                              response_format=fmt, max_tokens=100, temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "An invoice."}],
                                        response_format=fmt, max_tokens=100, temperature=0)
    assert streamed == whole.choices[0].message.content
    if whole.choices[0].finish_reason == "stop":
        check(schema, streamed)


def test_vllm_clients_extra_fields_work_unchanged(oc):
    api, model = oc
    r = api.completions.create(model=model, prompt="Sentiment:", max_tokens=10, temperature=1.0, n=4, seed=1,
                               extra_body={"guided_choice": ["positive", "negative", "neutral"]})
    assert all(c.text in ("positive", "negative", "neutral") for c in r.choices)
    # ASCII digits: \d is any Unicode digit, as in Python's re (the random model picks Devanagari too).
    phone = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"
    r = api.completions.create(model=model, prompt="Phone:", max_tokens=20, temperature=0.9, seed=2,
                               extra_body={"guided_regex": phone})
    assert r.choices[0].finish_reason == "stop" and re.fullmatch(phone, r.choices[0].text), r.choices[0].text
    r = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Pick."}], max_tokens=10,
                                    temperature=0, extra_body={"structured_outputs": {"choice": ["A", "B"]}})
    assert r.choices[0].message.content in ("A", "B")
    schema = CORPUS["classification"]
    r = api.completions.create(model=model, prompt="Label:", max_tokens=60, temperature=0,
                               extra_body={"guided_json": schema})
    if r.choices[0].finish_reason == "stop":
        check(schema, r.choices[0].text)
    lark = 'start: expr\nexpr: NUM | expr "+" NUM\nNUM: /[1-9][0-9]?/'
    r = api.completions.create(model=model, prompt="Sum:", max_tokens=30, temperature=0.8, seed=4,
                               extra_body={"guided_grammar": lark})
    assert re.fullmatch(r"[1-9][0-9]?(\+[1-9][0-9]?)*", r.choices[0].text), r.choices[0].text


def test_bad_constraints_are_refused_with_the_openai_param(oc):
    api, model = oc
    for extra, param in [({"guided_regex": "(a"}, "guided_regex"),
                         ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                             "type": "integer", "minimum": 5, "maximum": 1}}}}, "response_format"),
                         ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
                         ({"response_format": {"type": "yaml"}}, "response_format")]:
        with pytest.raises(openai.BadRequestError) as e:
            api.completions.create(model=model, prompt="x", max_tokens=5, extra_body=extra)
        assert e.value.body["param"] == param, e.value.body
