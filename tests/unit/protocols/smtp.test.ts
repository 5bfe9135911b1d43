import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { Listener } from '../../../src/config/load.ts';
import { DEFAULT_LIMITS, DEFAULT_TIMEOUTS } from '../../../src/config/schema.ts';
import { MailgateError } from '../../../src/core/errors.ts';
import { readReply, SmtpAdapter, smtpProtocol, xtext } from '../../../src/protocols/smtp.ts';
import type { BackendCapabilities, BackendLink, RelayHost, SessionFacts, Step } from '../../../src/protocols/types.ts';
import { looped } from '../../helpers/adapters.ts';

// ---- fixtures ---------------------------------------------------------------

interface SmtpOptions {
  tls?: 'implicit' | 'starttls' | 'none';
  auth?: 'required' | 'none';
  xclient?: boolean;
  require_tls?: boolean;
  limits?: Partial<typeof DEFAULT_LIMITS>;
}

function smtpListener(o: SmtpOptions = {}): Listener {
  return {
    name: 'submission',
    listen: [{ host: '127.0.0.1', port: 587 }],
    backend: { host: '127.0.0.1', port: 25 },
    proxy_protocol: false,
    protocol: 'smtp',
    tls: o.tls ?? 'starttls',
    auth: o.auth ?? 'required',
    xclient: o.xclient ?? true,
    greet_delay: 0,
    require_tls: o.require_tls ?? true,
    timeouts: { ...DEFAULT_TIMEOUTS },
    limits: { ...DEFAULT_LIMITS, ...o.limits },
  };
}

interface Session {
  adapter: SmtpAdapter;
  /** Flip to simulate the TLS handshake finishing. */
  tls: { up: boolean };
  send(text: string): Step;
  /** Sends a line and returns the reply text, failing when the step is not a reply. */
  say(text: string): string;
}

/** `looped`: lines go through the product's pre-login loop, which counts commands and errors against their bounds. */
function session(o: SmtpOptions & { caps?: BackendCapabilities | null; tlsUp?: boolean; clientIp?: string; looped?: boolean } = {}): Session {
  const tls = { up: o.tlsUp ?? false };
  const facts: SessionFacts = {
    id: 'c1',
    listener: smtpListener(o),
    hostname: 'gw.example.org',
    clientIp: o.clientIp ?? '203.0.113.7',
    clientPort: 51234,
    localIp: '192.0.2.1',
    localPort: 587,
    tls: () => tls.up,
  };
  const caps = o.caps === null ? undefined : (o.caps ?? { capabilities: POSTFIX_EHLO, at: 0 });
  const inLoop = o.looped ? looped(smtpProtocol, facts, caps) : undefined;
  const adapter = (inLoop?.adapter as SmtpAdapter | undefined) ?? new SmtpAdapter(facts, caps);
  const send = (text: string) => inLoop?.send(text) ?? adapter.onLine(Buffer.from(text, 'latin1'));
  return {
    adapter,
    tls,
    send,
    say(text) {
      const step = send(text);
      assert.equal(step.kind, 'reply', `expected a reply to ${JSON.stringify(text)}, got ${JSON.stringify(step)}`);
      return step.kind === 'reply' ? step.data : '';
    },
  };
}

const POSTFIX_EHLO = [
  'PIPELINING',
  'SIZE 10240000',
  'VRFY',
  'ETRN',
  'STARTTLS',
  'AUTH PLAIN LOGIN',
  'AUTH=PLAIN LOGIN',
  'XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN',
  'XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT',
  'ENHANCEDSTATUSCODES',
  '8BITMIME',
  'DSN',
  'CHUNKING',
];

interface PostfixScript {
  greeting?: string[];
  ehlo?: string[];
  users?: Record<string, string>;
  xclientReply?: string[];
  authReply?: string[];
  mailReply?: string[];
}

/** A scripted Postfix on the other end of a BackendLink: it answers each line the adapter writes. */
class FakePostfix implements BackendLink {
  readonly received: string[] = [];
  private readonly out: string[] = [];
  private readonly script: PostfixScript;
  private sasl: 'none' | 'plain' | 'login-user' | 'login-pass' = 'none';
  private loginUser = '';

  constructor(script: PostfixScript = {}) {
    this.script = script;
    this.out.push(...(script.greeting ?? ['220 mx.backend.example ESMTP Postfix (Debian/GNU)']));
  }

  readLine(): Promise<string> {
    const line = this.out.shift();
    if (line === undefined) return Promise.reject(new MailgateError('BACKEND_CLOSED', 'fake backend has nothing more to say'));
    return Promise.resolve(line);
  }

  write(data: string): void {
    assert.ok(data.endsWith('\r\n'), `backend got a line without CRLF: ${JSON.stringify(data)}`);
    for (const line of data.slice(0, -2).split('\r\n')) {
      this.received.push(line);
      this.handle(line);
    }
  }

