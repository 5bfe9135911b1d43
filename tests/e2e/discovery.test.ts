/**
 * What clients and other servers fetch from the gateway to find it (issue
 * 15), with real clients, against the real daemon in front of Dovecot and
 * Postfix:
 *
 *  - Thunderbird's config-v1.1.xml fetched with curl (the autoconfig host and
 *    the well-known path), parsed by Python, and every server entry in it
 *    used: Python connects where the entry says, with the TLS it says, and
 *    logs in (imaplib, poplib, smtplib); the entries are exactly the running
 *    TLS listeners, implicit TLS first; the MX listener is not announced;
 *  - Outlook's autodiscover: a real Outlook request body POSTed with curl,
 *    the answer parsed by Python; a DOCTYPE with entities and an oversized
 *    body are refused;
 *  - the Apple profile: `openssl cms -verify` checks the signature with the
 *    gateway's certificate, `plistlib` reads the plist; an address with `&`
 *    comes back intact (escaped in the XML);
 *  - the MTA-STS policy as text/plain on mta-sts.<domain>, with the id
 *    `mailgate dns` prints;
 *  - TLS-RPT: a gzipped report from curl is counted in the metrics and in
 *    `mailgate status`; a gzip bomb is refused with 413;
 *  - the inbound MX listener as shipped (STARTTLS, auth: none, greet_delay,
 *    XCLIENT): `swaks --tls` delivers through it to Postfix, which logs the
 *    real client address.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { gzipSync } from 'node:zlib';
import { python, run } from './harness/clients.ts';
import { CLI, startGateway, type Gateway } from './harness/gateway.ts';
import { freePort, startDovecot, startPostfix, userByName, type Dovecot, type Postfix } from './harness/servers.ts';
import { makeTempDir, removeTempDir } from '../helpers/proc.ts';
import { waitFor } from '../helpers/wait.ts';

const DOMAIN = 'e2e.test';
const MAIL_HOST = 'mail.e2e.test';
const NAMES = [MAIL_HOST, `autoconfig.${DOMAIN}`, `autodiscover.${DOMAIN}`, `mta-sts.${DOMAIN}`, DOMAIN];
const alice = userByName('alice');

let dovecot: Dovecot;
let postfix: Postfix;
let gw: Gateway;
let dir: string;
let caFile: string;
let metricsPort: number;

before(async () => {
  dir = await makeTempDir('discovery');
  // One certificate for every name the features use (as ACME would get them), its own trust anchor.
  caFile = join(dir, 'gateway.crt');
  const keyFile = join(dir, 'gateway.key');
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '2', '-subj', `/CN=${MAIL_HOST}`,
    '-addext', `subjectAltName=${NAMES.map((n) => `DNS:${n}`).join(',')}`, '-keyout', keyFile, '-out', caFile,
  ], { stdio: 'ignore' });
  dovecot = await startDovecot();
  postfix = await startPostfix();
  metricsPort = await freePort();
  const imap = `127.0.0.1:${dovecot.imapPort}`;
  const smtp = `127.0.0.1:${postfix.port}`;
  gw = await startGateway({
    extra: {
      tls: { dir: './certs', certificates: [{ cert: caFile, key: keyFile }] },
      metrics: { listen: `127.0.0.1:${metricsPort}` },
      discovery: {
        domains: [DOMAIN],
        autoconfig: { login: 'local_part', display_name: 'E2E Mail – Grüße' },
        mta_sts: { mode: 'enforce', max_age: '7d' },
        tls_rpt: { rua: [`mailto:tlsrpt@${DOMAIN}`] },
      },
    },
    listeners: [
      { name: 'imaps', protocol: 'imap', tls: 'implicit', backend: imap },
      { name: 'imap', protocol: 'imap', tls: 'starttls', backend: imap },
      { name: 'pop3s', protocol: 'pop3', tls: 'implicit', backend: `127.0.0.1:${dovecot.pop3Port}` },
      { name: 'smtps', protocol: 'smtp', tls: 'implicit', backend: smtp, auth: 'required' },
      { name: 'submission', protocol: 'smtp', tls: 'starttls', backend: smtp, auth: 'required' },
      // The inbound MX listener as config/mailgate.yaml ships it (commented there).
      { name: 'mx', protocol: 'smtp', tls: 'starttls', backend: smtp, auth: 'none', greet_delay: '1s', xclient: true },
      { name: 'https', protocol: 'http', tls: 'implicit', backend: `127.0.0.1:${await freePort()}` },
    ],
  });
});

after(async () => {
  await gw?.stop();
  await postfix?.stop();
  await dovecot?.stop();
  if (dir) await removeTempDir(dir);
});

/** curl over HTTPS to a name of ours, resolved to the gateway, trusting its certificate. */
async function curl(name: string, path: string, extra: string[] = []): Promise<{ status: number; type: string; body: Buffer }> {
  const port = gw.ports.https!;
  const out = join(dir, `curl-${randomBytes(4).toString('hex')}`);
  const r = await run('curl', ['-sS', '--resolve', `${name}:${port}:127.0.0.1`, '--cacert', caFile, '-o', out, '-w', '%{http_code} %{content_type}', ...extra, `https://${name}:${port}${path}`]);
  assert.equal(r.code, 0, `curl ${path}: ${r.stderr}`);
  const [status, ...type] = r.stdout.split(' ');
  return { status: Number(status), type: type.join(' '), body: await fsp.readFile(out).catch(() => Buffer.alloc(0)) };
}

