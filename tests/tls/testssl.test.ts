/**
 * The TLS report: Debian's testssl.sh against every TLS listener of a
 * gateway started here on loopback — implicit TLS as on 993, 995, 465 and
 * 443, and STARTTLS for IMAP, POP3 and SMTP (testssl -t) — in front of small
 * fake backends (so the HTTPS checks get real HTTP answers).
 *
 * Checks run: -p protocols, -s cipher categories, -f forward secrecy,
 * -E every cipher per protocol, -P server preference, -U vulnerabilities.
 * Asserted from testssl's JSON: no SSLv2/SSLv3/TLS 1.0/TLS 1.1, TLS 1.2 and
 * 1.3 offered, every cipher offered has an (EC)DHE key exchange and no NULL,
 * anonymous, export, low, 3DES or CBC category is offered, and no finding is
 * rated above OK/INFO (WARN, LOW, MEDIUM, HIGH or CRITICAL fail the test).
 *
 * Notices about the scanner's own environment are printed, not counted:
 * testssl's `engine_problem` (its OpenSSL has no GOST engine), `old_fart` and
 * `too_old_openssl` say nothing about the server, and a `scanProblem` at WARN
 * is testssl carrying on past a limit of its own client. A `scanProblem` at
 * FATAL (it could not scan) still fails, and so does a report that misses any
 * of the checks asserted below.
 *
 * Excluded on purpose: certificate trust. The gateway serves its self-signed
 * bootstrap certificate here, which testssl's server-defaults check (-S, not
 * run) rates CRITICAL as untrusted; TRUST_FINDINGS below would be ignored if
 * it were run. Trust depends on the certificate an installation configures,
 * not on the gateway's TLS stack.
 *
 *   npm run test:tls          (TESTSSL_PARALLEL=n, default 3 scans at a time)
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { startFakeImap, startFakePop3, startFakeSmtp, startRawBackend, type FakeBackend } from '../helpers/fake-backends.ts';
import { startGateway, type Gateway } from '../e2e/harness/gateway.ts';

const PARALLEL = Number(process.env.TESTSSL_PARALLEL ?? 3);
const CHECKS = ['-p', '-s', '-f', '-E', '-P', '-U'];
/** Certificate trust and naming: depends on the installed certificate, not on the TLS configuration (see above). */
const TRUST_FINDINGS = /^(cert_trust|cert_chain_of_trust|cert_caIssuers|cert_revocation|cert_ocspURL|cert_crlDistributionPoints|cert_validityPeriod|cert_expirationStatus|OCSP_stapling|DNS_CAArecord|cert_mustStapleExtension|cert_certificatePolicies_EV)/;
/** Checked on every listener (testssl reports ticketbleed, CRIME and BREACH for HTTP only; they are checked where present). */
const VULNERABILITIES = ['heartbleed', 'CCS', 'ROBOT', 'secure_renego', 'secure_client_renego', 'POODLE_SSL', 'fallback_SCSV', 'SWEET32', 'FREAK', 'DROWN', 'LOGJAM', 'BEAST', 'LUCKY13', 'RC4'];
/** Only on HTTP listeners: testssl needs an HTTP answer for these, so their presence proves the HTTPS scan got one. */
const HTTP_VULNERABILITIES = ['ticketbleed', 'CRIME_TLS', 'BREACH'];
/** Not findings: testssl's own notes (DEBUG: e.g. "Couldn't determine service" on a port where the server talks first). */
const NOT_A_FINDING = /^(OK|INFO|DEBUG)$/;
/** About the scanner's machine, not the server (see above). */
const SCANNER_ENVIRONMENT = /^(engine_problem|old_fart|too_old_openssl)$/;

/** A notice about testssl's own environment rather than a finding about the server. */
function isScannerNotice(f: Finding): boolean {
  return SCANNER_ENVIRONMENT.test(f.id) || (f.id === 'scanProblem' && f.severity !== 'FATAL');
}

interface Finding {
  id: string;
  severity: string;
  finding: string;
}

let gw: Gateway;
const backends: FakeBackend[] = [];

