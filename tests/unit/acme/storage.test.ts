import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync, utimesSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { after, test } from 'node:test';
import { acquireLock, AcmeStorage, caKey } from '../../../src/acme/storage.ts';

const root = mkdtempSync(join(tmpdir(), 'mailgate-acme-storage-'));
after(() => rmSync(root, { recursive: true, force: true }));

function selfSigned(name: string): { cert: string; key: string } {
  const dir = mkdtempSync(join(root, 'gen-'));
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(dir, 'k'), '-out', join(dir, 'c'), '-days', '1', '-subj', `/CN=${name}`, '-addext', `subjectAltName=DNS:${name}`], { stdio: 'ignore' });
  return { cert: readFileSync(join(dir, 'c'), 'utf8'), key: readFileSync(join(dir, 'k'), 'utf8') };
}

test('storage paths: one folder per CA, names sanitised as file names', () => {
  assert.equal(caKey('https://acme-v02.api.letsencrypt.org/directory'), 'acme-v02.api.letsencrypt.org-directory');
  assert.equal(caKey('https://127.0.0.1:14000/dir'), '127.0.0.1_14000-dir');
  const s = new AcmeStorage('/var/lib/mailgate', 'https://acme-staging-v02.api.letsencrypt.org/directory');
  assert.equal(s.certPaths('mail.example.org').keyFile, '/var/lib/mailgate/acme/acme-staging-v02.api.letsencrypt.org-directory/certificates/mail.example.org/mail.example.org.key');
  const evil = s.certPaths('../../etc/passwd').dir;
  assert.equal(dirname(resolve(evil)), join(s.caDir, 'certificates'), `no way out of the storage folder: ${evil}`);
  assert.equal(s.lockFile('Mail.Example.org'), '/var/lib/mailgate/acme/locks/mail.example.org.lock');
});

test('a saved certificate loads back; key 0600; a key that does not match is ignored with a reason', async () => {
  const s = new AcmeStorage(join(root, 'store1'), 'https://ca.test/dir');
  const a = selfSigned('a.test');
  const b = selfSigned('a.test');
  assert.deepEqual(await s.loadCert('a.test'), {}, 'nothing stored yet is no problem');
  const paths = await s.saveCert('a.test', a.cert, a.key, { name: 'a.test', directory: 'https://ca.test/dir', obtained: new Date().toISOString() });
  assert.equal(statSync(paths.keyFile).mode & 0o777, 0o600);
  const loaded = await s.loadCert('a.test');
  assert.equal(loaded.cert?.certPem, a.cert);
  assert.equal(loaded.cert?.meta?.name, 'a.test');
  writeFileSync(paths.keyFile, b.key);
  const mismatch = await s.loadCert('a.test');
  assert.equal(mismatch.cert, undefined);
  assert.match(mismatch.problem ?? '', /does not belong/);
  await s.saveCert('b.test', a.cert, a.key, { name: 'b.test', directory: 'https://ca.test/dir', obtained: '' });
  assert.match((await s.loadCert('b.test')).problem ?? '', /does not cover b\.test/);
});

test('the account key is created once: a second creator gets the first one', async () => {
  const s = new AcmeStorage(join(root, 'store2'), 'https://ca.test/dir');
  const first = await s.createAccountKey('KEY-ONE\n');
  const second = await s.createAccountKey('KEY-TWO\n');
  assert.deepEqual(first, { pem: 'KEY-ONE\n', created: true });
  assert.deepEqual(second, { pem: 'KEY-ONE\n', created: false });
  assert.equal(statSync(s.accountKeyFile).mode & 0o777, 0o600);
  assert.equal(await s.readAccountKey(), 'KEY-ONE\n');
});

test('the ordering lock is exclusive, waits for its holder, and gives up after waitMs', async () => {
  const file = join(root, 'locks', 'x.lock');
  const a = await acquireLock(file, { waitMs: 1000 });
  const waited: string[] = [];
  await assert.rejects(acquireLock(file, { waitMs: 300, pollMs: 50, onWait: (h) => waited.push(h) }), { code: 'ACME_LOCK' });
  assert.equal(waited.length, 1, 'told once that it waits, with the holder');
  assert.match(waited[0] ?? '', /"pid":/);
  const b = acquireLock(file, { waitMs: 3000, pollMs: 50 });
  setTimeout(() => void a.release(), 200);
  const got = await b;
  assert.ok(existsSync(file));
  await got.release();
  assert.ok(!existsSync(file));
  await got.release(); // twice is fine
});

test('a stale lock (holder died, no refresh) is taken over; a released lock is not someone else\'s to remove', async () => {
  const file = join(root, 'locks', 'y.lock');
  const dead = await acquireLock(file, { waitMs: 100, refreshMs: 60_000 });
  const old = new Date(Date.now() - 10_000);
  utimesSync(file, old, old);
  const taker = await acquireLock(file, { waitMs: 1000, staleMs: 5_000, pollMs: 50 });
  await dead.release(); // the dead holder coming back must not remove the new holder's lock
  assert.ok(existsSync(file), 'the new holder keeps its lock');
  await taker.release();
  assert.ok(!existsSync(file));
});

test('the lock can be abandoned when the gateway stops', async () => {
  const file = join(root, 'locks', 'z.lock');
  const held = await acquireLock(file, { waitMs: 100 });
  let stop = false;
  setTimeout(() => {
    stop = true;
  }, 100);
  const t = Date.now();
  await assert.rejects(acquireLock(file, { waitMs: 10_000, pollMs: 20, cancelled: () => stop }), { code: 'ACME_LOCK' });
  assert.ok(Date.now() - t < 2000);
  await held.release();
});

test('a rollover\'s next key: stored 0600 beside the certificate with when it was made, loaded back, removed metadata first', async () => {
  const s = new AcmeStorage(join(root, 'store3'), 'https://ca.test/dir');
  const { key } = selfSigned('n.test');
  assert.equal(await s.loadNextKey('n.test'), undefined, 'none yet');
  await s.saveNextKey('n.test', { keyPem: key, created: 1_700_000_000_000 });
  const p = s.nextKeyPaths('n.test');
  assert.equal(p.keyFile, join(s.certPaths('n.test').dir, 'n.test.next.key'));
  assert.equal(statSync(p.keyFile).mode & 0o777, 0o600, 'the next key is as private as the current one');
  assert.deepEqual(await s.loadNextKey('n.test'), { keyPem: key, created: 1_700_000_000_000 });
  writeFileSync(p.metaFile, '{');
  await assert.rejects(s.loadNextKey('n.test'), { code: 'CERT_LOAD' });
  await s.removeNextKey('n.test');
  assert.ok(!existsSync(p.keyFile) && !existsSync(p.metaFile));
  await s.removeNextKey('n.test'); // nothing there: fine
  assert.equal(await s.loadNextKey('n.test'), undefined);
});
