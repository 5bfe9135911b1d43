/**
 * A fast IMAP load client, run as its own process by the load tests so that
 * the gateway, the backend and the client do not share an event loop.
 *
 *   node tests/load/client.ts '<json Options>'
 *
 * churn: `total` complete sessions (greeting, LOGIN, NOOP, LOGOUT), at most
 *        `concurrency` at a time, each every `tlsEvery`-th over TLS.
 * hold:  open `sessions` logged-in sessions, NOOP each of them every
 *        `noopEveryMs`, and meanwhile run short sessions at `churnPerSec`;
 *        on "stop" (stdin) LOGOUT all of them. A held session that closes
 *        before its LOGOUT, or a NOOP that gets no OK, is a drop.
 *
 * Progress and the final result are JSON lines on stdout.
 */
import * as net from 'node:net';
import * as tls from 'node:tls';

interface Options {
  mode: 'churn' | 'hold';
  port: number;
  tlsPort?: number;
  user: string;
  password: string;
  /** Source addresses to cycle through (127.0.0.x), so no single 4-tuple space runs out. */
  sources: string[];
  /**
   * Instead of `sources`: this many distinct source addresses, 127.10.0.1 and on
   * (every session from a new address until they run out), starting at the
   * `sourceStart`-th: a flood of client addresses, as a scan or a botnet makes.
   */
  sourceCount?: number;
  sourceStart?: number;
  total?: number;
  concurrency?: number;
  tlsEvery?: number;
  sessions?: number;
  noopEveryMs?: number;
  churnPerSec?: number;
  /** TLS servername and whether the held sessions use TLS. */
  servername?: string;
  holdTls?: boolean;
}

const opts = JSON.parse(process.argv[2] ?? '{}') as Options;
let sourceIndex = opts.sourceStart ?? 0;
const nextSource = (): string => {
  const count = opts.sourceCount ?? 0;
  if (count <= 0) return opts.sources[sourceIndex++ % opts.sources.length]!;
  const i = sourceIndex++ % count;
  // 127.10.0.1 upwards, skipping .0 and .255 of each /24 (253 per block).
  const block = Math.floor(i / 253);
  return `127.${10 + Math.floor(block / 256)}.${block % 256}.${(i % 253) + 1}`;
};

function emit(o: unknown): void {
  process.stdout.write(`${JSON.stringify(o)}\n`);
}

/** One connection with a line reader: `expect(re)` resolves with the first line matching, rejects on close/timeout. */
class Conn {
  readonly socket: net.Socket;
  private buf = '';
  private waiter: { re: RegExp; resolve: (l: string) => void; reject: (e: Error) => void; timer: NodeJS.Timeout } | undefined;
  closed = false;
  expectedClose = false;
  onUnexpectedClose: (() => void) | undefined;

  constructor(useTls: boolean) {
    const port = useTls ? (opts.tlsPort ?? opts.port) : opts.port;
    const base = { host: '127.0.0.1', port, localAddress: nextSource() };
    this.socket = useTls ? tls.connect({ ...base, servername: opts.servername ?? 'mail.e2e.test', rejectUnauthorized: false }) : net.connect(base);
    this.socket.setNoDelay(true);
    this.socket.on('data', (d: Buffer) => {
      this.buf += d.toString('latin1');
      this.pump();
    });
    this.socket.on('error', () => undefined);
    this.socket.on('close', () => {
      this.closed = true;
      if (!this.expectedClose) this.onUnexpectedClose?.();
      const w = this.waiter;
      this.waiter = undefined;
      if (w) {
        clearTimeout(w.timer);
        w.reject(new Error(`closed while waiting for ${w.re}; unread ${JSON.stringify(this.buf.slice(0, 100))}`));
      }
    });
  }

  private pump(): void {
    const w = this.waiter;
    if (!w) return;
    for (let nl = this.buf.indexOf('\n'); nl >= 0; nl = this.buf.indexOf('\n')) {
      const line = this.buf.slice(0, nl).replace(/\r$/, '');
      this.buf = this.buf.slice(nl + 1);
      if (w.re.test(line)) {
        this.waiter = undefined;
        clearTimeout(w.timer);
        w.resolve(line);
        return;
      }
    }
  }

