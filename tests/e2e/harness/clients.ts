/**
 * Real clients for the end-to-end tests: Python's imaplib/poplib/smtplib,
 * curl, swaks and openssl run as child processes; a small line client on
 * node:tls for the byte-exact protocol checks (injection, bounds, timeouts).
 */
import { execFile } from 'node:child_process';
import * as net from 'node:net';
import * as tls from 'node:tls';

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function run(cmd: string, args: string[], opts: { input?: string; timeoutMs?: number; encoding?: 'utf8' | 'latin1' } = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = execFile(
      cmd,
      args,
      { timeout: opts.timeoutMs ?? 20_000, maxBuffer: 64 * 1024 * 1024, encoding: opts.encoding ?? 'utf8' },
      (err, stdout, stderr) => {
        const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? ((err as { code: number }).code) : 1) : 0;
        resolve({ code, stdout: String(stdout), stderr: String(stderr) });
      },
    );
    if (opts.input !== undefined) child.stdin?.end(opts.input);
    else child.stdin?.end();
  });
}

/** Runs a Python snippet; `args` arrive as sys.argv[1:]. The snippet prints JSON on its last line. */
export async function python<T = unknown>(script: string, args: (string | number)[] = [], timeoutMs = 30_000): Promise<T> {
  const r = await run('python3', ['-c', PY_PRELUDE + script, ...args.map(String)], { timeoutMs });
  if (r.code !== 0) throw new Error(`python failed (${r.code}):\n${r.stderr}\n${r.stdout}`);
  const last = r.stdout.trim().split('\n').at(-1) ?? 'null';
  return JSON.parse(last) as T;
}

/** One IMAPS login through `port` with imaplib, from the local address `source` (127.0.0.0/8): ok, or the server's words. */
export function imapLoginFrom(port: number, user: string, password: string, source: string): Promise<{ ok: boolean; error?: string }> {
  return python(
    `
import imaplib
class From(imaplib.IMAP4_SSL):
    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(sys.argv[4], 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)
try:
    m = From('127.0.0.1', int(sys.argv[1]), ssl_context=ctx(), timeout=10)
    m.login(sys.argv[2], sys.argv[3])
    m.logout()
    out({'ok': True})
except (imaplib.IMAP4.error, OSError) as e:
    out({'ok': False, 'error': str(e)})
`,
    [port, user, password, source],
  );
}

/** Shared by every snippet: a TLS context that trusts the gateway's self-signed certificate. */
const PY_PRELUDE = `
import json, ssl, sys, socket, base64
def ctx(cafile=None):
    c = ssl.create_default_context(cafile=cafile) if cafile else ssl.create_default_context()
    if not cafile:
        c.check_hostname = False
        c.verify_mode = ssl.CERT_NONE
    return c
def out(v):
    print(json.dumps(v))
`;

/** A line client on node:net/tls for byte-level protocol checks. */
export class LineClient {
  socket: net.Socket;
  private buf = Buffer.alloc(0);
  private waiters: (() => void)[] = [];
  closed = false;
  readonly closedPromise: Promise<void>;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    this.closedPromise = new Promise((resolve) => socket.once('close', () => resolve()));
    this.attach(socket);
  }

  private attach(socket: net.Socket): void {
    socket.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.wake();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => undefined);
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  static connect(port: number, opts: { tls?: boolean; host?: string; alpn?: string[]; servername?: string; localAddress?: string } = {}): Promise<LineClient> {
    const host = opts.host ?? '127.0.0.1';
    return new Promise((resolve, reject) => {
      const local = opts.localAddress ? { localAddress: opts.localAddress } : {};
      const socket = opts.tls
        ? tls.connect({ host, port, rejectUnauthorized: false, servername: opts.servername ?? 'mail.e2e.test', ...(opts.alpn ? { ALPNProtocols: opts.alpn } : {}), ...local })
        : net.connect({ host, port, ...local });
      socket.once(opts.tls ? 'secureConnect' : 'connect', () => {
        socket.off('error', reject);
        resolve(new LineClient(socket));
      });
      socket.once('error', reject);
    });
  }

  write(data: string | Buffer): void {
    this.socket.write(data);
  }

  /** The next line (without CRLF); throws on close or after timeoutMs. */
  async readLine(timeoutMs = 5000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const lf = this.buf.indexOf(0x0a);
      if (lf >= 0) {
        const line = this.buf.subarray(0, lf).toString('latin1').replace(/\r$/, '');
        this.buf = this.buf.subarray(lf + 1);
        return line;
      }
      if (this.closed) throw new Error(`connection closed; unread: ${JSON.stringify(this.buf.toString('latin1'))}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no line within ${timeoutMs} ms; unread: ${JSON.stringify(this.buf.toString('latin1'))}`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
  }

  /** Reads lines until one matches. */
  async readUntil(re: RegExp, timeoutMs = 5000): Promise<string[]> {
    const lines: string[] = [];
    for (;;) {
      const l = await this.readLine(timeoutMs);
      lines.push(l);
      if (re.test(l)) return lines;
    }
  }

  /** What arrives within ms (used to prove that nothing arrives). */
  async readFor(ms: number): Promise<string> {
    await new Promise((r) => setTimeout(r, ms));
    const s = this.buf.toString('latin1');
    this.buf = Buffer.alloc(0);
    return s;
  }

  /** Upgrades to TLS in place (after the server said go ahead). */
  startTls(servername = 'mail.e2e.test'): Promise<void> {
    return new Promise((resolve, reject) => {
      const plain = this.socket;
      plain.removeAllListeners('data');
      const secure = tls.connect({ socket: plain, rejectUnauthorized: false, servername });
      secure.once('secureConnect', () => {
        this.socket = secure;
        this.buf = Buffer.alloc(0);
        this.attach(secure);
        resolve();
      });
      secure.once('error', reject);
    });
  }

  async waitClosed(timeoutMs = 5000): Promise<boolean> {
    if (this.closed) return true;
    let t: NodeJS.Timeout | undefined;
    const timeout = new Promise<boolean>((r) => {
      t = setTimeout(() => r(false), timeoutMs);
    });
    const r = await Promise.race([this.closedPromise.then(() => true), timeout]);
    clearTimeout(t);
    return r;
  }

  close(): void {
    this.socket.destroy();
  }
}

