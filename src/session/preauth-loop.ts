/**
 * The dialogue before login, without sockets or timers: client bytes in, the
 * protocol adapter's steps carried out, words out. The session driver
 * (mail-session.ts) feeds it from the client's socket and does what needs one
 * (TLS, the login on a backend, the close); the fuzz tests feed it directly,
 * so they fuzz this very loop.
 *
 * It owns the line reader (bounded; IMAP literals and BDAT chunks are read as
 * raw bytes), counts what the adapter says each line was against the bounds
 * (limits.max_preauth_commands, the protocol's error bound, and failed logins
 * against limits.max_auth_attempts), drops what came with STARTTLS, and, where
 * the protocol says so, refuses a client that talks before the greeting.
 */
import type { Limits } from '../config/schema.ts';
import { LINE_TOO_LONG, LineReader } from '../net/line-reader.ts';
import {
  assertNever,
  type BackendCapabilities,
  type CloseReason,
  type Credentials,
  type Dialogue,
  type LineTally,
  type MailAdapter,
  type ProtocolModule,
  type SessionFacts,
  type Step,
} from '../protocols/types.ts';

/** What the loop asks of the session around it. */
export interface PreauthHost {
  /** Words to the client. */
  write(data: string): void;
  /** STARTTLS was answered: start TLS, then call tlsStarted(). */
  startTls(): void;
  /** Credentials are ready: decide and replay the login, then call loginFailed() or take the session over. */
  login(credentials: Credentials | null): void;
  /** The end: `words` are the last the client hears. */
  close(reason: CloseReason, words: string): void;
}

type LoopState =
  /** Before the greeting: what the client sends is kept (or refused, see Dialogue.refuseEarlyTalkers). */
  | { s: 'ungreeted' }
  | { s: 'line' }
  /** Raw bytes the adapter asked for (an IMAP literal, a BDAT chunk). */
  | { s: 'literal'; size: number }
  /** Waiting for the host: the TLS handshake after STARTTLS, or the login's outcome. */
  | { s: 'tls' }
  | { s: 'login' }
  | { s: 'done' };

/** What the adapter said about the line it was given; reset for every line. */
class Tally implements LineTally {
  isPart = false;
  isError = false;

  part(): void {
    this.isPart = true;
  }

  error(): void {
    this.isError = true;
  }

  reset(): this {
    this.isPart = false;
    this.isError = false;
    return this;
  }
}

export class PreauthLoop {
  readonly rules: Dialogue;
  private readonly module: ProtocolModule;
  private readonly facts: SessionFacts;
  private readonly limits: Limits;
  private readonly host: PreauthHost;
  private readonly reader: LineReader;
  private readonly tally = new Tally();
  private made: MailAdapter | undefined;
  private caps: BackendCapabilities | undefined;
  private state: LoopState = { s: 'ungreeted' };
  /** Set while steps are carried out: a host that answers at once (tests) re-enters, and the loop already running goes on. */
  private running = false;
  private commands = 0;
  private errors = 0;
  private failures = 0;

  constructor(module: ProtocolModule, facts: SessionFacts, host: PreauthHost) {
    this.module = module;
    this.facts = facts;
    this.limits = facts.listener.limits;
    this.host = host;
    this.rules = module.dialogue(facts.listener);
    this.reader = new LineReader(this.limits.max_line);
  }

  /** The adapter: made at the greeting with the backend's capabilities, or before it (defaults) for a refusal. */
  get adapter(): MailAdapter {
    this.made ??= this.module.createAdapter(this.facts, this.caps);
    return this.made;
  }

  /** Bytes read and not yet taken (a line or literal still incomplete). */
  get buffered(): number {
    return this.reader.buffered;
  }

  /** Sends the greeting; from now on lines are read (those that came before it first). */
  greet(caps: BackendCapabilities | undefined): void {
    if (this.state.s !== 'ungreeted') return;
    this.caps = caps;
    this.host.write(this.adapter.greeting());
    this.state = { s: 'line' };
    this.run();
  }

