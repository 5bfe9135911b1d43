/**
 * Watches a spliced SMTP session, without changing a byte, to count
 * recipients (every RCPT command line) and messages (DATA ended by
 * CRLF.CRLF, or the BDAT chunk marked LAST) for rate rules.
 *
 * Client bytes are read in one of four modes: command lines; message content
 * after DATA, entered only once the backend answered 354; BDAT chunks, which
 * are skipped by size (they may contain anything); and, between DATA and its
 * answer, a short wait. Backend replies are followed just enough to match
 * them to commands. Memory is one small buffer per session (allocated on
 * first need) plus a few counters; message content is scanned with
 * Buffer.indexOf and never copied.
 */
import type { StreamCounts, StreamObserver } from './types.ts';

/** The most of one client command line kept (and, after DATA, of bytes held until its answer). */
const LINE_CAP = 4096;
const TERMINATOR = Buffer.from('\r\n.\r\n', 'latin1');
const CR = 0x0d;
const LF = 0x0a;
const DOT = 0x2e;
const SP = 0x20;
const TAB = 0x09;

type Mode =
  /** Command lines. */
  | 'command'
  /** The client sent DATA; its bytes are held until the backend says 354 (content) or anything else (commands). */
  | 'await-data'
  /** Message content after 354, until CRLF.CRLF. */
  | 'data'
  /** Inside a BDAT chunk of known size. */
  | 'bdat';

/** Verbs as four lower-cased bytes packed into an int. */
const verb = (s: string) => ((s.charCodeAt(0) << 24) | (s.charCodeAt(1) << 16) | (s.charCodeAt(2) << 8) | s.charCodeAt(3)) >>> 0;
const V_RCPT = verb('rcpt');
const V_MAIL = verb('mail');
const V_DATA = verb('data');
const V_BDAT = verb('bdat');
const V_RSET = verb('rset');
const V_EHLO = verb('ehlo');
const V_HELO = verb('helo');

export class SmtpObserver implements StreamObserver {
  private readonly counts: StreamCounts;
  private mode: Mode = 'command';
  /** Partial command line (command mode) or bytes held after DATA (await-data mode). */
  private buf: Buffer | undefined;
  private len = 0;
  /** The current command line grew past LINE_CAP: only its start is kept. */
  private truncated = false;
  /** Ignore the rest of the current line (after losing track of where it began). */
  private skipLine = false;
  /** Data mode: how much of CRLF.CRLF has been matched (2: at the start of a line). */
  private match = 0;
  /** BDAT mode: bytes left in the chunk, and whether it is the last one. */
  private chunkLeft = 0;
  private chunkLast = false;
  /** DATA bytes held past LINE_CAP were taken for content before the backend's answer came. */
  private guessed = false;
  /** The last command line was DATA (a late 354 still means content). */
  private lastWasData = false;
  /** RCPT lines in the current transaction. */
  private recipients = 0;
  /** Client commands (and message ends) still waiting for a reply. */
  private outstanding = 0;
  /** Backend reply line: digits seen (0..3), the code, and whether the rest of the line is skipped. */
  private replyPos = 0;
  private replyCode = 0;
  private replySkip = false;

  constructor(counts: StreamCounts) {
    this.counts = counts;
  }

  atBoundary(): boolean {
    return this.mode === 'command' && this.len === 0 && !this.truncated && !this.skipLine;
  }

  fromClient(chunk: Buffer): void {
    let i = 0;
    const n = chunk.length;
    while (i < n) {
      switch (this.mode) {
        case 'command':
          i = this.commandBytes(chunk, i);
          break;
        case 'data':
          i = this.dataBytes(chunk, i);
          break;
        case 'bdat':
          i = this.chunkBytes(chunk, i);
          break;
        case 'await-data':
          this.hold(chunk, i);
          return;
        default: {
          const never: never = this.mode;
          throw new Error(`unknown mode ${String(never)}`);
        }
      }
    }
  }

