/**
 * SMTP (RFC 5321) before the session is handed to the backend: greeting,
 * EHLO/HELO, STARTTLS (RFC 3207), AUTH PLAIN / LOGIN (RFC 4954) on submission
 * listeners, and, on MX listeners without authentication, the first MAIL
 * FROM. The login is replayed on the backend (a legacy MTA such as Postfix),
 * preceded by XCLIENT when the backend offers it; then `smtp-relay.ts` stands
 * between client and backend (what a client may not say there, counting).
 */
import { MailgateError } from '../core/errors.ts';
import type { Listener } from '../config/load.ts';
import { encodePlain, parseMechanism, SaslExchange, type SaslStep } from './sasl.ts';
import { createSmtpRelay, GATEWAY_ONLY_KEYWORD } from './smtp-relay.ts';
import {
  assertNever,
  oneLine,
  reply,
  sanitizeValue,
  type BackendCapabilities,
  type BackendLink,
  type Credentials,
  type Dialogue,
  type Goodbye,
  type LineTally,
  type LoginRefusal,
  type LoginResult,
  type MailAdapter,
  type ProtocolModule,
  type Refusal,
  type RelayFilter,
  type RelayHost,
  type SessionFacts,
  type Step,
} from './types.ts';
import { toWire } from './wire.ts';

/** What the client said in EHLO/HELO; the name is cleaned for reuse on the backend. */
interface Hello {
  readonly name: string;
  readonly esmtp: boolean;
}

/** The command that started the login: AUTH (the user is known) or, on an MX listener, the first MAIL. */
type Pending = { readonly cmd: 'AUTH'; readonly user: string } | { readonly cmd: 'MAIL'; readonly line: string };

type Idle = { s: 'connected' } | { s: 'hello'; hello: Hello };

type SmtpState =
  /** Greeted; no EHLO/HELO yet (also right after STARTTLS). */
  | { s: 'connected' }
  | { s: 'hello'; hello: Hello }
  | { s: 'sasl'; hello: Hello; exchange: SaslExchange }
  /** The driver is deciding and replaying the login; it reads no lines meanwhile. */
  | { s: 'login'; hello: Hello; pending: Pending }
  /** A BDAT chunk the client sent before it may send mail is being read and dropped. */
  | { s: 'discard'; after: Idle }
  /** The backend session took over; the driver splices and feeds no more lines. `keywords`: the backend's last EHLO. */
  | { s: 'spliced'; authenticated: boolean; keywords: readonly string[] };

const DEFAULT_EXTENSIONS: readonly string[] = ['PIPELINING', '8BITMIME'];
/** Commands that exist but that the gateway does not offer before the backend session. */
const NOT_IMPLEMENTED = new Set(['EXPN', 'ETRN', 'TURN', 'ATRN', 'XCLIENT', 'XFORWARD', 'SEND', 'SOML', 'SAML', 'VERB']);
/** Errors (syntax, sequence) tolerated before login, like Postfix's hard error limit (the pre-login loop counts). */
const MAX_ERRORS = 10;
/** Bounds a backend reply read during the login replay; extra lines are read and dropped. */
const MAX_REPLY_LINES = 100;
/** RFC 5321 §4.5.3.1.4 command line limit, including CRLF. */
const MAX_COMMAND = 512;
/** Postfix rejects XCLIENT values longer than this (after xtext encoding). */
const MAX_XCLIENT_VALUE = 255;

interface SmtpSettings {
  tls: 'implicit' | 'starttls' | 'none';
  auth: 'required' | 'none';
  xclient: boolean;
  requireTls: boolean;
}

function settingsOf(l: Listener): SmtpSettings {
  if (l.protocol === 'smtp') return { tls: l.tls, auth: l.auth, xclient: l.xclient, requireTls: l.require_tls };
  // Not an SMTP listener (a wiring mistake): the strictest reading.
  return { tls: l.tls, auth: 'required', xclient: false, requireTls: true };
}

