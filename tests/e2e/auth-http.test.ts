/**
 * authentication: http end to end. One small auth_http service (in the
 * test process) answers: alice with her password → OK and a backend (real
 * Dovecot for IMAP, real Postfix for SMTP); a wrong password → "Invalid
 * login or password" with Auth-Wait: 1; dave → a temporary error
 * (Auth-Error-Code 451 4.3.0). The same service is driven by mailgate and
 * by nginx's own mail proxy (libnginx-mod-mail), through Python's imaplib
 * and smtplib: both gateways get the same answers from it (their requests
 * carry the same auth headers) and give their clients the same outcomes.
 * The service stopped: mailgate answers with the temporary failure.
 */
import assert from 'node:assert/strict';
import type { IncomingHttpHeaders } from 'node:http';
import { existsSync } from 'node:fs';
import { after, before, test } from 'node:test';
import { python } from './harness/clients.ts';
import { startGateway, type Gateway } from './harness/gateway.ts';
import { NGINX_MAIL_MODULE, startAuthService, type AuthAnswer, startNginxMail, type AuthService, type NginxMail } from './harness/peers.ts';
import { startDovecot, startPostfix, userByName, type Dovecot, type Postfix } from './harness/servers.ts';

let dovecot: Dovecot;
let postfix: Postfix;
let service: AuthService;
let nginx: NginxMail;
let gw: Gateway;
const alice = userByName('alice');

test('prerequisite: nginx\'s mail module is installed (.ci/install-deps.sh: libnginx-mod-mail)', () => {
  assert.ok(existsSync(NGINX_MAIL_MODULE), `${NGINX_MAIL_MODULE} is missing`);
});

before(async () => {
  [dovecot, postfix] = await Promise.all([startDovecot(), startPostfix()]);
  service = await startAuthService((user, pass, h): AuthAnswer => {
    const smtp = h['auth-protocol'] === 'smtp';
    if (user === 'dave') return { headers: { 'Auth-Status': 'Temporary server problem, try again later', 'Auth-Error-Code': '451 4.3.0', 'Auth-Wait': '1' } };
    if (user === alice.name && pass === alice.password) {
      return { headers: { 'Auth-Status': 'OK', 'Auth-Server': '127.0.0.1', 'Auth-Port': String(smtp ? postfix.port : dovecot.imapPort) } };
    }
    const refused: Record<string, string> = { 'Auth-Status': 'Invalid login or password', 'Auth-Wait': '1' };
    if (smtp) refused['Auth-Error-Code'] = '535 5.7.8';
    return { headers: refused };
  });
  const authHeader: [string, string] = ['X-Auth-Key', 'e2e-secret'];
  [nginx, gw] = await Promise.all([
    startNginxMail({ authUrl: service.url, authHeader }),
    startGateway({
      listeners: [
        { name: 'imap', protocol: 'imap', tls: 'none', require_tls: false, backend: `127.0.0.1:${dovecot.imapPort}`, authentication: 'http' },
        { name: 'smtp', protocol: 'smtp', tls: 'none', require_tls: false, backend: `127.0.0.1:${postfix.port}`, authentication: 'http' },
      ],
      extra: { auth_http: { url: service.url, timeout: '2s', headers: { [authHeader[0]]: authHeader[1] } } },
    }),
  ]);
});

after(async () => {
  await Promise.all([gw?.stop(), nginx?.stop()]);
  await service?.stop();
  await Promise.all([dovecot?.stop(), postfix?.stop()]);
});

interface Outcomes {
  imap: { ok: string; wrong: string; wrongSeconds: number; temp: string };
  smtp: { ok: number; sent: object; wrong: number; wrongSeconds: number; temp: number };
}

/** The three scenarios over IMAP and SMTP through one gateway, with real clients. */
function scenarios(imapPort: number, smtpPort: number, marker: string): Promise<Outcomes> {
  return python<Outcomes>(
    `
import imaplib, smtplib, time
imap_port, smtp_port, user, pw, marker = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
def imap(u, p):
    m = imaplib.IMAP4('127.0.0.1', imap_port, timeout=15)
    try:
        typ, _ = m.login(u, p)
        typ2, _ = m.select('INBOX')
        m.logout()
        return typ + ' ' + typ2
    except imaplib.IMAP4.error as e:
        return 'NO ' + str(e)
def smtp(u, p, send=False):
    s = smtplib.SMTP('127.0.0.1', smtp_port, timeout=15)
    s.ehlo('client.e2e.test')
    try:
        code, _ = s.login(u, p)
    except smtplib.SMTPAuthenticationError as e:
        return e.smtp_code, None
    except smtplib.SMTPResponseException as e:
        return e.smtp_code, None
    sent = s.sendmail('alice@e2e.test', ['bob@e2e.test'], 'Subject: %s\\r\\n\\r\\nhello\\r\\n' % marker) if send else None
    s.quit()
    return code, sent
t = time.time(); wrong = imap(user, pw + 'x'); wrong_s = time.time() - t
r = {'imap': {'ok': imap(user, pw), 'wrong': wrong, 'wrongSeconds': wrong_s, 'temp': imap('dave', 'whatever')}}
ok, sent = smtp(user, pw, True)
t = time.time(); wrong, _ = smtp(user, pw + 'x'); wrong_s = time.time() - t
temp, _ = smtp('dave', 'whatever')
r['smtp'] = {'ok': ok, 'sent': sent, 'wrong': wrong, 'wrongSeconds': wrong_s, 'temp': temp}
out(r)
`,
    [imapPort, smtpPort, alice.name, alice.password, marker],
    60_000,
  );
}

