/**
 * Fuzz: what the backend says during the login replay and the capability
 * probe. A scripted link answers with generated lines (plausible replies,
 * desynchronised ones, garbage) and, when they run out, fails the way the
 * real SocketLink does at its deadline. Every run must end in a result or a
 * coded backend error, never a hang, a crash or an ill-formed answer to the
 * client; and capabilities learned from a hostile backend must not put
 * anything but capability names in front of the client.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { MailgateError } from '../../../src/core/errors.ts';
import { ImapAdapter, imapProtocol } from '../../../src/protocols/imap.ts';
import { Pop3Adapter, pop3Protocol } from '../../../src/protocols/pop3.ts';
import { SmtpAdapter, smtpProtocol } from '../../../src/protocols/smtp.ts';
import type { BackendCapabilities, Credentials, LoginResult, MailAdapter, ProtocolModule } from '../../../src/protocols/types.ts';
import { facts, listener } from '../../helpers/adapters.ts';
import { count, crlfLines, nastyText, params, ScriptLink, within } from './helpers.ts';

const garbage = nastyText(40).map((s) => s.replace(/\n/g, ''));

const imapLine = fc.oneof(
  { weight: 4, arbitrary: fc.constantFrom('* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR ID] ready', '* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready', '* OK [CAPABILITY IMAP4rev1 LITERAL+] ready', '* OK ready', '* PREAUTH hi', '* BYE no', 'M1 OK ID done', 'M2 OK [CAPABILITY IMAP4rev1 IDLE] in', 'M2 NO [AUTHENTICATIONFAILED] no', 'M2 BAD what', '+ ', '+ go', '* CAPABILITY IMAP4rev1 X', '* ID NIL', 'P1 OK', '* OK [ALERT] hi\rthere', 'M2 OK in\r* injected') },
  { weight: 2, arbitrary: fc.tuple(fc.constantFrom('* ', 'M1 ', 'M2 ', '+ ', 'P1 ', ''), garbage).map(([a, b]) => a + b) },
  { weight: 1, arbitrary: garbage },
);
const pop3Line = fc.oneof(
  { weight: 4, arbitrary: fc.constantFrom('+OK ready', '+OK', '-ERR no', '-ERR [AUTH] bad', '+ ', '.', 'TOP', 'SASL PLAIN LOGIN', 'USER', 'XCLIENT', '+OK in\r.', 'STLS', '..x', '.\r') },
  { weight: 2, arbitrary: fc.tuple(fc.constantFrom('+OK ', '-ERR ', '+ ', ''), garbage).map(([a, b]) => a + b) },
  { weight: 1, arbitrary: garbage },
);
const smtpLine = fc.oneof(
  { weight: 4, arbitrary: fc.constantFrom('220 hi', '220-hi', '250-x', '250-AUTH PLAIN LOGIN', '250-XCLIENT ADDR HELO PROTO LOGIN PORT', '250 ok', '250 AUTH=LOGIN', '334 ', '334 VXNlcm5hbWU6', '235 ok', '535 no', '454 later', '421 bye', '550 no', '250-STARTTLS', '250 PIPELINING\r', '2500 x') },
  { weight: 2, arbitrary: fc.tuple(fc.constantFrom('250-', '250 ', '220 ', '334 ', '5', ''), garbage).map(([a, b]) => a + b) },
  { weight: 1, arbitrary: garbage },
);

const script = (line: fc.Arbitrary<string>) => fc.record({ lines: fc.array(line, { maxLength: 30 }), end: fc.constantFrom('timeout' as const, 'closed' as const) });

const creds: Credentials = { user: 'alice', password: 'pw with "quote" and \\', mechanism: 'PLAIN' };

async function settle(p: Promise<LoginResult>, link: ScriptLink): Promise<LoginResult | undefined> {
  try {
    return await within(p, 2000, 'login replay');
  } catch (err) {
    assert.ok(err instanceof MailgateError, `a coded error, not ${String(err)}`);
    // BACKEND_NO_AUTH: an EHLO without AUTH under passthrough credentials, a configuration error (issue 17).
    assert.match(err.code, /^BACKEND_(PROTOCOL|TIMEOUT|CLOSED|NO_AUTH)$/);
    return undefined;
  } finally {
    assert.ok(link.readsAfterEnd <= 1, 'no read after the link failed');
    for (const w of link.written) assert.match(w, /^[^\r\n]*\r\n$|^\*\r\n$/s, `one CRLF-terminated command per write: ${JSON.stringify(w)}`);
  }
}

const imapCaps = fc.constantFrom(
  undefined,
  { capabilities: ['IMAP4rev1', 'AUTH=PLAIN', 'SASL-IR', 'LITERAL+'], at: 0 },
  { capabilities: ['IMAP4rev1', 'AUTH=PLAIN'], at: 0 },
  { capabilities: ['IMAP4rev1', 'LITERAL+'], at: 0 },
);

test('fuzz: IMAP login replay against any backend answers ends cleanly with a tagged answer', async () => {
  await fc.assert(
    fc.asyncProperty(script(imapLine), imapCaps, fc.boolean(), async ({ lines, end }, caps, id) => {
      count('backend-imap');
      const a = new ImapAdapter(facts(listener('imap', { imap_id: id })), caps);
      assert.equal(a.onLine(Buffer.from('t7 LOGIN alice x')).kind, 'login');
      const link = new ScriptLink(lines, end);
      const r = await settle(a.login(link, creds, caps), link);
      if (!r) return;
      const out = crlfLines(r.reply);
      assert.match(out.at(-1)!, r.ok ? /^t7 OK\b/ : /^t7 NO\b/);
      if (r.ok) assert.ok(lines.some((l) => /^M2 OK\b/i.test(l)), 'logged in only on the backend\'s tagged OK');
      for (const l of out.slice(0, -1)) assert.match(l, /^\* /);
    }),
    params(500),
  );
});

test('fuzz: POP3 login replay ends cleanly with +OK or -ERR', async () => {
  await fc.assert(
    fc.asyncProperty(script(pop3Line), fc.constantFrom(['SASL PLAIN'], ['USER'], ['XCLIENT', 'SASL PLAIN LOGIN'], []), async ({ lines, end }, capa) => {
      count('backend-pop3');
      const caps: BackendCapabilities = { capabilities: capa, at: 0 };
      const a = new Pop3Adapter(facts(listener('pop3')), caps);
      a.onLine(Buffer.from('USER alice'));
      assert.equal(a.onLine(Buffer.from('PASS x')).kind, 'login');
      const link = new ScriptLink(lines, end);
      const r = await settle(a.login(link, creds, caps), link);
      if (!r) return;
      const out = crlfLines(r.reply);
      assert.equal(out.length, 1);
      assert.match(out[0]!, r.ok ? /^\+OK/ : /^-ERR /);
    }),
    params(500),
  );
});

test('fuzz: SMTP login replay (AUTH and MX) ends cleanly with an SMTP reply', async () => {
  await fc.assert(
    fc.asyncProperty(script(smtpLine), fc.boolean(), fc.boolean(), async ({ lines, end }, mx, xclient) => {
      count('backend-smtp');
      const a = new SmtpAdapter(facts(listener('smtp', { auth: mx ? 'none' : 'required', xclient })), { capabilities: ['PIPELINING', 'AUTH PLAIN LOGIN'], at: 0 });
      a.onLine(Buffer.from('EHLO client.example'));
      const step = a.onLine(Buffer.from(mx ? 'MAIL FROM:<a@example.org>' : `AUTH PLAIN ${Buffer.from('\0alice\0x').toString('base64')}`));
      assert.equal(step.kind, 'login');
      const link = new ScriptLink(lines, end);
      const r = await settle(a.login(link, mx ? null : creds, undefined), link);
      if (!r) return;
      const out = crlfLines(r.reply);
      assert.ok(out.length >= 1);
      for (const l of out) assert.match(l, /^\d{3}[ -]/);
      if (r.ok && !mx) assert.ok(lines.some((l) => /^235\b/.test(l)), 'authenticated only on the backend\'s 235');
    }),
    params(500),
  );
});

// ---- probes, and what of them reaches the client -----------------------------------

const tls = (l: ReturnType<typeof listener>) => facts(l, false);

async function probe(module: ProtocolModule, lines: string[], end: 'timeout' | 'closed'): Promise<BackendCapabilities | undefined> {
  const link = new ScriptLink(lines, end);
  try {
    return await within(module.probe(link, 'gw.example'), 2000, `${module.protocol} probe`);
  } catch (err) {
    assert.ok(err instanceof MailgateError, `a coded error, not ${String(err)}`);
    return undefined;
  } finally {
    assert.ok(link.readsAfterEnd <= 1);
  }
}

/** Every line the adapter itself says before login, with these capabilities. */
function preLoginText(a: MailAdapter, lines: string[]): string {
  return a.greeting() + lines.map((l) => {
    const s = a.onLine(Buffer.from(l));
    return s.kind === 'reply' ? s.data : '';
  }).join('');
}

