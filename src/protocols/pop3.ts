/**
 * POP3 (RFC 1939) in the AUTHORIZATION state: greeting, CAPA (RFC 2449),
 * STLS (RFC 2595), USER/PASS, AUTH PLAIN/LOGIN (RFC 5034), QUIT. The login is
 * replayed on the backend with AUTH PLAIN where offered, else USER/PASS.
 */
import { MailgateError } from '../core/errors.ts';
import { encodePlain, parseMechanism, SaslExchange, type SaslStep } from './sasl.ts';
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
  type SessionFacts,
  type Step,
} from './types.ts';
import { fromWire, toWire } from './wire.ts';

type Pop3State =
  | { s: 'command'; user: string | undefined }
  | { s: 'sasl'; exchange: SaslExchange }
  | { s: 'login' };

/** CAPA lines the gateway answers for itself. */
const OWN = /^(STLS|SASL|USER|IMPLEMENTATION|LOGIN-DELAY|APOP)\b/i;
/** A CAPA line fit to repeat: a capability name (never "." that ends the list, nor "+OK"), then printable text. */
const CAPA_LINE = /^[A-Za-z0-9][\x20-\x7e]*$/;

export class Pop3Adapter implements MailAdapter {
  private state: Pop3State = { s: 'command', user: undefined };
  /** Hears what the line being read was (the pre-login loop counts). */
  private tally: LineTally | undefined;
  private readonly facts: SessionFacts;
  private readonly backendCaps: readonly string[];

  constructor(facts: SessionFacts, caps: BackendCapabilities | undefined) {
    this.facts = facts;
    this.backendCaps = caps?.capabilities ?? ['TOP', 'UIDL', 'RESP-CODES'];
  }

  private loginAllowed(): boolean {
    const l = this.facts.listener;
    return !(l.protocol === 'pop3' && l.require_tls && !this.facts.tls());
  }

  capa(): string {
    const lines = this.backendCaps.filter((c) => CAPA_LINE.test(c) && !OWN.test(c));
    if (this.facts.listener.tls === 'starttls' && !this.facts.tls()) lines.push('STLS');
    if (this.loginAllowed()) lines.push('USER', 'SASL PLAIN LOGIN');
    return `+OK Capability list follows\r\n${lines.map((l) => `${l}\r\n`).join('')}.\r\n`;
  }

  greeting(): string {
    return `+OK ${this.facts.hostname} POP3 ready\r\n`;
  }

  tlsStarted(): void {
    this.state = { s: 'command', user: undefined };
  }

  onLine(line: Buffer, tally?: LineTally): Step {
    this.tally = tally;
    const text = line.toString('latin1');
    switch (this.state.s) {
      case 'sasl':
        tally?.part();
        if (text.length > this.facts.listener.limits.max_sasl) return this.saslTooLong();
        return this.saslStep(this.state.exchange.next(text));
      case 'login':
        return { kind: 'close', data: '-ERR Internal error\r\n', reason: 'internal-error' };
      case 'command':
        return this.command(text, this.state.user);
      default:
        return assertNever(this.state);
    }
  }

  onLiteral(): Step {
    return { kind: 'close', data: '-ERR Internal error\r\n', reason: 'internal-error' };
  }

