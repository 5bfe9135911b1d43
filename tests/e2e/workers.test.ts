/**
 * Two worker processes (`workers: 2`) behind one primary, with real clients
 * (Python's imaplib and ssl, curl) through the gateway to a real Dovecot and
 * nginx: sessions land on both workers and the control socket sees them all;
 * a kill reaches the worker that owns the session; a ban, a brute-force count
 * and a concurrent-session limit hold across workers; a reload reaches every
 * worker, with the copy of the config the primary read (never the file as it
 * is later); a TLS session ticket from one worker resumes on the other; a dead
 * worker is replaced; the workers stop with the primary, and without it.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { ControlClient } from '../../src/control/client.ts';
import type { SessionInfo } from '../../src/control/protocol.ts';
import { ImapHolder } from './control-helpers.ts';
import { python, run } from './harness/clients.ts';
import { CLI, startGateway, type Gateway } from './harness/gateway.ts';
import { sleep } from '../helpers/proc.ts';
import { waitFor } from '../helpers/wait.ts';
import { freePort, startDovecot, startNginx, userByName, type Dovecot, type Nginx } from './harness/servers.ts';

let dovecot: Dovecot;
let nginx: Nginx;
let gw: Gateway;
let holder: ImapHolder;
let metricsPort: number;
const alice = userByName('alice');
const bob = userByName('bob');

before(async () => {
  [dovecot, nginx] = await Promise.all([startDovecot(), startNginx()]);
  metricsPort = await freePort();
  gw = await startGateway({
    workers: 2,
    listeners: [
      { name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` },
      { name: 'https', protocol: 'http', tls: 'implicit', backend: `127.0.0.1:${nginx.port}` },
      // Only for the concurrent-session test: the other tests open many sessions from one address.
      { name: 'imaps-limited', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` },
    ],
    extra: {
      brute_force: { per_address: { failures: 4, window: '10m', ban: '10m' }, per_address_user: { failures: 100 }, per_user: { failures: 1000 } },
      rate_limits: [{ limit: 'concurrent', per: 'address', max: 3, listeners: ['imaps-limited'] }],
      metrics: { listen: `127.0.0.1:${metricsPort}` },
    },
    logLevel: 'info',
  });
  holder = new ImapHolder(gw.ports.imaps!, gw.certFile);
});

after(async () => {
  await holder?.close();
  await gw?.stop();
  await Promise.all([dovecot?.stop(), nginx?.stop()]);
});

async function sessions(): Promise<SessionInfo[]> {
  const c = await ControlClient.connect(join(gw.dir, 'control.sock'));
  try {
    return (await c.subscribe()).sessions;
  } finally {
    c.close();
  }
}

/** The live sessions, once `ready` holds for them. */
function sessionsWhere(what: string, ready: (s: SessionInfo[]) => boolean): Promise<SessionInfo[]> {
  return waitFor(what, async () => {
    const s = await sessions();
    return ready(s) && s;
  });
}

/** The worker's pid is the session id's prefix (base 36). */
function pidOf(id: string): number {
  return Number.parseInt(id.split('-')[0]!, 36);
}

test('sessions land on both workers; the primary serves none and sees them all', async () => {
  const names = Array.from({ length: 10 }, (_, i) => `s${i}`);
  for (const n of names) assert.equal((await holder.open(n, alice.name, alice.password, '127.0.0.2')).ok, true, n);
  const live = await sessionsWhere('every session of alice', (s) => s.filter((x) => x.user === alice.name).length === names.length);
  const pids = new Set(live.filter((x) => x.user === alice.name).map((x) => pidOf(x.id)));
  assert.equal(pids.size, 2, `10 sessions over SO_REUSEPORT should reach both workers, got pids ${[...pids].join(',')}`);
  assert.ok(!pids.has(gw.proc.pid), 'the primary serves no client');
  // `mailgate status` names the workers, with the pids that own the sessions.
  const status = await run(process.execPath, [CLI, 'status', '-c', gw.configFile]);
  assert.equal(status.code, 0, status.stderr);
  const line = status.stdout.split('\n').find((l) => l.startsWith('workers 2: '));
  assert.ok(line, status.stdout);
  for (const pid of pids) assert.match(line, new RegExp(`pid ${pid} ready`));
  for (const n of names) assert.equal((await holder.logout(n)).ok, true);
  await sessionsWhere('no session of alice', (s) => s.every((x) => x.user !== alice.name));
});

