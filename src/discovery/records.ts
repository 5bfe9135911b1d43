/**
 * Every DNS record an admin publishes so that clients and other servers
 * find the gateway, derived from the discovery settings and the keys it
 * serves: `mailgate dns` prints them in zone-file form, `--check` compares
 * them with what a resolver answers (check.ts).
 *
 *   MX      <domain> → mail_host, when an MX listener (smtp, auth: none) runs
 *   SRV     RFC 6186/8314 for imap(s), pop3(s), submission(s): the services
 *           the listeners offer (implicit TLS at priority 0, STARTTLS at 10),
 *           "." for those they do not
 *   CNAME   autoconfig., autodiscover. (autoconfig on), mta-sts. (MTA-STS on)
 *   TXT     _mta-sts (v=STSv1; id=<policy id>), _smtp._tls (v=TLSRPTv1; rua=…)
 *   TLSA    3 1 1 for port 25 (MX with STARTTLS) and the implicit-TLS ports,
 *           for the key served now and, during a rollover, the next one
 */
import type { DiscoverySettings, ServiceKind } from './settings.ts';

export const DEFAULT_TTL = 3600;

export type DnsRecord =
  | { type: 'MX'; name: string; priority: number; exchange: string }
  | { type: 'SRV'; name: string; priority: number; weight: number; port: number; target: string }
  | { type: 'CNAME'; name: string; target: string }
  /** `tag` names the record among the name's TXT records (v=STSv1, v=TLSRPTv1): only those are compared. */
  | { type: 'TXT'; name: string; text: string; tag: string }
  | { type: 'TLSA'; name: string; usage: 3; selector: 1; matching: 1; data: string };

/** Records under a heading (zone-file comments). */
export interface RecordGroup {
  heading: string[];
  records: DnsRecord[];
}

/** The keys the mail host's certificate has, as SHA-256 of the SubjectPublicKeyInfo (hex): now, and next during a rollover. */
export interface KeyPins {
  current: string | undefined;
  next?: { data: string; note: string } | undefined;
  /** Why no TLSA can be printed (no certificate yet), when current is undefined. */
  missing?: string;
}

const SRV_NAMES: Record<ServiceKind, { implicit: string; starttls: string }> = {
  imap: { implicit: '_imaps', starttls: '_imap' },
  pop3: { implicit: '_pop3s', starttls: '_pop3' },
  submission: { implicit: '_submissions', starttls: '_submission' },
};

