import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { LINE_TOO_LONG, LineReader } from '../../../src/net/line-reader.ts';

function readAll(chunks: Buffer[], max = 100): (string | symbol)[] {
  const r = new LineReader(max);
  const out: (string | symbol)[] = [];
  for (const c of chunks) {
    r.push(c);
    for (;;) {
      const l = r.nextLine();
      if (l === null) break;
      if (l === LINE_TOO_LONG) {
        out.push(l);
        return out;
      }
      out.push(l.toString('latin1'));
    }
  }
  return out;
}

test('splits CRLF and bare LF lines the same at every split offset', () => {
  const input = Buffer.from('a1 LOGIN bob secret\r\nb2 NOOP\nc3 LOGOUT\r\n');
  const whole = readAll([input]);
  assert.deepEqual(whole, ['a1 LOGIN bob secret', 'b2 NOOP', 'c3 LOGOUT']);
  for (let i = 0; i <= input.length; i++) {
    for (let j = i; j <= input.length; j += 3) {
      assert.deepEqual(readAll([input.subarray(0, i), input.subarray(i, j), input.subarray(j)]), whole, `split at ${i},${j}`);
    }
  }
});

test('a line longer than the bound is reported, with or without its line ending', () => {
  assert.deepEqual(readAll([Buffer.from(`${'x'.repeat(101)}\r\n`)]), [LINE_TOO_LONG]);
  assert.deepEqual(readAll([Buffer.from('x'.repeat(150))]), [LINE_TOO_LONG]);
  assert.deepEqual(readAll([Buffer.from(`${'x'.repeat(99)}\r\n`)]), ['x'.repeat(99)]);
});

test('takeBytes returns exactly n raw bytes, including CR and LF, then lines resume', () => {
  const r = new LineReader(100);
  r.push(Buffer.from('{5}\r\nab\r\ncd tail\r\n'));
  assert.equal(r.nextLine()?.toString(), '{5}');
  assert.equal(r.takeBytes(5)?.toString(), 'ab\r\nc');
  assert.equal(r.nextLine()?.toString(), 'd tail');
  assert.equal(r.takeBytes(1), null);
});

test('drain hands over everything buffered', () => {
  const r = new LineReader(100);
  r.push(Buffer.from('one\r\ntwo-partial'));
  assert.equal(r.nextLine()?.toString(), 'one');
  assert.equal(r.drain().toString(), 'two-partial');
  assert.equal(r.buffered, 0);
});

test('property: any chunking of any byte stream yields the same lines', () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 300 }), fc.array(fc.nat(300), { maxLength: 10 }), (bytes, cuts) => {
      const buf = Buffer.from(bytes);
      const points = [...new Set(cuts.map((c) => c % (buf.length + 1)))].sort((a, b) => a - b);
      const chunks: Buffer[] = [];
      let prev = 0;
      for (const p of points) {
        chunks.push(buf.subarray(prev, p));
        prev = p;
      }
      chunks.push(buf.subarray(prev));
      assert.deepEqual(readAll(chunks, 64), readAll([buf], 64));
    }),
    { numRuns: 500 },
  );
});
