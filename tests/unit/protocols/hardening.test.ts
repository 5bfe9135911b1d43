/**
 * One test per defect the fuzz and attack suites found (issue 8), written
 * out as plain examples so each fix has a name: what the client or backend
 * sends, and what the gateway must (not) do with it.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { DEFAULT_LIMITS } from '../../../src/config/schema.ts';
import { ImapAdapter, imapProtocol } from '../../../src/protocols/imap.ts';
import { Pop3Adapter, pop3Protocol } from '../../../src/protocols/pop3.ts';
import { SmtpAdapter } from '../../../src/protocols/smtp.ts';
import { b, facts, listener, ScriptedBackend } from '../../helpers/adapters.ts';

const imap = (extra: Record<string, unknown> = {}) => new ImapAdapter(facts(listener('imap', extra)), undefined);
const data = (s: { kind: string; data?: string }) => s.data ?? '';

test('IMAP: a refused literal never echoes a tag that is not one (a bare CR went back to the client)', () => {
  assert.deepEqual(imap().onLine(b('\r0 LOGIN {99999}')), { kind: 'reply', data: '* NO [TOOBIG] Literal too big\r\n' });
  assert.deepEqual(imap().onLine(b('"q" LOGIN {99999}')), { kind: 'reply', data: '* NO [TOOBIG] Literal too big\r\n' });
  assert.deepEqual(imap().onLine(b('a1 LOGIN {99999}')), { kind: 'reply', data: 'a1 NO [TOOBIG] Literal too big\r\n' });
});

test('IMAP: chained LITERAL+ literals cannot grow one command past max_line + max_literal', () => {
  const limits = { ...DEFAULT_LIMITS, max_line: 1024, max_literal: 1024 };
  const a = imap({ limits });
  let step = a.onLine(b('a LOGIN {1000+}'));
  let rounds = 0;
  while (step.kind === 'literal' && rounds < 100) {
    a.onLiteral(Buffer.alloc(1000, 0x61));
    step = a.onLine(b(' {1000+}'));
    rounds++;
  }
  assert.equal(step.kind, 'close', 'the session is ended (the non-synchronising bytes are already on their way)');
  assert.match(data(step), /^\* BYE \[TOOBIG\]/);
  assert.ok(rounds <= 2, `${rounds} literals were taken into one command`);
});

test('IMAP and POP3: a SASL response over max_sasl is refused like SMTP does (limits.max_sasl was ignored)', () => {
  const limits = { ...DEFAULT_LIMITS, max_sasl: 100 };
  const big = 'QUFB'.repeat(50);
  const a = imap({ limits });
  assert.equal(data(a.onLine(b(`a AUTHENTICATE PLAIN ${big}`))), 'a BAD Authentication exchange line is too long\r\n');
  assert.equal(data(a.onLine(b('b AUTHENTICATE PLAIN'))), '+ \r\n');
  assert.equal(data(a.onLine(b(big))), 'b BAD Authentication exchange line is too long\r\n');
  const p = new Pop3Adapter(facts(listener('pop3', { limits })), undefined);
  assert.match(data(p.onLine(b(`AUTH PLAIN ${big}`))), /^-ERR Authentication exchange line is too long/);
});

test('POP3: a bare CR in USER or PASS is refused, so it never splits the command replayed on the backend', () => {
  const p = new Pop3Adapter(facts(listener('pop3')), undefined);
  assert.match(data(p.onLine(b('USER alice\rXCLIENT ADDR=6.6.6.6'))), /^-ERR /);
  assert.equal(data(p.onLine(b('USER alice'))), '+OK\r\n');
  assert.match(data(p.onLine(b('PASS pw\rQUIT'))), /^-ERR /);
});

test('IMAP: an untagged "* OK" before the AUTHENTICATE continuation is not a successful login', async () => {
  const a = imap({ imap_id: false });
  a.onLine(b('t1 LOGIN alice pw'));
  const be = new ScriptedBackend(['* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready'], [[/^M2 AUTHENTICATE PLAIN$/, ['* OK [ALERT] hello', '+ ']], [/^[A-Za-z0-9+/=]+$/, ['M2 NO [AUTHENTICATIONFAILED] no']]]);
  const r = await a.login(be, { user: 'alice', password: 'pw', mechanism: 'LOGIN' }, undefined);
  assert.equal(r.ok, false, 'the backend\'s tagged NO decides, not its untagged OK');
  assert.equal(be.written.length, 2, 'the credentials were sent after the continuation');
});

test('capabilities learned from the backend before the client\'s TLS reach it only as clean atoms / CAPA lines', async () => {
  const i = await imapProtocol.probe(new ScriptedBackend(['* OK [CAPABILITY IMAP4rev1 IDLE {5} "x" X\rY MOVE] hi'], []), 'gw');
  const greeting = new ImapAdapter(facts(listener('imap', { tls: 'starttls' }), false), i).greeting();
  assert.match(greeting, /^\* OK \[CAPABILITY IMAP4rev1 IDLE MOVE SASL-IR LITERAL\+ ID STARTTLS LOGINDISABLED\] /);
  const p = await pop3Protocol.probe(new ScriptedBackend(['+OK hi'], [[/^CAPA/, ['+OK', 'TOP', '+OK injected', '.x', '', 'X\rY', 'UIDL', '.']]]), 'gw');
  const capa = data(new Pop3Adapter(facts(listener('pop3')), p).onLine(b('CAPA')));
  assert.equal(capa, '+OK Capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n');
});

test('backend text the gateway repeats in its own login answer carries no bare CR', async () => {
  const a = imap({ imap_id: false });
  a.onLine(b('t1 LOGIN alice pw'));
  const be = new ScriptedBackend(['* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi'], [[/^M2 /, ['* OK x\r* BYE forged', 'M2 OK in']]]);
  const r = await a.login(be, { user: 'alice', password: 'pw', mechanism: 'LOGIN' }, undefined);
  assert.equal(r.reply, '* OK x* BYE forged\r\nt1 OK in\r\n');
  const s = new SmtpAdapter(facts(listener('smtp', { auth: 'none', xclient: false })), undefined);
  s.onLine(b('EHLO x'));
  s.onLine(b('MAIL FROM:<a@b>'));
  const mx = await s.login(new ScriptedBackend(['220 hi'], [[/^EHLO/, ['250 ok']], [/^MAIL/, ['250 ok\rfine']]]), null, undefined);
  assert.equal(mx.reply, '250 okfine\r\n');
});

test('IMAP and POP3 do not reflect arbitrary client text as a command name (ALPACA reflection)', () => {
  assert.equal(data(imap().onLine(b('a <SCRIPT>ALERT'))), 'a BAD Command this command is not valid before login\r\n');
  assert.equal(data(imap().onLine(b('a SELECT INBOX'))), 'a BAD Command SELECT is not valid before login\r\n');
  const p = new Pop3Adapter(facts(listener('pop3')), undefined);
  assert.equal(data(p.onLine(b('<script>x'))), '-ERR Command this command is not valid before login\r\n');
});
