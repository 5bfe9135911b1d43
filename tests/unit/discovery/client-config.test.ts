/**
 * The client formats and the parsers of client input (src/discovery/):
 * addresses checked strictly, everything reflected escaped, Outlook's request
 * read without DTDs or entities and within bounds, TLS reports bounded before
 * and after gzip, the CMS signature checked by `openssl cms -verify`.
 */
import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync, X509Certificate } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { gzipSync } from 'node:zlib';
import fc from 'fast-check';
import { parseConfig } from '../../../src/config/load.ts';
import { AUTODISCOVER_MAX_BODY, AutodiscoverRequestError, parseAutodiscoverRequest } from '../../../src/discovery/autodiscover-request.ts';
import { appleProfile, autodiscoverResponse, parseAddress, thunderbirdConfig, xml } from '../../../src/discovery/client-config.ts';
import { cmsSign } from '../../../src/discovery/cms.ts';
import { discoverySettings } from '../../../src/discovery/settings.ts';
import { MAX_REPORT_BODY, parseTlsReport, TlsReportLog } from '../../../src/discovery/tlsrpt.ts';

const settings = discoverySettings(
  parseConfig(
    `hostname: mail.example.org
listeners:
  - { name: imaps, protocol: imap, listen: "0.0.0.0:993", tls: implicit, backend: 127.0.0.1:143 }
  - { name: pop3, protocol: pop3, listen: "0.0.0.0:110", tls: starttls, backend: 127.0.0.1:110 }
  - { name: submission, protocol: smtp, listen: "0.0.0.0:587", tls: starttls, backend: 127.0.0.1:25 }
  - { name: https, protocol: http, listen: "0.0.0.0:443", tls: implicit, backend: 127.0.0.1:80 }
discovery:
  domains: [example.org]
  autoconfig: { display_name: "R&D <Mail>" }
`,
    '/x.yaml',
  ),
)!;

const REQUEST = (email: string, schema = 'http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a') =>
  `<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"><Request><EMailAddress>${email}</EMailAddress><AcceptableResponseSchema>${schema}</AcceptableResponseSchema></Request></Autodiscover>`;

test('addresses: only our domains, a strict ASCII local part, at most 254 bytes', () => {
  assert.deepEqual(parseAddress('Alice.B+x@Example.ORG', ['example.org']), { address: 'Alice.B+x@example.org', local: 'Alice.B+x', domain: 'example.org' });
  for (const bad of ['alice@example.com', 'alice', '@example.org', 'a b@example.org', 'a"b@example.org', 'a<b@example.org', 'a..b@example.org', '.a@example.org', `${'a'.repeat(65)}@example.org`, 'ä@example.org', 'a\r\n@example.org']) {
    assert.equal(parseAddress(bad, ['example.org']), undefined, bad);
  }
});

test('every format escapes what it reflects; Thunderbird reflects nothing of the request', () => {
  const who = parseAddress("o'neil&co@example.org", ['example.org'])!;
  const tb = thunderbirdConfig(settings, 'example.org');
  assert.match(tb, /<displayName>R&amp;D &lt;Mail&gt;<\/displayName>/);
  assert.match(tb, /<incomingServer type="imap">[\s\S]*<socketType>SSL<\/socketType>[\s\S]*<incomingServer type="pop3">[\s\S]*<socketType>STARTTLS<\/socketType>/);
  assert.match(tb, /<username>%EMAILADDRESS%<\/username>/);
  const ad = autodiscoverResponse(settings, who);
  assert.match(ad, /<LoginName>o&apos;neil&amp;co@example\.org<\/LoginName>/);
  assert.doesNotMatch(ad, /o'neil&co/);
  const apple = appleProfile(settings, who);
  assert.match(apple, /<string>o&apos;neil&amp;co@example\.org<\/string>/);
  assert.doesNotMatch(apple, /o'neil&co/);
  fc.assert(
    fc.property(fc.string(), (s) => {
      const e = xml(s);
      assert.doesNotMatch(e, /[<>"']|&(?!(amp|lt|gt|quot|apos);)/);
    }),
  );
});

test('Outlook\'s request: read strictly; DOCTYPEs, entities, other roots, other namespaces and big bodies are refused', () => {
  assert.deepEqual(parseAutodiscoverRequest(Buffer.from(REQUEST('alice@example.org'))), {
    email: 'alice@example.org',
    schema: 'http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a',
  });
  const refused = (body: string, why: RegExp) =>
    assert.throws(() => parseAutodiscoverRequest(Buffer.from(body)), (err: unknown) => err instanceof AutodiscoverRequestError && why.test(err.message), body.slice(0, 80));
  refused(`<!DOCTYPE Autodiscover [<!ENTITY x "alice">]>${REQUEST('&x;@example.org')}`, /DOCTYPE/);
  refused(`<!DOCTYPE Autodiscover SYSTEM "file:///etc/passwd">${REQUEST('a@example.org')}`, /DOCTYPE/);
  refused(REQUEST('&x;@example.org'), /well-formed/);
  refused(REQUEST('alice@example.org').replace('requestschema/2006', 'requestschema/2007'), /not an Outlook autodiscover request/);
  refused('<Autodiscover><Request><EMailAddress>a@example.org</EMailAddress></Request></Autodiscover>', /not an Outlook/);
  refused(REQUEST('alice@example.org').replace('</Autodiscover>', ''), /well-formed/);
  refused(REQUEST('').replace('<EMailAddress></EMailAddress>', ''), /no EMailAddress/);
  refused(`<?evil x?>${REQUEST('a@example.org')}`, /processing instructions/);
  refused(REQUEST(`${'<x>'.repeat(10)}a@example.org${'</x>'.repeat(10)}`), /too many elements/);
  assert.throws(() => parseAutodiscoverRequest(Buffer.alloc(AUTODISCOVER_MAX_BODY + 1, 0x20)), AutodiscoverRequestError);
  assert.equal(parseAutodiscoverRequest(Buffer.from(REQUEST('a&amp;b@example.org'))).email, 'a&b@example.org', 'XML\'s own entities are read');
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 400 }), (bytes) => {
      try {
        parseAutodiscoverRequest(Buffer.from(bytes));
      } catch (err) {
        assert.ok(err instanceof AutodiscoverRequestError, `only coded refusals: ${String(err)}`);
      }
    }),
  );
});

