/**
 * Rate limits, brute-force protection and bans, each with the clock under
 * the test's control: node:test's mock timers drive Date.now and setTimeout,
 * which the engine's clock and the rate-limit library both read.
 */
import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import { PolicyEngine } from '../../../src/policy/engine.ts';
import { cheapScrypt, configFrom, connect, creds, engineFor, engineOn, login, memoryLog } from './helpers.ts';

const T0 = 1_700_000_000_000;

function clock(t: TestContext): (ms: number) => void {
  t.mock.timers.enable({ apis: ['Date', 'setTimeout', 'setInterval'], now: T0 });
  return (ms) => t.mock.timers.tick(ms);
}

const PW = cheapScrypt('right');

const LOCAL = `
users:
  list:
    - { name: alice, password_hash: "${PW}" }
    - { name: bob, password_hash: "${PW}" }
listeners:
  - { name: imaps, protocol: imap, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:143", authentication: local }
  - { name: pop3s, protocol: pop3, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:110", authentication: local }
  - { name: imap-pass, protocol: imap, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:143" }
  - { name: smtps, protocol: smtp, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:25", authentication: local, backend_login: none }
  - { name: mx, protocol: smtp, listen: "127.0.0.1:0", tls: none, auth: none, backend: "10.0.0.1:25" }
  - { name: https, protocol: http, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:80" }
`;

// ---- connections ----------------------------------------------------------------------

test('connections per address: N in a window, then a tempfail with Retry-After until the window ends', async (t) => {
  const tick = clock(t);
  const config = configFrom(`rate_limits:\n  - { limit: connections, per: address, max: 3, window: 60s }\n${LOCAL}`);
  const { engine } = await engineFor(config);
  for (let i = 0; i < 3; i++) {
    assert.deepEqual(engine.onConnect(connect(config, 'imaps', '192.0.2.1')), { action: 'allow' }, `connection ${i + 1}`);
    await engine.settled();
  }
  const refused = engine.onConnect(connect(config, 'imaps', '192.0.2.1'));
  assert.equal(refused.action, 'tempfail');
  assert.equal(refused.action === 'tempfail' && refused.retryAfterMs, 60_000);
  assert.equal(engine.onConnect(connect(config, 'pop3s', '192.0.2.1')).action, 'tempfail', 'the limit covers every listener unless scoped');
  assert.equal(engine.onConnect(connect(config, 'imaps', '192.0.2.2')).action, 'allow', 'another address has its own count');
  tick(30_000);
  const later = engine.onConnect(connect(config, 'imaps', '192.0.2.1'));
  assert.equal(later.action === 'tempfail' && later.retryAfterMs, 30_000);
  tick(30_001);
  assert.equal(engine.onConnect(connect(config, 'imaps', '192.0.2.1')).action, 'allow', 'a new window');
});

test('connections per listener: the listener as a whole is limited, scoped to the named listeners', async (t) => {
  clock(t);
  const config = configFrom(`rate_limits:\n  - { limit: connections, per: listener, max: 2, window: 10s, listeners: [imaps] }\n${LOCAL}`);
  const { engine } = await engineFor(config);
  assert.equal(engine.onConnect(connect(config, 'imaps', '192.0.2.1')).action, 'allow');
  await engine.settled();
  assert.equal(engine.onConnect(connect(config, 'imaps', '192.0.2.2')).action, 'allow');
  await engine.settled();
  assert.equal(engine.onConnect(connect(config, 'imaps', '192.0.2.3')).action, 'tempfail');
  assert.equal(engine.onConnect(connect(config, 'pop3s', '192.0.2.3')).action, 'allow', 'out of scope');
});

test('concurrent sessions per address: the slot is freed when the session ends', async (t) => {
  clock(t);
  const config = configFrom(`rate_limits:\n  - { limit: concurrent, per: address, max: 2, protocols: [imap, pop3] }\n${LOCAL}`);
  const { engine } = await engineFor(config);
  const a = connect(config, 'imaps', '192.0.2.1');
  const b = connect(config, 'pop3s', '192.0.2.1');
  assert.equal(engine.onConnect(a).action, 'allow');
  assert.equal(engine.onConnect(b).action, 'allow');
  assert.deepEqual(engine.onConnect(connect(config, 'imaps', '192.0.2.1')), { action: 'tempfail', code: 'concurrent-address', text: 'Too many connections from your address' });
  assert.equal(engine.onConnect(connect(config, 'smtps', '192.0.2.1')).action, 'allow', 'SMTP is out of scope (and counts nowhere in it)');
  engine.onDisconnect(a);
  assert.equal(engine.onConnect(connect(config, 'imaps', '192.0.2.1')).action, 'allow');
});

