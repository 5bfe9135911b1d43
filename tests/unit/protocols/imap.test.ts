import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { ImapAdapter, imapProtocol } from '../../../src/protocols/imap.ts';
import type { Step } from '../../../src/protocols/types.ts';
import { b, facts, listener, looped, ScriptedBackend } from '../../helpers/adapters.ts';

const caps = { capabilities: ['IMAP4rev1', 'SASL-IR', 'LOGIN-REFERRALS', 'ID', 'ENABLE', 'IDLE', 'LITERAL+', 'STARTTLS', 'AUTH=PLAIN'], at: 0 };

function adapter(tls = true, extra: Record<string, unknown> = {}) {
  const f = facts(listener('imap', { tls: tls ? 'implicit' : 'starttls', ...extra }), tls);
  return { a: new ImapAdapter(f, caps), f };
}

/** Feeds raw client bytes the way the driver does: lines, or literal bytes when asked. */
function feed(a: ImapAdapter, input: string): Step[] {
  const steps: Step[] = [];
  let rest = Buffer.from(input, 'latin1');
  let literal: number | undefined;
  while (rest.length > 0) {
    if (literal !== undefined) {
      const data = rest.subarray(0, literal);
      rest = rest.subarray(literal);
      literal = undefined;
      steps.push(a.onLiteral(data));
      continue;
    }
    const lf = rest.indexOf(0x0a);
    if (lf < 0) break;
    const line = rest.subarray(0, lf > 0 && rest[lf - 1] === 0x0d ? lf - 1 : lf);
    rest = rest.subarray(lf + 1);
    const step = a.onLine(line);
    steps.push(step);
    if (step.kind === 'literal') literal = step.size;
  }
  return steps;
}

test('greeting advertises our mechanisms and the backend extensions, never the backend STARTTLS or referrals', () => {
  const { a } = adapter(true);
  const g = a.greeting();
  assert.match(g, /^\* OK \[CAPABILITY IMAP4rev1 ENABLE IDLE SASL-IR LITERAL\+ ID AUTH=PLAIN AUTH=LOGIN\] mail\.test IMAP ready\r\n$/);
  assert.doesNotMatch(g, /STARTTLS|LOGIN-REFERRALS|LOGINDISABLED/);
});

test('a STARTTLS listener before TLS offers STARTTLS and LOGINDISABLED, refuses LOGIN, and resets after TLS', () => {
  const { a, f } = adapter(false);
  assert.match(a.greeting(), /STARTTLS LOGINDISABLED\]/);
  assert.doesNotMatch(a.greeting(), /AUTH=/);
  assert.deepEqual(a.onLine(b('a LOGIN bob pw')), { kind: 'reply', data: 'a NO [PRIVACYREQUIRED] Log in after STARTTLS\r\n' });
  assert.deepEqual(a.onLine(b('b STARTTLS')), { kind: 'starttls', data: 'b OK Begin TLS negotiation now\r\n' });
  f.setTls(true);
  a.tlsStarted();
  const capa = a.onLine(b('c CAPABILITY'));
  assert.equal(capa.kind, 'reply');
  assert.doesNotMatch((capa as { data: string }).data, /STARTTLS|LOGINDISABLED/);
  assert.equal(a.onLine(b('d LOGIN bob pw')).kind, 'login');
});

test('LOGIN with atoms, quoted strings with escapes, and literals (sync and LITERAL+)', () => {
  const want = (user: string, password: string) => ({ kind: 'login', credentials: { user, password, mechanism: 'LOGIN' } });
  assert.deepEqual(adapter().a.onLine(b('a1 LOGIN alice s3cret')), want('alice', 's3cret'));
  assert.deepEqual(adapter().a.onLine(b('a1 login "al ice" "p\\"w\\\\x"')), want('al ice', 'p"w\\x'));
  const sync = feed(adapter().a, 'a1 LOGIN {5}\r\nalice {6}\r\npa ss)');
  assert.deepEqual(sync.map((s) => s.kind), ['literal', 'reply', 'literal', 'reply']);
  assert.equal((sync[0] as { data: string }).data, '+ Ready for literal data\r\n');
  const plus = adapter().a;
  const steps = feed(plus, 'a1 LOGIN {5+}\r\nalice {4+}\r\npass\r\n');
  assert.equal((steps[0] as { data: string }).data, '');
  assert.deepEqual(steps.at(-1), want('alice', 'pass'));
  // UTF-8 in a literal becomes a real Unicode string.
  const utf = feed(adapter().a, `a1 LOGIN ${'{5+}'}\r\n${Buffer.from('jürg', 'utf8').toString('latin1')} pw\r\n`);
  assert.deepEqual(utf.at(-1), want('jürg', 'pw'));
});

test('a literal over max_literal: NO [TOOBIG] for a sync literal, BYE for LITERAL+', () => {
  assert.deepEqual(adapter().a.onLine(b('a LOGIN {99999}')), { kind: 'reply', data: 'a NO [TOOBIG] Literal too big\r\n' });
  assert.equal(adapter().a.onLine(b('a LOGIN {99999+}')).kind, 'close');
});

