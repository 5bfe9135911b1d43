/**
 * `username_format`, as Dovecot's auth_username_format writes it: how a
 * backend turns a login name into an account. Parsed here because the config
 * schema checks it; policy/names.ts applies it.
 */

/**
 * The default: a login counts, and is banned, under its whole name and
 * under its local part, so that no spelling a backend may take for the same
 * account (Dovecot's `%n` maps "user5@anything" to "user5") gets past a ban
 * or a count.
 */
export const DEFAULT_USERNAME_FORMAT: readonly string[] = ['%u', '%n'];

/** Formats per setting, and the characters of one, are bounded. */
export const MAX_USERNAME_FORMATS = 4;
export const MAX_USERNAME_FORMAT_LENGTH = 64;

export type FormatPart = { field: 'u' | 'n' | 'd' } | { text: string };

/**
 * Parses one format as Dovecot's `auth_username_format` writes it: `%u` the
 * whole name, `%n` the part before the first "@" (the whole name without
 * one), `%d` the part after it ("" without one), `%%` a percent sign, any
 * other character itself. A `L` modifier (`%Lu`, `%Ln`, `%Ld`) is accepted
 * and changes nothing: mailgate compares names case-insensitively, so every
 * key is in lower case anyway. Returns the parts, or an error message.
 */
export function parseUsernameFormat(format: string): FormatPart[] | string {
  const parts: FormatPart[] = [];
  const text = (t: string) => {
    const last = parts.at(-1);
    if (last && 'text' in last) last.text += t;
    else parts.push({ text: t });
  };
  for (let i = 0; i < format.length; i++) {
    if (format[i] !== '%') {
      text(format[i]!);
      continue;
    }
    const at = i;
    let next = format[++i];
    if (next === '%') {
      text('%');
      continue;
    }
    if (next === 'L') next = format[++i];
    if (next !== 'u' && next !== 'n' && next !== 'd') {
      return `unknown variable "${format.slice(at, i + 1)}": use %u (the whole name), %n (its local part), %d (its domain) or %%`;
    }
    parts.push({ field: next });
  }
  if (!parts.some((p) => 'field' in p)) return 'names no part of the login: use %u, %n or %d';
  return parts;
}