test('concurrent sessions per user: a slot is taken when the login succeeds, not by an attempt; freed when the session ends', async (t) => {
  clock(t);
  const config = configFrom(`rate_limits:\n  - { limit: concurrent, per: user, max: 1 }\n${LOCAL}`);
  const { engine } = await engineFor(config);
  const s1 = connect(config, 'imap-pass', '192.0.2.1');
  const s2 = connect(config, 'imap-pass', '192.0.2.2');
  const s3 = connect(config, 'imap-pass', '192.0.2.3');
  const c = creds('carol', 'x');
  assert.equal((await engine.onAuth(login(s1, c), c)).action, 'allow');
  assert.equal((await engine.onAuth(login(s2, c), c)).action, 'allow', 'an attempt waiting for the backend takes no slot');
  engine.onAuthResult(login(s1, c), true);
  assert.deepEqual(await engine.onAuth(login(s3, c), c), { action: 'tempfail', code: 'concurrent-user', text: 'Too many sessions for this user' });
  engine.onAuthResult(login(s2, c), false);
  engine.onDisconnect(s2);
  engine.onDisconnect(s1);
  assert.equal((await engine.onAuth(login(s3, c), c)).action, 'allow', 'the end of a session frees its slot');
  // A session that ends before its verdict takes no slot when a good verdict comes late.
  engine.onDisconnect(s3);
  engine.onAuthResult(login(s3, c), true);
  assert.equal((await engine.onAuth(login(connect(config, 'imap-pass', '192.0.2.4'), c), c)).action, 'allow');
  await engine.settled();
});

// ---- SMTP messages and HTTP requests -----------------------------------------------------

test('SMTP messages per user: the message that reaches the limit ends the session; logins are refused until the window ends', async (t) => {
  const tick = clock(t);
  const config = configFrom(`rate_limits:\n  - { limit: messages, per: user, max: 2, window: 1h }\n  - { limit: recipients, per: address, max: 5, window: 1h }\n${LOCAL}`);
  const { engine } = await engineFor(config);
  const s = connect(config, 'smtps', '192.0.2.1');
  const alice = creds('alice', 'right');
  assert.equal((await engine.onAuth(login(s, alice), alice)).action, 'allow');
  assert.deepEqual(await engine.onSmtpMessage(login(s, alice)), { action: 'allow' });
  const second = await engine.onSmtpMessage(login(s, alice));
  assert.equal(second?.action, 'tempfail');
  assert.equal(second?.action === 'tempfail' && second.text, 'Message limit reached, try again later');
  const again = await engine.onAuth(login(s, alice), alice);
  assert.equal(again.action, 'tempfail');
  assert.ok(again.action === 'tempfail' && again.retryAfterMs !== undefined && again.retryAfterMs <= 3_600_000);
  const bob = creds('bob', 'right');
  assert.equal((await engine.onAuth(login(s, bob), bob)).action, 'allow', 'another user has its own count');
  for (let i = 1; i <= 5; i++) assert.deepEqual(await engine.onSmtpRecipient(login(s, bob)), { action: 'allow' }, `recipient ${i} of 5 per address`);
  const sixth = await engine.onSmtpRecipient(login(s, bob));
  assert.equal(sixth?.action, 'tempfail', 'the recipient that crosses the limit is refused');
  assert.equal(sixth?.action === 'tempfail' && sixth.text, 'Too many recipients, try again later');
  assert.equal((await engine.onAuth(login(s, bob), bob)).action, 'tempfail', 'the address used up its recipients: logins wait for the window');
  tick(3_600_001);
  assert.equal((await engine.onAuth(login(s, alice), alice)).action, 'allow');
  assert.deepEqual(await engine.onSmtpMessage(login(s, alice)), { action: 'allow' });
  assert.deepEqual(await engine.onSmtpRecipient(login(s, alice)), { action: 'allow' });
});

test('SMTP counts need no answer where no limit counts them (the relay does not wait)', async (t) => {
  clock(t);
  const config = configFrom(`rate_limits:\n  - { limit: messages, per: user, max: 2, window: 1h, listeners: [smtps] }\n${LOCAL}`);
  const { engine } = await engineFor(config);
  const s = connect(config, 'smtps', '192.0.2.1');
  const mx = connect(config, 'mx', '192.0.2.1');
  assert.equal(engine.onSmtpRecipient(login(s, creds('alice', 'right'))), undefined, 'no recipients limit');
  assert.equal(engine.onSmtpMessage(login(mx, null)), undefined, 'a per-user limit on another listener, and no user');
  assert.notEqual(engine.onSmtpMessage(login(s, creds('alice', 'right'))), undefined);
  await engine.settled();
});