export class SmtpAdapter implements MailAdapter {
  private state: SmtpState = { s: 'connected' };
  /** Hears what the line being read was (the pre-login loop counts). */
  private tally: LineTally | undefined;
  private readonly facts: SessionFacts;
  private readonly settings: SmtpSettings;
  private readonly backendExtensions: readonly string[];

  constructor(facts: SessionFacts, caps: BackendCapabilities | undefined) {
    this.facts = facts;
    this.settings = settingsOf(facts.listener);
    this.backendExtensions = caps ? caps.capabilities : DEFAULT_EXTENSIONS;
  }

  /** The EHLO keywords offered to the client right now. */
  extensions(): string[] {
    const tls = this.facts.tls();
    // The same keywords go as after login (smtp-relay.ts): the gateway's own (STARTTLS, AUTH) are added here.
    const out = this.backendExtensions.map((e) => sanitizeValue(e, 512).trim()).filter((e) => e && !GATEWAY_ONLY_KEYWORD.test(e));
    if (this.settings.tls === 'starttls' && !tls) out.push('STARTTLS');
    if (this.settings.auth === 'required' && (tls || !this.settings.requireTls)) out.push('AUTH PLAIN LOGIN');
    return out;
  }

  greeting(): string {
    return `220 ${this.facts.hostname} ESMTP mailgate\r\n`;
  }

  tlsStarted(): void {
    // RFC 3207 §4.2: everything learned before TLS is forgotten; the client must EHLO again.
    this.state = { s: 'connected' };
  }

  onLine(line: Buffer, tally?: LineTally): Step {
    this.tally = tally;
    const text = line.toString('latin1');
    switch (this.state.s) {
      case 'sasl':
        tally?.part();
        return this.saslLine(this.state.hello, this.state.exchange, text);
      case 'login':
      case 'discard':
        // The driver reads no lines while a login runs or a BDAT chunk is read; a line here is a driver bug.
        return this.internalError();
      case 'spliced':
        // The relay (smtp-relay.ts) reads the client after login; a line here is a driver bug, and still no second login.
        if (/^AUTH\b/i.test(text)) return this.error('503 5.5.1 Already authenticated\r\n');
        return this.internalError();
      case 'connected':
      case 'hello':
        return this.command(text);
      default:
        return assertNever(this.state);
    }
  }

  onLiteral(_data: Buffer): Step {
    if (this.state.s !== 'discard') return this.internalError();
    this.state = this.state.after;
    return reply('');
  }

  private command(text: string): Step {
    // Greedy match and trimEnd(): a lazy group before `[ \t]*$` backtracks quadratically on runs of spaces.
    const m = /^([A-Za-z]+)(?:[ \t]+(.*))?$/s.exec(text);
    if (!m?.[1]) return this.error('500 5.5.2 Syntax error\r\n');
    const verb = m[1].toUpperCase();
    const args = (m[2] ?? '').trimEnd();
    switch (verb) {
      case 'EHLO':
      case 'HELO':
        return this.hello(verb, args);
      case 'STARTTLS':
        return this.starttls(args);
      case 'AUTH':
        return this.auth(args);
      case 'MAIL':
        return this.mail(text, args);
      case 'RCPT':
      case 'DATA':
        return this.needMail();
      case 'BDAT':
        return this.bdat(args);
      case 'NOOP':
        return reply('250 2.0.0 Ok\r\n');
      case 'RSET':
        return reply('250 2.0.0 Ok\r\n');
      case 'QUIT':
        return { kind: 'close', data: '221 2.0.0 Bye\r\n', reason: 'client-quit' };
      case 'HELP':
        return reply('214 2.0.0 See RFC 5321\r\n');
      case 'VRFY':
        return reply('252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery\r\n');
      default:
        if (NOT_IMPLEMENTED.has(verb)) return this.error('502 5.5.1 Command not implemented\r\n');
        return this.error('500 5.5.2 Syntax error\r\n');
    }
  }

