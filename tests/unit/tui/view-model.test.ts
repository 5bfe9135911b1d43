import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { EventBatch, ListenerCounters, SessionInfo, Snapshot, StatusInfo } from '../../../src/control/protocol.ts';
import { renderFrame, visibleLength, type Chrome } from '../../../src/tui/render.ts';
import { humanBytes, humanDuration } from '../../../src/core/human.ts';
import { DashboardModel, sanitize } from '../../../src/tui/view-model.ts';

const T0 = 1_800_000_000_000;

function session(id: number, f: Partial<SessionInfo> = {}): SessionInfo {
  return {
    id: `ab-${id.toString(36)}`,
    listener: 'imaps',
    protocol: 'imap',
    clientIp: `192.0.2.${id % 250}`,
    clientPort: 40000 + id,
    startedAt: T0 - id * 1000,
    lastActivity: T0 - id * 10,
    state: 'relaying',
    user: `user${String(id).padStart(5, '0')}`,
    backend: '127.0.0.1:143',
    tlsVersion: 'TLSv1.3',
    tlsCipher: 'TLS_AES_256_GCM_SHA384',
    bytesIn: id * 100,
    bytesOut: id * 1000,
    messages: 0,
    recipients: 0,
    ...f,
  };
}

function counters(f: Partial<ListenerCounters> = {}, listener = 'imaps'): ListenerCounters {
  return { listener, sessions: 0, accepted: 0, authOk: 0, authFail: 0, refused: 0, bytesIn: 0, bytesOut: 0, ...f };
}

function status(pid = 100, c: ListenerCounters[] = [counters()]): StatusInfo {
  return {
    protocol: 1,
    version: '0.1.0',
    pid,
    hostname: 'mail.test',
    configFile: '/etc/mailgate/mailgate.yaml',
    startedAt: T0 - 3_600_000,
    now: T0,
    uptimeMs: 3_600_000,
    listeners: [
      { name: 'imaps', protocol: 'imap', tls: 'implicit', listen: ['0.0.0.0:993'], addresses: ['0.0.0.0:993'], up: true, backend: '127.0.0.1:143', backendHealth: { ok: true, at: T0, latencyMs: 1, error: null } },
    ],
    sessions: 0,
    counters: c,
    certs: [
      {
        names: ['mail.test'],
        source: 'self-signed',
        issuer: 'CN=mail.test',
        subject: 'CN=mail.test',
        notBefore: T0 - 86_400_000,
        notAfter: T0 + 800 * 86_400_000,
        daysLeft: 800,
        fingerprint256: 'AA',
        certFile: null,
        renewal: null,
      },
    ],
    bans: { supported: true, count: 0 },
    control: { clients: 1, dropped: 0 },
    lastReload: null,
  };
}

function snapshot(sessions: SessionInfo[], pid = 100, at = T0): Snapshot {
  return { type: 'snapshot', seq: 1, at, status: status(pid), sessions, bans: [], recent: [] };
}

function batch(at: number, events: EventBatch['events'], c: ListenerCounters[] = [counters()]): EventBatch {
  return { type: 'events', seq: 2, at, events, dropped: 0, counters: c };
}

test('a row opened before its TLS handshake shows the version and cipher from the update that follows it', () => {
  const m = new DashboardModel();
  const s = session(1, { state: 'handshake', tlsVersion: null, tlsCipher: null, user: null });
  m.applySnapshot(snapshot([]), T0);
  m.applyBatch(batch(T0 + 10, [{ type: 'opened', at: T0, session: s }]), T0 + 10);
  assert.deepEqual(m.rows().map((r) => [r.tlsVersion, r.tlsCipher]), [[null, null]]);
  const { id: _id, listener: _l, protocol: _p, clientIp: _c, clientPort: _cp, startedAt: _s, ...live } = s;
  m.applyBatch(batch(T0 + 1000, [{ type: 'update', id: s.id, ...live, state: 'preauth', tlsVersion: 'TLSv1.3', tlsCipher: 'TLS_AES_128_GCM_SHA256' }]), T0 + 1000);
  assert.deepEqual(m.rows().map((r) => [r.state, r.tlsVersion, r.tlsCipher]), [['preauth', 'TLSv1.3', 'TLS_AES_128_GCM_SHA256']]);
});