test('kill by session id reaches the worker that owns it', async () => {
  const names = Array.from({ length: 8 }, (_, i) => `k${i}`);
  for (const n of names) assert.equal((await holder.open(n, bob.name, bob.password, '127.0.0.3')).ok, true);
  const live = await sessionsWhere('every session of bob', (s) => s.filter((x) => x.user === bob.name).length === names.length);
  const byPid = new Map<number, SessionInfo>();
  for (const s of live.filter((x) => x.user === bob.name)) byPid.set(pidOf(s.id), s);
  assert.equal(byPid.size, 2);
  const c = await ControlClient.connect(join(gw.dir, 'control.sock'));
  try {
    for (const s of byPid.values()) await c.request('kill', { id: s.id });
  } finally {
    c.close();
  }
  const left = await sessionsWhere('two sessions of bob fewer', (s) => s.filter((x) => x.user === bob.name).length === names.length - 2);
  for (const s of byPid.values()) assert.ok(!left.some((x) => x.id === s.id), `${s.id} was killed`);
  let failed = 0;
  for (const n of names) if (!(await holder.noop(n)).ok) failed++;
  assert.equal(failed, 2, 'exactly the two killed sessions are gone');
  for (const n of names) await holder.logout(n);
});

/** Opens one IMAPS connection from `source` and returns the first line the gateway sends (empty when it closes without one). */
async function greeting(source: string): Promise<string> {
  return python<string>(
    String.raw`
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[3])
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), 10, source_address=(sys.argv[2], 0))
try:
    t = ctx.wrap_socket(s, server_hostname='mail.e2e.test')
    out(t.recv(200).decode('latin1').split('\r\n')[0])
except (ssl.SSLError, ConnectionError, OSError):
    out('')
`,
    [gw.ports.imaps!, source, gw.certFile],
  ).then((r) => String(r));
}

test('a ban from the control socket applies in every worker', async () => {
  const c = await ControlClient.connect(join(gw.dir, 'control.sock'));
  try {
    await c.request('ban', { ip: '127.0.0.4', seconds: 600, reason: 'e2e' });
    // Ten connections: both workers answer (SO_REUSEPORT spreads source ports).
    await waitFor('every worker to refuse 127.0.0.4', async () => (await Promise.all(Array.from({ length: 10 }, () => greeting('127.0.0.4')))).every((l) => !l.startsWith('* OK')));
    assert.match(await greeting('127.0.0.5'), /^\* OK/, 'other addresses are served');
    await c.request('unban', { ip: '127.0.0.4' });
    await waitFor('every worker to serve 127.0.0.4 again', async () => (await Promise.all(Array.from({ length: 6 }, () => greeting('127.0.0.4')))).every((l) => l.startsWith('* OK')));
  } finally {
    c.close();
  }
});

test('failed logins are counted across workers: the fourth bans the address everywhere', async () => {
  // Four failures, each on a new connection, so they are spread over both workers.
  for (let i = 0; i < 4; i++) {
    const r = await holder.open(`bf${i}`, alice.name, 'wrong-password', '127.0.0.6');
    assert.equal(r.ok, false);
  }
  await gw.waitForLog((l) => l.msg === 'banned after failed logins' && l.client === '127.0.0.6');
  const lines = await waitFor('every worker to refuse 127.0.0.6', async () => {
    const ls = await Promise.all(Array.from({ length: 8 }, () => greeting('127.0.0.6')));
    return ls.every((l) => !l.startsWith('* OK')) && ls;
  });
  assert.equal(lines.length, 8);
  const c = await ControlClient.connect(join(gw.dir, 'control.sock'));
  try {
    await c.request('unban', { ip: '127.0.0.6' });
  } finally {
    c.close();
  }
});

test('a concurrent-session limit per address holds across workers', async () => {
  const limited = new ImapHolder(gw.ports['imaps-limited']!, gw.certFile);
  try {
    const ok: string[] = [];
    for (let i = 0; i < 6; i++) {
      const r = await limited.open(`c${i}`, bob.name, bob.password, '127.0.0.7');
      if (r.ok) ok.push(`c${i}`);
      // The counts travel through the primary: give them a moment before the next connection.
      await sleep(100);
    }
    assert.equal(ok.length, 3, `max 3 at once from one address, across both workers; got ${ok.length}`);
    for (const n of ok) await limited.logout(n);
  } finally {
    await limited.close();
  }
});

test('a TLS session ticket from one worker resumes on the other', async () => {
  const reused = await python<number[]>(
    String.raw`
import socket, ssl, sys, json
ctx = ssl.create_default_context(cafile=sys.argv[2])
def once(session):
    s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), 10)
    t = ctx.wrap_socket(s, server_hostname='mail.e2e.test', session=session)
    t.recv(200)
    r = (t.session_reused, t.session)
    t.close()
    return r
_, sess = once(None)
out = []
for i in range(12):
    r, _ = once(sess)
    out.append(1 if r else 0)
print(json.dumps(out))
`,
    [gw.ports.imaps!, gw.certFile],
  );
  assert.deepEqual(reused, Array(12).fill(1), 'every resumption succeeds, whichever worker gets it');
});

