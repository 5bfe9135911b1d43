/**
 * User names as policy sees them: compared case-insensitively, matched by
 * exact name or a glob ("*@example.org", "user?"), split into a domain part
 * for routing by domain.
 */

/** The form every lookup and counter key uses. */
export function canonicalUser(user: string): string {
  return user.toLowerCase();
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