test('sorting by each key, reversing, and a stable order for ties', () => {
  const m = new DashboardModel();
  m.applySnapshot(snapshot([session(3), session(1, { user: 'zed' }), session(2, { user: null, state: 'preauth' })]), T0);
  const ids = () => m.rows().map((s) => s.id);
  m.setSort('id');
  assert.deepEqual(ids(), ['ab-1', 'ab-2', 'ab-3']);
  m.reverseSort();
  assert.deepEqual(ids(), ['ab-3', 'ab-2', 'ab-1']);
  m.setSort('user');
  assert.deepEqual(ids(), ['ab-2', 'ab-3', 'ab-1'], 'no user sorts first, then by name');
  m.setSort('out');
  assert.deepEqual(ids(), ['ab-3', 'ab-2', 'ab-1'], 'bytes sort biggest first by default');
  m.setSort('age');
  assert.deepEqual(ids(), ['ab-1', 'ab-2', 'ab-3'], 'age ascending: youngest first');
  m.setSort('state');
  assert.deepEqual(ids()[0], 'ab-2', 'preauth before relaying');
  // cycleSort goes through every key and comes back.
  const seen = new Set<string>();
  for (let i = 0; i < 11; i++) {
    m.cycleSort();
    seen.add(m.sortKey);
  }
  assert.equal(seen.size, 11);
});

test('the filter matches every term in any field, case-insensitively', () => {
  const m = new DashboardModel();
  m.applySnapshot(
    snapshot([session(1, { user: 'Alice' }), session(2, { user: 'bob', listener: 'pop3s' }), session(3, { user: 'bobby', clientIp: '203.0.113.9' })]),
    T0,
  );
  m.setFilter('BOB');
  assert.deepEqual(m.rows().map((s) => s.user), ['bob', 'bobby']);
  m.setFilter('bob pop3s');
  assert.deepEqual(m.rows().map((s) => s.user), ['bob']);
  m.setFilter('203.0.113');
  assert.deepEqual(m.rows().map((s) => s.user), ['bobby']);
  m.setFilter('nobody-here');
  assert.deepEqual(m.rows(), []);
  m.setFilter('');
  assert.equal(m.rows().length, 3);
});

test('the selection follows its session through re-sorts, and falls back when it ends', () => {
  const m = new DashboardModel();
  m.applySnapshot(snapshot([1, 2, 3, 4, 5].map((i) => session(i))), T0);
  m.setSort('id');
  m.moveTo(3);
  assert.equal(m.selected()?.id, 'ab-4');
  m.reverseSort();
  assert.equal(m.selected()?.id, 'ab-4', 'same session after reversing');
  assert.equal(m.selectedIndex, 1);
  m.applyBatch(batch(T0 + 100, [{ type: 'closed', at: T0 + 100, id: 'ab-4', listener: 'imaps', clientIp: '192.0.2.4', user: 'u', backend: null, reason: 'killed', bytesIn: 1, bytesOut: 1, durationMs: 5 }]), T0 + 100);
  assert.equal(m.rows().length, 4);
  assert.equal(m.selectedIndex, 1);
  assert.equal(m.selected()?.id, 'ab-3', 'the row that took its place');
  m.move(-10);
  assert.equal(m.selectedIndex, 0);
  m.move(+10);
  assert.equal(m.selectedIndex, 3);
});

test('the visible window scrolls to keep the selection on screen', () => {
  const m = new DashboardModel();
  m.applySnapshot(snapshot(Array.from({ length: 100 }, (_, i) => session(i + 1))), T0);
  m.setSort('id');
  let w = m.window(10);
  assert.deepEqual([w.start, w.rows.length, w.rows[0]!.id], [0, 10, 'ab-1']);
  m.moveTo(25);
  w = m.window(10);
  assert.equal(w.start, 16);
  assert.equal(w.rows.at(-1)!.id, session(26).id);
  m.moveTo(99);
  w = m.window(10);
  assert.equal(w.start, 90);
  m.moveTo(0);
  assert.equal(m.window(10).start, 0);
});

