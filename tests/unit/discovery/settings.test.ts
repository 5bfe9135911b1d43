/**
 * The discovery section worked out against the listeners (src/discovery/settings.ts)
 * and checked by the one schema (src/config/schema-discovery.ts): what is announced,
 * the MTA-STS id, the names ACME gets, and the problems refused with their key path.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { acmeSettings } from '../../../src/acme/settings.ts';
import { parseConfig } from '../../../src/config/load.ts';
import { ConfigError } from '../../../src/core/errors.ts';
import { discoveryNames, discoverySettings, mtaStsId, mtaStsPolicy } from '../../../src/discovery/settings.ts';

const LISTENERS = `
listeners:
  - { name: imaps, protocol: imap, listen: ["0.0.0.0:993", "[::]:993"], tls: implicit, backend: 127.0.0.1:143 }
  - { name: imap, protocol: imap, listen: "0.0.0.0:143", tls: starttls, backend: 127.0.0.1:143 }
  - { name: imap-plain, protocol: imap, listen: "127.0.0.1:1143", tls: none, backend: 127.0.0.1:143 }
  - { name: submission, protocol: smtp, listen: "0.0.0.0:587", tls: starttls, backend: 127.0.0.1:25 }
  - { name: smtps, protocol: smtp, listen: "0.0.0.0:465", tls: implicit, backend: 127.0.0.1:25 }
  - { name: mx, protocol: smtp, listen: "0.0.0.0:25", tls: starttls, backend: 127.0.0.1:2525, auth: none }
  - { name: https, protocol: http, listen: "0.0.0.0:443", tls: implicit, backend: 127.0.0.1:80 }
`;

function config(discovery: string, extra = '') {
  return parseConfig(`hostname: gw.example.org\n${LISTENERS}\n${extra}\ndiscovery:\n${discovery}`, '/etc/mailgate/mailgate.yaml');
}

function problems(text: string): string[] {
  try {
    parseConfig(text, '/etc/mailgate/mailgate.yaml');
  } catch (err) {
    assert.ok(err instanceof ConfigError);
    return err.problems.map((p) => `${p.line}: ${p.path}: ${p.message}`);
  }
  return assert.fail('expected the config to be refused');
}

test('only TLS-protected services are announced, implicit TLS first, IMAP before submission; the MX listener is known', () => {
  const s = discoverySettings(config('  domains: [Example.org]\n  mail_host: mail.example.org\n  autoconfig: {}\n'))!;
  assert.deepEqual(s.domains, ['example.org']);
  assert.equal(s.mailHost, 'mail.example.org');
  assert.deepEqual(
    s.services.map((x) => `${x.kind} ${x.tls} ${x.port}`),
    ['imap implicit 993', 'imap starttls 143', 'submission implicit 465', 'submission starttls 587'],
    'no plaintext listener, no MX, one entry per port',
  );
  assert.deepEqual(s.mx, { listener: 'mx', port: 25, starttls: true });
  assert.equal(s.httpsPort, 443);
  assert.equal(s.autoconfig?.login, 'address');
  assert.equal(s.autoconfig?.displayName('example.org'), 'example.org');
  assert.equal(discoverySettings(parseConfig(LISTENERS, '/x.yaml')), undefined, 'no section, nothing');
});

test('the MTA-STS policy and its id: the id changes exactly when the policy text changes', () => {
  const a = discoverySettings(config('  domains: [example.org]\n  mta_sts: { mode: enforce, max_age: 7d }\n'))!.mtaSts!;
  assert.equal(a.policy, 'version: STSv1\r\nmode: enforce\r\nmx: gw.example.org\r\nmax_age: 604800\r\n');
  assert.match(a.id, /^[0-9a-f]{32}$/, 'RFC 8461: 1-32 letters and digits');
  const same = discoverySettings(config('  domains: [example.org, example.net]\n  mta_sts: { mode: enforce, max_age: 604800 }\n'))!.mtaSts!;
  assert.equal(same.id, a.id, 'another domain, a duration written otherwise: same policy, same id');
  const ids = new Set([a.id]);
  for (const changed of [
    mtaStsPolicy('testing', ['gw.example.org'], 604800),
    mtaStsPolicy('enforce', ['gw.example.org'], 604801),
    mtaStsPolicy('enforce', ['gw.example.org', '*.example.org'], 604800),
    mtaStsPolicy('none', ['gw.example.org'], 604800),
  ]) ids.add(mtaStsId(changed));
  assert.equal(ids.size, 5, 'every change of mode, max_age or mx gives a new id');
});

test('TLS-RPT destinations: the gateway\'s own intake first, on the https port when it is not 443', () => {
  const s = discoverySettings(config('  domains: [example.org]\n  tls_rpt: { rua: ["mailto:tls@example.org"] }\n'))!;
  assert.deepEqual(s.tlsRpt, { rua: ['https://gw.example.org/.well-known/tlsrpt', 'mailto:tls@example.org'], receiveUrl: 'https://gw.example.org/.well-known/tlsrpt' });
  const off = discoverySettings(config('  domains: [example.org]\n  tls_rpt: { rua: ["mailto:tls@example.org"], receive: false }\n'))!;
  assert.deepEqual(off.tlsRpt, { rua: ['mailto:tls@example.org'], receiveUrl: undefined });
});

test('ACME gets the names the features need, after the configured ones', () => {
  const c = config('  domains: [example.org, example.net]\n  mail_host: mail.example.org\n  autoconfig: {}\n  mta_sts: {}\n', 'acme: { accept_terms: true, names: [gw.example.org] }');
  assert.deepEqual(discoveryNames(c), [
    'mail.example.org', 'autoconfig.example.org', 'autodiscover.example.org', 'mta-sts.example.org',
    'autoconfig.example.net', 'autodiscover.example.net', 'mta-sts.example.net',
  ]);
  assert.deepEqual(acmeSettings(c)!.names.slice(0, 2), ['gw.example.org', 'mail.example.org']);
  assert.equal(acmeSettings(c)!.names.length, 8, 'no name twice');
  const noFeatures = config('  domains: [example.org]\n', 'acme: { accept_terms: true }');
  assert.deepEqual(acmeSettings(noFeatures)!.names, ['gw.example.org'], 'the mail host (= hostname) only');
});

test('refused with file:line and key: features without an https listener, no TLS service to announce, DANE with keys that change, a rollover without reuse_key', () => {
  const noHttps = `hostname: gw.example.org
listeners:
  - { name: imap, protocol: imap, listen: "0.0.0.0:143", tls: none, backend: 127.0.0.1:143 }
discovery:
  domains: [example.org]
  autoconfig: {}
  mta_sts: {}
  tls_rpt: {}
`;
  assert.deepEqual(problems(noHttps), [
    '6:3: discovery.autoconfig: client autoconfig is served over HTTPS: add an http listener with tls: implicit (port 443)',
    '6:3: discovery.autoconfig: no IMAP or POP3 listener with TLS (implicit or starttls) to announce',
    '6:3: discovery.autoconfig: no SMTP submission listener (auth: required) with TLS to announce',
    '7:3: discovery.mta_sts: the MTA-STS policy is served over HTTPS: add an http listener with tls: implicit (port 443)',
    '8:3: discovery.tls_rpt: the TLS-RPT intake is served over HTTPS: add an http listener with tls: implicit (port 443)',
  ].map((p) => p.replace(/^(\d+):\d+: /, '$1: ')));
  const dane = `hostname: gw.example.org\n${LISTENERS}\nacme: { accept_terms: true, key_rollover: 365d }\ndiscovery: { domains: [example.org], dane: true }\n`;
  const found = problems(dane);
  assert.ok(found.some((p) => /acme\.key_rollover: a key rollover is for reused keys/.test(p)), found.join('\n'));
  assert.ok(found.some((p) => /discovery\.dane: DANE with ACME needs acme\.reuse_key: true/.test(p)), found.join('\n'));
  assert.ok(problems(`hostname: gw.example.org\n${LISTENERS}\ndiscovery: { domains: [example.org], mta_sts: { max_age: 1h } }\n`).some((p) => /max_age: between 1d and 365\.25d/.test(p)));
  assert.ok(problems(`hostname: gw.example.org\n${LISTENERS}\ndiscovery: { domains: [example.org], tls_rpt: { rua: ["mailto:a@b.org,c"] } }\n`).some((p) => /rua\[0\]/.test(p)));
  assert.ok(problems(`hostname: gw.example.org\n${LISTENERS}\ndiscovery: { domains: [example.org], autoconfig: { login: email } }\n`).some((p) => /autoconfig\.login/.test(p)));
});
