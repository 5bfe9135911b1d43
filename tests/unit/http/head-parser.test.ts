/**
 * The fast path's strict HTTP/1.x head parser and chunked reader
 * (src/http/head-parser.ts): every refusal by its code, heads split at every
 * byte offset, chunked bodies in random pieces, and the rewritten heads
 * (src/http/headers.ts) the backend and the client get.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { checkRequestLine, ChunkedReader, findHeadEnd, HeadError, MAX_CHUNK_LINE, MAX_HEAD_BYTES, parseRequestHead, parseResponseHead, skipLeadingCrlf, type Refusal } from '../../../src/http/head-parser.ts';
import { clientResponseHead, forwardedRequestHead } from '../../../src/http/headers.ts';

/** Finds the end and parses, as the fast path does; returns the refusal code or the head. */
function parse(text: string) {
  const buf = Buffer.from(text, 'latin1');
  const skip = skipLeadingCrlf(buf);
  const rest = buf.subarray(skip);
  const end = findHeadEnd(rest, MAX_HEAD_BYTES);
  if (end === undefined) return 'incomplete' as const;
  return parseRequestHead(rest.subarray(0, end));
}

function refusal(text: string): Refusal | 'accepted' | 'incomplete' {
  try {
    const r = parse(text);
    return r === 'incomplete' ? r : 'accepted';
  } catch (err) {
    assert.ok(err instanceof HeadError, `not a HeadError: ${String(err)}`);
    return err.code;
  }
}

const H = 'Host: gw.test\r\n';

test('a plain request head parses: method, target, version, fields in order, framing', () => {
  const h = parse(`POST /a/b?c=1 HTTP/1.1\r\n${H}Content-Length: 5\r\nX-A:  spaced value  \r\nX-B:\r\n\r\n`);
  assert.ok(h !== 'incomplete');
  assert.equal(h.method, 'POST');
  assert.equal(h.target, '/a/b?c=1');
  assert.equal(h.minor, 1);
  assert.deepEqual(h.body, { kind: 'length', length: 5 });
  assert.deepEqual(h.fields.map((f) => [f.name, f.value]), [['host', 'gw.test'], ['content-length', '5'], ['x-a', 'spaced value'], ['x-b', '']]);
  assert.equal(h.host, 'gw.test');
  const chunked = parse(`PUT / HTTP/1.1\r\n${H}Transfer-Encoding: Chunked\r\n\r\n`);
  assert.ok(chunked !== 'incomplete');
  assert.deepEqual(chunked.body, { kind: 'chunked' });
  const options = parse(`OPTIONS * HTTP/1.1\r\n${H}\r\n`);
  assert.ok(options !== 'incomplete');
  assert.equal(options.target, '*');
  const old = parse('GET / HTTP/1.0\r\n\r\n');
  assert.ok(old !== 'incomplete');
  assert.equal(old.host, undefined, 'HTTP/1.0 may omit Host');
  assert.equal(refusal(`\r\n\r\nGET / HTTP/1.1\r\n${H}\r\n`), 'accepted', 'empty lines before the request line are skipped');
});