test('rates come from counter deltas over time; a restarted daemon does not give negative rates', () => {
  const m = new DashboardModel();
  m.applySnapshot(snapshot([], 100, T0), T0);
  m.applyBatch(batch(T0 + 1000, [], [counters({ accepted: 10, bytesIn: 1000, bytesOut: 5000 })]), T0 + 1000);
  m.applyBatch(batch(T0 + 2000, [], [counters({ accepted: 30, bytesIn: 3000, bytesOut: 9000 })]), T0 + 2000);
  const [row] = m.listenerRows();
  assert.ok(row);
  assert.equal(row.newPerSec, 15, '30 sessions over 2 s');
  assert.equal(row.inPerSec, 1500);
  assert.equal(row.outPerSec, 4500);
  assert.ok(row.history.length >= 2, 'one history point per second');
  assert.equal(row.history.at(-1), 6000, 'bytes/s both ways in the last second');
  // Restart: counters begin again at zero.
  m.applySnapshot({ ...snapshot([], 200, T0 + 3000), status: status(200, [counters({ accepted: 1 })]) }, T0 + 3000);
  m.applyBatch(batch(T0 + 4000, [], [counters({ accepted: 2 })]), T0 + 4000);
  const [after] = m.listenerRows();
  assert.ok(after && after.newPerSec >= 0 && after.newPerSec <= 1);
  assert.match(m.log.map((l) => l.text).join('\n'), /restarted \(pid 100 → 200\)/);
});

test('the event log keeps what an admin acts on and neutralises control characters', () => {
  const m = new DashboardModel();
  m.applySnapshot(snapshot([session(1)]), T0);
  m.applyBatch(
    batch(T0 + 10, [
      { type: 'refused', at: T0, listener: 'imaps', clientIp: '203.0.113.1', reason: 'denied by rule' },
      { type: 'auth-failed', at: T0, id: 'ab-9', listener: 'imaps', clientIp: '203.0.113.2', user: 'evil\u001b[2Jname' },
      { type: 'closed', at: T0, id: 'ab-1', listener: 'imaps', clientIp: '192.0.2.1', user: 'u', backend: null, reason: 'client-quit', bytesIn: 1, bytesOut: 1, durationMs: 1 },
      { type: 'closed', at: T0, id: 'ab-7', listener: 'imaps', clientIp: '192.0.2.7', user: null, backend: null, reason: 'backend-unavailable', bytesIn: 1, bytesOut: 1, durationMs: 1 },
      { type: 'reload', at: T0, ok: false, error: 'bad key', started: [], stopped: [], updated: [] },
      { type: 'banned', at: T0, ban: { ip: '203.0.113.2', reason: 'x', createdAt: T0, expiresAt: null, source: 'manual' }, killed: 2 },
    ]),
    T0 + 10,
  );
  const text = m.log.map((l) => `${l.level} ${l.text}`);
  assert.ok(text.some((t) => t.startsWith('warn refused 203.0.113.1')));
  assert.ok(text.some((t) => t.includes('login failed: evil?[2Jname')), 'the escape character is replaced');
  assert.ok(!text.some((t) => t.includes('client-quit')), 'ordinary ends are not logged');
  assert.ok(text.some((t) => t.startsWith('error backend-unavailable')));
  assert.ok(text.some((t) => t.startsWith('error reload refused: bad key')));
  assert.ok(text.some((t) => t.includes('banned 203.0.113.2') && t.includes('2 sessions ended')));
  assert.equal(m.bans.length, 1);
  assert.equal(sanitize('a\u0000b\u009bc\u007f'), 'a?b?c?');
});

test('recent events in the snapshot reach the log once, also across reconnects', () => {
  const m = new DashboardModel();
  const recent: Snapshot['recent'] = [
    { type: 'refused', at: T0 - 5000, listener: 'imaps', clientIp: '203.0.113.1', reason: 'denied' },
    { type: 'auth-failed', at: T0 - 4000, id: 'ab-9', listener: 'imaps', clientIp: '203.0.113.2', user: 'mallory' },
  ];
  m.applySnapshot({ ...snapshot([]), recent }, T0);
  m.disconnected('gone', T0 + 1);
  m.applySnapshot({ ...snapshot([]), recent: [...recent, { type: 'refused', at: T0 + 2, listener: 'imaps', clientIp: '203.0.113.3', reason: 'denied' }] }, T0 + 3);
  const lines = m.log.map((l) => l.text);
  assert.equal(lines.filter((l) => l.includes('mallory')).length, 1);
  assert.equal(lines.filter((l) => l.includes('203.0.113.1')).length, 1);
  assert.equal(lines.filter((l) => l.includes('203.0.113.3')).length, 1, 'what happened while away is added');
});