  private handle(line: string): void {
    const users = this.script.users ?? { alice: 'secret' };
    const check = (user: string, pass: string) => {
      this.sasl = 'none';
      if (this.script.authReply) this.out.push(...this.script.authReply);
      else this.out.push(users[user] === pass ? '235 2.7.0 Authentication successful' : '535 5.7.8 Error: authentication failed: authentication failure');
    };
    switch (this.sasl) {
      case 'plain': {
        const [, user = '', pass = ''] = Buffer.from(line, 'base64').toString('utf8').split('\0');
        check(user, pass);
        return;
      }
      case 'login-user':
        this.loginUser = Buffer.from(line, 'base64').toString('utf8');
        this.sasl = 'login-pass';
        this.out.push('334 UGFzc3dvcmQ6');
        return;
      case 'login-pass':
        check(this.loginUser, Buffer.from(line, 'base64').toString('utf8'));
        return;
      case 'none':
        break;
    }
    const [verb = '', ...args] = line.split(' ');
    switch (verb.toUpperCase()) {
      case 'EHLO': {
        const kw = this.script.ehlo ?? POSTFIX_EHLO;
        const lines = ['mx.backend.example', ...kw];
        this.out.push(...lines.map((l, i) => `250${i === lines.length - 1 ? ' ' : '-'}${l}`));
        return;
      }
      case 'XCLIENT':
        this.out.push(...(this.script.xclientReply ?? ['220 mx.backend.example ESMTP Postfix (Debian/GNU)']));
        return;
      case 'AUTH':
        if (args[0] === 'PLAIN' && args[1]) {
          const [, user = '', pass = ''] = Buffer.from(args[1], 'base64').toString('utf8').split('\0');
          check(user, pass);
        } else if (args[0] === 'PLAIN') {
          this.sasl = 'plain';
          this.out.push('334 ');
        } else if (args[0] === 'LOGIN') {
          this.sasl = 'login-user';
          this.out.push('334 VXNlcm5hbWU6');
        } else {
          this.out.push('535 5.7.8 Error: authentication failed: Invalid authentication mechanism');
        }
        return;
      case 'MAIL':
        this.out.push(...(this.script.mailReply ?? ['250 2.1.0 Ok']));
        return;
      case 'QUIT':
        this.out.push('221 2.0.0 Bye');
        return;
      default:
        this.out.push('502 5.5.2 Error: command not recognized');
    }
  }
}

const b64 = (s: string) => Buffer.from(s, 'utf8').toString('base64');
const plain = (user: string, pass: string, authzid = '') => b64(`${authzid}\0${user}\0${pass}`);

/** A session past STARTTLS and EHLO, ready for AUTH. */
function readyForAuth(o: SmtpOptions & { caps?: BackendCapabilities | null } = {}): Session {
  const s = session({ ...o, tlsUp: true });
  s.say('EHLO client.example.net');
  return s;
}

async function rejectsWithCode(p: Promise<unknown>, code: string): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof MailgateError, `expected a MailgateError, got ${String(err)}`);
    assert.equal(err.code, code);
    return true;
  });
}

// ---- greeting and EHLO --------------------------------------------------------

describe('SMTP greeting and EHLO', () => {
  it('greets in its own name, never with the backend banner', () => {
    const s = session();
    assert.equal(s.adapter.greeting(), '220 gw.example.org ESMTP mailgate\r\n');
  });

  it('offers the backend extensions minus STARTTLS, AUTH, XCLIENT and XFORWARD, plus its own STARTTLS before TLS', () => {
    const s = session();
    assert.equal(
      s.say('EHLO client.example.net'),
      '250-gw.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n250-ENHANCEDSTATUSCODES\r\n' +
        '250-8BITMIME\r\n250-DSN\r\n250-CHUNKING\r\n250 STARTTLS\r\n',
    );
  });

  it('offers AUTH PLAIN LOGIN once TLS is up, and STARTTLS no longer', () => {
    const s = readyForAuth();
    const reply = s.say('EHLO client.example.net');
    assert.match(reply, /^250 AUTH PLAIN LOGIN\r\n$/m);
    assert.doesNotMatch(reply, /STARTTLS|XCLIENT|XFORWARD|AUTH=/);
  });

  it('offers AUTH in plaintext when require_tls is off', () => {
    const s = session({ tls: 'none', require_tls: false });
    assert.match(s.say('EHLO x'), /^250 AUTH PLAIN LOGIN\r\n$/m);
  });

  it('offers no AUTH on an MX listener (auth none)', () => {
    const s = session({ auth: 'none', tls: 'starttls' });
    assert.doesNotMatch(s.say('EHLO x'), /AUTH/);
  });

  it('falls back to PIPELINING and 8BITMIME when the backend could not be probed', () => {
    const s = session({ caps: null, tls: 'implicit', tlsUp: true });
    assert.equal(s.say('EHLO x'), '250-gw.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 AUTH PLAIN LOGIN\r\n');
  });

  it('answers HELO with a single line', () => {
    const s = session();
    assert.equal(s.say('HELO client.example.net'), '250 gw.example.org\r\n');
  });

  it('wants a name in EHLO and HELO', () => {
    const s = session();
    assert.match(s.say('EHLO'), /^501 5\.5\.4 /);
    assert.match(s.say('HELO   '), /^501 5\.5\.4 /);
  });

  it('reads command names case-insensitively', () => {
    const s = session();
    assert.match(s.say('ehlo client'), /^250-gw\.example\.org\r\n/);
    assert.equal(s.say('nOoP'), '250 2.0.0 Ok\r\n');
  });
});

