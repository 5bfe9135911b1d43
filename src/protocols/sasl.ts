/**
 * SASL PLAIN (RFC 4616) and LOGIN exchanges, shared by IMAP AUTHENTICATE,
 * POP3 AUTH and SMTP AUTH. Only collects credentials; it never decides.
 */
import type { Credentials } from './types.ts';

export type SaslMechanism = 'PLAIN' | 'LOGIN';
export const SASL_MECHANISMS: readonly SaslMechanism[] = ['PLAIN', 'LOGIN'];

export type SaslStep =
  | { kind: 'challenge'; challenge: string } // base64, sent after the protocol's continuation prefix
  | { kind: 'done'; credentials: Credentials }
  | { kind: 'fail'; reason: 'malformed' | 'aborted' };

export function parseMechanism(name: string): SaslMechanism | undefined {
  const upper = name.toUpperCase();
  return SASL_MECHANISMS.find((m) => m === upper);
}

const B64 = /^[A-Za-z0-9+/]*={0,2}$/;

function decodeBase64(text: string): Buffer | undefined {
  if (text === '=') return Buffer.alloc(0);
  if (text.length % 4 !== 0 || !B64.test(text)) return undefined;
  return Buffer.from(text, 'base64');
}

function validText(b: Buffer): string | undefined {
  const s = b.toString('utf8');
  // NUL, CR and LF can never be part of a user name or password we pass on.
  if (/[\0\r\n]/.test(s) || Buffer.byteLength(s) !== b.length) return undefined;
  return s;
}

export function decodePlain(payload: Buffer): Credentials | undefined {
  const first = payload.indexOf(0);
  const second = first < 0 ? -1 : payload.indexOf(0, first + 1);
  if (first < 0 || second < 0 || payload.indexOf(0, second + 1) >= 0) return undefined;
  const authzid = validText(payload.subarray(0, first));
  const user = validText(payload.subarray(first + 1, second));
  const password = validText(payload.subarray(second + 1));
  if (authzid === undefined || !user || password === undefined || password === '') return undefined;
  return authzid && authzid !== user ? { user, password, authzid, mechanism: 'PLAIN' } : { user, password, mechanism: 'PLAIN' };
}

/** One exchange: `start` with the optional initial response, then `next` per client line. */
export class SaslExchange {
  readonly mechanism: SaslMechanism;
  private user: string | undefined;
  private steps = 0;

  constructor(mechanism: SaslMechanism) {
    this.mechanism = mechanism;
  }

  start(initialResponse?: string): SaslStep {
    if (initialResponse === undefined) {
      return this.mechanism === 'PLAIN' ? { kind: 'challenge', challenge: '' } : { kind: 'challenge', challenge: b64('Username:') };
    }
    return this.next(initialResponse);
  }

  next(response: string): SaslStep {
    this.steps++;
    if (response === '*') return { kind: 'fail', reason: 'aborted' };
    if (this.steps > 2) return { kind: 'fail', reason: 'malformed' };
    const bytes = decodeBase64(response.trim());
    if (!bytes) return { kind: 'fail', reason: 'malformed' };
    if (this.mechanism === 'PLAIN') {
      const credentials = decodePlain(bytes);
      return credentials ? { kind: 'done', credentials } : { kind: 'fail', reason: 'malformed' };
    }
    const text = validText(bytes);
    if (text === undefined) return { kind: 'fail', reason: 'malformed' };
    if (this.user === undefined) {
      if (!text) return { kind: 'fail', reason: 'malformed' };
      this.user = text;
      return { kind: 'challenge', challenge: b64('Password:') };
    }
    if (!text) return { kind: 'fail', reason: 'malformed' };
    return { kind: 'done', credentials: { user: this.user, password: text, mechanism: 'LOGIN' } };
  }
}

function b64(s: string): string {
  return Buffer.from(s, 'utf8').toString('base64');
}

export function encodePlain(user: string, password: string, authzid = ''): string {
  return Buffer.from(`${authzid}\0${user}\0${password}`, 'utf8').toString('base64');
}
