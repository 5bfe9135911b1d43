/**
 * Small in-process backends on 127.0.0.1 for the tests that need a backend
 * to misbehave on purpose (inject bytes, stall, reset, send garbage), to
 * record every byte it received, or to be fast enough for load tests. Real
 * servers (Dovecot, Postfix, nginx) live in tests/e2e/harness/servers.ts; these only speak
 * enough IMAP, POP3 or SMTP to accept or refuse a login the gateway
 * replays, then answer every command after it.
 */
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';

export interface FakeConnection {
  socket: Socket;
  /** Every byte received, in order. */
  received: Buffer[];
  /** The login the gateway replayed, once it did. */
  user: string | undefined;
  text(): string;
}

export interface FakeBackend {
  port: number;
  connections: FakeConnection[];
  /** Bytes of every connection, each as latin1 text, oldest first. */
  transcripts(): string[];
  /** Connections currently open. */
  open(): FakeConnection[];
  close(): Promise<void>;
}

export interface FakeOptions {
  /** Passwords by user; a login with another password is refused. Default: alice/secret. */
  users?: Record<string, string>;
  /** Written on connect instead of the normal greeting (undefined: the normal one; '' nothing at all). */
  greeting?: string;
  /** Delay before each answer (a slow backend). */
  delayMs?: number;
  /** Called for every line; return a string to answer it that way instead. */
  override?: (line: string, conn: FakeConnection) => string | undefined;
  /** Extra CAPABILITY atoms (IMAP), CAPA lines (POP3) or EHLO keywords (SMTP). */
  capabilities?: string[];
  /** POP3: offer SASL PLAIN in CAPA (default); without it the gateway replays USER/PASS. */
  sasl?: boolean;
}

type Handler = (line: string, conn: FakeConnection, state: Record<string, unknown>) => string | { reply: string; end?: boolean } | undefined;

async function startLineServer(greeting: string, opts: FakeOptions, handle: Handler): Promise<FakeBackend> {
  const connections: FakeConnection[] = [];
  const live = new Set<FakeConnection>();
  const server: Server = createServer((socket) => {
    socket.setNoDelay(true);
    const conn: FakeConnection = {
      socket,
      received: [],
      user: undefined,
      text: () => Buffer.concat(conn.received).toString('latin1'),
    };
    connections.push(conn);
    live.add(conn);
    const state: Record<string, unknown> = {};
    let buf = '';
    let queue = Promise.resolve();
    const say = (text: string, end = false) => {
      const send = () => {
        if (socket.destroyed) return;
        if (end) socket.end(text);
        else if (text) socket.write(text);
      };
      if (opts.delayMs) queue = queue.then(() => new Promise<void>((r) => setTimeout(() => (send(), r()), opts.delayMs)));
      else send();
    };
    socket.on('error', () => undefined);
    socket.on('close', () => live.delete(conn));
    socket.on('data', (d: Buffer) => {
      conn.received.push(d);
      buf += d.toString('latin1');
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const line = buf.slice(0, nl).replace(/\r$/, '');
        buf = buf.slice(nl + 1);
        const custom = opts.override?.(line, conn);
        if (custom !== undefined) {
          say(custom);
          continue;
        }
        const r = handle(line, conn, state);
        if (r === undefined) continue;
        if (typeof r === 'string') say(r);
        else say(r.reply, r.end);
      }
    });
    const g = opts.greeting ?? greeting;
    if (g) say(g);
  });
  return listenFake(server, connections, live);
}

/** Binds a fake on a free loopback port; the handle every fake returns. */
async function listenFake(server: Server, connections: FakeConnection[], live: Set<FakeConnection>): Promise<FakeBackend> {
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  return {
    port: (server.address() as AddressInfo).port,
    connections,
    transcripts: () => connections.map((c) => c.text()),
    open: () => [...live],
    close: () =>
      new Promise<void>((resolve) => {
        for (const c of live) c.socket.destroy();
        server.close(() => resolve());
      }),
  };
}

function plain(b64: string): { user: string; password: string } | undefined {
  const parts = Buffer.from(b64, 'base64').toString('utf8').split('\0');
  if (parts.length !== 3) return undefined;
  return { user: parts[1]!, password: parts[2]! };
}

function unquote(s: string | undefined): string {
  if (!s) return '';
  return s.startsWith('"') ? s.slice(1, -1).replace(/\\(.)/g, '$1') : s;
}

/** IMAP: AUTHENTICATE PLAIN (SASL-IR) and LOGIN with quoted strings; after login every command is OK. */
export function startFakeImap(opts: FakeOptions = {}): Promise<FakeBackend> {
  const users = opts.users ?? { alice: 'secret' };
  const caps = ['IMAP4rev1', 'SASL-IR', 'AUTH=PLAIN', 'ID', 'LITERAL+', ...(opts.capabilities ?? [])].join(' ');
  return startLineServer(`* OK [CAPABILITY ${caps}] fake IMAP ready\r\n`, opts, (line, conn, state) => {
    const check = (t: string, c: { user: string; password: string } | undefined) => {
      if (c && users[c.user] === c.password) {
        conn.user = c.user;
        return `${t} OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n`;
      }
      return `${t} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n`;
    };
    if (state.plainTag !== undefined) {
      const tag = String(state.plainTag);
      state.plainTag = undefined;
      return check(tag, plain(line));
    }
    const m = /^(\S+) (\S+) ?(.*)$/.exec(line);
    if (!m) return '* BAD what\r\n';
    const [, tag, verb, rest] = m as unknown as [string, string, string, string];
    switch (verb.toUpperCase()) {
      case 'CAPABILITY':
        return `* CAPABILITY ${caps}\r\n${tag} OK done\r\n`;
      case 'ID':
        return `* ID NIL\r\n${tag} OK ID done\r\n`;
      case 'AUTHENTICATE': {
        const [mech, ir] = rest.split(' ');
        if (mech?.toUpperCase() !== 'PLAIN') return `${tag} NO unsupported\r\n`;
        if (ir === undefined) {
          state.plainTag = tag;
          return '+ \r\n';
        }
        return check(tag, plain(ir));
      }
      case 'LOGIN': {
        const q = /^("(?:[^"\\]|\\.)*"|\S+) ("(?:[^"\\]|\\.)*"|\S+)$/.exec(rest);
        return check(tag, q ? { user: unquote(q[1]), password: unquote(q[2]) } : undefined);
      }
      case 'LOGOUT':
        return { reply: `* BYE Logging out\r\n${tag} OK Logout completed\r\n`, end: true };
      default:
        return `${tag} OK ${verb} completed\r\n`;
    }
  });
}

