"""The playground page in a real headless Chromium (Debian's `chromium`, driven by Playwright):
type a prompt, press Generate, and the streamed text equals the gRPC answer; the tokens carry their
log-probabilities and alternatives; seeded sampling through the page equals the same sample over gRPC;
in chat mode two turns of a conversation equal the gRPC answers on the rendered conversation.
Screenshots go to target/playground.png, target/playground-sampling.png and target/playground-chat.png."""
import json
import urllib.request
import os
import shutil

import pytest

import client
from test_client import free_port, serve, stop
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="SKIPPED: no chromium (Debian package `chromium`)")


@pytest.fixture(scope="module")
def page_server():
    http = free_port()
    # The page's origin may call the gRPC port with gRPC-Web (another port: cross-origin, so CORS).
    template = os.path.join(client.ROOT, "deploy", "chat-templates", "dialogpt.jinja")
    proc, port = serve("--http-listen", f"127.0.0.1:{http}", "--cors-allow-origin", f"http://127.0.0.1:{http}",
                       "--chat-template", template)
    yield client.connect(f"127.0.0.1:{port}"), f"http://127.0.0.1:{http}/", f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module's tests."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def test_the_playground_streams_the_grpc_answer_into_a_real_browser(page_server, browser):
    stub, url, _ = page_server
    prompt = "The quick brown fox"
    want = client.generate(stub, prompt, max_new_tokens=24).sequences[0].text
    page = browser.new_page(viewport={"width": 1200, "height": 720})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function("document.getElementById('model').textContent.startsWith('model: ')")
    page.fill("#prompt", prompt)
    page.select_option("#method", "greedy")
    page.fill("#max_tokens", "24")
    page.click("#generate")
    page.wait_for_selector("#usage[data-done='1']", timeout=30000)
    assert page.text_content("#error") == ""
    assert page.text_content("#generated") == want
    assert page.text_content("#output") == prompt + want
    usage = page.text_content("#usage")
    assert "4 prompt + 18 generated tokens" in usage and "finish: stop" in usage, usage
    tokens = page.query_selector_all("#generated .tok")
    assert len(tokens) >= 10
    # Every token is coloured by its log-probability and lists its alternatives.
    first = tokens[0]
    assert float(first.get_attribute("data-logprob")) <= 0
    assert "p=" in first.get_attribute("data-tip")
    first.hover()
    assert page.is_visible("#tip")
    os.makedirs(os.path.join(client.ROOT, "target"), exist_ok=True)
    page.screenshot(path=os.path.join(client.ROOT, "target", "playground.png"))
    # Seeded sampling through the page equals the same sample over gRPC.
    other = "In a distant land, a traveller met a dragon that"
    page.fill("#prompt", other)
    page.select_option("#method", "sampling")
    page.fill("#temperature", "1.3")
    page.fill("#seed", "3")
    page.fill("#max_tokens", "40")
    page.click("#generate")
    page.wait_for_selector("#usage[data-done='1']", timeout=30000)
    sampling = client.pb2.Sampling(temperature=1.3, seed=3)
    request = client.pb2.GenerateRequest(prompt=other, decoding=client.pb2.Decoding(sampling=sampling),
                                         stopping=client.pb2.Stopping(max_new_tokens=40))
    assert page.text_content("#generated") == stub.Generate(request, timeout=30).sequences[0].text
    page.query_selector_all("#generated .tok")[5].hover()
    page.screenshot(path=os.path.join(client.ROOT, "target", "playground-sampling.png"))
    assert errors == [], errors


