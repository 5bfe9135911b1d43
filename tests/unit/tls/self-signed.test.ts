import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { CertStore } from '../../../src/tls/cert-store.ts';
import { loadOrCreateSelfSigned, safeFileStem } from '../../../src/tls/self-signed.ts';

test('the bootstrap certificate is made once, key 0600, no temp files left, and reused', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'mailgate-selfsigned-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const first = await loadOrCreateSelfSigned(join(dir, 'certs'), 'mail.example.org');
  assert.equal(first.created, true);
  assert.equal((await stat(first.keyFile)).mode & 0o777, 0o600);
  assert.deepEqual((await readdir(join(dir, 'certs'))).sort(), ['mail.example.org.selfsigned.crt', 'mail.example.org.selfsigned.key']);
  const x = new X509Certificate(first.cert);
  assert.match(x.subjectAltName ?? '', /DNS:mail\.example\.org/);
  assert.ok(x.checkPrivateKey((await import('node:crypto')).createPrivateKey(first.key)));
  const second = await loadOrCreateSelfSigned(join(dir, 'certs'), 'mail.example.org');
  assert.equal(second.created, false);
  assert.equal(second.cert, first.cert);
  const store = new CertStore('TLSv1.2');
  const info = store.put(second.cert, second.key, 'self-signed');
  assert.deepEqual(info.names, ['mail.example.org']);
  assert.ok(store.contextFor('MAIL.example.org'));
  assert.ok(store.contextFor(undefined), 'the first certificate is the default');
});

test('host names become safe file names', () => {
  const evil = safeFileStem('../../etc/passwd');
  assert.ok(!evil.includes('/') && !evil.startsWith('.'), evil);
  assert.equal(safeFileStem('Mail.Example.ORG'), 'mail.example.org');
  assert.equal(safeFileStem('*.example.org'), '_.example.org');
});

test('a key that does not belong to the certificate is refused with CERT_LOAD', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'mailgate-selfsigned-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const a = await loadOrCreateSelfSigned(dir, 'a.example.org');
  const b = await loadOrCreateSelfSigned(dir, 'b.example.org');
  assert.throws(() => new CertStore('TLSv1.2').put(a.cert, b.key, 'file'), { code: 'CERT_LOAD' });
});
