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
  | 'too-many-auth-failures'
  | 'early-talker'
  | 'shutdown'
  | 'internal-error';

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
  onLine(line: Buffer): Step;
  onLiteral(data: Buffer): Step;
  /** TLS came up after STARTTLS: forget what was said before it (RFC 3207 §4.2, RFC 9051 §6.2.1). */
  tlsStarted(): void;
  /** The last words before the driver closes, or a failed-login answer when `inLogin`. */
  refusal(why: Refusal, text?: string): string;
  /**
   * The answer to the pending login command when policy or the backend makes
   * it fail. After 'denied' and 'tempfail' the session stays open; after
   * 'backend-unavailable' the driver closes, so the answer includes the goodbye.
   */
  loginRefusal(why: LoginRefusal, text?: string): string;
  /** Replays the login on a freshly connected backend. Throws BackendProtocolError on nonsense. */
  login(backend: BackendLink, credentials: Credentials | null, caps: BackendCapabilities | undefined): Promise<LoginResult>;
  /** A goodbye that can be written into a spliced stream at shutdown, if the protocol has one. */
  shutdownNotice(): string | undefined;
  /**
   * After a successful login: the filter for the spliced stream, when the
   * protocol needs one (SMTP); without one the driver pipes bytes as they are.
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
}

export interface ProtocolModule {
  readonly protocol: 'imap' | 'pop3' | 'smtp';
  createAdapter(facts: SessionFacts, caps: BackendCapabilities | undefined): MailAdapter;
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
