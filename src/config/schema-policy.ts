/**
 * The policy part of the one config schema: access rules, local users,
 * per-user routes, rate limits, brute-force protection and where counters
 * and bans live. schema.ts spreads `policySections` into the top level and
 * the listener shapes below into the mail listeners.
 */
import { z } from 'zod';
import { parseHash } from '../core/password-hash.ts';
import { DEFAULT_USERNAME_FORMAT, MAX_USERNAME_FORMAT_LENGTH, MAX_USERNAME_FORMATS, parseUsernameFormat } from '../core/username-format.ts';
import { backendOrPool, cidr, duration as durationOf, hostPort, positiveInt } from './schema-values.ts';

const duration = durationOf('30s, 15m, 1h');

/** Windows and bans are kept by the rate-limit library in whole seconds. */
const window = duration.refine((ms) => ms >= 1000 && ms % 1000 === 0, 'use a whole number of seconds, at least 1s');

/** Validated here, kept as text (the config is frozen; users.ts parses it). */
const passwordHash = z.string().superRefine((v, ctx) => {
  const r = parseHash(v);
  if (typeof r === 'string') ctx.addIssue({ code: 'custom', message: r });
});

const name = z.string().regex(/^[A-Za-z0-9_.-]{1,64}$/, 'use 1-64 letters, digits, "_", "." or "-"');
/** A login name or a glob ("*@example.org"); never a control character. */
const userPattern = z.string().min(1).max(320).regex(/^[^\0-\x1f\x7f]+$/, 'no control characters');
const userName = z.string().min(1).max(320).regex(/^[^\0-\x20\x7f*?]+$/, 'no spaces, control characters, "*" or "?"');
const domain = z.string().regex(/^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$/, 'not a domain name');
const hostName = z.string().regex(/^[A-Za-z0-9.:-]{1,253}$/, 'not a host name or address');
const protocol = z.enum(['imap', 'pop3', 'smtp', 'http']);
const action = z.enum(['allow', 'deny', 'tempfail']);
/** Text the client may see: one short line. */
const reason = z.string().min(1).max(200).regex(/^[\x20-\x7e]+$/, 'printable ASCII on one line');

// ---- access rules -----------------------------------------------------------

export const accessRuleSchema = z.strictObject({
  action,
  /** Shown to the client with a deny or tempfail (a fixed text is used otherwise). */
  reason: reason.optional(),
  listeners: z.array(name).min(1).optional(),
  protocols: z.array(protocol).min(1).optional(),
  addresses: z.array(cidr).min(1).max(100_000).optional(),
  users: z.array(userPattern).min(1).optional(),
  groups: z.array(name).min(1).optional(),
  tls: z.boolean().optional(),
  authenticated: z.boolean().optional(),
});

const accessSchema = z
  .strictObject({
    /** What happens when no rule matches. */
    default: action.default('allow'),
    rules: z.array(accessRuleSchema).max(10_000).default([]),
  })
  .prefault({});

// ---- local users --------------------------------------------------------------

export const userEntrySchema = z
  .strictObject({
    name: userName,
    /** From `mailgate hash-password` (scrypt) or an existing bcrypt hash. */
    password_hash: passwordHash.optional(),
    /** Refused with a helpful message: only hashes belong in the config. */
    password: z.unknown().optional(),
    groups: z.array(name).default([]),
  })
  .superRefine((u, ctx) => {
    if (u.password !== undefined) {
      ctx.addIssue({
        code: 'custom',
        path: ['password'],
        message: 'plaintext passwords are not accepted: replace it with password_hash (run `mailgate hash-password`)',
      });
    } else if (u.password_hash === undefined) {
      ctx.addIssue({ code: 'custom', path: ['password_hash'], message: 'is required (run `mailgate hash-password` to make one)' });
    }
  })
  .transform(({ password: _password, password_hash, ...u }) => ({ ...u, password_hash: password_hash ?? '' }));

function noDuplicateUsers(list: readonly { name: string }[], ctx: z.RefinementCtx, at: (i: number) => (string | number)[]): void {
  const seen = new Set<string>();
  list.forEach((u, i) => {
    const key = u.name.toLowerCase();
    if (seen.has(key)) ctx.addIssue({ code: 'custom', path: [...at(i), 'name'], message: `user "${u.name}" is defined twice` });
    seen.add(key);
  });
}

