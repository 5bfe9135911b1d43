/**
 * The spliced SMTP session, after login: a filter between client and backend
 * that forwards what both may say and answers for the gateway where they may
 * not (issue 17).
 *
 * - Commands only the gateway may use (XCLIENT, XFORWARD) and commands that
 *   make no sense in a spliced session (AUTH, STARTTLS) are answered here and
 *   never forwarded; the backend's EHLO replies lose the keywords for them
 *   (and BINARYMIME, which content rules here exclude).
 * - Every line the client sends must end in CRLF, in commands, in DATA content
 *   and in BDAT chunks: a bare CR or LF is refused with 521 and the session
 *   ends before the byte reaches the backend, so the backend never sees an end
 *   of data the gateway did not see (SMTP smuggling, `<LF>.<LF>`). Postfix
 *   3.9's `smtpd_forbid_bare_newline = reject` does the same.
 * - Recipients are counted before they are forwarded (the one that crosses a
 *   limit is answered 452 here); messages when the backend accepted them (a
 *   limit reached ends the session at the next command: QUIT to the backend,
 *   its 221 replaced by the limit's 421).
 * - Replies stay in order under PIPELINING: one entry per forwarded command
 *   (and per message end) waits for the backend's reply, and a reply of the
 *   gateway's own waits behind every reply the backend still owes.
 *
 * Client bytes are read in one of these modes: command lines (each forwarded
 * whole, once its verb is known); DATA content, entered when the backend says
 * 354 (bytes sent before that answer are held); BDAT chunks, forwarded by size;
 * a refused BDAT's chunk, dropped; and closed. Content is checked with
 * Buffer.indexOf and forwarded as the buffers that arrived: no copy. While it
 * waits (a verdict, the answer to DATA) the relay keeps the client's bytes as
 * they came, and the driver pauses the client.
 */
import { oneLine } from './types.ts';
import type { CloseReason, RelayFilter, RelayHost, RelayUnit, RelayVerdict } from './types.ts';

/** EHLO keywords only the gateway offers (before login) or nobody may use through it (after login). */
export const GATEWAY_ONLY_KEYWORD = /^(STARTTLS|AUTH|XCLIENT|XFORWARD|BINARYMIME)(\b|$)/i;

/** The longest client command line kept; a longer one is refused with 500 and dropped. */
const LINE_CAP = 4096;
/** Client bytes kept while the relay waits (the driver has paused the client long before). */
const HOLD_CAP = 1024 * 1024;
/** Bounds on one EHLO reply from the backend (it is rewritten, so it is kept until its last line). */
const EHLO_MAX_LINES = 200;
const EHLO_MAX_BYTES = 64 * 1024;

const CR = 0x0d;
const LF = 0x0a;
const DOT = 0x2e;
const SP = 0x20;
const TAB = 0x09;
const DASH = 0x2d;
const QUIT = Buffer.from('QUIT\r\n', 'latin1');
const CR_ONLY = Buffer.from('\r', 'latin1');

/** Where the client is within a line of DATA content or of a BDAT chunk. */
const Line = {
  /** At the start of a line. */
  Start: 0,
  /** The line so far is ".". */
  Dot: 1,
  /** The line so far is ".\r" (DATA: the end of the message if LF follows). */
  DotCr: 2,
  /** Inside a line, no CR pending. */
  Middle: 3,
  /** Inside a line, after a CR that must be followed by LF. */
  Cr: 4,
} as const;
type LineState = (typeof Line)[keyof typeof Line];

type Mode =
  /** Command lines. */
  | 'command'
  /** DATA went to the backend: client bytes are held until its answer says content (354) or commands. */
  | 'await-data'
  /** DATA content until CRLF.CRLF. */
  | 'content'
  /** A BDAT chunk of known size, forwarded. */
  | 'chunk'
  /** The chunk of a BDAT refused here, dropped. */
  | 'skip'
  /** Ending: nothing more is read from the client. */
  | 'closed';

/** What one reply from the backend answers (one entry per forwarded command), or a reply of the relay's own. */
type Expect =
  | { readonly kind: 'reply' }
  | { readonly kind: 'ehlo' }
  | { readonly kind: 'data' }
  | { readonly kind: 'message' }
  /** The QUIT the relay sent when a limit was reached: its reply is replaced by `words`, then the session ends. */
  | { readonly kind: 'quit'; readonly words: string }
  /** The relay's own reply, sent when every reply before it is in; with `close`, the session's last words. */
  | { readonly kind: 'own'; readonly text: string; readonly close?: CloseReason };

