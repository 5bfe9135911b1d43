/**
 * `mailgate top` in a real terminal (tmux, 120x40) against the real daemon
 * with live IMAP sessions (Python's imaplib through the gateway to Dovecot):
 * the pane shows the sessions, users and counters; keys sort, filter, show
 * a detail, kill (the session is gone from the daemon) and reload; the
 * dashboard survives a daemon restart and says so; `q` exits with status 0.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { ControlClient } from '../../src/control/client.ts';
import { ImapHolder, TmuxPane } from './control-helpers.ts';
import { CLI, startGateway, type Gateway } from './harness/gateway.ts';
import { startDovecot, userByName, type Dovecot } from './harness/servers.ts';

let dovecot: Dovecot;
let gw: Gateway;
let holder: ImapHolder;
let pane: TmuxPane | undefined;
let second: ChildProcess | undefined;
let socketPath: string;
let exitFile: string;

before(async () => {
  dovecot = await startDovecot();
  gw = await startGateway({
    listeners: [
      { name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` },
      { name: 'pop3s', protocol: 'pop3', tls: 'implicit', backend: `127.0.0.1:${dovecot.pop3Port}` },
    ],
    extra: { control: { socket: './control.sock' }, timeouts: { shutdown_drain: '1s' } },
    logLevel: 'info',
  });
  socketPath = join(gw.dir, 'control.sock');
  exitFile = join(gw.dir, 'top.exit');
  holder = new ImapHolder(gw.ports.imaps!, gw.certFile);
});

after(async () => {
  pane?.kill();
  if (second && second.exitCode === null) {
    second.kill('SIGTERM');
    await new Promise((r) => second!.once('exit', r));
  }
  await holder?.close();
  await gw?.stop();
  await dovecot?.stop();
});

/** The session table rows (lines starting with a session id) in screen order. */
function sessionRows(screen: string): string[] {
  return screen.split('\n').filter((l) => /^[0-9a-z]+-[0-9a-z]+ +imaps /.test(l));
}

function usersInOrder(screen: string): string[] {
  return sessionRows(screen).map((l) => l.split(/\s+/)[3]!);
}

async function daemonUsers(): Promise<(string | null)[]> {
  const c = await ControlClient.connect(socketPath);
  try {
    return (await c.request('sessions', {})).map((s) => s.user).sort();
  } finally {
    c.close();
  }
}

