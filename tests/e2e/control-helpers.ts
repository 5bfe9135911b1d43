/**
 * Helpers for the control socket and dashboard end-to-end tests: a Python
 * imaplib process that holds named IMAP sessions open and counts the exact
 * plaintext bytes it sent and received, commanded line by line over stdin;
 * and a tmux pane driver.
 */
import { spawn, spawnSync, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { waitFor } from '../helpers/wait.ts';

const HOLDER = String.raw`
import imaplib, json, socket, ssl, sys

host, port, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3]

class Counting(imaplib.IMAP4_SSL):
    def __init__(self, source, ctx):
        self.source = source
        self.sent = 0
        self.received = 0
        super().__init__(host, port, ssl_context=ctx, timeout=10)
    def _create_socket(self, timeout):
        src = (self.source, 0) if self.source else None
        sock = socket.create_connection((self.host, self.port), timeout, source_address=src)
        return self.ssl_context.wrap_socket(sock, server_hostname='mail.e2e.test')
    def send(self, data):
        self.sent += len(data)
        return super().send(data)
    def readline(self):
        line = super().readline()
        self.received += len(line)
        return line
    def read(self, size):
        data = super().read(size)
        self.received += len(data)
        return data

ctx = ssl.create_default_context(cafile=cafile)
sessions = {}
for line in sys.stdin:
    cmd = json.loads(line)
    op, name = cmd['op'], cmd.get('name')
    out = {'op': op, 'name': name, 'ok': True}
    try:
        if op == 'open':
            c = Counting(cmd.get('source'), ctx)
            sessions[name] = c
            try:
                c.login(cmd['user'], cmd['password'])
            except imaplib.IMAP4.error as e:
                out['ok'] = False
                out['error'] = str(e)
        else:
            c = sessions[name]
            if op == 'noop':
                c.noop()
            elif op == 'fetch':
                c.select('INBOX')
                typ, data = c.fetch('1:*', '(UID RFC822.SIZE BODY.PEEK[])')
                out['messages'] = len([d for d in data if isinstance(d, tuple)])
            elif op == 'logout':
                # Not imaplib's logout(): it stops reading at the BYE, before the tagged OK.
                # Read to the end of the stream so that every byte the gateway sent is counted.
                c.send(c._new_tag() + b' LOGOUT\r\n')
                while c.readline():
                    pass
                c.shutdown()
                del sessions[name]
            elif op == 'drop':
                c.shutdown()
                del sessions[name]
        out['sent'] = c.sent
        out['received'] = c.received
    except Exception as e:
        out['ok'] = False
        out['error'] = type(e).__name__ + ': ' + str(e)
        if name in sessions:
            out['sent'] = sessions[name].sent
            out['received'] = sessions[name].received
    print(json.dumps(out), flush=True)
`;

export interface HolderReply {
  op: string;
  name: string;
  ok: boolean;
  error?: string;
  sent?: number;
  received?: number;
  messages?: number;
}

/** Holds named IMAP sessions through the gateway in one Python process. */
export class ImapHolder {
  private readonly child: ChildProcessWithoutNullStreams;
  private readonly waiting: ((r: HolderReply) => void)[] = [];
  private stderr = '';

  constructor(port: number, cafile: string) {
    this.child = spawn('python3', ['-u', '-c', HOLDER, '127.0.0.1', String(port), cafile], { stdio: ['pipe', 'pipe', 'pipe'] });
    this.child.stderr.setEncoding('utf8');
    this.child.stderr.on('data', (d: string) => (this.stderr += d));
    createInterface({ input: this.child.stdout }).on('line', (line) => {
      const w = this.waiting.shift();
      w?.(JSON.parse(line) as HolderReply);
    });
  }

  private send(cmd: Record<string, unknown>, timeoutMs = 20_000): Promise<HolderReply> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`python holder: no answer to ${JSON.stringify(cmd)}; stderr:\n${this.stderr}`)), timeoutMs);
      this.waiting.push((r) => {
        clearTimeout(timer);
        resolve(r);
      });
      this.child.stdin.write(`${JSON.stringify(cmd)}\n`);
    });
  }

  async open(name: string, user: string, password: string, source?: string): Promise<HolderReply> {
    return this.send({ op: 'open', name, user, password, ...(source ? { source } : {}) });
  }

  noop(name: string): Promise<HolderReply> {
    return this.send({ op: 'noop', name });
  }

  fetch(name: string): Promise<HolderReply> {
    return this.send({ op: 'fetch', name });
  }

  logout(name: string): Promise<HolderReply> {
    return this.send({ op: 'logout', name });
  }

  async close(): Promise<void> {
    this.child.stdin.end();
    if (this.child.exitCode === null) await new Promise((r) => this.child.once('exit', r));
  }
}

/** A tmux server of its own on a socket in `dir` (removed with it), one window running `command`. */
export class TmuxPane {
  readonly socketPath: string;

  constructor(dir: string, command: string, width = 120, height = 40) {
    this.socketPath = join(dir, 'tmux.sock');
    this.tmux(['-f', '/dev/null', 'new-session', '-d', '-x', String(width), '-y', String(height), '-s', 'top', command]);
  }

  private tmux(args: string[]): string {
    const r = spawnSync('tmux', ['-u', '-S', this.socketPath, ...args], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`tmux ${args.join(' ')} failed: ${r.stderr}`);
    return r.stdout;
  }

  capture(): string {
    return this.tmux(['capture-pane', '-p', '-t', 'top']);
  }

  keys(...keys: string[]): void {
    this.tmux(['send-keys', '-t', 'top', ...keys]);
  }

  /** Sends literal text (no key-name lookup). */
  type(text: string): void {
    this.tmux(['send-keys', '-t', 'top', '-l', text]);
  }

  alive(): boolean {
    return spawnSync('tmux', ['-S', this.socketPath, 'has-session', '-t', 'top']).status === 0;
  }

  waitFor(pred: (screen: string) => boolean, what: string, timeoutMs = 10_000): Promise<string> {
    let last = '';
    return waitFor(
      what,
      () => {
        if (!this.alive()) throw new Error(`the tmux pane ended while waiting for ${what}; last screen:\n${last}`);
        last = this.capture();
        return pred(last) && last;
      },
      { timeoutMs, intervalMs: 100, detail: () => `screen:\n${last}` },
    );
  }

  kill(): void {
    spawnSync('tmux', ['-S', this.socketPath, 'kill-server']);
    rmSync(this.socketPath, { force: true });
  }
}