const REPLY: Expect = { kind: 'reply' };
const EHLO: Expect = { kind: 'ehlo' };
const DATA: Expect = { kind: 'data' };
const MESSAGE: Expect = { kind: 'message' };

/** How the bytes of the backend's current reply are handled. */
type Treatment = 'pass' | 'collect' | 'swallow';

export interface SmtpRelayOptions {
  /** The gateway's name, in the replies it writes itself. */
  hostname: string;
  /** The client logged in with AUTH (an MX session without AUTH is not). */
  authenticated: boolean;
  /** TLS is up between client and gateway. */
  tls: boolean;
  /** The backend offered CHUNKING (in its last EHLO reply); without it BDAT is refused here. */
  chunking: boolean;
  /** The last words when a message limit is reached (the adapter's temporary failure, 421). */
  limitWords(reason: string): string;
}

export class SmtpRelay implements RelayFilter {
  readonly counts = true;
  private readonly host: RelayHost;
  private readonly opts: SmtpRelayOptions;
  private chunking: boolean;
  private mode: Mode = 'command';

  // ---- client side
  /** Pieces of a command line that spans chunks (views of the chunks, not copies), and their length. */
  private parts: Buffer[] = [];
  private partsLen = 0;
  /** The current command line grew past LINE_CAP: it is dropped up to its LF. */
  private skipLine = false;
  /** Content and chunks: where the client is within a line. */
  private line: LineState = Line.Start;
  /** DATA content: the chunk ended in a CR, which goes to the backend only once the LF after it is seen. */
  private heldCr = false;
  /** DATA content: some of it went to the backend since the 354. */
  private contentSent = false;
  /** BDAT: bytes left in the current chunk (forwarded, or dropped in 'skip' mode) and whether it is the last. */
  private chunkLeft = 0;
  private chunkLast = false;
  /** A RCPT line waiting for its verdict, and whether a message verdict is pending. */
  private pendingRcpt: Buffer | undefined;
  private pendingMessage = false;
  /** A limit was reached: at the next command the relay says QUIT and ends with these words. */
  private stopWords: string | undefined;
  /** Client bytes kept while waiting, in order. */
  private held: Buffer[] = [];
  private heldBytes = 0;
  /** The run of client bytes approved for the backend and not yet written (a view of one chunk). */
  private runChunk: Buffer | undefined;
  private runStart = 0;
  private runEnd = 0;
  /** Refusals already reported to the driver (it logs the first). */
  private refusals = 0;

  // ---- backend side
  /** Replies the backend owes, and the relay's own replies behind them, in order. */
  private readonly expect: Expect[] = [];
  /** Inside a line of the backend's; its first bytes (up to 4, to read the code and what follows it). */
  private bInLine = false;
  private bHead = 0;
  private bHeadLen = 0;
  /** Lines of the current reply seen so far, how it is handled, and (EHLO) its lines. */
  private bReplyLines = 0;
  private treatment: Treatment = 'pass';
  private collected: string[] = [];
  private collectedBytes = 0;
  private collecting = '';
  /** Client bytes held until a reply came in may be read again once the backend chunk is done. */
  private release = false;
  /** The relay closed the session: it reads nothing more from either side. */
  private ended = false;

  constructor(host: RelayHost, opts: SmtpRelayOptions) {
    this.host = host;
    this.opts = opts;
    this.chunking = opts.chunking;
  }

  /** Ending: nothing more is read from the client (a method, so that no narrowing outlives a call that closes). */
  private closed(): boolean {
    return this.mode === 'closed';
  }

  holding(): boolean {
    return this.mode === 'await-data' || this.mode === 'closed' || this.pendingRcpt !== undefined || this.pendingMessage;
  }

  atBoundary(): boolean {
    return this.mode === 'command' && this.partsLen === 0 && !this.skipLine && !this.bInLine && this.bReplyLines === 0;
  }

  goodbye(reason: CloseReason, words: string | undefined): void {
    if (this.ended) return;
    // Between a reply and the next command the words go at once. Inside a message, a command line or a
    // reply, the next boundary waits on the client, who is not read any more: the session ends without them.
    this.end(reason, this.atBoundary() ? (words ?? '') : '');
  }