test('SMTP messages per address on a relay without AUTH: the first transaction is refused once the limit is reached', async (t) => {
  clock(t);
  const config = configFrom(`rate_limits:\n  - { limit: messages, per: address, max: 1, window: 10m }\n${LOCAL}`);
  const { engine } = await engineFor(config);
  const s = connect(config, 'mx', '192.0.2.9');
  assert.equal((await engine.onAuth(login(s, null), null)).action, 'allow');
  assert.equal((await engine.onSmtpMessage(login(s, null)))?.action, 'tempfail');
  assert.equal((await engine.onAuth(login(s, null), null)).action, 'tempfail');
  // IMAP logins are not touched by message limits.
  const i = connect(config, 'imaps', '192.0.2.9');
  const alice = creds('alice', 'right');
  assert.equal((await engine.onAuth(login(i, alice), alice)).action, 'allow');
});

test('HTTP requests per address: 429 material (tempfail with Retry-After) past the limit, per window', async (t) => {
  const tick = clock(t);
  const config = configFrom(`rate_limits:\n  - { limit: http_requests, per: address, max: 5, window: 10s }\n${LOCAL}`);
  const { engine } = await engineFor(config);
  const c = connect(config, 'https', '192.0.2.1');
  assert.equal(engine.onConnect(c).action, 'allow');
  for (let i = 0; i < 5; i++) {
    assert.equal(engine.onHttpRequest({ ...c, method: 'GET', path: '/' }).action, 'allow', `request ${i + 1}`);
    await engine.settled();
  }
  const r = engine.onHttpRequest({ ...c, method: 'GET', path: '/' });
  assert.deepEqual(r, { action: 'tempfail', code: 'request-rate', text: 'Too many requests', retryAfterMs: 10_000 });
  assert.equal(engine.onHttpRequest({ ...connect(config, 'https', '192.0.2.2') }).action, 'allow');
  tick(10_001);
  assert.equal(engine.onHttpRequest({ ...c }).action, 'allow');
});

// ---- brute force ---------------------------------------------------------------------

const BF = `
brute_force:
  per_address: { failures: 6, window: 10m, ban: 1h }
  per_address_user: { failures: 3, window: 10m, ban: 15m }
  per_user: { failures: 5, window: 1h, ban: 30m }
  exempt: [198.51.100.0/24]
`;

async function fail(engine: PolicyEngine, config: ReturnType<typeof configFrom>, ip: string, user: string, listener = 'imaps') {
  const c = connect(config, listener, ip);
  const cr = creds(user, 'wrong');
  return engine.onAuth(login(c, cr), cr);
}

async function good(engine: PolicyEngine, config: ReturnType<typeof configFrom>, ip: string, user: string) {
  const c = connect(config, 'imaps', ip);
  const cr = creds(user, 'right');
  return engine.onAuth(login(c, cr), cr);
}

test('per address+user: 3 failures block that user from that address, even with the right password, until the ban ends', async (t) => {
  const tick = clock(t);
  const config = configFrom(BF + LOCAL);
  const { engine } = await engineFor(config);
  for (let i = 0; i < 3; i++) assert.equal((await fail(engine, config, '192.0.2.1', 'alice')).action, 'deny');
  const blocked = await good(engine, config, '192.0.2.1', 'alice');
  assert.deepEqual(blocked, { action: 'tempfail', code: 'banned', text: 'Too many failed logins, try again later', retryAfterMs: 15 * 60_000 });
  assert.equal((await good(engine, config, '192.0.2.1', 'bob')).action, 'allow', 'other users from that address are fine');
  assert.equal((await good(engine, config, '192.0.2.2', 'alice')).action, 'allow', 'alice from elsewhere is fine');
  tick(15 * 60_000 - 1);
  assert.equal((await good(engine, config, '192.0.2.1', 'alice')).action, 'tempfail');
  tick(2);
  assert.equal((await good(engine, config, '192.0.2.1', 'alice')).action, 'allow', 'the ban expired');
});