test('10,000 sessions: snapshot, a batch updating all of them, sort, filter and draw stay fast', () => {
  const m = new DashboardModel();
  const many = Array.from({ length: 10_000 }, (_, i) => session(i + 1));
  const t0 = performance.now();
  m.applySnapshot(snapshot(many), T0);
  m.setSort('in');
  m.rows();
  const updates = many.map((s) => ({ ...s, type: 'update' as const, bytesIn: s.bytesIn + 1 }));
  const chrome: Chrome = { bottom: 'help', prompting: false, detail: null, unicode: true, configFile: null, socketPath: '/run/x' };
  for (let i = 0; i < 5; i++) {
    m.applyBatch(batch(T0 + 1000 * (i + 1), updates), T0 + 1000 * (i + 1));
    m.move(37);
    renderFrame(m, 120, 40, T0, chrome);
  }
  m.setFilter('user0999');
  assert.equal(m.rows().length, 10, 'user09990 to user09999');
  const ms = performance.now() - t0;
  assert.ok(ms < 2000, `took ${ms.toFixed(0)} ms`);
});

test('the frame fills 80x24 exactly, and other sizes too', () => {
  const m = new DashboardModel();
  m.applySnapshot(snapshot(Array.from({ length: 50 }, (_, i) => session(i + 1, { user: i === 3 ? 'x{bold}y' : `user${i}` }))), T0);
  m.applyBatch(batch(T0 + 1000, [{ type: 'refused', at: T0, listener: 'imaps', clientIp: '203.0.113.1', reason: 'r' }], [counters({ accepted: 50, authOk: 48, authFail: 2, sessions: 50 })]), T0 + 1000);
  const chrome: Chrome = { bottom: 'keys', prompting: false, detail: null, unicode: true, configFile: '/etc/mailgate/mailgate.yaml', socketPath: '/run/x' };
  for (const [w, h] of [
    [80, 24],
    [120, 40],
    [200, 60],
    [60, 15],
  ] as const) {
    const lines = renderFrame(m, w, h, T0 + 1000, chrome);
    assert.equal(lines.length, h, `${w}x${h}: height`);
    lines.forEach((l, i) => assert.equal(visibleLength(l), w, `${w}x${h}: line ${i} is ${visibleLength(l)} wide: ${l}`));
  }
  const at80 = renderFrame(m, 80, 24, T0 + 1000, chrome).join('\n');
  for (const want of ['LISTENER', 'imaps', 'user0', 'CLIENT', 'sessions 50', 'auth ok 48 fail 2', 'refused 203.0.113.1', 'x{open}bold{close}y']) {
    assert.ok(at80.includes(want), `80x24 shows ${want}`);
  }
  const detail = renderFrame(m, 80, 24, T0 + 1000, { ...chrome, detail: m.rows()[0]! }).join('\n');
  assert.match(detail, /TLS +TLSv1\.3 TLS_AES_256_GCM_SHA384/);
});