  // ---- client → backend ----------------------------------------------------------

  fromClient(chunk: Buffer): void {
    if (this.closed()) return;
    if (this.held.length > 0 || this.holding()) {
      this.hold(chunk);
      return;
    }
    const stop = this.run(chunk, 0);
    if (stop < chunk.length && !this.closed()) this.hold(chunk.subarray(stop));
    this.flush();
  }

  verdict(unit: RelayUnit, verdict: RelayVerdict): void {
    if (this.closed()) return;
    if (unit === 'recipient') {
      const line = this.pendingRcpt;
      if (!line) return;
      this.pendingRcpt = undefined;
      if (verdict.ok) this.forwardOwned(line, REPLY);
      else this.own(`452 4.5.3 ${oneLine(verdict.reason).slice(0, 200)}\r\n`);
    } else {
      if (!this.pendingMessage) return;
      this.pendingMessage = false;
      if (!verdict.ok) this.stop(this.opts.limitWords(verdict.reason));
    }
    this.drain();
  }

  /** Processes `chunk` from `i` until it is used up or the relay must wait; returns where it stopped. */
  private run(chunk: Buffer, i: number): number {
    const n = chunk.length;
    while (i < n) {
      if (this.pendingRcpt !== undefined || this.pendingMessage) return i;
      switch (this.mode) {
        case 'command':
          i = this.commandBytes(chunk, i);
          break;
        case 'content':
          i = this.contentBytes(chunk, i);
          break;
        case 'chunk':
          i = this.chunkBytes(chunk, i);
          break;
        case 'skip': {
          const take = Math.min(this.chunkLeft, n - i);
          this.chunkLeft -= take;
          i += take;
          if (this.chunkLeft === 0) this.commands();
          break;
        }
        case 'await-data':
          return i;
        case 'closed':
          return n;
        default: {
          const never: never = this.mode;
          throw new Error(`unknown mode ${String(never)}`);
        }
      }
    }
    return i;
  }

  /** Reads held bytes again, as far as the relay may. */
  private drain(): void {
    while (this.held.length > 0 && !this.holding()) {
      const chunk = this.held.shift()!;
      this.heldBytes -= chunk.length;
      const stop = this.run(chunk, 0);
      if (stop < chunk.length && !this.closed()) {
        this.held.unshift(chunk.subarray(stop));
        this.heldBytes += chunk.length - stop;
      }
    }
    if (this.closed()) this.dropHeld();
    this.flush();
  }

  private hold(chunk: Buffer): void {
    this.held.push(chunk);
    this.heldBytes += chunk.length;
    if (this.heldBytes > HOLD_CAP) {
      this.dropHeld();
      this.refuse(`421 4.7.0 ${this.opts.hostname} Error: too much input while waiting for a reply\r\n`, 'protocol-error', 'too much input while waiting');
    }
  }

  private dropHeld(): void {
    this.held = [];
    this.heldBytes = 0;
  }

  // ---- command lines

  private commandBytes(chunk: Buffer, i: number): number {
    const lf = chunk.indexOf(LF, i);
    const end = lf < 0 ? chunk.length : lf + 1;
    if (this.skipLine) {
      if (lf >= 0) this.skipLine = false;
      return end;
    }
    if (lf >= 0 && this.partsLen === 0) {
      this.command(chunk, i, end, false); // the whole line is in this chunk: read and forward it in place
      return end;
    }
    this.parts.push(chunk.subarray(i, end));
    this.partsLen += end - i;
    if (this.partsLen > LINE_CAP) {
      this.parts = [];
      this.partsLen = 0;
      this.skipLine = lf < 0;
      this.own('500 5.5.6 Error: line too long\r\n');
      return end;
    }
    if (lf >= 0) {
      // A line that spans chunks (rare): one buffer of its own, which is also what is forwarded.
      const line = Buffer.concat(this.parts, this.partsLen);
      this.parts = [];
      this.partsLen = 0;
      this.command(line, 0, line.length, true);
    }
    return end;
  }