test('HTTPS works through the workers, a new connection per request', async () => {
  const url = `https://mail.e2e.test:${gw.ports.https}/`;
  const r = await run('curl', ['-sS', '--cacert', gw.certFile, '--resolve', `mail.e2e.test:${gw.ports.https}:127.0.0.1`, '-H', 'Connection: close', '-w', '%{http_code}\\n', ...Array.from({ length: 6 }, () => ['-o', '/dev/null', url]).flat()]);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(r.stdout.trim().split('\n'), Array(6).fill('200'));
});

test('a reload reaches every worker', async () => {
  await gw.rewrite((c) => {
    (c.listeners as Record<string, unknown>[]).push({ name: 'pop3s', protocol: 'pop3', tls: 'implicit', backend: `127.0.0.1:${dovecot.pop3Port}`, listen: '127.0.0.1:0' });
  });
  gw.signal('SIGHUP');
  // The primary reports once every worker has answered; each worker logs its own reload.
  const line = await gw.waitForLog((l) => l.msg === 'configuration reloaded' && l.worker === undefined);
  assert.equal(line.workers, 2);
  assert.deepEqual(line.started, ['pop3s']);
  const byWorker = await waitFor('both workers to log their reload', async () => {
    const w = (await gw.logs()).filter((l) => l.msg === 'configuration reloaded' && l.worker !== undefined).map((l) => Number(l.worker));
    return w.length >= 2 && w;
  });
  assert.deepEqual([...byWorker].sort(), [1, 2]);
  // The new listener answers, whichever worker takes the connection.
  const port = Number(((await gw.logs()).find((l) => l.msg === 'listener up' && l.listener === 'pop3s')?.addresses as string[])[0]!.split(':')[1]);
  for (let i = 0; i < 6; i++) {
    const greeting = await python<string>(
      String.raw`
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), 10)
t = ctx(sys.argv[2]).wrap_socket(s, server_hostname='mail.e2e.test')
out(t.recv(200).decode('latin1').split('\r\n')[0])
`,
      [port, gw.certFile],
    );
    assert.match(greeting, /^\+OK/);
  }
});

