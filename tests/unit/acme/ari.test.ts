import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { ariCertId, ariPollDelay, parseRenewalInfo, parseRetryAfter, pickRenewalTime, sameWindow } from '../../../src/acme/ari.ts';

/** A certificate with the keyIdentifier and serial of RFC 9773's example, made by openssl. */
function rfcExampleCert(serial: string): string {
  const dir = mkdtempSync(join(tmpdir(), 'mailgate-ari-'));
  try {
    writeFileSync(
      join(dir, 'req.cnf'),
      [
        '[req]',
        'distinguished_name = dn',
        'prompt = no',
        'x509_extensions = v3',
        '[dn]',
        'CN = ari.test',
        '[v3]',
        'subjectKeyIdentifier = 69:88:5B:6B:87:46:40:41:E1:B3:7B:84:7B:A0:AE:2C:DE:01:C8:D4',
        'authorityKeyIdentifier = keyid:always',
        'subjectAltName = DNS:ari.test',
        '',
      ].join('\n'),
    );
    execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(dir, 'k'), '-out', join(dir, 'c'), '-set_serial', serial, '-days', '1', '-config', join(dir, 'req.cnf')], { stdio: 'ignore' });
    return readFileSync(join(dir, 'c'), 'utf8');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test('certID is base64url(AKI keyIdentifier) "." base64url(serial DER), as in RFC 9773 §4.1', () => {
  // Serial 0x87654321 has its top bit set, so its DER content is 00 87 65 43 21.
  assert.equal(ariCertId(rfcExampleCert('0x87654321')), 'aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE');
  // A serial without the top bit set has no leading zero.
  assert.equal(ariCertId(rfcExampleCert('0x12345678')), `aYhba4dGQEHhs3uEe6CuLN4ByNQ.${Buffer.from('12345678', 'hex').toString('base64url')}`);
});

test('a certificate without an Authority Key Identifier has no certID (a coded error)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'mailgate-ari-'));
  try {
    writeFileSync(join(dir, 'req.cnf'), '[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = v3\n[dn]\nCN = x\n[v3]\nsubjectKeyIdentifier = none\nauthorityKeyIdentifier = none\n');
    execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(dir, 'k'), '-out', join(dir, 'c'), '-days', '1', '-config', join(dir, 'req.cnf')], { stdio: 'ignore' });
    assert.throws(() => ariCertId(readFileSync(join(dir, 'c'), 'utf8')), { code: 'CERT_LOAD' });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('renewalInfo answers are validated: a window, start before end', () => {
  const info = parseRenewalInfo({ suggestedWindow: { start: '2025-01-02T04:00:00Z', end: '2025-01-03T04:00:00Z' }, explanationURL: 'https://ca.example/why' });
  assert.equal(info.window.start.toISOString(), '2025-01-02T04:00:00.000Z');
  assert.equal(info.explanationURL, 'https://ca.example/why');
  assert.throws(() => parseRenewalInfo({ suggestedWindow: { start: '2025-01-03T04:00:00Z', end: '2025-01-02T04:00:00Z' } }), { code: 'ACME' });
  assert.throws(() => parseRenewalInfo({ suggestedWindow: { start: 'soon' } }), { code: 'ACME' });
  assert.throws(() => parseRenewalInfo(null), { code: 'ACME' });
});

test('the renewal time is uniformly inside the window and stays put while the window does', () => {
  const w = { start: new Date('2025-01-02T00:00:00Z'), end: new Date('2025-01-02T10:00:00Z') };
  assert.equal(pickRenewalTime(w, () => 0).getTime(), w.start.getTime());
  assert.ok(pickRenewalTime(w, () => 0.999999).getTime() < w.end.getTime());
  assert.equal(pickRenewalTime(w, () => 0.5).toISOString(), '2025-01-02T05:00:00.000Z');
  for (let i = 0; i < 200; i++) {
    const t = pickRenewalTime(w).getTime();
    assert.ok(t >= w.start.getTime() && t < w.end.getTime());
  }
  assert.ok(sameWindow({ start: new Date(w.start), end: new Date(w.end) }, w));
  assert.ok(!sameWindow(undefined, w));
  assert.ok(!sameWindow({ start: w.start, end: new Date(w.end.getTime() + 1) }, w));
});

test('Retry-After: seconds or an HTTP date; ARI polls at least a minute and at most a day apart, 6 h by default', () => {
  const now = Date.parse('2025-01-01T00:00:00Z');
  assert.equal(parseRetryAfter('120', now), 120_000);
  assert.equal(parseRetryAfter('Wed, 01 Jan 2025 01:00:00 GMT', now), 3_600_000);
  assert.equal(parseRetryAfter('Tue, 31 Dec 2024 23:00:00 GMT', now), 0);
  assert.equal(parseRetryAfter(undefined, now), undefined);
  assert.equal(parseRetryAfter('soon', now), undefined);
  assert.equal(ariPollDelay(undefined), 6 * 3_600_000);
  assert.equal(ariPollDelay(5_000), 60_000);
  assert.equal(ariPollDelay(3 * 86_400_000), 86_400_000);
  assert.equal(ariPollDelay(7_200_000), 7_200_000);
});
