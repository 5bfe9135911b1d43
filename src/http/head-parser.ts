/**
 * Strict HTTP/1.x head parsing for the fast path (RFC 9112), and the chunked
 * framing reader both directions share. Pure: bytes in, a parsed head or a
 * coded refusal out; nothing here touches a socket.
 *
 * The gateway never repairs an ambiguous message: whatever two HTTP
 * implementations could read two ways (a request smuggled behind another) is
 * refused. A request is refused for: bare LF or CR, obs-fold, whitespace
 * before a colon, NUL or another control byte, a head over the bound, both
 * Content-Length and Transfer-Encoding, a duplicate or malformed
 * Content-Length, a Transfer-Encoding other than exactly `chunked`,
 * Transfer-Encoding on HTTP/1.0, absolute-form or authority-form targets and
 * CONNECT (mailgate is never a forward proxy), a missing or repeated Host on
 * HTTP/1.1, and an oversized chunk-size line.
 */

/** Request head bound (request line plus all headers, CRLFs included). */
export const MAX_HEAD_BYTES = 16 * 1024;
/** Response heads from the backend may be larger (cookies); still bounded. */
export const MAX_RESPONSE_HEAD_BYTES = 64 * 1024;
/** Header fields per head. */
export const MAX_HEADERS = 200;
/** One chunk-size line (size, extensions, CRLF). */
export const MAX_CHUNK_LINE = 4096;
/** All trailer fields of a chunked body together. */
export const MAX_TRAILER_BYTES = 16 * 1024;

export type Refusal =
  | 'bare-lf'
  | 'bare-cr'
  | 'obs-fold'
  | 'space-before-colon'
  | 'nul'
  | 'bad-header'
  | 'too-many-headers'
  | 'head-too-large'
  | 'bad-request-line'
  | 'bad-version'
  | 'absolute-form'
  | 'authority-form'
  | 'connect'
  | 'cl-and-te'
  | 'duplicate-content-length'
  | 'bad-content-length'
  | 'bad-transfer-encoding'
  | 'te-on-http10'
  | 'missing-host'
  | 'duplicate-host'
  | 'chunk-line-too-long'
  | 'bad-chunk'
  | 'trailer-too-large';

export class HeadError extends Error {
  readonly code: Refusal;
  constructor(code: Refusal, message?: string) {
    super(message ?? code);
    this.code = code;
  }
}

/** One header field as it came, and its name in lower case. */
export interface Field {
  /** Lower-case name. */
  name: string;
  value: string;
  /** The whole line as received, without CRLF (latin1). */
  line: string;
}

export interface RequestHead {
  method: string;
  /** Origin-form (`/path?query`) or `*` (OPTIONS only). */
  target: string;
  /** 0 for HTTP/1.0, 1 for HTTP/1.1. */
  minor: 0 | 1;
  fields: Field[];
  host: string | undefined;
  /** Body framing: none, a length, or chunked. */
  body: { kind: 'none' } | { kind: 'length'; length: number } | { kind: 'chunked' };
  /** Tokens of the Connection header, lower case. */
  connection: Set<string>;
  /** Bytes the head took, leading empty lines included. */
  size: number;
}

export interface ResponseHead {
  minor: 0 | 1;
  status: number;
  /** The status line as received, without CRLF. */
  statusLine: string;
  fields: Field[];
  connection: Set<string>;
  /** Content-Length when present (and single); undefined otherwise. */
  contentLength: number | undefined;
  /** Transfer-Encoding present: its last coding is chunked (true) or not (false: the body runs to the close). */
  chunked: boolean | undefined;
  size: number;
}