test('fuzz: IMAP capabilities from a hostile backend reach the client only as capability atoms', async () => {
  const capLine = fc.array(fc.oneof(fc.constantFrom('IMAP4rev1', 'IDLE', 'STARTTLS', 'LOGINDISABLED', 'AUTH=PLAIN', '{5}', ']', '"x"', 'X\rY', '(', '*', '%', 'A\0B', 'PREAUTH'), nastyText(10)), { maxLength: 8 });
  await fc.assert(
    fc.asyncProperty(capLine, fc.boolean(), fc.array(imapLine, { maxLength: 4 }), async (caps, inGreeting, more) => {
      count('backend-imap-probe');
      const list = caps.join(' ').replace(/\n/g, '');
      const lines = inGreeting ? [`* OK [CAPABILITY ${list}] hi`, ...more] : ['* OK hi', `* CAPABILITY ${list}`, 'P1 OK', ...more];
      const got = await probe(imapProtocol, lines, 'timeout');
      const a = new ImapAdapter(tls(listener('imap', { tls: 'starttls' })), got);
      const text = preLoginText(a, ['c1 CAPABILITY']);
      for (const line of crlfLines(text)) {
        assert.match(line, /^(\* (OK|CAPABILITY) |c1 OK )/);
        const m = /CAPABILITY ([^\]]*)/.exec(line);
        for (const atom of m?.[1]?.split(' ') ?? []) assert.match(atom, /^[^\x00-\x20\x7f(){%*"\\\]]+$/, `not an atom: ${JSON.stringify(atom)}`);
      }
      // The backend cannot make a STARTTLS listener look finished or locked.
      assert.equal((text.match(/ STARTTLS\b/g) ?? []).length, 2, 'STARTTLS offered once per capability list, by the gateway');
      assert.doesNotMatch(text, /^\* PREAUTH/m, 'never a PREAUTH greeting');
    }),
    params(400),
  );
});

test('fuzz: POP3 CAPA lines from a hostile backend cannot end or forge the client\'s CAPA answer', async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(pop3Line, { maxLength: 12 }), async (capa) => {
      count('backend-pop3-probe');
      const got = await probe(pop3Protocol, ['+OK hi', '+OK list', ...capa, '.'], 'timeout');
      const a = new Pop3Adapter(tls(listener('pop3', { tls: 'starttls' })), got);
      const s = a.onLine(Buffer.from('CAPA'));
      assert.equal(s.kind, 'reply');
      const lines = crlfLines((s as { data: string }).data);
      assert.equal(lines[0], '+OK Capability list follows');
      assert.equal(lines.at(-1), '.');
      for (const l of lines.slice(1, -1)) {
        assert.match(l, /^[A-Za-z0-9][\x20-\x7e]*$/, `not a capability line: ${JSON.stringify(l)}`);
      }
      assert.equal(lines.filter((l) => l === 'STLS').length, 1, 'STLS is the gateway\'s to offer');
    }),
    params(400),
  );
});

test('fuzz: SMTP EHLO keywords from a hostile backend reach the client as clean keyword lines', async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(smtpLine, { maxLength: 12 }), async (ehlo) => {
      count('backend-smtp-probe');
      const keywordLines = ehlo.map((l, i) => `250${i === ehlo.length - 1 ? ' ' : '-'}${l.replace(/^\d{3}[ -]?/, '')}`);
      const got = await probe(smtpProtocol, ['220 hi', '250-backend', ...keywordLines], 'timeout');
      const a = new SmtpAdapter(tls(listener('smtp', { tls: 'starttls' })), got);
      const s = a.onLine(Buffer.from('EHLO client.example'));
      const lines = crlfLines((s as { data: string }).data);
      lines.forEach((l, i) => assert.match(l, i === lines.length - 1 ? /^250 / : /^250-/));
      assert.equal(lines.filter((l) => /^250[ -]STARTTLS$/.test(l)).length, 1);
      assert.ok(!lines.some((l) => /^250[ -](AUTH|XCLIENT)/i.test(l)), 'no AUTH before TLS, never XCLIENT');
    }),
    params(400),
  );
});
