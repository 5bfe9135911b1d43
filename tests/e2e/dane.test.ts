/**
 * MTA-STS and DANE with certificates from a real ACME CA: Pebble (with
 * pebble-challtestsrv resolving every name to 127.0.0.1) and the real daemon
 * with discovery (MTA-STS, DANE), acme.reuse_key and acme.key_rollover, on
 * 16-second certificates so that renewals come every 8 seconds:
 *
 *  - ACME gets mta-sts.<domain> besides the mail host; the MTA-STS policy is
 *    served as text/plain over that certificate, which curl verifies against
 *    Pebble's root for that name;
 *  - the TLSA record `mailgate dns` prints is the SHA-256 of the served
 *    certificate's public key as openssl computes it (x509 -pubkey | pkey
 *    -pubin -outform DER | dgst -sha256), and stays the same across a Pebble
 *    renewal (a new certificate, the same key);
 *  - the key rollover: the next key's TLSA record is printed by `mailgate
 *    dns` and `mailgate certs` beside the current one, the renewal after
 *    that keeps the current key, and the one after uses the next key: the
 *    key served then is the one printed a renewal period before.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import * as tls from 'node:tls';
import { after, before, test } from 'node:test';
import { run } from './harness/clients.ts';
import { CLI, startGateway, type Gateway, type LogLine } from './harness/gateway.ts';
import { startPebble, type Pebble } from './harness/pebble.ts';
import { freePort, makeTempDir, removeTempDir } from '../helpers/proc.ts';

const DOMAIN = 'dane.test';
const HOST = `mail.${DOMAIN}`;
const VALIDITY_S = 16;
/** Renewals come with half the lifetime left: every 8 s. */
const PERIOD_MS = (VALIDITY_S * 1000) / 2;

let pebble: Pebble;
let gw: Gateway;
let storage: string;
let httpsPort: number;

before(async () => {
  httpsPort = await freePort();
  pebble = await startPebble({ httpPort: await freePort(), tlsPort: httpsPort, validitySeconds: VALIDITY_S });
  storage = await makeTempDir('dane-store');
  const dead = `127.0.0.1:${await freePort()}`;
  gw = await startGateway({
    ports: { https: httpsPort },
    listeners: [
      { name: 'imaps', protocol: 'imap', tls: 'implicit', backend: dead },
      { name: 'mx', protocol: 'smtp', tls: 'starttls', backend: dead, auth: 'none' },
      { name: 'https', protocol: 'http', tls: 'implicit', backend: dead },
    ],
    extra: {
      hostname: HOST,
      acme: {
        directory: pebble.directoryUrl,
        accept_terms: true,
        ca_bundle: pebble.caBundle,
        challenge: 'tls-alpn-01',
        storage,
        reuse_key: true,
        // By the second renewal the key would be older than this: the next key is made then, and used at the third.
        key_rollover: '20s',
        renew: { retry_min: '1s', retry_max: '3s' },
      },
      discovery: { domains: [DOMAIN], mta_sts: { mode: 'enforce' }, dane: true },
    },
  });
});

after(async () => {
  await gw?.stop();
  await pebble?.stop();
  if (storage) await removeTempDir(storage);
});

const forHost = (pred: (l: LogLine) => boolean) => (l: LogLine) => l.name === HOST && pred(l);

/** The certificate the gateway serves for `name` on a port. */
function served(port: number, name: string): Promise<{ pem: string; fingerprint: string }> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port, servername: name, rejectUnauthorized: false }, () => {
      const c = s.getPeerX509Certificate();
      s.destroy();
      if (!c) reject(new Error('no certificate'));
      else resolve({ pem: c.toString(), fingerprint: c.fingerprint256 });
    });
    s.once('error', reject);
  });
}

/** TLSA 3 1 1 data the openssl way: x509 -pubkey | pkey -pubin -outform DER | dgst -sha256. */
function opensslTlsa(certPem: string): string {
  const pub = execFileSync('openssl', ['x509', '-noout', '-pubkey'], { input: certPem });
  const der = execFileSync('openssl', ['pkey', '-pubin', '-outform', 'DER'], { input: pub });
  return execFileSync('openssl', ['dgst', '-sha256', '-r'], { input: der }).toString().split(' ')[0]!;
}