/** Python snippets resolve every *.e2e.test name to the gateway (as DNS would, after `mailgate dns`). */
const RESOLVE = `
_gai = socket.getaddrinfo
def _resolve(host, *a, **k):
    return _gai('127.0.0.1' if str(host).endswith('${DOMAIN}') else host, *a, **k)
socket.getaddrinfo = _resolve
`;

test('Thunderbird: curl fetches config-v1.1.xml; every server entry in it is a running listener Python logs in to with the TLS it names', async () => {
  const tb = await curl(`autoconfig.${DOMAIN}`, `/mail/config-v1.1.xml?emailaddress=${alice.name}%40${DOMAIN}`);
  assert.equal(tb.status, 200);
  assert.match(tb.type, /^application\/xml/);
  const file = join(dir, 'config-v1.1.xml');
  await fsp.writeFile(file, tb.body);
  const servers = await python<{ kind: string; type: string; host: string; port: number; socket: string; user: string; ok: string; name: string }[]>(
    `${RESOLVE}
import xml.etree.ElementTree as ET, imaplib, poplib, smtplib
root = ET.parse(sys.argv[1]).getroot()
assert root.tag == 'clientConfig' and root.get('version') == '1.1', root.tag
provider = root.find('emailProvider')
name = provider.findtext('displayName')
tls = ctx(sys.argv[2])
user, password = sys.argv[3], sys.argv[4]
seen = []
for kind in ('incomingServer', 'outgoingServer'):
    for s in provider.findall(kind):
        typ, host, port, sock = s.get('type'), s.findtext('hostname'), int(s.findtext('port')), s.findtext('socketType')
        login = s.findtext('username').replace('%EMAILLOCALPART%', user)
        assert s.findtext('authentication') == 'password-cleartext'
        if typ == 'imap':
            c = imaplib.IMAP4_SSL(host, port, ssl_context=tls) if sock == 'SSL' else imaplib.IMAP4(host, port)
            if sock == 'STARTTLS': c.starttls(ssl_context=tls)
            ok = c.login(login, password)[0]; c.logout()
        elif typ == 'pop3':
            c = poplib.POP3_SSL(host, port, context=tls) if sock == 'SSL' else poplib.POP3(host, port)
            if sock == 'STARTTLS': c.stls(context=tls)
            c.user(login); ok = c.pass_(password).decode().split()[0]; c.quit()
        else:
            c = smtplib.SMTP_SSL(host, port, context=tls) if sock == 'SSL' else smtplib.SMTP(host, port)
            if sock == 'STARTTLS': c.starttls(context=tls)
            ok = str(c.login(login, password)[0]); c.quit()
        seen.append(dict(kind=kind, type=typ, host=host, port=port, socket=sock, user=s.findtext('username'), ok=ok, name=name))
out(seen)
`,
    [file, caFile, alice.name, alice.password],
  );
  const p = gw.ports;
  assert.deepEqual(
    servers.map((s) => `${s.kind} ${s.type} ${s.host}:${s.port} ${s.socket}`),
    [
      `incomingServer imap ${MAIL_HOST}:${p.imaps} SSL`,
      `incomingServer imap ${MAIL_HOST}:${p.imap} STARTTLS`,
      `incomingServer pop3 ${MAIL_HOST}:${p.pop3s} SSL`,
      `outgoingServer smtp ${MAIL_HOST}:${p.smtps} SSL`,
      `outgoingServer smtp ${MAIL_HOST}:${p.submission} STARTTLS`,
    ],
    'exactly the TLS listeners, implicit TLS first; the MX listener (auth: none) is not a client server',
  );
  for (const s of servers) {
    assert.equal(s.user, '%EMAILLOCALPART%', 'login: local_part');
    assert.match(s.ok, /^(OK|\+OK|235)$/, `${s.type} ${s.port} ${s.socket} logged in: ${s.ok}`);
  }
  assert.equal(servers[0]!.name, 'E2E Mail – Grüße', 'UTF-8 display name intact');

  const wellKnown = await curl(MAIL_HOST, '/.well-known/autoconfig/mail/config-v1.1.xml');
  assert.equal(wellKnown.status, 200);
  assert.equal(wellKnown.body.toString(), tb.body.toString(), 'the well-known path serves the same file');
  const stranger = await curl(`autoconfig.${DOMAIN}`, '/mail/config-v1.1.xml?emailaddress=someone%40example.com');
  assert.equal(stranger.status, 404, 'an address of another domain gets nothing');
  const plain = await run('curl', ['-sS', '-o', '/dev/null', '-w', '%{http_code}', '--resolve', `autoconfig.${DOMAIN}:${p.https}:127.0.0.1`, '--cacert', caFile, '-X', 'POST', `https://autoconfig.${DOMAIN}:${p.https}/mail/config-v1.1.xml`]);
  assert.equal(plain.stdout, '502', 'other methods go to the backend (down here)');
});

