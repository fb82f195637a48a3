"""The Python example client over TLS with a client certificate and an API key, against the real
server started here with --tls-cert, --tls-key, --tls-client-ca and --api-keys (certificates made by
tests/clients/make-certs.sh with openssl)."""
import io
import json
import os
import subprocess
import tempfile

import grpc
import pytest

import client
from test_client import BINARY, free_port, serve, stop


def read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def tls_server():
    certs = tempfile.mkdtemp(prefix="batchgen-certs-")
    subprocess.check_call([os.path.join(client.ROOT, "tests", "clients", "make-certs.sh"), certs])
    key, line = subprocess.check_output([BINARY, "keygen", "python-tests"], text=True).splitlines()
    keys = os.path.join(certs, "keys.txt")
    with open(keys, "w") as f:
        f.write(line + "\n")
    files = {name: read(os.path.join(certs, name)) for name in ["ca.pem", "client.pem", "client.key"]}
    tls = dict(ca=files["ca.pem"], cert=files["client.pem"], key=files["client.key"])
    http = free_port()
    proc, port = serve("--http-listen", f"127.0.0.1:{http}",
                       "--tls-cert", os.path.join(certs, "server.pem"),
                       "--tls-key", os.path.join(certs, "server.key"),
                       "--tls-client-ca", os.path.join(certs, "ca.pem"), "--api-keys", keys, **tls)
    yield f"localhost:{port}", tls, key, (f"https://localhost:{http}/v1", certs)
    stop(proc)


def reference(name):
    with open(os.path.join(client.ROOT, "tests", "fixtures", "tiny-gpt2-expected.json")) as f:
        return json.load(f)["greedy"][name]


def test_tls_with_client_certificate_and_api_key_generates_the_reference(tls_server):
    target, tls, key, _ = tls_server
    case = reference("short")
    stub = client.connect(target, api_key=key, **tls)
    response = client.generate(stub, case["prompt"], max_new_tokens=case["max_new_tokens"])
    assert [t.id for t in response.sequences[0].tokens] == case["output_ids"]
    out = io.StringIO()
    client.stream(stub, case["prompt"], max_new_tokens=case["max_new_tokens"], out=out)
    assert out.getvalue() == response.sequences[0].text


def test_without_a_client_certificate_the_handshake_fails(tls_server):
    target, tls, key, _ = tls_server
    stub = client.connect(target, ca=tls["ca"], api_key=key)
    with pytest.raises(grpc.RpcError) as e:
        client.generate(stub, "Hello", max_new_tokens=2, timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_without_or_with_a_wrong_api_key_the_call_is_unauthenticated(tls_server):
    target, tls, _, _ = tls_server
    for api_key in [None, "bg-not-a-key"]:
        with pytest.raises(grpc.RpcError) as e:
            client.generate(client.connect(target, api_key=api_key, **tls), "Hello", max_new_tokens=2)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_plaintext_client_gets_nothing(tls_server):
    target, _, _, _ = tls_server
    with pytest.raises(grpc.RpcError) as e:
        client.generate(client.connect(target), "Hello", max_new_tokens=2, timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_http_front_follows_the_grpc_ports_tls_and_keys(tls_server):
    """The OpenAI client over HTTPS with the same CA, client certificate and key as the gRPC calls."""
    import ssl

    import httpx2  # the HTTP client of openai 3.x
    import openai
    target, tls, key, (base_url, certs) = tls_server
    context = ssl.create_default_context(cafile=os.path.join(certs, "ca.pem"))
    context.load_cert_chain(os.path.join(certs, "client.pem"), os.path.join(certs, "client.key"))
    http = httpx2.Client(verify=context)
    oc = openai.OpenAI(base_url=base_url, api_key=key, http_client=http, max_retries=0)
    case = reference("short")
    r = oc.completions.create(model=oc.models.list().data[0].id, prompt=case["prompt"],
                              max_tokens=case["max_new_tokens"], temperature=0)
    g = client.generate(client.connect(target, api_key=key, **tls), case["prompt"], case["max_new_tokens"])
    assert r.choices[0].text == g.sequences[0].text
    # The wrong key, and no client certificate, are refused here too.
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key="bg-wrong", http_client=http, max_retries=0).models.list()
    no_cert = httpx2.Client(verify=ssl.create_default_context(cafile=os.path.join(certs, "ca.pem")))
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(base_url=base_url, api_key=key, http_client=no_cert, max_retries=0).models.list()
