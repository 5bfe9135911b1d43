/**
 * Fuzz: the IMAP adapter before login, fed through the real LineReader the
 * way the session driver feeds it. Inputs are generated command streams
 * (tags, names, atoms, quoted strings, synchronising and LITERAL+ literals of
 * honest and dishonest sizes, SASL responses, raw garbage) cut at random
 * offsets.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { DEFAULT_LIMITS } from '../../../src/config/schema.ts';
import { validTag } from '../../../src/protocols/imap-syntax.ts';
import { imapProtocol } from '../../../src/protocols/imap.ts';
import { facts, listener } from '../../helpers/adapters.ts';
import { assertCleanCredentials, count, crlfLines, cutsArb, drive, params, split } from './helpers.ts';
import { imapStream as stream } from './streams.ts';

const SMALL = { ...DEFAULT_LIMITS, max_line: 512, max_literal: 300, max_sasl: 200, max_preauth_commands: 25, max_auth_attempts: 3 };

/** What an IMAP server may send before login: untagged data, a continuation, or a tagged status. */
const IMAP_LINE = /^(\* (OK|NO|BAD|BYE|PREAUTH|CAPABILITY|ID)\b|\+ |\+$|[^\s]+ (OK|NO|BAD)\b)/;

function check(input: Buffer, cuts: number[], tls: boolean, limits: typeof SMALL): void {
  const f = facts(listener('imap', { tls: tls ? 'implicit' : 'starttls', limits }), tls);
  const caps = { capabilities: ['IMAP4rev1', 'IDLE', 'AUTH=PLAIN', 'SASL-IR', 'STARTTLS'], at: 0 };
  const r = drive(imapProtocol, f, caps, split(input, cuts), { tlsUp: () => f.setTls(true) });
  assert.ok(r.maxBuffered <= limits.max_line + limits.max_literal, `the line reader held ${r.maxBuffered} bytes`);
  // Lines and literals announced before the last line stay within max_line + max_literal; the last line adds at most max_line.
  const bound = 2 * limits.max_line + limits.max_literal;
  assert.ok(r.maxCommandBytes <= bound, `one command took in ${r.maxCommandBytes} bytes (bound ${bound})`);
  assert.equal(r.silent, 0, 'every command line gets an answer');
  for (const line of crlfLines(r.out)) {
    assert.match(line, IMAP_LINE, `not an IMAP response line: ${JSON.stringify(line)}`);
    const tag = /^([^\s]+) (OK|NO|BAD)\b/.exec(line)?.[1];
    if (tag && tag !== '*' && tag !== '+') assert.ok(validTag(tag), `answered with a tag the client could not have sent: ${JSON.stringify(tag)}`);
  }
  for (const c of r.logins) assertCleanCredentials(c);
  if (r.closed) assert.match(r.out, /\* BYE [^\r\n]*\r\n(?:[^\r\n]*\r\n)?$/, 'a close ends with BYE (and the tagged answer to LOGOUT)');
  if (!tls && r.logins.length > 0) assert.ok(f.tls() || r.logins.length === 0, 'no login before TLS on a require_tls listener');
}

test('fuzz: IMAP command streams with literals, split at random offsets (small bounds)', () => {
  fc.assert(
    fc.property(stream, cutsArb, fc.boolean(), (input, cuts, tls) => {
      count('imap');
      check(input, cuts, tls, SMALL);
    }),
    params(400),
  );
});

test('fuzz: IMAP command streams with the default bounds', () => {
  fc.assert(
    fc.property(stream, cutsArb, (input, cuts) => {
      count('imap');
      check(input, cuts, true, { ...DEFAULT_LIMITS });
    }),
    params(150),
  );
});

test('fuzz: the same stream gives the same answers however it is cut', () => {
  fc.assert(
    fc.property(stream, cutsArb, (input, cuts) => {
      count('imap');
      const run = (chunks: Buffer[]) => {
        const f = facts(listener('imap', { tls: 'implicit', limits: SMALL }), true);
        return drive(imapProtocol, f, undefined, chunks, { tlsUp: () => f.setTls(true) });
      };
      const whole = run([input]);
      const cut = run(split(input, cuts));
      // Closing on a too-long buffer depends on chunk sizes; everything before it must match.
      if (whole.closed !== 'line-too-long' && cut.closed !== 'line-too-long') assert.equal(cut.out, whole.out);
    }),
    params(200),
  );
});

test('fuzz: a command cannot grow without bound through chained literals', () => {
  // LITERAL+ needs no round trip: a client could chain literals for the whole pre-auth time.
  const f = facts(listener('imap', { tls: 'implicit', limits: SMALL }), true);
  const piece = Buffer.concat([Buffer.from(`{${SMALL.max_literal}+}\r\n`), Buffer.alloc(SMALL.max_literal, 0x61)]);
  const chunks = [Buffer.from('a LOGIN '), ...Array.from({ length: 200 }, () => Buffer.concat([piece, Buffer.from(' ')]))];
  const r = drive(imapProtocol, f, undefined, chunks, { tlsUp: () => f.setTls(true) });
  assert.ok(r.closed, 'the session is closed');
  assert.ok(r.maxCommandBytes <= 2 * SMALL.max_line + SMALL.max_literal, `one command took in ${r.maxCommandBytes} bytes`);
  assert.match(r.out, /\* BYE \[TOOBIG\]/);
});