test('every ambiguous or malformed head is refused with its own code', () => {
  const cases: [string, Refusal][] = [
    [`POST / HTTP/1.1\r\n${H}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n`, 'cl-and-te'],
    [`POST / HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n`, 'cl-and-te'],
    [`POST / HTTP/1.1\r\n${H}Content-Length: 5\r\nContent-Length: 5\r\n\r\n`, 'duplicate-content-length'],
    [`POST / HTTP/1.1\r\n${H}Content-Length: 5\r\nContent-Length: 6\r\n\r\n`, 'duplicate-content-length'],
    [`POST / HTTP/1.1\r\n${H}Content-Length: 5, 5\r\n\r\n`, 'bad-content-length'],
    [`POST / HTTP/1.1\r\n${H}Content-Length: +5\r\n\r\n`, 'bad-content-length'],
    [`POST / HTTP/1.1\r\n${H}Content-Length: 0x5\r\n\r\n`, 'bad-content-length'],
    [`POST / HTTP/1.1\r\n${H}Content-Length: 1234567890123456\r\n\r\n`, 'bad-content-length'],
    [`POST / HTTP/1.1\r\n${H}Transfer-Encoding: gzip, chunked\r\n\r\n`, 'bad-transfer-encoding'],
    [`POST / HTTP/1.1\r\n${H}Transfer-Encoding: chunked, chunked\r\n\r\n`, 'bad-transfer-encoding'],
    [`POST / HTTP/1.1\r\n${H}Transfer-Encoding: xchunked\r\n\r\n`, 'bad-transfer-encoding'],
    [`POST / HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n`, 'bad-transfer-encoding'],
    [`POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n`, 'te-on-http10'],
    [`GET / HTTP/1.1\r\n${H}X-A: one\r\n two\r\n\r\n`, 'obs-fold'],
    [`GET / HTTP/1.1\r\n${H}X-A: one\r\n\ttwo\r\n\r\n`, 'obs-fold'],
    [`GET / HTTP/1.1\r\n${H}Transfer-Encoding : chunked\r\n\r\n`, 'space-before-colon'],
    [`GET / HTTP/1.1\r\n${H}X-A\t: b\r\n\r\n`, 'space-before-colon'],
    [`GET / HTTP/1.1\r\n${H}X-A: a\0b\r\n\r\n`, 'nul'],
    [`GET / HTTP/1.1\r\n${H}X-A: a\x01b\r\n\r\n`, 'bad-header'],
    [`GET / HTTP/1.1\r\n${H}no-colon\r\n\r\n`, 'bad-header'],
    [`GET / HTTP/1.1\r\n${H}: empty-name\r\n\r\n`, 'bad-header'],
    [`GET / HTTP/1.1\nHost: gw.test\r\n\r\n`, 'bare-lf'],
    [`GET / HTTP/1.1\r\n${H}X-A: b\n\r\n\r\n`, 'bare-lf'],
    [`GET / HTTP/1.1\r\n${H}X-A: b\rc\r\n\r\n`, 'bare-cr'],
    [`GET / HTTP/1.1\r${H}\r\n`, 'bare-cr'],
    [`GET http://other.example/x HTTP/1.1\r\n${H}\r\n`, 'absolute-form'],
    [`CONNECT gw.test:443 HTTP/1.1\r\n${H}\r\n`, 'connect'],
    [`GET gw.test:443 HTTP/1.1\r\n${H}\r\n`, 'authority-form'],
    [`GET * HTTP/1.1\r\n${H}\r\n`, 'authority-form'],
    [`GET / HTTP/2.0\r\n${H}\r\n`, 'bad-version'],
    [`GET / HTTP/1.1 x\r\n${H}\r\n`, 'bad-request-line'],
    [`a001 LOGIN alice secret\r\n${H}\r\n`, 'bad-request-line'],
    [`GET  / HTTP/1.1\r\n${H}\r\n`, 'bad-request-line'],
    [`GET /caf\u00e9 HTTP/1.1\r\n${H}\r\n`, 'bad-request-line'],
    [`GET / HTTP/1.1\r\n\r\n`, 'missing-host'],
    [`GET / HTTP/1.1\r\n${H}${H}\r\n`, 'duplicate-host'],
    [`GET / HTTP/1.1\r\n${H}X-Big: ${'a'.repeat(MAX_HEAD_BYTES)}\r\n\r\n`, 'head-too-large'],
    [`GET / HTTP/1.1\r\n${H}${'X-A: b\r\n'.repeat(201)}\r\n`, 'too-many-headers'],
  ];
  for (const [text, code] of cases) assert.equal(refusal(text), code, JSON.stringify(text.slice(0, 90)));
});

test('a request line that can never start a request is refused as soon as it is complete (an IMAP command on 443)', () => {
  assert.throws(() => checkRequestLine(Buffer.from('a LOGIN alice secret\r\n')), (e: unknown) => (e as HeadError).code === 'bad-request-line');
  assert.throws(() => checkRequestLine(Buffer.from('CONNECT h:443 HTTP/1.1\r\nHo')), (e: unknown) => (e as HeadError).code === 'connect');
  checkRequestLine(Buffer.from('GET /x HTTP/1.1\r\nHost: gw'));
  checkRequestLine(Buffer.from('a LOGIN alice sec'));
});

test('a head is found (or refused) the same wherever the bytes are split', () => {
  const good = `GET /x HTTP/1.1\r\n${H}X-A: b\r\n\r\nGET /next`;
  const bad = `GET /x HTTP/1.1\r\n${H}X-A: b\nX-B: c\r\n\r\n`;
  for (const [text, expect] of [[good, 'end'], [bad, 'bare-lf']] as const) {
    const buf = Buffer.from(text, 'latin1');
    for (let cut = 1; cut < buf.length; cut++) {
      let outcome: string | undefined;
      try {
        const first = findHeadEnd(buf.subarray(0, cut), MAX_HEAD_BYTES);
        const end = first ?? findHeadEnd(buf, MAX_HEAD_BYTES, cut);
        outcome = end === undefined ? 'none' : 'end';
        if (end !== undefined) {
          assert.equal(end, text.indexOf('\r\n\r\n') + 4);
          parseRequestHead(buf.subarray(0, end));
        }
      } catch (err) {
        outcome = (err as HeadError).code;
      }
      assert.equal(outcome, expect, `split at ${cut}`);
    }
  }
});

/** Feeds a chunked body in the given pieces; returns the bytes consumed in total, or the refusal. */
function readChunked(body: string, cuts: number[] = []): number | Refusal {
  const buf = Buffer.from(body, 'latin1');
  const r = new ChunkedReader();
  let used = 0;
  let at = 0;
  try {
    for (const end of [...cuts.filter((c) => c > 0 && c < buf.length).sort((a, b) => a - b), buf.length]) {
      if (r.done) break;
      const piece = buf.subarray(at, end);
      used += r.feed(piece);
      at = end;
    }
  } catch (err) {
    return (err as HeadError).code;
  }
  return r.done ? used : -1;
}