  private hello(verb: 'EHLO' | 'HELO', args: string): Step {
    const name = cleanHeloName(args.split(/[ \t]+/)[0] ?? '');
    if (!name) return this.error(`501 5.5.4 Syntax: ${verb} hostname\r\n`);
    // RFC 5321 §4.1.4: EHLO/HELO starts over (any SASL exchange already ended with its own line).
    this.state = { s: 'hello', hello: { name, esmtp: verb === 'EHLO' } };
    const host = this.facts.hostname;
    if (verb === 'HELO') return reply(`250 ${host}\r\n`);
    const lines = [host, ...this.extensions()];
    return reply(lines.map((l, i) => `250${i === lines.length - 1 ? ' ' : '-'}${l}\r\n`).join(''));
  }

  private starttls(args: string): Step {
    if (args) return this.error('501 5.5.4 Syntax: STARTTLS\r\n');
    if (this.facts.tls()) return this.error('503 5.5.1 TLS already active\r\n');
    if (this.settings.tls !== 'starttls') return this.error('502 5.5.1 STARTTLS not available\r\n');
    return { kind: 'starttls', data: '220 2.0.0 Ready to start TLS\r\n' };
  }

  private auth(args: string): Step {
    if (this.settings.auth !== 'required') return this.error('503 5.5.1 Authentication not available\r\n');
    if (this.state.s !== 'hello' || !this.state.hello.esmtp) return this.error('503 5.5.1 Send EHLO first\r\n');
    const hello = this.state.hello;
    if (this.settings.requireTls && !this.facts.tls()) return this.error('530 5.7.0 Must issue a STARTTLS command first\r\n');
    const [mechName, ir, extra] = args.split(/[ \t]+/);
    if (!mechName || extra !== undefined) return this.error('501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n');
    const mech = parseMechanism(mechName);
    if (!mech) return this.error('504 5.5.4 Unrecognized authentication type\r\n');
    if (ir !== undefined && ir.length > this.facts.listener.limits.max_sasl) return this.saslTooLong(hello);
    const exchange = new SaslExchange(mech);
    return this.saslStep(hello, exchange, exchange.start(ir));
  }

  private saslLine(hello: Hello, exchange: SaslExchange, text: string): Step {
    if (text.length > this.facts.listener.limits.max_sasl) return this.saslTooLong(hello);
    return this.saslStep(hello, exchange, exchange.next(text));
  }

  private saslTooLong(hello: Hello): Step {
    this.state = { s: 'hello', hello };
    return this.error('500 5.5.6 Authentication exchange line is too long\r\n');
  }

  private saslStep(hello: Hello, exchange: SaslExchange, step: SaslStep): Step {
    switch (step.kind) {
      case 'challenge':
        this.state = { s: 'sasl', hello, exchange };
        return reply(`334 ${step.challenge}\r\n`);
      case 'done':
        this.state = { s: 'login', hello, pending: { cmd: 'AUTH', user: step.credentials.user } };
        return { kind: 'login', credentials: step.credentials };
      case 'fail':
        this.state = { s: 'hello', hello };
        if (step.reason === 'aborted') return reply('501 5.0.0 Authentication aborted\r\n');
        return this.error('501 5.5.2 Cannot decode SASL response\r\n');
      default:
        return assertNever(step);
    }
  }

  private mail(text: string, args: string): Step {
    if (this.settings.auth === 'required') return this.error('530 5.7.0 Authentication required\r\n');
    if (this.state.s !== 'hello') return this.error('503 5.5.1 Send EHLO/HELO first\r\n');
    if (!/^FROM:/i.test(args)) return this.error('501 5.5.4 Syntax: MAIL FROM:<address>\r\n');
    if (/[\0\r]/.test(text)) return this.error('501 5.5.2 Invalid characters in command\r\n');
    // MX traffic: the first transaction opens the backend session; this line is replayed there.
    this.state = { s: 'login', hello: this.state.hello, pending: { cmd: 'MAIL', line: text } };
    return { kind: 'login', credentials: null };
  }