// ---- STARTTLS ----------------------------------------------------------------

describe('SMTP STARTTLS', () => {
  it('starts TLS on a starttls listener and forgets the EHLO afterwards', () => {
    const s = session();
    s.say('EHLO client');
    const step = s.send('STARTTLS');
    assert.deepEqual(step, { kind: 'starttls', data: '220 2.0.0 Ready to start TLS\r\n' });
    s.tls.up = true;
    s.adapter.tlsStarted();
    assert.match(s.say(`AUTH PLAIN ${plain('alice', 'secret')}`), /^503 5\.5\.1 /, 'AUTH needs a new EHLO after TLS');
    assert.doesNotMatch(s.say('EHLO client'), /STARTTLS/);
  });

  it('refuses STARTTLS with arguments, when TLS is up, and on listeners without it', () => {
    assert.match(session().say('STARTTLS now'), /^501 5\.5\.4 /);
    assert.match(session({ tls: 'implicit', tlsUp: true }).say('STARTTLS'), /^503 5\.5\.1 /);
    assert.match(session({ tls: 'none' }).say('STARTTLS'), /^502 5\.5\.1 /);
  });
});

// ---- AUTH ----------------------------------------------------------------------

describe('SMTP AUTH', () => {
  it('takes AUTH PLAIN with an initial response', () => {
    const s = readyForAuth();
    assert.deepEqual(s.send(`AUTH PLAIN ${plain('alice', 'secret')}`), {
      kind: 'login',
      credentials: { user: 'alice', password: 'secret', mechanism: 'PLAIN' },
    });
  });

  it('takes AUTH PLAIN without an initial response, after an empty challenge', () => {
    const s = readyForAuth();
    assert.equal(s.say('auth plain'), '334 \r\n');
    const step = s.send(plain('alice', 'secret', 'boss'));
    assert.deepEqual(step, { kind: 'login', credentials: { user: 'alice', password: 'secret', authzid: 'boss', mechanism: 'PLAIN' } });
  });

  it('takes AUTH LOGIN as a dialogue', () => {
    const s = readyForAuth();
    assert.equal(s.say('AUTH LOGIN'), '334 VXNlcm5hbWU6\r\n');
    assert.equal(s.say(b64('alice')), '334 UGFzc3dvcmQ6\r\n');
    assert.deepEqual(s.send(b64('secret')), { kind: 'login', credentials: { user: 'alice', password: 'secret', mechanism: 'LOGIN' } });
  });

  it('takes AUTH LOGIN with the user name as initial response', () => {
    const s = readyForAuth();
    assert.equal(s.say(`AUTH LOGIN ${b64('alice')}`), '334 UGFzc3dvcmQ6\r\n');
    assert.deepEqual(s.send(b64('secret')), { kind: 'login', credentials: { user: 'alice', password: 'secret', mechanism: 'LOGIN' } });
  });

  it('ends the exchange when the client answers "*", and accepts commands again', () => {
    const s = readyForAuth();
    s.say('AUTH LOGIN');
    assert.equal(s.say('*'), '501 5.0.0 Authentication aborted\r\n');
    assert.equal(s.say('NOOP'), '250 2.0.0 Ok\r\n');
  });

  it('refuses malformed SASL responses with 501 5.5.2', () => {
    const s = readyForAuth();
    assert.match(s.say('AUTH PLAIN !!notbase64!!'), /^501 5\.5\.2 /);
    s.say('AUTH PLAIN');
    assert.match(s.say(b64('no-nul-separators')), /^501 5\.5\.2 /);
  });

  it('refuses AUTH before EHLO and after a plain HELO', () => {
    const s = session({ tlsUp: true });
    assert.match(s.say(`AUTH PLAIN ${plain('alice', 'secret')}`), /^503 5\.5\.1 /);
    s.say('HELO client');
    assert.match(s.say(`AUTH PLAIN ${plain('alice', 'secret')}`), /^503 5\.5\.1 /);
  });

  it('refuses AUTH before STARTTLS when TLS is required', () => {
    const s = session();
    s.say('EHLO client');
    assert.equal(s.say(`AUTH PLAIN ${plain('alice', 'secret')}`), '530 5.7.0 Must issue a STARTTLS command first\r\n');
  });

  it('refuses AUTH on a listener without authentication', () => {
    const s = session({ auth: 'none', tlsUp: true });
    s.say('EHLO client');
    assert.match(s.say(`AUTH PLAIN ${plain('alice', 'secret')}`), /^503 5\.5\.1 /);
  });

  it('refuses unknown mechanisms and bad syntax', () => {
    const s = readyForAuth();
    assert.match(s.say('AUTH CRAM-MD5'), /^504 5\.5\.4 /);
    assert.match(s.say('AUTH'), /^501 5\.5\.4 /);
    assert.match(s.say('AUTH PLAIN a b'), /^501 5\.5\.4 /);
  });

  it('bounds SASL responses by limits.max_sasl', () => {
    const s = readyForAuth({ limits: { max_sasl: 64 } });
    assert.match(s.say(`AUTH PLAIN ${'A'.repeat(68)}`), /^500 5\.5\.6 /);
    s.say('AUTH LOGIN');
    assert.match(s.say('A'.repeat(68)), /^500 5\.5\.6 /);
    assert.equal(s.say('NOOP'), '250 2.0.0 Ok\r\n', 'the exchange is over after the refusal');
  });

  it('refuses AUTH once the backend accepted the login', async () => {
    const s = readyForAuth();
    s.send(`AUTH PLAIN ${plain('alice', 'secret')}`);
    const r = await s.adapter.login(new FakePostfix(), { user: 'alice', password: 'secret', mechanism: 'PLAIN' }, undefined);
    assert.equal(r.ok, true);
    assert.match(s.say(`AUTH PLAIN ${plain('alice', 'secret')}`), /^503 5\.5\.1 /);
  });
});