  fromBackend(chunk: Buffer): void {
    let i = 0;
    const n = chunk.length;
    while (i < n) {
      if (this.replySkip) {
        const lf = chunk.indexOf(LF, i);
        if (lf < 0) return;
        i = lf + 1;
        this.replySkip = false;
        this.replyPos = 0;
        this.replyCode = 0;
        continue;
      }
      const c = chunk[i++]!;
      if (this.replyPos < 3) {
        if (c >= 0x30 && c <= 0x39) {
          this.replyCode = this.replyCode * 10 + (c - 0x30);
          this.replyPos++;
        } else if (c === LF) {
          this.replyPos = 0;
          this.replyCode = 0;
        } else {
          this.replySkip = true; // not a reply line
        }
        continue;
      }
      // After three digits: '-' continues a multi-line reply; SP, CR or LF ends it.
      if (c !== 0x2d) this.reply(this.replyCode);
      if (c === LF) {
        this.replyPos = 0;
        this.replyCode = 0;
      } else {
        this.replySkip = true;
      }
    }
  }

  // ---- client side ------------------------------------------------------------

  private commandBytes(chunk: Buffer, i: number): number {
    const lf = chunk.indexOf(LF, i);
    if (lf < 0) {
      this.keep(chunk, i, chunk.length);
      return chunk.length;
    }
    if (this.skipLine) {
      this.skipLine = false;
      this.len = 0;
      this.truncated = false;
    } else if (this.len === 0 && !this.truncated) {
      this.command(chunk, i, lf, true); // the whole line is in this chunk: parse it in place
    } else {
      this.keep(chunk, i, lf);
      const complete = !this.truncated;
      const end = this.len;
      this.len = 0;
      this.truncated = false;
      this.command(this.buf!, 0, end, complete);
    }
    return lf + 1;
  }

  private keep(chunk: Buffer, from: number, to: number): void {
    if (this.skipLine) return;
    const room = LINE_CAP - this.len;
    const take = Math.min(room, to - from);
    if (take > 0) {
      this.buf ??= Buffer.allocUnsafe(LINE_CAP);
      chunk.copy(this.buf, this.len, from, from + take);
      this.len += take;
    }
    if (to - from > take) this.truncated = true;
  }

  /** One client command line, `src[start, end)` without the LF; `complete` is false when only its start was kept. */
  private command(src: Buffer, start: number, end: number, complete: boolean): void {
    if (end > start && src[end - 1] === CR) end--;
    this.outstanding++;
    this.lastWasData = false;
    if (end - start < 4) return;
    const after = end - start > 4 ? src[start + 4]! : SP;
    if (after !== SP && after !== TAB) return;
    const v = (((src[start]! | 0x20) << 24) | ((src[start + 1]! | 0x20) << 16) | ((src[start + 2]! | 0x20) << 8) | (src[start + 3]! | 0x20)) >>> 0;
    switch (v) {
      case V_RCPT:
        this.recipients++;
        this.counts.onRecipient();
        return;
      case V_MAIL:
      case V_RSET:
      case V_EHLO:
      case V_HELO:
        this.recipients = 0;
        return;
      case V_DATA:
        this.mode = 'await-data';
        this.lastWasData = true;
        return;
      case V_BDAT:
        if (complete) this.bdat(src, start + 4, end);
        return;
      default:
        return;
    }
  }

  /** `BDAT <size> [LAST]`: without a valid size the backend cannot know where the chunk ends either. */
  private bdat(src: Buffer, i: number, end: number): void {
    while (i < end && (src[i] === SP || src[i] === TAB)) i++;
    let size = 0;
    let digits = 0;
    while (i < end && src[i]! >= 0x30 && src[i]! <= 0x39) {
      size = size * 10 + (src[i]! - 0x30);
      digits++;
      i++;
    }
    if (digits === 0 || digits > 15) return;
    let last = false;
    if (i < end && (src[i] === SP || src[i] === TAB)) {
      while (i < end && (src[i] === SP || src[i] === TAB)) i++;
      if (end - i >= 4 && (src[i]! | 0x20) === 0x6c && (src[i + 1]! | 0x20) === 0x61 && (src[i + 2]! | 0x20) === 0x73 && (src[i + 3]! | 0x20) === 0x74) {
        last = true;
        i += 4;
      }
      while (i < end && (src[i] === SP || src[i] === TAB)) i++;
    }
    if (i !== end) return;
    this.chunkLeft = size;
    this.chunkLast = last;
    this.mode = 'bdat';
    if (size === 0) this.chunkDone();
  }

  private chunkBytes(chunk: Buffer, i: number): number {
    const take = Math.min(this.chunkLeft, chunk.length - i);
    this.chunkLeft -= take;
    if (this.chunkLeft === 0) this.chunkDone();
    return i + take;
  }

