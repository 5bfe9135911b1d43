// End-to-end test harness: starts REAL backend servers (Dovecot IMAP/POP3,
// Postfix smtpd, Postfix's smtp-sink, nginx) as child processes of the test,
// each in a fresh temp folder on 127.0.0.1 high ports, with config files
// written here. Nothing under /etc is touched and no system service is used.
//
// The harness must run as root (the servers drop privileges themselves:
// mail is owned by `nobody`, nginx workers run as `nobody`, Postfix daemons as
// `postfix`, the smtp-sink as `nobody`).
//
// Overview (details at each start function):
//  - startDovecot(): plaintext IMAP + POP3 (no TLS), AUTH=PLAIN/LOGIN, users from
//    a passwd-file (TEST_USERS: alice, bob, carol, dave), Maildir++ mailboxes
//    pre-filled from MAILBOXES (fixtures.ts) with pinned UIDs/UIDVALIDITY,
//    login_trusted_networks = 127.0.0.0/8 (so ID x-originating-ip / POP3 XCLIENT
//    from the gateway are honoured), auth penalty and failure delay disabled
//    ({ authFailureDelay: '2 secs' } delays wrong passwords as a real one does;
//    auth_verbose logs each check as `passwd-file(user,rip,...): Password mismatch`),
//    log lines `Login: user=<..>, method=.., rip=.., rport=.., lip=.., lport=..,
//    real_rip=..` and `ID sent: ...`. { preauth: true } makes imapPort greet with
//    PREAUTH (real Dovecot imap for alice behind preauth-listener.ts).
//    Note: the harness' readiness probes leave one "Aborted login ... rip=127.0.0.1"
//    line per port in the log.
//  - startSmtpSink(): Postfix's smtp-sink, accepts everything (AUTH is not
//    checked: it answers 250 to AUTH), announces XCLIENT unless { xclient: false },
//    logs the whole conversation (-v) incl. XCLIENT lines; captures each message.
//  - startPostfix(): real Postfix smtpd (own master, queue and config) with SASL
//    via an auth-only Dovecot instance (same users), XCLIENT/XFORWARD allowed from
//    127.0.0.0/8; mail for @e2e.test is accepted from anyone, other domains only
//    after AUTH (554 Relay access denied otherwise); every accepted message is
//    delivered by a pipe(8) transport into <dir>/delivered/<ns-time>.<queueid>.eml
//    (+ .env with sender/recipient). messages() strips Postfix's Received: header,
//    so it returns the DATA content byte-exact; rawMessages() keeps it.
//    { acceptBareNewline: true } sets smtpd_forbid_bare_newline = no where the
//    installed Postfix knows it (3.7.10+, the default before 3.9): a bare <LF>
//    ends a line, so <LF>.<LF> ends DATA, the way SMTP smuggling needs it.
//    { noAuth: true } sets smtpd_sasl_auth_enable = no: a relay that offers no AUTH.
//  - startNginx(): plain HTTP serving index.html and a 1 MiB big.bin, an access log
//    with $remote_addr / X-Forwarded-For / -Proto / Host, and GET /echo-headers.

import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

import {
  FIXTURE_UIDVALIDITY,
  MAIL_DOMAIN,
  MAILBOXES,
  TEST_USERS,
  bigBinContent,
  bigBinSha256,
  type FixtureMessage,
  type MailboxFixtures,
  type TestUser,
} from './fixtures.ts';
import {
  HOST,
  assertRoot,
  chownR,
  commandOutput,
  describeFiles,
  freePort,
  makeTempDir,
  readIfExists,
  removeTempDir,
  retryOnAddrInUse,
  sleep,
  spawnServer,
  systemUser,
  tailLines,
  waitUntilReady,
  type ManagedProcess,
} from '../../helpers/proc.ts';

export { freePort } from '../../helpers/proc.ts';
export {
  FIXTURE_UIDVALIDITY,
  MAIL_DOMAIN,
  MAILBOXES,
  TEST_USERS,
  bigBinContent,
  bigBinSha256,
  mailboxBytes,
  userByName,
} from './fixtures.ts';
export type { FixtureMessage, MailboxFixtures, TestUser } from './fixtures.ts';

const DOVECOT_BIN = '/usr/sbin/dovecot';
const DOVECOT_IMAP_BIN = '/usr/lib/dovecot/imap';
const POSTFIX_MASTER_BIN = '/usr/lib/postfix/sbin/master';
const SMTP_SINK_BIN = '/usr/sbin/smtp-sink';
const NGINX_BIN = '/usr/sbin/nginx';
/** Unprivileged system user owning mailboxes / running the sink and the Postfix pipe delivery. */
const MAIL_SYSTEM_USER = 'nobody';

const READY_TIMEOUT_MS = 10_000;
const HERE = path.dirname(fileURLToPath(import.meta.url));

function users(): TestUser[] {
  return TEST_USERS.map((u) => ({ name: u.name, password: u.password }));
}

/** Wraps a start routine: on failure stops what was started and removes the folder. */
async function withCleanup<T>(dir: string, procs: ManagedProcess[], body: () => Promise<T>): Promise<T> {
  try {
    return await body();
  } catch (e) {
    await Promise.allSettled(procs.map((p) => p.stop(1000)));
    await removeTempDir(dir).catch(() => {});
    throw e;
  }
}

/** stop(): idempotent; snapshots logs first so logs() still works afterwards. */
function makeStopper(
  dir: string,
  procs: () => ManagedProcess[],
  snapshot: () => Promise<string>,
  setCache: (s: string) => void,
): () => Promise<void> {
  let stopping: Promise<void> | undefined;
  return () => {
    stopping ??= (async () => {
      try {
        setCache(await snapshot());
      } catch {
        /* ignore */
      }
      // stop in reverse start order (e.g. Postfix before its Dovecot auth service)
      for (const p of [...procs()].reverse()) await p.stop();
      await removeTempDir(dir);
    })();
    return stopping;
  };
}