// ---- mail before and without AUTH ---------------------------------------------------

describe('SMTP transactions before the backend session', () => {
  it('wants AUTH before MAIL, RCPT, DATA and BDAT on a submission listener', () => {
    const s = readyForAuth();
    for (const cmd of ['MAIL FROM:<a@example.com>', 'RCPT TO:<b@example.com>', 'DATA']) {
      assert.equal(s.say(cmd), '530 5.7.0 Authentication required\r\n', cmd);
    }
    const bdat = s.send('BDAT 5 LAST');
    assert.deepEqual(bdat, { kind: 'literal', size: 5, data: '530 5.7.0 Authentication required\r\n' });
    assert.deepEqual(s.adapter.onLiteral(Buffer.from('hello')), { kind: 'reply', data: '' });
    assert.equal(s.say('NOOP'), '250 2.0.0 Ok\r\n', 'the chunk was dropped, commands go on');
  });

  it('closes on a BDAT chunk larger than it is willing to drop', () => {
    const s = readyForAuth();
    const step = s.send(`BDAT ${DEFAULT_LIMITS.max_literal + 1}`);
    assert.equal(step.kind, 'close');
  });

  it('on an MX listener, the first MAIL starts the backend session without credentials', () => {
    const s = session({ auth: 'none' });
    assert.match(s.say('MAIL FROM:<a@example.com>'), /^503 5\.5\.1 /, 'HELO first');
    assert.match(s.say('RCPT TO:<b@example.com>'), /^503 5\.5\.1 /);
    s.say('EHLO mta.example.com');
    assert.match(s.say('MAIL TO:<a@example.com>'), /^501 5\.5\.4 /);
    assert.deepEqual(s.send('MAIL FROM:<a@example.com> SIZE=1000'), { kind: 'login', credentials: null });
  });

  it('does not require TLS for MX traffic', () => {
    const s = session({ auth: 'none', tls: 'starttls', require_tls: true });
    s.say('HELO mta.example.com');
    assert.deepEqual(s.send('mail from:<>'), { kind: 'login', credentials: null });
  });

  it('replays the MAIL line on the backend and passes its answer on, even a refusal', async () => {
    for (const mailReply of [['250 2.1.0 Ok'], ['550-5.7.1 Sender rejected', '550 5.7.1 See policy']]) {
      const s = session({ auth: 'none', xclient: false });
      s.say('EHLO mta.example.com');
      s.send('MAIL FROM:<a@example.com> BODY=8BITMIME');
      const backend = new FakePostfix({ mailReply });
      const r = await s.adapter.login(backend, null, undefined);
      assert.deepEqual(r, { ok: true, reply: mailReply.map((l) => `${l}\r\n`).join('') });
      assert.deepEqual(backend.received, ['EHLO gw.example.org', 'MAIL FROM:<a@example.com> BODY=8BITMIME']);
    }
  });
});

// ---- other commands and bounds -------------------------------------------------

