/**
 * The `acme:` section: automatic certificates from an ACME CA (Let's Encrypt
 * by default). Part of the one strict schema (wired into configSchema in
 * schema.ts); paths here are resolved against the config file's folder by
 * src/acme/settings.ts, and `names` defaults to the gateway's host name there.
 */
import { z } from 'zod';
import { duration as durationOf } from './schema-values.ts';

const duration = durationOf();

/** Directory URLs the admin may name by a short word. */
export const ACME_DIRECTORIES = {
  letsencrypt: 'https://acme-v02.api.letsencrypt.org/directory',
  'letsencrypt-staging': 'https://acme-staging-v02.api.letsencrypt.org/directory',
} as const;

export const ACME_KEY_TYPES = ['ecdsa-p256', 'ecdsa-p384', 'rsa-2048', 'rsa-3072', 'rsa-4096'] as const;

export const DEFAULT_ACME_RENEW = {
  /** Look at every certificate at least this often (ARI is polled on this rhythm when the CA sends no Retry-After). */
  check_interval: 6 * 3_600_000,
  /** First wait after a failed order; doubles per failure, with jitter. */
  retry_min: 60_000,
  /** Longest wait between failed orders (also bounded by a tenth of the certificate's lifetime). */
  retry_max: 6 * 3_600_000,
  /** How long one gateway waits for another that holds the ordering lock for a name (file or Redis lock, see `lock`). */
  lock_wait: 10 * 60_000,
};


/** A DNS name a public CA can validate: no wildcard (that needs DNS-01), no IP address, no trailing dot. */
const dnsName = z
  .string()
  .transform((v) => v.toLowerCase())
  .refine((v) => v.length <= 253 && /^(?=.*[a-z])[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$/.test(v), {
    message: 'not a DNS host name (wildcards need DNS-01, which mailgate does not do; IP addresses are not supported)',
  });

const directory = z
  .string()
  .min(1)
  .transform((v, ctx) => {
    if (v in ACME_DIRECTORIES) return ACME_DIRECTORIES[v as keyof typeof ACME_DIRECTORIES];
    let url: URL;
    try {
      url = new URL(v);
    } catch {
      ctx.addIssue({ code: 'custom', message: `"${v}" is neither an https URL nor one of ${Object.keys(ACME_DIRECTORIES).join(', ')}` });
      return z.NEVER;
    }
    if (url.protocol !== 'https:') {
      ctx.addIssue({ code: 'custom', message: 'an ACME directory is always an https URL' });
      return z.NEVER;
    }
    return url.toString();
  });

export const acmeSchema = z.strictObject({
  /** The CA's directory URL, or `letsencrypt` / `letsencrypt-staging`. */
  directory: directory.default(ACME_DIRECTORIES.letsencrypt),
  /** Contact address given to the CA (optional: Let's Encrypt no longer sends expiry mail). */
  email: z.email().optional(),
  /** You agree to the CA's terms of service (Let's Encrypt: the Subscriber Agreement). */
  accept_terms: z.literal(true, { error: 'set accept_terms: true to agree to the CA\'s terms of service (required by ACME)' }),
  /** Host names to obtain certificates for, one certificate per name. Default: the gateway's hostname. */
  names: z
    .array(dnsName)
    .min(1)
    .refine((a) => new Set(a).size === a.length, { message: 'a name is listed twice' })
    .optional(),
  /** tls-alpn-01: the CA connects to port 443 (an https listener); http-01: to port 80 (a plain http listener). */
  challenge: z.enum(['tls-alpn-01', 'http-01']).default('tls-alpn-01'),
  /** Extra CA certificates (PEM) to trust for the ACME server's own HTTPS, e.g. a private CA or Pebble. */
  ca_bundle: z.string().min(1).optional(),
  /** Certificate profile asked for with each order (Let's Encrypt: classic, tlsserver, shortlived). */
  profile: z.string().regex(/^[A-Za-z0-9_.-]{1,64}$/, 'not a profile name').optional(),
  /** Key type of the certificates (the account key is always ECDSA P-256). */
  key_type: z.enum(ACME_KEY_TYPES).default('ecdsa-p256'),
  /**
   * Keep each name's key across renewals (a `3 1 1` TLSA record then stays
   * valid: DANE). Without it every renewal makes a new key.
   */
  reuse_key: z.boolean().default(false),
  /**
   * With reuse_key: how old a key may get. One renewal before that, the next
   * key is made and its TLSA record listed beside the current one (mailgate
   * dns, mailgate certs); the renewal after uses it. Unset: keys are kept.
   */
  key_rollover: duration.refine((ms) => ms >= 1000, 'at least 1s').optional(),
  /** Folder for the account key and obtained certificates. Default: tls.dir. Relative to the config file. */
  storage: z.string().min(1).optional(),
  /**
   * The lock that keeps gateways sharing a store from ordering a name at once:
   * `auto` uses the policy store's Redis when policy_store.type is redis, the
   * file lock in storage otherwise; `redis` insists on Redis (policy_store must
   * be redis); `file` always uses the file lock. An unreachable Redis falls
   * back to the file lock, with a warning.
   */
  lock: z.enum(['auto', 'file', 'redis']).default('auto'),
  renew: z
    .strictObject({
      check_interval: duration.refine((ms) => ms >= 1000, 'at least 1s'),
      retry_min: duration.refine((ms) => ms >= 100, 'at least 100ms'),
      retry_max: duration.refine((ms) => ms >= 1000, 'at least 1s'),
      lock_wait: duration,
    })
    .partial()
    .default({}),
  /** Deadline for one HTTP request to the CA. */
  request_timeout: duration.default(30_000),
});