test('chunked bodies: the end is found exactly, extensions and trailers pass, faults are refused', () => {
  const body = '5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n';
  assert.equal(readChunked(`${body}GET /next HTTP/1.1\r\n`), body.length);
  for (let cut = 1; cut < body.length; cut++) assert.equal(readChunked(body, [cut]), body.length, `split at ${cut}`);
  assert.equal(readChunked('zz\r\nbad\r\n'), 'bad-chunk');
  assert.equal(readChunked('5\r\nhelloX\r\n'), 'bad-chunk');
  assert.equal(readChunked('5\nhello\r\n0\r\n\r\n'), 'bare-lf');
  assert.equal(readChunked('5\rx\r\nhello\r\n'), 'bare-cr');
  assert.equal(readChunked('ffffffffffffffff\r\nx\r\n'), 'bad-chunk', 'sizes beyond 15 hex digits');
  assert.equal(readChunked(`5;${'e'.repeat(MAX_CHUNK_LINE)}\r\nhello\r\n`), 'chunk-line-too-long');
  assert.equal(readChunked('0\r\nX-A b\r\n\r\n'), 'bad-header');
  assert.equal(readChunked('0\r\n folded\r\n\r\n'), 'obs-fold');
});

test('property: any chunked body, cut anywhere, ends exactly where it was written', () => {
  fc.assert(
    fc.property(fc.array(fc.uint8Array({ minLength: 1, maxLength: 300 }), { maxLength: 6 }), fc.array(fc.nat(2000), { maxLength: 8 }), (chunks, cuts) => {
      const body = chunks.map((c) => `${c.length.toString(16)}\r\n${Buffer.from(c).toString('latin1')}\r\n`).join('') + '0\r\n\r\n';
      assert.equal(readChunked(`${body}tail`, cuts), body.length);
    }),
    { numRuns: 300 },
  );
});

test('the backend gets the head as sent, minus hop-by-hop, spoofable and routing-override fields, plus ours', () => {
  const h = parse(
    `GET /p?q=1 HTTP/1.1\r\nHost: gw.test:8443\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\n` +
      'X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\nX-Forwarded-Prefix: /admin\r\nX-Forwarded-Server: evil\r\n' +
      'Cookie: a=1\r\nauthorization: Basic eA==\r\n\r\n',
  );
  assert.ok(h !== 'incomplete');
  const wire = forwardedRequestHead(h, { clientIp: '192.0.2.7', proto: 'https', localPort: 443, trust: false, fallbackHost: 'gw.example' });
  assert.equal(
    wire,
    'GET /p?q=1 HTTP/1.1\r\nHost: gw.test:8443\r\nCookie: a=1\r\nauthorization: Basic eA==\r\n' +
      'X-Forwarded-For: 192.0.2.7\r\nX-Real-IP: 192.0.2.7\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Port: 443\r\nX-Forwarded-Host: gw.test:8443\r\n\r\n',
  );
  const trusted = forwardedRequestHead(h, { clientIp: '192.0.2.7', proto: 'https', localPort: 443, trust: true, fallbackHost: 'gw.example' });
  assert.match(trusted, /\r\nX-Forwarded-For: 6\.6\.6\.6, 192\.0\.2\.7\r\n/);
  assert.match(trusted, /\r\nX-Original-URL: \/admin\r\n/, 'kept from a trusted proxy');
  const old = parse('GET / HTTP/1.0\r\n\r\n');
  assert.ok(old !== 'incomplete');
  const wire10 = forwardedRequestHead(old, { clientIp: '192.0.2.7', proto: 'http', localPort: 80, trust: false, fallbackHost: 'gw.example' });
  assert.match(wire10, /^GET \/ HTTP\/1\.0\r\nHost: gw\.example\r\n/, 'an HTTP/1.0 request without Host gets the gateway name');
});

test('the client gets the backend response head minus hop-by-hop fields, with HSTS and Connection: close as needed', () => {
  const head = (text: string) => parseResponseHead(Buffer.from(text, 'latin1'));
  const r = head('HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n');
  assert.equal(r.contentLength, 2);
  assert.equal(clientResponseHead(r, { hsts: 'max-age=60', close: false }), 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nStrict-Transport-Security: max-age=60\r\n\r\n');
  const chunked = head('HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\nStrict-Transport-Security: max-age=1\r\n\r\n');
  assert.equal(chunked.chunked, true);
  assert.equal(clientResponseHead(chunked, { hsts: 'max-age=60', close: true }), 'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nStrict-Transport-Security: max-age=1\r\nConnection: close\r\n\r\n');
  assert.equal(head('HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n').chunked, false, 'not chunked last: the body runs to the close');
  assert.equal(head('HTTP/1.0 200\r\n\r\n').status, 200);
  assert.throws(() => head('HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n'), (e: unknown) => (e as HeadError).code === 'duplicate-content-length');
  assert.throws(() => head('ICY 200 OK\r\n\r\n'), HeadError);
});
