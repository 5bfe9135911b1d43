/**
 * Backend pools end to end: one IMAPS listener in front of two real
 * Dovecot instances (`backend: [A, B]`, health checks every second).
 * Sessions are held open with a TLS line client; where each one went is read
 * from `mailgate status --json` (the pool section) and the metrics.
 *  - sessions are spread over both members (least sessions, counted per
 *    process: exactly alternating with one, per worker with several);
 *  - A stopped: the runtime's check finds it down within the interval,
 *    new sessions all go to B (no client sees an error), and the session
 *    already spliced to B carries on untouched;
 *  - A started again: found up within the interval, and it takes the next
 *    sessions (it has the fewest).
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { LineClient, run } from './harness/clients.ts';
import { CLI, startGateway, type Gateway } from './harness/gateway.ts';
import { freePort, startDovecot, userByName, type Dovecot } from './harness/servers.ts';
import { waitFor } from '../helpers/wait.ts';

let a: Dovecot;
let b: Dovecot;
let gw: Gateway;
let metricsPort = 0;
const alice = userByName('alice');
const held: LineClient[] = [];
const INTERVAL_MS = 1000;

before(async () => {
  [a, b] = await Promise.all([startDovecot(), startDovecot()]);
  metricsPort = await freePort();
  gw = await startGateway({
    listeners: [
      {
        name: 'imaps',
        protocol: 'imap',
        tls: 'implicit',
        backend: [`127.0.0.1:${a.imapPort}`, `127.0.0.1:${b.imapPort}`],
        health_check: { interval: `${INTERVAL_MS}ms` },
        timeouts: { backend_connect: '1s' },
      },
    ],
    extra: { metrics: { listen: `127.0.0.1:${metricsPort}` } },
  });
});

after(async () => {
  for (const c of held) c.close();
  await gw?.stop();
  await Promise.all([a?.stop(), b?.stop()]);
});

interface Member {
  backend: string;
  up: boolean;
  sessions: number;
  error: string | null;
}

async function pool(): Promise<Record<'a' | 'b', Member>> {
  const r = await run(process.execPath, [CLI, 'status', '--json', '-c', gw.configFile]);
  assert.equal(r.code, 0, r.stderr);
  const st = JSON.parse(r.stdout) as { listeners: { name: string; pool?: Member[] }[] };
  const members = st.listeners.find((l) => l.name === 'imaps')?.pool ?? [];
  const find = (port: number) => members.find((m) => m.backend === `127.0.0.1:${port}`)!;
  return { a: find(a.imapPort), b: find(b.imapPort) };
}

async function login(): Promise<LineClient> {
  const c = await LineClient.connect(gw.ports.imaps!, { tls: true });
  assert.match(await c.readLine(), /^\* OK/);
  c.write(`a1 LOGIN ${alice.name} ${alice.password}\r\n`);
  const lines = await c.readUntil(/^a1 /);
  assert.match(lines.at(-1) ?? '', /^a1 OK/, lines.join('\n'));
  held.push(c);
  return c;
}

async function metric(name: string, port: number): Promise<string | undefined> {
  const r = await run('curl', ['-sS', `http://127.0.0.1:${metricsPort}/metrics`]);
  return new RegExp(`^${name}\\{listener="imaps",backend="127\\.0\\.0\\.1:${port}"\\} (\\S+)$`, 'm').exec(r.stdout)?.[1];
}

let onB: LineClient | undefined;
let onBBefore = 0;
const workers = Number(process.env.MAILGATE_E2E_WORKERS ?? 1);

test('sessions are spread over both members (least sessions); status and metrics show both up', async () => {
  await waitFor('both members checked', async () => {
    const p = await pool();
    return p.a?.up && p.b?.up ? p : undefined;
  });
  for (let i = 0; i < 4; i++) await login();
  const p = await pool();
  // Least sessions is counted per process: one process alternates exactly; with workers each alternates its own share.
  if (workers === 1) assert.deepEqual([p.a.sessions, p.b.sessions], [2, 2]);
  else assert.ok(p.a.sessions >= 1 && p.b.sessions >= 1, JSON.stringify(p));
  const logins = (await gw.logs()).filter((l) => l.msg === 'login ok');
  onB = held[logins.findIndex((l) => l.backend === `127.0.0.1:${b.imapPort}`)];
  assert.ok(onB, 'a session on B');
  onBBefore = p.b.sessions;
  assert.equal(await metric('mailgate_pool_member_up', a.imapPort), '1');
  assert.equal(await metric('mailgate_pool_member_sessions', b.imapPort), String(p.b.sessions));
});

test('A stopped: found down within the check interval; new sessions all go to B; the session on B is untouched', async () => {
  const stoppedAt = Date.now();
  await a.halt();
  const p = await waitFor('A found down', async () => {
    const st = await pool();
    return st.a.up ? undefined : st;
  }, { timeoutMs: 10_000, intervalMs: 100 });
  const detectedMs = Date.now() - stoppedAt;
  // One interval, plus the check itself and the status round trip.
  assert.ok(detectedMs <= INTERVAL_MS + 2500, `found down after ${detectedMs} ms`);
  assert.ok(p.a.error, 'the status says why');
  for (let i = 0; i < 3; i++) await login();
  const after = await pool();
  assert.equal(after.a.sessions, 0);
  assert.equal(after.b.sessions, onBBefore + 3, 'the three new sessions and those from before are on B');
  onB!.write('n1 NOOP\r\n');
  assert.match((await onB!.readUntil(/^n1 /)).at(-1) ?? '', /^n1 OK/, 'the spliced session on B carries on');
  assert.equal(await metric('mailgate_pool_member_up', a.imapPort), '0');
});

test('A started again: found up within the interval, and it takes new sessions again', async () => {
  const startedAt = Date.now();
  await a.restart();
  await waitFor('A found up', async () => ((await pool()).a.up ? true : undefined), { timeoutMs: 10_000, intervalMs: 100 });
  assert.ok(Date.now() - startedAt <= INTERVAL_MS + 4000);
  const before = (await pool()).b.sessions;
  for (let i = 0; i < 2; i++) await login();
  const p = await pool();
  assert.ok(p.a.sessions >= 1, 'the member with the fewest sessions took new ones');
  if (workers === 1) assert.deepEqual([p.a.sessions, p.b.sessions], [2, before]);
  assert.match(await a.logs(), /Login: user=<alice>/);
});
