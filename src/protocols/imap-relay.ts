/**
 * The spliced IMAP session, after login: bytes pass both ways as they came,
 * and the backend's side is read just enough to know where a response ends,
 * so that the gateway's own `* BYE` (shutdown, kill, idle) never lands inside
 * one. A response is lines; a line that ends in `{n}` (a literal, `~{n}` for
 * BINARY) goes on after n raw bytes, which may hold anything, `{5}` and CRLF
 * included (RFC 9051 §4.3). This reads every line end the way clients' parsers
 * do and skips literal bytes by count: no copy, no per-byte work on content.
 */
import type { CloseReason, RelayFilter, RelayHost } from './types.ts';

const LF = 0x0a;
const CR = 0x0d;
const OPEN = 0x7b; // {
const CLOSE = 0x7d; // }
/** A literal's size has at most this many digits (RFC 9051: number64); the tail kept of a line that spans chunks is this long. */
const MAX_DIGITS = 20;
const TAIL = MAX_DIGITS + 3;

export class ImapRelay implements RelayFilter {
  readonly counts = false;
  private readonly host: RelayHost;
  /** Bytes of a literal still to come from the backend. */
  private literal = 0;
  /** Inside a response line: after its start, or after a literal that the line goes on from. */
  private inLine = false;
  /** The last bytes of a line that spans chunks (to read a `{n}` cut in two). */
  private tail: Buffer | undefined;
  /** A goodbye waits for the end of the response in flight. */
  private stopping: { reason: CloseReason; words: string | undefined } | undefined;
  private ended = false;

  constructor(host: RelayHost) {
    this.host = host;
  }

  fromClient(chunk: Buffer): void {
    if (this.stopping || this.ended) return;
    this.host.toBackend(chunk);
  }

  fromBackend(chunk: Buffer): void {
    if (this.ended) return;
    const end = this.scan(chunk);
    if (end < 0) {
      this.host.toClient(chunk);
      return;
    }
    // A goodbye was waiting and the response ends at `end`: that much goes, then the words.
    if (end > 0) this.host.toClient(end === chunk.length ? chunk : chunk.subarray(0, end));
    this.end();
  }

  verdict(): void {
    // Nothing in IMAP waits for a count.
  }

  holding(): boolean {
    return this.stopping !== undefined;
  }

  atBoundary(): boolean {
    return this.literal === 0 && !this.inLine;
  }

  goodbye(reason: CloseReason, words: string | undefined): void {
    if (this.ended) return;
    this.stopping = { reason, words };
    if (this.atBoundary()) this.end();
  }

  /**
   * Follows `chunk` through lines and literals. Returns -1, or, when a
   * goodbye waits, the offset of the first boundary in it (where it stops).
   */
  private scan(chunk: Buffer): number {
    const n = chunk.length;
    let i = 0;
    while (i < n) {
      if (this.literal > 0) {
        const take = Math.min(this.literal, n - i);
        this.literal -= take;
        i += take;
        continue; // the line goes on after the literal (inLine stays true)
      }
      this.inLine = true;
      const lf = chunk.indexOf(LF, i);
      if (lf < 0) {
        this.keepTail(chunk, i, n);
        return -1;
      }
      const size = this.literalAt(chunk, i, lf);
      this.tail = undefined;
      i = lf + 1;
      if (size !== undefined) {
        this.literal = size;
        continue;
      }
      this.inLine = false;
      if (this.stopping) return i;
    }
    return -1;
  }

  /** The size of the literal that the line `[tail] chunk[from, lf)` announces at its end, if it does. */
  private literalAt(chunk: Buffer, from: number, lf: number): number | undefined {
    let line = chunk.subarray(Math.max(from, lf - TAIL), lf);
    if (this.tail && lf - from < TAIL) line = Buffer.concat([this.tail, chunk.subarray(from, lf)]);
    let p = line.length - 1;
    if (line[p] === CR) p--;
    if (p < 0 || line[p] !== CLOSE) return undefined;
    let size = 0;
    let digits = 0;
    for (p--; p >= 0 && line[p]! >= 0x30 && line[p]! <= 0x39; p--) digits++;
    if (digits === 0 || digits > MAX_DIGITS || p < 0 || line[p] !== OPEN) return undefined;
    for (let k = p + 1; k < p + 1 + digits; k++) size = size * 10 + (line[k]! - 0x30);
    return size;
  }

  private keepTail(chunk: Buffer, from: number, to: number): void {
    const piece = chunk.subarray(Math.max(from, to - TAIL), to);
    const joined = this.tail ? Buffer.concat([this.tail, piece]) : Buffer.from(piece);
    this.tail = joined.length > TAIL ? joined.subarray(joined.length - TAIL) : joined;
  }

  private end(): void {
    const s = this.stopping;
    this.ended = true;
    this.host.close(s?.reason ?? 'shutdown', s?.words ?? '');
  }
}
