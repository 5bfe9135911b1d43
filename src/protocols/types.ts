/**
 * The contract between the session driver and a mail protocol adapter.
 *
 * An adapter knows one protocol and nothing about sockets, policy, TLS or
 * logging. It greets, consumes client lines and says what happens next
 * (a Step); it phrases refusals in the protocol's own words; and, once the
 * driver has a backend connection, it replays the login there.
 */
import type { Listener } from '../config/load.ts';

export interface Credentials {
  user: string;
  password: string;
  /** SASL PLAIN authorization identity, when different from `user`. */
  authzid?: string;
  mechanism: 'PLAIN' | 'LOGIN' | 'USER';
}

/** What the adapter may know about the session it speaks for. */
export interface SessionFacts {
  readonly id: string;
  readonly listener: Listener;
  readonly hostname: string;
  readonly clientIp: string;
  readonly clientPort: number;
  readonly localIp: string;
  readonly localPort: number;
  /** True once TLS is up (implicit, or after STARTTLS). */
  tls(): boolean;
}

/** What the backend advertised before login, learned by the protocol's probe. */
export interface BackendCapabilities {
  /** IMAP: capability atoms; POP3: CAPA lines; SMTP: EHLO keyword lines (without the status code). */
  capabilities: readonly string[];
  /** When the probe was made (ms since epoch). */
  at: number;
}

export type CloseReason =
  | 'client-quit'
  | 'client-closed'
  | 'backend-closed'
  | 'protocol-error'
  | 'too-many-commands'
  | 'too-many-auth-failures'
  | 'line-too-long'
  | 'early-talker'
  | 'idle-timeout'
  | 'tls-handshake-failed'
  | 'tls-handshake-timeout'
  | 'backend-unavailable'
  | 'backend-timeout'
  | 'backend-error'
  /** The backend answered but cannot do what the listener asks of it (passthrough AUTH to a backend without AUTH): a configuration error, not an outage. */
  | 'backend-no-auth'
  | 'policy-denied'
  | 'policy-tempfail'
  | 'shutdown'
  | 'killed'
  | 'internal-error'
  /** The worker process that ran the session exited; set by the primary's mirror (cluster/registry-link.ts). */
  | 'worker-exit';

export type Step =
  /** Send `data` and keep reading commands. */
  | { kind: 'reply'; data: string }
  /** Send `data` (a continuation, or '' for a non-synchronising literal), then read `size` raw bytes for onLiteral. */
  | { kind: 'literal'; size: number; data: string }
  /** Send `data`, discard anything the client sent after the command, then start TLS. */
  | { kind: 'starttls'; data: string }
  /** Credentials are ready (null: an SMTP listener without auth reached its first transaction). */
  | { kind: 'login'; credentials: Credentials | null }
  /** Send `data` and close the session. */
  | { kind: 'close'; data: string; reason: CloseReason };

/** Why the driver refuses or ends a session; the adapter puts it in the protocol's words. */
export type Refusal =
  | 'denied'
  | 'tempfail'
  | 'idle-timeout'
  | 'line-too-long'
  | 'too-many-commands'
  | 'too-many-errors'
  | 'too-many-auth-failures'
  | 'early-talker'
  | 'shutdown'
  | 'killed'
  | 'internal-error';

/** Why a spliced session is ended by the gateway: the words for it, where the protocol has unsolicited ones. */
export type Goodbye = 'shutdown' | 'killed' | 'idle-timeout' | 'internal-error';

/**
 * Hears what the line an adapter was given was, for the bounds the pre-login
 * loop enforces (session/preauth-loop.ts). Unless told otherwise a line is a
 * command of its own (limits.max_preauth_commands) answered without error.
 */
export interface LineTally {
  /** The line continues a command (a SASL response, an IMAP line that announces a literal): not a command of its own. */
  part(): void;
  /** The client got it wrong (counted against the protocol's error bound, Dialogue.maxErrors). */
  error(): void;
}

/** How a protocol's dialogue before login opens and how many mistakes it forgives (per listener). */
export interface Dialogue {
  /** Wait this long before the greeting (SMTP's greet_delay). */
  readonly greetDelayMs: number;
  /** A client that talks before the greeting is refused (SMTP, RFC 5321 §4.3.1); otherwise what it sent is read after it. */
  readonly refuseEarlyTalkers: boolean;
  /** Client errors tolerated before the session ends (like Postfix's hard error limit); undefined: errors count as commands only. */
  readonly maxErrors: number | undefined;
}

/** Why a pending login command fails: policy said no (the session stays open), or the backend cannot be reached (it closes). */
export type LoginRefusal = 'denied' | 'tempfail' | 'backend-unavailable';

/** A line-oriented view of the backend connection during the login replay. */
export interface BackendLink {
  /** The next line without CRLF; rejects if the backend closes, times out or sends an overlong line. */
  readLine(): Promise<string>;
  write(data: string): void;
}

export type LoginResult =
  /** Logged in: `reply` goes to the client, then bytes are spliced. */
  | { ok: true; reply: string }
  /** The backend refused the credentials: `reply` goes to the client, which may try again. */
  | { ok: false; reply: string };

