/**
 * Fuzz: the SASL PLAIN / LOGIN exchanges shared by IMAP, POP3 and SMTP, with
 * any responses a client can send (valid and invalid base64, NUL/CR/LF inside
 * the decoded text, aborts, too many steps).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { decodePlain, encodePlain, parseMechanism, SaslExchange, type SaslStep } from '../../../src/protocols/sasl.ts';
import { assertCleanCredentials, count, nastyBytes, nastyText, params } from './helpers.ts';

const response = fc.oneof(
  { weight: 3, arbitrary: nastyBytes(40).map((b) => b.toString('base64')) },
  { weight: 2, arbitrary: fc.tuple(nastyText(12), nastyText(12), nastyText(6)).map(([u, p, z]) => Buffer.from(`${z}\0${u}\0${p}`, 'latin1').toString('base64')) },
  { weight: 2, arbitrary: fc.tuple(fc.string({ maxLength: 12 }), fc.string({ maxLength: 12 })).map(([u, p]) => encodePlain(u, p)) },
  { weight: 1, arbitrary: fc.constantFrom('*', '=', '', ' ', '==', 'A===', 'AAAA====', '  QUJD  ', 'QUJD\t', '\u00e9\u00e9\u00e9\u00e9') },
  { weight: 1, arbitrary: nastyText(30) },
);

test('fuzz: any sequence of responses ends in done or fail within three steps, never throws, never yields dirty credentials', () => {
  fc.assert(
    fc.property(fc.constantFrom('PLAIN' as const, 'LOGIN' as const), fc.option(response, { nil: undefined }), fc.array(response, { maxLength: 6 }), (mech, ir, rest) => {
      count('sasl');
      const ex = new SaslExchange(mech);
      let step = ex.start(ir);
      let exchanges = ir === undefined ? 0 : 1;
      for (const r of rest) {
        if (step.kind !== 'challenge') break;
        assert.match(step.challenge, /^[A-Za-z0-9+/]*={0,2}$/, 'a challenge is base64');
        step = ex.next(r);
        exchanges++;
      }
      if (step.kind === 'done') assertCleanCredentials(step.credentials);
      if (step.kind === 'done') assert.ok(step.credentials.password.length > 0, 'an empty password is never handed on');
      assert.ok(exchanges <= 3 || step.kind !== 'challenge' || rest.length < 3, 'the exchange does not go on for ever');
      if (step.kind === 'challenge') {
        // Whatever follows, at most two more client responses are taken.
        let s: SaslStep = step;
        let n = 0;
        while (s.kind === 'challenge' && n < 10) {
          s = ex.next(encodePlain('u', 'p'));
          n++;
        }
        assert.ok(n <= 2, `the exchange took ${n} more responses`);
      }
    }),
    params(1000),
  );
});

test('fuzz: decodePlain accepts exactly three NUL-separated fields of clean text', () => {
  fc.assert(
    fc.property(nastyBytes(60), (bytes) => {
      count('sasl');
      const c = decodePlain(bytes);
      if (c === undefined) return;
      assertCleanCredentials(c);
      const fields = bytes.toString('utf8').split('\0');
      assert.equal(fields.length, 3);
      assert.equal(c.user, fields[1]);
      assert.equal(c.password, fields[2]);
    }),
    params(1000),
  );
});

test('fuzz: PLAIN round-trips any Unicode user and password without NUL, CR or LF', () => {
  const text = fc.string({ unit: 'grapheme', minLength: 1, maxLength: 30 }).filter((s) => !/[\0\r\n]/.test(s));
  fc.assert(
    fc.property(text, text, (user, password) => {
      count('sasl');
      const step = new SaslExchange('PLAIN').start(encodePlain(user, password));
      assert.deepEqual(step, { kind: 'done', credentials: { user, password, mechanism: 'PLAIN' } });
    }),
    params(500),
  );
});

test('fuzz: mechanism names are matched case-insensitively and nothing else is accepted', () => {
  fc.assert(
    fc.property(nastyText(10), (name) => {
      count('sasl');
      const m = parseMechanism(name);
      if (m !== undefined) assert.equal(name.toUpperCase(), m);
    }),
    params(500),
  );
});