test('per address: 6 failures over several users ban the address before the greeting; the ban expires', async (t) => {
  const tick = clock(t);
  const config = configFrom(BF + LOCAL);
  const { engine } = await engineFor(config);
  for (const u of ['u1', 'u2', 'u3', 'u4', 'u5']) await fail(engine, config, '192.0.2.1', u);
  assert.equal(engine.onConnect(connect(config, 'imaps', '192.0.2.1')).action, 'allow');
  await fail(engine, config, '192.0.2.1', 'u6');
  const v = engine.onConnect(connect(config, 'imaps', '192.0.2.1'));
  assert.deepEqual(v, { action: 'tempfail', code: 'banned', text: 'Too many failed logins, try again later', retryAfterMs: 3_600_000 });
  assert.equal(engine.onConnect(connect(config, 'https', '192.0.2.1')).action, 'tempfail', 'every listener');
  assert.equal((await good(engine, config, '192.0.2.1', 'alice')).action, 'tempfail', 'the right password does not pass a ban');
  assert.equal(engine.onConnect(connect(config, 'imaps', '192.0.2.2')).action, 'allow');
  tick(3_600_001);
  assert.equal(engine.onConnect(connect(config, 'imaps', '192.0.2.1')).action, 'allow');
});

test('per user: a locked user is refused from addresses that failed for it, never from a clean one', async (t) => {
  clock(t);
  const config = configFrom(BF + LOCAL);
  const { engine } = await engineFor(config);
  // A spread attack: five addresses, one guess each.
  for (let i = 1; i <= 5; i++) await fail(engine, config, `203.0.113.${i}`, 'alice');
  assert.equal((await good(engine, config, '203.0.113.1', 'alice')).action, 'tempfail', 'an address that failed for alice');
  assert.equal((await good(engine, config, '192.0.2.50', 'alice')).action, 'allow', 'alice at home, no failures there');
  assert.equal((await good(engine, config, '203.0.113.1', 'bob')).action, 'allow', 'bob is not locked');
});

test('a good login clears the address+user count; exempt addresses are never counted', async (t) => {
  clock(t);
  const config = configFrom(BF + LOCAL);
  const { engine, admin } = await engineFor(config);
  await fail(engine, config, '192.0.2.1', 'alice');
  await fail(engine, config, '192.0.2.1', 'alice');
  assert.equal((await good(engine, config, '192.0.2.1', 'alice')).action, 'allow');
  await fail(engine, config, '192.0.2.1', 'alice');
  await fail(engine, config, '192.0.2.1', 'alice');
  assert.equal((await good(engine, config, '192.0.2.1', 'alice')).action, 'allow', 'two failures after the reset, not four');
  for (let i = 0; i < 10; i++) await fail(engine, config, '198.51.100.4', 'alice');
  assert.equal((await good(engine, config, '198.51.100.4', 'alice')).action, 'allow');
  assert.deepEqual((await admin.inspect({ address: '198.51.100.4', user: 'alice' })).failures, { address: 0, pair: 0, user: 4 }, 'only the four failures from the counted address');
});

test('passthrough: the backend refusing a login counts as a failure, and its success clears the pair count', async (t) => {
  clock(t);
  const config = configFrom(BF + LOCAL);
  const { engine, admin } = await engineFor(config);
  const c = connect(config, 'imap-pass', '192.0.2.1');
  const cr = creds('dave', 'whatever');
  for (let i = 0; i < 3; i++) {
    assert.equal((await engine.onAuth(login(c, cr), cr)).action, 'allow', 'the backend decides');
    engine.onAuthResult(login(c, cr), false);
    await engine.settled();
  }
  assert.equal((await engine.onAuth(login(c, cr), cr)).action, 'tempfail');
  const e = creds('erin', 'whatever');
  await engine.onAuth(login(c, e), e);
  engine.onAuthResult(login(c, e), false);
  engine.onAuthResult(login(c, e), true);
  await engine.settled();
  assert.equal((await admin.inspect({ address: '192.0.2.1', user: 'erin' })).failures?.pair, 0);
});

test('brute_force.enabled: false counts nothing', async (t) => {
  clock(t);
  const config = configFrom(`brute_force: { enabled: false, per_address_user: { failures: 1 } }\n${LOCAL}`);
  const { engine } = await engineFor(config);
  for (let i = 0; i < 5; i++) await fail(engine, config, '192.0.2.1', 'alice');
  assert.equal((await good(engine, config, '192.0.2.1', 'alice')).action, 'allow');
});

test('the per-session cap on login attempts stays the driver\'s (limits.max_auth_attempts), with a safe default', () => {
  const config = configFrom(LOCAL);
  assert.equal(config.listeners[0]?.limits.max_auth_attempts, 3);
});

// ---- bans: admin, reload -----------------------------------------------------------------

