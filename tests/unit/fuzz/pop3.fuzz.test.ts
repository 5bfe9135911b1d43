/**
 * Fuzz: the POP3 adapter in the AUTHORIZATION state, fed through the real
 * LineReader the way the session driver feeds it: generated commands with
 * hostile arguments (bare CR, NUL, 8-bit, overlong), SASL dialogues and raw
 * garbage, cut at random offsets.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { DEFAULT_LIMITS } from '../../../src/config/schema.ts';
import { Pop3Adapter, pop3Protocol } from '../../../src/protocols/pop3.ts';
import { encodePlain } from '../../../src/protocols/sasl.ts';
import { facts, listener } from '../../helpers/adapters.ts';
import { assertCleanCredentials, count, crlfLines, cutsArb, drive, params, split } from './helpers.ts';
import { pop3Stream as stream } from './streams.ts';

const SMALL = { ...DEFAULT_LIMITS, max_line: 512, max_literal: 300, max_sasl: 200, max_preauth_commands: 25, max_auth_attempts: 3 };

/** Status lines, a SASL continuation, or a line of a multi-line answer (CAPA, the AUTH list) ended by ".". */
const POP3_LINE = /^(\+OK\b|-ERR\b|\+ |\.$|[A-Z][A-Z0-9-]*( [^\s]+)*$)/;

function check(input: Buffer, cuts: number[], tls: boolean, limits: typeof SMALL): void {
  const f = facts(listener('pop3', { tls: tls ? 'implicit' : 'starttls', limits }), tls);
  const caps = { capabilities: ['TOP', 'UIDL', 'SASL PLAIN', 'STLS', 'USER', 'PIPELINING'], at: 0 };
  const r = drive(pop3Protocol, f, caps, split(input, cuts), { tlsUp: () => f.setTls(true) });
  assert.ok(r.maxBuffered <= limits.max_line + limits.max_literal, `the line reader held ${r.maxBuffered} bytes`);
  assert.equal(r.silent, 0, 'every command line gets an answer');
  assert.ok(!r.steps.some((s) => s.kind === 'literal'), 'POP3 has no literals');
  for (const line of crlfLines(r.out)) assert.match(line, POP3_LINE, `not a POP3 response line: ${JSON.stringify(line)}`);
  for (const c of r.logins) assertCleanCredentials(c);
  if (!tls) for (const c of r.logins) assert.ok(c === null || f.tls(), 'no login before STLS on a require_tls listener');
}

test('fuzz: POP3 command streams split at random offsets (small bounds)', () => {
  fc.assert(
    fc.property(stream, cutsArb, fc.boolean(), (input, cuts, tls) => {
      count('pop3');
      check(input, cuts, tls, SMALL);
    }),
    params(400),
  );
});

test('fuzz: POP3 with the default bounds', () => {
  fc.assert(
    fc.property(stream, cutsArb, (input, cuts) => {
      count('pop3');
      check(input, cuts, true, { ...DEFAULT_LIMITS });
    }),
    params(150),
  );
});

test('a bare CR in USER or PASS never reaches the backend command line', () => {
  for (const line of ['USER alice\rXCLIENT ADDR=6.6.6.6', 'PASS pw\rQUIT']) {
    const f = facts(listener('pop3', { tls: 'implicit' }), true);
    const a = new Pop3Adapter(f, undefined);
    if (line.startsWith('PASS')) a.onLine(Buffer.from('USER alice'));
    const step = a.onLine(Buffer.from(line, 'latin1'));
    assert.equal(step.kind, 'reply', `${JSON.stringify(line)} is refused`);
    assert.match((step as { data: string }).data, /^-ERR /);
  }
});

test('a SASL response over max_sasl is refused without decoding it', () => {
  const limits = { ...DEFAULT_LIMITS, max_sasl: 100 };
  const a = new Pop3Adapter(facts(listener('pop3', { tls: 'implicit', limits }), true), undefined);
  const big = encodePlain('alice', 'p'.repeat(200));
  assert.match((a.onLine(Buffer.from(`AUTH PLAIN ${big}`)) as { data: string }).data, /^-ERR /);
  assert.equal(a.onLine(Buffer.from('AUTH PLAIN')).kind, 'reply');
  assert.match((a.onLine(Buffer.from(big)) as { data: string }).data, /^-ERR /);
  assert.equal(a.onLine(Buffer.from(`AUTH PLAIN ${encodePlain('alice', 'pw')}`)).kind, 'login', 'a normal exchange still works');
});
