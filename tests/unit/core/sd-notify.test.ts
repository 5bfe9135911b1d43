import assert from 'node:assert/strict';
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { formatField, monotonicUsec, SdNotify } from '../../../src/core/sd-notify.ts';

const dir = mkdtempSync(join(tmpdir(), 'mailgate-sd-notify-'));
after(() => rmSync(dir, { recursive: true, force: true }));

/** A stand-in for systemd-notify that records its socket and arguments, one call per line. */
function fakeNotify(name: string, body = ''): { command: string; calls: () => string[][] } {
  const log = join(dir, `${name}.log`);
  const command = join(dir, name);
  writeFileSync(
    command,
    `#!/bin/sh\n${body}\nprintf '%s' "$NOTIFY_SOCKET" >> '${log}'\nfor a in "$@"; do printf '|%s' "$a" >> '${log}'; done\necho >> '${log}'\n`,
  );
  chmodSync(command, 0o755);
  return {
    command,
    calls: () => {
      let text = '';
      try {
        text = readFileSync(log, 'utf8');
      } catch {
        return [];
      }
      return text
        .split('\n')
        .filter(Boolean)
        .map((l) => l.split('|'));
    },
  };
}

test('without a notify socket nothing is spawned', async () => {
  const fake = fakeNotify('disabled');
  const errors: Error[] = [];
  const n = new SdNotify({ socket: undefined, command: fake.command, onError: (e) => errors.push(e) });
  assert.equal(n.enabled, false);
  await n.ready('x');
  await n.stopping();
  assert.deepEqual(fake.calls(), []);
  assert.deepEqual(errors, []);
});

test('the socket is taken from $NOTIFY_SOCKET by default', () => {
  const saved = process.env.NOTIFY_SOCKET;
  try {
    process.env.NOTIFY_SOCKET = '/run/systemd/notify';
    assert.equal(new SdNotify().enabled, true);
    delete process.env.NOTIFY_SOCKET;
    assert.equal(new SdNotify().enabled, false);
  } finally {
    if (saved === undefined) delete process.env.NOTIFY_SOCKET;
    else process.env.NOTIFY_SOCKET = saved;
  }
});

test('messages reach the helper in call order, one field per argument, on the configured socket', async () => {
  // The first call is slow: a later one must still not overtake it.
  const fake = fakeNotify('ordered', '[ "$1" = "READY=1" ] && [ ! -e "$0.seen" ] && { touch "$0.seen"; sleep 0.3; }');
  const n = new SdNotify({ socket: '@mailgate-test', command: fake.command, onError: (e) => assert.fail(e) });
  void n.ready('serving 2 listeners');
  void n.reloading('reloading\nconfiguration');
  void n.ready();
  await n.stopping('draining 3 sessions');
  const calls = fake.calls();
  assert.equal(calls.length, 4);
  assert.deepEqual(calls[0], ['@mailgate-test', 'READY=1', 'STATUS=serving 2 listeners']);
  assert.equal(calls[1]?.[1], 'RELOADING=1');
  assert.match(calls[1]?.[2] ?? '', /^MONOTONIC_USEC=\d+$/);
  assert.equal(calls[1]?.[3], 'STATUS=reloading configuration', 'a newline in a value would start a new field');
  assert.deepEqual(calls[2], ['@mailgate-test', 'READY=1']);
  assert.deepEqual(calls[3], ['@mailgate-test', 'STOPPING=1', 'STATUS=draining 3 sessions']);
});

test('a failing helper is reported once per message and never rejects', async () => {
  const fake = fakeNotify('failing', 'echo "No such socket" >&2; exit 1');
  const errors: { err: Error; fields: string[] }[] = [];
  const n = new SdNotify({ socket: '/nonexistent', command: fake.command, onError: (err, fields) => errors.push({ err, fields }) });
  await n.ready();
  await n.status('still here');
  assert.equal(errors.length, 2);
  assert.deepEqual(errors[0]?.fields, ['READY=1']);
  assert.match(errors[0]?.err.message ?? '', /No such socket/);
  assert.deepEqual(errors[1]?.fields, ['STATUS=still here']);
});

test('a missing helper is reported, not thrown', async () => {
  const errors: Error[] = [];
  const n = new SdNotify({ socket: '/nonexistent', command: join(dir, 'no-such-helper'), onError: (e) => errors.push(e) });
  await n.ready();
  assert.equal(errors.length, 1);
  assert.match(errors[0]?.message ?? '', /ENOENT/);
});

test('a helper that hangs is killed at the deadline', async () => {
  const fake = fakeNotify('hanging', 'exec sleep 30');
  const errors: Error[] = [];
  const n = new SdNotify({ socket: '/x', command: fake.command, timeoutMs: 200, onError: (e) => errors.push(e) });
  const t0 = Date.now();
  await n.ready();
  assert.ok(Date.now() - t0 < 5000);
  assert.equal(errors.length, 1);
});

test('field names are checked, values are kept on one line', () => {
  assert.equal(formatField('STATUS', 'a\r\nb'), 'STATUS=a b');
  assert.throws(() => formatField('status', 'x'), TypeError);
  assert.throws(() => formatField('READY=1\nX', 'x'), TypeError);
});

test('MONOTONIC_USEC is CLOCK_MONOTONIC in microseconds', () => {
  const a = BigInt(monotonicUsec());
  const ns = process.hrtime.bigint();
  const b = BigInt(monotonicUsec());
  assert.ok(a <= ns / 1000n && ns / 1000n <= b);
  // /proc/uptime is CLOCK_BOOTTIME: it is never behind CLOCK_MONOTONIC.
  const uptimeUsec = BigInt(Math.ceil(Number(readFileSync('/proc/uptime', 'utf8').split(' ')[0]) * 1e6)) + 10_000n;
  assert.ok(b <= uptimeUsec, `${b} µs should not exceed the uptime ${uptimeUsec} µs`);
});