test('bans survive a reload: a new engine on the same state keeps bans, counts and open sessions', async (t) => {
  const tick = clock(t);
  const config = configFrom(BF + `rate_limits:\n  - { limit: concurrent, per: address, max: 1 }\n` + LOCAL);
  const { engine, state } = await engineFor(config);
  for (let i = 0; i < 6; i++) await fail(engine, config, '192.0.2.1', `u${i}`);
  await fail(engine, config, '192.0.2.2', 'alice');
  await fail(engine, config, '192.0.2.2', 'alice');
  const live = connect(config, 'imaps', '192.0.2.3');
  assert.equal(engine.onConnect(live).action, 'allow');

  // Reload with different rules and thresholds (same windows): bans and counts carry over.
  const next = configFrom(BF + `rate_limits:\n  - { limit: concurrent, per: address, max: 1 }\naccess:\n  rules: [{ action: allow }]\n` + LOCAL);
  const reloaded = engineOn(next, state);
  assert.equal(reloaded.onConnect(connect(next, 'imaps', '192.0.2.1')).action, 'tempfail', 'the address ban survived');
  assert.equal((await fail(reloaded, next, '192.0.2.2', 'alice')).action, 'deny');
  assert.equal((await good(reloaded, next, '192.0.2.2', 'alice')).action, 'tempfail', 'the third failure across the reload made the pair ban');
  assert.equal(reloaded.onConnect(connect(next, 'imaps', '192.0.2.3')).action, 'tempfail', 'the session opened before the reload still counts');
  engine.onDisconnect(live); // the old engine ends its own session
  assert.equal(reloaded.onConnect(connect(next, 'imaps', '192.0.2.3')).action, 'allow');
  tick(3_600_001);
  assert.equal(reloaded.onConnect(connect(next, 'imaps', '192.0.2.1')).action, 'allow');
});

test('admin: add, list, inspect and remove bans of every kind; bad requests are refused with a code', async (t) => {
  clock(t);
  const { log, lines } = memoryLog();
  const config = configFrom(BF + LOCAL);
  const { engine, admin } = await engineFor(config, { log });
  await admin.addBan({ kind: 'address', address: '::ffff:192.0.2.77', durationMs: 60_000, reason: 'test' });
  await admin.addBan({ kind: 'range', address: '203.0.113.0/24', durationMs: 60_000 });
  await admin.addBan({ kind: 'user', user: 'Mallory', durationMs: 60_000 });
  await admin.addBan({ kind: 'pair', address: '192.0.2.5', user: 'bob', durationMs: 60_000 });
  const ids = (await admin.listBans()).map((b) => b.id).sort();
  assert.deepEqual(ids, ['address:192.0.2.77', 'pair:192.0.2.5|bob', 'range:203.0.113.0/24', 'user:mallory']);
  assert.equal(engine.onConnect(connect(config, 'imaps', '192.0.2.77')).action, 'tempfail');
  assert.equal(engine.onConnect(connect(config, 'imaps', '203.0.113.200')).action, 'tempfail', 'a range ban');
  assert.equal((await good(engine, config, '192.0.2.5', 'bob')).action, 'tempfail');
  assert.equal((await admin.inspect({ address: '192.0.2.5', user: 'bob' })).bans.length, 1);
  assert.deepEqual(admin.open({ address: '192.0.2.77' }), { address: 0, user: null });
  assert.equal(await admin.removeBan('address:192.0.2.77'), true);
  assert.equal(await admin.removeBan('address:192.0.2.77'), false);
  assert.equal(engine.onConnect(connect(config, 'imaps', '192.0.2.77')).action, 'allow');
  await assert.rejects(admin.addBan({ kind: 'address', address: 'nope', durationMs: 60_000 }), { code: 'BAN_INVALID' });
  await assert.rejects(admin.addBan({ kind: 'user', durationMs: 60_000 }), { code: 'BAN_INVALID' });
  await assert.rejects(admin.addBan({ kind: 'address', address: '192.0.2.1', durationMs: 0 }), { code: 'BAN_INVALID' });
  assert.ok(lines.some((l) => l.msg === 'ban added'));
});

