"""OpenAI chat clients against batchgen's `/v1/chat/completions`: the official `openai` package
(sync and async, streamed and not, n=2, logprobs) and LangChain's `ChatOpenAI` (invoke, stream),
each answer equal to the gRPC answer on the prompt the chat template renders (from `/tokenize`,
which tests/chat.rs holds equal to transformers' apply_chat_template)."""

import asyncio
import json
import os
import urllib.request

import openai
import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

import client
from test_client import free_port, serve, stop

TEMPLATE = os.path.join(client.ROOT, "deploy", "chat-templates", "chatml.jinja")
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name a colour 🎨"},
]


@pytest.fixture(scope="module")
def servers():
    http = free_port()
    proc, port = serve("--http-listen", f"127.0.0.1:{http}", "--chat-template", TEMPLATE,
                       "--served-model-name", "gpt2-chat")
    base = f"http://127.0.0.1:{http}"
    yield client.connect(f"127.0.0.1:{port}"), base
    stop(proc)


def rendered_ids(base, messages):
    body = json.dumps({"messages": messages}).encode()
    req = urllib.request.Request(f"{base}/tokenize", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["tokens"]


def grpc_answer(stub, ids, max_new_tokens, top_logprobs=0, sampling=None):
    request = client.pb2.GenerateRequest(prompt_token_ids=ids, top_logprobs=top_logprobs,
                                         stopping=client.pb2.Stopping(max_new_tokens=max_new_tokens))
    if sampling is not None:
        request.decoding.sampling.CopyFrom(sampling)
    return stub.Generate(request, timeout=30)


def test_sync_chat_equals_the_grpc_answer_with_logprobs(servers):
    stub, base = servers
    oc = openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0)
    r = oc.chat.completions.create(model="gpt2-chat", messages=CONVERSATION, max_completion_tokens=16,
                                   temperature=0, logprobs=True, top_logprobs=3)
    g = grpc_answer(stub, rendered_ids(base, CONVERSATION), 16, top_logprobs=3)
    seq = g.sequences[0]
    assert r.object == "chat.completion" and r.model == "gpt2-chat"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == seq.text
    assert r.usage.prompt_tokens == g.usage.prompt_tokens
    assert r.usage.completion_tokens == g.usage.generated_tokens
    content = r.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([t.logprob for t in seq.tokens], abs=1e-6)
    assert all(len(c.top_logprobs) == 3 for c in content)
    assert bytes(b for c in content for b in c.bytes).decode("utf-8", errors="replace") == seq.text


def test_a_streamed_chat_sends_the_role_then_deltas_then_the_finish_reason(servers):
    stub, base = servers
    oc = openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0)
    chunks = list(oc.chat.completions.create(model="gpt2-chat", messages=CONVERSATION, max_tokens=16,
                                             temperature=0, stream=True, stream_options={"include_usage": True}))
    g = grpc_answer(stub, rendered_ids(base, CONVERSATION), 16)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == g.sequences[0].text
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == ["length" if g.sequences[0].finish_reason == client.pb2.FINISH_REASON_LENGTH else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == g.usage.generated_tokens


def test_async_chat_with_two_seeded_samples_equals_the_grpc_samples(servers):
    stub, base = servers

    async def ask():
        oc = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0)
        try:
            return await oc.chat.completions.create(model="gpt2-chat", messages=CONVERSATION, max_tokens=10, n=2,
                                                    seed=11, temperature=0.9, extra_body={"top_k": 50})
        finally:
            await oc.close()

    r = asyncio.run(ask())
    sampling = client.pb2.Sampling(temperature=0.9, top_k=50, seed=11, num_samples=2)
    g = grpc_answer(stub, rendered_ids(base, CONVERSATION), 10, sampling=sampling)
    assert [c.message.content for c in sorted(r.choices, key=lambda c: c.index)] == [s.text for s in g.sequences]


def test_an_unknown_role_is_a_400_that_names_it(servers):
    _, base = servers
    oc = openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        oc.chat.completions.create(model="gpt2-chat", messages=[{"role": "function", "content": "x", "name": "f"}])
    assert e.value.body["param"] == "messages[0].role"
    assert 'role "function" is not supported' in e.value.body["message"]


def test_langchain_chat_openai_invokes_and_streams(servers):
    stub, base = servers
    llm = ChatOpenAI(base_url=f"{base}/v1", api_key="not-needed", model="gpt2-chat", temperature=0,
                     max_tokens=12, max_retries=0)
    messages = [SystemMessage(CONVERSATION[0]["content"]), HumanMessage(CONVERSATION[1]["content"])]
    g = grpc_answer(stub, rendered_ids(base, CONVERSATION), 12)
    assert llm.invoke(messages).content == g.sequences[0].text
    assert "".join(chunk.content for chunk in llm.stream(messages)) == g.sequences[0].text