async function mailgate(args: string[]): Promise<string> {
  const r = await run(process.execPath, [CLI, ...args, '-s', join(gw.dir, 'control.sock')], { timeoutMs: 30_000 });
  assert.equal(r.code, 0, `mailgate ${args.join(' ')}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** The TLSA data `mailgate dns` prints for the imaps port, in order (current first, then the next key). */
async function printedTlsa(): Promise<string[]> {
  const zone = await mailgate(['dns']);
  const re = new RegExp(`^_${gw.ports.imaps}\\._tcp\\.mail\\.dane\\.test\\.\\s+\\d+\\s+IN\\s+TLSA\\s+3 1 1 ([0-9a-f]{64})$`, 'gm');
  return [...zone.matchAll(re)].map((m) => m[1]!);
}

test('MTA-STS: the policy is served as text/plain over a certificate for mta-sts.<domain> that Pebble issued', async () => {
  const got = await gw.waitForLog((l) => l.msg.startsWith('certificate obtained for') && l.name === `mta-sts.${DOMAIN}`, 60_000);
  assert.equal(got.name, `mta-sts.${DOMAIN}`, 'ACME got the mta-sts. name the feature needs');
  const root = await pebble.rootFile();
  const out = join(storage, 'policy.txt');
  const r = await run('curl', [
    '-sS', '--resolve', `mta-sts.${DOMAIN}:${httpsPort}:127.0.0.1`, '--cacert', root, '-o', out, '-w', '%{http_code} %{content_type}',
    `https://mta-sts.${DOMAIN}:${httpsPort}/.well-known/mta-sts.txt`,
  ]);
  assert.equal(r.code, 0, `curl verifies the certificate for mta-sts.${DOMAIN} against Pebble's root: ${r.stderr}`);
  assert.match(r.stdout, /^200 text\/plain/);
  assert.equal(await fsp.readFile(out, 'utf8'), `version: STSv1\r\nmode: enforce\r\nmx: ${HOST}\r\nmax_age: 604800\r\n`);
  const cert = await served(httpsPort, `mta-sts.${DOMAIN}`);
  assert.match(execFileSync('openssl', ['x509', '-noout', '-issuer', '-ext', 'subjectAltName'], { input: cert.pem }).toString(), new RegExp(`Pebble Intermediate CA[\\s\\S]*DNS:mta-sts\\.${DOMAIN.replace('.', '\\.')}`));
});

test('DANE: the TLSA printed is the served key\'s (openssl), unchanged by a renewal with reuse_key; a rollover\'s next key is printed a renewal period before it is served', async () => {
  await gw.waitForLog(forHost((l) => l.msg.startsWith('certificate obtained for')), 60_000);
  const first = await served(gw.ports.imaps!, HOST);
  const [tlsa, ...more] = await printedTlsa();
  assert.equal(more.length, 0, 'no rollover yet: one key');
  assert.equal(tlsa, opensslTlsa(first.pem), 'the printed TLSA is the served certificate\'s key');
  assert.match(await mailgate(['certs']), new RegExp(`${HOST.replace(/\./g, '\\.')}: TLSA 3 1 1 ${tlsa} \\(key in use\\)`));

  // A renewal: a new certificate, the same key, the same TLSA.
  const renewed = await gw.waitForLog(forHost((l) => l.msg.startsWith('certificate renewed for')), 60_000);
  const second = await served(gw.ports.imaps!, HOST);
  assert.notEqual(second.fingerprint, first.fingerprint, 'Pebble issued a new certificate');
  assert.equal(opensslTlsa(second.pem), tlsa, 'with the same key');
  assert.deepEqual(await printedTlsa(), [tlsa], 'and mailgate dns prints the same record');
  assert.ok((await gw.logs()).some(forHost((l) => l.msg === 'renewing certificate' && l.key === 'kept' && Date.parse(l.time as string) <= Date.parse(renewed.time as string))));

  // The rollover starts: the next key is made, printed beside the current one.
  const made = await gw.waitForLog(forHost((l) => /^key rollover: the next key was made/.test(l.msg)), 60_000);
  const printed = await printedTlsa();
  const printedAt = Date.now();
  assert.equal(printed.length, 2, `current and next key:\n${printed.join('\n')}`);
  assert.equal(printed[0], tlsa, 'the current key first');
  const next = printed[1]!;
  assert.equal(next, made.tlsa, 'the next key as logged');
  assert.notEqual(next, tlsa);
  // Asked while the renewal that made it still runs, or once it is done.
  assert.match(await mailgate(['certs']), new RegExp(`TLSA 3 1 1 ${next} \\(NEXT key: made [^)]*(takes over at the next renewal|the renewal in progress keeps the current key)`));
  const meanwhile = await served(gw.ports.imaps!, HOST);
  assert.equal(opensslTlsa(meanwhile.pem), tlsa, 'the current key is still served');

  // The renewal that made it keeps the current key; the one after uses the next key.
  const done = await gw.waitForLog(forHost((l) => /^key rollover done/.test(l.msg)), 60_000);
  const doneAt = Date.parse(done.time as string);
  const logs = (await gw.logs()).filter(forHost(() => true));
  const renewals = logs.filter((l) => l.msg === 'renewing certificate' && Date.parse(l.time as string) >= Date.parse(made.time as string)).map((l) => l.key);
  assert.deepEqual(renewals.slice(0, 2), ['kept', 'next (rollover)'], 'one renewal period with both keys listed, then the switch');
  assert.ok(doneAt - printedAt >= PERIOD_MS * 0.6, `the next key was listed ${doneAt - printedAt} ms before it was used (a renewal period is ${PERIOD_MS} ms)`);
  const after = await served(gw.ports.imaps!, HOST);
  assert.equal(opensslTlsa(after.pem), next, 'the key served now is the one printed a renewal period before');
  assert.deepEqual(await printedTlsa(), [next], 'mailgate dns now lists the new key alone');
  const keyFile = join(storage, 'acme', `127.0.0.1_${pebble.port}-dir`, 'certificates', HOST, `${HOST}.key`);
  assert.equal((await fsp.stat(keyFile)).mode & 0o777, 0o600);
  await assert.rejects(fsp.stat(join(storage, 'acme', `127.0.0.1_${pebble.port}-dir`, 'certificates', HOST, `${HOST}.next.key`)), { code: 'ENOENT' });
});