test('the control socket view (BanAdmin): ban, list, unban and change events for addresses and ranges', async (t) => {
  clock(t);
  const config = configFrom(BF + LOCAL);
  const { engine, admin } = await engineFor(config);
  const bans = admin.banList();
  const events: string[] = [];
  const off = bans.onChange?.((c) => events.push(c.kind === 'banned' ? `+${c.ban.ip}` : `-${c.ip}`));
  bans.ban('192.0.2.9', 120, 'manual');
  bans.ban('10.0.0.0/8', 120, 'network');
  assert.throws(() => bans.ban('not-an-ip', 120, 'x'), { code: 'BAN_INVALID' });
  await engine.settled();
  const list = bans.list();
  assert.deepEqual(
    list.map((b) => [b.ip, b.expiresAt, b.source]),
    [
      ['192.0.2.9', T0 + 120_000, 'manual'],
      ['10.0.0.0/8', T0 + 120_000, 'manual'],
    ],
  );
  assert.equal(engine.onConnect(connect(config, 'imaps', '10.9.9.9')).action, 'tempfail');
  // A brute-force ban shows up as an automatic one.
  for (let i = 0; i < 3; i++) await fail(engine, config, '192.0.2.30', 'alice');
  assert.ok(bans.list().some((b) => b.ip === '192.0.2.30' && b.source === 'auto' && b.reason.startsWith('user alice:')));
  assert.equal(bans.unban('192.0.2.9'), true);
  assert.equal(bans.unban('192.0.2.9'), false);
  await engine.settled();
  assert.deepEqual(events, ['+192.0.2.9', '+10.0.0.0/8', '+192.0.2.30', '-192.0.2.9']);
  off?.();
});

// ---- username_format: one account, many spellings ---------------------------------------

/** A passthrough login the backend refuses (the engine counts it as Dovecot answers). */
async function backendRefuses(engine: PolicyEngine, config: ReturnType<typeof configFrom>, ip: string, user: string) {
  const c = connect(config, 'imap-pass', ip);
  const cr = creds(user, 'wrong');
  const v = await engine.onAuth(login(c, cr), cr);
  if (v.action === 'allow') engine.onAuthResult(login(c, cr), false);
  await engine.settled();
  return v;
}

async function passthrough(engine: PolicyEngine, config: ReturnType<typeof configFrom>, ip: string, user: string) {
  const c = connect(config, 'imap-pass', ip);
  const cr = creds(user, 'right');
  return engine.onAuth(login(c, cr), cr);
}

test('a banned user is banned under every spelling: by default the local part counts as well as the whole name', async (t) => {
  clock(t);
  const config = configFrom(BF + LOCAL);
  const { engine } = await engineFor(config);
  // Three guesses, three spellings of one account, as Dovecot's %n sees it.
  for (const u of ['user5', 'User5@a.example', 'user5@B.EXAMPLE']) assert.equal((await backendRefuses(engine, config, '192.0.2.1', u)).action, 'allow');
  for (const u of ['user5', 'user5@anything.invalid', 'User5@EXAMPLE.org']) {
    assert.deepEqual(await passthrough(engine, config, '192.0.2.1', u), { action: 'tempfail', code: 'banned', text: 'Too many failed logins, try again later', retryAfterMs: 15 * 60_000 }, u);
  }
  assert.equal((await passthrough(engine, config, '192.0.2.2', 'user5@example.org')).action, 'allow', 'from another address the pair ban does not apply');
  assert.equal((await passthrough(engine, config, '192.0.2.1', 'user6@example.org')).action, 'allow', 'another account from the same address');
});

test('username_format "%n": the ban key is the local part only; "%u": other domains are other accounts', async (t) => {
  clock(t);
  const n = configFrom(`username_format: "%Ln"\n${BF}${LOCAL}`);
  const a = await engineFor(n);
  for (let i = 0; i < 3; i++) await backendRefuses(a.engine, n, '192.0.2.1', `user5@d${i}.example`);
  assert.equal((await passthrough(a.engine, n, '192.0.2.1', 'USER5')).action, 'tempfail');
  assert.deepEqual((await a.admin.inspect({ address: '192.0.2.1', user: 'user5@elsewhere' })).failures, { address: 3, pair: 3, user: 3 });

  const u = configFrom(`username_format: "%u"\n${BF}${LOCAL}`);
  const b = await engineFor(u);
  for (let i = 0; i < 3; i++) await backendRefuses(b.engine, u, '192.0.2.1', 'user5@a.example');
  assert.equal((await passthrough(b.engine, u, '192.0.2.1', 'User5@A.example')).action, 'tempfail', 'case never makes another account');
  assert.equal((await passthrough(b.engine, u, '192.0.2.1', 'user5@b.example')).action, 'allow', 'with %u another domain is another account');
});

