/**
 * The PROXY protocol header mailgate sends to its backends (`proxy_protocol:
 * v1 | v2`), end to end: a real Dovecot with `haproxy = yes` and
 * `haproxy_trusted_networks`, a real Postfix with
 * `smtpd_upstream_proxy_protocol = haproxy`. Clients on 127.0.0.55 and
 * 127.0.0.56 log in over IMAPS and SMTPS with Python's imaplib and
 * smtplib; the backends' own logs show the client's address (neither IMAP
 * ID nor XCLIENT is used here, so the header alone carried it), and the
 * gateway's capability probes are accepted (v2 LOCAL; v1 names the probe
 * connection itself, as Postfix refuses v1 UNKNOWN).
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { python } from './harness/clients.ts';
import { startGateway, type Gateway } from './harness/gateway.ts';
import { startDovecot, startPostfix, userByName, type Dovecot, type Postfix } from './harness/servers.ts';

let dovecot: Dovecot;
let postfix: Postfix;
let gw: Gateway;
const alice = userByName('alice');

before(async () => {
  [dovecot, postfix] = await Promise.all([startDovecot({ haproxy: true }), startPostfix({ upstreamProxy: true })]);
  const imap = `127.0.0.1:${dovecot.haproxyImapPort}`;
  const smtp = `127.0.0.1:${postfix.proxyPort}`;
  gw = await startGateway({
    listeners: [
      { name: 'imaps-v1', protocol: 'imap', tls: 'implicit', backend: imap, proxy_protocol: 'v1', imap_id: false },
      { name: 'imaps-v2', protocol: 'imap', tls: 'implicit', backend: imap, proxy_protocol: 'v2', imap_id: false },
      { name: 'smtps-v1', protocol: 'smtp', tls: 'implicit', backend: smtp, proxy_protocol: 'v1', xclient: false },
      { name: 'smtps-v2', protocol: 'smtp', tls: 'implicit', backend: smtp, proxy_protocol: 'v2', xclient: false },
    ],
  });
});

after(async () => {
  await gw?.stop();
  await Promise.all([dovecot?.stop(), postfix?.stop()]);
});

function imapFrom(source: string, port: number): Promise<{ login: string; caps: string }> {
  return python(
    `
import imaplib
class From(imaplib.IMAP4_SSL):
    def _create_socket(self, timeout):
        s = socket.create_connection((self.host, self.port), timeout, source_address=(sys.argv[1], 0))
        return self.ssl_context.wrap_socket(s, server_hostname=self.host)
m = From('127.0.0.1', int(sys.argv[2]), ssl_context=ctx(), timeout=10)
caps = ' '.join(m.capabilities)
typ, _ = m.login(sys.argv[3], sys.argv[4])
m.select('INBOX')
m.logout()
out({'login': typ, 'caps': caps})
`,
    [source, port, alice.name, alice.password],
  );
}

function smtpFrom(source: string, port: number, subject: string): Promise<{ login: number; sent: object }> {
  return python(
    `
import smtplib
s = smtplib.SMTP_SSL('127.0.0.1', int(sys.argv[2]), context=ctx(), timeout=10, source_address=(sys.argv[1], 0))
code, _ = s.login(sys.argv[3], sys.argv[4])
sent = s.sendmail('alice@e2e.test', ['bob@e2e.test'], 'Subject: %s\\r\\n\\r\\nhello\\r\\n' % sys.argv[5])
s.quit()
out({'login': code, 'sent': sent})
`,
    [source, port, alice.name, alice.password, subject],
  );
}

for (const [version, source] of [['v1', '127.0.0.55'], ['v2', '127.0.0.56']] as const) {
  test(`IMAP with a PROXY ${version} header: Dovecot (haproxy = yes) logs the client's address; the greeting has the backend's capabilities`, async () => {
    const r = await imapFrom(source, gw.ports[`imaps-${version}`]!);
    assert.equal(r.login, 'OK');
    assert.match(r.caps, /IMAP4REV1/);
    assert.doesNotMatch(await gw.rawLogs(), /backend capability probe failed/, 'the probes with a PROXY header were answered');
    const log = await dovecot.logs();
    assert.match(log, new RegExp(`Login: user=<alice>, method=PLAIN, rip=${source.replaceAll('.', '\\.')},`));
  });

  test(`SMTP with a PROXY ${version} header: Postfix (smtpd_upstream_proxy_protocol = haproxy) sees the client's address`, async () => {
    const r = await smtpFrom(source, gw.ports[`smtps-${version}`]!, `proxy-${version}`);
    assert.equal(r.login, 235);
    assert.deepEqual(r.sent, {});
    assert.doesNotMatch(await gw.rawLogs(), /backend capability probe failed/, 'the probes with a PROXY header were answered');
    const log = await postfix.logs();
    assert.match(log, new RegExp(`connect from [^\\s]*\\[${source.replaceAll('.', '\\.')}\\]`));
    assert.match(log, new RegExp(`client=[^\\s]*\\[${source.replaceAll('.', '\\.')}\\].*sasl_username=alice`));
  });
}
