/**
 * The control socket and the metrics endpoint of the real daemon, with real
 * IMAP clients (Python's imaplib) through the gateway to a real Dovecot:
 * snapshot and events match what the sessions did, kill and ban act, the
 * socket's mode and group keep other users out, a client that does not read
 * is dropped without harm, the CLI verbs work through the socket, and the
 * metrics agree with known traffic.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import { createConnection, connect as tcpConnect } from 'node:net';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { ControlClient, ControlRequestError } from '../../src/control/client.ts';
import { encode, type ControlEvent, type Snapshot } from '../../src/control/protocol.ts';
import { renderFrame } from '../../src/tui/render.ts';
import { DashboardModel } from '../../src/tui/view-model.ts';
import { ImapHolder } from './control-helpers.ts';
import { LineClient, python, run } from './harness/clients.ts';
import { CLI, startGateway, type Gateway } from './harness/gateway.ts';
import { freePort, startDovecot, startPostfix, userByName, type Dovecot } from './harness/servers.ts';
import { waitFor } from '../helpers/wait.ts';

let dovecot: Dovecot;
let gw: Gateway;
let holder: ImapHolder;
let socketPath: string;
let metricsPort: number;
const alice = userByName('alice');
const bob = userByName('bob');
const carol = userByName('carol');

function groupId(name: string): number {
  for (const line of readFileSync('/etc/group', 'utf8').split('\n')) {
    const [n, , gid] = line.split(':');
    if (n === name && gid) return Number(gid);
  }
  throw new Error(`no group ${name}`);
}

before(async () => {
  dovecot = await startDovecot();
  metricsPort = await freePort();
  gw = await startGateway({
    listeners: [
      { name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` },
      { name: 'pop3s', protocol: 'pop3', tls: 'implicit', backend: `127.0.0.1:${dovecot.pop3Port}` },
    ],
    extra: {
      control: { socket: './control.sock', mode: '0660', group: 'nogroup' },
      metrics: { listen: `127.0.0.1:${metricsPort}` },
    },
    logLevel: 'info',
  });
  socketPath = join(gw.dir, 'control.sock');
  holder = new ImapHolder(gw.ports.imaps!, gw.certFile);
});

after(async () => {
  await holder?.close();
  await gw?.stop();
  await dovecot?.stop();
});

/** Subscribes and records every event. */
async function watch(): Promise<{ client: ControlClient; events: ControlEvent[]; wait<E extends ControlEvent>(pred: (e: ControlEvent) => e is E, what: string): Promise<E> }> {
  const client = await ControlClient.connect(socketPath);
  const events: ControlEvent[] = [];
  client.onEvents((b) => events.push(...b.events));
  await client.subscribe();
  return {
    client,
    events,
    wait(pred, what) {
      return waitFor(`the ${what} event`, () => events.find(pred) as never, { timeoutMs: 10_000, detail: () => `got ${JSON.stringify(events.map((e) => e.type))}` });
    },
  };
}

async function sessionOf(client: ControlClient, user: string) {
  const list = await client.request('sessions', {});
  return list.find((s) => s.user === user);
}

