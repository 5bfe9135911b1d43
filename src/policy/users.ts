/**
 * Local users: names, password hashes and groups from the config's
 * `users.list` and the optional separate `users.file` (read by files.ts).
 * Verification costs the same whether or not the user exists: an unknown
 * name is checked against a dummy hash of the most common kind and cost.
 */
import type { PolicySections, UserEntry } from '../config/schema-policy.ts';
import { errorCode, MailgateError } from '../core/errors.ts';
import { parseHash, type PasswordHash } from '../core/password-hash.ts';
import type { Credentials } from '../protocols/types.ts';
import type { PolicyFiles } from './files.ts';
import { canonicalUser, nameMatcher } from './names.ts';
import { dummyHashLike, verifyPassword } from './passwords.ts';

export interface LocalUser {
  /** As configured. */
  readonly name: string;
  readonly hash: PasswordHash;
  readonly groups: ReadonlySet<string>;
}

export class UserDirectory {
  private readonly users = new Map<string, LocalUser>();
  private readonly groupMatchers: [string, (user: string) => boolean][];
  private readonly dummy: PasswordHash;

  constructor(entries: readonly UserEntry[], groups: Readonly<Record<string, readonly string[]>> = {}) {
    for (const e of entries) {
      const key = canonicalUser(e.name);
      if (this.users.has(key)) throw new MailgateError('CONFIG_INVALID', `user "${e.name}" is defined twice (config and users file)`);
      const hash = parseHash(e.password_hash);
      // The schema validated it already; this is for entries built in code.
      if (typeof hash === 'string') throw new MailgateError('HASH_INVALID', `user "${e.name}": ${hash}`);
      this.users.set(key, { name: e.name, hash, groups: new Set(e.groups) });
    }
    this.groupMatchers = Object.entries(groups).map(([g, members]) => [g, nameMatcher(members)]);
    this.dummy = dummyHashLike(mostCommonHash([...this.users.values()].map((u) => u.hash)));
  }

  /** The users of a config: `users.list` plus what its `users.file` holds (src/policy/files.ts). */
  static fromConfig(section: PolicySections['users'], files: PolicyFiles): UserDirectory {
    return new UserDirectory([...section.list, ...files.users], section.groups);
  }

  get size(): number {
    return this.users.size;
  }

  find(user: string): LocalUser | undefined {
    return this.users.get(canonicalUser(user));
  }

  /** Groups from the user's entry and from `users.groups` patterns. */
  groupsOf(user: string | null): ReadonlySet<string> {
    if (user === null) return EMPTY;
    const own = this.find(user)?.groups;
    if (this.groupMatchers.length === 0) return own ?? EMPTY;
    const all = new Set(own);
    for (const [g, match] of this.groupMatchers) if (match(user)) all.add(g);
    return all;
  }

  /**
   * The password step of a local login: whose login this is, or why not.
   * Acting as another user (a PLAIN authorization id) is not something local
   * users can do; `busy` when too many verifications wait already.
   */
  async check(credentials: Credentials): Promise<LocalUser | 'other-user' | 'wrong-password' | 'busy'> {
    if (credentials.authzid && canonicalUser(credentials.authzid) !== canonicalUser(credentials.user)) return 'other-user';
    try {
      return (await this.verify(credentials.user, credentials.password)) ?? 'wrong-password';
    } catch (err) {
      if (errorCode(err) === 'AUTH_BUSY') return 'busy';
      throw err;
    }
  }

  /** The user when the password is right; an unknown user costs one dummy verification. */
  async verify(user: string, password: string): Promise<LocalUser | undefined> {
    const found = this.find(user);
    const ok = await verifyPassword(password, found?.hash ?? this.dummy);
    return found && ok ? found : undefined;
  }
}

const EMPTY: ReadonlySet<string> = new Set();

/** The kind and cost most users' hashes have: unknown users are checked against a dummy hash like it. */
export function mostCommonHash(hashes: readonly PasswordHash[]): PasswordHash | undefined {
  const counts = new Map<string, { n: number; h: PasswordHash }>();
  for (const h of hashes) {
    const key =
      h.kind === 'bcrypt' ? `bcrypt:${h.cost}` : h.kind === 'argon2id' ? `argon2id:${h.m}:${h.t}:${h.p}:${h.hashLength}` : `scrypt:${h.ln}:${h.r}:${h.p}:${h.hash.length}`;
    const c = counts.get(key);
    if (c) c.n++;
    else counts.set(key, { n: 1, h });
  }
  let best: { n: number; h: PasswordHash } | undefined;
  for (const c of counts.values()) if (!best || c.n > best.n) best = c;
  return best?.h;
}