const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
/** A field line: token, colon, optional whitespace, a value of visible bytes, SP or HTAB (obs-text allowed). */
const FIELD = /^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[\t ]*([\t\x20-\x7e\x80-\xff]*?)[\t ]*$/;
const REQUEST_LINE = /^([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP\/1\.([01])$/;
const STATUS_LINE = /^HTTP\/1\.([01]) ([1-9]\d\d)(?: [\t\x20-\x7e\x80-\xff]*)?$/;
const DIGITS = /^\d{1,15}$/;
const ABSOLUTE = /^[A-Za-z][A-Za-z0-9+.-]*:\/\//;

/**
 * Where the head ends in `buf` (the index after its empty line), undefined
 * when more bytes are needed. Throws a HeadError for bytes that can never
 * become a valid head: a bare LF or CR before the end, or too many bytes.
 * `from` lets a caller skip what it scanned before (a few bytes are re-read).
 */
export function findHeadEnd(buf: Buffer, max: number, from = 0): number | undefined {
  const start = Math.max(0, from - 3);
  const end = buf.indexOf('\r\n\r\n', start, 'latin1');
  if (end >= 0 && end + 4 <= max) return end + 4;
  if (end >= 0 || buf.length > max) throw new HeadError('head-too-large');
  // Not complete: look at what arrived for a bare LF or CR, so such a client is answered now, not at a timeout.
  for (let i = start; i < buf.length; i++) {
    const c = buf[i];
    if (c === 10 && (i === 0 || buf[i - 1] !== 13)) throw new HeadError('bare-lf');
    if (c === 13 && i + 1 < buf.length && buf[i + 1] !== 10) throw new HeadError('bare-cr');
  }
  return undefined;
}

/** Leading empty lines (CRLF) a server should ignore before a request line (RFC 9112 §2.2), at most a few. */
export function skipLeadingCrlf(buf: Buffer): number {
  let i = 0;
  while (i + 1 < buf.length && i < 8 && buf[i] === 13 && buf[i + 1] === 10) i += 2;
  return i;
}

/** Splits a complete head (`text` ends with CRLF CRLF) into lines, refusing bare CR/LF inside them. */
function lines(text: string): string[] {
  const parts = text.slice(0, -4).split('\r\n');
  for (const l of parts) {
    if (l.includes('\n')) throw new HeadError('bare-lf');
    if (l.includes('\r')) throw new HeadError('bare-cr');
  }
  return parts;
}

/** Why a field line is not one; called only on failure, to name the refusal. */
function fieldRefusal(line: string): Refusal {
  if (line.startsWith(' ') || line.startsWith('\t')) return 'obs-fold';
  if (line.includes('\0')) return 'nul';
  const colon = line.indexOf(':');
  if (colon > 0 && /[\t ]$/.test(line.slice(0, colon))) return 'space-before-colon';
  return 'bad-header';
}

function parseFields(ls: string[]): Field[] {
  if (ls.length - 1 > MAX_HEADERS) throw new HeadError('too-many-headers');
  const fields: Field[] = [];
  for (let i = 1; i < ls.length; i++) {
    const line = ls[i]!;
    const m = FIELD.exec(line);
    if (!m) throw new HeadError(fieldRefusal(line));
    fields.push({ name: m[1]!.toLowerCase(), value: m[2]!, line });
  }
  return fields;
}

function connectionTokens(fields: Field[]): Set<string> {
  const tokens = new Set<string>();
  for (const f of fields) {
    if (f.name !== 'connection') continue;
    for (const t of f.value.split(',')) {
      const v = t.trim().toLowerCase();
      if (v) tokens.add(v);
    }
  }
  return tokens;
}

function parseRequestLine(first: string): { method: string; target: string; minor: 0 | 1 } {
  const m = REQUEST_LINE.exec(first);
  if (!m) {
    if (first.includes('\0')) throw new HeadError('nul');
    const version = /^\S+ \S+ (HTTP\/\S*)$/.exec(first)?.[1];
    if (version !== undefined && version !== 'HTTP/1.1' && version !== 'HTTP/1.0') throw new HeadError('bad-version');
    throw new HeadError('bad-request-line');
  }
  const method = m[1]!;
  const target = m[2]!;
  if (method === 'CONNECT') throw new HeadError('connect');
  if (target[0] !== '/') {
    if (target === '*' && method === 'OPTIONS') {
      // asterisk-form: the server as a whole; passed on as it is.
    } else if (ABSOLUTE.test(target)) throw new HeadError('absolute-form');
    else throw new HeadError('authority-form');
  }
  return { method, target, minor: m[3] === '1' ? 1 : 0 };
}

/**
 * Checks the request line as soon as it is complete, before the rest of the
 * head arrived: a client speaking another protocol (an IMAP command on 443)
 * is answered at its first line, not at the head deadline. Throws a HeadError.
 */
export function checkRequestLine(buf: Buffer): void {
  const lf = buf.indexOf(10);
  if (lf < 1 || buf[lf - 1] !== 13) return;
  parseRequestLine(buf.toString('latin1', 0, lf - 1));
}

/** Parses a complete request head: `buf` holds exactly the head (from findHeadEnd), leading CRLFs skipped. */
export function parseRequestHead(buf: Buffer): RequestHead {
  const text = buf.toString('latin1');
  const ls = lines(text);
  const { method, target, minor } = parseRequestLine(ls[0] ?? '');
  const fields = parseFields(ls);
  let host: string | undefined;
  let hosts = 0;
  let length: number | undefined;
  let lengths = 0;
  let te: string | undefined;
  let tes = 0;
  for (const f of fields) {
    switch (f.name) {
      case 'host':
        hosts++;
        host = f.value;
        break;
      case 'content-length':
        lengths++;
        if (!DIGITS.test(f.value)) throw new HeadError('bad-content-length');
        length = Number(f.value);
        break;
      case 'transfer-encoding':
        tes++;
        te = f.value;
        break;
    }
  }
  if (hosts > 1) throw new HeadError('duplicate-host');
  if (hosts === 0 && minor === 1) throw new HeadError('missing-host');
  if (lengths > 1) throw new HeadError('duplicate-content-length');
  if (tes > 0) {
    if (lengths > 0) throw new HeadError('cl-and-te');
    if (minor === 0) throw new HeadError('te-on-http10');
    if (tes > 1 || te!.toLowerCase() !== 'chunked') throw new HeadError('bad-transfer-encoding');
  }
  const body: RequestHead['body'] = tes > 0 ? { kind: 'chunked' } : length !== undefined && length > 0 ? { kind: 'length', length } : { kind: 'none' };
  return { method, target, minor, fields, host, body, connection: connectionTokens(fields), size: buf.length };
}

/** Parses a complete response head from the backend. Its framing faults are the backend's: the caller answers 502. */
export function parseResponseHead(buf: Buffer): ResponseHead {
  const text = buf.toString('latin1');
  const ls = lines(text);
  const statusLine = ls[0] ?? '';
  const m = STATUS_LINE.exec(statusLine);
  if (!m) throw new HeadError('bad-request-line', 'bad status line');
  const fields = parseFields(ls);
  let contentLength: number | undefined;
  let chunked: boolean | undefined;
  for (const f of fields) {
    if (f.name === 'content-length') {
      if (!DIGITS.test(f.value)) throw new HeadError('bad-content-length');
      // Identical repeated lengths from a backend are tolerated (RFC 9110 §8.6); differing ones are not.
      if (contentLength !== undefined && contentLength !== Number(f.value)) throw new HeadError('duplicate-content-length');
      contentLength = Number(f.value);
    } else if (f.name === 'transfer-encoding') {
      const codings = f.value.split(',').map((c) => c.trim().toLowerCase());
      chunked = codings[codings.length - 1] === 'chunked';
    }
  }
  // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3); the length is then dropped from what the client sees.
  if (chunked !== undefined) contentLength = undefined;
  return { minor: m[1] === '1' ? 1 : 0, status: Number(m[2]), statusLine, fields, connection: connectionTokens(fields), contentLength, chunked, size: buf.length };
}

/** True for a method token (used where a head did not parse, to tell HTTP from other protocols). */
export function isToken(s: string): boolean {
  return TOKEN.test(s);
}

type ChunkState = 'size' | 'data' | 'data-cr' | 'data-lf' | 'trailer' | 'done';

/**
 * Follows chunked framing (RFC 9112 §7.1) over bytes as they arrive and says
 * where the body ends; the bytes themselves are passed on unchanged by the
 * caller. Strict: hex sizes of at most 15 digits, extensions of visible
 * characters, CRLF everywhere, trailer fields as strict as header fields,
 * every line bounded.
 */
export class ChunkedReader {
  private state: ChunkState = 'size';
  private remaining = 0;
  private line = '';
  private trailerBytes = 0;

  get done(): boolean {
    return this.state === 'done';
  }

  /**
   * Reads from `buf` at `offset`; returns how many bytes of it belong to the
   * body (all of them unless the body ended inside). Throws a HeadError on a
   * framing fault.
   */
  feed(buf: Buffer, offset = 0): number {
    let i = offset;
    const n = buf.length;
    while (i < n && this.state !== 'done') {
      switch (this.state) {
        case 'data': {
          const take = Math.min(this.remaining, n - i);
          i += take;
          this.remaining -= take;
          if (this.remaining === 0) this.state = 'data-cr';
          break;
        }
        case 'data-cr':
          if (buf[i] !== 13) throw new HeadError('bad-chunk', 'chunk data not followed by CRLF');
          i++;
          this.state = 'data-lf';
          break;
        case 'data-lf':
          if (buf[i] !== 10) throw new HeadError('bad-chunk', 'chunk data not followed by CRLF');
          i++;
          this.state = 'size';
          break;
        case 'size':
        case 'trailer': {
          const lf = buf.indexOf(10, i);
          const stop = lf < 0 ? n : lf + 1;
          this.line += buf.toString('latin1', i, stop);
          i = stop;
          const bound = this.state === 'size' ? MAX_CHUNK_LINE : MAX_TRAILER_BYTES - this.trailerBytes;
          if (this.line.length > bound) throw new HeadError(this.state === 'size' ? 'chunk-line-too-long' : 'trailer-too-large');
          if (lf < 0) {
            // A CR may only be the last byte so far (its LF still to come).
            const cr = this.line.indexOf('\r');
            if (cr >= 0 && cr !== this.line.length - 1) throw new HeadError('bare-cr');
            break;
          }
          if (this.line.length < 2 || this.line[this.line.length - 2] !== '\r') throw new HeadError('bare-lf');
          const text = this.line.slice(0, -2);
          this.line = '';
          if (text.includes('\r')) throw new HeadError('bare-cr');
          if (this.state === 'size') this.sizeLine(text);
          else this.trailerLine(text);
          break;
        }
        default:
          break;
      }
    }
    return i - offset;
  }

  private sizeLine(text: string): void {
    const m = /^([0-9A-Fa-f]{1,15})((?:;[\t\x20-\x7e]*)?)$/.exec(text);
    if (!m) throw new HeadError('bad-chunk', 'bad chunk-size line');
    const size = parseInt(m[1]!, 16);
    if (size === 0) {
      this.state = 'trailer';
      return;
    }
    this.remaining = size;
    this.state = 'data';
  }

  private trailerLine(text: string): void {
    if (text === '') {
      this.state = 'done';
      return;
    }
    this.trailerBytes += text.length + 2;
    if (!FIELD.test(text)) throw new HeadError(fieldRefusal(text));
  }
}
