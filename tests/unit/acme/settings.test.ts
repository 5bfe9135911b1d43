import assert from 'node:assert/strict';
import { test } from 'node:test';
import { checkChallengeListeners } from '../../../src/acme/manager.ts';
import { acmeSettings } from '../../../src/acme/settings.ts';
import { parseConfig } from '../../../src/config/load.ts';
import { ConfigError } from '../../../src/core/errors.ts';
import { createLogger } from '../../../src/core/log.ts';

const listeners = `
listeners:
  - { name: imaps, protocol: imap, listen: "0.0.0.0:993", tls: implicit, backend: "127.0.0.1:143" }
  - { name: https, protocol: http, listen: "0.0.0.0:443", tls: implicit, backend: "127.0.0.1:80" }
  - { name: http, protocol: http, listen: "0.0.0.0:80", tls: none, backend: "127.0.0.1:80", redirect_https: true }
`;

function config(acme: string, rest = listeners) {
  return parseConfig(`hostname: Mail.Example.org\n${acme}\n${rest}`, '/etc/mailgate/mailgate.yaml');
}

function problems(acme: string): { path: string; message: string; line: number }[] {
  try {
    config(acme);
  } catch (err) {
    assert.ok(err instanceof ConfigError, String(err));
    return err.problems.map((p) => ({ path: p.path, message: p.message, line: p.line }));
  }
  assert.fail('expected the config to be refused');
}

test('the smallest acme section: Let\'s Encrypt production, tls-alpn-01, the host name, storage in tls.dir', () => {
  const s = acmeSettings(config('acme:\n  accept_terms: true'));
  assert.ok(s);
  assert.equal(s.directory, 'https://acme-v02.api.letsencrypt.org/directory');
  assert.equal(s.challenge, 'tls-alpn-01');
  assert.deepEqual(s.names, ['mail.example.org']);
  assert.equal(s.storage, '/etc/certs');
  assert.equal(s.keyType, 'ecdsa-p256');
  assert.deepEqual(s.renew, { checkIntervalMs: 6 * 3_600_000, retryMinMs: 60_000, retryMaxMs: 6 * 3_600_000, lockWaitMs: 600_000 });
  assert.equal(acmeSettings(config('')), undefined, 'no section, no ACME');
});

test('every key, with paths relative to the config file and the staging shortcut', () => {
  const s = acmeSettings(
    config(`acme:
  directory: letsencrypt-staging
  email: admin@example.org
  accept_terms: true
  names: [IMAP.example.org, smtp.example.org]
  challenge: http-01
  ca_bundle: ca/private.pem
  profile: shortlived
  key_type: rsa-2048
  storage: /var/lib/mailgate
  renew: { check_interval: 1h, retry_min: 30s, retry_max: 2h, lock_wait: 5m }
  request_timeout: 10s`),
  );
  assert.ok(s);
  assert.equal(s.directory, 'https://acme-staging-v02.api.letsencrypt.org/directory');
  assert.deepEqual(s.names, ['imap.example.org', 'smtp.example.org']);
  assert.equal(s.caBundleFile, '/etc/mailgate/ca/private.pem');
  assert.equal(s.storage, '/var/lib/mailgate');
  assert.equal(s.profile, 'shortlived');
  assert.equal(s.email, 'admin@example.org');
  assert.deepEqual(s.renew, { checkIntervalMs: 3_600_000, retryMinMs: 30_000, retryMaxMs: 7_200_000, lockWaitMs: 300_000 });
  assert.equal(s.requestTimeoutMs, 10_000);
});

test('refusals name the key: terms not accepted, wildcard, http directory, unknown key, duplicate name', () => {
  assert.match(problems('acme:\n  email: admin@example.org')[0]!.message, /accept_terms: true/);
  assert.equal(problems('acme:\n  accept_terms: false')[0]!.path, 'acme.accept_terms');
  assert.match(problems('acme:\n  accept_terms: true\n  names: ["*.example.org"]')[0]!.message, /wildcards need DNS-01/);
  assert.match(problems('acme:\n  accept_terms: true\n  names: ["192.0.2.1"]')[0]!.message, /not a DNS host name/);
  assert.match(problems('acme:\n  accept_terms: true\n  directory: http://ca.test/dir')[0]!.message, /https URL/);
  const unknown = problems('acme:\n  accept_terms: true\n  stagin: true');
  assert.equal(unknown[0]!.path, 'acme.stagin');
  assert.equal(unknown[0]!.line, 4);
  assert.match(problems('acme:\n  accept_terms: true\n  names: [a.test, a.test]')[0]!.message, /listed twice/);
  assert.equal(problems('acme:\n  accept_terms: true\n  challenge: dns-01')[0]!.path, 'acme.challenge');
});

test('the challenge needs a listener the CA can reach: an error without one, a warning on another port', () => {
  const log = createLogger('silent');
  const onlyMail = `
listeners:
  - { name: imaps, protocol: imap, listen: "0.0.0.0:993", tls: implicit, backend: "127.0.0.1:143" }
`;
  const c = config('acme:\n  accept_terms: true\n  challenge: http-01', onlyMail);
  assert.throws(() => checkChallengeListeners(acmeSettings(c)!, c.listeners, log), { code: 'CONFIG_INVALID', message: /plain http listener/ });
  const t = config('acme:\n  accept_terms: true', onlyMail);
  assert.doesNotThrow(() => checkChallengeListeners(acmeSettings(t)!, t.listeners, log), 'tls-alpn-01 works on any implicit-TLS listener the CA reaches');
  const lines: string[] = [];
  const warnLog = createLogger('warn', { write: (l: string) => lines.push(l) });
  checkChallengeListeners(acmeSettings(t)!, t.listeners, warnLog);
  assert.match(lines.join(''), /port 443/);
});