  /** One client command line `src[start, end)`, LF included; `owned` when src is the line alone (not a chunk). */
  private command(src: Buffer, start: number, end: number, owned: boolean): void {
    const lf = end - 1;
    if (lf === start || src[lf - 1] !== CR) return void this.bare('LF');
    if (src.indexOf(CR, start) !== lf - 1) return void this.bare('CR');
    const text = src.toString('latin1', start, lf - 1);
    // A NUL ends the line for Postfix (C strings), VT and FF separate words: no control byte goes on,
    // so the backend reads the command the relay read. RFC 5321 allows none in a command.
    if (/[\0-\x08\x0a-\x1f\x7f]/.test(text)) return this.deny('control character', '500 5.5.2 Error: bad character in command\r\n');
    const verb = (/^[ \t]*([^ \t]{1,8})(?:[ \t]|$)/.exec(text)?.[1] ?? '').toUpperCase();
    // A chunk left a CR whose LF must open the next chunk: any other command makes it a bare CR (a
    // backend that refuses a command inside a BDAT transaction goes on with the message it is in).
    if (this.line === Line.Cr && verb !== 'BDAT') return void this.bare('CR');
    switch (verb) {
      case 'RCPT':
        if (this.host.count('recipient') === 'go') this.forward(src, start, end, owned, REPLY);
        else this.pendingRcpt = owned ? src : src.subarray(start, end);
        return;
      case 'DATA':
        this.forward(src, start, end, owned, DATA);
        this.mode = 'await-data';
        return;
      case 'BDAT':
        return this.bdat(src, start, end, owned, text);
      case 'EHLO':
        return this.forward(src, start, end, owned, EHLO);
      case 'XCLIENT':
      case 'XFORWARD':
        return this.deny(verb, '550 5.7.0 Error: insufficient authorization\r\n');
      case 'AUTH':
        return this.deny(verb, this.opts.authenticated ? '503 5.5.1 Error: already authenticated\r\n' : '503 5.5.1 Error: authentication not enabled\r\n');
      case 'STARTTLS':
        return this.deny(verb, this.opts.tls ? '554 5.5.1 Error: TLS already active\r\n' : '502 5.5.1 Error: command not implemented\r\n');
      default:
        return this.forward(src, start, end, owned, REPLY);
    }
  }

  /** `BDAT <size> [LAST]` (RFC 3030): forwarded with its chunk, or refused here and its chunk dropped. */
  private bdat(src: Buffer, start: number, end: number, owned: boolean, text: string): void {
    const m = /^[ \t]*BDAT[ \t]+(\d{1,15})(?:[ \t]+(LAST))?[ \t]*$/i.exec(text);
    if (!m?.[1]) {
      // Postfix answers this and hangs up: without a size nobody knows where the chunk ends.
      this.refuse('521 5.5.4 Syntax: BDAT count [LAST]\r\n', 'protocol-error', 'malformed BDAT');
      return;
    }
    const size = Number(m[1]);
    this.chunkLeft = size;
    this.chunkLast = m[2] !== undefined;
    if (!this.chunking) {
      // Offered by no EHLO the client saw: a backend that does not know BDAT would read the chunk as commands.
      this.deny('BDAT', '502 5.5.1 Error: command not implemented\r\n');
      this.mode = 'skip';
      if (size === 0) this.commands();
      return;
    }
    // The message may not end in a CR that the last chunk leaves without its LF.
    if (size === 0 && this.chunkLast && this.line === Line.Cr) return void this.bare('CR');
    this.forward(src, start, end, owned, this.chunkLast ? MESSAGE : REPLY);
    this.mode = 'chunk';
    if (size === 0) this.chunkDone();
  }

  private forward(src: Buffer, start: number, end: number, owned: boolean, expect: Expect): void {
    if (owned) this.forwardOwned(src, expect);
    else {
      this.pass(src, start, end);
      this.expect.push(expect);
    }
  }

  private forwardOwned(line: Buffer, expect: Expect): void {
    this.flush();
    this.host.toBackend(line);
    this.expect.push(expect);
  }

  /** A command the client may not send after login: answered here, in its turn, and reported (the first one). */
  private deny(what: string, reply: string): void {
    if (this.refusals++ === 0) this.host.refused(what);
    this.own(reply);
  }

  /** Back to command lines (after content, a chunk, a refused DATA); a limit reached meanwhile ends the session here. */
  private commands(): void {
    this.mode = 'command';
    if (this.stopWords !== undefined) this.quit();
  }

  // ---- DATA content