  private needMail(): Step {
    if (this.settings.auth === 'required') return this.error('530 5.7.0 Authentication required\r\n');
    return this.error('503 5.5.1 Need MAIL command\r\n');
  }

  private bdat(args: string): Step {
    const m = /^(\d{1,15})(?:[ \t]+LAST)?$/i.exec(args);
    const refusal = this.needMail();
    if (!m?.[1] || refusal.kind !== 'reply') return refusal;
    const size = Number(m[1]);
    // The chunk follows the command unasked (RFC 3030): read and drop it so it is not taken for commands.
    if (size > this.facts.listener.limits.max_literal) {
      return { kind: 'close', data: `${refusal.data}421 4.7.0 ${this.facts.hostname} Closing connection\r\n`, reason: 'protocol-error' };
    }
    if (this.state.s !== 'connected' && this.state.s !== 'hello') return this.internalError();
    this.state = { s: 'discard', after: this.state };
    return { kind: 'literal', size, data: refusal.data };
  }

  /** A client mistake: answered, and counted by the pre-login loop (past MAX_ERRORS the session ends). */
  private error(data: string): Step {
    this.tally?.error();
    return reply(data);
  }

  private internalError(): Step {
    return { kind: 'close', data: '421 4.3.0 Internal error\r\n', reason: 'internal-error' };
  }

  refusal(why: Refusal, text?: string): string {
    const said = (fallback: string) => sanitizeValue(text ?? fallback, 200);
    switch (why) {
      case 'denied':
        return `554 5.7.1 ${said('Access denied')}\r\n`;
      case 'tempfail':
        return `421 4.3.0 ${this.facts.hostname} ${said('Service temporarily unavailable, try again later')}\r\n`;
      case 'idle-timeout':
        return '421 4.4.2 Idle timeout\r\n';
      case 'line-too-long':
        return '500 5.5.6 Line too long\r\n';
      case 'too-many-commands':
        return '421 4.7.0 Too many commands\r\n';
      case 'too-many-errors':
        // Instead of the answer to the last error, like Postfix at its hard error limit.
        return '421 4.7.0 Too many errors\r\n';
      case 'too-many-auth-failures':
        return '421 4.7.0 Too many failed authentications\r\n';
      case 'early-talker':
        return '554 5.5.1 Protocol error: talked before the greeting\r\n';
      case 'shutdown':
        return '421 4.3.2 Service shutting down\r\n';
      case 'killed':
        return '421 4.3.2 Connection closed by the administrator\r\n';
      case 'internal-error':
        return '421 4.3.0 Internal error\r\n';
      default:
        return assertNever(why);
    }
  }

  loginRefusal(why: LoginRefusal, text?: string, fromRule = false): string {
    const pending = this.state.s === 'login' ? this.state.pending : undefined;
    if (this.state.s === 'login') this.state = { s: 'hello', hello: this.state.hello };
    // The driver closes after this one: 421 is the answer RFC 5321 §3.8 gives to any command then.
    if (why === 'backend-unavailable') return `421 4.4.1 ${this.facts.hostname} Backend unavailable, closing connection\r\n`;
    if (pending?.cmd === 'MAIL') {
      // The answer to MAIL FROM on an MX listener: a transaction reply, not an authentication one.
      switch (why) {
        case 'denied':
          return `550 5.7.1 ${sanitizeValue(text ?? 'Access denied', 200)}\r\n`;
        case 'tempfail':
          return `451 4.7.1 ${sanitizeValue(text ?? 'Try again later', 200)}\r\n`;
        default:
          return assertNever(why);
      }
    }
    // An access rule's own reason is shown (the admin wrote it for the client); every other refusal has the
    // same words as a wrong password or a busy backend, so a guess learns nothing from them.
    const shown = fromRule && text !== undefined ? sanitizeValue(text, 200) : undefined;
    switch (why) {
      case 'denied':
        return `535 5.7.8 ${shown ?? 'Authentication credentials invalid'}\r\n`;
      case 'tempfail':
        return `454 4.7.0 ${shown ?? 'Temporary authentication failure'}\r\n`;
      default:
        return assertNever(why);
    }
  }

