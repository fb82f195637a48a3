// A small batchgen client in Node.js (@grpc/grpc-js + @grpc/proto-loader), usable as an example.
//
//   node client.js localhost:50051 "The quick brown fox"
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const here = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(here, '..', '..', '..');

const definition = protoLoader.loadSync('batchgen/v1/generation.proto', {
  includeDirs: [path.join(ROOT, 'proto')],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const batchgen = grpc.loadPackageDefinition(definition).batchgen.v1;

/**
 * A client for `target`: plaintext, or TLS when `ca` (a Buffer with the PEM of the CA that signed the
 * server's certificate) is given; with `cert` and `key` (PEM Buffers) it presents a client
 * certificate, for servers run with --tls-client-ca. `apiKey` is sent as `authorization: Bearer
 * <key>` on every call, for servers run with --api-keys (over TLS only, as keys should travel).
 */
export function connect(target, { ca, cert, key, apiKey } = {}) {
  if (!ca) return new batchgen.Generation(target, grpc.credentials.createInsecure());
  let credentials = grpc.credentials.createSsl(ca, key ?? null, cert ?? null);
  if (apiKey) {
    const bearer = grpc.credentials.createFromMetadataGenerator((_, done) => {
      const metadata = new grpc.Metadata();
      metadata.set('authorization', `Bearer ${apiKey}`);
      done(null, metadata);
    });
    credentials = grpc.credentials.combineChannelCredentials(credentials, bearer);
  }
  return new batchgen.Generation(target, credentials);
}

export const SERVICE_CONFIG = path.join(ROOT, 'deploy', 'grpc', 'service-config.json');

/**
 * A client that balances calls over every address the target resolves to (round robin) and retries
 * UNAVAILABLE on another one: for several replicas, e.g. the headless Kubernetes Service
 * (`dns:///batchgen-headless:50051`).
 */
export function connectBalanced(target, { serviceConfig = SERVICE_CONFIG, authority } = {}) {
  const config = fs.readFileSync(serviceConfig, 'utf8');
  const options = { 'grpc.service_config': config, 'grpc.enable_retries': 1 };
  // A list of addresses (`ipv4:a:p,b:q`) is no valid :authority: name one.
  if (authority) options['grpc.default_authority'] = authority;
  return new batchgen.Generation(target, grpc.credentials.createInsecure(), options);
}

/** The Generation service definition (for servers in tests). */
export const GenerationService = batchgen.Generation.service;

/** Unary call: resolves with the whole GenerateResponse. */
export function generate(client, prompt, maxNewTokens = 32, deadlineMs = 30000) {
  return new Promise((resolve, reject) => {
    const request = { prompt, stopping: { max_new_tokens: maxNewTokens } };
    client.Generate(request, { deadline: Date.now() + deadlineMs }, (err, response) =>
      err ? reject(err) : resolve(response));
  });
}

/** Streaming call: calls onText with each piece of text as it arrives; resolves with the messages. */
export function stream(client, prompt, { maxNewTokens = 32, deadlineMs = 30000, ignoreEos = false, onText = () => {} } = {}) {
  return new Promise((resolve, reject) => {
    const request = { prompt, stopping: { max_new_tokens: maxNewTokens, ignore_eos: ignoreEos } };
    const call = client.GenerateStream(request, { deadline: Date.now() + deadlineMs });
    const messages = [];
    call.on('data', (m) => { onText(m.text); messages.push(m); });
    call.on('error', reject);
    call.on('end', () => resolve(messages));
  });
}

/** Starts a long generation and cancels it after `afterTokens` tokens; resolves with the tokens received. */
export function streamAndCancel(client, prompt, afterTokens) {
  return new Promise((resolve, reject) => {
    const call = client.GenerateStream({ prompt, stopping: { max_new_tokens: 200, ignore_eos: true } });
    let received = 0;
    call.on('data', (m) => {
      received += m.tokens.length;
      if (received >= afterTokens) call.cancel();
    });
    call.on('error', (err) => (err.code === grpc.status.CANCELLED ? resolve(received) : reject(err)));
    call.on('end', () => resolve(received));
  });
}

export function modelInfo(client) {
  return new Promise((resolve, reject) =>
    client.ModelInfo({}, (err, info) => (err ? reject(err) : resolve(info))));
}

export { grpc };

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const [target, prompt] = process.argv.slice(2);
  const client = connect(target);
  try {
    const messages = await stream(client, prompt, { onText: (t) => process.stdout.write(t) });
    const last = messages[messages.length - 1];
    console.log(`\n[${last.usage.generated_tokens} tokens, ${last.finish_reason}]`);
  } catch (err) {
    console.error(`error ${grpc.status[err.code]}: ${err.details}`);
    process.exit(1);
  }
}