test('per-user bans follow the keys too; a brute-force one only where the address failed, an administrator\'s everywhere', async (t) => {
  clock(t);
  const config = configFrom(BF + LOCAL);
  const { engine, admin } = await engineFor(config);
  for (let i = 1; i <= 5; i++) await backendRefuses(engine, config, `203.0.113.${i}`, i % 2 ? 'carol' : 'Carol@example.org');
  assert.equal((await passthrough(engine, config, '203.0.113.2', 'carol@other.example')).action, 'tempfail', 'an address that failed for carol, another spelling');
  assert.equal((await passthrough(engine, config, '192.0.2.50', 'carol@other.example')).action, 'allow', 'a clean address');

  const made = await admin.addBan({ kind: 'user', user: 'Mallory@Example.org', durationMs: 60_000, reason: 'compromised' });
  assert.deepEqual(made.map((b) => b.id), ['user:mallory@example.org', 'user:mallory']);
  assert.deepEqual(await passthrough(engine, config, '192.0.2.51', 'mallory@anything.invalid'), { action: 'tempfail', code: 'banned', text: 'compromised', retryAfterMs: 60_000 });
  const view = admin.banList();
  assert.equal(view.unban({ user: 'MALLORY@example.org' }), true);
  await engine.settled();
  assert.equal((await passthrough(engine, config, '192.0.2.51', 'mallory@anything.invalid')).action, 'allow', 'unbanned by the name it was banned with');
});

// ---- attempts in flight ---------------------------------------------------------------

test('parallel guesses: attempts in flight count against the thresholds until their verdict; a good one is refunded', async (t) => {
  clock(t);
  const config = configFrom(BF + LOCAL);
  const { engine } = await engineFor(config);
  // Five guesses for dave from one address at once, none answered yet (per address+user: 3).
  const sessions = Array.from({ length: 5 }, () => connect(config, 'imap-pass', '192.0.2.1'));
  const cr = creds('dave', 'guess');
  const verdicts = await Promise.all(sessions.map((s) => engine.onAuth(login(s, cr), cr)));
  assert.deepEqual(
    verdicts.map((v) => (v.action === 'allow' ? 'allow' : v.code)),
    ['allow', 'allow', 'allow', 'login-attempts', 'login-attempts'],
  );
  assert.deepEqual(verdicts[3], { action: 'tempfail', code: 'login-attempts', text: 'Too many login attempts at once, try again later' });
  assert.equal((await engine.onAuth(login(connect(config, 'imap-pass', '192.0.2.1'), creds('erin', 'x')), creds('erin', 'x'))).action, 'allow', 'another user from the address');
  assert.equal((await engine.onAuth(login(connect(config, 'imap-pass', '192.0.2.2'), cr), cr)).action, 'allow', 'dave from another address');
  // The first is good: it leaves the count, and so one more may try.
  engine.onAuthResult(login(sessions[0]!, cr), true);
  await engine.settled();
  const next = connect(config, 'imap-pass', '192.0.2.1');
  assert.equal((await engine.onAuth(login(next, cr), cr)).action, 'allow');
  // Three fail: the pair ban follows, and nothing more gets through.
  for (const s of [sessions[1]!, sessions[2]!, next]) engine.onAuthResult(login(s, cr), false);
  await engine.settled();
  const after = await engine.onAuth(login(connect(config, 'imap-pass', '192.0.2.1'), cr), cr);
  assert.equal(after.action === 'tempfail' && after.code, 'banned');
});

test('a login that got no verdict (the backend was unreachable) leaves the in-flight count at once and counts as no failure', async (t) => {
  clock(t);
  const config = configFrom(BF + LOCAL);
  const { engine, admin } = await engineFor(config);
  const cr = creds('dave', 'guess');
  const sessions = Array.from({ length: 3 }, () => connect(config, 'imap-pass', '192.0.2.3'));
  for (const s of sessions) assert.equal((await engine.onAuth(login(s, cr), cr)).action, 'allow');
  const fourth = await engine.onAuth(login(connect(config, 'imap-pass', '192.0.2.3'), cr), cr);
  assert.equal(fourth.action === 'tempfail' && fourth.code, 'login-attempts', 'three in flight: the threshold');
  // The backend was down for all three: no verdict, so they stop counting without a failure each.
  for (const s of sessions) engine.onAuthUnanswered(login(s, cr));
  await engine.settled();
  assert.equal((await engine.onAuth(login(connect(config, 'imap-pass', '192.0.2.3'), cr), cr)).action, 'allow', 'a retry is not held back');
  assert.equal((await admin.inspect({ address: '192.0.2.3', user: 'dave' })).failures?.pair ?? 0, 0);
});