// ===========================================================================
// Dovecot

export interface Dovecot {
  /** IMAP port; with preauth: true this port greets with "* PREAUTH" (user alice). */
  imapPort: number;
  /** With haproxy: true, an IMAP port that expects a PROXY protocol header (v1 or v2). */
  haproxyImapPort?: number;
  /** Stops the server process (and its sessions) but keeps its folder and ports, for restart(). */
  halt(): Promise<void>;
  /** Starts the server again after halt(), on the same ports, and waits for its IMAP greeting. */
  restart(): Promise<void>;
  pop3Port: number;
  host: '127.0.0.1';
  /** alice, bob, carol, dave (see TEST_USERS). */
  users: TestUser[];
  /** The temp folder. */
  dir: string;
  /** Kills the server, removes the folder; safe to call twice. */
  stop(): Promise<void>;
  /** Dovecot's log (login lines contain rip=/real_rip=, ID lines the x-originating-ip etc.). */
  logs(): Promise<string>;
  /** The regular imap-login listener (normal "* OK" greeting); equals imapPort unless preauth. */
  loginImapPort: number;
  /** Set with preauth: true: the user the PREAUTH port is logged in as. */
  preauthUser?: string;
  /** What the mailboxes were pre-filled with: user -> mailbox -> messages (UID order). */
  mailboxes: MailboxFixtures;
  /** The generated dovecot.conf. */
  configFile: string;
  /** Milliseconds from the start call until every port answered its greeting. */
  startupMs: number;
}

function checkPasswdField(s: string): void {
  if (/[:\n\r]/.test(s)) throw new Error(`passwd-file field may not contain ':' or newlines: ${JSON.stringify(s)}`);
}

/** passwd-file with {PLAIN} passwords, usable as passdb and userdb. */
async function writeDovecotPasswd(file: string, homeRoot: string, uid: number, gid: number): Promise<void> {
  const lines = TEST_USERS.map((u) => {
    checkPasswdField(u.name);
    checkPasswdField(u.password);
    return `${u.name}:{PLAIN}${u.password}:${uid}:${gid}::${homeRoot}/${u.name}::`;
  });
  await fsp.writeFile(file, lines.join('\n') + '\n', { mode: 0o644 });
}

/** Maildir++ mailboxes with pinned UIDs/UIDVALIDITY (dovecot-uidlist) and INTERNALDATEs (mtime). */
async function writeMailboxes(homeRoot: string): Promise<void> {
  for (const u of TEST_USERS) {
    const maildir = path.join(homeRoot, u.name, 'Maildir');
    const boxes: Record<string, FixtureMessage[]> = { INBOX: [], ...MAILBOXES[u.name] };
    const subscriptions: string[] = [];
    for (const [box, msgs] of Object.entries(boxes)) {
      const boxDir = box === 'INBOX' ? maildir : path.join(maildir, '.' + box);
      for (const sub of ['cur', 'new', 'tmp']) await fsp.mkdir(path.join(boxDir, sub), { recursive: true });
      if (box !== 'INBOX') {
        await fsp.writeFile(path.join(boxDir, 'maildirfolder'), '');
        subscriptions.push(box);
      }
      const uidlist = [`3 V${FIXTURE_UIDVALIDITY} N${msgs.length + 1}`];
      for (const m of msgs) {
        const base = `${m.internalDate}.M${m.uid}P1000.mailgate-e2e`;
        const file = path.join(boxDir, 'cur', `${base}:2,${m.flags}`);
        await fsp.writeFile(file, m.bytes);
        await fsp.utimes(file, m.internalDate, m.internalDate);
        uidlist.push(`${m.uid} :${base}`);
      }
      await fsp.writeFile(path.join(boxDir, 'dovecot-uidlist'), uidlist.join('\n') + '\n');
    }
    await fsp.writeFile(path.join(maildir, 'subscriptions'), subscriptions.map((s) => s + '\n').join(''));
  }
}

interface DovecotConfOptions {
  dir: string;
  runDir: string;
  logFile: string;
  passwdFile: string;
  instance: string;
  /** omitted: auth-only instance (no protocols), with a world-accessible auth-client socket */
  imapPort?: number;
  pop3Port?: number;
  /** Dovecot's auth_failure_delay (its default is 2 secs); 0 unless a test asks. */
  authFailureDelay?: string;
  /** An extra IMAP listener that expects a PROXY protocol header (haproxy = yes). */
  haproxyImapPort?: number;
}

/** startDovecot's options. */
export interface DovecotOptions {
  /** A second IMAP port that greets with "* PREAUTH" (user alice). */
  preauth?: boolean;
  /** Also listen for IMAP behind a PROXY protocol header (haproxy = yes, haproxy_trusted_networks 127.0.0.0/8): `haproxyImapPort`. */
  haproxy?: boolean;
  /** Dovecot's auth_failure_delay, e.g. "2 secs" (as a real one answers wrong passwords); default 0. */
  authFailureDelay?: string;
}