/** What Outlook 2016 and later POSTs (captured from Outlook for Windows). */
const OUTLOOK_REQUEST =
  '<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">' +
  `<Request><EMailAddress>${alice.name}@${DOMAIN}</EMailAddress>` +
  '<AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema></Request></Autodiscover>';

test('Outlook autodiscover: a real Outlook request body gets IMAP, POP3 and SMTP settings of the running listeners; DOCTYPEs and big bodies are refused', async () => {
  const body = join(dir, 'outlook-request.xml');
  await fsp.writeFile(body, OUTLOOK_REQUEST);
  const headers = ['-H', 'Content-Type: text/xml', '-H', 'User-Agent: Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17928; Pro)'];
  const r = await curl(`autodiscover.${DOMAIN}`, '/Autodiscover/Autodiscover.xml', ['-X', 'POST', '--data-binary', `@${body}`, ...headers]);
  assert.equal(r.status, 200);
  assert.match(r.type, /^application\/xml/);
  const answer = join(dir, 'outlook-answer.xml');
  await fsp.writeFile(answer, r.body);
  const parsed = await python<{ action: string; protocols: string[] }>(
    `
import xml.etree.ElementTree as ET
ns = {'a': 'http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006', 'o': 'http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a'}
root = ET.parse(sys.argv[1]).getroot()
acct = root.find('o:Response/o:Account', ns)
out(dict(action=acct.findtext('o:Action', namespaces=ns), protocols=[
  ' '.join([p.findtext('o:Type', namespaces=ns), p.findtext('o:Server', namespaces=ns) + ':' + p.findtext('o:Port', namespaces=ns), p.findtext('o:Encryption', namespaces=ns), p.findtext('o:LoginName', namespaces=ns)])
  for p in acct.findall('o:Protocol', ns)]))
`,
    [answer],
  );
  const p = gw.ports;
  assert.equal(parsed.action, 'settings');
  assert.deepEqual(parsed.protocols, [
    `IMAP ${MAIL_HOST}:${p.imaps} SSL alice`,
    `IMAP ${MAIL_HOST}:${p.imap} TLS alice`,
    `POP3 ${MAIL_HOST}:${p.pop3s} SSL alice`,
    `SMTP ${MAIL_HOST}:${p.smtps} SSL alice`,
    `SMTP ${MAIL_HOST}:${p.submission} TLS alice`,
  ]);

  const bomb = join(dir, 'bomb.xml');
  await fsp.writeFile(bomb, `<?xml version="1.0"?><!DOCTYPE a [<!ENTITY a "${'x'.repeat(100)}"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>${OUTLOOK_REQUEST.slice(OUTLOOK_REQUEST.indexOf('?>') + 2).replace(`${alice.name}@`, '&b;@')}`);
  const refused = await curl(`autodiscover.${DOMAIN}`, '/autodiscover/autodiscover.xml', ['-X', 'POST', '--data-binary', `@${bomb}`]);
  assert.equal(refused.status, 400);
  assert.match(refused.body.toString(), /DOCTYPE/);
  const big = join(dir, 'big.xml');
  await fsp.writeFile(big, OUTLOOK_REQUEST + ' '.repeat(20_000));
  assert.equal((await curl(`autodiscover.${DOMAIN}`, '/autodiscover/autodiscover.xml', ['-X', 'POST', '--data-binary', `@${big}`])).status, 413);
  const other = join(dir, 'other.xml');
  await fsp.writeFile(other, OUTLOOK_REQUEST.replace(`@${DOMAIN}`, '@example.com'));
  const foreign = await curl(`autodiscover.${DOMAIN}`, '/autodiscover/autodiscover.xml', ['-X', 'POST', '--data-binary', `@${other}`]);
  assert.match(foreign.body.toString(), /<ErrorCode>600<\/ErrorCode>/, 'an address of another domain gets an error, no settings');
});