const report = (domain: string) => ({
  'organization-name': 'Sender\u001b[31m Inc',
  'report-id': 'r-1',
  policies: [
    {
      policy: { 'policy-type': 'sts', 'policy-domain': domain },
      summary: { 'total-successful-session-count': 10, 'total-failure-session-count': 3 },
      'failure-details': [
        { 'result-type': 'certificate-expired', 'failed-session-count': 2 },
        { 'result-type': 'made-up<script>', 'failed-session-count': 1 },
      ],
    },
  ],
});

test('TLS reports: gzip or JSON, summarised by our domains and known result types; bounded before and after gzip', () => {
  const r = parseTlsReport(gzipSync(JSON.stringify(report('Example.org.'))), ['example.org'], 5);
  assert.deepEqual(r, {
    ok: true,
    at: 5,
    organization: 'Sender?[31m Inc',
    reportId: 'r-1',
    domains: [{ domain: 'example.org', success: 10, failure: 3, failures: { 'certificate-expired': 2, other: 1 } }],
  });
  const foreign = parseTlsReport(Buffer.from(JSON.stringify(report('evil.example'))), ['example.org']);
  assert.ok(foreign.ok && foreign.domains[0]!.domain === 'other', 'a domain not ours is never a label');
  assert.equal((parseTlsReport(gzipSync(Buffer.alloc(8 * 1024 * 1024, 0x20)), ['example.org']) as { reason: string }).reason, 'too-large', 'a gzip bomb stops at the bound');
  assert.equal((parseTlsReport(Buffer.alloc(MAX_REPORT_BODY + 1), ['example.org']) as { reason: string }).reason, 'too-large');
  assert.equal((parseTlsReport(Buffer.from([0x1f, 0x8b, 1, 2, 3]), ['example.org']) as { reason: string }).reason, 'bad-gzip');
  assert.equal((parseTlsReport(Buffer.from('{'), ['example.org']) as { reason: string }).reason, 'bad-json');
  assert.equal((parseTlsReport(Buffer.from('{"policies": [1]}'), ['example.org']) as { reason: string }).reason, 'not-a-report');

  const log = new TlsReportLog();
  const seen: boolean[] = [];
  log.onReport((x) => seen.push(x.ok));
  log.record(r);
  log.record(r);
  log.record(parseTlsReport(Buffer.from('x'), []));
  const t = log.totals();
  assert.deepEqual(t.reports, { accepted: 2, refused: 1 });
  assert.deepEqual(t.domains, [{ domain: 'example.org', success: 20, failure: 6, failures: { 'certificate-expired': 4, other: 2 } }]);
  assert.deepEqual(seen, [true, true, false]);
});

test('CMS: the signature over the signed attributes verifies with the certificate, which is embedded with its chain (RSA and ECDSA)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'mailgate-cms-'));
  try {
    for (const key of [['ec', '-pkeyopt', 'ec_paramgen_curve:P-256'], ['rsa:2048']]) {
      execFileSync('openssl', ['req', '-x509', '-newkey', ...key, '-nodes', '-keyout', join(dir, 'k.pem'), '-out', join(dir, 'c.pem'), '-days', '1', '-subj', '/CN=mail.example.org'], { stdio: 'ignore' });
      const certPem = readFileSync(join(dir, 'c.pem'), 'utf8');
      const content = Buffer.from('<plist>ü</plist>');
      const der = cmsSign(content, certPem, readFileSync(join(dir, 'k.pem'), 'utf8'), new Date(Date.UTC(2026, 0, 2, 3, 4, 5)));
      assert.equal(der[0], 0x30);
      assert.ok(der.includes(content), 'the content is embedded');
      assert.ok(der.includes(new X509Certificate(certPem).raw), 'the certificate is embedded byte for byte');
      assert.ok(der.includes(createHash('sha256').update(content).digest()), 'the messageDigest attribute');
      assert.ok(der.includes(Buffer.from('260102030405Z')), 'signingTime');
      const out = execFileSync('openssl', ['cms', '-verify', '-inform', 'DER', '-CAfile', join(dir, 'c.pem'), '-purpose', 'any'], { input: der, stdio: ['pipe', 'pipe', 'pipe'] });
      assert.deepEqual(out, content);
    }
    const other = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ type: 'pkcs8', format: 'pem' }) as string;
    assert.throws(() => cmsSign(Buffer.from('x'), readFileSync(join(dir, 'c.pem'), 'utf8'), other), /does not belong/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