function dovecotConf(o: DovecotConfOptions): string {
  const mail = o.imapPort !== undefined && o.pop3Port !== undefined;
  return `# generated by tests/e2e/harness/servers.ts -- test instance, do not use in production
base_dir = ${o.runDir}
state_dir = ${o.dir}/state
instance_name = ${o.instance}
log_path = ${o.logFile}
log_timestamp = "%Y-%m-%d %H:%M:%S "
protocols = ${mail ? 'imap pop3' : ''}
listen = ${HOST}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
auth_failure_delay = ${o.authFailureDelay ?? '0'}
first_valid_uid = 1
first_valid_gid = 1
verbose_proctitle = yes

passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%n ${o.passwdFile}
}
userdb {
  driver = passwd-file
  args = username_format=%n ${o.passwdFile}
}

# No anvil auth penalty (it would delay repeated failed logins from 127.0.0.1 by up to 15 s).
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
${
  mail
    ? `
login_greeting = Dovecot ready.
login_trusted_networks = 127.0.0.0/8${o.haproxyImapPort ? `
haproxy_trusted_networks = 127.0.0.0/8` : ''}
login_log_format_elements = user=<%u> method=%m rip=%r rport=%b lip=%l lport=%a real_rip=%{real_rip} mpid=%e %c session=<%{session}>
imap_id_log = *
mail_location = maildir:~/Maildir
mail_max_userip_connections = 200
pop3_uidl_format = %08Xu%08Xv
namespace inbox {
  inbox = yes
  separator = /
}

service imap-login {
  inet_listener imap {
    address = ${HOST}
    port = ${o.imapPort}
  }
  inet_listener imaps {
    port = 0
  }${
    o.haproxyImapPort
      ? `
  inet_listener imap_haproxy {
    address = ${HOST}
    port = ${o.haproxyImapPort}
    haproxy = yes
  }`
      : ''
  }
}
service pop3-login {
  inet_listener pop3 {
    address = ${HOST}
    port = ${o.pop3Port}
  }
  inet_listener pop3s {
    port = 0
  }
}
`
    : `
service auth {
  unix_listener auth-client {
    mode = 0666
  }
}
`
}`;
}

export async function startDovecot(opts: DovecotOptions = {}): Promise<Dovecot> {
  assertRoot('startDovecot');
  return retryOnAddrInUse(() => startDovecotOnce(opts));
}

async function startDovecotOnce(opts: DovecotOptions): Promise<Dovecot> {
  const t0 = performance.now();
  const dir = await makeTempDir('dovecot');
  const procs: ManagedProcess[] = [];
  return withCleanup(dir, procs, async () => {
    const mailUser = systemUser(MAIL_SYSTEM_USER);
    const homeRoot = path.join(dir, 'home');
    const passwdFile = path.join(dir, 'passwd');
    const logFile = path.join(dir, 'dovecot.log');
    const stderrFile = path.join(dir, 'dovecot.stderr');
    const preauthLog = path.join(dir, 'preauth.log');
    const configFile = path.join(dir, 'dovecot.conf');
    await fsp.mkdir(homeRoot);
    await writeDovecotPasswd(passwdFile, homeRoot, mailUser.uid, mailUser.gid);
    await writeMailboxes(homeRoot);
    await chownR(homeRoot, mailUser.uid, mailUser.gid);

    const [imapPort, pop3Port, preauthPort, haproxyImapPort] = await Promise.all([
      freePort(),
      freePort(),
      opts.preauth ? freePort() : Promise.resolve(0),
      opts.haproxy ? freePort() : Promise.resolve(0),
    ]);
    await fsp.writeFile(
      configFile,
      dovecotConf({
        dir,
        runDir: path.join(dir, 'run'),
        logFile,
        passwdFile,
        instance: `mailgate-e2e-${path.basename(dir)}`,
        imapPort,
        pop3Port,
        ...(opts.authFailureDelay === undefined ? {} : { authFailureDelay: opts.authFailureDelay }),
        ...(opts.haproxy ? { haproxyImapPort } : {}),
      }),
    );

    const logFiles = [stderrFile, logFile, ...(opts.preauth ? [preauthLog] : [])];
    const describe = () => describeFiles(logFiles);
    let dovecot = spawnServer('dovecot', DOVECOT_BIN, ['-F', '-c', configFile], { cwd: dir, outputFile: stderrFile });
    procs.push(dovecot);
    const imapReady = () =>
      waitUntilReady('startDovecot (imap)', procs, { port: imapPort, ports: [imapPort, pop3Port], expect: /^\* OK .*\r\n/m, bye: 'h1 LOGOUT\r\n' }, describe, READY_TIMEOUT_MS);

    const ready = [
      imapReady(),
      waitUntilReady('startDovecot (pop3)', procs, { port: pop3Port, ports: [imapPort, pop3Port], expect: /^\+OK .*\r\n/m, bye: 'QUIT\r\n' }, describe, READY_TIMEOUT_MS),
    ];
    let preauthUser: string | undefined;
    if (opts.preauth) {
      preauthUser = 'alice';
      const listener = spawnServer(
        'preauth-listener',
        process.execPath,
        [path.join(HERE, 'preauth-listener.ts'), String(preauthPort), DOVECOT_IMAP_BIN, configFile, preauthUser, preauthLog],
        { cwd: dir, outputFile: preauthLog },
      );
      procs.push(listener);
      // the standalone imap needs the master's auth-userdb socket, so probe after the login ports
      ready.push(
        Promise.all([...ready]).then(() =>
          waitUntilReady('startDovecot (preauth imap)', procs, { port: preauthPort, ports: [imapPort, pop3Port, preauthPort], expect: /^\* PREAUTH .*\r\n/m, bye: 'h1 LOGOUT\r\n' }, describe, READY_TIMEOUT_MS),
        ),
      );
    }
    await Promise.all(ready);

    let cache: string | undefined;
    const snapshot = async () => {
      const parts = [await readIfExists(logFile)];
      if (opts.preauth) parts.push(await readIfExists(preauthLog));
      const err = await readIfExists(stderrFile);
      if (err.trim()) parts.push(err);
      return parts.join('');
    };
    const result: Dovecot = {
      imapPort: opts.preauth ? preauthPort : imapPort,
      pop3Port,
      ...(opts.haproxy ? { haproxyImapPort } : {}),
      async halt() {
        await dovecot.stop();
        procs.splice(procs.indexOf(dovecot), 1);
      },
      async restart() {
        dovecot = spawnServer('dovecot', DOVECOT_BIN, ['-F', '-c', configFile], { cwd: dir, outputFile: stderrFile });
        procs.push(dovecot);
        await imapReady();
      },
      host: HOST,
      users: users(),
      dir,
      loginImapPort: imapPort,
      mailboxes: MAILBOXES,
      configFile,
      startupMs: Math.round(performance.now() - t0),
      logs: async () => (cache !== undefined ? cache : snapshot()),
      stop: makeStopper(dir, () => procs, snapshot, (s) => (cache = s)),
    };
    if (preauthUser !== undefined) result.preauthUser = preauthUser;
    return result;
  });
}