test('Apple profile: openssl cms -verify checks the signature against the gateway certificate, plistlib reads the plist', async () => {
  const local = 'a&b';
  const r = await curl(MAIL_HOST, `/.well-known/mail.mobileconfig?email=${encodeURIComponent(`${local}@${DOMAIN}`)}`);
  assert.equal(r.status, 200, r.body.toString());
  assert.equal(r.type, 'application/x-apple-aspen-config');
  const signed = join(dir, 'profile.mobileconfig');
  const plist = join(dir, 'profile.plist');
  const signer = join(dir, 'signer.pem');
  await fsp.writeFile(signed, r.body);
  const v = await run('openssl', ['cms', '-verify', '-inform', 'DER', '-in', signed, '-CAfile', caFile, '-purpose', 'any', '-out', plist, '-signer', signer]);
  assert.equal(v.code, 0, `openssl cms -verify: ${v.stderr}`);
  assert.match(v.stderr, /Verification successful/);
  const subject = await run('openssl', ['x509', '-in', signer, '-noout', '-subject']);
  assert.match(subject.stdout, new RegExp(`CN *= *${MAIL_HOST.replace(/\./g, '\\.')}`), 'signed with the gateway certificate of the mail host');
  const profile = await python<Record<string, unknown>>(
    `
import plistlib
with open(sys.argv[1], 'rb') as f: p = plistlib.load(f)
m = p['PayloadContent'][0]
out(dict(type=p['PayloadType'], mtype=m['PayloadType'], account=m['EmailAccountType'], address=m['EmailAddress'], inHost=m['IncomingMailServerHostName'], inPort=m['IncomingMailServerPortNumber'], inSsl=m['IncomingMailServerUseSSL'], inUser=m['IncomingMailServerUsername'], outPort=m['OutgoingMailServerPortNumber'], outSsl=m['OutgoingMailServerUseSSL'], same=m['OutgoingPasswordSameAsIncomingPassword'], uuid=p['PayloadUUID']))
`,
    [plist],
  );
  assert.deepEqual(profile, {
    type: 'Configuration',
    mtype: 'com.apple.mail.managed',
    account: 'EmailTypeIMAP',
    address: `${local}@${DOMAIN}`,
    inHost: MAIL_HOST,
    inPort: gw.ports.imaps,
    inSsl: true,
    inUser: local,
    outPort: gw.ports.smtps,
    outSsl: true,
    same: true,
    uuid: profile.uuid,
  });
  assert.match(String(profile.uuid), /^[0-9A-F]{8}-[0-9A-F]{4}-8[0-9A-F]{3}-[89AB][0-9A-F]{3}-[0-9A-F]{12}$/);
  assert.equal((await curl(MAIL_HOST, '/.well-known/mail.mobileconfig?email=%3Cscript%3E%40e2e.test')).status, 404, 'not an address');
  assert.equal((await curl(MAIL_HOST, '/.well-known/mail.mobileconfig?email=alice%40example.com')).status, 404, 'not our domain');
});