describe('SMTP housekeeping commands and bounds', () => {
  it('answers NOOP, RSET, HELP, VRFY, EXPN, QUIT and garbage', () => {
    const s = session();
    assert.equal(s.say('NOOP'), '250 2.0.0 Ok\r\n');
    assert.equal(s.say('RSET'), '250 2.0.0 Ok\r\n');
    assert.match(s.say('HELP'), /^214 /);
    assert.match(s.say('VRFY postmaster'), /^252 /);
    assert.match(s.say('EXPN staff'), /^502 5\.5\.1 /);
    assert.equal(s.say('GET / HTTP/1.1'), '500 5.5.2 Syntax error\r\n');
    assert.equal(s.say(''), '500 5.5.2 Syntax error\r\n');
    assert.deepEqual(s.send('QUIT'), { kind: 'close', data: '221 2.0.0 Bye\r\n', reason: 'client-quit' });
  });

  it('parses long lines in linear time', () => {
    const s = session();
    const line = `NOOP x${' '.repeat(8000)}x`;
    const started = performance.now();
    for (let i = 0; i < 40; i++) s.send(line);
    const ms = performance.now() - started;
    assert.ok(ms < 250, `40 lines of 8 KB took ${ms.toFixed(0)} ms`);
  });

  it('ends the session past limits.max_preauth_commands', () => {
    const s = session({ limits: { max_preauth_commands: 5 }, looped: true });
    for (let i = 0; i < 5; i++) assert.equal(s.say('NOOP'), '250 2.0.0 Ok\r\n');
    assert.deepEqual(s.send('NOOP'), { kind: 'close', data: '421 4.7.0 Too many commands\r\n', reason: 'too-many-commands' });
  });

  it('ends the session after too many errors', () => {
    const s = session({ looped: true });
    for (let i = 0; i < 10; i++) assert.equal(s.say('BOGUS'), '500 5.5.2 Syntax error\r\n');
    const step = s.send('BOGUS');
    assert.equal(step.kind, 'close');
    assert.equal(step.kind === 'close' && step.reason, 'protocol-error');
    assert.match(step.kind === 'close' ? step.data : '', /^421 /);
  });

  it('phrases refusals in SMTP words', () => {
    const a = session().adapter;
    assert.equal(a.refusal('denied', 'no\r\nway'), '554 5.7.1 noway\r\n');
    assert.equal(a.refusal('tempfail'), '421 4.3.0 gw.example.org Service temporarily unavailable, try again later\r\n');
    assert.equal(a.refusal('idle-timeout'), '421 4.4.2 Idle timeout\r\n');
    assert.equal(a.refusal('line-too-long'), '500 5.5.6 Line too long\r\n');
    assert.equal(a.refusal('too-many-auth-failures'), '421 4.7.0 Too many failed authentications\r\n');
    assert.equal(a.refusal('early-talker'), '554 5.5.1 Protocol error: talked before the greeting\r\n');
    assert.equal(a.refusal('shutdown'), '421 4.3.2 Service shutting down\r\n');
    assert.equal(a.refusal('internal-error'), '421 4.3.0 Internal error\r\n');
    assert.equal(a.goodbye('shutdown'), '421 4.3.2 Service shutting down\r\n');
    assert.equal(a.refusal('killed'), '421 4.3.2 Connection closed by the administrator\r\n');
  });

  it('answers a failed AUTH as an authentication failure and lets the client try again', () => {
    const s = readyForAuth();
    s.send(`AUTH PLAIN ${plain('alice', 'wrong')}`);
    assert.equal(s.adapter.loginRefusal('denied', 'rule 7'), '535 5.7.8 Authentication credentials invalid\r\n');
    s.send(`AUTH PLAIN ${plain('alice', 'wrong')}`);
    assert.equal(s.adapter.loginRefusal('denied', 'Use mail2\r\nnow', true), '535 5.7.8 Use mail2now\r\n', 'an access rule\'s own reason is shown, on one line');
    s.send(`AUTH PLAIN ${plain('alice', 'wrong')}`);
    assert.equal(s.adapter.loginRefusal('tempfail'), '454 4.7.0 Temporary authentication failure\r\n');
    s.send(`AUTH PLAIN ${plain('alice', 'wrong')}`);
    assert.equal(s.adapter.loginRefusal('backend-unavailable'), '421 4.4.1 gw.example.org Backend unavailable, closing connection\r\n');
    assert.equal(s.send(`AUTH PLAIN ${plain('alice', 'secret')}`).kind, 'login');
  });

  it('answers a failed MAIL on an MX listener as a transaction failure', () => {
    const s = session({ auth: 'none' });
    s.say('EHLO mta');
    s.send('MAIL FROM:<a@example.com>');
    assert.equal(s.adapter.loginRefusal('backend-unavailable'), '421 4.4.1 gw.example.org Backend unavailable, closing connection\r\n');
    s.send('MAIL FROM:<a@example.com>');
    assert.match(s.adapter.loginRefusal('denied'), /^550 5\.7\.1 /);
    s.send('MAIL FROM:<a@example.com>');
    assert.match(s.adapter.loginRefusal('tempfail'), /^451 4\.7\.1 /);
  });
});

// ---- login replay on the backend ------------------------------------------------