// ===========================================================================
// SMTP: smtp-sink and Postfix

export interface SmtpServer {
  port: number;
  host: '127.0.0.1';
  dir: string;
  /** With AUTH that really checks passwords (Postfix); empty for the sink. */
  users: TestUser[];
  /** Full received messages (DATA contents, CRLF, dot-unstuffed), oldest first. */
  messages(): Promise<Buffer[]>;
  /** Resolves once at least n messages were received (default timeout 10 s). */
  waitForMessages(n: number, timeoutMs?: number): Promise<Buffer[]>;
  /** Server log (smtp-sink -v conversation incl. XCLIENT lines / Postfix maillog + Dovecot auth log). */
  logs(): Promise<string>;
  stop(): Promise<void>;
  /** The capture files as stored: smtp-sink dump format / Postfix delivery incl. Postfix's Received: header. */
  rawMessages(): Promise<Buffer[]>;
  /** Envelope of each message, same order as messages(). */
  envelopes(): Promise<SmtpEnvelope[]>;
  /** Milliseconds until the server answered its 220 greeting. */
  startupMs: number;
}

export interface SmtpEnvelope {
  /** MAIL FROM argument as seen by the server (sink: the raw argument incl. <> and parameters). */
  from: string;
  /** RCPT TO arguments (Postfix: one recipient per delivery). */
  to: string[];
}

function lfToCrlf(buf: Buffer): Buffer {
  const s = buf.toString('latin1');
  return Buffer.from(s.replace(/\r?\n/g, '\r\n'), 'latin1');
}

function makeWaitForMessages(what: string, messages: () => Promise<Buffer[]>, logs: () => Promise<string>) {
  return async (n: number, timeoutMs = 10_000): Promise<Buffer[]> => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const msgs = await messages();
      if (msgs.length >= n) return msgs;
      if (Date.now() >= deadline) {
        throw new Error(`${what}: expected ${n} message(s) within ${timeoutMs} ms, got ${msgs.length}\n--- log tail ---\n${tailLines(await logs(), 30)}`);
      }
      await sleep(25);
    }
  };
}

// ---------------------------------------------------------------------------
// smtp-sink

interface SinkCapture {
  raw: Buffer;
  message: Buffer;
  envelope: SmtpEnvelope;
}

/** Parses one smtp-sink dump file (see smtp-sink(1), DUMP FILE FORMAT). */
function parseSinkDump(raw: Buffer): SinkCapture {
  const s = raw.toString('latin1');
  const envelope: SmtpEnvelope = { from: '', to: [] };
  let pos = 0;
  for (;;) {
    const nl = s.indexOf('\n', pos);
    if (nl < 0) throw new Error('truncated smtp-sink dump');
    const line = s.slice(pos, nl);
    pos = nl + 1;
    if (line.startsWith('X-Mail-Args: ')) envelope.from = line.slice(13);
    else if (line.startsWith('X-Rcpt-Args: ')) envelope.to.push(line.slice(13));
    else if (line.startsWith('Received: ')) {
      // three-line header: "Received: from ...", "\tby host (smtp-sink) with ...;", "\tdate"
      for (let i = 0; i < 2; i++) {
        const n2 = s.indexOf('\n', pos);
        if (n2 < 0) throw new Error('truncated smtp-sink Received header');
        pos = n2 + 1;
      }
      break;
    }
  }
  // the file ends with the LF of the terminating ".\r\n" (dot and CRs are not stored)
  let body = s.slice(pos);
  if (body.endsWith('\n')) body = body.slice(0, -1);
  return { raw, message: lfToCrlf(Buffer.from(body, 'latin1')), envelope };
}

/** Paths currently held open by a process (to skip dump files of transactions in progress). */
async function openFiles(pid: number): Promise<Set<string>> {
  const out = new Set<string>();
  const fdDir = `/proc/${pid}/fd`;
  let fds: string[] = [];
  try {
    fds = await fsp.readdir(fdDir);
  } catch {
    return out;
  }
  for (const fd of fds) {
    try {
      out.add(await fsp.readlink(path.join(fdDir, fd)));
    } catch {
      /* closed meanwhile */
    }
  }
  return out;
}

export async function startSmtpSink(opts: { xclient?: boolean } = {}): Promise<SmtpServer> {
  assertRoot('startSmtpSink');
  return retryOnAddrInUse(() => startSmtpSinkOnce(opts));
}

