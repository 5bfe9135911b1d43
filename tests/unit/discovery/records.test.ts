/**
 * The records `mailgate dns` prints (src/discovery/records.ts): what the
 * listeners offer and nothing else, in zone-file form.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseConfig } from '../../../src/config/load.ts';
import { dnsRecords, zoneText } from '../../../src/discovery/records.ts';
import { discoverySettings } from '../../../src/discovery/settings.ts';

const config = (listeners: string, discovery: string) =>
  discoverySettings(parseConfig(`hostname: mail.example.org\nlisteners:\n${listeners}\ndiscovery:\n${discovery}`, '/x.yaml'))!;

const FULL = `  - { name: imaps, protocol: imap, listen: "0.0.0.0:993", tls: implicit, backend: 127.0.0.1:143 }
  - { name: pop3, protocol: pop3, listen: "0.0.0.0:110", tls: starttls, backend: 127.0.0.1:110 }
  - { name: smtps, protocol: smtp, listen: "0.0.0.0:465", tls: implicit, backend: 127.0.0.1:25 }
  - { name: mx, protocol: smtp, listen: "0.0.0.0:25", tls: starttls, backend: 127.0.0.1:2525, auth: none }
  - { name: https, protocol: http, listen: "0.0.0.0:443", tls: implicit, backend: 127.0.0.1:80 }`;

test('every record, in zone-file form: MX, SRV (with "." for what is not offered), CNAMEs, TXT, TLSA for 25 and the implicit ports, the next key too', () => {
  const s = config(FULL, '  domains: [example.org]\n  autoconfig: {}\n  mta_sts: { mode: enforce }\n  tls_rpt: { rua: ["mailto:tls@example.org"] }\n  dane: true\n');
  const groups = dnsRecords(s, { current: 'aa'.repeat(32), next: { data: 'bb'.repeat(32), note: 'takes over at the next renewal' } });
  const zone = zoneText(groups, ['intro']);
  const lines = zone.split('\n').filter((l) => l && !l.startsWith(';')).map((l) => l.split(/\s+/).join(' '));
  assert.deepEqual(lines, [
    'example.org. 3600 IN MX 10 mail.example.org.',
    '_imaps._tcp.example.org. 3600 IN SRV 0 1 993 mail.example.org.',
    '_imap._tcp.example.org. 3600 IN SRV 0 0 0 .',
    '_pop3s._tcp.example.org. 3600 IN SRV 0 0 0 .',
    '_pop3._tcp.example.org. 3600 IN SRV 10 1 110 mail.example.org.',
    '_submissions._tcp.example.org. 3600 IN SRV 0 1 465 mail.example.org.',
    '_submission._tcp.example.org. 3600 IN SRV 0 0 0 .',
    'autoconfig.example.org. 3600 IN CNAME mail.example.org.',
    'autodiscover.example.org. 3600 IN CNAME mail.example.org.',
    'mta-sts.example.org. 3600 IN CNAME mail.example.org.',
    `_mta-sts.example.org. 3600 IN TXT "v=STSv1; id=${s.mtaSts!.id}"`,
    '_smtp._tls.example.org. 3600 IN TXT "v=TLSRPTv1; rua=https://mail.example.org/.well-known/tlsrpt,mailto:tls@example.org"',
    ...['25', '993', '465'].map((p) => `_${p}._tcp.mail.example.org. 3600 IN TLSA 3 1 1 ${'aa'.repeat(32)}`),
    ...['25', '993', '465'].map((p) => `_${p}._tcp.mail.example.org. 3600 IN TLSA 3 1 1 ${'bb'.repeat(32)}`),
  ]);
  assert.match(zone, /^; intro$/m);
  assert.match(zone, /^; DANE: the NEXT key \(rollover\): takes over at the next renewal$/m);
});

test('only what is on: no MX without an MX listener, no TLSA without dane or without a certificate, no CNAMEs without autoconfig', () => {
  const noMx = FULL.split('\n').filter((l) => !l.includes('name: mx')).join('\n');
  const s = config(noMx, '  domains: [example.org, example.net]\n  dane: true\n');
  const groups = dnsRecords(s, { current: undefined, missing: 'ACME has no certificate yet' });
  const types = groups.flatMap((g) => g.records.map((r) => `${r.type} ${r.name}`));
  assert.ok(!types.some((t) => t.startsWith('MX') || t.startsWith('CNAME') || t.startsWith('TXT') || t.startsWith('TLSA')), types.join('\n'));
  assert.equal(types.filter((t) => t.startsWith('SRV')).length, 12, 'six SRV names per domain');
  assert.ok(groups.some((g) => g.heading.some((h) => /no TLSA records yet: ACME has no certificate yet/.test(h))));
  const plainMx = config(FULL.replace('tls: starttls, backend: 127.0.0.1:2525', 'tls: none, backend: 127.0.0.1:2525'), '  domains: [example.org]\n  dane: true\n');
  const tlsa = dnsRecords(plainMx, { current: 'cc' }).flatMap((g) => g.records).filter((r) => r.type === 'TLSA');
  assert.deepEqual(tlsa.map((r) => r.name), ['_993._tcp.mail.example.org', '_465._tcp.mail.example.org'], 'no TLSA for an MX without STARTTLS');
});
