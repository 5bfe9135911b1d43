/**
 * The pre-login loop without sockets: the bounds it counts (commands once,
 * however many lines or literals a command takes; errors where the protocol
 * has an error bound; failed logins), the greeting and early talkers, what
 * STARTTLS drops. The fuzz suites drive the same loop with generated input.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { DEFAULT_LIMITS } from '../../../src/config/schema.ts';
import { imapProtocol } from '../../../src/protocols/imap.ts';
import { pop3Protocol } from '../../../src/protocols/pop3.ts';
import { smtpProtocol } from '../../../src/protocols/smtp.ts';
import type { CloseReason, Credentials, ProtocolModule } from '../../../src/protocols/types.ts';
import { PreauthLoop } from '../../../src/session/preauth-loop.ts';
import { facts, listener } from '../../helpers/adapters.ts';

interface Run {
  loop: PreauthLoop;
  out: string[];
  closed: { reason: CloseReason; words: string } | undefined;
  logins: (Credentials | null)[];
  tls: number;
}

function run(module: ProtocolModule, extra: Record<string, unknown> = {}, greet = true): Run {
  const l = listener(module.protocol, { tls: 'implicit', require_tls: false, ...extra });
  const f = facts(l, l.tls === 'implicit');
  const r: Run = { loop: undefined as unknown as PreauthLoop, out: [], closed: undefined, logins: [], tls: 0 };
  r.loop = new PreauthLoop(module, f, {
    write: (d) => void r.out.push(d),
    startTls: () => void r.tls++,
    login: (c) => void r.logins.push(c),
    close: (reason, words) => void (r.closed = { reason, words }),
  });
  if (greet) r.loop.greet(undefined);
  return r;
}

const push = (r: Run, s: string) => r.loop.push(Buffer.from(s, 'latin1'));
const limits = (o: Partial<typeof DEFAULT_LIMITS>) => ({ limits: { ...DEFAULT_LIMITS, ...o } });

test('an IMAP command is counted once, however many lines and literals it takes', () => {
  const r = run(imapProtocol, limits({ max_preauth_commands: 2 }));
  push(r, 'a ID ({2+}\r\nxy {3+}\r\nabc)\r\n');
  push(r, 'b NOOP\r\n');
  assert.equal(r.closed, undefined, 'two commands, five lines and literals');
  assert.match(r.out.at(-1)!, /^b OK NOOP/);
  push(r, 'c NOOP\r\n');
  assert.deepEqual(r.closed, { reason: 'too-many-commands', words: '* BYE Too many commands without logging in\r\n' });
});

test('SASL responses are part of their AUTH command; their errors count where the protocol bounds errors', () => {
  const r = run(smtpProtocol, { tls: 'implicit', ...limits({ max_preauth_commands: 3 }) });
  push(r, 'EHLO x\r\n');
  for (let i = 0; i < 5; i++) push(r, 'AUTH LOGIN\r\nnot base64!\r\n');
  assert.equal(r.closed?.reason, 'too-many-commands', 'the sixth command line ends it; the SASL lines were not counted');
  const p = run(pop3Protocol);
  for (let i = 0; i < 10; i++) push(p, 'AUTH PLAIN\r\n!!\r\n');
  assert.equal(p.closed, undefined, 'ten wrong SASL responses');
  push(p, 'AUTH PLAIN\r\n!!\r\n');
  assert.deepEqual(p.closed, { reason: 'protocol-error', words: '-ERR Invalid SASL response\r\n-ERR Too many errors\r\n' });
});

test('IMAP has no error bound of its own: a BAD counts as a command only', () => {
  const r = run(imapProtocol);
  for (let i = 0; i < 40; i++) push(r, `t${i} FROB\r\n`);
  assert.equal(r.closed, undefined);
  assert.equal(r.out.length, 41);
});

test('failed logins count against max_auth_attempts; the last answer is followed by the goodbye', () => {
  const r = run(pop3Protocol, limits({ max_auth_attempts: 2 }));
  push(r, 'USER a\r\nPASS b\r\nUSER a\r\nPASS c\r\n');
  assert.equal(r.logins.length, 1, 'the loop waits for the login before it reads on');
  assert.equal(r.loop.loginFailed(r.loop.adapter.loginRefusal('denied')), 'again');
  assert.equal(r.out.at(-1), '-ERR [AUTH] Authentication failed\r\n');
  r.loop.resume();
  assert.equal(r.logins.length, 2);
  assert.equal(r.loop.loginFailed(r.loop.adapter.loginRefusal('denied')), 'closed');
  assert.deepEqual(r.closed, { reason: 'too-many-auth-failures', words: '-ERR [AUTH] Authentication failed\r\n-ERR [AUTH] Too many failed logins\r\n' });
});

test('before the greeting: SMTP refuses an early talker, IMAP keeps what came and answers it after the greeting', () => {
  const s = run(smtpProtocol, {}, false);
  push(s, 'EHLO early\r\n');
  assert.deepEqual(s.closed, { reason: 'early-talker', words: '554 5.5.1 Protocol error: talked before the greeting\r\n' });
  const i = run(imapProtocol, {}, false);
  push(i, 'a NOOP\r\n');
  assert.deepEqual(i.out, []);
  i.loop.greet(undefined);
  assert.match(i.out[0]!, /^\* OK /);
  assert.equal(i.out[1], 'a OK NOOP completed\r\n');
});

test('STARTTLS drops what the client sent with it; reading goes on once TLS is up', () => {
  const r = run(imapProtocol, { tls: 'starttls' });
  push(r, 'a STARTTLS\r\nb LOGIN injected pw\r\n');
  assert.equal(r.tls, 1);
  r.loop.tlsStarted();
  assert.deepEqual(r.logins, [], 'the pipelined LOGIN was discarded');
  push(r, 'c NOOP\r\n');
  assert.equal(r.out.at(-1), 'c OK NOOP completed\r\n');
});

test('more buffered than a line and a literal may take ends the session at once; after the end nothing is kept', () => {
  const r = run(imapProtocol, limits({ max_line: 100, max_literal: 100 }));
  push(r, 'a LOGIN {90}\r\n');
  assert.equal(r.closed, undefined);
  push(r, `${'x'.repeat(90)} pw\r\nb NOOP\r\n${'y'.repeat(200)}`);
  assert.deepEqual(r.closed, { reason: 'line-too-long', words: '* BYE [TOOBIG] Line too long\r\n' });
  assert.deepEqual(r.logins, [], 'nothing of that chunk was read');
  assert.equal(r.loop.buffered, 0);
});

test('handOver() gives the bytes the client sent past its login to the backend, and the loop reads no more', () => {
  const r = run(imapProtocol);
  push(r, 'a LOGIN u p\r\nb SELECT INBOX\r\n');
  assert.equal(r.logins.length, 1);
  assert.equal(r.loop.handOver().toString(), 'b SELECT INBOX\r\n');
  push(r, 'c NOOP\r\n');
  assert.equal(r.out.length, 1, 'only the greeting was written');
});