async function startSmtpSinkOnce(opts: { xclient?: boolean }): Promise<SmtpServer> {
  const t0 = performance.now();
  const dir = await makeTempDir('smtp-sink');
  const procs: ManagedProcess[] = [];
  return withCleanup(dir, procs, async () => {
    const sinkUser = systemUser(MAIL_SYSTEM_USER);
    const dumpDir = path.join(dir, 'messages');
    const logFile = path.join(dir, 'smtp-sink.log');
    await fsp.mkdir(dumpDir, { mode: 0o755 });
    await fsp.chown(dumpDir, sinkUser.uid, sinkUser.gid);
    const port = await freePort();
    const args = [
      '-v', // log the SMTP conversation (incl. XCLIENT) to stderr
      '-u', MAIL_SYSTEM_USER,
      '-h', 'sink.e2e.test',
      '-d', `${dumpDir}/%Y%m%d%H%M%S.`,
      ...(opts.xclient === false ? ['-C'] : []),
      `inet:${HOST}:${port}`,
      '128',
    ];
    const sink = spawnServer('smtp-sink', SMTP_SINK_BIN, args, { cwd: dir, outputFile: logFile });
    procs.push(sink);
    const describe = () => describeFiles([logFile]);
    await waitUntilReady('startSmtpSink', procs, { port, expect: /^220 .*\r\n/m, bye: 'QUIT\r\n' }, describe, READY_TIMEOUT_MS);

    const captures = async (): Promise<SinkCapture[]> => {
      let names: string[];
      try {
        names = await fsp.readdir(dumpDir);
      } catch {
        return [];
      }
      // readdir first, then the open-fd scan: a file open now is still being written
      const open = await openFiles(sink.pid);
      const entries: { file: string; mtime: bigint }[] = [];
      for (const name of names) {
        const file = path.join(dumpDir, name);
        if (open.has(file)) continue;
        try {
          entries.push({ file, mtime: (await fsp.stat(file, { bigint: true })).mtimeNs });
        } catch {
          /* removed (RSET) */
        }
      }
      entries.sort((a, b) => (a.mtime < b.mtime ? -1 : a.mtime > b.mtime ? 1 : a.file < b.file ? -1 : 1));
      const out: SinkCapture[] = [];
      for (const e of entries) {
        try {
          out.push(parseSinkDump(await fsp.readFile(e.file)));
        } catch {
          /* incomplete */
        }
      }
      return out;
    };
    let cache: string | undefined;
    const snapshot = () => readIfExists(logFile);
    const logs = async () => (cache !== undefined ? cache : snapshot());
    const messages = async () => (await captures()).map((c) => c.message);
    return {
      port,
      host: HOST,
      dir,
      users: [],
      startupMs: Math.round(performance.now() - t0),
      messages,
      rawMessages: async () => (await captures()).map((c) => c.raw),
      envelopes: async () => (await captures()).map((c) => c.envelope),
      waitForMessages: makeWaitForMessages('smtp-sink', messages, logs),
      logs,
      stop: makeStopper(dir, () => procs, snapshot, (s) => (cache = s)),
    };
  });
}

// ---------------------------------------------------------------------------
// Postfix

export interface Postfix extends SmtpServer {
  /** "postfix.e2e.test" -- appears in the greeting and in the Received: header. */
  hostname: string;
  /** Domain accepted without AUTH (like an MX for it); every other domain needs AUTH. */
  localDomain: string;
  /** The Dovecot auth-only instance Postfix uses for SASL (socket path). */
  saslSocket: string;
  /** With upstreamProxy: true, an smtpd port that expects a PROXY protocol header. */
  proxyPort?: number;
}

const POSTFIX_HOSTNAME = 'postfix.e2e.test';

/** Strips the Received: header Postfix's smtpd prepended (the first header, "by postfix.e2e.test (Postfix)"). */
function stripPostfixReceived(raw: Buffer): Buffer {
  const s = raw.toString('latin1');
  if (!s.startsWith('Received: ')) return raw;
  let end = s.indexOf('\r\n');
  while (end >= 0 && (s[end + 2] === ' ' || s[end + 2] === '\t')) end = s.indexOf('\r\n', end + 2);
  if (end < 0) return raw;
  const header = s.slice(0, end);
  if (!header.includes(`by ${POSTFIX_HOSTNAME} (Postfix)`)) return raw;
  return raw.subarray(Buffer.byteLength(s.slice(0, end + 2), 'latin1'));
}

function postfixMainCf(o: { dir: string; queueDir: string; dataDir: string; maillog: string; saslSocket: string; acceptBareNewline: boolean; noAuth: boolean }): string {
  // Postfix before 3.7.10 has no such parameter and always takes a bare <LF> for a line end.
  const bareNewline = o.acceptBareNewline && postfixKnows('smtpd_forbid_bare_newline') ? '\n# accept bare <LF> as a line end (SMTP smuggling tests)\nsmtpd_forbid_bare_newline = no\n' : '';
  return `# generated by tests/e2e/harness/servers.ts -- test instance, do not use in production
compatibility_level = 3.6
queue_directory = ${o.queueDir}
data_directory = ${o.dataDir}
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-e2e
maillog_file = ${o.maillog}
maillog_file_prefixes = ${o.dir}

myhostname = ${POSTFIX_HOSTNAME}
mydomain = ${MAIL_DOMAIN}
myorigin = $myhostname
mydestination =
inet_interfaces = ${HOST}
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
smtpd_banner = $myhostname ESMTP Postfix (mailgate e2e)
biff = no
alias_maps =
alias_database =
smtpd_peername_lookup = no

# keep message content byte-exact: no header rewriting / added headers for remote clients
local_header_rewrite_clients =
remote_header_rewrite_domain =
append_dot_mydomain = no

# SASL via an auth-only Dovecot instance; plaintext AUTH allowed (no TLS in the backend)
smtpd_sasl_auth_enable = ${o.noAuth ? 'no' : 'yes'}
smtpd_sasl_type = dovecot
smtpd_sasl_path = ${o.saslSocket}
smtpd_sasl_security_options = noanonymous
smtpd_sasl_authenticated_header = yes
smtpd_tls_security_level = none

# the gateway on 127.0.0.0/8 may tell us the real client
smtpd_authorized_xclient_hosts = 127.0.0.0/8
smtpd_authorized_xforward_hosts = 127.0.0.0/8

# ${MAIL_DOMAIN} is accepted from anyone; everything else only after AUTH
relay_domains = ${MAIL_DOMAIN}
relay_recipient_maps =
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
smtpd_recipient_restrictions =

# fast failures in tests
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 100
smtpd_hard_error_limit = 200
smtpd_client_connection_count_limit = 0

# every accepted message goes to the e2edeliver pipe (one file per recipient, in order)
default_transport = e2edeliver
relay_transport = e2edeliver
local_transport = e2edeliver
virtual_transport = e2edeliver
e2edeliver_destination_recipient_limit = 1
e2edeliver_destination_concurrency_limit = 1
${bareNewline}`;
}