  private contentBytes(chunk: Buffer, i: number): number {
    const n = chunk.length;
    let p = i;
    if (this.heldCr) {
      // The CR that ended the previous chunk goes on only with its LF.
      if (chunk[p] !== LF) return this.bare('CR');
      this.heldCr = false;
      this.flush();
      this.host.toBackend(CR_ONLY);
      this.contentSent = true;
      p++;
      if (this.line === Line.DotCr) return this.contentDone(chunk, i, p);
      this.line = Line.Start;
    }
    while (p < n) {
      if (this.line === Line.Middle) {
        const lf = chunk.indexOf(LF, p);
        if (lf < 0) {
          const cr = chunk.indexOf(CR, p);
          if (cr >= 0 && cr < n - 1) return this.bare('CR');
          if (cr === n - 1) this.line = Line.Cr;
          break;
        }
        if (lf === p || chunk[lf - 1] !== CR) return this.bare('LF');
        if (chunk.indexOf(CR, p) !== lf - 1) return this.bare('CR');
        p = lf + 1;
        this.line = Line.Start;
        continue;
      }
      const c = chunk[p++]!;
      switch (this.line) {
        case Line.Start:
          if (c === LF) return this.bare('LF');
          this.line = c === DOT ? Line.Dot : c === CR ? Line.Cr : Line.Middle;
          break;
        case Line.Dot:
          if (c === LF) return this.bare('LF');
          this.line = c === CR ? Line.DotCr : Line.Middle;
          break;
        case Line.DotCr:
          if (c !== LF) return this.bare('CR');
          return this.contentDone(chunk, i, p);
        case Line.Cr:
          if (c !== LF) return this.bare('CR');
          this.line = Line.Start;
          break;
        default:
          throw new Error(`unexpected line state ${this.line}`);
      }
    }
    if (this.line === Line.Cr || this.line === Line.DotCr) {
      // Ends in a CR: whether it is a bare one shows only in the next chunk, so it waits.
      this.heldCr = true;
      this.pass(chunk, i, n - 1);
    } else {
      this.pass(chunk, i, n);
    }
    this.contentSent = true;
    return n;
  }

  /** CRLF.CRLF ends `chunk[from, end)`: the message goes to the backend and waits for its reply. */
  private contentDone(chunk: Buffer, from: number, end: number): number {
    this.pass(chunk, from, end);
    this.expect.push(MESSAGE);
    this.line = Line.Start;
    this.commands();
    return end;
  }

  // ---- BDAT chunks

  private chunkBytes(chunk: Buffer, i: number): number {
    const end = i + Math.min(this.chunkLeft, chunk.length - i);
    const bad = this.scanChunk(end < chunk.length ? chunk.subarray(0, end) : chunk, i);
    if (bad) return this.bare(bad);
    const ends = end - i === this.chunkLeft;
    // The message may not end in a CR without its LF: refused before that last byte goes.
    if (ends && this.chunkLast && this.line === Line.Cr) return this.bare('CR');
    this.pass(chunk, i, end);
    this.chunkLeft -= end - i;
    if (ends) this.chunkDone();
    return end;
  }

  /** Checks `view[i..]` (the chunk's bytes in this read) for a bare CR or LF; a CR at its end is decided by the next byte. */
  private scanChunk(view: Buffer, i: number): 'CR' | 'LF' | undefined {
    const n = view.length;
    let p = i;
    if (this.line === Line.Cr && p < n) {
      if (view[p] !== LF) return 'CR';
      p++;
      this.line = Line.Start;
    }
    while (p < n) {
      const lf = view.indexOf(LF, p);
      if (lf < 0) {
        const cr = view.indexOf(CR, p);
        if (cr >= 0 && cr < n - 1) return 'CR';
        this.line = cr === n - 1 ? Line.Cr : Line.Middle;
        return undefined;
      }
      if (lf === p || view[lf - 1] !== CR) return 'LF';
      if (view.indexOf(CR, p) !== lf - 1) return 'CR';
      p = lf + 1;
      this.line = Line.Start;
    }
    return undefined;
  }

  private chunkDone(): void {
    if (this.chunkLast) this.line = Line.Start;
    this.commands();
  }

  // ---- refusals and the end

