/**
 * The `discovery:` section: what mail admins otherwise write by hand so that
 * clients and other servers find the gateway (README.md, "Make clients and
 * other servers find you"). Part of the one strict schema (wired into
 * configSchema in schema.ts); what it means together with the listeners is
 * worked out by src/discovery/settings.ts, and `mail_host` defaults to the
 * gateway's host name there.
 *
 *   domains      the mail domains (what follows the @) the gateway serves
 *   autoconfig   Thunderbird autoconfig, Outlook autodiscover, Apple profile
 *   mta_sts      the RFC 8461 policy on https://mta-sts.<domain>/
 *   tls_rpt      the RFC 8460 reporting address (and the gateway's own intake)
 *   dane         TLSA records in `mailgate dns` (needs acme.reuse_key with ACME)
 *
 * A subsection is on when it is present.
 */
import { z } from 'zod';
import { duration as durationOf } from './schema-values.ts';

const duration = durationOf('1d, 7d, 30d');

/** A DNS name (lower-cased): letters, digits, hyphens, dots; no wildcard, no trailing dot. */
export const dnsName = z
  .string()
  .transform((v) => v.toLowerCase())
  .refine((v) => v.length <= 253 && /^(?=.*[a-z])[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$/.test(v), {
    message: 'not a DNS name with at least one dot (e.g. example.org)',
  });

/** An MX pattern of an MTA-STS policy: a host name, or `*.` and a name (RFC 8461 §4.1). */
const mxPattern = z
  .string()
  .transform((v) => v.toLowerCase())
  .refine((v) => /^(\*\.)?(?=.*[a-z])[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$/.test(v) && v.length <= 253, {
    message: 'not an MX host name (a name, or *. and a name)',
  });

/** A TLS-RPT destination (RFC 8460 §3): mailto: or https:, no comma, semicolon or space (they separate the TXT record's fields). */
const rua = z
  .string()
  .max(512)
  .refine((v) => /^(mailto:[^\s,;!@]+@[A-Za-z0-9.-]+|https:\/\/[A-Za-z0-9.-]+(:\d{1,5})?(\/[^\s,;!]*)?)$/.test(v), {
    message: 'a mailto: address or an https:// URL without spaces, commas or semicolons',
  });

/** Text clients show (the account's name in Thunderbird, the profile's in iOS): one printable line. */
const displayName = z.string().min(1).max(100).regex(/^[^\0-\x1f\x7f]+$/, 'one line without control characters');

/** RFC 8461 §3.2: max_age is at most 31557600 seconds. */
export const MTA_STS_MAX_AGE_MS = 31_557_600_000;

export const discoverySchema = z.strictObject({
  /** The mail domains, as in user@<domain>. */
  domains: z
    .array(dnsName)
    .min(1)
    .max(100)
    .refine((a) => new Set(a).size === a.length, { message: 'a domain is listed twice' }),
  /** The name clients and MTAs connect to: MX, SRV, autoconfig, MTA-STS mx, TLSA. Default: hostname. */
  mail_host: dnsName.optional(),
  autoconfig: z
    .strictObject({
      /** What users log in with: their whole address, or the part before the @. */
      login: z.enum(['address', 'local_part']).default('address'),
      /** The account's name in clients; default: the domain. */
      display_name: displayName.optional(),
    })
    .optional(),
  mta_sts: z
    .strictObject({
      /** testing: senders report failures but deliver; enforce: they refuse to deliver without valid TLS; none: retire the policy. */
      mode: z.enum(['testing', 'enforce', 'none']).default('testing'),
      /** How long senders cache the policy (RFC 8461: weeks are usual; at most 31557600 s). */
      max_age: duration.refine((ms) => ms >= 86_400_000 && ms <= MTA_STS_MAX_AGE_MS, 'between 1d and 365.25d').default(604_800_000),
      /** MX host names (or *.name patterns) senders may deliver to; default: mail_host. */
      mx: z.array(mxPattern).min(1).max(20).optional(),
    })
    .optional(),
  tls_rpt: z
    .strictObject({
      /** Where other MTAs send their daily TLS reports (mailto: or https:), besides the gateway itself. */
      rua: z.array(rua).max(10).default([]),
      /** The gateway takes reports itself at https://<mail_host>/.well-known/tlsrpt, counted in metrics and on the dashboard. */
      receive: z.boolean().default(true),
    })
    .optional(),
  /** Print and check TLSA records (DANE, RFC 7672) for port 25 and the implicit-TLS ports; with ACME it needs acme.reuse_key. */
  dane: z.boolean().default(false),
});

type Parsed = {
  listeners: readonly { protocol: string; tls: string; auth?: string }[];
  acme?: { reuse_key: boolean; key_rollover?: number | undefined } | undefined;
  discovery?: z.output<typeof discoverySchema> | undefined;
};

/**
 * What the discovery and key settings need from the rest of the config
 * (checked once the whole file parsed): each problem with its key path.
 */
export function discoveryProblems(c: Parsed): { path: (string | number)[]; message: string }[] {
  const out: { path: (string | number)[]; message: string }[] = [];
  if (c.acme?.key_rollover !== undefined && !c.acme.reuse_key) {
    out.push({ path: ['acme', 'key_rollover'], message: 'a key rollover is for reused keys: set acme.reuse_key: true (without it every renewal makes a new key)' });
  }
  const d = c.discovery;
  if (!d) return out;
  const https = c.listeners.some((l) => l.protocol === 'http' && l.tls === 'implicit');
  const needHttps = (path: string[], what: string) => {
    if (!https) out.push({ path, message: `${what} is served over HTTPS: add an http listener with tls: implicit (port 443)` });
  };
  if (d.autoconfig) {
    needHttps(['discovery', 'autoconfig'], 'client autoconfig');
    const tlsMail = (p: string) => c.listeners.some((l) => l.protocol === p && l.tls !== 'none');
    const submission = c.listeners.some((l) => l.protocol === 'smtp' && l.auth === 'required' && l.tls !== 'none');
    if (!tlsMail('imap') && !tlsMail('pop3')) out.push({ path: ['discovery', 'autoconfig'], message: 'no IMAP or POP3 listener with TLS (implicit or starttls) to announce' });
    if (!submission) out.push({ path: ['discovery', 'autoconfig'], message: 'no SMTP submission listener (auth: required) with TLS to announce' });
  }
  if (d.mta_sts) needHttps(['discovery', 'mta_sts'], 'the MTA-STS policy');
  if (d.tls_rpt) {
    if (d.tls_rpt.receive) needHttps(['discovery', 'tls_rpt'], 'the TLS-RPT intake');
    else if (d.tls_rpt.rua.length === 0) out.push({ path: ['discovery', 'tls_rpt', 'rua'], message: 'with receive: false, name at least one destination for the reports' });
  }
  if (d.dane && c.acme && !c.acme.reuse_key) {
    out.push({ path: ['discovery', 'dane'], message: 'DANE with ACME needs acme.reuse_key: true: a new key at every renewal would break the TLSA records' });
  }
  return out;
}

/** Legal, but probably not what the admin wants (mailgate check and the daemon's log say so). */
export function discoveryWarnings(c: Parsed): string[] {
  const d = c.discovery;
  if (!d) return [];
  const out: string[] = [];
  const mx = c.listeners.find((l) => l.protocol === 'smtp' && l.auth === 'none' && l.tls !== 'implicit');
  if (d.mta_sts && !d.mta_sts.mx && !mx) {
    out.push('discovery.mta_sts names the mail host as the MX, but no listener takes MX traffic (smtp, auth: none): add one, or list your MX hosts in discovery.mta_sts.mx');
  }
  if (d.mta_sts?.mode === 'enforce' && mx && mx.tls !== 'starttls') {
    out.push(`discovery.mta_sts is enforce but the MX listener offers no STARTTLS: senders that honour the policy will not deliver`);
  }
  return out;
}