test('the snapshot and the events follow real IMAP sessions, with exact byte counts', async () => {
  const w = await watch();
  const opened = await holder.open('a', alice.name, alice.password);
  assert.ok(opened.ok, opened.error);
  const auth = await w.wait((e): e is Extract<ControlEvent, { type: 'authenticated' }> => e.type === 'authenticated' && e.session.user === 'alice', 'authenticated');
  const id = auth.session.id;
  assert.equal(auth.session.listener, 'imaps');
  assert.equal(auth.session.clientIp, '127.0.0.1');
  assert.equal(auth.session.backend, `127.0.0.1:${dovecot.imapPort}`);
  assert.equal(auth.session.tlsVersion, 'TLSv1.3');
  assert.ok(w.events.some((e) => e.type === 'opened' && e.session.id === id), 'opened came first');

  const fetched = await holder.fetch('a');
  assert.ok(fetched.ok && (fetched.messages ?? 0) > 0, fetched.error);

  // A second dashboard joining now sees the session in its snapshot.
  const late = await ControlClient.connect(socketPath);
  const snap = await late.subscribe();
  const inSnap = snap.sessions.find((s) => s.id === id);
  assert.equal(inSnap?.user, 'alice');
  assert.equal(inSnap?.state, 'relaying');
  assert.ok((inSnap?.bytesOut ?? 0) > 1000, 'the fetched mail shows in the byte count');
  late.close();

  // The coalesced update carries the byte counts while the session lives.
  await w.wait((e): e is Extract<ControlEvent, { type: 'update' }> => e.type === 'update' && e.id === id && e.bytesIn === fetched.sent, 'update with the bytes sent so far');

  const bye = await holder.logout('a');
  assert.ok(bye.ok, bye.error);
  const closed = await w.wait((e): e is Extract<ControlEvent, { type: 'closed' }> => e.type === 'closed' && e.id === id, 'closed');
  assert.ok(['client-closed', 'backend-closed', 'client-quit'].includes(closed.reason), `reason ${closed.reason}`);
  assert.equal(closed.user, 'alice');
  assert.equal(closed.bytesIn, bye.sent, 'bytes from the client = what imaplib sent');
  assert.equal(closed.bytesOut, bye.received, 'bytes to the client = what imaplib read');
  assert.equal(await sessionOf(w.client, 'alice'), undefined);
  w.client.close();
});

test('a failed login and a refused TLS handshake are events too', async () => {
  const w = await watch();
  const bad = await holder.open('bad', bob.name, 'wrong-password');
  assert.equal(bad.ok, false);
  await w.wait((e): e is Extract<ControlEvent, { type: 'auth-failed' }> => e.type === 'auth-failed' && e.user === 'bob', 'auth-failed');
  await holder.logout('bad');
  // Plain text to the implicit-TLS port.
  await new Promise<void>((resolve) => {
    const s = tcpConnect(gw.ports.imaps!, '127.0.0.1', () => s.write('HELLO I AM NOT TLS\r\n\r\n'));
    s.on('error', () => resolve());
    s.on('close', () => resolve());
  });
  await w.wait((e): e is Extract<ControlEvent, { type: 'closed' }> => e.type === 'closed' && e.reason === 'tls-handshake-failed', 'closed tls-handshake-failed');
  w.client.close();
});

test('kill from the socket ends the real session', async () => {
  const w = await watch();
  assert.ok((await holder.open('k', bob.name, bob.password)).ok);
  const s = await sessionOf(w.client, 'bob');
  assert.ok(s, 'bob is listed');
  assert.deepEqual(await w.client.request('kill', { id: s.id }), { id: s.id });
  const closed = await w.wait((e): e is Extract<ControlEvent, { type: 'closed' }> => e.type === 'closed' && e.id === s.id, 'closed');
  assert.equal(closed.reason, 'killed');
  const after = await holder.noop('k');
  assert.equal(after.ok, false, 'the client finds its connection gone');
  assert.equal(await sessionOf(w.client, 'bob'), undefined);
  await assert.rejects(w.client.request('kill', { id: s.id }), (e: ControlRequestError) => e.code === 'NOT_FOUND');
  w.client.close();
});

/** The session of a line client, found by its port. */
async function sessionAt(client: ControlClient, c: LineClient) {
  const port = c.socket.localPort;
  return waitFor('the session in the list', async () => (await client.request('sessions', {})).find((s) => s.clientPort === port));
}

test('a kill says what happened: the administrator closed it, never an internal error (issue 17)', async () => {
  const w = await watch();
  const imap = await LineClient.connect(gw.ports.imaps!, { tls: true });
  assert.match(await imap.readLine(), /^\* OK /);
  const pop3 = await LineClient.connect(gw.ports.pop3s!, { tls: true });
  assert.match(await pop3.readLine(), /^\+OK /);
  const spliced = await LineClient.connect(gw.ports.imaps!, { tls: true });
  await spliced.readLine();
  spliced.write(`s LOGIN ${carol.name} ${carol.password}\r\n`);
  assert.match((await spliced.readUntil(/^s /)).at(-1)!, /^s OK/);
  for (const c of [imap, pop3, spliced]) await w.client.request('kill', { id: (await sessionAt(w.client, c)).id });
  assert.equal(await imap.readLine(), '* BYE Connection closed by the administrator', 'before login, IMAP');
  assert.equal(await pop3.readLine(), '-ERR Connection closed by the administrator', 'before login, POP3');
  assert.equal(await spliced.readLine(), '* BYE Connection closed by the administrator', 'after login, between responses');
  for (const c of [imap, pop3, spliced]) assert.ok(await c.waitClosed());
  w.client.close();
});

