/**
 * Fuzz: SMTP before the backend session (the adapter, fed through the real
 * LineReader, BDAT chunks read as raw bytes the way the driver reads them)
 * and after it (the stream observer, fed hostile bytes from both sides).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { DEFAULT_LIMITS } from '../../../src/config/schema.ts';
import { SmtpObserver } from '../../../src/protocols/smtp-observer.ts';
import { SmtpAdapter } from '../../../src/protocols/smtp.ts';
import { facts, listener } from '../../helpers/adapters.ts';
import { assertCleanCredentials, count, crlfLines, cutsArb, drive, nastyBytes, params, split } from './helpers.ts';
import { smtpStream as stream } from './streams.ts';

const SMALL = { ...DEFAULT_LIMITS, max_line: 512, max_literal: 300, max_sasl: 200, max_preauth_commands: 25, max_auth_attempts: 3 };

const POSTFIX = ['PIPELINING', 'SIZE 10240000', 'ETRN', 'AUTH PLAIN LOGIN', 'XCLIENT NAME ADDR PROTO HELO LOGIN', 'ENHANCEDSTATUSCODES', '8BITMIME', 'DSN', 'CHUNKING', 'STARTTLS'];

type Mode = 'submission' | 'mx';

function check(input: Buffer, cuts: number[], tls: boolean, mode: Mode, limits: typeof SMALL): void {
  const l = listener('smtp', { tls: tls ? 'implicit' : 'starttls', auth: mode === 'mx' ? 'none' : 'required', limits });
  const f = facts(l, tls);
  const adapter = new SmtpAdapter(f, { capabilities: POSTFIX, at: 0 });
  const mails: string[] = [];
  const r = drive(adapter, split(input, cuts), {
    limits,
    tlsUp: () => f.setTls(true),
    loginAnswer: (a, credentials) => {
      const state = (a as unknown as { state: { s: string; pending?: { cmd: string; line?: string } } }).state;
      if (credentials === null && state.pending?.cmd === 'MAIL') mails.push(state.pending.line ?? '');
      return a.loginRefusal('denied');
    },
  });
  assert.ok(r.maxBuffered <= limits.max_line + limits.max_literal, `the line reader held ${r.maxBuffered} bytes`);
  assert.equal(r.silent, 0, 'every command line gets an answer');
  for (const s of r.steps) if (s.kind === 'literal') assert.ok(s.size <= limits.max_literal, `a BDAT chunk of ${s.size} bytes is read before login`);
  const lines = crlfLines(r.out);
  for (const line of lines) assert.match(line, /^[2-5]\d\d[ -]/, `not an SMTP reply line: ${JSON.stringify(line)}`);
  // A multi-line reply never ends on a continuation line.
  if (lines.length > 0) assert.match(lines.at(-1)!, /^\d{3} /);
  for (const c of r.logins) assertCleanCredentials(c);
  if (mode === 'submission') assert.ok(r.logins.every((c) => c !== null), 'a submission listener never opens a backend session without AUTH');
  if (mode === 'submission' && !tls) assert.ok(r.logins.length === 0 || f.tls(), 'no AUTH before STARTTLS on a require_tls listener');
  for (const m of mails) {
    assert.match(m, /^MAIL FROM:/i, 'only a MAIL FROM line opens an MX session');
    assert.doesNotMatch(m, /[\0\r\n]/, `the replayed MAIL line is clean: ${JSON.stringify(m)}`);
  }
}

test('fuzz: SMTP submission command streams incl. BDAT, split at random offsets', () => {
  fc.assert(
    fc.property(stream, cutsArb, fc.boolean(), (input, cuts, tls) => {
      count('smtp');
      check(input, cuts, tls, 'submission', SMALL);
    }),
    params(400),
  );
});

test('fuzz: SMTP MX (auth none) command streams', () => {
  fc.assert(
    fc.property(stream, cutsArb, fc.boolean(), (input, cuts, tls) => {
      count('smtp');
      check(input, cuts, tls, 'mx', SMALL);
    }),
    params(300),
  );
});

// ---- the stream observer ------------------------------------------------------------

const LINE_CAP = 4096;

const clientSeg = fc.oneof(
  { weight: 4, arbitrary: fc.constantFrom('MAIL FROM:<a@x>\r\n', 'RCPT TO:<b@x>\r\n', 'DATA\r\n', 'RSET\r\n', 'EHLO x\r\n', 'QUIT\r\n', '.\r\n', '\r\n.\r\n', 'BDAT 5 LAST\r\n', 'BDAT 0 LAST\r\n', 'bdat 3\r\n', 'BDAT 99999999999999999999\r\n') },
  { weight: 3, arbitrary: nastyBytes(120).map((b) => b.toString('latin1')) },
  { weight: 1, arbitrary: fc.nat(9000).map((n) => `${'x'.repeat(n)}\r\n`) },
);
const backendSeg = fc.oneof(
  { weight: 4, arbitrary: fc.constantFrom('250 ok\r\n', '250-a\r\n250 b\r\n', '354 go\r\n', '550 no\r\n', '221 bye\r\n', '451 later\r\n', '334 \r\n') },
  { weight: 2, arbitrary: nastyBytes(60).map((b) => b.toString('latin1')) },
);
const segments = fc.array(fc.oneof(clientSeg.map((d) => ({ side: 'c' as const, d })), backendSeg.map((d) => ({ side: 'b' as const, d }))), { maxLength: 30 });

test('fuzz: the SMTP observer takes any bytes from either side without throwing, changing them or growing', () => {
  fc.assert(
    fc.property(segments, fc.array(fc.integer({ min: 1, max: 64 }), { minLength: 1, maxLength: 8 }), (segs, sizes) => {
      count('smtp-observer');
      let messages = 0;
      let recipients = 0;
      const o = new SmtpObserver({ onMessage: () => void messages++, onRecipient: () => void recipients++ });
      const peek = o as unknown as { len: number; buf: Buffer | undefined; outstanding: number };
      let k = 0;
      for (const seg of segs) {
        const data = Buffer.from(seg.d, 'latin1');
        for (let i = 0; i < data.length; ) {
          const n = sizes[k++ % sizes.length]!;
          const chunk = data.subarray(i, i + n);
          const copy = Buffer.from(chunk);
          if (seg.side === 'c') o.fromClient(chunk);
          else o.fromBackend(chunk);
          assert.ok(chunk.equals(copy), 'the observer never changes the stream');
          assert.ok(peek.len >= 0 && peek.len <= LINE_CAP, `the observer holds ${peek.len} bytes`);
          assert.ok(peek.buf === undefined || peek.buf.length <= LINE_CAP);
          i += n;
        }
        assert.equal(typeof o.atBoundary(), 'boolean');
      }
      assert.ok(messages >= 0 && recipients >= 0);
    }),
    params(300),
  );
});

test('the observer keeps up with a megabyte of message content in small chunks (no quadratic rescans)', () => {
  const o = new SmtpObserver({ onMessage: () => undefined, onRecipient: () => undefined });
  o.fromClient(Buffer.from('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n'));
  o.fromBackend(Buffer.from('250 ok\r\n250 ok\r\n354 go\r\n'));
  const line = Buffer.from(`${'y'.repeat(70)}\r\n`);
  let messages = 0;
  const counted = new SmtpObserver({ onMessage: () => void messages++, onRecipient: () => undefined });
  counted.fromClient(Buffer.from('DATA\r\n'));
  counted.fromBackend(Buffer.from('354 go\r\n'));
  for (let i = 0; i < 15_000; i++) {
    o.fromClient(line);
    counted.fromClient(line.subarray(0, 30));
    counted.fromClient(line.subarray(30));
  }
  counted.fromClient(Buffer.from('.\r\n'));
  assert.equal(messages, 1);
  assert.equal(counted.atBoundary(), true);
});