describe('SMTP login replay', () => {
  it('tells the backend the client with XCLIENT (without LOGIN), then authenticates with AUTH PLAIN', async () => {
    const s = readyForAuth();
    s.send(`AUTH PLAIN ${plain('alice', 'secret')}`);
    const backend = new FakePostfix();
    const r = await s.adapter.login(backend, { user: 'alice', password: 'secret', mechanism: 'PLAIN' }, undefined);
    assert.deepEqual(r, { ok: true, reply: '235 2.7.0 Authentication successful\r\n' });
    assert.deepEqual(backend.received, [
      'EHLO gw.example.org',
      'XCLIENT PROTO=ESMTP HELO=client.example.net ADDR=203.0.113.7 PORT=51234',
      'EHLO client.example.net',
      `AUTH PLAIN ${plain('alice', 'secret')}`,
    ]);
  });

  it('writes IPv6 client addresses as IPV6:addr', async () => {
    const s = session({ tlsUp: true, clientIp: '2001:db8::25' });
    s.say('EHLO client');
    s.send(`AUTH PLAIN ${plain('alice', 'secret')}`);
    const backend = new FakePostfix();
    await s.adapter.login(backend, { user: 'alice', password: 'secret', mechanism: 'PLAIN' }, undefined);
    assert.ok(backend.received.includes('XCLIENT PROTO=ESMTP HELO=client ADDR=IPV6:2001:db8::25 PORT=51234'), backend.received.join('\n'));
  });

  it('strips CR, NUL and control characters from HELO names and xtext-encodes the rest', async () => {
    const s = session({ tlsUp: true });
    s.say('EHLO cl\0i\rent+x=y\x01é');
    s.send(`AUTH PLAIN ${plain('alice', 'secret')}`);
    const backend = new FakePostfix();
    await s.adapter.login(backend, { user: 'alice', password: 'secret', mechanism: 'PLAIN' }, undefined);
    assert.equal(backend.received[1], 'XCLIENT PROTO=ESMTP HELO=client+2Bx+3Dy+E9 ADDR=203.0.113.7 PORT=51234');
    assert.equal(backend.received[2], 'EHLO client+x=y\xe9');
    for (const line of backend.received) assert.doesNotMatch(line, /[\0\r\n]/);
  });

  it('sends only the XCLIENT attributes the backend lists', async () => {
    const s = readyForAuth();
    s.send(`AUTH PLAIN ${plain('alice', 'secret')}`);
    const backend = new FakePostfix({ ehlo: ['PIPELINING', 'AUTH PLAIN', 'XCLIENT ADDR NAME'] });
    await s.adapter.login(backend, { user: 'alice', password: 'secret', mechanism: 'PLAIN' }, undefined);
    assert.equal(backend.received[1], 'XCLIENT ADDR=203.0.113.7');
  });

  it('sends PROTO=SMTP for a HELO client', async () => {
    const s = session({ auth: 'none' });
    s.say('HELO mta.example.com');
    s.send('MAIL FROM:<>');
    const backend = new FakePostfix();
    await s.adapter.login(backend, null, undefined);
    assert.deepEqual(backend.received, [
      'EHLO gw.example.org',
      'XCLIENT PROTO=SMTP HELO=mta.example.com ADDR=203.0.113.7 PORT=51234',
      'EHLO mta.example.com',
      'MAIL FROM:<>',
    ]);
  });

  it('splits an XCLIENT longer than 512 bytes, with ADDR, PORT and LOGIN in the last command', async () => {
    const s = session({ tlsUp: true });
    s.say(`EHLO ${'+'.repeat(200)}`);
    s.send(`AUTH PLAIN ${plain(`${'='.repeat(100)}@example.org`, 'secret')}`);
    const backend = new FakePostfix();
    await s.adapter.login(backend, null, undefined); // the policy vouched for the user (local users)
    const xclients = backend.received.filter((l) => l.startsWith('XCLIENT '));
    assert.equal(xclients.length, 2, xclients.join('\n'));
    assert.match(xclients[0]!, /^XCLIENT PROTO=ESMTP HELO=(\+2B){85}$/, 'values are cut to 255 bytes, never inside +HH');
    assert.match(xclients[1]!, /^XCLIENT ADDR=203\.0\.113\.7 PORT=51234 LOGIN=(\+3D){85}$/);
    for (const l of xclients) assert.ok(l.length + 2 <= 512);
  });

  it('vouches for a locally authenticated user with XCLIENT LOGIN and sends no AUTH', async () => {
    const s = readyForAuth();
    s.send(`AUTH PLAIN ${plain('bob@example.org', 'pw')}`);
    const backend = new FakePostfix();
    const r = await s.adapter.login(backend, null, undefined);
    assert.deepEqual(r, { ok: true, reply: '235 2.7.0 Authentication successful\r\n' });
    assert.equal(backend.received[1], 'XCLIENT PROTO=ESMTP HELO=client.example.net ADDR=203.0.113.7 PORT=51234 LOGIN=bob@example.org');
    assert.ok(!backend.received.some((l) => l.startsWith('AUTH')));
  });

  it('goes on without XCLIENT when the backend refuses it', async () => {
    const s = readyForAuth();
    s.send(`AUTH PLAIN ${plain('alice', 'secret')}`);
    const backend = new FakePostfix({ xclientReply: ['550 5.7.0 Error: insufficient authorization'] });
    const r = await s.adapter.login(backend, { user: 'alice', password: 'secret', mechanism: 'PLAIN' }, undefined);
    assert.equal(r.ok, true);
    assert.deepEqual(backend.received.map((l) => l.split(' ')[0]), ['EHLO', 'XCLIENT', 'AUTH']);
  });

  it('sends no XCLIENT when the listener turns it off', async () => {
    const s = readyForAuth({ xclient: false });
    s.send(`AUTH PLAIN ${plain('alice', 'secret')}`);
    const backend = new FakePostfix();
    await s.adapter.login(backend, { user: 'alice', password: 'secret', mechanism: 'PLAIN' }, undefined);
    assert.deepEqual(backend.received.map((l) => l.split(' ')[0]), ['EHLO', 'AUTH']);
  });

  it('uses the AUTH LOGIN dialogue when the backend has no PLAIN', async () => {
    const s = readyForAuth({ xclient: false });
    s.send('AUTH LOGIN');
    s.send(b64('alice'));
    s.send(b64('secret'));
    const backend = new FakePostfix({ ehlo: ['AUTH LOGIN'] });
    const r = await s.adapter.login(backend, { user: 'alice', password: 'secret', mechanism: 'LOGIN' }, undefined);
    assert.equal(r.ok, true);
    assert.deepEqual(backend.received, ['EHLO gw.example.org', 'AUTH LOGIN', b64('alice'), b64('secret')]);
  });

  it('reads the old AUTH=... keyword too', async () => {
    const s = readyForAuth({ xclient: false });
    s.send(`AUTH PLAIN ${plain('alice', 'secret')}`);
    const backend = new FakePostfix({ ehlo: ['AUTH=LOGIN PLAIN'] });
    const r = await s.adapter.login(backend, { user: 'alice', password: 'secret', mechanism: 'PLAIN' }, undefined);
    assert.equal(r.ok, true);
  });

  it('turns a backend 535 into a failed login the client may retry', async () => {
    const s = readyForAuth();
    s.send(`AUTH PLAIN ${plain('alice', 'wrong')}`);
    const r = await s.adapter.login(new FakePostfix(), { user: 'alice', password: 'wrong', mechanism: 'PLAIN' }, undefined);
    assert.deepEqual(r, { ok: false, reply: '535 5.7.8 Authentication credentials invalid\r\n' });
    assert.equal(s.send(`AUTH PLAIN ${plain('alice', 'secret')}`).kind, 'login', 'the session is back before AUTH');
  });

  it('turns a backend 4xx into a temporary failure', async () => {
    const s = readyForAuth();
    s.send(`AUTH PLAIN ${plain('alice', 'secret')}`);
    const backend = new FakePostfix({ authReply: ['454 4.7.0 Temporary authentication failure: connection refused'] });
    const r = await s.adapter.login(backend, { user: 'alice', password: 'secret', mechanism: 'PLAIN' }, undefined);
    assert.deepEqual(r, { ok: false, reply: '454 4.7.0 Temporary authentication failure\r\n' });
  });

  it('throws BACKEND_NO_AUTH (a configuration error, not a protocol one) when the backend offers no AUTH for passthrough credentials', async () => {
    const s = readyForAuth();
    s.send(`AUTH PLAIN ${plain('alice', 'secret')}`);
    const backend = new FakePostfix({ ehlo: ['PIPELINING', '8BITMIME'] });
    await rejectsWithCode(s.adapter.login(backend, { user: 'alice', password: 'secret', mechanism: 'PLAIN' }, undefined), 'BACKEND_NO_AUTH');
  });

  it('throws BACKEND_PROTOCOL on a backend that does not greet with 220', async () => {
    const s = readyForAuth();
    s.send(`AUTH PLAIN ${plain('alice', 'secret')}`);
    const backend = new FakePostfix({ greeting: ['554 5.3.2 mx.backend.example Service unavailable'] });
    await rejectsWithCode(s.adapter.login(backend, { user: 'alice', password: 'secret', mechanism: 'PLAIN' }, undefined), 'BACKEND_PROTOCOL');
  });

  it('reads multi-line greetings', async () => {
    const s = readyForAuth({ xclient: false });
    s.send(`AUTH PLAIN ${plain('alice', 'secret')}`);
    const backend = new FakePostfix({ greeting: ['220-mx.backend.example ESMTP', '220-no UCE', '220 ready'] });
    assert.equal((await s.adapter.login(backend, { user: 'alice', password: 'secret', mechanism: 'PLAIN' }, undefined)).ok, true);
  });

  it('throws BACKEND_PROTOCOL when no AUTH or MAIL is pending', async () => {
    const s = readyForAuth();
    await rejectsWithCode(s.adapter.login(new FakePostfix(), null, undefined), 'BACKEND_PROTOCOL');
  });
});