  goodbye(why: Goodbye): string {
    return this.refusal(why);
  }

  async login(backend: BackendLink, credentials: Credentials | null, _caps: BackendCapabilities | undefined): Promise<LoginResult> {
    if (this.state.s !== 'login') throw new MailgateError('BACKEND_PROTOCOL', 'SMTP login without a pending AUTH or MAIL');
    const { hello, pending } = this.state;
    const greeting = await readReply(backend);
    if (greeting.code !== 220) throw new MailgateError('BACKEND_PROTOCOL', `unexpected backend greeting: ${sanitizeValue(greeting.lines[0] ?? '', 80)}`);
    let keywords = await ehlo(backend, this.facts.hostname);

    if (this.settings.xclient) {
      // With passthrough the backend's own AUTH sets the login; XCLIENT LOGIN would make Postfix
      // refuse that AUTH ("already authenticated"). LOGIN= is for a user the gateway vouches for.
      const vouched = pending.cmd === 'AUTH' && credentials === null ? pending.user : undefined;
      if (await this.xclient(backend, keywords, hello, vouched)) keywords = await ehlo(backend, hello.name);
    }

    if (pending.cmd === 'MAIL') {
      backend.write(`${pending.line}\r\n`);
      const r = await readReply(backend);
      this.state = { s: 'spliced', authenticated: false, keywords };
      // Whatever the backend answers, the transaction is now between the client and the backend.
      return { ok: true, reply: r.lines.map((l) => `${oneLine(l)}\r\n`).join('') };
    }
    if (credentials === null) {
      // Policy authenticated the user itself (local users): the backend is told by XCLIENT, if at all.
      this.state = { s: 'spliced', authenticated: true, keywords };
      return { ok: true, reply: '235 2.7.0 Authentication successful\r\n' };
    }
    const result = await this.backendAuth(backend, credentials, keywords);
    this.state = result.ok ? { s: 'spliced', authenticated: true, keywords } : { s: 'hello', hello };
    return result;
  }

  relay(host: RelayHost): RelayFilter {
    if (this.state.s !== 'spliced') throw new Error('SMTP relay asked for before the backend session took over');
    return createSmtpRelay(host, {
      hostname: this.facts.hostname,
      authenticated: this.state.authenticated,
      tls: this.facts.tls(),
      chunking: this.state.keywords.some((k) => /^CHUNKING$/i.test(k)),
      limitWords: (reason) => this.refusal('tempfail', reason),
    });
  }

