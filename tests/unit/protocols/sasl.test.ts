import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { decodePlain, encodePlain, SaslExchange } from '../../../src/protocols/sasl.ts';

test('PLAIN decodes authzid, user and password', () => {
  assert.deepEqual(decodePlain(Buffer.from('\0alice\0pw d')), { user: 'alice', password: 'pw d', mechanism: 'PLAIN' });
  assert.deepEqual(decodePlain(Buffer.from('admin\0alice\0pw')), { user: 'alice', password: 'pw', authzid: 'admin', mechanism: 'PLAIN' });
  assert.equal(decodePlain(Buffer.from('alice\0pw')), undefined);
  assert.equal(decodePlain(Buffer.from('\0\0pw')), undefined);
  assert.equal(decodePlain(Buffer.from('\0a\0p\0x')), undefined);
  assert.equal(decodePlain(Buffer.from('\0a\r\nb\0p')), undefined, 'CR/LF in a user name is refused');
});

test('PLAIN round-trips any user and password without NUL/CR/LF', () => {
  const text = fc.string({ minLength: 1, maxLength: 40 }).filter((s) => !/[\0\r\n]/.test(s));
  fc.assert(
    fc.property(text, text, (user, password) => {
      const ex = new SaslExchange('PLAIN');
      const step = ex.start(encodePlain(user, password));
      assert.deepEqual(step, { kind: 'done', credentials: { user, password, mechanism: 'PLAIN' } });
    }),
  );
});

test('LOGIN asks for user then password; * aborts; bad base64 fails', () => {
  const ex = new SaslExchange('LOGIN');
  assert.deepEqual(ex.start(), { kind: 'challenge', challenge: Buffer.from('Username:').toString('base64') });
  assert.deepEqual(ex.next(Buffer.from('bob').toString('base64')), { kind: 'challenge', challenge: Buffer.from('Password:').toString('base64') });
  assert.deepEqual(ex.next(Buffer.from('s3cret').toString('base64')), { kind: 'done', credentials: { user: 'bob', password: 's3cret', mechanism: 'LOGIN' } });
  assert.deepEqual(new SaslExchange('LOGIN').next('*'), { kind: 'fail', reason: 'aborted' });
  assert.deepEqual(new SaslExchange('PLAIN').next('%%%%'), { kind: 'fail', reason: 'malformed' });
});

test('property: arbitrary responses never throw', () => {
  fc.assert(
    fc.property(fc.constantFrom('PLAIN' as const, 'LOGIN' as const), fc.array(fc.string({ maxLength: 60 }), { maxLength: 4 }), (mech, responses) => {
      const ex = new SaslExchange(mech);
      for (const r of responses) {
        const s = ex.next(r);
        if (s.kind !== 'challenge') break;
      }
    }),
  );
});