  private command(text: string, user: string | undefined): Step {
    const space = text.indexOf(' ');
    const name = (space < 0 ? text : text.slice(0, space)).toUpperCase();
    const arg = space < 0 ? '' : text.slice(space + 1);
    switch (name) {
      case 'CAPA':
        return reply(this.capa());
      case 'QUIT':
        return { kind: 'close', data: '+OK Bye\r\n', reason: 'client-quit' };
      case 'STLS':
        if (this.facts.tls()) return this.err('-ERR TLS is already active');
        if (this.facts.listener.tls !== 'starttls') return this.err('-ERR STLS is not offered here');
        return { kind: 'starttls', data: '+OK Begin TLS negotiation\r\n' };
      case 'USER':
        if (!this.loginAllowed()) return this.err('-ERR [AUTH] Log in after STLS');
        // NUL and a bare CR (LF ends the line) would end or split the command replayed on the backend.
        if (!arg || /[\0\r]/.test(arg)) return this.err('-ERR USER expects a name');
        this.state = { s: 'command', user: arg };
        return reply('+OK\r\n');
      case 'PASS':
        if (!this.loginAllowed()) return this.err('-ERR [AUTH] Log in after STLS');
        if (user === undefined) return this.err('-ERR Send USER first');
        if (!arg || /[\0\r]/.test(arg)) return this.err('-ERR PASS expects a password');
        this.state = { s: 'login' };
        return { kind: 'login', credentials: { user: fromWire(user), password: fromWire(arg), mechanism: 'USER' } };
      case 'AUTH':
        return this.auth(arg);
      case 'APOP':
        return this.err('-ERR APOP is not supported, use USER/PASS or AUTH');
      case '':
        return this.err('-ERR Empty command');
      default:
        return this.err(`-ERR Command ${echoVerb(name, 16)} is not valid before login`);
    }
  }

  private auth(arg: string): Step {
    if (arg === '') return reply('+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n');
    if (!this.loginAllowed()) return this.err('-ERR [AUTH] Log in after STLS');
    const [mechName, ir, extra] = arg.split(' ');
    const mech = parseMechanism(mechName ?? '');
    if (!mech) return this.err('-ERR Unsupported authentication mechanism');
    if (extra !== undefined) return this.err('-ERR AUTH takes a mechanism and an optional initial response');
    if (ir !== undefined && ir.length > this.facts.listener.limits.max_sasl) return this.saslTooLong();
    const exchange = new SaslExchange(mech);
    return this.saslStep(exchange.start(ir), exchange);
  }

  private saslStep(step: SaslStep, exchange?: SaslExchange): Step {
    switch (step.kind) {
      case 'challenge':
        if (exchange) this.state = { s: 'sasl', exchange };
        return reply(`+ ${step.challenge}\r\n`);
      case 'done':
        this.state = { s: 'login' };
        return { kind: 'login', credentials: step.credentials };
      case 'fail':
        this.state = { s: 'command', user: undefined };
        return this.err(step.reason === 'aborted' ? '-ERR Authentication aborted' : '-ERR Invalid SASL response');
      default:
        return assertNever(step);
    }
  }

  /** A SASL response over max_sasl: the exchange ends unread (README: limits.max_sasl). */
  private saslTooLong(): Step {
    this.state = { s: 'command', user: undefined };
    return this.err('-ERR Authentication exchange line is too long');
  }

  private err(text: string): Step {
    this.tally?.error();
    return reply(`${text}\r\n`);
  }

  refusal(why: Refusal, text?: string): string {
    switch (why) {
      case 'denied':
        return `-ERR [SYS/PERM] ${text ?? 'Access denied'}\r\n`;
      case 'tempfail':
        return `-ERR [SYS/TEMP] ${text ?? 'Try again later'}\r\n`;
      case 'idle-timeout':
        return '-ERR Disconnected for inactivity\r\n';
      case 'line-too-long':
        return '-ERR Line too long\r\n';
      case 'too-many-commands':
        return '-ERR Too many commands without logging in\r\n';
      case 'too-many-errors':
        // The answer to the last error still goes, then this.
        return `${text ?? ''}-ERR Too many errors\r\n`;
      case 'too-many-auth-failures':
        return '-ERR [AUTH] Too many failed logins\r\n';
      case 'early-talker':
        return '-ERR Protocol error\r\n';
      case 'shutdown':
        return '-ERR [SYS/TEMP] Server shutting down\r\n';
      case 'killed':
        return '-ERR Connection closed by the administrator\r\n';
      case 'internal-error':
        return '-ERR [SYS/TEMP] Internal error\r\n';
      default:
        return assertNever(why);
    }
  }

