/**
 * `mailgate dns --check` against a real DNS server: dnsmasq (Debian's
 * dnsmasq-base), started by the harness on a loopback high port with the
 * records the running gateway prints (MX, SRV with "." for services not
 * offered, CNAMEs, MTA-STS and TLS-RPT TXT, TLSA for 25 and the implicit-TLS
 * ports), one of them planted stale: the check names that one record and
 * exits 1; with the record fixed it passes. The TLSA printed is the one
 * openssl computes from the certificate.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { run } from './harness/clients.ts';
import { startDnsmasq, type Dnsmasq, type ZoneRecord } from './harness/dnsmasq.ts';
import { CLI, startGateway, type Gateway } from './harness/gateway.ts';
import { freePort, makeTempDir, removeTempDir } from '../helpers/proc.ts';

const DOMAIN = 'e2e.test';
const HOST = 'mail.e2e.test';

let gw: Gateway;
let dns: Dnsmasq | undefined;
let dir: string;
let certFile: string;

before(async () => {
  dir = await makeTempDir('dns');
  certFile = join(dir, 'mail.crt');
  const keyFile = join(dir, 'mail.key');
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '2', '-subj', `/CN=${HOST}`,
    '-addext', `subjectAltName=DNS:${HOST},DNS:mta-sts.${DOMAIN},DNS:autoconfig.${DOMAIN},DNS:autodiscover.${DOMAIN}`, '-keyout', keyFile, '-out', certFile,
  ], { stdio: 'ignore' });
  const dead = `127.0.0.1:${await freePort()}`;
  gw = await startGateway({
    extra: {
      tls: { dir: './certs', certificates: [{ cert: certFile, key: keyFile }] },
      discovery: {
        domains: [DOMAIN],
        autoconfig: {},
        mta_sts: { mode: 'testing' },
        tls_rpt: { rua: [`mailto:tlsrpt@${DOMAIN}`] },
        dane: true,
      },
    },
    listeners: [
      { name: 'imaps', protocol: 'imap', tls: 'implicit', backend: dead },
      { name: 'submission', protocol: 'smtp', tls: 'starttls', backend: dead, auth: 'required' },
      { name: 'mx', protocol: 'smtp', tls: 'starttls', backend: dead, auth: 'none' },
      { name: 'https', protocol: 'http', tls: 'implicit', backend: dead },
    ],
  });
});

after(async () => {
  await dns?.stop();
  await gw?.stop();
  if (dir) await removeTempDir(dir);
});

function mailgate(args: string[]) {
  return run(process.execPath, [CLI, ...args, '-s', join(gw.dir, 'control.sock')], { timeoutMs: 30_000 });
}

test('dns --check against dnsmasq: one planted stale record is reported and exits 1; fixed, every record passes', async () => {
  const printed = await mailgate(['dns']);
  assert.equal(printed.code, 0, printed.stderr);
  const answer = await mailgate(['dns', '--json']);
  const records = (JSON.parse(answer.stdout) as { groups: { records: ZoneRecord[] }[] }).groups.flatMap((g) => g.records);
  assert.deepEqual(
    [...new Set(records.map((r) => r.type))].sort(),
    ['CNAME', 'MX', 'SRV', 'TLSA', 'TXT'],
    'every record type is there to check',
  );

  // The TLSA 3 1 1 data is the SHA-256 of the certificate's public key, as openssl computes it.
  const pub = execFileSync('openssl', ['x509', '-in', certFile, '-noout', '-pubkey']);
  const der = execFileSync('openssl', ['pkey', '-pubin', '-outform', 'DER'], { input: pub });
  const sha = execFileSync('openssl', ['dgst', '-sha256', '-r'], { input: der }).toString().split(' ')[0];
  const tlsa = records.filter((r): r is Extract<ZoneRecord, { type: 'TLSA' }> => r.type === 'TLSA');
  assert.deepEqual(tlsa.map((r) => r.name), [`_25._tcp.${HOST}`, `_${gw.ports.imaps}._tcp.${HOST}`], 'port 25 (MX, STARTTLS) and the implicit-TLS port');
  for (const r of tlsa) assert.equal(`${r.usage} ${r.selector} ${r.matching} ${r.data}`, `3 1 1 ${sha}`);
  assert.match(printed.stdout, new RegExp(`^_25\\._tcp\\.mail\\.e2e\\.test\\.\\s+3600\\s+IN\\s+TLSA\\s+3 1 1 ${sha}$`, 'm'));

  // Published as printed, except an MTA-STS TXT record still carrying an old id.
  const sts = records.find((r): r is Extract<ZoneRecord, { type: 'TXT' }> => r.type === 'TXT' && r.name === `_mta-sts.${DOMAIN}`)!;
  const planted = records.map((r) => (r === sts ? { ...sts, text: 'v=STSv1; id=20240101T000000' } : r));
  dns = await startDnsmasq(planted);
  const stale = await mailgate(['dns', '--check', '--resolver', dns.address]);
  assert.equal(stale.code, 1, `exit 1 with a stale record:\n${stale.stdout}${stale.stderr}`);
  const verdicts = stale.stdout.split('\n').filter((l) => /^(OK|MISSING|STALE|ERROR) /.test(l));
  assert.equal(verdicts.length, records.length, `one verdict per record:\n${stale.stdout}\n${await dns.logs()}`);
  const bad = verdicts.filter((l) => !l.startsWith('OK '));
  assert.deepEqual(bad, [`STALE    _mta-sts.${DOMAIN} TXT "${sts.text}"`], stale.stdout);
  assert.match(stale.stdout, /found: TXT "v=STSv1; id=20240101T000000"/);
  assert.match(stale.stdout, /1 of \d+ records are missing or stale/);
  for (const want of [`OK       ${DOMAIN} MX`, `OK       _imaps._tcp.${DOMAIN} SRV`, `OK       _pop3._tcp.${DOMAIN} SRV 0 0 0 .`, `OK       autoconfig.${DOMAIN} CNAME`, `OK       _smtp._tls.${DOMAIN} TXT`, `OK       _25._tcp.${HOST} TLSA`]) {
    assert.ok(verdicts.some((l) => l.startsWith(want)), `${want}…\n${stale.stdout}`);
  }

  await dns.restart(records);
  const fixed = await mailgate(['dns', '--check', '--resolver', dns.address]);
  assert.equal(fixed.code, 0, `every record as printed:\n${fixed.stdout}${fixed.stderr}\n${await dns.logs()}`);
  assert.match(fixed.stdout, new RegExp(`all ${records.length} records are published as they should be`));

  // A record that is not there at all is missing, and so is one for a key the gateway does not hold.
  await dns.restart([...records.filter((r) => r.type !== 'MX'), { type: 'TLSA', name: `_25._tcp.${HOST}`, usage: 3, selector: 1, matching: 1, data: 'ab'.repeat(32) }]);
  const missing = await mailgate(['dns', '--check', '--resolver', dns.address]);
  assert.equal(missing.code, 1);
  assert.match(missing.stdout, new RegExp(`^MISSING  ${DOMAIN.replace('.', '\\.')} MX 10 ${HOST.replace(/\./g, '\\.')}\\.$`, 'm'));
  assert.match(missing.stdout, /^STALE    _25\._tcp\.mail\.e2e\.test TLSA 3 1 1 (ab){32}$/m, 'an old key\'s TLSA is stale');
});

test('dns refuses a bad --resolver and says where the daemon is missing', async () => {
  const bad = await mailgate(['dns', '--check', '--resolver', 'dns.example:53']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--resolver takes an IP address/);
  const gone = await run(process.execPath, [CLI, 'dns', '-s', join(dir, 'nothing.sock')]);
  assert.equal(gone.code, 1);
});
