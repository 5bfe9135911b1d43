import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import type { Socket } from 'node:net';
import { test } from 'node:test';
import { SocketLink } from '../../../src/backend/link.ts';

/** Just enough of a socket for SocketLink: events in, writes recorded. */
class FakeSocket extends EventEmitter {
  written: string[] = [];
  destroyed = false;
  write(data: string): boolean {
    this.written.push(data);
    return true;
  }
  destroy(): this {
    this.destroyed = true;
    return this;
  }
}

function link(): { socket: FakeSocket; link: SocketLink } {
  const socket = new FakeSocket();
  return { socket, link: new SocketLink(socket as unknown as Socket, { maxLine: 1024, timeoutMs: 60_000 }) };
}

test('lines are read in order; release hands back the bytes past the last line read', async () => {
  const { socket, link: l } = link();
  socket.emit('data', Buffer.from('* OK ready\r\na1 OK done\r\nextra'));
  assert.equal(await l.readLine(), '* OK ready');
  assert.equal(await l.readLine(), 'a1 OK done');
  const { leftover } = l.release();
  assert.equal(leftover.toString(), 'extra');
});

test('after release, a read fails with BACKEND_CLOSED, writes are dropped and data is no longer taken', async () => {
  const { socket, link: l } = link();
  l.write('a1 LOGIN\r\n');
  l.release();
  l.write('a2 NOOP\r\n');
  assert.deepEqual(socket.written, ['a1 LOGIN\r\n']);
  await assert.rejects(l.readLine(), (err: Error & { code?: string }) => err.code === 'BACKEND_CLOSED');
  assert.equal(socket.listenerCount('data'), 0);
  // An error after release must not crash the process (one handler stays).
  socket.emit('error', new Error('late'));
});

test('a backend that closes during the login rejects the pending read once, with BACKEND_CLOSED', async () => {
  const { socket, link: l } = link();
  const pending = l.readLine();
  socket.emit('end');
  await assert.rejects(pending, (err: Error & { code?: string }) => err.code === 'BACKEND_CLOSED');
  await assert.rejects(l.readLine(), (err: Error & { code?: string }) => err.code === 'BACKEND_CLOSED');
  l.destroy();
  assert.equal(socket.destroyed, true);
});
