/**
 * A client of the control socket, for the CLI verbs, the dashboard and tests:
 * connects, checks the daemon's protocol version, sends requests and matches
 * replies by id, and hands snapshots and event batches to listeners.
 */
import { createConnection, type Socket } from 'node:net';
import { errorCode, errorMessage, MailgateError } from '../core/errors.ts';
import {
  decodeServerMessage,
  encode,
  LineDecoder,
  MAX_MESSAGE_LINE,
  PROTOCOL_VERSION,
  type BuiltinCommand,
  type Bye,
  type CommandArgs,
  type CommandResults,
  type ErrorCode,
  type EventBatch,
  type Hello,
  type ServerMessage,
  type Snapshot,
} from './protocol.ts';

/** The daemon answered a request with an error. */
export class ControlRequestError extends Error {
  readonly code: ErrorCode;
  readonly result: unknown;
  constructor(code: ErrorCode, message: string, result: unknown) {
    super(message);
    this.name = 'ControlRequestError';
    this.code = code;
    this.result = result;
  }
}

interface Pending {
  resolve(v: unknown): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout | undefined;
}

export interface ControlClientOptions {
  /** For connecting and the hello (default 5 s). */
  connectTimeoutMs?: number;
  /** Per request (default 60 s: a reload may take a while). */
  requestTimeoutMs?: number;
}

type Listener<T> = (v: T) => void;

export class ControlClient {
  readonly hello: Hello;
  private readonly socket: Socket;
  private readonly decoder: LineDecoder;
  private readonly pending = new Map<number, Pending>();
  private readonly requestTimeoutMs: number;
  private nextId = 1;
  private closedError: Error | undefined;
  private readonly snapshotListeners = new Set<Listener<Snapshot>>();
  private readonly eventListeners = new Set<Listener<EventBatch>>();
  private readonly closeListeners = new Set<Listener<Error | undefined>>();
  /** Why the daemon said goodbye, when it did. */
  bye: Bye['reason'] | undefined;

  private constructor(socket: Socket, hello: Hello, decoder: LineDecoder, opts: ControlClientOptions) {
    this.socket = socket;
    this.hello = hello;
    // The hello's decoder may already hold the start of the next line.
    this.decoder = decoder;
    this.requestTimeoutMs = opts.requestTimeoutMs ?? 60_000;
  }