  /** A bare CR or LF: the client gets 521 in its turn and the session ends; nothing from here on reaches the backend. */
  private bare(what: 'CR' | 'LF'): number {
    this.heldCr = false;
    // Inside a chunk: the backend waits for the rest of it and owes no reply for its BDAT (the last entry).
    if (this.mode === 'chunk') this.expect.pop();
    this.refuse(`521 5.5.2 ${this.opts.hostname} Error: bare <${what}> received\r\n`, 'protocol-error', `bare <${what}> received`);
    return Number.MAX_SAFE_INTEGER;
  }

  /**
   * Ends the session with `text` once the replies owed before it are in; the
   * client is not read any more, and nothing after what already went reaches
   * the backend (the driver's close hangs up on it: a backend inside DATA or a
   * BDAT chunk drops the message).
   */
  private refuse(text: string, reason: CloseReason, why: string | undefined): void {
    if (why !== undefined) this.host.refused(why);
    this.stopReading();
    this.expect.push({ kind: 'own', text, close: reason });
    if (this.expect.length > 1) this.host.closing(reason, text);
    else this.ownReplies();
  }

  /** Forwards what may still go, then reads nothing more from the client and forgets what waited. */
  private stopReading(): void {
    this.flush();
    this.mode = 'closed';
    this.pendingRcpt = undefined;
    this.pendingMessage = false;
    this.dropHeld();
  }

  /** A message limit was reached: QUIT at the next command boundary (now, if the relay is at one). */
  private stop(words: string): void {
    this.stopWords = words;
    if (this.mode === 'command') this.quit();
    // The 354 came but nothing of the next message went yet: hang up rather than send it.
    else if (this.mode === 'content' && !this.contentSent) this.refuse(words, 'policy-tempfail', undefined);
  }

  private quit(): void {
    const words = this.stopWords ?? '';
    this.stopReading();
    this.host.toBackend(QUIT);
    this.expect.push({ kind: 'quit', words });
    this.host.closing('policy-tempfail', words);
  }

  private end(reason: CloseReason, words: string): void {
    this.ended = true;
    this.mode = 'closed';
    this.expect.length = 0;
    this.host.close(reason, words);
  }

  /** The relay's own reply, in its turn. */
  private own(text: string): void {
    this.expect.push({ kind: 'own', text });
    if (this.expect.length === 1) this.ownReplies();
  }

  /** Sends the relay's own replies now at the head (every reply owed before them is in). */
  private ownReplies(): void {
    for (;;) {
      const head = this.expect[0];
      if (head?.kind !== 'own') return;
      this.expect.shift();
      if (head.close) {
        this.end(head.close, head.text);
        return;
      }
      this.host.toClient(head.text);
    }
  }

  private pass(chunk: Buffer, from: number, to: number): void {
    if (to <= from) return;
    if (this.runChunk === chunk && this.runEnd === from) {
      this.runEnd = to;
      return;
    }
    this.flush();
    this.runChunk = chunk;
    this.runStart = from;
    this.runEnd = to;
  }

  private flush(): void {
    const chunk = this.runChunk;
    if (!chunk) return;
    this.runChunk = undefined;
    this.host.toBackend(this.runStart === 0 && this.runEnd === chunk.length ? chunk : chunk.subarray(this.runStart, this.runEnd));
  }

  // ---- backend → client ------------------------------------------------------------

  fromBackend(chunk: Buffer): void {
    if (this.ended) return;
    const n = chunk.length;
    let run = 0; // start of the bytes of this chunk not yet passed on
    let i = 0;
    while (i < n) {
      if (!this.bInLine && this.bReplyLines === 0) this.treatment = this.treatmentOf(this.expect[0]);
      const lf = chunk.indexOf(LF, i);
      const end = lf < 0 ? n : lf + 1;
      this.bInLine = true;
      for (let k = i; k < end && this.bHeadLen < 4; k++) this.bHead = (this.bHead << 8) | chunk[k]!, this.bHeadLen++;
      if (this.treatment !== 'pass') {
        if (i > run) this.host.toClient(chunk.subarray(run, i));
        run = end;
        if (this.treatment === 'collect') this.collect(chunk, i, lf < 0 ? n : lf);
      }
      i = end;
      if (lf < 0) break;
      const code = this.lineCode();
      const final = code >= 0 && (this.bHeadLen < 4 || (this.bHead & 0xff) !== DASH);
      this.bInLine = false;
      this.bHead = 0;
      this.bHeadLen = 0;
      if (this.treatment === 'collect') this.collectLine();
      if (!final) {
        this.bReplyLines++;
        continue;
      }
      this.bReplyLines = 0;
      if (end > run && this.needsOrder()) {
        this.host.toClient(chunk.subarray(run, end));
        run = end;
      }
      this.replied(code);
      if (this.ended) return;
    }
    if (n > run) this.host.toClient(run === 0 ? chunk : chunk.subarray(run));
    if (this.release) {
      this.release = false;
      this.drain();
    }
  }

