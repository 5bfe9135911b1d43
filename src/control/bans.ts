/**
 * Bans and failed-login counts as the control socket and the dashboard see
 * and change them: an adapter over the policy state (src/policy/state.ts),
 * which keeps them (memory or Redis, and across workers).
 *
 *   PolicyAdmin  every ban kind, failed logins counted, sessions open
 *   BanAdmin     the control socket's ban list (target.ts): every kind
 *                (addresses, ranges, users, users from one address), listed,
 *                added and lifted
 *
 * User names become ban keys as the policy counts them (username_format):
 * banning "alice@example.org" with the default formats bans the keys
 * "alice@example.org" and "alice", one ban each, so that no spelling the
 * backend takes for the same account gets past it.
 */
import { isIP } from 'node:net';
import type { Config } from '../config/load.ts';
import type { PolicySections } from '../config/schema-policy.ts';
import { MailgateError } from '../core/errors.ts';
import { DEFAULT_USERNAME_FORMAT } from '../core/username-format.ts';
import type { Logger } from '../core/log.ts';
import { normalizeIp } from '../net/address.ts';
import { AddressSet, parseCidr } from '../net/cidr.ts';
import { banId, type Ban, type BanKind } from '../policy/bans.ts';
import { MAX_USER } from '../policy/decide.ts';
import { UserKeys } from '../policy/names.ts';
import type { FailureCounts, PolicyState } from '../policy/state.ts';
import type { Ban as ControlBan } from './protocol.ts';
import type { BanAdmin, BanTarget } from './target.ts';

export interface BanRequest {
  kind: BanKind;
  /** An address ("range": a CIDR); for "address", "range" and "pair". */
  address?: string;
  /** For "user" and "pair". */
  user?: string;
  durationMs: number;
  reason?: string;
}

/** What the admin side reads of the running config (re-read at every call: a reload may change it). */
export type AdminSettings = Pick<Config, 'brute_force' | 'username_format'>;

const MAX_BAN_MS = 10 * 365 * 86_400_000;
const DEFAULT_REASON = 'Banned by the administrator';

export class PolicyAdmin {
  private readonly state: PolicyState;
  private readonly settings: () => AdminSettings;
  private readonly log: Logger;
  private names: { formats: readonly string[]; keys: UserKeys } | undefined;

  /**
   * `settings`: the running config (its brute-force windows are the failure
   * counters'; its username_format makes user names ban keys); given as the
   * brute-force section alone, the default username_format applies.
   */
  constructor(state: PolicyState, settings: PolicySections['brute_force'] | (() => AdminSettings), log: Logger) {
    this.state = state;
    if (typeof settings === 'function') this.settings = settings;
    else {
      const fixed: AdminSettings = { brute_force: settings, username_format: [...DEFAULT_USERNAME_FORMAT] };
      this.settings = () => fixed;
    }
    this.log = log.child({ part: 'policy' });
  }

  /** The ban keys of a user name, as the running username_format makes them. */
  userKeys(user: string): string[] {
    const formats = this.settings().username_format;
    if (this.names?.formats !== formats) this.names = { formats, keys: new UserKeys(formats) };
    return this.names.keys.keys(user);
  }

  /** Every ban, from the store. */
  listBans(): Promise<Ban[]> {
    return this.state.bans.list(this.state.clock());
  }

  /** Validates and adds a ban (one per key of a user name); a bad request is a BAN_INVALID error. */
  async addBan(req: BanRequest): Promise<Ban[]> {
    const now = this.state.clock();
    const bans = this.makeBans(req, now);
    for (const ban of bans) {
      await this.state.bans.add(ban, now);
      this.log.info({ ban: ban.kind, client: ban.address, user: ban.user, until: new Date(ban.until).toISOString() }, 'ban added');
    }
    return bans;
  }

  async removeBan(id: string): Promise<boolean> {
    const removed = await this.state.bans.remove(id);
    if (removed) this.log.info({ ban: id }, 'ban removed');
    return removed;
  }

  /** Failed logins counted in the current windows, and bans, for an address and/or user. */
  async inspect(query: { address?: string; user?: string }): Promise<{ failures: FailureCounts | null; bans: Ban[] }> {
    const address = query.address === undefined ? undefined : normalizeIp(query.address);
    const keys = query.user === undefined ? undefined : this.userKeys(query.user);
    const failures = await this.state.failures({ ...(address === undefined ? {} : { address }), ...(keys === undefined ? {} : { keys }) }, this.settings().brute_force);
    const bans = (await this.listBans()).filter((b) => (address !== undefined && b.address === address) || (keys !== undefined && b.user !== null && keys.includes(b.user)));
    return { failures, bans };
  }

  /** Sessions open from an address, logged in for a user (this gateway, all its workers). */
  open(query: { address?: string; user?: string }): { address: number | null; user: number | null } {
    return {
      address: query.address === undefined ? null : this.state.openFrom(normalizeIp(query.address)),
      user: query.user === undefined ? null : this.state.loggedIn(this.userKeys(query.user)[0]!),
    };
  }