test('AUTHENTICATE PLAIN with SASL-IR, without, LOGIN, and abort', () => {
  const ir = Buffer.from('\0bob\0pw').toString('base64');
  assert.deepEqual(adapter().a.onLine(b(`x AUTHENTICATE PLAIN ${ir}`)), { kind: 'login', credentials: { user: 'bob', password: 'pw', mechanism: 'PLAIN' } });
  const a = adapter().a;
  assert.deepEqual(a.onLine(b('x AUTHENTICATE PLAIN')), { kind: 'reply', data: '+ \r\n' });
  assert.equal(a.onLine(b(ir)).kind, 'login');
  const l = adapter().a;
  assert.equal(l.onLine(b('y AUTHENTICATE LOGIN')).kind, 'reply');
  l.onLine(b(Buffer.from('bob').toString('base64')));
  assert.deepEqual(l.onLine(b(Buffer.from('pw').toString('base64'))), { kind: 'login', credentials: { user: 'bob', password: 'pw', mechanism: 'LOGIN' } });
  const c = adapter().a;
  c.onLine(b('z AUTHENTICATE PLAIN'));
  assert.deepEqual(c.onLine(b('*')), { kind: 'reply', data: 'z BAD Authentication aborted\r\n' });
  assert.deepEqual(adapter().a.onLine(b('z AUTHENTICATE CRAM-MD5')), { kind: 'reply', data: 'z NO Unsupported authentication mechanism\r\n' });
});

test('commands that need a login, garbage, and the pre-auth command bound (counted by the pre-login loop)', () => {
  const l = listener('imap', { tls: 'implicit', limits: { max_preauth_commands: 3, max_literal: 8192, max_line: 8192, max_sasl: 8192, max_auth_attempts: 3, max_connections: 10 } });
  const a = looped(imapProtocol, facts(l, true), caps);
  assert.deepEqual(a.send('a SELECT INBOX'), { kind: 'reply', data: 'a BAD Command SELECT is not valid before login\r\n' });
  assert.equal(a.send('\x00\x01\xff garbage').kind, 'reply');
  assert.equal(a.send('c NOOP').kind, 'reply');
  assert.deepEqual(a.send('d NOOP'), { kind: 'close', data: '* BYE Too many commands without logging in\r\n', reason: 'too-many-commands' });
});

test('LOGOUT closes with BYE and the tagged OK', () => {
  assert.deepEqual(adapter().a.onLine(b('q LOGOUT')), { kind: 'close', data: '* BYE Logging out\r\nq OK LOGOUT completed\r\n', reason: 'client-quit' });
});

test('login replay: ID with the real address (client values cleaned), AUTHENTICATE PLAIN with SASL-IR, tag rewritten', async () => {
  const { a } = adapter();
  a.onLine(b('i1 ID ("name" "Thunderbird" "x-originating-ip" "6.6.6.6" "version" "1\\"2")'));
  const step = a.onLine(b('t7 LOGIN alice pw'));
  assert.equal(step.kind, 'login');
  const be = new ScriptedBackend(['* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN ID] Dovecot ready.'], [
    [/^M1 ID/, ['* ID NIL', 'M1 OK ID completed']],
    [/^M2 AUTHENTICATE PLAIN \S+$/, ['M2 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in']],
  ]);
  const r = await a.login(be, { user: 'alice', password: 'pw', mechanism: 'LOGIN' }, caps);
  assert.deepEqual(r, { ok: true, reply: 't7 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n' });
  const id = be.written[0]!;
  assert.match(id, /"x-originating-ip" "192\.0\.2\.7"/);
  assert.doesNotMatch(id, /6\.6\.6\.6/, 'a client cannot forge its address');
  assert.match(id, /"name" "Thunderbird"/);
  assert.match(id, /"version" "1\\"2"/);
  assert.equal(be.written[1], `M2 AUTHENTICATE PLAIN ${Buffer.from('\0alice\0pw').toString('base64')}`);
});

test('login replay: LOGIN with literals when the password cannot be quoted; NO becomes AUTHENTICATIONFAILED', async () => {
  const { a } = adapter(true, { imap_id: false });
  a.onLine(b('t1 LOGIN bob "x"'));
  const be = new ScriptedBackend(['* OK IMAP ready'], [
    [/^M2 LOGIN \{3\}$/, ['+ OK']],
    [/^bob \{3\}$/, ['+ OK']],
    [/^p\xc3\xa4$/, ['M2 NO [AUTHENTICATIONFAILED] Authentication failed.']],
  ]);
  const r = await a.login(be, { user: 'bob', password: 'pä', mechanism: 'LOGIN' }, { capabilities: ['IMAP4rev1'], at: 0 });
  assert.deepEqual(r, { ok: false, reply: 't1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n' });
});

test('a PREAUTH backend greeting is never passed on', async () => {
  const { a } = adapter();
  a.onLine(b('t1 LOGIN bob pw'));
  const be = new ScriptedBackend(['* PREAUTH welcome'], []);
  await assert.rejects(a.login(be, { user: 'bob', password: 'pw', mechanism: 'LOGIN' }, caps), { code: 'BACKEND_PROTOCOL' });
});

test('probe reads capabilities from the greeting or asks for them', async () => {
  const be = new ScriptedBackend(['* OK hi'], [[/^P1 CAPABILITY/, ['* CAPABILITY IMAP4rev1 IDLE', 'P1 OK done']]]);
  const c = await imapProtocol.probe(be, 'gw');
  assert.deepEqual(c.capabilities, ['IMAP4rev1', 'IDLE']);
});

test('property: arbitrary client lines never throw and always answer', () => {
  fc.assert(
    fc.property(fc.array(fc.uint8Array({ maxLength: 80 }), { maxLength: 20 }), (lines) => {
      const { a } = adapter(false);
      for (const l of lines) {
        const step = a.onLine(Buffer.from(l.filter((x) => x !== 0x0a)));
        assert.ok(['reply', 'literal', 'starttls', 'login', 'close'].includes(step.kind));
        if (step.kind === 'close' || step.kind === 'login' || step.kind === 'starttls') break;
        if (step.kind === 'literal') a.onLiteral(Buffer.alloc(step.size));
      }
    }),
    { numRuns: 300 },
  );
});