test('ban from the socket ends the address’s sessions and keeps it out; unban lets it back', async (t) => {
  const w = await watch();
  const status = await w.client.request('status', {});
  assert.equal(status.bans.supported, true, 'the policy engine provides the ban list');
  assert.ok((await holder.open('b2', carol.name, carol.password, '127.0.0.2')).ok);
  assert.ok((await holder.open('b1', alice.name, alice.password, '127.0.0.1')).ok);
  const r = await w.client.request('ban', { ip: '127.0.0.2', seconds: 60 });
  assert.equal(r.killed, 1);
  await w.wait((e): e is Extract<ControlEvent, { type: 'banned' }> => e.type === 'banned' && e.ban.ip === '127.0.0.2', 'banned');
  assert.equal((await holder.noop('b2')).ok, false, 'the banned address lost its session');
  assert.ok((await holder.noop('b1')).ok, 'other addresses keep theirs');
  const again = await holder.open('b3', carol.name, carol.password, '127.0.0.2');
  assert.equal(again.ok, false, 'a banned address cannot log in');
  assert.ok((await w.client.request('bans', {})).some((b) => b.ip === '127.0.0.2'));
  assert.deepEqual(await w.client.request('unban', { ip: '127.0.0.2' }), { removed: true });
  assert.ok((await holder.open('b4', carol.name, carol.password, '127.0.0.2')).ok, 'unbanned: back in');
  await holder.logout('b4');
  await holder.logout('b1');
  w.client.close();
});

test('a ban set by hand tells the refused client its reason, as one clean line (the IMAP greeting)', async () => {
  const c = await ControlClient.connect(socketPath);
  try {
    await c.request('ban', { ip: '127.0.0.7', seconds: 60, reason: 'Abuse from your network\r\n* OK [ALERT] injected\u0007 \u2013 write to abuse@example.org' });
    const greeting = await LineClient.connect(gw.ports.imaps!, { tls: true, localAddress: '127.0.0.7' });
    assert.equal(await greeting.readLine(), '* BYE [UNAVAILABLE] Abuse from your network * OK [ALERT] injected write to abuse@example.org');
    assert.equal(await greeting.readFor(300), '', 'nothing after the one line');
    assert.equal(await greeting.waitClosed(), true, 'then the connection closes');
  } finally {
    await c.request('unban', { ip: '127.0.0.7' });
    c.close();
  }
});

