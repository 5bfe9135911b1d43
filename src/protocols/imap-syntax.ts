/**
 * The small part of IMAP syntax (RFC 9051 §9) the gateway must read before
 * login: tag, command name, atoms, quoted strings, literals, parenthesised
 * lists and NIL. Everything here is pure and bounded by the line reader.
 */

export type ImapToken =
  | { t: 'atom'; v: string }
  | { t: 'string'; v: string } // quoted or literal, unescaped (binary string)
  | { t: 'nil' }
  | { t: 'open' }
  | { t: 'close' };

export interface LiteralMarker {
  size: number;
  /** LITERAL+ / LITERAL- non-synchronising literal: no continuation is sent. */
  nonSync: boolean;
}

export type TokenizeResult =
  | { ok: true; tokens: ImapToken[]; literal: LiteralMarker | undefined }
  | { ok: false; error: string };

const LITERAL_AT_END = /\{(\d{1,10})(\+?)\}$/;

/** Tokenises one line (latin1 text without CRLF); a trailing {n} / {n+} is reported, not tokenised. */
export function tokenizeLine(line: string): TokenizeResult {
  let text = line;
  let literal: LiteralMarker | undefined;
  const m = LITERAL_AT_END.exec(text);
  if (m?.[1] !== undefined) {
    literal = { size: Number(m[1]), nonSync: m[2] === '+' };
    text = text.slice(0, m.index);
  }
  const tokens: ImapToken[] = [];
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === ' ') {
      i++;
    } else if (c === '(') {
      tokens.push({ t: 'open' });
      i++;
    } else if (c === ')') {
      tokens.push({ t: 'close' });
      i++;
    } else if (c === '"') {
      let v = '';
      i++;
      let closed = false;
      while (i < text.length) {
        const d = text[i];
        if (d === '\\') {
          const e = text[i + 1];
          if (e !== '"' && e !== '\\') return { ok: false, error: 'bad escape in quoted string' };
          v += e;
          i += 2;
        } else if (d === '"') {
          closed = true;
          i++;
          break;
        } else {
          v += d;
          i++;
        }
      }
      if (!closed) return { ok: false, error: 'unterminated quoted string' };
      tokens.push({ t: 'string', v });
    } else {
      let j = i;
      while (j < text.length && text[j] !== ' ' && text[j] !== '(' && text[j] !== ')' && text[j] !== '"') j++;
      const v = text.slice(i, j);
      if (v.includes('{') || v.includes('\0')) return { ok: false, error: 'bad atom' };
      tokens.push(v.toUpperCase() === 'NIL' ? { t: 'nil' } : { t: 'atom', v });
      i = j;
    }
  }
  return { ok: true, tokens, literal };
}

/** An astring argument (atom or string) as text. */
export function astring(tok: ImapToken | undefined): string | undefined {
  if (!tok) return undefined;
  if (tok.t === 'atom' || tok.t === 'string') return tok.v;
  return undefined;
}

/** Quotes a value for a command we send; caller guarantees no CR/LF/NUL. */
export function quote(value: string): string {
  return `"${value.replace(/[\\"]/g, (c) => `\\${c}`)}"`;
}

/** Can `value` travel as a quoted string? (7-bit, no CR/LF/NUL; otherwise a literal is needed.) */
export function quotable(value: string): boolean {
  return /^[\x01-\x09\x0b\x0c\x0e-\x7f]*$/.test(value) && value.length <= 1024;
}

const TAG = /^[\x21-\x7e]+$/;
/** A tag: printable ASCII except the IMAP specials that would confuse a client's parser. */
export function validTag(tag: string): boolean {
  return TAG.test(tag) && !/[(){%*"\\+]/.test(tag) && tag.length <= 64;
}