test('the workers run the primary\'s copy of the config: a file edited after the primary read it reaches no worker, at a reload or at a restart', async () => {
  const edited = await startGateway({
    workers: 2,
    listeners: [{ name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` }],
  });
  const pop3 = (name: string) => ({ name, protocol: 'pop3', tls: 'implicit', backend: `127.0.0.1:${dovecot.pop3Port}`, listen: '127.0.0.1:0' });
  const addListener = (name: string) => edited.rewrite((c) => (c.listeners as Record<string, unknown>[]).push(pop3(name)));
  const workersOf = async () => (JSON.parse((await run(process.execPath, [CLI, 'status', '-c', edited.configFile, '--json'])).stdout) as { workers: { index: number; pid: number }[] }).workers;
  const up = async (name: string) => (await edited.logs()).filter((l) => l.msg === 'listener up' && l.listener === name).map((l) => Number(l.worker));
  try {
    // The workers are held still, so the reload reaches them only after the file changed again.
    const before = await workersOf();
    for (const w of before) process.kill(w.pid, 'SIGSTOP');
    try {
      await addListener('pop3-primary');
      edited.signal('SIGHUP');
      await edited.waitForLog((l) => l.msg === 'configuration checked; serving it');
      await addListener('pop3-file');
    } finally {
      for (const w of before) process.kill(w.pid, 'SIGCONT');
    }
    const reloaded = await edited.waitForLog((l) => l.msg === 'configuration reloaded' && l.worker === undefined);
    assert.deepEqual(reloaded.started, ['pop3-primary']);
    assert.deepEqual((await up('pop3-primary')).sort(), [1, 2], 'both workers serve the copy the primary read');
    // A worker started now (the file says pop3-file) gets the primary's copy too.
    const victim = before[0]!;
    process.kill(victim.pid, 'SIGKILL');
    await edited.waitForLog((l) => l.msg === 'worker restarted');
    await waitFor('the new worker to serve pop3-primary', async () => (await up('pop3-primary')).filter((w) => w === victim.index).length === 2);
    assert.deepEqual(await up('pop3-file'), [], 'no worker read the file');
  } finally {
    await edited.stop();
  }
});

test('a worker that dies is replaced, and service goes on', async () => {
  assert.equal((await holder.open('d0', alice.name, alice.password)).ok, true);
  const live = await sessionsWhere('a session of alice', (s) => s.some((x) => x.user === alice.name));
  const victim = pidOf(live.find((x) => x.user === alice.name)!.id);
  process.kill(victim, 'SIGKILL');
  await gw.waitForLog((l) => l.msg === 'worker restarted');
  // The dead worker's session is gone from the primary's view; new connections all work.
  await sessionsWhere('no session of the dead worker', (s) => s.every((x) => pidOf(x.id) !== victim));
  for (let i = 0; i < 8; i++) assert.match(await greeting('127.0.0.8'), /^\* OK/);
  await holder.logout('d0').catch(() => undefined);
  // The metrics say so too.
  const metrics = (await run('curl', ['-sS', `http://127.0.0.1:${metricsPort}/metrics`])).stdout;
  assert.match(metrics, /^mailgate_workers\{state="ready"\} 2$/m);
  const restarts = [...metrics.matchAll(/^mailgate_worker_restarts_total\{worker="\d+"\} (\d+)$/gm)].map((m) => Number(m[1]));
  assert.equal(restarts.length, 2);
  assert.ok(restarts.reduce((a, b) => a + b, 0) >= 1, metrics);
});

test('SIGTERM to one worker drains that worker alone; the primary starts another', async () => {
  const before = (await gw.logs()).filter((l) => l.msg === 'worker restarted').length;
  const r = await run(process.execPath, [CLI, 'status', '-c', gw.configFile, '--json']);
  const status = JSON.parse(r.stdout) as { workers: { index: number; pid: number }[] };
  const victim = status.workers[0]!;
  process.kill(victim.pid, 'SIGTERM');
  await gw.waitForLog((l) => l.msg === 'SIGTERM: this worker stops; the primary replaces it' && l.worker === victim.index);
  await waitFor('a worker restarted', async () => (await gw.logs()).filter((l) => l.msg === 'worker restarted').length > before, { timeoutMs: 15_000 });
  const after = JSON.parse((await run(process.execPath, [CLI, 'status', '-c', gw.configFile, '--json'])).stdout) as { workers: { index: number; pid: number; state: string }[] };
  const slot = after.workers.find((w) => w.index === victim.index);
  assert.ok(slot && slot.pid !== victim.pid && slot.state === 'ready', JSON.stringify(after.workers));
  for (let i = 0; i < 6; i++) assert.match(await greeting('127.0.0.9'), /^\* OK/);
});

test('a worker whose event loop is stuck (SIGSTOP) is killed after worker_timeout and replaced', async () => {
  const stuck = await startGateway({
    workers: 2,
    listeners: [{ name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` }],
    extra: { worker_timeout: '2s' },
    logLevel: 'info',
  });
  try {
    const r = await run(process.execPath, [CLI, 'status', '-c', stuck.configFile, '--json']);
    const victim = (JSON.parse(r.stdout) as { workers: { index: number; pid: number }[] }).workers[0]!;
    process.kill(victim.pid, 'SIGSTOP');
    const line = await stuck.waitForLog((l) => l.msg === 'worker does not answer; killing it', 10_000);
    assert.equal(line.pid, victim.pid);
    assert.ok(Number(line.silentMs) >= 2000, `killed after the timeout, not before (${String(line.silentMs)} ms)`);
    await stuck.waitForLog((l) => l.msg === 'worker restarted', 10_000);
    assert.equal(alive(victim.pid), false);
  } finally {
    await stuck.stop();
  }
});

test('the workers stop with the primary (SIGTERM), and on their own when it is killed', async () => {
  const other = await startGateway({
    workers: 2,
    listeners: [{ name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` }],
    logLevel: 'info',
  });
  try {
    const pidsOf = async () => {
      const r = await run('pgrep', ['-P', String(other.proc.pid)]);
      return r.stdout.trim().split('\n').filter(Boolean).map(Number);
    };
    const workers = await pidsOf();
    assert.equal(workers.length, 2);
    // `ps` tells the roles apart.
    const title = (pid: number) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0+$/, '');
    assert.equal(title(other.proc.pid), 'mailgate: primary (2 workers)');
    assert.deepEqual(workers.map(title).sort(), ['mailgate: worker 1', 'mailgate: worker 2']);
    process.kill(other.proc.pid, 'SIGKILL');
    await waitFor('both workers to be gone', () => workers.every((p) => !alive(p)), { timeoutMs: 10_000 });
  } finally {
    await other.stop();
  }
  // The main gateway's SIGTERM path is exercised by after(): it must end within the harness' stop deadline.
});

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
