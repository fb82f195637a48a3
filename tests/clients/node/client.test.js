// The Node example client against the real batchgen server, started here on a free loopback port.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { freePort } from './free-port.js';

import {
  GenerationService, ROOT, connect, connectBalanced, generate, grpc, modelInfo, stream, streamAndCancel,
} from './client.js';

let server;
let client;
let target;

before(async () => {
  const binary = process.env.BATCHGEN_BIN ?? path.join(ROOT, 'target', 'debug', 'batchgen');
  const [port, metrics] = [await freePort(), await freePort()];
  server = spawn(binary, ['serve', '--model', path.join(ROOT, 'tests', 'fixtures', 'tiny-gpt2'),
    '--listen', `127.0.0.1:${port}`, '--metrics-listen', `127.0.0.1:${metrics}`, '--http-listen', 'off', '--intra-op-threads', '1'],
  { stdio: 'ignore' });
  target = `127.0.0.1:${port}`;
  client = connect(target);
  const deadline = Date.now() + 120000;
  for (;;) {
    try {
      await modelInfo(client);
      return;
    } catch (err) {
      assert.ok(Date.now() < deadline, `the server did not start: ${err.details}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
});

after(() => {
  client?.close();
  server?.kill('SIGTERM');
});

test('unary', async () => {
  const r = await generate(client, 'The quick brown fox', 8);
  assert.ok(r.request_id);
  assert.equal(r.sequences.length, 1);
  assert.ok(r.sequences[0].tokens.length <= 8);
  assert.equal(r.usage.prompt_tokens, 4);
});

test('streaming text arrives in whole characters and equals the unary text', async () => {
  let text = '';
  const messages = await stream(client, 'Emoji time 🎉', { maxNewTokens: 24, onText: (t) => { text += t; } });
  assert.ok(messages.length > 1);
  assert.ok(!text.includes('\ufffd'));
  const unary = await generate(client, 'Emoji time 🎉', 24);
  assert.equal(text, unary.sequences[0].text);
  assert.notEqual(messages.at(-1).finish_reason, 'FINISH_REASON_UNSPECIFIED');
});

test('cancel mid-stream', async () => {
  const received = await streamAndCancel(client, 'Once upon a time', 5);
  assert.ok(received >= 5 && received < 200);
  assert.ok((await generate(client, 'Hello', 2)).sequences[0].tokens.length > 0);
});

test('deadline', async () => {
  await assert.rejects(
    stream(client, 'Hello '.repeat(40), { maxNewTokens: 200, ignoreEos: true, deadlineMs: 150 }),
    (err) => err.code === grpc.status.DEADLINE_EXCEEDED,
  );
});

test('validation errors name the field', async () => {
  await assert.rejects(generate(client, 'Hello', 100000), (err) => {
    assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
    assert.match(err.details, /^stopping\.max_new_tokens: must be at most 1024, got 100000$/);
    assert.ok(err.metadata.get('grpc-status-details-bin').length > 0, 'rich error details are attached');
    return true;
  });
});

test('model info', async () => {
  const info = await modelInfo(client);
  assert.equal(info.vocab_size, 50257);
  assert.deepEqual(info.decoding_methods, ['greedy', 'sampling', 'beam_search']);
});

test('a balanced client retries UNAVAILABLE on another replica (deploy/grpc/service-config.json)', async () => {
  // Round robin over two "replicas", one answering every call UNAVAILABLE (as a draining one does).
  const fake = new grpc.Server();
  fake.addService(GenerationService, {
    Generate: (call, callback) => callback({ code: grpc.status.UNAVAILABLE, details: 'replica going away' }),
  });
  const fakePort = await new Promise((resolve, reject) => fake.bindAsync('127.0.0.1:0',
    grpc.ServerCredentials.createInsecure(), (err, port) => (err ? reject(err) : resolve(port))));
  const addresses = `ipv4:127.0.0.1:${fakePort},${target}`;
  const balanced = connectBalanced(addresses, { authority: 'batchgen' });
  const plain = new (grpc.makeGenericClientConstructor(GenerationService))(addresses,
    grpc.credentials.createInsecure(), {
      'grpc.service_config': '{"loadBalancingConfig": [{"round_robin": {}}]}',
      'grpc.default_authority': 'batchgen',
    });
  try {
    for (let i = 0; i < 8; i++) {
      const r = await generate(balanced, 'Hello', 4);
      assert.equal(r.sequences.length, 1);
    }
    let failed = 0;
    for (let i = 0; i < 8; i++) {
      try {
        await generate(plain, 'Hello', 4);
      } catch (err) {
        assert.equal(err.code, grpc.status.UNAVAILABLE);
        failed += 1;
      }
    }
    assert.ok(failed > 0, 'without the retry policy some calls reach the unavailable replica');
  } finally {
    balanced.close();
    plain.close();
    fake.forceShutdown();
  }
});