  /** Sends XCLIENT with the attributes the backend lists; true when the backend reset its session (EHLO again). */
  private async xclient(backend: BackendLink, keywords: readonly string[], hello: Hello, login: string | undefined): Promise<boolean> {
    const line = keywords.find((k) => /^XCLIENT(\s|$)/i.test(k));
    if (!line) return false;
    const offered = new Set(line.split(/\s+/).slice(1).map((a) => a.toUpperCase()));
    const ip = this.facts.clientIp;
    const early: string[] = [];
    const late: string[] = [];
    const add = (to: string[], name: string, value: string) => {
      if (offered.has(name) && value) to.push(`${name}=${xtext(value)}`);
    };
    add(early, 'PROTO', hello.esmtp ? 'ESMTP' : 'SMTP');
    add(early, 'HELO', hello.name);
    add(late, 'ADDR', ip.includes(':') ? `IPV6:${ip}` : ip);
    add(late, 'PORT', this.facts.clientPort > 0 ? String(this.facts.clientPort) : '');
    if (login !== undefined) add(late, 'LOGIN', toWire(sanitizeValue(login)));
    // Postfix (3.7, tests/e2e/smtp.test.ts) checks XCLIENT permission at every XCLIENT against the client
    // address in force, which an earlier XCLIENT ADDR= replaced, and resets the login and HELO of every
    // XCLIENT that does not carry them: when one command would be too long, ADDR/PORT/LOGIN go last.
    // XFORWARD permission is decided once, by the gateway's own address. So a client's XCLIENT after
    // login passes wherever its own address is authorised (or no ADDR was sent), and its XFORWARD
    // always would: smtp-relay.ts refuses both after login.
    const all = [...early, ...late];
    const commands = `XCLIENT ${all.join(' ')}\r\n`.length <= MAX_COMMAND ? [all] : [early, late];
    let reset = false;
    for (const attrs of commands) {
      if (attrs.length === 0) continue;
      backend.write(`XCLIENT ${attrs.join(' ')}\r\n`);
      const r = await readReply(backend);
      if (r.code === 421) throw new MailgateError('BACKEND_PROTOCOL', `backend closed on XCLIENT: ${sanitizeValue(r.lines[0] ?? '', 80)}`);
      // Refused (not authorised, bad value): carry on without it; the backend sees the gateway as the client.
      if (r.code < 200 || r.code > 299) break;
      reset = true;
    }
    return reset;
  }

  private async backendAuth(backend: BackendLink, credentials: Credentials, keywords: readonly string[]): Promise<LoginResult> {
    const mechs = authMechanisms(keywords);
    if (mechs.size === 0) {
      throw new MailgateError('BACKEND_NO_AUTH', 'backend offers no AUTH; passthrough authentication needs it (use local auth)');
    }
    let r: Reply;
    if (mechs.has('PLAIN')) {
      const ir = encodePlain(credentials.user, credentials.password, credentials.authzid ?? '');
      if (`AUTH PLAIN ${ir}\r\n`.length <= MAX_COMMAND) {
        backend.write(`AUTH PLAIN ${ir}\r\n`);
        r = await readReply(backend);
      } else {
        backend.write('AUTH PLAIN\r\n');
        r = await readReply(backend);
        if (r.code === 334) {
          backend.write(`${ir}\r\n`);
          r = await readReply(backend);
        }
      }
    } else if (mechs.has('LOGIN')) {
      if (credentials.authzid) return { ok: false, reply: '535 5.7.8 Authorization identity not supported\r\n' };
      backend.write('AUTH LOGIN\r\n');
      r = await readReply(backend);
      if (r.code === 334) {
        backend.write(`${b64(credentials.user)}\r\n`);
        r = await readReply(backend);
        if (r.code === 334) {
          backend.write(`${b64(credentials.password)}\r\n`);
          r = await readReply(backend);
        }
      }
    } else {
      throw new MailgateError('BACKEND_PROTOCOL', `backend offers neither AUTH PLAIN nor LOGIN (${[...mechs].join(' ')})`);
    }
    if (r.code === 334) {
      // A challenge we cannot answer: abort the exchange, then give up on this backend session.
      backend.write('*\r\n');
      await readReply(backend);
      throw new MailgateError('BACKEND_PROTOCOL', 'backend sent an unexpected AUTH challenge');
    }
    if (r.code === 235) return { ok: true, reply: '235 2.7.0 Authentication successful\r\n' };
    if (r.code >= 500 && r.code <= 599) return { ok: false, reply: '535 5.7.8 Authentication credentials invalid\r\n' };
    if (r.code >= 400 && r.code <= 499) return { ok: false, reply: '454 4.7.0 Temporary authentication failure\r\n' };
    throw new MailgateError('BACKEND_PROTOCOL', `unexpected AUTH reply: ${sanitizeValue(r.lines[0] ?? '', 80)}`);
  }
}