  expect(re: RegExp, timeoutMs = 15_000): Promise<string> {
    return new Promise((resolve, reject) => {
      if (this.closed) {
        reject(new Error(`closed before ${re}`));
        return;
      }
      const timer = setTimeout(() => {
        this.waiter = undefined;
        reject(new Error(`no ${re} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiter = { re, resolve, reject, timer };
      this.pump();
    });
  }

  write(s: string): void {
    if (!this.closed) this.socket.write(s);
  }

  waitClosed(timeoutMs = 15_000): Promise<boolean> {
    if (this.closed) return Promise.resolve(true);
    return new Promise((resolve) => {
      const t = setTimeout(() => resolve(false), timeoutMs);
      this.socket.once('close', () => {
        clearTimeout(t);
        resolve(true);
      });
    });
  }
}

async function login(c: Conn): Promise<void> {
  await c.expect(/^\* OK /);
  c.write(`a LOGIN ${opts.user} ${opts.password}\r\n`);
  const l = await c.expect(/^a /);
  if (!/^a OK/.test(l)) throw new Error(`login: ${l}`);
}

async function logout(c: Conn): Promise<void> {
  c.expectedClose = true;
  c.write('z LOGOUT\r\n');
  await c.expect(/^z OK/);
  if (!(await c.waitClosed())) throw new Error('not closed after LOGOUT');
}

async function shortSession(useTls: boolean): Promise<void> {
  const c = new Conn(useTls);
  try {
    await login(c);
    c.write('b NOOP\r\n');
    const l = await c.expect(/^b /);
    if (!/^b OK/.test(l)) throw new Error(`NOOP: ${l}`);
    await logout(c);
  } finally {
    c.socket.destroy();
  }
}

async function churn(): Promise<void> {
  const total = opts.total ?? 1000;
  const concurrency = opts.concurrency ?? 50;
  const tlsEvery = opts.tlsEvery ?? 0;
  let started = 0;
  let ok = 0;
  let failed = 0;
  const errors: string[] = [];
  const t0 = Date.now();
  const worker = async () => {
    while (started < total) {
      const n = started++;
      try {
        await shortSession(tlsEvery > 0 && n % tlsEvery === 0);
        ok++;
      } catch (err) {
        failed++;
        if (errors.length < 10) errors.push((err as Error).message);
      }
      if ((ok + failed) % 10_000 === 0) emit({ progress: ok + failed, ok, failed, ms: Date.now() - t0 });
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  emit({ done: true, ok, failed, errors, ms: Date.now() - t0 });
}

async function hold(): Promise<void> {
  const n = opts.sessions ?? 1000;
  const held: Conn[] = [];
  let dropped = 0;
  let noops = 0;
  let noopFailures = 0;
  let loginFailures = 0;
  const errors: string[] = [];
  const note = (e: unknown) => {
    if (errors.length < 10) errors.push((e as Error).message ?? String(e));
  };
  // Open in waves, so the handshakes do not all queue at once.
  for (let i = 0; i < n; i += 100) {
    await Promise.all(
      Array.from({ length: Math.min(100, n - i) }, async () => {
        const c = new Conn(opts.holdTls ?? true);
        c.onUnexpectedClose = () => void dropped++;
        try {
          await login(c);
          held.push(c);
        } catch (err) {
          loginFailures++;
          note(err);
        }
      }),
    );
  }
  emit({ held: held.length, loginFailures });
  let stopping = false;
  let tag = 0;
  const noopLoop = async (c: Conn, offset: number) => {
    await new Promise((r) => setTimeout(r, offset));
    while (!stopping && !c.closed) {
      const t = `n${++tag}`;
      c.write(`${t} NOOP\r\n`);
      try {
        const l = await c.expect(new RegExp(`^${t} `));
        if (/ OK/.test(l)) noops++;
        else throw new Error(l);
      } catch (err) {
        if (!stopping) {
          noopFailures++;
          note(err);
        }
        return;
      }
      await new Promise((r) => setTimeout(r, opts.noopEveryMs ?? 1000));
    }
  };
  const every = opts.noopEveryMs ?? 1000;
  const loops = held.map((c, i) => noopLoop(c, (i * every) / held.length));
  let churnOk = 0;
  let churnFailed = 0;
  const churnTimer = setInterval(() => {
    shortSession(false).then(
      () => void churnOk++,
      (err) => {
        churnFailed++;
        note(err);
      },
    );
  }, 1000 / Math.max(1, opts.churnPerSec ?? 10));
  await new Promise<void>((resolve) => {
    process.stdin.on('data', (d: Buffer) => {
      if (d.toString().includes('stop')) resolve();
    });
  });
  stopping = true;
  clearInterval(churnTimer);
  await Promise.all(loops);
  let loggedOut = 0;
  let logoutFailures = 0;
  await Promise.all(
    held.map(async (c) => {
      try {
        await logout(c);
        loggedOut++;
      } catch (err) {
        logoutFailures++;
        note(err);
      }
    }),
  );
  await new Promise((r) => setTimeout(r, 500));
  emit({ done: true, held: held.length, loginFailures, dropped, noops, noopFailures, loggedOut, logoutFailures, churnOk, churnFailed, errors });
}

(opts.mode === 'hold' ? hold() : churn()).then(
  () => process.exit(0),
  (err: unknown) => {
    emit({ done: true, fatal: String(err) });
    process.exit(1);
  },
);