  /** Connects and waits for the daemon's hello; errors name the socket and the likely cause. */
  static connect(path: string, opts: ControlClientOptions = {}): Promise<ControlClient> {
    return new Promise((resolve, reject) => {
      const socket = createConnection({ path });
      const decoder = new LineDecoder(MAX_MESSAGE_LINE);
      let settled = false;
      const fail = (err: Error) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        socket.destroy();
        reject(err);
      };
      const timer = setTimeout(() => fail(new MailgateError('CONTROL', `${path}: the daemon did not answer within ${opts.connectTimeoutMs ?? 5000} ms`)), opts.connectTimeoutMs ?? 5000);
      socket.once('error', (err) => fail(connectError(path, err)));
      socket.once('close', () => fail(new MailgateError('CONTROL', `${path}: the daemon closed the connection`)));
      const onData = (chunk: Buffer) => {
        let lines: string[];
        try {
          lines = decoder.push(chunk);
        } catch (err) {
          fail(new MailgateError('CONTROL', `${path}: ${errorMessage(err)}`));
          return;
        }
        if (lines.length === 0) return;
        let first: ServerMessage;
        try {
          first = decodeServerMessage(lines[0]!);
        } catch (err) {
          fail(new MailgateError('CONTROL', `${path}: ${errorMessage(err)}`));
          return;
        }
        if (first.type === 'bye') {
          fail(new MailgateError('CONTROL', `${path}: the daemon refused the connection (${first.reason})`));
          return;
        }
        if (first.type !== 'hello') {
          fail(new MailgateError('CONTROL', `${path}: expected a hello from the daemon, got "${first.type}"`));
          return;
        }
        if (first.protocol !== PROTOCOL_VERSION) {
          fail(new MailgateError('CONTROL', `${path}: the daemon speaks control protocol ${first.protocol}, this client ${PROTOCOL_VERSION} (mailgate ${first.version}); use the mailgate that runs the daemon`));
          return;
        }
        settled = true;
        clearTimeout(timer);
        socket.off('data', onData);
        socket.removeAllListeners('error');
        socket.removeAllListeners('close');
        const client = new ControlClient(socket, first, decoder, opts);
        client.attach(lines.slice(1));
        resolve(client);
      };
      socket.on('data', onData);
    });
  }

  private attach(rest: string[]): void {
    this.socket.on('data', (chunk: Buffer) => {
      let lines: string[];
      try {
        lines = this.decoder.push(chunk);
      } catch (err) {
        this.destroy(new MailgateError('CONTROL', errorMessage(err)));
        return;
      }
      for (const l of lines) this.message(l);
    });
    this.socket.on('error', (err) => this.destroy(new MailgateError('CONTROL', `control socket: ${err.message}`, { cause: err })));
    this.socket.on('close', () => this.destroy(this.bye === 'shutdown' ? undefined : new MailgateError('CONTROL', this.bye ? `the daemon dropped this client (${this.bye})` : 'the daemon closed the connection')));
    for (const l of rest) this.message(l);
  }

  private message(line: string): void {
    if (line === '') return;
    let msg: ServerMessage;
    try {
      msg = decodeServerMessage(line);
    } catch (err) {
      this.destroy(new MailgateError('CONTROL', errorMessage(err)));
      return;
    }
    switch (msg.type) {
      case 'reply': {
        if (typeof msg.id !== 'number') {
          if (!msg.ok) this.destroy(new MailgateError('CONTROL', `the daemon refused a request: ${msg.error.message}`));
          return;
        }
        const p = this.pending.get(msg.id);
        if (!p) return;
        this.pending.delete(msg.id);
        clearTimeout(p.timer);
        if (msg.ok) p.resolve(msg.result);
        else p.reject(new ControlRequestError(msg.error.code, msg.error.message, msg.result));
        return;
      }
      case 'snapshot':
        for (const l of this.snapshotListeners) l(msg);
        return;
      case 'events':
        for (const l of this.eventListeners) l(msg);
        return;
      case 'bye':
        this.bye = msg.reason;
        return;
      case 'hello':
        return;
      default: {
        const never: never = msg;
        throw new Error(`unhandled message ${JSON.stringify(never)}`);
      }
    }
  }

  request<C extends BuiltinCommand>(cmd: C, args?: CommandArgs<C>): Promise<CommandResults[C]>;
  request(cmd: string, args?: Record<string, unknown>): Promise<unknown>;
  request(cmd: string, args?: Record<string, unknown>): Promise<unknown> {
    if (this.closedError !== undefined || this.socket.destroyed) return Promise.reject(this.closedError ?? new MailgateError('CONTROL', 'not connected'));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = this.requestTimeoutMs > 0 ? setTimeout(() => {
        this.pending.delete(id);
        reject(new MailgateError('CONTROL', `${cmd}: no answer within ${this.requestTimeoutMs} ms`));
      }, this.requestTimeoutMs) : undefined;
      this.pending.set(id, { resolve, reject, timer });
      this.socket.write(encode(args === undefined ? { id, cmd } : { id, cmd, args }));
    });
  }

  /** Subscribes; resolves once the snapshot has arrived (it is also given to onSnapshot listeners). */
  async subscribe(): Promise<Snapshot> {
    let snap: Snapshot | undefined;
    const off = this.onSnapshot((s) => {
      snap = s;
    });
    try {
      await this.request('subscribe', {});
    } finally {
      off();
    }
    if (!snap) throw new MailgateError('CONTROL', 'subscribed but no snapshot arrived');
    return snap;
  }

  onSnapshot(l: Listener<Snapshot>): () => void {
    this.snapshotListeners.add(l);
    return () => this.snapshotListeners.delete(l);
  }

  onEvents(l: Listener<EventBatch>): () => void {
    this.eventListeners.add(l);
    return () => this.eventListeners.delete(l);
  }

  /** Called once when the connection ends: undefined after close() or a daemon shutdown, else the error. */
  onClose(l: Listener<Error | undefined>): () => void {
    this.closeListeners.add(l);
    return () => this.closeListeners.delete(l);
  }

  get closed(): boolean {
    return this.closedError !== undefined;
  }

  close(): void {
    this.destroy(undefined);
  }

  private destroy(err: Error | undefined): void {
    if (this.closedError !== undefined) return;
    this.closedError = err ?? new MailgateError('CONTROL', 'connection closed');
    this.socket.destroy();
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(this.closedError);
    }
    this.pending.clear();
    for (const l of this.closeListeners) l(err);
    this.closeListeners.clear();
  }
}

function connectError(path: string, err: Error): MailgateError {
  const code = errorCode(err);
  const why =
    code === 'ENOENT'
      ? 'no control socket there (is mailgate running, with this config?)'
      : code === 'ECONNREFUSED'
        ? 'nobody answers (the daemon is not running; the socket file is stale)'
        : code === 'EACCES' || code === 'EPERM'
          ? 'permission denied (run as root or as a member of the group in control.group)'
          : err.message;
  return new MailgateError('CONTROL', `cannot connect to the control socket ${path}: ${why}`, { cause: err });
}
