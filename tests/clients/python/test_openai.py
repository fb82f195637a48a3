"""The official `openai` Python package against batchgen's HTTP front (`/v1/completions`), started
here with the gRPC port beside it: every answer equals the gRPC answer for the same settings."""

import openai
import pytest

import client
from test_client import free_port, serve, stop


@pytest.fixture(scope="module")
def servers():
    http = free_port()
    proc, port = serve("--http-listen", f"127.0.0.1:{http}")
    oc = openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="not-needed", max_retries=0)
    yield client.connect(f"127.0.0.1:{port}"), oc, oc.models.list().data[0].id
    stop(proc)


def grpc_sampling(stub, prompt, n, seed, max_new_tokens, top_k=0, top_logprobs=0, ignore_eos=False):
    sampling = client.pb2.Sampling(temperature=0.8, top_k=top_k, seed=seed, num_samples=n)
    request = client.pb2.GenerateRequest(
        prompt=prompt, decoding=client.pb2.Decoding(sampling=sampling), top_logprobs=top_logprobs,
        stopping=client.pb2.Stopping(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos))
    return stub.Generate(request, timeout=30)


def test_a_greedy_completion_equals_the_grpc_answer(servers):
    stub, oc, model = servers
    r = oc.completions.create(model=model, prompt="The quick brown fox", max_tokens=24, temperature=0)
    g = client.generate(stub, "The quick brown fox", max_new_tokens=24)
    assert r.object == "text_completion" and r.model == model
    assert r.choices[0].text == g.sequences[0].text
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == g.usage.prompt_tokens
    assert r.usage.completion_tokens == g.usage.generated_tokens
    assert r.usage.total_tokens == g.usage.prompt_tokens + g.usage.generated_tokens


def test_a_repeated_prompt_reports_its_cached_tokens_in_the_openai_shape(servers):
    _, oc, model = servers
    prompt = ("A system prompt that every request of this test begins with, long enough for two of the "
              "cache's blocks of sixteen tokens, and then a question.")
    first = oc.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0)
    again = oc.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0)
    # The openai package parses batchgen's usage.prompt_tokens_details; the
    # prefix cache (on by default) served the second prompt but its last token.
    assert again.choices[0].text == first.choices[0].text
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens


def test_a_streamed_completion_concatenates_to_the_unary_text_and_ends_with_usage(servers):
    stub, oc, model = servers
    chunks = list(oc.completions.create(model=model, prompt="Emoji time 🎉", max_tokens=24, temperature=0,
                                        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    g = client.generate(stub, "Emoji time 🎉", max_new_tokens=24)
    assert text == g.sequences[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == g.usage.generated_tokens


def test_n_seeded_samples_equal_the_grpc_samples(servers):
    stub, oc, model = servers
    r = oc.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0.8, n=3,
                              seed=5, extra_body={"top_k": 40, "ignore_eos": True})
    g = grpc_sampling(stub, "Once upon a time", 3, 5, 12, top_k=40, ignore_eos=True)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [s.text for s in g.sequences]
    assert all(c.finish_reason == "length" for c in r.choices)


def test_logprobs_carry_each_tokens_logprob_alternatives_and_offset(servers):
    stub, oc, model = servers
    r = oc.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0.8, seed=1, logprobs=3,
                              extra_body={"ignore_eos": True})
    g = grpc_sampling(stub, "Hello", 1, 1, 8, top_logprobs=3, ignore_eos=True)
    lp = r.choices[0].logprobs
    tokens = g.sequences[0].tokens
    assert lp.tokens == [t.text for t in tokens]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in tokens], abs=1e-6)
    assert all(1 <= len(alternatives) <= 3 for alternatives in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)


def test_errors_are_openai_errors_with_the_field_named(servers):
    _, oc, model = servers
    with pytest.raises(openai.BadRequestError) as e:
        oc.completions.create(model=model, prompt="Hi", max_tokens=4, temperature=-1)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        oc.completions.create(model=model, prompt="Hi", suffix="!")
    assert e.value.param == "suffix"
    with pytest.raises(openai.NotFoundError) as e:
        oc.completions.create(model="gpt-4", prompt="Hi")
    assert e.value.code == "model_not_found"
