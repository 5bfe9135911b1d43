/**
 * User names as policy sees them: compared case-insensitively, matched by
 * exact name or a glob ("*@example.org", "user?"), split into a domain part
 * for routing by domain, and turned into the keys counts and bans are kept
 * under (username_format, parsed in core/username-format.ts).
 */
import { DEFAULT_USERNAME_FORMAT, parseUsernameFormat, type FormatPart } from '../core/username-format.ts';

/** The form every lookup and counter key uses. */
export function canonicalUser(user: string): string {
  return user.toLowerCase();
}

// ---- how the backend names accounts (username_format) ------------------------------

/**
 * The keys a login name is counted and banned under (username_format
 * applied): one per format, lower case, without duplicates or empty ones.
 * The first is the account: per-user limits count under it.
 */
export class UserKeys {
  private readonly formats: readonly FormatPart[][];

  /** Throws for a format parseUsernameFormat refuses (the config schema checks them first). */
  constructor(formats: readonly string[] = DEFAULT_USERNAME_FORMAT) {
    this.formats = formats.map((f) => {
      const parts = parseUsernameFormat(f);
      if (typeof parts === 'string') throw new Error(`username_format "${f}": ${parts}`);
      return parts;
    });
  }

  keys(user: string): string[] {
    const name = canonicalUser(user);
    const at = name.indexOf('@');
    const local = at < 0 ? name : name.slice(0, at);
    const domain = at < 0 ? '' : name.slice(at + 1);
    const out: string[] = [];
    for (const parts of this.formats) {
      let key = '';
      for (const p of parts) key += 'text' in p ? p.text : p.field === 'u' ? name : p.field === 'n' ? local : domain;
      if (key !== '' && !out.includes(key)) out.push(key);
    }
    if (out.length === 0) out.push(name);
    return out;
  }

  /** The account a login name belongs to: its first key. */
  account(user: string): string {
    return this.keys(user)[0]!;
  }
}

/** The part after the last "@", lower case; "" when there is none. */
export function domainOf(user: string): string {
  const at = user.lastIndexOf('@');
  return at < 0 ? '' : user.slice(at + 1).toLowerCase();
}

export function isGlob(pattern: string): boolean {
  return pattern.includes('*') || pattern.includes('?');
}

/** A case-insensitive, anchored matcher for names and globs; `*` is any run of characters, `?` one character. */
export function nameMatcher(patterns: readonly string[]): (user: string) => boolean {
  const exact = new Set<string>();
  const globs: string[] = [];
  for (const p of patterns) {
    if (isGlob(p)) globs.push(canonicalUser(p));
    else exact.add(canonicalUser(p));
  }
  return (user) => {
    const u = canonicalUser(user);
    return exact.has(u) || globs.some((g) => globMatch(g, u));
  };
}

/**
 * Glob matching in O(pattern × text) without backtracking blow-ups (a
 * regular expression built from "*a*a*a*b" is polynomial in the worst case).
 */
export function globMatch(pattern: string, text: string): boolean {
  const p = [...pattern];
  const t = [...text];
  let pi = 0;
  let ti = 0;
  let star = -1;
  let mark = 0;
  while (ti < t.length) {
    if (pi < p.length && (p[pi] === '?' || (p[pi] !== '*' && p[pi] === t[ti]))) {
      pi++;
      ti++;
    } else if (pi < p.length && p[pi] === '*') {
      star = pi++;
      mark = ti;
    } else if (star >= 0) {
      pi = star + 1;
      ti = ++mark;
    } else {
      return false;
    }
  }
  while (pi < p.length && p[pi] === '*') pi++;
  return pi === p.length;
}