test('with workers the header says how many serve, in red when one is starting again', () => {
  const chrome: Chrome = { bottom: 'keys', prompting: false, detail: null, unicode: true, configFile: '/etc/mailgate/mailgate.yaml', socketPath: '/run/x' };
  const withWorkers = (states: ('ready' | 'starting')[]) => {
    const m = new DashboardModel();
    const snap = snapshot([session(1)]);
    snap.status.workers = states.map((state, i) => ({ index: i + 1, pid: 200 + i, state, restarts: state === 'starting' ? 1 : 0 }));
    m.applySnapshot(snap, T0);
    return renderFrame(m, 160, 24, T0, chrome).join('\n');
  };
  assert.match(withWorkers(['ready', 'ready']), /workers 2\/2(?!\{)/);
  assert.match(withWorkers(['ready', 'starting']), /\{red-fg\}workers 1\/2/);
  const m = new DashboardModel();
  m.applySnapshot(snapshot([session(1)]), T0);
  assert.ok(!renderFrame(m, 160, 24, T0, chrome).join('\n').includes('workers'), 'one process: no workers part');
});

test('human formats', () => {
  assert.equal(humanBytes(999), '999');
  assert.equal(humanBytes(1536), '1.5k');
  assert.equal(humanBytes(50 * 1024 * 1024), '50M');
  assert.equal(humanDuration(59_000), '59s');
  assert.equal(humanDuration(61_000), '1m01');
  assert.equal(humanDuration(3_600_000 * 25), '1d01h');
});

test('TLS reports: counted in the header from the snapshot and each event, logged with the sender text sanitised', () => {
  const m = new DashboardModel();
  const s = snapshot([]);
  s.status.tlsReports = { accepted: 1, refused: 0, success: 10, failure: 0 };
  m.applySnapshot(s, T0);
  m.applyBatch(
    batch(T0 + 200, [
      { type: 'tls-report', at: T0 + 100, ok: true, organization: 'Big\u001bMail', success: 90, failure: 7 },
      { type: 'tls-report', at: T0 + 150, ok: false, organization: '', success: 0, failure: 0, reason: 'bad-gzip' },
    ]),
    T0 + 200,
  );
  assert.deepEqual(m.status?.tlsReports, { accepted: 2, refused: 1, success: 100, failure: 7 });
  const log = m.log.map((l) => `${l.level} ${l.text}`);
  assert.ok(log.includes('warn TLS report from Big?Mail: 90 sessions ok, 7 failed'), log.join('\n'));
  assert.ok(log.includes('warn TLS report refused (bad-gzip)'));
  const frame = renderFrame(m, 200, 30, T0 + 300, { bottom: '', prompting: false, detail: null, unicode: true, configFile: null, socketPath: '/s' });
  assert.match(frame[1]!, /tls-rpt 2 \(7 failed sessions\)/);
});

test('the bans view: every kind, soonest to end first, kept by id across events; the frame fits 80x24', () => {
  const m = new DashboardModel();
  const ban = (id: string, kind: 'address' | 'range' | 'user' | 'pair', ip: string | null, user: string | null, minutes: number, source: 'manual' | 'auto' = 'manual') => ({
    id,
    kind,
    ip,
    user,
    reason: source === 'auto' ? `user ${user ?? ''}: 5 failed logins within 900s` : 'Compromised\u001b[2J',
    createdAt: T0,
    expiresAt: T0 + minutes * 60_000,
    source,
  });
  m.applySnapshot({ ...snapshot([session(1)]), bans: [ban('address:203.0.113.9', 'address', '203.0.113.9', null, 60), ban('user:mallory', 'user', null, 'mallory', 30)] }, T0);
  m.applyBatch(batch(T0 + 10, [{ type: 'banned', at: T0, ban: ban('pair:192.0.2.5|bob', 'pair', '192.0.2.5', 'bob', 10, 'auto'), killed: 0 }]), T0 + 10);
  assert.deepEqual(m.banRows().map((b) => b.id), ['pair:192.0.2.5|bob', 'user:mallory', 'address:203.0.113.9']);
  assert.equal(m.selectedBan()?.id, 'user:mallory', 'the selection stays on its ban when one is added before it');
  m.moveBan(-1);
  assert.equal(m.selectedBan()?.id, 'pair:192.0.2.5|bob');
  m.moveBan(1);
  assert.equal(m.selectedBan()?.id, 'user:mallory');
  // A user ban lifted by id leaves the address bans of the same (absent) address alone.
  m.applyBatch(batch(T0 + 20, [{ type: 'unbanned', at: T0, ip: null, id: 'user:mallory', user: 'mallory' }]), T0 + 20);
  assert.deepEqual(m.banRows().map((b) => b.id), ['pair:192.0.2.5|bob', 'address:203.0.113.9']);
  assert.equal(m.selectedBan()?.id, 'address:203.0.113.9', 'the selection moves to the ban now at its place');
  assert.ok(m.log.some((l) => l.text.includes('banned user bob from 192.0.2.5')));
  assert.ok(m.log.some((l) => l.text.includes('unbanned user mallory')));

  const chrome: Chrome = { bottom: 'keys', prompting: false, detail: null, bans: true, unicode: true, configFile: null, socketPath: '/run/x' };
  const lines = renderFrame(m, 80, 24, T0 + 1000, chrome);
  assert.equal(lines.length, 24);
  lines.forEach((l, i) => assert.equal(visibleLength(l), 80, `line ${i} is ${visibleLength(l)} wide: ${l}`));
  const screen = lines.join('\n');
  assert.match(screen, /KIND +ADDRESS +USER/);
  assert.match(screen, /user\+addr 192\.0\.2\.5 +bob /);
  assert.match(screen, /\{inverse\}address +203\.0\.113\.9 +- /, 'the selected ban is marked');
  assert.ok(screen.includes('Compromised?[2J'), 'control characters in a reason are neutralised');
  assert.match(screen, / 2 bans /);
  const empty = new DashboardModel();
  empty.applySnapshot(snapshot([]), T0);
  assert.match(renderFrame(empty, 80, 24, T0, chrome).join('\n'), /no bans/);
});