/** POP3: USER/PASS and AUTH PLAIN; after login STAT, LIST, NOOP answer +OK. */
export function startFakePop3(opts: FakeOptions = {}): Promise<FakeBackend> {
  const users = opts.users ?? { alice: 'secret' };
  const capa = ['TOP', 'UIDL', 'RESP-CODES', 'USER', ...(opts.sasl === false ? [] : ['SASL PLAIN']), ...(opts.capabilities ?? [])];
  return startLineServer('+OK fake POP3 ready\r\n', opts, (line, conn, state) => {
    const [verb = '', ...args] = line.split(' ');
    const arg = args.join(' ');
    const check = (c: { user: string; password: string } | undefined) => {
      if (c && users[c.user] === c.password) {
        conn.user = c.user;
        return '+OK Logged in.\r\n';
      }
      return '-ERR [AUTH] Authentication failed.\r\n';
    };
    switch (verb.toUpperCase()) {
      case 'CAPA':
        return `+OK\r\n${capa.map((c) => `${c}\r\n`).join('')}.\r\n`;
      case 'XCLIENT':
        return '+OK\r\n';
      case 'USER':
        state.user = arg;
        return '+OK\r\n';
      case 'PASS':
        return check({ user: String(state.user ?? ''), password: arg });
      case 'AUTH':
        return check(plain(args[1] ?? ''));
      case 'QUIT':
        return { reply: '+OK Bye\r\n', end: true };
      case 'STAT':
        return '+OK 0 0\r\n';
      default:
        return conn.user ? '+OK\r\n' : '-ERR not logged in\r\n';
    }
  });
}

/** SMTP: EHLO, XCLIENT (answered 220 as Postfix does), AUTH PLAIN, MAIL/RCPT/DATA; messages are kept. */
export function startFakeSmtp(opts: FakeOptions = {}): Promise<FakeBackend & { messages: Buffer[] }> {
  const users = opts.users ?? { alice: 'secret' };
  const messages: Buffer[] = [];
  const keywords = ['PIPELINING', 'SIZE 10240000', 'AUTH PLAIN LOGIN', 'XCLIENT NAME ADDR PROTO HELO LOGIN PORT', '8BITMIME', ...(opts.capabilities ?? [])];
  const server = startLineServer('220 fake.smtp ESMTP\r\n', opts, (line, conn, state) => {
    if (state.data) {
      if (line === '.') {
        state.data = false;
        messages.push(Buffer.from(String(state.message ?? ''), 'latin1'));
        state.message = '';
        return '250 2.0.0 Ok: queued\r\n';
      }
      state.message = `${String(state.message ?? '')}${line.startsWith('..') ? line.slice(1) : line}\r\n`;
      return undefined;
    }
    const verb = (line.split(' ')[0] ?? '').toUpperCase();
    switch (verb) {
      case 'EHLO':
        return ['fake.smtp', ...keywords].map((k, i, all) => `250${i === all.length - 1 ? ' ' : '-'}${k}\r\n`).join('');
      case 'HELO':
        return '250 fake.smtp\r\n';
      case 'XCLIENT':
        return '220 fake.smtp ESMTP\r\n';
      case 'AUTH': {
        const c = plain(line.split(' ')[2] ?? '');
        if (c && users[c.user] === c.password) {
          conn.user = c.user;
          return '235 2.7.0 Authentication successful\r\n';
        }
        return '535 5.7.8 Error: authentication failed\r\n';
      }
      case 'MAIL':
      case 'RCPT':
      case 'RSET':
      case 'NOOP':
        return '250 2.0.0 Ok\r\n';
      case 'DATA':
        state.data = true;
        state.message = '';
        return '354 End data with <CR><LF>.<CR><LF>\r\n';
      case 'QUIT':
        return { reply: '221 2.0.0 Bye\r\n', end: true };
      default:
        return '502 5.5.2 Error: command not recognized\r\n';
    }
  });
  return server.then((s) => Object.assign(s, { messages }));
}

/** A backend that does only what `onConnect` does with each socket (garbage, silence, resets); received bytes are recorded. */
export async function startRawBackend(onConnect: (socket: Socket) => void): Promise<FakeBackend> {
  const connections: FakeConnection[] = [];
  const live = new Set<FakeConnection>();
  const server = createServer((socket) => {
    const conn: FakeConnection = { socket, received: [], user: undefined, text: () => Buffer.concat(conn.received).toString('latin1') };
    connections.push(conn);
    live.add(conn);
    socket.on('data', (d: Buffer) => conn.received.push(d));
    socket.on('error', () => undefined);
    socket.on('close', () => live.delete(conn));
    onConnect(socket);
  });
  return listenFake(server, connections, live);
}