test('mailgate top in tmux: sessions, users and counters; sort, filter, detail, kill; restart; quit', async () => {
  for (const name of ['alice', 'bob', 'carol']) {
    const u = userByName(name);
    const r = await holder.open(name, u.name, u.password);
    assert.ok(r.ok, r.error);
  }
  assert.ok((await holder.fetch('alice')).ok);
  assert.deepEqual(await daemonUsers(), ['alice', 'bob', 'carol']);

  pane = new TmuxPane(gw.dir, `env LANG=C.UTF-8 ${process.execPath} ${CLI} top -s ${socketPath}; echo $? > ${exitFile}`, 120, 40);

  // What is on the screen: the three sessions with their users, and the counters.
  let screen = await pane.waitFor((s) => ['alice', 'bob', 'carol'].every((u) => s.includes(u)) && s.includes('● live'), 'the three users');
  if (process.env.MAILGATE_DASHBOARD_CAPTURE) writeFileSync(process.env.MAILGATE_DASHBOARD_CAPTURE, screen);
  assert.match(screen, /sessions 3 \(3 auth\)/);
  assert.match(screen, /auth ok 3 fail 0/);
  assert.equal(sessionRows(screen).length, 3);
  const imapsRow = screen.split('\n').find((l) => l.startsWith('imaps ') && l.includes(' imap '));
  assert.ok(imapsRow, `a listener row for imaps:\n${screen}`);
  const cells = imapsRow.trim().split(/\s+/);
  assert.deepEqual([cells[0], cells[1], cells[2], cells[4], cells[5], cells[6]], ['imaps', 'imap', '3', '3', '0', '0'], 'listener, proto, sessions, auth ok, fail, refused');
  const aliceRow = sessionRows(screen).find((l) => l.includes(' alice '));
  assert.match(aliceRow ?? '', / 1\.3 .* relay\s*$/, 'TLS version and state are shown');
  assert.match(aliceRow ?? '', / \d+(\.\d)?k /, 'the fetched mail shows as kilobytes out');

  // Sort: s cycles age → idle → id → listener → client → user.
  pane.keys('s', 's', 's', 's', 's');
  screen = await pane.waitFor((s) => s.includes('USER▲'), 'sorting by user');
  assert.deepEqual(usersInOrder(screen), ['alice', 'bob', 'carol']);
  pane.keys('S');
  screen = await pane.waitFor((s) => s.includes('USER▼'), 'reversed sort');
  assert.deepEqual(usersInOrder(screen), ['carol', 'bob', 'alice']);

  // Filter: / bob Enter.
  pane.keys('/');
  pane.type('bob');
  pane.keys('Enter');
  screen = await pane.waitFor((s) => s.includes('filter "bob"') && sessionRows(s).length === 1, 'the filter');
  assert.deepEqual(usersInOrder(screen), ['bob']);

  // Detail of the selected session, then back.
  pane.keys('Enter');
  screen = await pane.waitFor((s) => s.includes('last activity'), 'the detail view');
  assert.match(screen, /user +bob/);
  assert.match(screen, /TLS +TLSv1\.3 /);
  pane.keys('Escape');
  await pane.waitFor((s) => sessionRows(s).length === 1 && !s.includes('last activity'), 'back to the table');

  // Kill with confirmation: K asks, y kills; the daemon no longer has bob.
  pane.keys('K');
  screen = await pane.waitFor((s) => /Kill session \S+ \(bob from 127\.0\.0\.1 on imaps/.test(s), 'the kill confirmation');
  assert.deepEqual(await daemonUsers(), ['alice', 'bob', 'carol'], 'nothing happens before the answer');
  pane.keys('y');
  await pane.waitFor((s) => s.includes('no session matches "bob"'), 'bob gone from the table');
  assert.deepEqual(await daemonUsers(), ['alice', 'carol'], 'the daemon ended the session');
  assert.equal((await holder.noop('bob')).ok, false, 'the client lost its connection');
  screen = pane.capture();
  assert.match(screen, /killed session \S+/);
  assert.match(screen, /killed: \S+ bob from 127\.0\.0\.1 on imaps/, 'the close reason is in the event log');

  // Escape clears the filter.
  pane.keys('Escape');
  screen = await pane.waitFor((s) => sessionRows(s).length === 2, 'the unfiltered table');
  assert.match(screen, /sessions 2 \(2 auth\)/);

  // r asks the daemon to reload; its answer lands in the event log.
  pane.keys('r');
  await pane.waitFor((s) => s.includes('configuration reloaded'), 'the reload result');

  // The daemon restarts: the dashboard says it lost it, then that it is back.
  const oldPid = gw.proc.pid;
  gw.signal('SIGTERM');
  await gw.proc.exited;
  await pane.waitFor((s) => s.includes('daemon unreachable'), 'the lost daemon');
  second = spawn(process.execPath, [CLI, 'run', '-c', gw.configFile], { cwd: gw.dir, stdio: 'ignore' });
  screen = await pane.waitFor((s) => s.includes('● live') && /the daemon restarted \(pid \d+ → \d+\)/.test(s), 'the reconnection', 20_000);
  assert.ok(screen.includes(`pid ${second.pid}`), `the new daemon's pid is shown (old ${oldPid})`);
  assert.match(screen, /sessions 0 \(0 auth\)/);

  // q leaves, restoring the terminal, with exit status 0.
  pane.keys('q');
  const deadline = Date.now() + 10_000;
  while (pane.alive() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  assert.equal(pane.alive(), false, 'the pane closed');
  assert.equal(readFileSync(exitFile, 'utf8').trim(), '0');
});
