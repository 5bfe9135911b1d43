/**
 * The one schema for mailgate's YAML configuration. Every key is validated
 * strictly (unknown keys are errors) and every default lives here, so the rest
 * of the program reads a complete, typed, frozen object.
 */
import { z } from 'zod';
import { acmeSchema } from './schema-acme.ts';
import { discoverySchema } from './schema-discovery.ts';
import { authHttpSchema } from './schema-auth-http.ts';
import { mailListenerPolicy, policySections, smtpListenerPolicy } from './schema-policy.ts';
import { backendOrPool, cidr, duration as durationOf, hostPort, positiveInt } from './schema-values.ts';

const duration = durationOf();

const timeoutsShape = {
  tls_handshake: duration,
  preauth_idle: duration,
  preauth_total: duration,
  backend_connect: duration,
  login_replay: duration,
  postauth_idle: duration,
  proxy_header: duration,
};
const limitsShape = {
  max_line: positiveInt.min(512).max(1_048_576),
  max_preauth_commands: positiveInt.max(10_000),
  max_literal: positiveInt.max(1_048_576),
  max_sasl: positiveInt.max(1_048_576),
  max_auth_attempts: positiveInt.max(100),
  max_connections: positiveInt,
};

export const DEFAULT_TIMEOUTS = {
  tls_handshake: 10_000,
  preauth_idle: 60_000,
  preauth_total: 300_000,
  backend_connect: 5_000,
  login_replay: 20_000,
  postauth_idle: 1_800_000,
  proxy_header: 5_000,
};
export const DEFAULT_LIMITS = {
  max_line: 8192,
  max_preauth_commands: 50,
  max_literal: 8192,
  max_sasl: 8192,
  max_auth_attempts: 3,
  max_connections: 10_000,
};

const timeouts = z.strictObject(timeoutsShape).partial();

/** Default interval of a pool's active checks. */
export const DEFAULT_HEALTH_INTERVAL = 10_000;

/**
 * Active checks of a pool's members (mail listeners whose backend is a
 * list, and routes with a list). Optional in the parsed type (absent: the
 * default interval), so listeners built in code need not name it.
 */
const healthCheck = z
  .strictObject({
    /** How often each member is checked: connect, then the protocol's greeting (within backend_connect). */
    interval: duration.refine((ms) => ms >= 500 && ms <= 3_600_000, 'between 500ms and 1h').default(DEFAULT_HEALTH_INTERVAL),
  })
  .optional();
const limits = z.strictObject(limitsShape).partial();

/** One address or a list; written as one string in the common case. */
const listen = z.preprocess((v) => (typeof v === 'string' ? [v] : v), z.array(hostPort).min(1));

const listenerBase = {
  name: z.string().regex(/^[A-Za-z0-9_.-]{1,64}$/, 'use 1-64 letters, digits, "_", "." or "-"'),
  listen,
  backend: hostPort,
  proxy_protocol: z.union([z.literal(false), z.literal('v1'), z.literal('v2')]).default(false),
  /**
   * Load balancers (HAProxy send-proxy / send-proxy-v2) allowed to connect:
   * every connection must come from one of these and begin with a PROXY v1
   * or v2 header naming the client. Absent or empty (the default): no PROXY
   * header is read. Optional in the parsed type, so listeners built in code need not name it.
   */
  accept_proxy_from: z.array(cidr).max(1000).optional(),
  timeouts: timeouts.default({}),
  limits: limits.default({}),
};

/** Mail listeners may name a pool of backends. */
const mailBase = {
  ...listenerBase,
  backend: backendOrPool,
  health_check: healthCheck,
};

const imapListener = z.strictObject({
  ...mailBase,
  protocol: z.literal('imap'),
  tls: z.enum(['implicit', 'starttls', 'none']),
  ...mailListenerPolicy,
  /** Send IMAP ID with x-originating-ip etc. before replaying the login (Dovecot honours it from login_trusted_networks). */
  imap_id: z.boolean().default(true),
  /** On a starttls/none listener, refuse LOGIN/AUTHENTICATE until TLS is up (advertises LOGINDISABLED). */
  require_tls: z.boolean().default(true),
});

const pop3Listener = z.strictObject({
  ...mailBase,
  protocol: z.literal('pop3'),
  tls: z.enum(['implicit', 'starttls', 'none']),
  ...mailListenerPolicy,
  require_tls: z.boolean().default(true),
});

const smtpListener = z.strictObject({
  ...mailBase,
  protocol: z.literal('smtp'),
  tls: z.enum(['implicit', 'starttls', 'none']),
  ...smtpListenerPolicy,
  /** Submission listeners require AUTH before MAIL; an MX listener (auth: none) forwards the session as is. */
  auth: z.enum(['required', 'none']).default('required'),
  /**
   * Wait this long before the greeting (postscreen's pregreet test): a client
   * that talks first is a spam engine and is refused with 554. Useful on MX
   * listeners; 0 (the default) greets at once.
   */
  greet_delay: duration.default(0),
  /** Tell the backend the client's address and login with XCLIENT, when the backend offers it. */
  xclient: z.boolean().default(true),
  require_tls: z.boolean().default(true),
});