/** Whether the installed Postfix has this main.cf parameter (postconf -d prints nothing for an unknown one). */
function postfixKnows(parameter: string): boolean {
  try {
    return execFileSync('/usr/sbin/postconf', ['-d', parameter], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).startsWith(`${parameter} =`);
  } catch {
    return false;
  }
}

function postfixMasterCf(o: { port: number; proxyPort?: number; deliverScript: string; deliveredDir: string }): string {
  const proxied = o.proxyPort ? `${HOST}:${o.proxyPort} inet n - n - - smtpd\n  -o smtpd_upstream_proxy_protocol=haproxy\n` : '';
  return `# generated by tests/e2e/harness/servers.ts
${HOST}:${o.port} inet n - n - - smtpd
${proxied}cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
e2edeliver unix -       n       n       -       1       pipe
  flags=X eol=\\r\\n null_sender= user=${MAIL_SYSTEM_USER} argv=${o.deliverScript} ${o.deliveredDir} \${queue_id} \${sender} \${recipient}
`;
}

const DELIVER_SH = `#!/bin/sh
# Postfix pipe(8) delivery for the e2e harness: $1 dir, $2 queue id, $3 sender, $4 recipient.
# Writes <ns-timestamp>.<queueid>.env and .eml (atomically, via rename).
umask 022
f="$1/$(date +%s%N).$2"
printf '%s\\n%s\\n' "$3" "$4" > "$f.env" || exit 75
cat > "$f.tmp" && mv "$f.tmp" "$f.eml" || exit 75
exit 0
`;

async function makePostfixQueue(queueDir: string, postfix: { uid: number; gid: number }, postdropGid: number): Promise<void> {
  await fsp.mkdir(queueDir, { mode: 0o755 });
  for (const q of ['active', 'bounce', 'corrupt', 'defer', 'deferred', 'flush', 'hold', 'incoming', 'private', 'saved', 'trace']) {
    const d = path.join(queueDir, q);
    await fsp.mkdir(d, { mode: 0o700 });
    await fsp.chown(d, postfix.uid, 0);
  }
  const pub = path.join(queueDir, 'public');
  await fsp.mkdir(pub);
  await fsp.chown(pub, postfix.uid, postdropGid);
  await fsp.chmod(pub, 0o710);
  const maildrop = path.join(queueDir, 'maildrop');
  await fsp.mkdir(maildrop);
  await fsp.chown(maildrop, postfix.uid, postdropGid);
  await fsp.chmod(maildrop, 0o730);
  await fsp.mkdir(path.join(queueDir, 'pid'), { mode: 0o755 });
}

function groupId(name: string): number {
  for (const line of fs.readFileSync('/etc/group', 'utf8').split('\n')) {
    const f = line.split(':');
    if (f[0] === name && f[2] !== undefined) return Number(f[2]);
  }
  throw new Error(`group ${name} not found in /etc/group`);
}

export interface PostfixOptions {
  /** smtpd_forbid_bare_newline = no (see the header comment). */
  acceptBareNewline?: boolean;
  /** smtpd_sasl_auth_enable = no: a legacy relay that offers no AUTH. */
  noAuth?: boolean;
  /** Also an smtpd on `proxyPort` that expects a PROXY protocol header (smtpd_upstream_proxy_protocol = haproxy). */
  upstreamProxy?: boolean;
}

export async function startPostfix(opts: PostfixOptions = {}): Promise<Postfix> {
  assertRoot('startPostfix');
  return retryOnAddrInUse(() => startPostfixOnce(opts));
}

