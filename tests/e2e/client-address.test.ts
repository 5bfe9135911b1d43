/**
 * Who the backend and the client are told about, end to end: the POP3
 * XCLIENT a real Dovecot takes the client's address from, a client over IPv6
 * (::1) whose address reaches Dovecot, and two certificates chosen by SNI.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { python, run } from './harness/clients.ts';
import { startGateway, type Gateway } from './harness/gateway.ts';
import { freePort, startDovecot, userByName, type Dovecot } from './harness/servers.ts';
import { makeTempDir, removeTempDir } from '../helpers/proc.ts';
import { waitFor } from '../helpers/wait.ts';

let dovecot: Dovecot;
let gw: Gateway;
let dir: string;
const bob = userByName('bob');
const carol = userByName('carol');

/** An ECDSA certificate for `name` from openssl. */
function certificate(name: string): { cert: string; key: string } {
  const cert = join(dir, `${name}.crt`);
  const key = join(dir, `${name}.key`);
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '30',
    '-subj', `/CN=${name}`, '-addext', `subjectAltName=DNS:${name}`, '-keyout', key, '-out', cert,
  ], { stdio: 'ignore' });
  return { cert, key };
}

before(async () => {
  dir = await makeTempDir('client-address');
  dovecot = await startDovecot();
  const imapPort = await freePort();
  gw = await startGateway({
    ports: { imaps: imapPort },
    extra: { tls: { dir: './certs', certificates: [certificate('imap.e2e.test'), certificate('webmail.e2e.test')] } },
    listeners: [
      { name: 'pop3s', protocol: 'pop3', tls: 'implicit', backend: `127.0.0.1:${dovecot.pop3Port}` },
      { name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}`, listen: [`127.0.0.1:${imapPort}`, `[::1]:${imapPort}`] },
    ],
  });
});

after(async () => {
  await gw?.stop();
  await dovecot?.stop();
  if (dir) await removeTempDir(dir);
});

/** Dovecot's login line for `user` by `service` (imap-login or pop3-login) with the given remote address. */
function loginLine(logs: string, service: string, user: string, rip: string): string | undefined {
  return logs.split('\n').find((l) => l.includes(`${service}: Info: Login: user=<${user}>`) && l.includes(` rip=${rip},`));
}

test('POP3: the gateway tells Dovecot the client\'s address with XCLIENT, and Dovecot logs it as the remote address', async () => {
  const r = await python<{ stat: number[] }>(
    `
import poplib, socket
class P(poplib.POP3_SSL):
    def _create_socket(self, timeout):
        return self.context.wrap_socket(socket.create_connection((self.host, self.port), timeout, source_address=('127.0.0.7', 0)), server_hostname=self.host)
p = P('127.0.0.1', int(sys.argv[1]), context=ctx())
p.user(sys.argv[2]); p.pass_(sys.argv[3])
out({'stat': list(p.stat())})
p.quit()
`,
    [gw.ports.pop3s!, bob.name, bob.password],
  );
  assert.ok(r.stat[0]! > 0, 'logged in and listed the mailbox');
  const line = await waitFor('Dovecot\'s pop3-login line with rip=127.0.0.7', async () => loginLine(await dovecot.logs(), 'pop3-login', bob.name, '127.0.0.7'), { detail: () => dovecot.logs() });
  assert.match(line, /lip=/);
});

test('IPv6: a client on ::1 logs in over IMAPS, and Dovecot sees ::1 as its address (IMAP ID)', async () => {
  const r = await run('curl', ['-sk', '--max-time', '10', '-u', `${carol.name}:${carol.password}`, `imaps://[::1]:${gw.ports.imaps}/`]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /INBOX/);
  await waitFor('Dovecot\'s imap-login line with rip=::1', async () => loginLine(await dovecot.logs(), 'imap-login', carol.name, '::1'), { detail: () => dovecot.logs() });
  const ended = await gw.waitForLog((l) => l.msg === 'session end' && l.user === carol.name);
  assert.equal(ended.client, '::1');
});

test('SNI: each name gets its own certificate, and a client without SNI gets the first (the default)', async () => {
  const subject = async (servername: string | undefined) => {
    const r = await run('openssl', ['s_client', '-connect', `127.0.0.1:${gw.ports.imaps}`, ...(servername ? ['-servername', servername] : ['-noservername']), '-brief'], { input: '' });
    return `${r.stdout}${r.stderr}`;
  };
  assert.match(await subject('imap.e2e.test'), /Peer certificate: CN ?= ?imap\.e2e\.test/);
  assert.match(await subject('webmail.e2e.test'), /Peer certificate: CN ?= ?webmail\.e2e\.test/);
  assert.match(await subject(undefined), /Peer certificate: CN ?= ?imap\.e2e\.test/);
  assert.match(await subject('unknown.e2e.test'), /Peer certificate: CN ?= ?imap\.e2e\.test/);
});
