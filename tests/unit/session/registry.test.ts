import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { CloseReason } from '../../../src/protocols/types.ts';
import { newSessionRecord } from '../../../src/session/record.ts';
import { SessionRegistry, type SessionControl } from '../../../src/session/registry.ts';

function session(registry: SessionRegistry, listener: string): SessionControl {
  const record = newSessionRecord({ id: registry.nextId(), listener, protocol: 'imap', clientIp: '127.0.0.1', clientPort: 1, state: 'preauth' });
  return { record, kill: (_reason: CloseReason) => undefined, drain: () => undefined };
}

test('countFor follows adds and removes per listener, whatever the order', () => {
  const r = new SessionRegistry();
  const a = [session(r, 'imaps'), session(r, 'imaps'), session(r, 'imaps')];
  const b = [session(r, 'smtps'), session(r, 'smtps')];
  for (const s of [...a, ...b]) r.add(s);
  assert.equal(r.countFor('imaps'), 3);
  assert.equal(r.countFor('smtps'), 2);
  assert.equal(r.countFor('https'), 0);
  r.remove(a[1]!.record.id);
  r.remove(b[0]!.record.id);
  assert.equal(r.countFor('imaps'), 2);
  assert.equal(r.countFor('smtps'), 1);
  for (const s of [a[0]!, a[2]!, b[1]!]) r.remove(s.record.id);
  assert.equal(r.countFor('imaps'), 0);
  assert.equal(r.countFor('smtps'), 0);
  assert.equal(r.size, 0);
});

test('countFor is not thrown off by a session added twice or removed twice, or an unknown id', () => {
  const r = new SessionRegistry();
  const s = session(r, 'imaps');
  r.add(s);
  r.add(s);
  assert.equal(r.countFor('imaps'), 1);
  r.remove('no-such-session');
  r.remove(s.record.id);
  r.remove(s.record.id);
  assert.equal(r.countFor('imaps'), 0);
  r.add(session(r, 'imaps'));
  assert.equal(r.countFor('imaps'), 1);
});

test('countFor agrees with a count over list() through a random run of adds and removes', () => {
  const r = new SessionRegistry();
  const live: SessionControl[] = [];
  const listeners = ['imaps', 'pop3s', 'smtps'];
  let seed = 7;
  const rand = (n: number) => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) % n);
  for (let i = 0; i < 2000; i++) {
    if (live.length > 0 && rand(3) === 0) {
      const [gone] = live.splice(rand(live.length), 1);
      r.remove(gone!.record.id);
    } else {
      const s = session(r, listeners[rand(listeners.length)]!);
      live.push(s);
      r.add(s);
    }
    if (i % 100 === 0) {
      for (const l of listeners) assert.equal(r.countFor(l), r.list().filter((x) => x.listener === l).length);
    }
  }
});
