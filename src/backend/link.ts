/**
 * A line-oriented, deadline-bound view of a backend socket for the login
 * replay and probes. `release()` hands the socket back with whatever the
 * backend sent past the last line read, for the splice.
 */
import type { Socket } from 'node:net';
import { MailgateError } from '../core/errors.ts';
import { LINE_TOO_LONG, LineReader } from '../net/line-reader.ts';
import type { BackendLink } from '../protocols/types.ts';

export class SocketLink implements BackendLink {
  private readonly socket: Socket;
  private readonly reader: LineReader;
  private waiter: { resolve: (line: string) => void; reject: (err: Error) => void } | undefined;
  private failure: Error | undefined;
  /** Set by release() and destroy(): later reads fail, writes are dropped. The error is made only if a read comes (no stack capture per session). */
  private released = false;
  private timer: NodeJS.Timeout | undefined;
  private readonly timeoutMs: number;
  private readonly onData = (chunk: Buffer) => {
    this.reader.push(chunk);
    this.pump();
  };
  private readonly onEnd = () => this.fail(new MailgateError('BACKEND_CLOSED', 'backend closed the connection during login'));
  private readonly onError = (err: Error) => this.fail(new MailgateError('BACKEND_CLOSED', `backend error during login: ${err.message}`, { cause: err }));

  constructor(socket: Socket, opts: { maxLine: number; timeoutMs: number }) {
    this.socket = socket;
    this.reader = new LineReader(opts.maxLine);
    this.timeoutMs = opts.timeoutMs;
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
    socket.on('error', this.onError);
    // One deadline for the whole exchange: a backend that trickles lines cannot hold the session forever.
    this.timer = setTimeout(
      () => this.fail(new MailgateError('BACKEND_TIMEOUT', `backend did not finish the login within ${this.timeoutMs} ms`)),
      this.timeoutMs,
    );
  }

  readLine(): Promise<string> {
    if (this.waiter) return Promise.reject(new Error('SocketLink: concurrent readLine'));
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject };
      this.pump();
    });
  }

  write(data: string): void {
    if (!this.failure && !this.released) this.socket.write(data);
  }

  /** Stops the deadline and detaches; returns the socket and any bytes read past the last line. */
  release(): { socket: Socket; leftover: Buffer } {
    this.detach();
    return { socket: this.socket, leftover: this.reader.drain() };
  }

  /** Gives up on the connection (failed login, probe done). */
  destroy(): void {
    this.detach();
    this.socket.destroy();
  }

  private detach(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onEnd);
    this.socket.off('error', this.onError);
    this.released = true;
    // Errors after release belong to the new owner; keep one handler so an early one cannot crash the process.
    this.socket.on('error', noop);
  }

  private pump(): void {
    if (!this.waiter) return;
    if (this.failure || this.released) {
      const w = this.waiter;
      this.waiter = undefined;
      w.reject(this.failure ?? new MailgateError('BACKEND_CLOSED', 'link released'));
      return;
    }
    const line = this.reader.nextLine();
    if (line === null) return;
    const w = this.waiter;
    this.waiter = undefined;
    if (line === LINE_TOO_LONG) {
      this.fail(new MailgateError('BACKEND_PROTOCOL', 'backend sent an overlong line'));
      w.reject(this.failure!);
      return;
    }
    w.resolve(line.toString('latin1'));
  }

  private fail(err: Error): void {
    if (this.failure || this.released) return;
    this.failure = err;
    clearTimeout(this.timer);
    this.pump();
  }
}

function noop(): void {}