export interface MailAdapter {
  greeting(): string;
  /** One client line (without its line end); `tally` hears what the line was. The adapter counts nothing itself. */
  onLine(line: Buffer, tally?: LineTally): Step;
  onLiteral(data: Buffer): Step;
  /** TLS came up after STARTTLS: forget what was said before it (RFC 3207 §4.2, RFC 9051 §6.2.1). */
  tlsStarted(): void;
  /**
   * The last words before the driver closes. `text`: policy's words for
   * 'denied' and 'tempfail'; for 'too-many-errors', the answer to the line
   * that crossed the bound (a protocol may still give it before its goodbye).
   */
  refusal(why: Refusal, text?: string): string;
  /**
   * The answer to the pending login command when policy or the backend makes
   * it fail. After 'denied' and 'tempfail' the session stays open; after
   * 'backend-unavailable' the driver closes, so the answer includes the goodbye.
   * `fromRule`: `text` is an access rule's own `reason`, written to be shown.
   */
  loginRefusal(why: LoginRefusal, text?: string, fromRule?: boolean): string;
  /** Replays the login on a freshly connected backend. Throws BackendProtocolError on nonsense. */
  login(backend: BackendLink, credentials: Credentials | null, caps: BackendCapabilities | undefined): Promise<LoginResult>;
  /**
   * Words the gateway may write into a spliced stream between two responses
   * when it ends the session, or undefined where the protocol has none (POP3).
   */
  goodbye(why: Goodbye): string | undefined;
  /**
   * After a successful login: the filter for the spliced stream, when the
   * protocol needs one (SMTP: what a client may say, counting; IMAP: where a
   * response ends); without one the driver pipes bytes as they are.
   */
  relay?(host: RelayHost): RelayFilter;
}

/** What rate limits count in a relayed stream (SMTP: recipients and messages). */
export type RelayUnit = 'recipient' | 'message';

/** Policy's answer on one counted unit, as the relay needs it. */
export type RelayVerdict = { ok: true } | { ok: false; reason: string };

/**
 * The driver, as a relay filter sees it: where the bytes it lets through go,
 * whom it asks about what it counts, and how it ends the session. Bytes handed
 * over are written as they are (never copied, never kept by the relay).
 */
export interface RelayHost {
  toBackend(data: Buffer): void;
  toClient(data: Buffer | string): void;
  /**
   * A unit that rate limits count: a recipient before it goes to the backend,
   * a message once the backend accepted it. 'go': nothing limits it, go on.
   * 'wait': the relay stops reading the client until the driver answers with
   * RelayFilter.verdict().
   */
  count(unit: RelayUnit): 'go' | 'wait';
  /** Something the client sent was refused (logged by the driver). */
  refused(what: string): void;
  /**
   * The relay reads nothing more from the client and waits for the replies
   * the backend still owes; it calls close() when they are in. The driver
   * bounds that wait and then closes with these words itself.
   */
  closing(reason: CloseReason, words: string): void;
  /** Ends the session now, `words` being the last the client hears. */
  close(reason: CloseReason, words: string): void;
}

/**
 * Stands between client and backend once a session is spliced (SMTP: see
 * smtp-relay.ts). It must be cheap: it sees every chunk both ways, and message
 * content passes through as the very buffers that arrived.
 */
export interface RelayFilter {
  fromClient(chunk: Buffer): void;
  fromBackend(chunk: Buffer): void;
  /** The driver's answer to a count() that said 'wait'. */
  verdict(unit: RelayUnit, verdict: RelayVerdict): void;
  /** True while the relay reads nothing from the client: the driver pauses it (bytes still arriving are kept, bounded). */
  holding(): boolean;
  /** True when a goodbye could be written to the client without cutting a reply or a message in half. */
  atBoundary(): boolean;
  /**
   * Stop politely: read nothing more from the client and end the session
   * (host.close) with `words` where they cut nothing in half: at once when
   * the stream is at a boundary, else at the next one if the relay can wait
   * for it (the driver bounds that wait and then closes without words), else
   * at once without words.
   */
  goodbye(reason: CloseReason, words: string | undefined): void;
  /** The relay counts units for rate limits (the session's end reports them). */
  readonly counts: boolean;
}

export interface ProtocolModule {
  readonly protocol: 'imap' | 'pop3' | 'smtp';
  createAdapter(facts: SessionFacts, caps: BackendCapabilities | undefined): MailAdapter;
  /** How the dialogue before login opens and what it forgives, on this listener. */
  dialogue(listener: Listener): Dialogue;
  /** Learns the backend's pre-login capabilities on a throwaway connection, then says goodbye. */
  probe(backend: BackendLink, hostname: string): Promise<BackendCapabilities>;
}

/** Backend text the gateway repeats inside a line of its own: a stray CR or NUL must not split the client's view of it. */
export function oneLine(text: string): string {
  return text.replace(/[\0\r\n]/g, '');
}

/**
 * A client's command name as it may be repeated in an error: only when it
 * looks like one. Reflecting arbitrary client text is what cross-protocol
 * (ALPACA) reflection attacks build on.
 */
export function echoVerb(name: string, max: number): string {
  return new RegExp(`^[A-Z0-9-]{1,${max}}$`).test(name) ? name : 'this command';
}

/** Values copied into XCLIENT, ID or PROXY headers: never CR, LF or NUL, never unbounded. */
export function sanitizeValue(value: string, max = 255): string {
  return value.replace(/[\0\r\n]/g, '').slice(0, max);
}

/** Shorthand for the commonest step: answer and keep reading. */
export function reply(data: string): Step {
  return { kind: 'reply', data };
}

/** The `never` check at the end of an exhaustive switch over a state or step union. */
export function assertNever(x: never): never {
  throw new Error(`unexpected state ${JSON.stringify(x)}`);
}