  private chunkDone(): void {
    this.mode = 'command';
    if (this.chunkLast) this.messageDone();
  }

  /** Message content: finds CRLF.CRLF (a line "." ends it; ".." is a stuffed dot), across chunks. */
  private dataBytes(chunk: Buffer, i: number): number {
    const n = chunk.length;
    // Finish (or drop) a partial match carried over from the previous chunk, byte by byte.
    while (this.match > 0 && i < n) {
      this.match = step(this.match, chunk[i++]!);
      if (this.match === 5) return this.dataDone(i);
    }
    if (i >= n) return n;
    const at = chunk.indexOf(TERMINATOR, i);
    if (at >= 0) return this.dataDone(at + TERMINATOR.length);
    // No terminator: remember how much of one the chunk ends with (at most its last four bytes).
    let m = 0;
    for (let j = Math.max(i, n - 4); j < n; j++) m = step(m, chunk[j]!);
    this.match = m;
    return n;
  }

  private dataDone(next: number): number {
    this.match = 0;
    this.mode = 'command';
    this.outstanding++; // the message itself gets a reply
    this.messageDone();
    return next;
  }

  private messageDone(): void {
    this.counts.onMessage(this.recipients);
    this.recipients = 0;
  }

  /**
   * Between DATA and its answer a well-behaved client sends nothing (RFC 2920
   * §3.1). Whatever arrives is held until the answer says how the backend
   * reads it; past LINE_CAP it is taken for content (a client that sends that
   * much is sending the message), and corrected if the answer says otherwise.
   */
  private hold(chunk: Buffer, i: number): void {
    const size = chunk.length - i;
    if (this.len + size <= LINE_CAP) {
      if (size === 0) return;
      this.buf ??= Buffer.allocUnsafe(LINE_CAP);
      chunk.copy(this.buf, this.len, i);
      this.len += size;
      return;
    }
    this.guessed = true;
    this.startData();
    this.fromClient(chunk.subarray(i));
  }

  private startData(): void {
    const held = this.takeHeld();
    this.truncated = false;
    this.skipLine = false;
    this.lastWasData = false;
    this.mode = 'data';
    this.match = 2; // the DATA line's CRLF: a "." right away ends an empty message
    if (held) this.fromClient(held);
  }

  private takeHeld(): Buffer | undefined {
    if (this.len === 0 || !this.buf) return undefined;
    const held = Buffer.from(this.buf.subarray(0, this.len)); // rare: only a client that did not wait
    this.len = 0;
    return held;
  }

  // ---- backend side -----------------------------------------------------------

  private reply(code: number): void {
    if (this.outstanding > 0) this.outstanding--;
    if (code === 354) {
      // Only DATA is answered with 354, and a client sends content only once it has seen it (the
      // observer sees it first): what follows is content even if replies were miscounted on the way.
      const wasGuess = this.guessed;
      this.guessed = false;
      if (this.mode === 'await-data' || (this.mode === 'command' && this.lastWasData && !wasGuess)) this.startData();
      return;
    }
    if (this.outstanding > 0) return;
    if (this.mode === 'await-data') {
      // DATA refused: anything held is commands after all.
      this.mode = 'command';
      const held = this.takeHeld();
      if (held) this.fromClient(held);
    } else if (this.guessed) {
      this.guessed = false;
      if (this.mode === 'data') {
        // DATA was refused after all: the client's bytes are commands again, from the next line on.
        this.mode = 'command';
        this.skipLine = this.match !== 2;
        this.match = 0;
      }
    }
  }
}

/** One step of the CRLF.CRLF matcher; state k = bytes matched, 5 = found. */
function step(k: number, c: number): number {
  switch (k) {
    case 0:
      return c === CR ? 1 : 0;
    case 1:
      return c === LF ? 2 : c === CR ? 1 : 0;
    case 2:
      return c === DOT ? 3 : c === CR ? 1 : 0;
    case 3:
      return c === CR ? 4 : 0;
    case 4:
      return c === LF ? 5 : c === CR ? 1 : 0;
    default:
      return 0;
  }
}

export function createSmtpObserver(counts: StreamCounts): StreamObserver {
  return new SmtpObserver(counts);
}