  loginRefusal(why: LoginRefusal, text?: string): string {
    this.state = { s: 'command', user: undefined };
    switch (why) {
      case 'denied':
        return `-ERR [AUTH] ${text ?? 'Authentication failed'}\r\n`;
      case 'tempfail':
        return `-ERR [SYS/TEMP] ${text ?? 'Temporary failure, try again later'}\r\n`;
      case 'backend-unavailable':
        return `-ERR [SYS/TEMP] ${text ?? 'Backend server unavailable, try again later'}\r\n`;
      default:
        return assertNever(why);
    }
  }

  goodbye(_why: Goodbye): undefined {
    // POP3 has no unsolicited responses: a spliced session is simply closed.
    return undefined;
  }

  async login(backend: BackendLink, credentials: Credentials | null, caps: BackendCapabilities | undefined): Promise<LoginResult> {
    if (!credentials) throw new MailgateError('BACKEND_PROTOCOL', 'POP3 login without credentials');
    const greeting = await backend.readLine();
    if (!greeting.startsWith('+OK')) throw new MailgateError('BACKEND_PROTOCOL', `unexpected POP3 greeting: ${sanitizeValue(greeting, 80)}`);
    const backendCaps = (caps?.capabilities ?? []).map((c) => c.toUpperCase());
    // Dovecot's pop3-login offers XCLIENT to trusted networks in its greeting's response code
    // (`+OK [XCLIENT] Dovecot ready.`), not in CAPA; other servers may list it in CAPA.
    if (/^\+OK \[XCLIENT\]/i.test(greeting) || backendCaps.some((c) => c === 'XCLIENT' || c.startsWith('XCLIENT '))) {
      backend.write(`XCLIENT ADDR=${sanitizeValue(this.facts.clientIp)} PORT=${this.facts.clientPort}\r\n`);
      // Refused (-ERR): carry on without it; the backend then sees the gateway as the client.
      await backend.readLine();
    }
    const sasl = backendCaps.find((c) => c.startsWith('SASL '))?.split(' ') ?? [];
    let answer: string;
    if (sasl.includes('PLAIN')) {
      backend.write(`AUTH PLAIN ${encodePlain(credentials.user, credentials.password, credentials.authzid ?? '')}\r\n`);
      answer = await backend.readLine();
      if (answer.startsWith('+ ')) {
        backend.write('*\r\n');
        answer = await backend.readLine();
      }
    } else {
      backend.write(`USER ${toWire(credentials.user)}\r\n`);
      answer = await backend.readLine();
      if (answer.startsWith('+OK')) {
        backend.write(`PASS ${toWire(credentials.password)}\r\n`);
        answer = await backend.readLine();
      }
    }
    this.state = { s: 'command', user: undefined };
    if (answer.startsWith('+OK')) return { ok: true, reply: `${oneLine(answer)}\r\n` };
    const text = oneLine(answer.replace(/^-ERR ?/, ''));
    return { ok: false, reply: `-ERR ${text.startsWith('[') ? text : `[AUTH] ${text || 'Authentication failed'}`}\r\n` };
  }
}


/** Ten client errors before login, then the session ends (-ERR Too many errors). */
const DIALOGUE = { greetDelayMs: 0, refuseEarlyTalkers: false, maxErrors: 10 } as const;

export const pop3Protocol: ProtocolModule = {
  protocol: 'pop3',
  createAdapter: (facts, caps) => new Pop3Adapter(facts, caps),
  dialogue: () => DIALOGUE,
  async probe(backend) {
    const greeting = await backend.readLine();
    if (!greeting.startsWith('+OK')) throw new MailgateError('BACKEND_PROTOCOL', `unexpected POP3 greeting: ${sanitizeValue(greeting, 80)}`);
    backend.write('CAPA\r\n');
    const first = await backend.readLine();
    const caps: string[] = [];
    if (first.startsWith('+OK')) {
      for (let i = 0; i < 100; i++) {
        const line = await backend.readLine();
        if (line === '.') break;
        caps.push(line);
      }
    }
    backend.write('QUIT\r\n');
    return { capabilities: caps, at: Date.now() };
  },
};