const COMPARED = ['auth-method', 'auth-user', 'auth-pass', 'auth-protocol', 'auth-login-attempt', 'client-ip', 'client-host', 'x-auth-key'];

function picked(h: IncomingHttpHeaders): Record<string, unknown> {
  return Object.fromEntries(COMPARED.map((k) => [k, h[k]]));
}

let fromNginx: IncomingHttpHeaders[] = [];
let fromMailgate: IncomingHttpHeaders[] = [];
let viaNginx: Outcomes;
let viaMailgate: Outcomes;

test('through nginx\'s mail proxy: OK logs in, a wrong password is refused after Auth-Wait, the temporary error is temporary', async () => {
  const start = service.requests.length;
  viaNginx = await scenarios(nginx.imapPort, nginx.smtpPort, 'via-nginx');
  fromNginx = service.requests.slice(start).map((r) => r.headers);
  assert.equal(viaNginx.imap.ok, 'OK OK');
  assert.match(viaNginx.imap.wrong, /^NO /);
  assert.ok(viaNginx.imap.wrongSeconds >= 0.9, `nginx waited Auth-Wait (${viaNginx.imap.wrongSeconds} s)`);
  assert.match(viaNginx.imap.temp, /^NO .*Temporary/);
  assert.equal(viaNginx.smtp.ok, 235);
  assert.deepEqual(viaNginx.smtp.sent, {});
  assert.equal(viaNginx.smtp.wrong, 535);
  assert.equal(Math.floor(viaNginx.smtp.temp / 100), 4);
});

test('through mailgate: the same outcomes from the same service, over IMAP and SMTP', async () => {
  const start = service.requests.length;
  viaMailgate = await scenarios(gw.ports.imap!, gw.ports.smtp!, 'via-mailgate');
  fromMailgate = service.requests.slice(start).map((r) => r.headers);
  assert.equal(viaMailgate.imap.ok, 'OK OK', 'alice reached Dovecot through the Auth-Server the service named');
  assert.match(viaMailgate.imap.wrong, /^NO .*AUTHENTICATIONFAILED/);
  assert.ok(viaMailgate.imap.wrongSeconds >= 0.9, `mailgate waited Auth-Wait (${viaMailgate.imap.wrongSeconds} s)`);
  assert.match(viaMailgate.imap.temp, /^NO .*UNAVAILABLE/);
  assert.equal(viaMailgate.smtp.ok, 235, 'alice\'s login was replayed on Postfix');
  assert.deepEqual(viaMailgate.smtp.sent, {});
  assert.equal(viaMailgate.smtp.wrong, 535);
  assert.ok(viaMailgate.smtp.wrongSeconds >= 0.9);
  assert.equal(Math.floor(viaMailgate.smtp.temp / 100), 4, 'a temporary failure, never a pass');
  const delivered = (await postfix.waitForMessages(2)).map((m) => m.toString('latin1'));
  assert.ok(delivered.some((m) => m.includes('Subject: via-nginx')) && delivered.some((m) => m.includes('Subject: via-mailgate')));
});

test('the service saw the same auth requests from both gateways, but for a repeated wrong password mailgate answered from its negative cache', () => {
  // smtplib tries PLAIN, then LOGIN, with the same wrong password: nginx asks twice, mailgate once.
  const repeated = (h: IncomingHttpHeaders) => h['auth-protocol'] === 'smtp' && h['auth-user'] === alice.name && h['auth-pass'] !== alice.password && h['auth-login-attempt'] === '2';
  assert.equal(fromNginx.filter(repeated).length, 1, 'nginx asked again');
  assert.deepEqual(fromMailgate.map(picked), fromNginx.filter((h) => !repeated(h)).map(picked));
});

test('the service down: mailgate answers with the protocol\'s temporary failure and logs why, without the password', async () => {
  await service.stop();
  const r = await python<{ imap: string; smtp: number }>(
    `
import imaplib, smtplib
m = imaplib.IMAP4('127.0.0.1', int(sys.argv[1]), timeout=15)
try:
    m.login(sys.argv[3], sys.argv[4]); imap = 'OK'
except imaplib.IMAP4.error as e:
    imap = str(e)
s = smtplib.SMTP('127.0.0.1', int(sys.argv[2]), timeout=15)
s.ehlo('client.e2e.test')
try:
    code, _ = s.login(sys.argv[3], sys.argv[4])
except smtplib.SMTPResponseException as e:
    code = e.smtp_code
out({'imap': imap, 'smtp': code})
`,
    [gw.ports.imap!, gw.ports.smtp!, alice.name, alice.password],
  );
  assert.match(r.imap, /UNAVAILABLE/);
  assert.equal(r.smtp, 454);
  await gw.waitForLog((l) => l.msg.startsWith('auth_http service unavailable'));
  assert.ok(!(await gw.rawLogs()).includes(alice.password), 'no password in the log');
});
