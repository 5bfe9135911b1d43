/**
 * `mailgate top`'s bans in a real terminal (tmux, 120x40) against the real
 * daemon, Dovecot and Python's imaplib: `b` on a session bans its address
 * (Enter) or, after Tab, its user from that address or everywhere; the
 * sessions the ban covers end; `B` lists every ban kind, a brute-force one
 * too; `u` and `y` lift the selected one and its user logs in again.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { ControlClient } from '../../src/control/client.ts';
import type { Ban } from '../../src/control/protocol.ts';
import { ImapHolder, TmuxPane } from './control-helpers.ts';
import { imapLoginFrom, LineClient } from './harness/clients.ts';
import { CLI, startGateway, type Gateway } from './harness/gateway.ts';
import { startDovecot, userByName, type Dovecot } from './harness/servers.ts';

let dovecot: Dovecot;
let gw: Gateway;
let holder: ImapHolder;
let pane: TmuxPane | undefined;
let socketPath: string;
const alice = userByName('alice');
const bob = userByName('bob');
const carol = userByName('carol');
const dave = userByName('dave');

before(async () => {
  dovecot = await startDovecot();
  gw = await startGateway({
    listeners: [{ name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` }],
    extra: { brute_force: { per_address_user: { failures: 2, window: '10m', ban: '10m' } } },
    logLevel: 'info',
  });
  socketPath = join(gw.dir, 'control.sock');
  holder = new ImapHolder(gw.ports.imaps!, gw.certFile);
});

after(async () => {
  pane?.kill();
  await holder?.close();
  await gw?.stop();
  await dovecot?.stop();
});

async function daemonBans(): Promise<Ban[]> {
  const c = await ControlClient.connect(socketPath);
  try {
    return await c.request('bans', {});
  } finally {
    c.close();
  }
}

async function daemonUsers(): Promise<(string | null)[]> {
  const c = await ControlClient.connect(socketPath);
  try {
    return (await c.request('sessions', {})).map((s) => s.user).sort();
  } finally {
    c.close();
  }
}

test('mailgate top: b bans a session\'s address, Tab its user; B lists every ban kind; u lifts one', async () => {
  assert.ok((await holder.open('alice', alice.name, alice.password, '127.0.0.2')).ok);
  assert.ok((await holder.open('bob', bob.name, bob.password, '127.0.0.3')).ok);
  assert.ok((await holder.open('carol', carol.name, carol.password, '127.0.0.3')).ok);
  // Two wrong passwords for dave from 127.0.0.4: a brute-force ban of dave from that address.
  for (let i = 0; i < 2; i++) assert.equal((await loginFrom(dave.name, `guess-${i}`, '127.0.0.4')).ok, false);
  await gw.waitForLog((l) => l.msg === 'banned after failed logins' && l.ban === 'pair');

  pane = new TmuxPane(gw.dir, `env LANG=C.UTF-8 ${process.execPath} ${CLI} top -s ${socketPath}`, 120, 40);
  await pane.waitFor((s) => ['alice', 'bob', 'carol'].every((u) => s.includes(u)) && s.includes('● live'), 'the three sessions');

  // b on alice's session: the prompt names her address and the one session it ends; Enter bans.
  pane.keys('/');
  pane.type('alice');
  pane.keys('Enter');
  await pane.waitFor((s) => s.includes('filter "alice"'), 'the filter');
  pane.keys('b');
  await pane.waitFor((s) => /ban 127\.0\.0\.2 for: 1h_ +Enter ban and end 1 session, Esc cancel +Tab: user alice from 127\.0\.0\.2/.test(s), 'the ban prompt');
  pane.keys('Enter');
  await pane.waitFor((s) => s.includes('no session matches "alice"') && /banned 127\.0\.0\.2 until \d\d:\d\d \(Banned by the administrator\)/.test(s), 'alice banned and gone');
  assert.deepEqual(await daemonUsers(), ['bob', 'carol'], 'the daemon ended her session');
  assert.equal((await holder.noop('alice')).ok, false);
  const greeting = await LineClient.connect(gw.ports.imaps!, { tls: true, localAddress: '127.0.0.2' });
  assert.equal(await greeting.readLine(), '* BYE [UNAVAILABLE] Banned by the administrator', 'the client is told the administrator\'s reason');
  await greeting.closedPromise;

  // b on bob's session, Tab twice: bob everywhere, for 30 minutes; carol at the same address stays.
  pane.keys('Escape');
  pane.keys('/');
  pane.type('bob');
  pane.keys('Enter');
  await pane.waitFor((s) => s.includes('filter "bob"'), 'the filter on bob');
  pane.keys('b');
  await pane.waitFor((s) => s.includes('ban 127.0.0.3 for: 1h_'), 'the prompt for bob\'s address');
  pane.keys('Tab');
  await pane.waitFor((s) => s.includes('ban user bob from 127.0.0.3 for: 1h_') && s.includes('Tab: user bob'), 'user from address');
  pane.keys('Tab');
  await pane.waitFor((s) => s.includes('ban user bob for: 1h_') && s.includes('Tab: 127.0.0.3'), 'the user everywhere');
  pane.keys('C-u');
  pane.type('30m');
  pane.keys('Enter');
  await pane.waitFor((s) => s.includes('no session matches "bob"') && s.includes('banned user bob until'), 'bob banned and gone');
  assert.deepEqual(await daemonUsers(), ['carol'], 'only bob\'s session ended');
  const bans = await daemonBans();
  const bobBan = bans.find((b) => b.kind === 'user');
  assert.equal(bobBan?.user, 'bob');
  assert.ok(bobBan.expiresAt! - Date.now() > 29 * 60_000 && bobBan.expiresAt! - Date.now() <= 30 * 60_000, 'banned for 30 minutes');
  assert.equal((await loginFrom(bob.name, bob.password, '127.0.0.5')).ok, false, 'bob is refused from any address');

  // B: every kind in the bans view: the address, the user, the brute-force pair.
  pane.keys('Escape');
  pane.keys('B');
  let screen = await pane.waitFor((s) => s.includes('KIND') && s.includes('REASON') && s.includes('3 bans'), 'the bans view');
  const rows = screen.split('\n').filter((l) => /^(address|user|user\+addr) /.test(l));
  assert.equal(rows.length, 3, screen);
  assert.match(screen, /^address +127\.0\.0\.2 +- .* manual +Banned by the administrator/m);
  assert.match(screen, /^user +- +bob .* manual +Banned by the administrator/m);
  assert.match(screen, /^user\+addr +127\.0\.0\.4 +dave .* auto +user dave: 2 failed logins/m);
  assert.match(screen, /bans 3/, 'the header counts every kind');

  // Soonest to end first: dave's 10 minutes, bob's 30, alice's address 1 hour. Select bob's, u, y:
  // lifted in the daemon, and bob logs in again.
  assert.deepEqual(rows.map((l) => l.split(/\s+/)[0]), ['user+addr', 'user', 'address']);
  pane.keys('g', 'j');
  pane.keys('u');
  await pane.waitFor((s) => /Lift the ban of user bob \(manual, 29m|Lift the ban of user bob \(manual, 30m/.test(s), 'the unban confirmation');
  assert.equal((await daemonBans()).length, 3, 'nothing happens before the answer');
  pane.keys('y');
  await pane.waitFor((s) => s.includes('2 bans') && s.includes('unbanned user bob'), 'the lifted ban');
  assert.deepEqual((await daemonBans()).map((b) => b.id).sort(), ['address:127.0.0.2', 'pair:127.0.0.4|dave']);
  assert.equal((await loginFrom(bob.name, bob.password, '127.0.0.5')).ok, true, 'bob is back in');

  // The brute-force ban is lifted the same way (up to it, u, y).
  pane.keys('g');
  pane.keys('u');
  await pane.waitFor((s) => s.includes('Lift the ban of user dave from 127.0.0.4 (auto'), 'the pair ban confirmation');
  pane.keys('y');
  await pane.waitFor((s) => /\b1 ban\b/.test(s) && s.includes('unbanned user dave from 127.0.0.4'), 'one ban left');
  assert.equal((await loginFrom(dave.name, dave.password, '127.0.0.4')).ok, true, 'dave is back in from that address');

  pane.keys('Escape');
  await pane.waitFor((s) => s.includes('carol') && !s.includes('REASON'), 'back to the sessions');
  pane.keys('q');
});

/** One IMAPS login through the gateway from `source`: ok, or the server's words. */
function loginFrom(user: string, password: string, source: string): Promise<{ ok: boolean; error?: string }> {
  return imapLoginFrom(gw.ports.imaps!, user, password, source);
}
