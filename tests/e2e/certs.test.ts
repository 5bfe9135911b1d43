/**
 * `mailgate certs` as a monitoring check: a certificate from a file that is
 * about to expire makes it exit 1 before it expires, not only after.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { run } from './harness/clients.ts';
import { startGateway, type Gateway } from './harness/gateway.ts';
import { makeTempDir, removeTempDir } from '../helpers/proc.ts';

const BIN = fileURLToPath(new URL('../../bin/mailgate', import.meta.url));

let dir: string;
let gw: Gateway;

/** An ECDSA certificate for `name` from openssl, valid for `days`. */
function certificate(name: string, days: number): { cert: string; key: string } {
  const cert = join(dir, `${name}.crt`);
  const key = join(dir, `${name}.key`);
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', String(days),
    '-subj', `/CN=${name}`, '-addext', `subjectAltName=DNS:${name}`, '-keyout', key, '-out', cert,
  ], { stdio: 'ignore' });
  return { cert, key };
}

before(async () => {
  dir = await makeTempDir('certs');
  gw = await startGateway({
    extra: { tls: { dir: './certs', certificates: [certificate('soon.e2e.test', 5), certificate('later.e2e.test', 60)] } },
    listeners: [{ name: 'imaps', protocol: 'imap', tls: 'implicit', backend: '127.0.0.1:1' }],
  });
});

after(async () => {
  await gw?.stop();
  await removeTempDir(dir);
});

test('a file certificate with 5 days left: certs says so and exits 1 (default window 14 days)', async () => {
  const r = await run(BIN, ['certs', '-c', gw.configFile]);
  assert.equal(r.code, 1, r.stdout + r.stderr);
  assert.match(r.stdout, /soon\.e2e\.test +file .*EXPIRES IN (4\.9|5\.0) DAYS \(from a file: replace it\)/);
  assert.match(r.stdout, /later\.e2e\.test +file .*ok \(from a file; not renewed by mailgate\)/);
});

test('--warn-days sets the window: 3 days passes the same certificates, 90 flags both', async () => {
  const narrow = await run(BIN, ['certs', '-c', gw.configFile, '--warn-days', '3']);
  assert.equal(narrow.code, 0, narrow.stdout + narrow.stderr);
  assert.doesNotMatch(narrow.stdout, /EXPIRES/);
  const wide = await run(BIN, ['certs', '-c', gw.configFile, '--warn-days', '90']);
  assert.equal(wide.code, 1);
  assert.match(wide.stdout, /later\.e2e\.test +file .*EXPIRES IN (59\.9|60\.0) DAYS/);
  const bad = await run(BIN, ['certs', '-c', gw.configFile, '--warn-days', 'soon']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--warn-days takes a number of days/);
});