test('MTA-STS: the policy is text/plain on mta-sts.<domain> only, and its id is the one `mailgate dns` prints', async () => {
  const r = await curl(`mta-sts.${DOMAIN}`, '/.well-known/mta-sts.txt');
  assert.equal(r.status, 200);
  assert.match(r.type, /^text\/plain/);
  assert.equal(r.body.toString(), `version: STSv1\r\nmode: enforce\r\nmx: ${MAIL_HOST}\r\nmax_age: 604800\r\n`);
  assert.equal((await curl(MAIL_HOST, '/.well-known/mta-sts.txt')).status, 502, 'on other hosts the path is the backend\'s');
  const dns = await run(process.execPath, [CLI, 'dns', '-s', join(gw.dir, 'control.sock')]);
  assert.equal(dns.code, 0, dns.stderr);
  const id = /^_mta-sts\.e2e\.test\.\s+\d+\s+IN\s+TXT\s+"v=STSv1; id=([0-9a-f]+)"$/m.exec(dns.stdout)?.[1];
  assert.ok(id, `a _mta-sts TXT record in:\n${dns.stdout}`);
  const { createHash } = await import('node:crypto');
  assert.equal(id, createHash('sha256').update(r.body).digest('hex').slice(0, 32), 'the id is the hash of the policy served');
});

async function metric(name: string, labels: string): Promise<number> {
  const r = await run('curl', ['-sS', `http://127.0.0.1:${metricsPort}/metrics`]);
  const line = r.stdout.split('\n').find((l) => l.startsWith(`${name}{${labels}}`));
  return line ? Number(line.split(' ').at(-1)) : NaN;
}