const httpListener = z.strictObject({
  ...listenerBase,
  protocol: z.literal('http'),
  tls: z.enum(['implicit', 'none']),
  /** A plain listener that only answers with a redirect to https (and serves ACME HTTP-01 when configured). */
  redirect_https: z.boolean().default(false),
  /** Strict-Transport-Security max-age in seconds; 0 sends none. */
  hsts: z.number().int().min(0).max(63_072_000).default(0),
  /**
   * Keep (and extend) the X-Forwarded-* headers only from clients at these
   * addresses: the proxies in front of the gateway. Empty (the default) or
   * false: they are replaced. `true`, which once trusted every client, is
   * refused with a message saying what to write instead.
   */
  trust_forwarded: z
    .preprocess((v, ctx) => {
      if (v === false) return [];
      if (v === true) {
        ctx.addIssue({
          code: 'custom',
          message:
            'true is no longer accepted: it let any client set the X-Forwarded-* headers the backend sees; ' +
            'list the proxies in front of the gateway instead, e.g. trust_forwarded: [192.0.2.10/32] (false or [] trusts none)',
        });
        return [];
      }
      return v;
    }, z.array(cidr).max(1000))
    .default([]),
  /** Offer HTTP/2 (ALPN h2) to clients of a TLS listener; HTTP/1.1 stays the fallback. The backend is always HTTP/1.1. */
  http2: z.boolean().default(true),
  /** Concurrent HTTP/2 streams per client connection (SETTINGS_MAX_CONCURRENT_STREAMS). */
  http2_max_streams: z.number().int().min(1).max(1000).default(100),
  /**
   * How long the backend may take to begin its response (status line and
   * headers) before the client gets 504, like nginx's proxy_read_timeout.
   * postauth_idle bounds it too, when shorter.
   */
  response_timeout: duration.refine((ms) => ms >= 100, 'at least 100ms').default(60_000),
});

export const listenerSchema = z.discriminatedUnion('protocol', [imapListener, pop3Listener, smtpListener, httpListener]);

const certificate = z.strictObject({
  cert: z.string().min(1),
  key: z.string().min(1),
});

/**
 * A file mode: 0o660 in YAML, or a string "0660" / "660". A bare 0660 is the
 * decimal number 660 in YAML 1.2, which is out of range and refused here.
 */
const fileMode = z.union([z.number(), z.string()]).transform((v, ctx) => {
  const n = typeof v === 'number' ? v : /^(?:0o?)?[0-7]{3}$/.test(v) ? parseInt(v.replace(/^0o?/, ''), 8) : NaN;
  if (!Number.isInteger(n) || n < 0 || n > 0o777) {
    ctx.addIssue({ code: 'custom', message: `"${v}" is not a file mode: write 0o660 or "0660" (a bare 0660 is the decimal number 660 in YAML)` });
    return z.NEVER;
  }
  return n;
});

/** The local control socket (`mailgate top`, `reload`, `status`, `certs`); see README.md "Dashboard, control socket and metrics". */
const controlSection = z.strictObject({
  enabled: z.boolean().default(true),
  /** Relative to the config file; a packaged install sets /run/mailgate/control.sock. */
  socket: z.string().min(1).default('../run/mailgate.sock'),
  mode: fileMode.default(0o660),
  /** Group that may use the socket (with mode 0660); a name from /etc/group or a numeric gid. */
  group: z.string().regex(/^(?:[A-Za-z_][A-Za-z0-9_.-]{0,31}|\d{1,10})$/, 'a group name or a numeric gid').optional(),
});

/** Prometheus text-format metrics over HTTP; off unless `listen` is set. */
const metricsSection = z.strictObject({
  listen: hostPort.optional(),
});

export const configSchema = z
  .strictObject({
    /** Name used in greetings and as the self-signed certificate's subject. */
    hostname: z.string().regex(/^[A-Za-z0-9.-]{1,253}$/, 'not a host name').optional(),
    /**
     * Worker processes serving clients: "auto" is one per core
     * (os.availableParallelism()); 1 runs everything in one process.
     * Read at start only (src/cluster).
     */
    workers: z.union([z.literal('auto'), z.number().int().min(1).max(64)]).default('auto'),
    /**
     * A worker that does not answer the primary's heartbeat for this long is
     * killed and replaced: a worker whose event loop is stuck still holds its
     * share of every listening port, so its clients would hang otherwise.
     */
    worker_timeout: duration.refine((ms) => ms >= 1000, 'at least 1s').default(30_000),
    log: z.strictObject({ level: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace']).default('info') }).default({ level: 'info' }),
    tls: z
      .strictObject({
        min_version: z.enum(['TLSv1.2', 'TLSv1.3']).default('TLSv1.2'),
        /** Certificate files; the first is the default for clients without a matching SNI name. */
        certificates: z.array(certificate).default([]),
        /** Folder for generated (self-signed) and obtained certificates. Relative to the config file. */
        dir: z.string().min(1).default('../certs'),
      })
      .default({ min_version: 'TLSv1.2', certificates: [], dir: '../certs' }),
    timeouts: timeouts.extend({ shutdown_drain: duration }).partial().default({}),
    limits: limits.default({}),
    listeners: z.array(listenerSchema).min(1),
    /** Automatic certificates (ACME, Let's Encrypt): see src/config/schema-acme.ts and README.md "Certificates". */
    acme: acmeSchema.optional(),
    /** Client autoconfig, MTA-STS, TLS-RPT, DANE and the DNS records: see src/config/schema-discovery.ts. */
    discovery: discoverySchema.optional(),
    control: controlSection.default({ enabled: true, socket: '../run/mailgate.sock', mode: 0o660 }),
    metrics: metricsSection.default({}),
    /** The nginx-style auth service for `authentication: http` listeners: see src/config/schema-auth-http.ts. */
    auth_http: authHttpSchema.optional(),
    /** Access rules, local users, routes, rate limits, brute force, policy store: see src/config/schema-policy.ts. */
    ...policySections,
  });

export type ParsedConfig = z.output<typeof configSchema>;
export type ListenerConfig = z.output<typeof listenerSchema>;
export type Timeouts = typeof DEFAULT_TIMEOUTS;
export type Limits = typeof DEFAULT_LIMITS;
export type Protocol = ListenerConfig['protocol'];