before(async () => {
  const imap = await startFakeImap();
  const pop3 = await startFakePop3();
  const smtp = await startFakeSmtp();
  const web = await startRawBackend((s) => s.on('data', () => s.end('HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n')));
  backends.push(imap, pop3, smtp, web);
  const at = (b: FakeBackend) => `127.0.0.1:${b.port}`;
  gw = await startGateway({
    logLevel: 'info',
    extra: { brute_force: { enabled: false } },
    listeners: [
      { name: 'imaps', protocol: 'imap', tls: 'implicit', backend: at(imap) },
      { name: 'pop3s', protocol: 'pop3', tls: 'implicit', backend: at(pop3) },
      { name: 'smtps', protocol: 'smtp', tls: 'implicit', backend: at(smtp), auth: 'required' },
      { name: 'https', protocol: 'http', tls: 'implicit', backend: at(web) },
      { name: 'imap', protocol: 'imap', tls: 'starttls', backend: at(imap) },
      { name: 'pop3', protocol: 'pop3', tls: 'starttls', backend: at(pop3) },
      { name: 'submission', protocol: 'smtp', tls: 'starttls', backend: at(smtp), auth: 'required' },
    ],
  });
});

after(async () => {
  await gw?.stop();
  for (const b of backends) await b.close();
});

function testssl(args: string[]): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    execFile('testssl', args, { timeout: 600_000, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : -1) : 0;
      resolve({ code, out: `${stdout}${stderr}` });
    });
  });
}

const targets: [string, string | undefined][] = [
  ['imaps', undefined],
  ['pop3s', undefined],
  ['smtps', undefined],
  ['https', undefined],
  ['imap', 'imap'],
  ['pop3', 'pop3'],
  ['submission', 'smtp'],
];

describe('testssl.sh against every TLS listener', { concurrency: PARALLEL }, () => {
  for (const [name, starttls] of targets) {
    test(`${name}${starttls ? ` (STARTTLS ${starttls})` : ''}: TLS 1.2/1.3 only, forward secrecy only, no vulnerability`, { timeout: 600_000 }, async () => {
      const json = join(gw.dir, `testssl-${name}.json`);
      const t0 = Date.now();
      const r = await testssl([
        '--quiet', '--warnings', 'off', '--color', '0', '--nodns', 'none',
        '--connect-timeout', '10', '--openssl-timeout', '10',
        ...CHECKS,
        ...(starttls ? ['-t', starttls] : []),
        '--jsonfile', json,
        `127.0.0.1:${gw.ports[name]}`,
      ]);
      const findings = JSON.parse(await readFile(json, 'utf8').catch(() => '[]')) as Finding[];
      assert.ok(findings.length > 20, `testssl produced a report (exit ${r.code}):\n${r.out.slice(-3000)}`);
      const byId = new Map(findings.map((f) => [f.id, f]));
      const get = (id: string) => {
        const f = byId.get(id);
        assert.ok(f, `${name}: no "${id}" in the report`);
        return f;
      };
      for (const id of ['SSLv2', 'SSLv3', 'TLS1', 'TLS1_1']) assert.match(get(id).finding, /^not offered/, `${name}: ${id}`);
      assert.match(get('TLS1_2').finding, /^offered/);
      assert.match(get('TLS1_3').finding, /^offered/);
      for (const id of ['cipherlist_NULL', 'cipherlist_aNULL', 'cipherlist_EXPORT', 'cipherlist_LOW', 'cipherlist_3DES_IDEA', 'cipherlist_AVERAGE']) {
        assert.match(get(id).finding, /^not offered/, `${name}: ${id}`);
      }
      assert.match(get('PFS').finding, /^offered/);
      const ciphers = findings.filter((f) => f.id.startsWith('cipher-tls'));
      assert.ok(ciphers.length >= 3, `${name}: the cipher list (-E) is there`);
      for (const c of ciphers) assert.match(c.finding, /\s(ECDH|DH) \d+\s/, `${name}: a cipher without forward secrecy: ${c.finding}`);
      for (const id of VULNERABILITIES) assert.match(get(id).severity, /^(OK|INFO)$/, `${name}: ${id}: ${get(id).finding}`);
      if (name === 'https') for (const id of HTTP_VULNERABILITIES) assert.match(get(id).severity, /^(OK|INFO)$/, `${name}: ${id}: ${get(id).finding}`);
      for (const f of findings.filter(isScannerNotice)) {
        process.stdout.write(`# testssl ${name}: scanner notice, not counted: ${f.id} ${f.severity} ${f.finding}\n`);
      }
      const flagged = findings.filter((f) => !NOT_A_FINDING.test(f.severity) && !TRUST_FINDINGS.test(f.id) && !isScannerNotice(f));
      assert.deepEqual(flagged, [], `${name}: findings rated above INFO`);
      process.stdout.write(
        `# testssl ${name}: ${findings.length} findings, ${ciphers.length} ciphers (${ciphers.map((c) => c.finding.split(/\s+/)[3]).join(' ')}), ${(Date.now() - t0) / 1000} s\n`,
      );
    });
  }
});