test('a user is banned and lifted with the CLI verbs (bans, ban, unban); the client is told the administrator\'s reason', async () => {
  const cli = (...args: string[]) => run(process.execPath, [CLI, ...args, '-s', socketPath], { timeoutMs: 20_000 });
  assert.ok((await holder.open('u1', bob.name, bob.password, '127.0.0.5')).ok);
  assert.ok((await holder.open('u2', alice.name, alice.password, '127.0.0.5')).ok);

  const banned = await cli('ban', '--user', 'Bob', '--for', '10m', '--reason', 'Account locked: call the helpdesk');
  assert.equal(banned.code, 0, banned.stderr);
  assert.match(banned.stdout, /^banned user bob for 10m \(user:bob\)\n1 session ended\n$/);
  assert.equal((await holder.noop('u1')).ok, false, 'bob\'s session ended');
  assert.ok((await holder.noop('u2')).ok, 'alice from the same address keeps hers');
  const refused = await holder.open('u3', bob.name, bob.password, '127.0.0.6');
  assert.equal(refused.ok, false, 'bob is refused from another address too');
  assert.match(refused.error ?? '', /\[UNAVAILABLE\] Account locked: call the helpdesk/);

  const list = await cli('bans');
  assert.equal(list.code, 0, list.stderr);
  assert.match(list.stdout, /^ID +KIND +ADDRESS +USER +LEFT +SOURCE +REASON$/m);
  assert.match(list.stdout, /^user:bob +user +- +bob +(9m\d\d|10m) +manual +Account locked: call the helpdesk$/m);
  const c = await ControlClient.connect(socketPath);
  try {
    const user = (await c.request('bans', {})).find((b) => b.kind === 'user');
    assert.deepEqual([user?.id, user?.ip, user?.user, user?.source], ['user:bob', null, 'bob', 'manual']);
  } finally {
    c.close();
  }

  const lifted = await cli('unban', '--user', 'bob');
  assert.deepEqual([lifted.code, lifted.stdout], [0, 'lifted\n']);
  const again = await cli('unban', '--user', 'bob');
  assert.deepEqual([again.code, again.stdout], [1, 'no such ban\n']);
  assert.equal((await cli('unban')).code, 2, 'nothing named: a usage error');
  assert.ok((await holder.open('u4', bob.name, bob.password, '127.0.0.6')).ok, 'bob is back in');
  await holder.logout('u4');
  await holder.logout('u2');
});