/** A separate users file is a YAML list of the same entries as `users.list`. */
export const usersFileSchema = z.array(userEntrySchema).max(100_000).superRefine((list, ctx) => noDuplicateUsers(list, ctx, (i) => [i]));

const usersSchema = z
  .strictObject({
    /** More users in a separate file (relative to this config file), re-read on reload. */
    file: z.string().min(1).optional(),
    list: z.array(userEntrySchema).max(100_000).default([]),
    /** Group membership by name or glob, also for users the backend authenticates (passthrough). */
    groups: z.record(name, z.array(userPattern).max(100_000)).default({}),
  })
  .superRefine((u, ctx) => noDuplicateUsers(u.list, ctx, (i) => ['list', i]))
  .prefault({});

// ---- backend login and routes ---------------------------------------------------

const masterLogin = z.strictObject({
  /** The backend login name; "{user}" is replaced by the client's login (Dovecot master users: "{user}*mailgate"). */
  user: z.string().min(1).max(320).regex(/^[^\0-\x20\x7f]+$/, 'no spaces or control characters'),
  /** A file holding the backend password (first line), read at start and reload; keep it mode 0600. */
  password_file: z.string().min(1),
});

const backendLoginMessage = 'use replay, none (SMTP only) or { user, password_file }';
/** After a local login, how mailgate logs in on the backend. */
export const backendLoginSchema = z.union([z.enum(['replay', 'none']), masterLogin], { error: backendLoginMessage });
const backendLoginNoNone = z.union([z.literal('replay'), masterLogin], { error: 'use replay or { user, password_file } (none works for SMTP only)' });

export const routeSchema = z
  .strictObject({
    users: z.array(userPattern).min(1).optional(),
    groups: z.array(name).min(1).optional(),
    domains: z.array(domain).min(1).optional(),
    listeners: z.array(name).min(1).optional(),
    protocols: z.array(protocol.exclude(['http'])).min(1).optional(),
    /** The backend host; each listener keeps its backend port. */
    host: hostName.optional(),
    /** An exact backend host:port, or a pool of them (usually with `listeners` or `protocols`). */
    backend: backendOrPool.optional(),
    backend_login: backendLoginSchema.optional(),
  })
  .superRefine((r, ctx) => {
    if ((r.host === undefined) === (r.backend === undefined)) ctx.addIssue({ code: 'custom', message: 'give either host or backend' });
    if (!r.users && !r.groups && !r.domains) ctx.addIssue({ code: 'custom', message: 'a route needs users, groups or domains' });
    if (r.backend_login === 'none' && (r.protocols === undefined || r.protocols.some((p) => p !== 'smtp'))) {
      ctx.addIssue({ code: 'custom', path: ['backend_login'], message: 'backend_login: none works for SMTP only; add protocols: [smtp]' });
    }
  });

// ---- rate limits and brute force -----------------------------------------------

const LIMIT_KEYS = {
  connections: ['address', 'listener'],
  concurrent: ['address', 'user'],
  messages: ['user', 'address'],
  recipients: ['user', 'address'],
  http_requests: ['address', 'listener'],
} as const;

export const rateLimitSchema = z
  .strictObject({
    /** What is counted: new connections, sessions open at once, SMTP messages or recipients, HTTP requests. */
    limit: z.enum(['connections', 'concurrent', 'messages', 'recipients', 'http_requests']),
    /** Counted for each client address, each user or each listener. */
    per: z.enum(['address', 'user', 'listener']),
    max: positiveInt.max(1_000_000_000),
    /** The counting window (not for `concurrent`). */
    window: window.optional(),
    listeners: z.array(name).min(1).optional(),
    protocols: z.array(protocol).min(1).optional(),
    /** Client addresses this limit neither counts nor refuses (a monitoring host, a scanner of one's own). */
    exempt: z.array(cidr).max(10_000).default([]),
  })
  .superRefine((l, ctx) => {
    const keys: readonly string[] = LIMIT_KEYS[l.limit];
    if (!keys.includes(l.per)) ctx.addIssue({ code: 'custom', path: ['per'], message: `${l.limit} can be counted per ${keys.join(' or ')}` });
    if (l.limit === 'concurrent' && l.window !== undefined) ctx.addIssue({ code: 'custom', path: ['window'], message: 'concurrent sessions have no window' });
    if (l.limit !== 'concurrent' && l.window === undefined) ctx.addIssue({ code: 'custom', path: ['window'], message: 'is required' });
  });

