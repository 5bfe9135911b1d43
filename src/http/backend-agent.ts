/**
 * The keep-alive agent the HTTP proxy uses towards its backend. It adds what
 * node:http lacks: a deadline on the TCP connect (named in the config as
 * backend_connect) and, optionally, bytes written first on every new
 * connection (a PROXY protocol header for one client's private agent).
 */
import { Agent, type ClientRequestArgs } from 'node:http';
import { createConnection, type NetConnectOpts, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { MailgateError } from '../core/errors.ts';
import { formatHostPort } from '../net/address.ts';

export interface BackendAgentOptions {
  /** Read at each new connection, so a reload applies to the next one. */
  connectTimeoutMs: () => number;
  maxSockets: number;
  maxFreeSockets: number;
  /** Written before anything else on each new backend connection. */
  prelude?: Buffer;
}

export class BackendAgent extends Agent {
  readonly #connectTimeoutMs: () => number;
  readonly #prelude: Buffer | undefined;

  constructor(opts: BackendAgentOptions) {
    super({ keepAlive: true, maxSockets: opts.maxSockets, maxFreeSockets: opts.maxFreeSockets, scheduling: 'lifo' });
    this.#connectTimeoutMs = opts.connectTimeoutMs;
    this.#prelude = opts.prelude;
  }

  /**
   * Node calls this for every new backend socket. A connect that outlasts the
   * deadline is destroyed with BACKEND_TIMEOUT, which reaches the request's
   * 'error' handler (and so the proxy's error path) exactly like ECONNREFUSED.
   */
  override createConnection(options: ClientRequestArgs, _callback?: (err: Error | null, stream: Duplex) => void): Duplex {
    const socket: Socket = createConnection({ ...(options as NetConnectOpts), noDelay: true } as NetConnectOpts);
    const ms = this.#connectTimeoutMs();
    const where = formatHostPort({ host: String(options.hostname ?? options.host ?? ''), port: Number(options.port) });
    const timer = setTimeout(() => {
      socket.destroy(new MailgateError('BACKEND_TIMEOUT', `backend ${where} did not accept within ${ms} ms`));
    }, ms);
    const done = () => clearTimeout(timer);
    socket.once('connect', done);
    socket.once('close', done);
    // Queued until the connection is up, so it precedes the request line.
    if (this.#prelude) socket.write(this.#prelude);
    return socket;
  }
}
