// The Node example client over TLS with a client certificate and an API key, against the real
// server started here with --tls-cert, --tls-key, --tls-client-ca and --api-keys (certificates made
// by tests/clients/make-certs.sh with openssl).
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { freePort } from './free-port.js';

import { ROOT, connect, generate, grpc, modelInfo } from './client.js';

const binary = process.env.BATCHGEN_BIN ?? path.join(ROOT, 'target', 'debug', 'batchgen');
let server;
let target;
let tls;
let apiKey;

before(async () => {
  const certs = fs.mkdtempSync(path.join(os.tmpdir(), 'batchgen-certs-'));
  execFileSync(path.join(ROOT, 'tests', 'clients', 'make-certs.sh'), [certs]);
  const [key, line] = execFileSync(binary, ['keygen', 'node-tests'], { encoding: 'utf8' }).trim().split('\n');
  apiKey = key;
  fs.writeFileSync(path.join(certs, 'keys.txt'), `${line}\n`);
  const read = (name) => fs.readFileSync(path.join(certs, name));
  tls = { ca: read('ca.pem'), cert: read('client.pem'), key: read('client.key') };
  const [port, metrics] = [await freePort(), await freePort()];
  server = spawn(binary, ['serve', '--model', path.join(ROOT, 'tests', 'fixtures', 'tiny-gpt2'),
    '--listen', `127.0.0.1:${port}`, '--metrics-listen', `127.0.0.1:${metrics}`, '--http-listen', 'off', '--intra-op-threads', '1',
    '--tls-cert', path.join(certs, 'server.pem'), '--tls-key', path.join(certs, 'server.key'),
    '--tls-client-ca', path.join(certs, 'ca.pem'), '--api-keys', path.join(certs, 'keys.txt')],
  { stdio: 'ignore' });
  target = `localhost:${port}`;
  const client = connect(target, { ...tls, apiKey });
  const deadline = Date.now() + 120000;
  for (;;) {
    try {
      await modelInfo(client);
      client.close();
      return;
    } catch (err) {
      assert.ok(Date.now() < deadline, `the TLS server did not start: ${err.details}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
});

after(() => server?.kill('SIGTERM'));

const reference = (name) =>
  JSON.parse(fs.readFileSync(path.join(ROOT, 'tests', 'fixtures', 'tiny-gpt2-expected.json'), 'utf8')).greedy[name];

test('TLS with a client certificate and an API key generates the reference', async () => {
  const client = connect(target, { ...tls, apiKey });
  const c = reference('short');
  const r = await generate(client, c.prompt, c.max_new_tokens);
  assert.deepEqual(r.sequences[0].tokens.map((t) => t.id), c.output_ids);
  client.close();
});

test('without a client certificate no call is served', async () => {
  const client = connect(target, { ca: tls.ca, apiKey });
  await assert.rejects(generate(client, 'Hello', 2, 10000), (err) => err.code === grpc.status.UNAVAILABLE);
  client.close();
});

test('without an API key or with a wrong one the call is UNAUTHENTICATED', async () => {
  for (const key of [undefined, 'bg-not-a-key']) {
    const client = connect(target, { ...tls, apiKey: key });
    await assert.rejects(generate(client, 'Hello', 2), (err) => err.code === grpc.status.UNAUTHENTICATED);
    client.close();
  }
});
