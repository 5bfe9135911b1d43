/**
 * A bounded CRLF line reader with a raw-bytes mode (IMAP literals, BDAT
 * chunks). It owns no socket: bytes are pushed in, lines are pulled out, so
 * it can be fed input split at every offset in tests.
 */
export const LINE_TOO_LONG = Symbol('line too long');

export class LineReader {
  private buf: Buffer = Buffer.alloc(0);
  private readonly maxLine: number;
  /** Offset up to which `buf` is known to contain no LF (avoids rescanning on every push). */
  private scanned = 0;

  constructor(maxLine: number) {
    this.maxLine = maxLine;
  }

  push(chunk: Buffer): void {
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
  }

  get buffered(): number {
    return this.buf.length;
  }

  /**
   * The next line without its line ending (CRLF, or a bare LF, which many
   * clients send), `null` when no full line is buffered yet, or LINE_TOO_LONG
   * when more than maxLine bytes arrived without one.
   */
  nextLine(): Buffer | null | typeof LINE_TOO_LONG {
    const lf = this.buf.indexOf(0x0a, this.scanned);
    if (lf < 0) {
      this.scanned = this.buf.length;
      return this.buf.length > this.maxLine ? LINE_TOO_LONG : null;
    }
    if (lf > this.maxLine) return LINE_TOO_LONG;
    const end = lf > 0 && this.buf[lf - 1] === 0x0d ? lf - 1 : lf;
    const line = this.buf.subarray(0, end);
    this.buf = this.buf.subarray(lf + 1);
    this.scanned = 0;
    return line;
  }

  /** Exactly n raw bytes, or null until that many are buffered. */
  takeBytes(n: number): Buffer | null {
    if (this.buf.length < n) return null;
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    this.scanned = 0;
    return out;
  }

  /** Everything still buffered (handed on to the other side when the session starts splicing). */
  drain(): Buffer {
    const out = this.buf;
    this.buf = Buffer.alloc(0);
    this.scanned = 0;
    return out;
  }
}