test('parallel guesses at local users: no more password checks than the threshold allows', async (t) => {
  clock(t);
  const config = configFrom(BF + LOCAL);
  const { engine, admin } = await engineFor(config);
  const cr = creds('alice', 'wrong');
  const verdicts = await Promise.all(Array.from({ length: 12 }, () => engine.onAuth(login(connect(config, 'imaps', '192.0.2.9'), cr), cr)));
  const codes = verdicts.map((v) => (v.action === 'allow' ? 'allow' : v.code));
  assert.equal(codes.filter((c) => c === 'bad-login').length, 3, `checked: ${codes.join(',')}`);
  assert.ok(codes.every((c) => c === 'bad-login' || c === 'login-attempts' || c === 'banned'), codes.join(','));
  await engine.settled();
  assert.equal((await admin.inspect({ address: '192.0.2.9', user: 'alice' })).failures?.pair, 3);
});

test('an attempt whose verdict never comes stops counting at its deadline; exempt addresses are never counted', async (t) => {
  const tick = clock(t);
  const config = configFrom(BF + LOCAL);
  const { engine } = await engineFor(config);
  const cr = creds('dave', 'guess');
  for (let i = 0; i < 3; i++) assert.equal((await engine.onAuth(login(connect(config, 'imap-pass', '192.0.2.1'), cr), cr)).action, 'allow');
  assert.equal((await engine.onAuth(login(connect(config, 'imap-pass', '192.0.2.1'), cr), cr)).action, 'tempfail');
  // The sessions died without a verdict (an old driver, a killed worker): after connect + login_replay + 1 s they no longer count.
  tick(5_000 + 20_000 + 1_000 + 1);
  assert.equal((await engine.onAuth(login(connect(config, 'imap-pass', '192.0.2.1'), cr), cr)).action, 'allow');
  const exempt = await Promise.all(Array.from({ length: 8 }, () => engine.onAuth(login(connect(config, 'imap-pass', '198.51.100.7'), cr), cr)));
  assert.ok(exempt.every((v) => v.action === 'allow'), 'the exempt network is never held back');
  await engine.settled();
});

// ---- rate limits: exempt -----------------------------------------------------------------

test('rate_limits[].exempt: the listed addresses are neither counted nor refused by that limit; others are', async (t) => {
  clock(t);
  const config = configFrom(`rate_limits:
  - { limit: connections, per: address, max: 2, window: 1m, exempt: [192.0.2.50/32, "2001:db8::/32"] }
  - { limit: concurrent, per: address, max: 1, protocols: [pop3], exempt: [192.0.2.50] }
  - { limit: messages, per: user, max: 1, window: 1h, exempt: [192.0.2.50] }
${LOCAL}`);
  const { engine } = await engineFor(config);
  for (let i = 0; i < 6; i++) {
    assert.equal(engine.onConnect(connect(config, 'imaps', '192.0.2.50')).action, 'allow', `monitoring connection ${i + 1}`);
    assert.equal(engine.onConnect(connect(config, 'imaps', '::ffff:192.0.2.50')).action, 'allow');
    assert.equal(engine.onConnect(connect(config, 'imaps', '2001:db8::7')).action, 'allow');
    await engine.settled();
  }
  for (let i = 0; i < 2; i++) {
    assert.equal(engine.onConnect(connect(config, 'imaps', '192.0.2.1')).action, 'allow');
    await engine.settled();
  }
  assert.equal(engine.onConnect(connect(config, 'imaps', '192.0.2.1')).action, 'tempfail', 'another address is limited');
  // concurrent per address: the exempt address opens many, another one
  for (let i = 0; i < 3; i++) assert.equal(engine.onConnect(connect(config, 'pop3s', '192.0.2.50')).action, 'allow');
  assert.equal(engine.onConnect(connect(config, 'pop3s', '192.0.2.2')).action, 'allow');
  assert.equal(engine.onConnect(connect(config, 'pop3s', '192.0.2.2')).action, 'tempfail');
  // messages per user: not counted from the exempt address
  const alice = creds('alice', 'right');
  const fromExempt = login(connect(config, 'smtps', '192.0.2.50'), alice);
  assert.equal(engine.onSmtpMessage(fromExempt), undefined, 'no limit counts here: nothing to wait for');
  const fromElsewhere = login(connect(config, 'smtps', '192.0.2.3'), alice);
  assert.equal((await engine.onSmtpMessage(fromElsewhere))?.action, 'tempfail', 'the one message reaches the limit');
  assert.equal((await engine.onAuth(fromExempt, alice)).action, 'allow', 'the exempt address still logs in');
  assert.equal((await engine.onAuth(fromElsewhere, alice)).action, 'tempfail');
  assert.throws(() => configFrom(`rate_limits:\n  - { limit: connections, per: address, max: 2, window: 1m, exempt: [not-a-range] }\n`), /rate_limits\[0\]\.exempt\[0\]/);
});
