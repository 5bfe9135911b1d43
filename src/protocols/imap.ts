/**
 * IMAP (RFC 9051 / 3501) before login: greeting, CAPABILITY, NOOP, LOGOUT,
 * STARTTLS, ID, LOGIN (quoted strings and literals) and AUTHENTICATE PLAIN /
 * LOGIN with SASL-IR. The login is replayed on the backend, preceded by an
 * ID command that tells it the client's real address.
 */
import { MailgateError } from '../core/errors.ts';
import { encodePlain, parseMechanism, SaslExchange, type SaslStep } from './sasl.ts';
import { astring, quotable, quote, tokenizeLine, validTag, type ImapToken } from './imap-syntax.ts';
import { ImapRelay } from './imap-relay.ts';
import {
  assertNever,
  echoVerb,
  reply,
  oneLine,
  sanitizeValue,
  type BackendCapabilities,
  type BackendLink,
  type Credentials,
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
import { fromWire, toWire } from './wire.ts';

type ImapState =
  | { s: 'command' }
  /** Inside a command that announced a literal; `bytes` counts its lines and literals so far. */
  | { s: 'literal'; tokens: ImapToken[]; size: number; bytes: number }
  | { s: 'sasl'; tag: string; exchange: SaslExchange }
  | { s: 'login'; tag: string };

/** Capabilities the gateway itself answers for before login, so the backend's are dropped. */
const OWN = /^(STARTTLS|LOGINDISABLED|AUTH=.*|SASL-IR|LITERAL[+-]|ID|LOGIN-REFERRALS|IMAP4REV1|COMPRESS=.*)$/i;
const MAX_ID_PAIRS = 30;
/** An IMAP atom (RFC 9051 §9): what a backend capability must be to be repeated to a client. */
const ATOM = /^[^\x00-\x20\x7f-\xff(){%*"\\\]]+$/;

export class ImapAdapter implements MailAdapter {
  private state: ImapState = { s: 'command' };
  /** Hears what the line being read was (the pre-login loop counts). */
  private tally: LineTally | undefined;
  private clientId: [string, string][] = [];
  private readonly facts: SessionFacts;
  private readonly backendCaps: readonly string[];

  constructor(facts: SessionFacts, caps: BackendCapabilities | undefined) {
    this.facts = facts;
    this.backendCaps = caps?.capabilities ?? ['IMAP4rev1'];
  }

  capabilities(): string {
    const l = this.facts.listener;
    const tls = this.facts.tls();
    const loginDisabled = l.protocol === 'imap' && l.require_tls && !tls;
    // Only atoms: a backend's "{5}", quote or "]" would desynchronise the client's parser (learned before its TLS).
    const caps = ['IMAP4rev1', ...this.backendCaps.filter((c) => ATOM.test(c) && !OWN.test(c)), 'SASL-IR', 'LITERAL+', 'ID'];
    if (l.tls === 'starttls' && !tls) caps.push('STARTTLS');
    if (loginDisabled) caps.push('LOGINDISABLED');
    else caps.push('AUTH=PLAIN', 'AUTH=LOGIN');
    return caps.join(' ');
  }

  greeting(): string {
    return `* OK [CAPABILITY ${this.capabilities()}] ${this.facts.hostname} IMAP ready\r\n`;
  }

  tlsStarted(): void {
    this.state = { s: 'command' };
  }

  onLine(line: Buffer, tally?: LineTally): Step {
    this.tally = tally;
    const text = line.toString('latin1');
    switch (this.state.s) {
      case 'sasl':
        // Too long: the exchange ends, and that counts as a command of its own.
        if (text.length > this.facts.listener.limits.max_sasl) return this.saslTooLong(this.state.tag);
        tally?.part();
        return this.saslStep(this.state.tag, this.state.exchange.next(text));
      case 'literal':
        // The line after a literal continues the same command.
        return this.continueCommand(this.state.tokens, text, this.state.bytes);
      case 'login':
        // The driver does not read while a login is in flight; a line here is a driver bug.
        return { kind: 'close', data: '* BYE Internal error\r\n', reason: 'internal-error' };
      case 'command':
        return this.continueCommand([], text);
      default:
        return assertNever(this.state);
    }
  }

  onLiteral(data: Buffer): Step {
    if (this.state.s !== 'literal') return { kind: 'close', data: '* BYE Internal error\r\n', reason: 'internal-error' };
    const tokens = [...this.state.tokens, { t: 'string' as const, v: data.toString('latin1') }];
    this.state = { s: 'literal', tokens, size: 0, bytes: this.state.bytes };
    return { kind: 'reply', data: '' };
  }

  private continueCommand(prior: ImapToken[], text: string, before = 0): Step {
    const r = tokenizeLine(text);
    if (!r.ok) {
      this.state = { s: 'command' };
      return this.bad('*', `Syntax error: ${r.error}`);
    }
    const tokens = [...prior, ...r.tokens];
    if (r.literal) {
      const limits = this.facts.listener.limits;
      // One command, however many literals it chains, stays within what the driver may buffer for it.
      const bytes = before + text.length + 2 + r.literal.size;
      if (r.literal.size > limits.max_literal || bytes > limits.max_line + limits.max_literal) {
        this.state = { s: 'command' };
        const first = tokens[0];
        // Echo the client's tag only when it is one (a bare CR or a quoted string never goes back).
        const tag = first?.t === 'atom' && validTag(first.v) ? first.v : '*';
        // A non-synchronising literal is already on its way: the stream cannot be resynchronised.
        if (r.literal.nonSync) return { kind: 'close', data: `* BYE [TOOBIG] Literal too big\r\n`, reason: 'protocol-error' };
        this.tally?.error();
        return reply(`${tag} NO [TOOBIG] Literal too big\r\n`);
      }
      // The command goes on after the literal: it is counted once, when it is complete.
      this.tally?.part();
      this.state = { s: 'literal', tokens, size: r.literal.size, bytes };
      return { kind: 'literal', size: r.literal.size, data: r.literal.nonSync ? '' : '+ Ready for literal data\r\n' };
    }
    this.state = { s: 'command' };
    return this.command(tokens);
  }

  private command(tokens: ImapToken[]): Step {
    const first = tokens[0];
    if (!first) return this.bad('*', 'Empty command line');
    const tag = first.t === 'atom' ? first.v : '';
    if (!validTag(tag)) return this.bad('*', 'Invalid tag');
    const name = tokens[1]?.t === 'atom' ? tokens[1].v.toUpperCase() : '';
    const args = tokens.slice(2);
    switch (name) {
      case 'CAPABILITY':
        return reply(`* CAPABILITY ${this.capabilities()}\r\n${tag} OK CAPABILITY completed\r\n`);
      case 'NOOP':
        return reply(`${tag} OK NOOP completed\r\n`);
      case 'LOGOUT':
        return { kind: 'close', data: `* BYE Logging out\r\n${tag} OK LOGOUT completed\r\n`, reason: 'client-quit' };
      case 'STARTTLS':
        if (this.facts.tls()) return reply(`${tag} BAD TLS is already active\r\n`);
        if (this.facts.listener.tls !== 'starttls') return reply(`${tag} BAD STARTTLS is not offered here\r\n`);
        return { kind: 'starttls', data: `${tag} OK Begin TLS negotiation now\r\n` };
      case 'ID':
        return this.id(tag, args);
      case 'LOGIN':
        return this.loginCommand(tag, args);
      case 'AUTHENTICATE':
        return this.authenticate(tag, args);
      case '':
        return this.bad(tag, 'Missing command');
      default:
        return reply(`${tag} BAD Command ${echoVerb(name, 32)} is not valid before login\r\n`);
    }
  }

  private privacyRequired(tag: string): Step | undefined {
    const l = this.facts.listener;
    if (l.protocol === 'imap' && l.require_tls && !this.facts.tls()) {
      return reply(`${tag} NO [PRIVACYREQUIRED] Log in after STARTTLS\r\n`);
    }
    return undefined;
  }

  private loginCommand(tag: string, args: ImapToken[]): Step {
    const refused = this.privacyRequired(tag);
    if (refused) return refused;
    const user = astring(args[0]);
    const password = astring(args[1]);
    if (user === undefined || password === undefined || args.length !== 2 || !user || /[\0\r\n]/.test(user + password)) {
      return this.bad(tag, 'LOGIN expects a user name and a password');
    }
    this.state = { s: 'login', tag };
    return { kind: 'login', credentials: { user: fromWire(user), password: fromWire(password), mechanism: 'LOGIN' } };
  }

  private authenticate(tag: string, args: ImapToken[]): Step {
    const refused = this.privacyRequired(tag);
    if (refused) return refused;
    const mech = parseMechanism(astring(args[0]) ?? '');
    if (!mech) return reply(`${tag} NO Unsupported authentication mechanism\r\n`);
    if (args.length > 2) return this.bad(tag, 'AUTHENTICATE takes a mechanism and an optional initial response');
    const exchange = new SaslExchange(mech);
    const ir = astring(args[1]);
    if (ir !== undefined && ir.length > this.facts.listener.limits.max_sasl) return this.saslTooLong(tag);
    return this.saslStep(tag, exchange.start(ir), exchange);
  }

  /** A SASL response over max_sasl: the exchange ends unread (README: limits.max_sasl). */
  private saslTooLong(tag: string): Step {
    this.state = { s: 'command' };
    return this.bad(tag, 'Authentication exchange line is too long');
  }

  private saslStep(tag: string, step: SaslStep, exchange?: SaslExchange): Step {
    switch (step.kind) {
      case 'challenge':
        if (exchange) this.state = { s: 'sasl', tag, exchange };
        return { kind: 'reply', data: `+ ${step.challenge}\r\n` };
      case 'done':
        this.state = { s: 'login', tag };
        return { kind: 'login', credentials: step.credentials };
      case 'fail':
        this.state = { s: 'command' };
        return reply(step.reason === 'aborted' ? `${tag} BAD Authentication aborted\r\n` : `${tag} BAD Invalid SASL response\r\n`);
      default:
        return assertNever(step);
    }
  }

  private id(tag: string, args: ImapToken[]): Step {
    // ID NIL, or ID ("key" "value" ...): remembered and passed on, cleaned, with the real address added.
    const pairs: [string, string][] = [];
    if (args[0]?.t === 'open') {
      for (let i = 1; i + 1 < args.length && args[i]?.t !== 'close'; i += 2) {
        const k = astring(args[i]);
        const v = args[i + 1];
        if (k === undefined) return this.bad(tag, 'Bad ID parameter list');
        if (pairs.length < MAX_ID_PAIRS && !/^x-(originating|connected)-/i.test(k) && v?.t !== 'nil') {
          pairs.push([sanitizeValue(k, 30), sanitizeValue(astring(v) ?? '', 1024)]);
        }
      }
    } else if (args[0]?.t !== 'nil') {
      return this.bad(tag, 'ID expects NIL or a parameter list');
    }
    this.clientId = pairs;
    return reply(`* ID ("name" "mailgate")\r\n${tag} OK ID completed\r\n`);
  }

  private bad(tag: string, text: string): Step {
    this.tally?.error();
    return reply(`${tag} BAD ${text}\r\n`);
  }

  refusal(why: Refusal, text?: string): string {
    switch (why) {
      case 'denied':
        return `* BYE [AUTHORIZATIONFAILED] ${text ?? 'Access denied'}\r\n`;
      case 'tempfail':
        return `* BYE [UNAVAILABLE] ${text ?? 'Try again later'}\r\n`;
      case 'idle-timeout':
        return '* BYE Idle timeout, closing\r\n';
      case 'line-too-long':
        return '* BYE [TOOBIG] Line too long\r\n';
      case 'too-many-commands':
        return '* BYE Too many commands without logging in\r\n';
      case 'too-many-errors':
        return '* BYE Too many errors\r\n';
      case 'too-many-auth-failures':
        return '* BYE Too many failed logins\r\n';
      case 'early-talker':
        return '* BYE Protocol error\r\n';
      case 'shutdown':
        return '* BYE [UNAVAILABLE] Server shutting down\r\n';
      case 'killed':
        return '* BYE Connection closed by the administrator\r\n';
      case 'internal-error':
        return '* BYE [SERVERBUG] Internal error\r\n';
      default:
        return assertNever(why);
    }
  }

  loginRefusal(why: LoginRefusal, text?: string): string {
    const tag = this.state.s === 'login' ? this.state.tag : '*';
    this.state = { s: 'command' };
    switch (why) {
      case 'denied':
        return `${tag} NO [AUTHENTICATIONFAILED] ${text ?? 'Authentication failed'}\r\n`;
      case 'tempfail':
        return `${tag} NO [UNAVAILABLE] ${text ?? 'Temporary failure, try again later'}\r\n`;
      case 'backend-unavailable':
        return `* BYE [UNAVAILABLE] Backend server unavailable\r\n${tag} NO [UNAVAILABLE] ${text ?? 'Backend server unavailable, try again later'}\r\n`;
      default:
        return assertNever(why);
    }
  }

  goodbye(why: Goodbye): string {
    // An untagged BYE may come at any time (RFC 9051 §7.1.5), once the response before it is complete.
    return this.refusal(why);
  }

  relay(host: RelayHost): RelayFilter {
    return new ImapRelay(host);
  }

  async login(backend: BackendLink, credentials: Credentials | null, caps: BackendCapabilities | undefined): Promise<LoginResult> {
    if (this.state.s !== 'login' || !credentials) throw new MailgateError('BACKEND_PROTOCOL', 'IMAP login without credentials');
    const clientTag = this.state.tag;
    const greeting = await backend.readLine();
    if (/^\* PREAUTH/i.test(greeting)) {
      // Passing this on would hand an unauthenticated client a logged-in session.
      throw new MailgateError('BACKEND_PROTOCOL', 'backend greeted with PREAUTH');
    }
    if (!/^\* OK/i.test(greeting)) throw new MailgateError('BACKEND_PROTOCOL', `unexpected backend greeting: ${sanitizeValue(greeting, 80)}`);
    const greetCaps = /\[CAPABILITY ([^\]]*)\]/i.exec(greeting)?.[1]?.split(' ');
    const backendCaps = new Set((greetCaps ?? caps?.capabilities ?? []).map((c) => c.toUpperCase()));

    if (this.facts.listener.protocol === 'imap' && this.facts.listener.imap_id) {
      const params: [string, string][] = [
        ...this.clientId,
        ['x-originating-ip', this.facts.clientIp],
        ['x-originating-port', String(this.facts.clientPort)],
        ['x-connected-ip', this.facts.localIp],
        ['x-connected-port', String(this.facts.localPort)],
        ['x-session-ext-id', this.facts.id],
      ];
      const list = params.map(([k, v]) => `${quote(sanitizeValue(k))} ${quote(sanitizeValue(v, 1024))}`).join(' ');
      backend.write(`M1 ID (${list})\r\n`);
      await untilTagged(backend, 'M1');
    }

    const user = toWire(credentials.user);
    const pass = toWire(credentials.password);
    if (backendCaps.has('AUTH=PLAIN')) {
      const ir = encodePlain(credentials.user, credentials.password, credentials.authzid ?? '');
      if (backendCaps.has('SASL-IR')) {
        backend.write(`M2 AUTHENTICATE PLAIN ${ir}\r\n`);
      } else {
        backend.write('M2 AUTHENTICATE PLAIN\r\n');
        let cont = await backend.readLine();
        // Untagged data may come first; only the tagged answer ends the command ("* OK" is not a login).
        while (cont.startsWith('* ')) cont = await backend.readLine();
        if (cont.startsWith('M2 ')) return this.loginAnswer(clientTag, [], cont);
        if (!cont.startsWith('+')) throw new MailgateError('BACKEND_PROTOCOL', `unexpected answer to AUTHENTICATE: ${sanitizeValue(cont, 80)}`);
        backend.write(`${ir}\r\n`);
      }
    } else if (quotable(user) && quotable(pass)) {
      backend.write(`M2 LOGIN ${quote(user)} ${quote(pass)}\r\n`);
    } else {
      const nonSync = backendCaps.has('LITERAL+');
      const lit = (v: string) => `{${Buffer.byteLength(v, 'latin1')}${nonSync ? '+' : ''}}`;
      backend.write(`M2 LOGIN ${lit(user)}\r\n`);
      if (!nonSync && !(await backend.readLine()).startsWith('+')) throw new MailgateError('BACKEND_PROTOCOL', 'backend refused the LOGIN literal');
      backend.write(`${user} ${lit(pass)}\r\n`);
      if (!nonSync && !(await backend.readLine()).startsWith('+')) throw new MailgateError('BACKEND_PROTOCOL', 'backend refused the LOGIN literal');
      backend.write(`${pass}\r\n`);
    }
    const untagged: string[] = [];
    for (;;) {
      const line = await backend.readLine();
      if (line.startsWith('M2 ')) return this.loginAnswer(clientTag, untagged, line);
      if (line.startsWith('* ')) {
        if (untagged.length < 20) untagged.push(line);
      } else if (line.startsWith('+')) {
        // A challenge we did not ask for: abort the exchange cleanly.
        backend.write('*\r\n');
      }
    }
  }

  private loginAnswer(clientTag: string, untagged: string[], tagged: string): LoginResult {
    const m = /^\S+ (OK|NO|BAD)\b ?(.*)$/i.exec(tagged);
    const status = m?.[1]?.toUpperCase();
    const rest = oneLine(m?.[2] ?? '');
    this.state = { s: 'command' };
    const pre = untagged.filter((l) => /^\* (CAPABILITY|OK|NO)\b/i.test(l)).map((l) => `${oneLine(l)}\r\n`).join('');
    if (status === 'OK') return { ok: true, reply: `${pre}${clientTag} OK ${rest}\r\n` };
    return { ok: false, reply: `${clientTag} NO ${rest.startsWith('[') ? rest : `[AUTHENTICATIONFAILED] ${rest || 'Authentication failed'}`}\r\n` };
  }
}

async function untilTagged(backend: BackendLink, tag: string): Promise<string> {
  for (;;) {
    const line = await backend.readLine();
    if (line.startsWith(`${tag} `)) return line;
  }
}


/** IMAP has no error bound of its own: a BAD counts as a command. */
const DIALOGUE = { greetDelayMs: 0, refuseEarlyTalkers: false, maxErrors: undefined } as const;

export const imapProtocol: ProtocolModule = {
  protocol: 'imap',
  createAdapter: (facts, caps) => new ImapAdapter(facts, caps),
  dialogue: () => DIALOGUE,
  async probe(backend, _hostname) {
    const greeting = await backend.readLine();
    if (!/^\* (OK|PREAUTH)/i.test(greeting)) throw new MailgateError('BACKEND_PROTOCOL', `unexpected IMAP greeting: ${sanitizeValue(greeting, 80)}`);
    let caps = /\[CAPABILITY ([^\]]*)\]/i.exec(greeting)?.[1]?.split(' ');
    if (!caps) {
      backend.write('P1 CAPABILITY\r\n');
      for (;;) {
        const line = await backend.readLine();
        const m = /^\* CAPABILITY (.*)$/i.exec(line);
        if (m?.[1]) caps = m[1].split(' ');
        if (line.startsWith('P1 ')) break;
      }
    }
    backend.write('P2 LOGOUT\r\n');
    return { capabilities: (caps ?? []).filter(Boolean), at: Date.now() };
  },
};
