"""A small batchgen client in Python (grpcio), usable as an example.

The stubs are generated from proto/ with grpcio-tools (see `load_stubs`), never written by hand.

    python client.py localhost:50051 "The quick brown fox"
"""
import importlib
import os
import subprocess
import sys
import tempfile

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
PROTO = os.path.join(ROOT, "proto")


def load_stubs():
    """Generates batchgen/v1/generation_pb2{,_grpc}.py from proto/ into a temporary directory and imports them."""
    out = tempfile.mkdtemp(prefix="batchgen-stubs-")
    subprocess.check_call([
        sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO}", f"--python_out={out}", f"--grpc_python_out={out}",
        os.path.join(PROTO, "batchgen", "v1", "generation.proto"),
    ])
    sys.path.insert(0, out)
    pb2 = importlib.import_module("batchgen.v1.generation_pb2")
    pb2_grpc = importlib.import_module("batchgen.v1.generation_pb2_grpc")
    return pb2, pb2_grpc


pb2, pb2_grpc = load_stubs()


def connect(target, ca=None, cert=None, key=None, api_key=None):
    """A stub for `target`: plaintext, or TLS when `ca` (PEM bytes of the CA that signed the server's
    certificate) is given. With `cert` and `key` (PEM bytes) the client presents its certificate, for
    servers run with --tls-client-ca. `api_key` is sent as `authorization: Bearer <key>` on every call,
    for servers run with --api-keys; grpcio sends call credentials over TLS only, as keys should be."""
    if ca is None:
        return pb2_grpc.GenerationStub(grpc.insecure_channel(target))
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    if api_key:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(api_key))
    return pb2_grpc.GenerationStub(grpc.secure_channel(target, credentials))


SERVICE_CONFIG = os.path.join(ROOT, "deploy", "grpc", "service-config.json")


def connect_balanced(target, service_config=SERVICE_CONFIG, authority=None):
    """A channel that balances calls over every address the target resolves to (round robin) and
    retries UNAVAILABLE on another one: for several replicas, e.g. the headless Kubernetes Service
    (`dns:///batchgen-headless:50051`). `authority`: the :authority to send when the target is a list
    of addresses (`ipv4:a:p,b:q`), whose text is not a valid authority."""
    with open(service_config) as f:
        config = f.read()
    options = [("grpc.service_config", config), ("grpc.enable_retries", 1)]
    if authority:
        options.append(("grpc.default_authority", authority))
    return pb2_grpc.GenerationStub(grpc.insecure_channel(target, options=options))


def generate(stub, prompt, max_new_tokens=32, timeout=30):
    """Unary call: the whole answer at once."""
    request = pb2.GenerateRequest(prompt=prompt, stopping=pb2.Stopping(max_new_tokens=max_new_tokens))
    return stub.Generate(request, timeout=timeout)


def stream(stub, prompt, max_new_tokens=32, out=sys.stdout, timeout=30, **stopping):
    """Streaming call: prints text as it arrives; returns the messages."""
    request = pb2.GenerateRequest(
        prompt=prompt, stopping=pb2.Stopping(max_new_tokens=max_new_tokens, **stopping))
    messages = []
    for message in stub.GenerateStream(request, timeout=timeout):
        out.write(message.text)
        out.flush()
        messages.append(message)
    return messages


def stream_and_cancel(stub, prompt, after_tokens):
    """Starts a long generation and cancels it after some tokens (the server frees the row at once)."""
    request = pb2.GenerateRequest(prompt=prompt, stopping=pb2.Stopping(max_new_tokens=200, ignore_eos=True))
    call = stub.GenerateStream(request)
    received = 0
    for message in call:
        received += len(message.tokens)
        if received >= after_tokens:
            call.cancel()
            break
    return received


def bad_request_violations(error):
    """The google.rpc.BadRequest field violations of a failed call, as (field, description) pairs."""
    status = rpc_status.from_call(error)
    out = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend((v.field, v.description) for v in bad.field_violations)
    return out


def health(target, service="", ca=None, cert=None, key=None):
    """The serving status of `service` (health needs no API key), over TLS when `ca` is given."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    if ca is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca, key, cert))
    stub = health_pb2_grpc.HealthStub(channel)
    status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def model_info_by_reflection(target):
    """Calls ModelInfo knowing nothing but the service name: the descriptors come from server reflection."""
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    channel = grpc.insecure_channel(target)
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    method = pool.FindServiceByName("batchgen.v1.Generation").FindMethodByName("ModelInfo")
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary("/batchgen.v1.Generation/ModelInfo",
                               request_serializer=request_class.SerializeToString,
                               response_deserializer=response_class.FromString)
    return call(request_class(), timeout=10)


if __name__ == "__main__":
    target, prompt = sys.argv[1], sys.argv[2]
    stub = connect(target)
    try:
        last = stream(stub, prompt)[-1]
        print(f"\n[{last.usage.generated_tokens} tokens, {pb2.FinishReason.Name(last.finish_reason)}]")
    except grpc.RpcError as e:
        print(f"error {e.code().name}: {e.details()}", file=sys.stderr)
        for field, description in bad_request_violations(e):
            print(f"  {field}: {description}", file=sys.stderr)
        sys.exit(1)
