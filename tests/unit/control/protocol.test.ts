import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import {
  decodeRequest,
  decodeServerMessage,
  encode,
  LineDecoder,
  MAX_REQUEST_LINE,
  ProtocolError,
  type Request,
} from '../../../src/control/protocol.ts';

const requestArb = fc.record({
  id: fc.oneof(fc.nat(), fc.string({ maxLength: 64 })),
  cmd: fc.stringMatching(/^[a-z][a-z0-9.-]{0,20}$/),
  args: fc.dictionary(fc.string({ maxLength: 10 }), fc.oneof(fc.string(), fc.integer(), fc.boolean(), fc.constant(null)), { maxKeys: 5 }),
});

test('a request survives encode, any split into chunks, and decode', () => {
  fc.assert(
    fc.property(fc.array(requestArb, { minLength: 1, maxLength: 5 }), fc.array(fc.nat(), { maxLength: 10 }), (reqs, cuts) => {
      const bytes = Buffer.from(reqs.map((r) => encode(r as Request)).join(''), 'utf8');
      const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
      const dec = new LineDecoder(MAX_REQUEST_LINE);
      const lines: string[] = [];
      let prev = 0;
      for (const p of [...points, bytes.length]) {
        lines.push(...dec.push(bytes.subarray(prev, p)));
        prev = p;
      }
      assert.equal(dec.buffered, 0);
      // An argument named __proto__ never reaches a handler (decoding drops it, see below); everything else survives.
      const expected = (JSON.parse(JSON.stringify(reqs)) as Request[]).map((r) => ({ ...r, args: Object.fromEntries(Object.entries(r.args ?? {}).filter(([k]) => k !== '__proto__')) }));
      assert.deepEqual(lines.map(decodeRequest), expected);
    }),
  );
});

test('every split point of a line with multi-byte characters decodes the same', () => {
  const line = encode({ id: 1, cmd: 'ban', args: { ip: '192.0.2.1', seconds: 60, reason: 'spam – «ünïcödé» 🚫' } });
  const bytes = Buffer.from(line, 'utf8');
  for (let i = 0; i <= bytes.length; i++) {
    const dec = new LineDecoder(1024);
    const out = [...dec.push(bytes.subarray(0, i)), ...dec.push(bytes.subarray(i))];
    assert.equal(out.length, 1, `split at ${i}`);
    assert.deepEqual(decodeRequest(out[0]!).args?.reason, 'spam – «ünïcödé» 🚫');
  }
});

test('the line bound: exactly max bytes pass, one more is TOO_LONG, with or without a newline yet', () => {
  const max = 100;
  const ok = new LineDecoder(max);
  assert.deepEqual(ok.push(Buffer.from('x'.repeat(max) + '\n')), ['x'.repeat(max)]);
  const over = new LineDecoder(max);
  assert.throws(() => over.push(Buffer.from('x'.repeat(max + 1) + '\n')), (e: ProtocolError) => e.code === 'TOO_LONG');
  const noNewline = new LineDecoder(max);
  noNewline.push(Buffer.from('x'.repeat(60)));
  assert.throws(() => noNewline.push(Buffer.from('x'.repeat(41))), (e: ProtocolError) => e.code === 'TOO_LONG');
  // A CRLF line ending is accepted too.
  assert.deepEqual(new LineDecoder(max).push(Buffer.from('{"id":1,"cmd":"status"}\r\n')), ['{"id":1,"cmd":"status"}']);
});

test('an encoded message is one line even when strings contain newlines', () => {
  const line = encode({ type: 'reply', id: 1, ok: false, error: { code: 'FAILED', message: 'a\nb\r\nc\u2028' } });
  assert.equal(line.indexOf('\n'), line.length - 1);
  const back = decodeServerMessage(line.slice(0, -1));
  assert.equal(back.type === 'reply' && !back.ok && back.error.message, 'a\nb\r\nc\u2028');
});

test('malformed requests are BAD_REQUEST, keeping the id when there is one', () => {
  const bad = (line: string) => {
    try {
      decodeRequest(line);
    } catch (err) {
      assert.ok(err instanceof ProtocolError);
      assert.equal(err.code, 'BAD_REQUEST');
      return err.requestId;
    }
    assert.fail(`accepted ${line}`);
  };
  assert.equal(bad('nope'), null);
  assert.equal(bad('[]'), null);
  assert.equal(bad('{"cmd":"status"}'), null);
  assert.equal(bad('{"id":3,"cmd":"Status"}'), 3, 'command names are lower case');
  assert.equal(bad('{"id":4,"cmd":"__proto__"}'), 4);
  assert.equal(bad('{"id":5,"cmd":"status","args":[1]}'), 5);
  assert.equal(bad('{"id":6,"cmd":"status","extra":true}'), 6);
  assert.equal(bad(`{"id":"${'x'.repeat(65)}","cmd":"status"}`), null);
  assert.equal(bad('{"id":-1,"cmd":"status"}'), null);
});

test('an argument named __proto__ is dropped when a request is decoded, so no handler sees it', () => {
  const req = decodeRequest('{"id":1,"cmd":"ban","args":{"__proto__":{"polluted":true},"ip":"192.0.2.1"}}');
  assert.deepEqual(Object.keys(req.args ?? {}), ['ip']);
  assert.equal(({} as Record<string, unknown>).polluted, undefined);
});

test('daemon messages of unknown types are refused', () => {
  assert.throws(() => decodeServerMessage('{"type":"surprise"}'), ProtocolError);
  assert.throws(() => decodeServerMessage('{}'), ProtocolError);
  assert.equal(decodeServerMessage('{"type":"bye","reason":"shutdown"}').type, 'bye');
});