test('TLS-RPT: a gzipped report from curl is counted in the metrics and `mailgate status`; a gzip bomb gets 413', async () => {
  // RFC 8460 §4.8's example, for our domain.
  const report = {
    'organization-name': 'Company-X',
    'date-range': { 'start-datetime': '2026-11-25T00:00:00Z', 'end-datetime': '2026-11-25T23:59:59Z' },
    'contact-info': 'sts-reporting@company-x.example',
    'report-id': '5065427c-23d3-47ca-b6e0-946ea0e8c4be',
    policies: [
      {
        policy: { 'policy-type': 'sts', 'policy-string': ['version: STSv1', 'mode: enforce', `mx: ${MAIL_HOST}`, 'max_age: 604800'], 'policy-domain': DOMAIN, 'mx-host': [MAIL_HOST] },
        summary: { 'total-successful-session-count': 5326, 'total-failure-session-count': 303 },
        'failure-details': [
          { 'result-type': 'certificate-expired', 'sending-mta-ip': '2001:db8:abcd:0012::1', 'receiving-mx-hostname': MAIL_HOST, 'failed-session-count': 100 },
          { 'result-type': 'starttls-not-supported', 'sending-mta-ip': '2001:db8:abcd:0013::1', 'receiving-mx-hostname': MAIL_HOST, 'failed-session-count': 200 },
          { 'result-type': 'something-new', 'sending-mta-ip': '198.51.100.62', 'failed-session-count': 3 },
        ],
      },
    ],
  };
  const file = join(dir, 'report.json.gz');
  await fsp.writeFile(file, gzipSync(JSON.stringify(report)));
  const r = await curl(MAIL_HOST, '/.well-known/tlsrpt', ['-X', 'POST', '-H', 'Content-Type: application/tlsrpt+gzip', '--data-binary', `@${file}`]);
  assert.equal(r.status, 200, r.body.toString());
  await waitFor('the report in the metrics', async () => (await metric('mailgate_tlsrpt_reports_total', 'result="accepted"')) === 1, { timeoutMs: 5000 });
  assert.equal(await metric('mailgate_tlsrpt_sessions_total', `domain="${DOMAIN}",result="success"`), 5326);
  assert.equal(await metric('mailgate_tlsrpt_sessions_total', `domain="${DOMAIN}",result="failure"`), 303);
  assert.equal(await metric('mailgate_tlsrpt_failures_total', `domain="${DOMAIN}",type="certificate-expired"`), 100);
  assert.equal(await metric('mailgate_tlsrpt_failures_total', `domain="${DOMAIN}",type="other"`), 3, 'unknown result types are counted as other, never as sent');

  const bomb = join(dir, 'bomb.json.gz');
  await fsp.writeFile(bomb, gzipSync(Buffer.alloc(64 * 1024 * 1024, 0x20)));
  const refused = await curl(MAIL_HOST, '/.well-known/tlsrpt', ['-X', 'POST', '-H', 'Content-Type: application/tlsrpt+gzip', '--data-binary', `@${bomb}`]);
  assert.equal(refused.status, 413, '64 MiB of JSON whitespace in 64 KiB of gzip');
  await waitFor('the refusal in the metrics', async () => (await metric('mailgate_tlsrpt_reports_total', 'result="refused"')) === 1, { timeoutMs: 5000 });

  const status = await run(process.execPath, [CLI, 'status', '--json', '-s', join(gw.dir, 'control.sock')]);
  assert.equal(status.code, 0, status.stderr);
  assert.deepEqual((JSON.parse(status.stdout) as { tlsReports: unknown }).tlsReports, { accepted: 1, refused: 1, success: 5326, failure: 303 });
  assert.ok((await gw.logs()).some((l) => l.msg === 'TLS report received' && l.organization === 'Company-X'));
});

test('inbound MX as shipped (STARTTLS, auth: none, greet_delay, XCLIENT): swaks --tls delivers to Postfix, which logs the real client address', async () => {
  const marker = `mx-${randomBytes(4).toString('hex')}`;
  const r = await run('swaks', [
    '--server', '127.0.0.1', '--port', String(gw.ports.mx), '--local-interface', '127.0.0.5', '--tls', '--tls-sni', MAIL_HOST,
    '--ehlo', 'mta.sender.example', '--from', 'someone@sender.example', '--to', `bob@${DOMAIN}`, '--header', `Subject: ${marker}`, '--body', 'hello through the MX listener',
  ], { timeoutMs: 30_000 });
  assert.equal(r.code, 0, `swaks:\n${r.stdout}\n${r.stderr}`);
  assert.match(r.stdout, /^=== TLS started with cipher TLSv1\.[23]/m, 'STARTTLS was taken');
  assert.match(r.stdout, /^=== TLS peer DN="\/CN=mail\.e2e\.test"/m, 'with the certificate of the MX name');
  assert.match(r.stdout, /~> QUIT/, 'the whole session ran over TLS');
  const messages = await postfix.waitForMessages(1, 15_000);
  assert.ok(messages.some((m) => m.toString('latin1').includes(marker)), 'Postfix delivered the message');
  assert.match(await postfix.logs(), /client=[^\n]*\[127\.0\.0\.5\]/, 'Postfix logged the real client (XCLIENT), not the gateway');
  const end = await gw.waitForLog((l) => l.msg === 'session end' && l.listener === 'mx' && l.client === '127.0.0.5');
  assert.match(String(end.tls), /^TLSv1\.[23]$/);
  assert.equal(end.messages, 1);
});
