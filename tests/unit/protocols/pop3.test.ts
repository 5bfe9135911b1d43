import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { Pop3Adapter, pop3Protocol } from '../../../src/protocols/pop3.ts';
import { b, facts, listener, looped, ScriptedBackend } from '../../helpers/adapters.ts';

const caps = { capabilities: ['TOP', 'UIDL', 'RESP-CODES', 'PIPELINING', 'STLS', 'SASL PLAIN', 'USER', 'IMPLEMENTATION Dovecot'], at: 0 };

function adapter(tls = true) {
  const f = facts(listener('pop3', { tls: tls ? 'implicit' : 'starttls' }), tls);
  return { a: new Pop3Adapter(f, caps), f };
}

test('CAPA lists backend extensions plus our USER/SASL, never the backend STLS or implementation', () => {
  const { a } = adapter();
  const r = a.onLine(b('CAPA'));
  assert.deepEqual(r, { kind: 'reply', data: '+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n' });
});

test('STLS listener: login refused before TLS, STLS offered, state reset after TLS', () => {
  const { a, f } = adapter(false);
  assert.match((a.onLine(b('CAPA')) as { data: string }).data, /STLS\r\n/);
  assert.deepEqual(a.onLine(b('USER bob')), { kind: 'reply', data: '-ERR [AUTH] Log in after STLS\r\n' });
  assert.deepEqual(a.onLine(b('STLS')), { kind: 'starttls', data: '+OK Begin TLS negotiation\r\n' });
  f.setTls(true);
  a.tlsStarted();
  assert.deepEqual(a.onLine(b('USER bob')), { kind: 'reply', data: '+OK\r\n' });
  assert.deepEqual(a.onLine(b('PASS with spaces ')), { kind: 'login', credentials: { user: 'bob', password: 'with spaces ', mechanism: 'USER' } });
});

test('PASS without USER, APOP, unknown commands and the error bound (counted by the pre-login loop)', () => {
  const a = looped(pop3Protocol, facts(listener('pop3', { tls: 'implicit' }), true), caps);
  assert.deepEqual(a.send('PASS x'), { kind: 'reply', data: '-ERR Send USER first\r\n' });
  assert.match((a.send('APOP a b') as { data: string }).data, /^-ERR APOP/);
  assert.match((a.send('STAT') as { data: string }).data, /^-ERR Command STAT is not valid before login/);
  let last;
  for (let i = 0; i < 12; i++) last = a.send('BOGUS');
  assert.equal(last?.kind, 'close');
  assert.deepEqual(last, { kind: 'close', data: '-ERR Command BOGUS is not valid before login\r\n-ERR Too many errors\r\n', reason: 'protocol-error' });
});

test('AUTH PLAIN with initial response, AUTH LOGIN dialogue, AUTH listing', () => {
  const ir = Buffer.from('\0carol\0pw').toString('base64');
  assert.deepEqual(adapter().a.onLine(b(`AUTH PLAIN ${ir}`)), { kind: 'login', credentials: { user: 'carol', password: 'pw', mechanism: 'PLAIN' } });
  const { a } = adapter();
  assert.equal(a.onLine(b('AUTH LOGIN')).kind, 'reply');
  a.onLine(b(Buffer.from('carol').toString('base64')));
  assert.equal(a.onLine(b(Buffer.from('pw').toString('base64'))).kind, 'login');
  assert.deepEqual(adapter().a.onLine(b('AUTH')), { kind: 'reply', data: '+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n' });
});

test('login replay uses AUTH PLAIN when the backend offers it and relays its answer', async () => {
  const { a } = adapter();
  a.onLine(b('USER alice'));
  a.onLine(b('PASS pw'));
  const be = new ScriptedBackend(['+OK Dovecot ready.'], [[/^AUTH PLAIN /, ['+OK Logged in.']]]);
  assert.deepEqual(await a.login(be, { user: 'alice', password: 'pw', mechanism: 'USER' }, caps), { ok: true, reply: '+OK Logged in.\r\n' });
  const bad = new ScriptedBackend(['+OK ready'], [[/^USER /, ['+OK']], [/^PASS /, ['-ERR [AUTH] Authentication failed.']]]);
  const r = await adapter().a.login(bad, { user: 'alice', password: 'x', mechanism: 'USER' }, { capabilities: ['USER'], at: 0 });
  assert.deepEqual(r, { ok: false, reply: '-ERR [AUTH] Authentication failed.\r\n' });
});

test('probe collects CAPA lines', async () => {
  const be = new ScriptedBackend(['+OK hi'], [[/^CAPA/, ['+OK', 'TOP', 'SASL PLAIN', '.']]]);
  assert.deepEqual((await pop3Protocol.probe(be, 'gw')).capabilities, ['TOP', 'SASL PLAIN']);
});

test('property: arbitrary lines never throw', () => {
  fc.assert(
    fc.property(fc.array(fc.uint8Array({ maxLength: 60 }), { maxLength: 30 }), (lines) => {
      const { a } = adapter(false);
      for (const l of lines) {
        const s = a.onLine(Buffer.from(l));
        if (s.kind !== 'reply') break;
      }
    }),
    { numRuns: 300 },
  );
});