export interface Reply {
  code: number;
  /** The reply's lines as received (code and separator included), without CRLF. */
  lines: string[];
}

const REPLY_LINE = /^(\d{3})([ -]|$)/;

/** Reads one (possibly multi-line) SMTP reply: `250-...` continues until `250 ...`. */
export async function readReply(backend: BackendLink): Promise<Reply> {
  const lines: string[] = [];
  let code = 0;
  for (;;) {
    const line = await backend.readLine();
    const m = REPLY_LINE.exec(line);
    if (!m?.[1]) throw new MailgateError('BACKEND_PROTOCOL', `not an SMTP reply: ${sanitizeValue(line, 80)}`);
    code = Number(m[1]);
    if (lines.length < MAX_REPLY_LINES) lines.push(line);
    if (m[2] !== '-') return { code, lines };
  }
}

/** The EHLO keyword lines (without status code) after the first line of a 250 reply. */
function keywordsOf(r: Reply): string[] {
  return r.lines.slice(1).map((l) => l.slice(4).trim()).filter(Boolean);
}

async function ehlo(backend: BackendLink, name: string): Promise<string[]> {
  backend.write(`EHLO ${name}\r\n`);
  const r = await readReply(backend);
  if (r.code !== 250) throw new MailgateError('BACKEND_PROTOCOL', `backend refused EHLO: ${sanitizeValue(r.lines[0] ?? '', 80)}`);
  return keywordsOf(r);
}

/** Mechanisms from `AUTH PLAIN LOGIN` or the old `AUTH=PLAIN LOGIN` form. */
function authMechanisms(keywords: readonly string[]): Set<string> {
  const mechs = new Set<string>();
  for (const k of keywords) {
    const m = /^AUTH[ =](.*)$/i.exec(k);
    if (m?.[1]) for (const mech of m[1].split(/\s+/)) if (mech) mechs.add(mech.toUpperCase());
  }
  return mechs;
}

/**
 * xtext (RFC 3461 §4, as Postfix's XCLIENT expects it): `+HH` for every byte
 * outside `!`..`~` and for `+` and `=`. Input is a binary string (one char per
 * byte). Never longer than `max`: a `+HH` is never cut in half.
 */
export function xtext(value: string, max = MAX_XCLIENT_VALUE): string {
  let out = '';
  for (let i = 0; i < value.length; i++) {
    const c = value.charCodeAt(i) & 0xff;
    const piece = c < 0x21 || c > 0x7e || c === 0x2b || c === 0x3d ? `+${c.toString(16).toUpperCase().padStart(2, '0')}` : value[i]!;
    if (out.length + piece.length > max) break;
    out += piece;
  }
  return out;
}

/** A HELO/EHLO name fit to be repeated to the backend: no control characters, no spaces, bounded. */
function cleanHeloName(name: string): string {
  return sanitizeValue(name).replace(/[\x00-\x20\x7f]/g, '');
}

function b64(s: string): string {
  return Buffer.from(s, 'utf8').toString('base64');
}


export const smtpProtocol: ProtocolModule = {
  protocol: 'smtp',
  createAdapter: (facts, caps) => new SmtpAdapter(facts, caps),
  // RFC 5321 §4.3.1: a client waits for the greeting; one that does not is a spam engine (postscreen's pregreet test).
  dialogue: (l): Dialogue => ({ greetDelayMs: l.protocol === 'smtp' ? l.greet_delay : 0, refuseEarlyTalkers: true, maxErrors: MAX_ERRORS }),
  async probe(backend, hostname) {
    const greeting = await readReply(backend);
    if (greeting.code !== 220) throw new MailgateError('BACKEND_PROTOCOL', `unexpected SMTP greeting: ${sanitizeValue(greeting.lines[0] ?? '', 80)}`);
    const capabilities = await ehlo(backend, hostname);
    backend.write('QUIT\r\n');
    return { capabilities, at: Date.now() };
  },
};