  private treatmentOf(head: Expect | undefined): Treatment {
    if (head?.kind === 'ehlo') return 'collect';
    if (head?.kind === 'quit') return 'swallow';
    return 'pass';
  }

  /** The reply code of the line just read, or -1 when it does not start with three digits. */
  private lineCode(): number {
    if (this.bHeadLen < 3) return -1;
    const head = this.bHeadLen === 4 ? this.bHead >>> 8 : this.bHead;
    const d1 = ((head >>> 16) & 0xff) - 0x30;
    const d2 = ((head >>> 8) & 0xff) - 0x30;
    const d3 = (head & 0xff) - 0x30;
    if (d1 < 0 || d1 > 9 || d2 < 0 || d2 > 9 || d3 < 0 || d3 > 9) return -1;
    return d1 * 100 + d2 * 10 + d3;
  }

  /** Whether the reply just completed must reach the client before the relay acts on it. */
  private needsOrder(): boolean {
    return this.expect[0]?.kind !== 'reply' || this.expect[1]?.kind === 'own';
  }

  /** The backend's reply (with this code) to the oldest entry. */
  private replied(code: number): void {
    const head = this.expect.shift();
    switch (head?.kind) {
      case undefined:
      case 'reply':
        break;
      case 'ehlo':
        this.sendEhlo(code);
        break;
      case 'data':
        if (this.mode === 'await-data') {
          if (code === 354) {
            this.mode = 'content';
            this.line = Line.Start;
            this.contentSent = false;
            if (this.stopWords !== undefined) this.stop(this.stopWords);
          } else {
            this.commands();
          }
          this.release = true;
        }
        break;
      case 'message':
        if (code >= 200 && code <= 299 && this.host.count('message') === 'wait') this.pendingMessage = true;
        break;
      case 'quit':
        this.end('policy-tempfail', head.words);
        return;
      case 'own':
        // Cannot be: own replies at the head are sent at once. Put it back and send it.
        this.expect.unshift(head);
        break;
      default: {
        const never: never = head;
        throw new Error(`unknown reply entry ${JSON.stringify(never)}`);
      }
    }
    this.ownReplies();
  }

  // ---- EHLO replies

  private collect(chunk: Buffer, from: number, to: number): void {
    if (this.collectedBytes + (to - from) > EHLO_MAX_BYTES) return;
    this.collecting += chunk.toString('latin1', from, to);
    this.collectedBytes += to - from;
  }

  private collectLine(): void {
    if (this.collected.length < EHLO_MAX_LINES) this.collected.push(this.collecting.replace(/\r$/, ''));
    this.collecting = '';
  }

  private sendEhlo(code: number): void {
    const lines = this.collected;
    this.collected = [];
    this.collectedBytes = 0;
    if (code === 250) this.chunking = lines.slice(1).some((l) => /^CHUNKING$/i.test(l.slice(4).trim()));
    this.host.toClient(rewriteEhlo(lines));
  }
}

/**
 * An EHLO reply without the gateway-only keywords. When the last line goes,
 * the one before it becomes the last (`250 `); the first line (the server's
 * name) always stays. Lines are repeated as they came, CRLF-terminated.
 */
export function rewriteEhlo(lines: readonly string[]): string {
  const kept = lines.filter((l, i) => i === 0 || !/^\d{3}[ -]/.test(l) || !GATEWAY_ONLY_KEYWORD.test(l.slice(4).trim()));
  return kept.map((l, i) => `${i === kept.length - 1 && /^\d{3}-/.test(l) ? `${l.slice(0, 3)} ${l.slice(4)}` : l}\r\n`).join('');
}

export function createSmtpRelay(host: RelayHost, opts: SmtpRelayOptions): SmtpRelay {
  return new SmtpRelay(host, opts);
}