/** Connects to the socket as another user, with a system binary (the checkout may not be readable by that user). */
function connectAs(uid: number, gid: number): { status: number | null; stdout: string; stderr: string } {
  const script = [
    'import errno, socket, sys',
    's = socket.socket(socket.AF_UNIX)',
    'try:',
    '    s.connect(sys.argv[1])',
    'except OSError as e:',
    '    print(errno.errorcode[e.errno], end="")',
    '    sys.exit(3)',
    'print("CONNECTED " + s.recv(4096).decode().split("\\n")[0], end="")',
  ].join('\n');
  const r = spawnSync('setpriv', [`--reuid=${uid}`, `--regid=${gid}`, '--clear-groups', '/usr/bin/python3', '-c', script, socketPath], { encoding: 'utf8', timeout: 10_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

test('the socket file has the configured mode and group; other users get EACCES', () => {
  const st = statSync(socketPath);
  assert.ok(st.isSocket());
  assert.equal(st.mode & 0o777, 0o660);
  const nogroup = groupId('nogroup');
  assert.equal(st.gid, nogroup);
  const nobody = 65534;
  const outsider = connectAs(nobody, groupId('daemon'));
  assert.equal(outsider.stdout, 'EACCES', `a user outside the group is refused (${outsider.stderr})`);
  assert.equal(outsider.status, 3);
  const member = connectAs(nobody, nogroup);
  assert.match(member.stdout, /^CONNECTED \{"type":"hello","protocol":1/, `a member of the group connects (${member.stderr})`);
});

test('a client that does not read is dropped; the gateway and other clients carry on', async () => {
  assert.ok((await holder.open('s', alice.name, alice.password)).ok);
  const slow = createConnection({ path: socketPath });
  // The daemon hangs up on it while it is still writing: EPIPE is the expected end.
  slow.on('error', () => undefined);
  await new Promise<void>((r) => slow.once('connect', () => r()));
  slow.pause();
  // Each status answer is over a kilobyte: ask for far more than the 8 MiB the daemon holds for one client.
  const req = encode({ id: 1, cmd: 'status' });
  let written = 0;
  while (written < 12_000 && !slow.destroyed) {
    slow.write(req.repeat(500));
    written += 500;
    await new Promise((r) => setImmediate(r));
  }
  await gw.waitForLog((l) => l.msg === 'control client does not read its output, dropped', 15_000);
  slow.destroy();
  const ok = await holder.noop('s');
  assert.ok(ok.ok, 'IMAP sessions are unaffected');
  const c = await ControlClient.connect(socketPath);
  const st = await c.request('status', {});
  assert.ok(st.control.dropped >= 1);
  c.close();
  await holder.logout('s');
});

test('the CLI verbs work through the socket; a refused reload exits non-zero with the daemon’s error', async () => {
  const cli = (...args: string[]) => run(process.execPath, [CLI, ...args], { timeoutMs: 20_000 });
  const status = await cli('status', '-c', gw.configFile);
  assert.equal(status.code, 0, status.stderr);
  assert.match(status.stdout, /^mailgate \S+ +pid \d+/);
  assert.match(status.stdout, /imaps +imap +implicit +127\.0\.0\.1:\d+ +up/);
  const json = await cli('status', '-s', socketPath, '--json');
  assert.equal(json.code, 0, json.stderr);
  assert.deepEqual((JSON.parse(json.stdout) as { listeners: { name: string }[] }).listeners.map((l) => l.name), ['imaps', 'pop3s']);
  const certs = await cli('certs', '-c', gw.configFile);
  assert.equal(certs.code, 0, certs.stderr);
  assert.match(certs.stdout, /mail\.e2e\.test +self-signed/);
  const reload = await cli('reload', '-c', gw.configFile);
  assert.equal(reload.code, 0, reload.stderr);
  assert.match(reload.stdout, /^reloaded/);

  const good = readFileSync(gw.configFile, 'utf8');
  try {
    await gw.writeRaw(good.replace(/^listeners:/m, 'listenerz:'));
    const refused = await cli('reload', '-s', socketPath);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /reload refused/);
    assert.match(refused.stderr, /mailgate\.yaml:\d+:\d+: listenerz: unknown key/);
  } finally {
    await gw.writeRaw(good);
  }
  const nowhere = await cli('status', '-s', join(gw.dir, 'missing.sock'));
  assert.equal(nowhere.code, 1);
  assert.match(nowhere.stderr, /no control socket there/);
});

// ---- metrics --------------------------------------------------------------------------------

async function scrape(): Promise<Map<string, number>> {
  const res = await fetch(`http://127.0.0.1:${metricsPort}/metrics`);
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
  const out = new Map<string, number>();
  for (const line of (await res.text()).split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const i = line.lastIndexOf(' ');
    out.set(line.slice(0, i), Number(line.slice(i + 1)));
  }
  return out;
}

test('metrics scraped over HTTP agree with known traffic', async () => {
  const before = await scrape();
  const delta = (after: Map<string, number>, key: string) => (after.get(key) ?? 0) - (before.get(key) ?? 0);

  // Known traffic: two good logins, one failed login, one TLS handshake failure.
  const a = await holder.open('m1', alice.name, alice.password);
  const f = await holder.fetch('m1');
  const a2 = await holder.logout('m1');
  const c = await holder.open('m2', carol.name, carol.password);
  const c2 = await holder.logout('m2');
  const b = await holder.open('m3', bob.name, 'nope');
  const b2 = await holder.logout('m3');
  assert.ok(a.ok && f.ok && a2.ok && c.ok && c2.ok && !b.ok && b2.ok);
  await new Promise<void>((resolve) => {
    const s = tcpConnect(gw.ports.imaps!, '127.0.0.1', () => s.write('NOT TLS\r\n'));
    s.on('error', () => resolve());
    s.on('close', () => resolve());
  });
  // Wait until the registry has let go of all four.
  const control = await ControlClient.connect(socketPath);
  for (let i = 0; i < 100 && (await control.request('sessions', {})).length > 0; i++) await new Promise((r) => setTimeout(r, 50));
  control.close();

  const after = await scrape();
  const L = '{listener="imaps"';
  assert.equal(delta(after, `mailgate_sessions_accepted_total${L}}`), 4);
  assert.equal(delta(after, `mailgate_auth_total${L},result="ok"}`), 2);
  assert.equal(delta(after, `mailgate_auth_total${L},result="fail"}`), 1);
  assert.equal(delta(after, `mailgate_tls_handshake_errors_total${L},kind="failed"}`), 1);
  assert.equal(delta(after, `mailgate_backend_connect_seconds_count${L}}`), 3, 'two good logins and the failed one reached the backend');
  assert.equal(delta(after, `mailgate_bytes_total${L},direction="in"}`), (a2.sent ?? 0) + (c2.sent ?? 0) + (b2.sent ?? 0), 'what the clients sent (plaintext: the failed handshake adds nothing)');
  assert.equal(delta(after, `mailgate_bytes_total${L},direction="out"}`), (a2.received ?? 0) + (c2.received ?? 0) + (b2.received ?? 0));
  assert.equal(after.get(`mailgate_sessions${L},state="relaying"}`), 0);
  assert.equal(after.get(`mailgate_listener_up${L}}`), 1);
  assert.equal(after.get(`mailgate_backend_up${L}}`), 1);
  const cert = new X509Certificate(readFileSync(gw.certFile));
  const expiry = [...after].find(([k]) => k.startsWith('mailgate_certificate_expiry_timestamp_seconds{name="mail.e2e.test"'));
  assert.equal(expiry?.[1], Math.floor(new Date(cert.validTo).getTime() / 1000));
});

test('a backend that answers but offers no AUTH for passthrough is MISCONFIGURED in status, metrics and the dashboard model, not DOWN', async () => {
  // A real Postfix without SASL: a legacy relay, up and answering, with no AUTH to offer.
  const sink = await startPostfix({ noAuth: true });
  const port = await freePort();
  const mis = await startGateway({
    listeners: [{ name: 'smtps', protocol: 'smtp', tls: 'implicit', backend: `127.0.0.1:${sink.port}`, auth: 'required', authentication: 'passthrough' }],
    extra: { metrics: { listen: `127.0.0.1:${port}` } },
    logLevel: 'info',
  });
  try {
    const r = await python<{ code: number; text: string }>(
      `
import smtplib
s = smtplib.SMTP_SSL('127.0.0.1', int(sys.argv[1]), context=ctx(), timeout=10)
try:
    s.login('alice', 'secret')
    out({'code': 235, 'text': ''})
except smtplib.SMTPException as e:
    out({'code': getattr(e, 'smtp_code', -1), 'text': str(e)})
`,
      [mis.ports.smtps!],
    );
    assert.notEqual(r.code, 235, 'no login without a backend that can check it');
    const line = await mis.waitForLog((l) => l.msg === 'session end' && l.reason === 'backend-no-auth');
    assert.equal(line.listener, 'smtps');

    const status = await run(process.execPath, [CLI, 'status', '-s', join(mis.dir, 'control.sock')]);
    assert.equal(status.code, 0, status.stderr);
    const row = status.stdout.split('\n').find((l) => l.startsWith('smtps '));
    assert.match(row ?? '', /MISCONFIGURED \(backend offers no AUTH; use authentication: local, or enable AUTH on the backend\)$/, status.stdout);
    assert.doesNotMatch(row ?? '', /DOWN/, 'the listener is up and the backend answers: not an outage');
    const json = JSON.parse((await run(process.execPath, [CLI, 'status', '-s', join(mis.dir, 'control.sock'), '--json'])).stdout) as { listeners: { backendHealth: { state: string; error: string; ok: boolean } }[] };
    assert.deepEqual([json.listeners[0]?.backendHealth.state, json.listeners[0]?.backendHealth.error, json.listeners[0]?.backendHealth.ok], ['misconfigured', 'backend-no-auth', false]);

    const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    assert.match(text, /^mailgate_backend_up\{listener="smtps"\} 1$/m, 'the backend is up');
    assert.match(text, /^mailgate_backend_misconfigured\{listener="smtps"\} 1$/m);
    assert.match(text, /^mailgate_sessions_closed_total\{listener="smtps",reason="backend-no-auth"\} 1$/m);

    // The dashboard draws what the socket says.
    const c = await ControlClient.connect(join(mis.dir, 'control.sock'));
    try {
      const snap: Snapshot = await c.subscribe();
      const m = new DashboardModel();
      m.applySnapshot(snap, Date.now());
      const frame = renderFrame(m, 120, 40, Date.now(), { bottom: '', prompting: false, detail: null, unicode: true, configFile: null, socketPath: '' }).join('\n');
      assert.match(frame, /backend MISCONFIGURED: smtps/);
      assert.doesNotMatch(frame, /backend DOWN/);
    } finally {
      c.close();
    }
  } finally {
    await mis.stop();
    await sink.stop();
  }
});