async function startPostfixOnce(opts: PostfixOptions): Promise<Postfix> {
  const t0 = performance.now();
  const dir = await makeTempDir('postfix');
  const procs: ManagedProcess[] = [];
  return withCleanup(dir, procs, async () => {
    const pf = systemUser('postfix');
    const mailUser = systemUser(MAIL_SYSTEM_USER);
    const etc = path.join(dir, 'etc');
    const queueDir = path.join(dir, 'queue');
    const dataDir = path.join(dir, 'data');
    const deliveredDir = path.join(dir, 'delivered');
    const deliverScript = path.join(dir, 'deliver.sh');
    const maillog = path.join(dir, 'maillog');
    const masterOut = path.join(dir, 'master.stderr');
    const authDir = path.join(dir, 'auth');
    const authRun = path.join(authDir, 'run');
    const authLog = path.join(authDir, 'dovecot-auth.log');
    const authStderr = path.join(authDir, 'dovecot.stderr');
    const authConf = path.join(authDir, 'dovecot.conf');
    const saslSocket = path.join(authRun, 'auth-client');

    // --- Dovecot auth-only instance for SASL
    await fsp.mkdir(authDir, { mode: 0o755 });
    await writeDovecotPasswd(path.join(authDir, 'passwd'), path.join(authDir, 'home'), mailUser.uid, mailUser.gid);
    await fsp.writeFile(
      authConf,
      dovecotConf({ dir: authDir, runDir: authRun, logFile: authLog, passwdFile: path.join(authDir, 'passwd'), instance: `mailgate-e2e-auth-${path.basename(dir)}` }),
    );
    const port = await freePort();
    const proxyPort = opts.upstreamProxy ? await freePort() : undefined;

    // --- Postfix instance
    await fsp.mkdir(etc, { mode: 0o755 });
    await fsp.mkdir(dataDir, { mode: 0o700 });
    await fsp.chown(dataDir, pf.uid, pf.gid);
    await fsp.mkdir(deliveredDir, { mode: 0o755 });
    await fsp.chown(deliveredDir, mailUser.uid, mailUser.gid);
    await fsp.writeFile(deliverScript, DELIVER_SH, { mode: 0o755 });
    await makePostfixQueue(queueDir, pf, groupId('postdrop'));
    await fsp.writeFile(path.join(etc, 'main.cf'), postfixMainCf({ dir, queueDir, dataDir, maillog, saslSocket, acceptBareNewline: opts.acceptBareNewline === true, noAuth: opts.noAuth === true }));
    await fsp.writeFile(path.join(etc, 'master.cf'), postfixMasterCf({ port, ...(proxyPort ? { proxyPort } : {}), deliverScript, deliveredDir }));
    // Postfix's load_file() re-reads (sleeping 300 ms each time) a config file whose
    // mtime is not yet in the past ("being edited"); backdate them to start at once.
    const past = Date.now() / 1000 - 60;
    for (const f of ['main.cf', 'master.cf']) await fsp.utimes(path.join(etc, f), past, past);

    let master: ManagedProcess | undefined;
    const describe = async () => {
      let text = await describeFiles([masterOut, maillog, authStderr, authLog]);
      // master reports early fatal errors (bad config, permissions) only to syslog
      if (master?.exitInfo()) text += `\n==> postfix -c ${etc} check <==\n${await commandOutput('/usr/sbin/postfix', ['-c', etc, 'check'])}`;
      return text;
    };
    const auth = spawnServer('dovecot-auth', DOVECOT_BIN, ['-F', '-c', authConf], { cwd: authDir, outputFile: authStderr });
    procs.push(auth);
    await waitUntilReady('startPostfix (dovecot auth)', procs, { path: saslSocket, expect: /^DONE\b/m }, describe, READY_TIMEOUT_MS);

    const env = { ...process.env, MAIL_CONFIG: etc };
    master = spawnServer('postfix master', POSTFIX_MASTER_BIN, ['-d', '-c', etc], { cwd: dir, env, outputFile: masterOut });
    procs.push(master);
    await waitUntilReady('startPostfix', procs, { port, expect: /^220 .*\r\n/m, bye: 'QUIT\r\n' }, describe, READY_TIMEOUT_MS);

    const deliveredFiles = async (): Promise<string[]> => {
      try {
        return (await fsp.readdir(deliveredDir)).filter((n) => n.endsWith('.eml')).sort();
      } catch {
        return [];
      }
    };
    const rawMessages = async () => Promise.all((await deliveredFiles()).map((n) => fsp.readFile(path.join(deliveredDir, n))));
    const messages = async () => (await rawMessages()).map(stripPostfixReceived);
    const envelopes = async (): Promise<SmtpEnvelope[]> =>
      Promise.all(
        (await deliveredFiles()).map(async (n) => {
          const [from = '', to = ''] = (await readIfExists(path.join(deliveredDir, n.replace(/\.eml$/, '.env')))).split('\n');
          return { from, to: [to] };
        }),
      );
    let cache: string | undefined;
    const snapshot = async () => `${await readIfExists(maillog)}==> dovecot auth log <==\n${await readIfExists(authLog)}`;
    const logs = async () => (cache !== undefined ? cache : snapshot());
    return {
      port,
      ...(proxyPort ? { proxyPort } : {}),
      host: HOST,
      dir,
      users: users(),
      hostname: POSTFIX_HOSTNAME,
      localDomain: MAIL_DOMAIN,
      saslSocket,
      startupMs: Math.round(performance.now() - t0),
      messages,
      rawMessages,
      envelopes,
      waitForMessages: makeWaitForMessages('postfix', messages, logs),
      logs,
      stop: makeStopper(dir, () => procs, snapshot, (s) => (cache = s)),
    };
  });
}

// ===========================================================================
// nginx

export interface Nginx {
  port: number;
  host: '127.0.0.1';
  /** Document root: index.html and big.bin (1 MiB, bigBinContent()). */
  root: string;
  /** Access log, one line per request:
   *  `$remote_addr xff="$http_x_forwarded_for" xfp="$http_x_forwarded_proto" host="$http_host" xrip="$http_x_real_ip" fwd="$http_forwarded" "$request" $status $body_bytes_sent` */
  logs(): Promise<string>;
  stop(): Promise<void>;
  /** The same requests as parsed JSON objects (keys: remote_addr, xff, xfp, host, x_real_ip, forwarded, method, uri, protocol, status, bytes, user_agent). */
  requests(): Promise<Record<string, string>[]>;
  dir: string;
  /** Content of index.html. */
  indexHtml: string;
  /** Hex SHA-256 of big.bin. */
  bigSha256: string;
  startupMs: number;
}

export const NGINX_INDEX_HTML = '<!doctype html>\n<html><head><title>mailgate e2e backend</title></head><body><h1>mailgate e2e backend</h1></body></html>\n';

