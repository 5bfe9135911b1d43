/**
 * The discovery part's command on the control socket:
 *   dns.records   the DNS records to publish (src/discovery/records.ts), from
 *                 the running configuration and the keys served now (and the
 *                 next key of a rollover, from ACME)
 * `mailgate dns` (dns-verb.ts) prints them and checks them against a resolver.
 */
import { z } from 'zod';
import type { Config } from '../config/load.ts';
import { dnsRecords, type KeyPins, type RecordGroup } from '../discovery/records.ts';
import { discoverySettings } from '../discovery/settings.ts';
import type { CertStore } from '../tls/cert-store.ts';
import { spkiSha256 } from '../tls/spki.ts';
import { CommandError, type ControlServer } from './server.ts';

export const DNS_COMMAND = 'dns.records';

export interface DnsAnswer {
  intro: string[];
  groups: RecordGroup[];
}

/** The next key of a name during a rollover (ACME), if any: its TLSA 3 1 1 data, and when it takes over. */
export type NextKey = (name: string) => { data: string; note: string } | undefined;

export interface DnsSource {
  config: () => Config;
  certs: CertStore;
  /** Whether ACME manages this name (its served certificate is then judged by source). */
  acmeManages: (name: string) => boolean;
  nextKey: NextKey;
}

export function registerDnsCommand(control: ControlServer, src: DnsSource): void {
  control.register(DNS_COMMAND, z.strictObject({}), () => dnsAnswer(src), { slow: false });
}

export function dnsAnswer(src: DnsSource): DnsAnswer {
  const config = src.config();
  const s = discoverySettings(config);
  if (!s) throw new CommandError('UNSUPPORTED', `${config.file} has no discovery: section (README.md, "Make clients and other servers find you")`);
  const intro = [
    `mailgate dns: the records to publish for ${s.domains.join(', ')} (mail host ${s.mailHost})`,
    `from ${config.file} and the certificates served now; check them with: mailgate dns --check`,
    `${s.mailHost} itself needs A (and AAAA, if IPv6 reaches the gateway) records with the gateway's public address`,
  ];
  return { intro, groups: dnsRecords(s, keyPins(s.mailHost, src)) };
}

function keyPins(host: string, src: DnsSource): KeyPins {
  const served = src.certs.pemFor(host);
  if (!served) return { current: undefined, missing: `no certificate is served for ${host}` };
  if (src.acmeManages(host) && served.info.source !== 'acme') {
    return { current: undefined, missing: `ACME has no certificate for ${host} yet (the ${served.info.source} one is served meanwhile); run mailgate dns again once it has` };
  }
  const next = src.nextKey(host);
  return { current: spkiSha256(served.certPem), ...(next ? { next } : {}) };
}