export function dnsRecords(s: DiscoverySettings, pins: KeyPins): RecordGroup[] {
  const groups: RecordGroup[] = [];
  const host = s.mailHost;
  for (const domain of s.domains) {
    if (s.mx) {
      groups.push({
        heading: [`${domain}: mail from other servers goes to the MX listener "${s.mx.listener}"${s.mx.starttls ? ' (STARTTLS)' : ' (no STARTTLS: no MTA-STS or DANE for it)'}`],
        records: [{ type: 'MX', name: domain, priority: 10, exchange: host }],
      });
    }
    const srv: DnsRecord[] = [];
    for (const kind of ['imap', 'pop3', 'submission'] as const) {
      for (const tls of ['implicit', 'starttls'] as const) {
        const name = `${SRV_NAMES[kind][tls]}._tcp.${domain}`;
        const offered = s.services.filter((x) => x.kind === kind && x.tls === tls);
        if (offered.length === 0) srv.push({ type: 'SRV', name, priority: 0, weight: 0, port: 0, target: '.' });
        for (const x of offered) srv.push({ type: 'SRV', name, priority: tls === 'implicit' ? 0 : 10, weight: 1, port: x.port, target: host });
      }
    }
    groups.push({ heading: [`${domain}: mail clients (RFC 6186, RFC 8314): implicit TLS first, STARTTLS after; "." means not offered`], records: srv });
    if (s.autoconfig) {
      groups.push({
        heading: [`${domain}: Thunderbird autoconfig and Outlook autodiscover, answered by the https listener`],
        records: [
          { type: 'CNAME', name: `autoconfig.${domain}`, target: host },
          { type: 'CNAME', name: `autodiscover.${domain}`, target: host },
        ],
      });
    }
    if (s.mtaSts) {
      groups.push({
        heading: [`${domain}: MTA-STS (RFC 8461), mode ${s.mtaSts.mode}; the policy is https://mta-sts.${domain}/.well-known/mta-sts.txt`, 'the id changes whenever the policy does: publish the new TXT record then'],
        records: [
          { type: 'CNAME', name: `mta-sts.${domain}`, target: host },
          { type: 'TXT', name: `_mta-sts.${domain}`, text: `v=STSv1; id=${s.mtaSts.id}`, tag: 'v=STSv1' },
        ],
      });
    }
    if (s.tlsRpt) {
      groups.push({
        heading: [`${domain}: TLS reporting (RFC 8460): where other servers send their daily reports`],
        records: [{ type: 'TXT', name: `_smtp._tls.${domain}`, text: `v=TLSRPTv1; rua=${s.tlsRpt.rua.join(',')}`, tag: 'v=TLSRPTv1' }],
      });
    }
  }
  if (s.dane) {
    const ports = [...(s.mx?.starttls ? [25] : []), ...new Set(s.services.filter((x) => x.tls === 'implicit').map((x) => x.port))];
    if (pins.current === undefined) {
      groups.push({ heading: [`DANE (RFC 7672): no TLSA records yet: ${pins.missing ?? 'no certificate for ' + host}`], records: [] });
    } else {
      const tlsa = (data: string): DnsRecord[] => ports.map((port) => ({ type: 'TLSA', name: `_${port}._tcp.${host}`, usage: 3, selector: 1, matching: 1, data }));
      groups.push({
        heading: [`DANE (RFC 7672): the key of ${host}'s certificate (3 1 1: its public key's SHA-256); needs DNSSEC on the zone`],
        records: tlsa(pins.current),
      });
      if (pins.next) groups.push({ heading: [`DANE: the NEXT key (rollover): ${pins.next.note}`, 'publish it now, beside the current one; remove the old one once the next key is in use'], records: tlsa(pins.next.data) });
    }
  }
  return groups;
}

/** A record's data as a zone file writes it. */
export function recordData(r: DnsRecord): string {
  switch (r.type) {
    case 'MX':
      return `${r.priority} ${fqdn(r.exchange)}`;
    case 'SRV':
      return `${r.priority} ${r.weight} ${r.port} ${fqdn(r.target)}`;
    case 'CNAME':
      return fqdn(r.target);
    case 'TXT':
      return `"${r.text.replace(/["\\]/g, (c) => `\\${c}`)}"`;
    case 'TLSA':
      return `${r.usage} ${r.selector} ${r.matching} ${r.data}`;
    default: {
      const never: never = r;
      throw new Error(`unknown record ${JSON.stringify(never)}`);
    }
  }
}

/** The groups as a zone file fragment: `; heading` lines, then `name. TTL IN TYPE data`. */
export function zoneText(groups: readonly RecordGroup[], intro: readonly string[], ttl = DEFAULT_TTL): string {
  const all = groups.flatMap((g) => g.records);
  const width = Math.max(0, ...all.map((r) => fqdn(r.name).length));
  const out = intro.map((l) => `; ${l}`);
  for (const g of groups) {
    out.push('', ...g.heading.map((h) => `; ${h}`));
    for (const r of g.records) out.push(`${fqdn(r.name).padEnd(width)}  ${ttl}  IN  ${r.type.padEnd(5)}  ${recordData(r)}`);
  }
  return `${out.join('\n')}\n`;
}

function fqdn(name: string): string {
  return name === '.' || name.endsWith('.') ? name : `${name}.`;
}