def rendered_ids(url, messages):
    req = urllib.request.Request(url + "tokenize", json.dumps({"messages": messages}).encode(),
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["tokens"]


def greedy_on(stub, ids, max_new_tokens):
    request = client.pb2.GenerateRequest(prompt_token_ids=ids,
                                         stopping=client.pb2.Stopping(max_new_tokens=max_new_tokens))
    return stub.Generate(request, timeout=30).sequences[0].text


def test_chat_mode_holds_a_conversation_equal_to_the_grpc_answers(page_server, browser):
    stub, url, _ = page_server
    page = browser.new_page(viewport={"width": 1200, "height": 720})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function("document.getElementById('model').textContent.startsWith('model: ')")
    page.select_option("#mode", "chat")
    assert page.is_visible("#system") and page.is_visible("#clear")
    page.select_option("#method", "greedy")
    page.fill("#max_tokens", "16")
    conversation = []
    for message in ["Hello there", "Tell me more"]:
        page.fill("#prompt", message)
        page.click("#generate")
        page.wait_for_selector("#usage[data-done='1']", timeout=30000)
        assert page.text_content("#error") == ""
        conversation.append({"role": "user", "content": message})
        want = greedy_on(stub, rendered_ids(url, conversation), 16)
        assert page.text_content("#generated") == want
        assert page.text_content("#output").endswith("assistant: " + want)
        assert len(page.query_selector_all("#generated .tok")) > 0
        conversation.append({"role": "assistant", "content": want})
        page.evaluate("document.getElementById('usage').dataset.done = ''")
    assert page.input_value("#prompt") == ""
    page.screenshot(path=os.path.join(client.ROOT, "target", "playground-chat.png"))
    assert errors == [], errors


# In the page: a gRPC-Web call of GenerateStream to the gRPC port (another origin), the request
# encoded by hand (prompt = field 1, stopping = field 4 with max_new_tokens = field 1); the
# response body comes back as bytes for Python to unframe and decode.
GRPC_WEB_FETCH = """async ([grpcUrl, prompt, maxNew]) => {
  const text = new TextEncoder().encode(prompt);
  const msg = [0x0a, text.length, ...text, 0x22, 2, 0x08, maxNew];
  const frame = new Uint8Array(5 + msg.length);
  new DataView(frame.buffer).setUint32(1, msg.length);
  frame.set(msg, 5);
  const r = await fetch(grpcUrl + "/batchgen.v1.Generation/GenerateStream", {
    method: "POST", body: frame,
    headers: { "content-type": "application/grpc-web+proto", "x-grpc-web": "1" },
  });
  return { status: r.status, body: Array.from(new Uint8Array(await r.arrayBuffer())) };
}"""


def test_a_browser_page_calls_generate_stream_with_grpc_web_across_origins(page_server, browser):
    stub, url, grpc_url = page_server
    prompt = "Emoji time"
    want = client.generate(stub, prompt, max_new_tokens=24).sequences[0].text
    page = browser.new_page()
    # A document of the HTTP port's origin without the playground's Content-Security-Policy
    # (which lets the page itself connect to its own origin only).
    page.goto(url + "health")
    answer = page.evaluate(GRPC_WEB_FETCH, [grpc_url, prompt, 24])
    assert answer["status"] == 200
    body, texts, trailers = bytes(answer["body"]), [], b""
    while len(body) >= 5:
        flag, length = body[0], int.from_bytes(body[1:5], "big")
        payload, body = body[5:5 + length], body[5 + length:]
        if flag & 0x80:
            trailers += payload
        else:
            texts.append(client.pb2.GenerateStreamResponse.FromString(payload).text)
    assert b"grpc-status:0" in trailers, trailers
    assert len(texts) > 1 and "".join(texts) == want


def test_a_schema_in_the_playground_holds_the_answer_to_it(page_server, browser):
    stub, url, _ = page_server
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    prompt = "A record:"
    request = client.pb2.GenerateRequest(
        prompt=prompt, decoding=client.pb2.Decoding(json_schema=json.dumps(schema)),
        stopping=client.pb2.Stopping(max_new_tokens=40))
    want = stub.Generate(request, timeout=30).sequences[0]
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function("document.getElementById('model').textContent.startsWith('model: ')")
    page.fill("#prompt", prompt)
    page.select_option("#method", "greedy")
    page.fill("#max_tokens", "40")
    page.select_option("#constraint", "json_schema")
    page.fill("#schema", json.dumps(schema))
    page.click("#generate")
    page.wait_for_selector("#usage[data-done='1']", timeout=30000)
    assert page.text_content("#error") == ""
    text = page.text_content("#generated")
    assert text == want.text
    record = json.loads(text)
    assert set(record) == {"n", "ok"} and 0 <= record["n"] <= 99 and isinstance(record["ok"], bool)
    page.screenshot(path=os.path.join(client.ROOT, "target", "playground-schema.png"))
    # A schema that is not JSON is refused in the page, before any request.
    page.evaluate("document.getElementById('usage').dataset.done = ''")
    page.fill("#schema", "{not json")
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.includes('not JSON')")
    assert errors == [], errors