  /** The control socket's ban list: every kind. */
  banList(): BanAdmin {
    const state = this.state;
    return {
      list: () => state.bans.cachedList(state.clock()).map(toControlBan),
      ban: (target, seconds, reason) => {
        const req: BanRequest = { ...requestFor(typeof target === 'string' ? { ip: target } : target), durationMs: seconds * 1000, reason };
        const bans = this.makeBans(req, state.clock()); // validates now, so a bad target is the caller's error
        state.track('ban', this.addBan(req));
        return bans.map(toControlBan);
      },
      unban: (target) => {
        const ids = this.matching(typeof target === 'string' ? { ip: target } : target).map((b) => b.id);
        for (const id of ids) state.track('unban', this.removeBan(id));
        return ids.length > 0;
      },
      covers: (target, ip, user) => this.covers(target, ip, user),
      onChange: (listener) =>
        state.bans.onChange((change) => {
          const b = toControlBan(change.ban);
          if (change.kind === 'banned') listener({ kind: 'banned', ban: b });
          else listener({ kind: 'unbanned', ip: b.ip, id: change.ban.id, user: b.user ?? null });
        }),
    };
  }

  /**
   * The bans an unban of `target` lifts: by id exactly; by address its
   * address or range ban and the bans of users from it; by user every ban
   * of the name's keys (everywhere and from any address); by both, the bans
   * of the user from that address.
   */
  private matching(target: BanTarget | { id: string }): Ban[] {
    const all = this.state.bans.cachedList(this.state.clock());
    if ('id' in target) return all.filter((b) => b.id === target.id);
    const address = target.ip === undefined ? undefined : target.ip.includes('/') ? (cidrText(target.ip) ?? target.ip) : normalizeIp(target.ip);
    const keys = target.user === undefined ? undefined : this.userKeys(target.user);
    return all.filter((b) => {
      const byAddress = address === undefined || b.address === address;
      const byUser = keys === undefined || (b.user !== null && keys.includes(b.user));
      if (address !== undefined && keys !== undefined) return b.kind === 'pair' && byAddress && byUser;
      return byAddress && byUser;
    });
  }

  /** Whether a session from `ip`, logged in as `user`, is one a ban of `target` stops. */
  private covers(target: BanTarget, ip: string, user: string | null): boolean {
    if (target.ip !== undefined) {
      const cidr = target.ip.includes('/') ? parseCidr(target.ip) : undefined;
      const inside = cidr === undefined ? normalizeIp(target.ip) === normalizeIp(ip) : typeof cidr !== 'string' && new AddressSet([cidr]).has(ip);
      if (!inside) return false;
    }
    if (target.user !== undefined) {
      if (user === null) return false;
      const theirs = new Set(this.userKeys(user));
      return this.userKeys(target.user).some((k) => theirs.has(k));
    }
    return true;
  }

  private makeBans(req: BanRequest, now: number): Ban[] {
    if (!Number.isFinite(req.durationMs) || req.durationMs < 1000 || req.durationMs > MAX_BAN_MS) {
      throw new MailgateError('BAN_INVALID', 'a ban lasts from 1 second to 10 years');
    }
    let address: string | null = null;
    if (req.kind === 'range') {
      const cidr = req.address === undefined ? 'missing' : parseCidr(req.address);
      if (typeof cidr === 'string') throw new MailgateError('BAN_INVALID', `not an address range: ${cidr}`);
      address = cidr.text;
    } else if (req.kind === 'address' || req.kind === 'pair') {
      const a = normalizeIp(req.address);
      if (isIP(a) === 0) throw new MailgateError('BAN_INVALID', `"${req.address ?? ''}" is not an IP address`);
      address = a;
    }
    let users: (string | null)[] = [null];
    if (req.kind === 'user' || req.kind === 'pair') {
      if (!req.user || req.user.length > MAX_USER || /[\0-\x1f\x7f]/.test(req.user)) throw new MailgateError('BAN_INVALID', 'a user ban needs a user name');
      users = this.userKeys(req.user);
    }
    return users.map((user) => ({
      id: banId(req.kind, address, user),
      kind: req.kind,
      address,
      user,
      until: now + req.durationMs,
      createdAt: now,
      reason: req.reason ?? DEFAULT_REASON,
      source: 'manual',
    }));
  }
}

/** A control target as a ban request: an address or range, a user, or a user from an address. */
function requestFor(target: BanTarget): Pick<BanRequest, 'kind' | 'address' | 'user'> {
  const { ip, user } = target;
  if (ip !== undefined && user !== undefined) {
    if (ip.includes('/')) throw new MailgateError('BAN_INVALID', 'a user is banned from one address, not from a range');
    return { kind: 'pair', address: ip, user };
  }
  if (user !== undefined) return { kind: 'user', user };
  if (ip !== undefined) return { kind: ip.includes('/') ? 'range' : 'address', address: ip };
  throw new MailgateError('BAN_INVALID', 'name an address (ip), a user, or both');
}

function cidrText(text: string): string | undefined {
  const cidr = parseCidr(text);
  return typeof cidr === 'string' ? undefined : cidr.text;
}

function toControlBan(b: Ban): ControlBan {
  return {
    id: b.id,
    kind: b.kind,
    ip: b.address,
    user: b.user,
    reason: b.kind === 'pair' ? `user ${b.user ?? ''}: ${b.reason}` : b.reason,
    createdAt: b.createdAt,
    expiresAt: b.until,
    source: b.source === 'manual' ? 'manual' : 'auto',
  };
}