const threshold = (failures: number, windowMs: number, banMs: number) =>
  z
    .strictObject({
      /** Failed logins within `window` that trigger the ban. */
      failures: positiveInt.max(1_000_000).default(failures),
      window: window.default(windowMs),
      ban: window.default(banMs),
    })
    .prefault({});

const bruteForceSchema = z
  .strictObject({
    enabled: z.boolean().default(true),
    /** Failures from one address, any user: the address is refused everywhere (before the greeting). */
    per_address: threshold(10, 900_000, 3_600_000),
    /** Failures for one user from one address: that user is refused from that address. */
    per_address_user: threshold(5, 900_000, 900_000),
    /** Failures for one user from anywhere: the user is refused from addresses that failed for it, never from a clean one. */
    per_user: threshold(30, 3_600_000, 3_600_000),
    /** Never counted or banned (monitoring, the office network). */
    exempt: z.array(cidr).max(10_000).default([]),
  })
  .prefault({});

/** One format: printable ASCII, checked by the same parser that applies it. */
const usernameFormat = z
  .string()
  .min(1)
  .max(MAX_USERNAME_FORMAT_LENGTH)
  .regex(/^[\x21-\x7e]+$/, 'printable ASCII without spaces')
  .superRefine((f, ctx) => {
    const r = parseUsernameFormat(f);
    if (typeof r === 'string') ctx.addIssue({ code: 'custom', message: r });
  });

/**
 * How the backends turn a login name into an account, as Dovecot's
 * auth_username_format: one format or a list. A login is counted and banned
 * under every format's key; per-user limits count under the first.
 */
const usernameFormatSchema = z
  .preprocess((v) => (typeof v === 'string' ? [v] : v), z.array(usernameFormat).min(1).max(MAX_USERNAME_FORMATS))
  .default([...DEFAULT_USERNAME_FORMAT]);

const policyStoreSchema = z
  .strictObject({
    type: z.enum(['memory', 'redis']).default('memory'),
    /** redis://[user:password@]host:port[/db] or rediss:// for TLS. */
    url: z.string().regex(/^rediss?:\/\/\S+$/, 'a redis:// or rediss:// URL').optional(),
    /** Key prefix, so that several gateway groups can share one Redis. */
    prefix: z.string().regex(/^[A-Za-z0-9_.:-]{1,64}$/).default('mailgate'),
    /** Redis command deadline; a slow Redis falls back to this gateway's memory. */
    timeout: duration.default(1000),
    /**
     * Memory store (and the memory Redis falls back to): the most keys one
     * counter, the ban list and the attempts in flight each keep; past it the
     * oldest go first. Bounds the memory a flood of addresses or names can take.
     */
    max_keys: positiveInt.min(100).max(10_000_000).default(100_000),
  })
  .superRefine((s, ctx) => {
    if (s.type === 'redis' && s.url === undefined) ctx.addIssue({ code: 'custom', path: ['url'], message: 'is required for type: redis' });
  })
  .prefault({});

/** Top-level sections, spread into configSchema. */
export const policySections = {
  access: accessSchema,
  users: usersSchema,
  routes: z.array(routeSchema).max(10_000).default([]),
  rate_limits: z.array(rateLimitSchema).max(1_000).default([]),
  brute_force: bruteForceSchema,
  username_format: usernameFormatSchema,
  policy_store: policyStoreSchema,
};

/**
 * Keys for IMAP and POP3 listeners. Optional in the parsed type (absent means
 * passthrough and replay), so listeners built in code need not name them.
 */
export const mailListenerPolicy = {
  /** passthrough: the backend checks passwords; local: mailgate does, from `users`; http: the `auth_http` service does (nginx's protocol). */
  authentication: z.enum(['passthrough', 'local', 'http']).optional(),
  /** After a local login: replay the client's credentials (default), or log in as a configured (master) user. */
  backend_login: backendLoginNoNone.optional(),
};

/** Keys for SMTP listeners: `backend_login: none` suits a relay that trusts the gateway's address. */
export const smtpListenerPolicy = {
  authentication: mailListenerPolicy.authentication,
  backend_login: backendLoginSchema.optional(),
};

export type AccessRule = z.output<typeof accessRuleSchema>;
export type UserEntry = z.output<typeof userEntrySchema>;
export type Route = z.output<typeof routeSchema>;
export type RateLimit = z.output<typeof rateLimitSchema>;
export type BackendLogin = z.output<typeof backendLoginSchema>;
export type PolicySections = { [K in keyof typeof policySections]: z.output<(typeof policySections)[K]> };