// ---- helpers and probe ----------------------------------------------------------------

describe('SMTP helpers and probe', () => {
  it('xtext-encodes like Postfix expects', () => {
    assert.equal(xtext('plain.example'), 'plain.example');
    assert.equal(xtext('a+b=c d\x01\x7f\xe9'), 'a+2Bb+3Dc+20d+01+7F+E9');
    assert.equal(xtext('=====', 7), '+3D+3D', 'never cuts a +HH in half');
  });

  it('reads multi-line replies and refuses non-replies', async () => {
    const link = (lines: string[]): BackendLink => ({
      readLine: () => {
        const l = lines.shift();
        return l === undefined ? Promise.reject(new Error('closed')) : Promise.resolve(l);
      },
      write: () => undefined,
    });
    assert.deepEqual(await readReply(link(['250-a', '250-b', '250 c', '250 next'])), { code: 250, lines: ['250-a', '250-b', '250 c'] });
    assert.deepEqual(await readReply(link(['354'])), { code: 354, lines: ['354'] });
    await rejectsWithCode(readReply(link(['hello'])), 'BACKEND_PROTOCOL');
  });

  it('probes the EHLO keywords and says QUIT', async () => {
    const backend = new FakePostfix();
    const caps = await smtpProtocol.probe(backend, 'gw.example.org');
    assert.deepEqual(caps.capabilities, POSTFIX_EHLO);
    assert.ok(caps.at > 0);
    assert.deepEqual(backend.received, ['EHLO gw.example.org', 'QUIT']);
  });

  it('refuses to probe a backend that does not greet with 220', async () => {
    await rejectsWithCode(smtpProtocol.probe(new FakePostfix({ greeting: ['421 busy'] }), 'gw'), 'BACKEND_PROTOCOL');
  });

  it('is the smtp module', () => {
    assert.equal(smtpProtocol.protocol, 'smtp');
  });
});