  push(chunk: Buffer): void {
    if (this.state.s === 'done') return;
    if (this.state.s === 'ungreeted' && this.rules.refuseEarlyTalkers) {
      this.end('early-talker', this.adapter.refusal('early-talker'));
      return;
    }
    this.reader.push(chunk);
    if (this.reader.buffered > this.limits.max_line + this.limits.max_literal) {
      this.end('line-too-long', this.adapter.refusal('line-too-long'));
      return;
    }
    this.run();
  }

  /** TLS is up after STARTTLS: the adapter forgets what came before, and reading goes on. */
  tlsStarted(): void {
    if (this.state.s !== 'tls') return;
    this.adapter.tlsStarted();
    this.state = { s: 'line' };
    this.run();
  }

  /**
   * The login failed with `reply` (policy or the backend said no): counted
   * against limits.max_auth_attempts. 'closed': that was the last attempt;
   * 'again': the reply went out, and resume() reads on.
   */
  loginFailed(reply: string): 'again' | 'closed' {
    if (this.state.s !== 'login') return 'closed';
    this.failures++;
    if (this.failures >= this.limits.max_auth_attempts) {
      this.end('too-many-auth-failures', reply + this.adapter.refusal('too-many-auth-failures'));
      return 'closed';
    }
    this.host.write(reply);
    return 'again';
  }

  resume(): void {
    if (this.state.s !== 'login') return;
    this.state = { s: 'line' };
    this.run();
  }

  /** The login succeeded: what the client sent past it belongs to the backend. Nothing more is read here. */
  handOver(): Buffer {
    this.state = { s: 'done' };
    return this.reader.drain();
  }

  private run(): void {
    if (this.running) return;
    this.running = true;
    try {
      for (let step = this.next(); step; step = this.next()) this.carryOut(step);
    } finally {
      this.running = false;
    }
  }

  /** The adapter's answer to the next complete line or literal; undefined when none is buffered or the loop waits. */
  private next(): Step | undefined {
    const st = this.state;
    switch (st.s) {
      case 'literal': {
        const data = this.reader.takeBytes(st.size);
        if (!data) return undefined;
        this.state = { s: 'line' };
        return this.adapter.onLiteral(data);
      }
      case 'line': {
        const line = this.reader.nextLine();
        if (line === null) return undefined;
        if (line === LINE_TOO_LONG) return { kind: 'close', data: this.adapter.refusal('line-too-long'), reason: 'line-too-long' };
        return this.bounded(this.adapter.onLine(line, this.tally.reset()));
      }
      case 'ungreeted':
      case 'tls':
      case 'login':
      case 'done':
        return undefined;
      default:
        return assertNever(st);
    }
  }

  /** Counts the line the adapter answered with `step`; past a bound the session ends instead. */
  private bounded(step: Step): Step {
    if (!this.tally.isPart) this.commands++;
    if (this.tally.isError) this.errors++;
    if (this.commands > this.limits.max_preauth_commands) {
      return { kind: 'close', data: this.adapter.refusal('too-many-commands'), reason: 'too-many-commands' };
    }
    const maxErrors = this.rules.maxErrors;
    if (maxErrors !== undefined && this.errors > maxErrors) {
      return { kind: 'close', data: this.adapter.refusal('too-many-errors', step.kind === 'login' ? undefined : step.data), reason: 'protocol-error' };
    }
    return step;
  }

  private carryOut(step: Step): void {
    switch (step.kind) {
      case 'reply':
        this.host.write(step.data);
        return;
      case 'literal':
        this.host.write(step.data);
        this.state = { s: 'literal', size: step.size };
        return;
      case 'starttls':
        this.host.write(step.data);
        // Anything the client sent after STARTTLS came in plaintext: discarded (CVE-2011-0411).
        this.reader.drain();
        this.state = { s: 'tls' };
        this.host.startTls();
        return;
      case 'login':
        this.state = { s: 'login' };
        this.host.login(step.credentials);
        return;
      case 'close':
        this.end(step.reason, step.data);
        return;
      default:
        assertNever(step);
    }
  }

  private end(reason: CloseReason, words: string): void {
    this.state = { s: 'done' };
    this.reader.drain(); // nothing more is read: what is held goes
    this.host.close(reason, words);
  }
}