/** Request headers echoed by GET /echo-headers, as "name: value" lines (empty when absent). */
export const ECHO_HEADERS = [
  'host',
  'x-forwarded-for',
  'x-forwarded-proto',
  'x-forwarded-host',
  'x-forwarded-port',
  'x-real-ip',
  'forwarded',
  'via',
  'connection',
  'upgrade',
  'user-agent',
  'accept',
  'accept-encoding',
  'authorization',
  'cookie',
  'content-type',
  'content-length',
  'transfer-encoding',
  'proxy',
] as const;

function nginxConf(o: { dir: string; root: string; port: number; accessLog: string; jsonLog: string; errorLog: string }): string {
  const tmp = path.join(o.dir, 'tmp');
  const echo = [
    'remote-addr: $remote_addr',
    'method: $request_method',
    'uri: $request_uri',
    'protocol: $server_protocol',
    ...ECHO_HEADERS.map((h) => `${h}: $http_${h.replace(/-/g, '_')}`),
  ].join('\\n');
  const json = [
    ['remote_addr', '$remote_addr'],
    ['xff', '$http_x_forwarded_for'],
    ['xfp', '$http_x_forwarded_proto'],
    ['host', '$http_host'],
    ['x_real_ip', '$http_x_real_ip'],
    ['forwarded', '$http_forwarded'],
    ['method', '$request_method'],
    ['uri', '$request_uri'],
    ['protocol', '$server_protocol'],
    ['status', '$status'],
    ['bytes', '$body_bytes_sent'],
    ['user_agent', '$http_user_agent'],
  ]
    .map(([k, v]) => `"${k}":"${v}"`)
    .join(',');
  return `# generated by tests/e2e/harness/servers.ts -- test instance
daemon off;
master_process on;
worker_processes 1;
pid ${o.dir}/nginx.pid;
error_log ${o.errorLog} info;
events {
  worker_connections 512;
}
http {
  include /etc/nginx/mime.types;
  default_type application/octet-stream;
  client_body_temp_path ${tmp}/client_body;
  proxy_temp_path ${tmp}/proxy;
  fastcgi_temp_path ${tmp}/fastcgi;
  uwsgi_temp_path ${tmp}/uwsgi;
  scgi_temp_path ${tmp}/scgi;
  log_format e2e '$remote_addr xff="$http_x_forwarded_for" xfp="$http_x_forwarded_proto" host="$http_host" xrip="$http_x_real_ip" fwd="$http_forwarded" "$request" $status $body_bytes_sent';
  log_format e2ejson escape=json '{${json}}';
  access_log ${o.accessLog} e2e;
  access_log ${o.jsonLog} e2ejson;
  server_tokens off;
  keepalive_timeout 30s;
  server {
    listen ${HOST}:${o.port};
    server_name localhost;
    root ${o.root};
    index index.html;
    location = /echo-headers {
      default_type text/plain;
      return 200 "${echo}\\n";
    }
    location = /__harness_ready {
      access_log off;
      return 204;
    }
  }
}
`;
}

export async function startNginx(): Promise<Nginx> {
  assertRoot('startNginx');
  return retryOnAddrInUse(() => startNginxOnce());
}

async function startNginxOnce(): Promise<Nginx> {
  const t0 = performance.now();
  const dir = await makeTempDir('nginx');
  const procs: ManagedProcess[] = [];
  return withCleanup(dir, procs, async () => {
    const root = path.join(dir, 'root');
    const logDir = path.join(dir, 'logs');
    const accessLog = path.join(logDir, 'access.log');
    const jsonLog = path.join(logDir, 'access.json');
    const errorLog = path.join(logDir, 'error.log');
    const confFile = path.join(dir, 'nginx.conf');
    const stderrFile = path.join(dir, 'nginx.stderr');
    await fsp.mkdir(root, { mode: 0o755 });
    await fsp.mkdir(logDir, { mode: 0o755 });
    await fsp.mkdir(path.join(dir, 'tmp'), { mode: 0o755 });
    await fsp.writeFile(path.join(root, 'index.html'), NGINX_INDEX_HTML, { mode: 0o644 });
    await fsp.writeFile(path.join(root, 'big.bin'), bigBinContent(), { mode: 0o644 });
    const port = await freePort();
    await fsp.writeFile(confFile, nginxConf({ dir, root, port, accessLog, jsonLog, errorLog }));
    const nginx = spawnServer('nginx', NGINX_BIN, ['-e', errorLog, '-p', dir, '-c', confFile], { cwd: dir, outputFile: stderrFile });
    procs.push(nginx);
    const describe = () => describeFiles([stderrFile, errorLog]);
    await waitUntilReady(
      'startNginx',
      procs,
      { port, request: `GET /__harness_ready HTTP/1.1\r\nHost: ${HOST}:${port}\r\nConnection: close\r\n\r\n`, expect: /^HTTP\/1\.1 204 / },
      describe,
      READY_TIMEOUT_MS,
    );
    let cache: { access: string; json: string } | undefined;
    const snapshot = async () => ({ access: await readIfExists(accessLog), json: await readIfExists(jsonLog) });
    const parse = (json: string) =>
      json
        .split('\n')
        .filter((l) => l.trim())
        .map((l) => JSON.parse(l) as Record<string, string>);
    const stopper = makeStopper(
      dir,
      () => procs,
      async () => JSON.stringify(await snapshot()),
      (s) => (cache = JSON.parse(s) as { access: string; json: string }),
    );
    return {
      port,
      host: HOST,
      root,
      dir,
      indexHtml: NGINX_INDEX_HTML,
      bigSha256: bigBinSha256(),
      startupMs: Math.round(performance.now() - t0),
      logs: async () => (cache ?? (await snapshot())).access,
      requests: async () => parse((cache ?? (await snapshot())).json),
      stop: stopper,
    };
  });
}