// ---- the spliced session ------------------------------------------------------------

/** A relay host that records what goes each way. */
function relayHost(): RelayHost & { backend: string; client: string; units: string[] } {
  const host = {
    backend: '',
    client: '',
    units: [] as string[],
    toBackend: (d: Buffer) => void (host.backend += d.toString('latin1')),
    toClient: (d: Buffer | string) => void (host.client += typeof d === 'string' ? d : d.toString('latin1')),
    count: (u: string) => {
      host.units.push(u);
      return 'go' as const;
    },
    refused: () => undefined,
    closing: () => undefined,
    close: () => undefined,
  };
  return host;
}

describe('SMTP after login: the relay', () => {
  it('hands the spliced session to a relay that answers AUTH and XCLIENT itself and knows CHUNKING from the login', async () => {
    const s = readyForAuth();
    s.send(`AUTH PLAIN ${plain('alice', 'secret')}`);
    assert.equal((await s.adapter.login(new FakePostfix(), { user: 'alice', password: 'secret', mechanism: 'PLAIN' }, undefined)).ok, true);
    const host = relayHost();
    const relay = s.adapter.relay(host);
    relay.fromClient(Buffer.from(`AUTH PLAIN ${plain('bob', 'x')}\r\nXCLIENT ADDR=192.0.2.66 LOGIN=ceo\r\nRCPT TO:<b@example.com>\r\nBDAT 2 LAST\r\nhi`));
    assert.equal(host.client, '503 5.5.1 Error: already authenticated\r\n550 5.7.0 Error: insufficient authorization\r\n');
    assert.equal(host.backend, 'RCPT TO:<b@example.com>\r\nBDAT 2 LAST\r\nhi', 'the login EHLO offered CHUNKING');
    assert.deepEqual(host.units, ['recipient']);
    relay.fromBackend(Buffer.from('250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n'));
    assert.deepEqual(host.units, ['recipient', 'message']);
  });

  it('refuses BDAT where the backend offered no CHUNKING, and words AUTH for an MX session without login', async () => {
    const s = session({ auth: 'none' });
    s.say('EHLO mx.sender.example');
    s.send('MAIL FROM:<a@sender.example>');
    await s.adapter.login(new FakePostfix({ ehlo: POSTFIX_EHLO.filter((k) => k !== 'CHUNKING') }), null, undefined);
    const host = relayHost();
    const relay = s.adapter.relay(host);
    relay.fromClient(Buffer.from('AUTH PLAIN AGEAYg==\r\nBDAT 4 LAST\r\nRSETNOOP\r\n'));
    assert.equal(host.client, '503 5.5.1 Error: authentication not enabled\r\n502 5.5.1 Error: command not implemented\r\n');
    assert.equal(host.backend, 'NOOP\r\n', 'the refused chunk was dropped, not read as commands');
  });

  it('has no relay before the backend session took over', () => {
    const s = readyForAuth();
    assert.throws(() => s.adapter.relay(relayHost()));
  });
});
