/**
 * The `discovery:` section worked out against the listeners: which mail
 * services the gateway really offers (only TLS-protected ones, implicit TLS
 * first, RFC 8314), the MX listener, the MTA-STS policy and its id, the
 * TLS-RPT destinations, and the extra names ACME must get. Pure: a config in,
 * data out; the endpoints (endpoints.ts), `mailgate dns` (records.ts) and the
 * ACME settings all read it from here, so they always agree.
 */
import { createHash } from 'node:crypto';
import type { Config, Listener } from '../config/load.ts';

export type ServiceKind = 'imap' | 'pop3' | 'submission';

/** One mail service a client may use: what, how TLS starts, where. */
export interface MailService {
  kind: ServiceKind;
  tls: 'implicit' | 'starttls';
  port: number;
  listener: string;
}

export interface MtaSts {
  mode: 'testing' | 'enforce' | 'none';
  maxAgeSeconds: number;
  mx: string[];
  /** The policy file (RFC 8461 §3.2), CRLF line ends. */
  policy: string;
  /** Changes exactly when the policy text changes (a hash of it). */
  id: string;
}

export interface TlsRpt {
  /** Every destination in the TXT record, the gateway's own first when it receives. */
  rua: string[];
  /** The gateway's own intake URL (https://<mail_host>/.well-known/tlsrpt), when it receives reports. */
  receiveUrl: string | undefined;
}

export interface DiscoverySettings {
  domains: string[];
  mailHost: string;
  /** TLS-protected mail services, implicit TLS first, IMAP before POP3. */
  services: MailService[];
  /** An SMTP listener without auth (the MX), with whether it offers STARTTLS. */
  mx: { listener: string; port: number; starttls: boolean } | undefined;
  /** The first https listener's port, when there is one. */
  httpsPort: number | undefined;
  autoconfig: { login: 'address' | 'local_part'; displayName: (domain: string) => string } | undefined;
  mtaSts: MtaSts | undefined;
  tlsRpt: TlsRpt | undefined;
  dane: boolean;
}

/** Where the gateway takes TLS reports (a path of its own: no standard one exists for https rua). */
export const TLSRPT_PATH = '/.well-known/tlsrpt';

export function discoverySettings(config: Config): DiscoverySettings | undefined {
  const d = config.discovery;
  if (!d) return undefined;
  const mailHost = (d.mail_host ?? config.hostname).toLowerCase();
  const https = config.listeners.find((l) => l.protocol === 'http' && l.tls === 'implicit');
  const mxListener = config.listeners.find((l): l is Listener & { protocol: 'smtp' } => l.protocol === 'smtp' && l.auth === 'none' && l.tls !== 'implicit');
  let mtaSts: MtaSts | undefined;
  if (d.mta_sts) {
    const maxAgeSeconds = Math.floor(d.mta_sts.max_age / 1000);
    const mx = d.mta_sts.mx ? [...d.mta_sts.mx] : [mailHost];
    const policy = mtaStsPolicy(d.mta_sts.mode, mx, maxAgeSeconds);
    mtaSts = { mode: d.mta_sts.mode, maxAgeSeconds, mx, policy, id: mtaStsId(policy) };
  }
  let tlsRpt: TlsRpt | undefined;
  if (d.tls_rpt) {
    const receiveUrl = d.tls_rpt.receive ? `https://${mailHost}${https && portOf(https) !== 443 ? `:${portOf(https)}` : ''}${TLSRPT_PATH}` : undefined;
    tlsRpt = { rua: [...(receiveUrl ? [receiveUrl] : []), ...d.tls_rpt.rua], receiveUrl };
  }
  const autoconfig = d.autoconfig;
  return {
    domains: [...d.domains],
    mailHost,
    services: mailServices(config.listeners),
    mx: mxListener ? { listener: mxListener.name, port: portOf(mxListener), starttls: mxListener.tls === 'starttls' } : undefined,
    httpsPort: https ? portOf(https) : undefined,
    autoconfig: autoconfig ? { login: autoconfig.login, displayName: (domain) => autoconfig.display_name ?? domain } : undefined,
    mtaSts,
    tlsRpt,
    dane: d.dane,
  };
}

/** What the listeners offer clients: TLS-protected IMAP, POP3 and submission, implicit TLS before STARTTLS (RFC 8314 §5.1). */
export function mailServices(listeners: readonly Listener[]): MailService[] {
  const out: MailService[] = [];
  for (const l of listeners) {
    if (l.tls === 'none') continue;
    const kind: ServiceKind | undefined = l.protocol === 'imap' ? 'imap' : l.protocol === 'pop3' ? 'pop3' : l.protocol === 'smtp' && l.auth === 'required' ? 'submission' : undefined;
    if (!kind) continue;
    for (const port of new Set(l.listen.map((a) => a.port))) out.push({ kind, tls: l.tls, port, listener: l.name });
  }
  const kindOrder: Record<ServiceKind, number> = { imap: 0, pop3: 1, submission: 2 };
  return out.sort((a, b) => kindOrder[a.kind] - kindOrder[b.kind] || (a.tls === b.tls ? 0 : a.tls === 'implicit' ? -1 : 1));
}

/** The names ACME must get for the features that are on: the mail host, autoconfig./autodiscover. and mta-sts. per domain. */
export function discoveryNames(config: Config): string[] {
  const s = discoverySettings(config);
  if (!s) return [];
  const names = [s.mailHost];
  for (const domain of s.domains) {
    if (s.autoconfig) names.push(`autoconfig.${domain}`, `autodiscover.${domain}`);
    if (s.mtaSts) names.push(`mta-sts.${domain}`);
  }
  return names;
}

/** RFC 8461 §3.2: "key: value" lines, CRLF. */
export function mtaStsPolicy(mode: MtaSts['mode'], mx: readonly string[], maxAgeSeconds: number): string {
  return ['version: STSv1', `mode: ${mode}`, ...mx.map((m) => `mx: ${m}`), `max_age: ${maxAgeSeconds}`, ''].join('\r\n');
}

/** RFC 8461 §3.1: 1-32 letters or digits; here the first 32 hex digits of the policy's SHA-256, so it changes exactly when the policy does. */
export function mtaStsId(policy: string): string {
  return createHash('sha256').update(policy, 'utf8').digest('hex').slice(0, 32);
}

function portOf(l: Listener): number {
  return l.listen[0]?.port ?? 0;
}

/** For `mailgate check`: what the discovery features will announce. */
export function discoverySummary(config: Config): string[] {
  const s = discoverySettings(config);
  if (!s) return [];
  const on = [
    s.autoconfig ? `autoconfig (login ${s.autoconfig.login === 'address' ? 'user@domain' : 'local part'})` : '',
    s.mtaSts ? `MTA-STS ${s.mtaSts.mode} (id ${s.mtaSts.id}, mx ${s.mtaSts.mx.join(' ')})` : '',
    s.tlsRpt ? `TLS-RPT to ${s.tlsRpt.rua.join(', ')}` : '',
    s.dane ? 'DANE' : '',
  ].filter(Boolean);
  const services = s.services.map((x) => `${x.kind} ${x.port}${x.tls === 'starttls' ? ' starttls' : ''}`).join(', ');
  return [
    `discovery: ${s.domains.join(', ')} on ${s.mailHost}: ${on.join('; ') || 'records only'}`,
    `  announced: ${services || 'no mail service'}${s.mx ? `; MX listener "${s.mx.listener}"${s.mx.starttls ? ' with STARTTLS' : ' without STARTTLS'}` : '; no MX listener'}`,
  ];
}
