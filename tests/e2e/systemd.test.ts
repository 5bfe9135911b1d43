/**
 * The appliance packaging, for real:
 *  - packaging/install.sh into a temporary --root with a non-default --prefix:
 *    layout, the installed `mailgate check` on the installed example, the
 *    installed unit (verify + exposure), upgrade keeping config and
 *    certificates, an upgrade refused by the config in force, --no-systemd,
 *    uninstall with and without --purge;
 *  - readiness: the daemon started with NOTIFY_SOCKET pointing at a unix
 *    datagram socket of the test's own (a python3 receiver). On READY=1 the
 *    receiver at once connects to every listener port: READY=1 must mean
 *    "accepting". SIGHUP gives RELOADING=1 then READY=1, SIGTERM STOPPING=1.
 *
 * Needs: npm and the npm registry or cache (npm ci in the install), python3,
 * systemd-notify and systemd-analyze (Debian package "systemd").
 */
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { parse } from 'yaml';
import { freePort, makeTempDir, removeTempDir, sleep, spawnServer, type ManagedProcess } from '../helpers/proc.ts';
import { MAX_EXPOSURE, securityReport, systemdAnalyzeMissing, verifyUnit, withPrefix } from '../helpers/systemd.ts';
import { waitFor } from '../helpers/wait.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const INSTALL = path.join(ROOT, 'packaging/install.sh');
const UNINSTALL = path.join(ROOT, 'packaging/uninstall.sh');
const CLI = path.join(ROOT, 'src/cli.ts');
const PREFIX = '/srv/mailgate-test';
const noAnalyze = systemdAnalyzeMissing();
test('prerequisite: systemd-analyze is installed (.ci/install-deps.sh)', () => {
  assert.equal(noAnalyze, false, String(noAnalyze));
});


interface Run {
  code: number;
  out: string;
}

function sh(script: string, args: string[], timeoutMs = 240_000): Promise<Run> {
  return new Promise((resolve) => {
    execFile('/bin/sh', [script, ...args], { timeout: timeoutMs, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
      resolve({ code, out: `${stdout}${stderr}` });
    });
  });
}

async function mustRun(script: string, args: string[]): Promise<string> {
  const r = await sh(script, args);
  assert.equal(r.code, 0, `${path.basename(script)} ${args.join(' ')} exited ${r.code}:\n${r.out}`);
  return r.out;
}

function exists(p: string): boolean {
  return fs.existsSync(p);
}

function mode(p: string): number {
  return fs.statSync(p).mode & 0o7777;
}

describe('packaging/install.sh into a staging root', { timeout: 600_000 }, () => {
  let root = '';
  const at = (p: string) => path.join(root, p);
  const config = () => at('etc/mailgate/mailgate.yaml');

  before(async () => {
    root = await makeTempDir('install');
    await mustRun(INSTALL, ['--root', root, '--prefix', PREFIX]);
  });
  after(async () => {
    if (root) await removeTempDir(root);
  });

  test('installs the program with its own Node runtime, the symlink, the unit, the config and the state folder', () => {
    for (const f of ['package.json', 'package-lock.json', 'bin/mailgate', 'src/cli.ts', 'config/mailgate.yaml', 'packaging/uninstall.sh']) {
      assert.ok(exists(at(`${PREFIX}/${f}`)), `${PREFIX}/${f} should be installed`);
    }
    const node = at(`${PREFIX}/node_modules/node/bin/node`);
    assert.match(spawnSync(node, ['--version'], { encoding: 'utf8' }).stdout, /^v24\./);
    assert.ok(!exists(at(`${PREFIX}/node_modules/typescript`)), 'dev dependencies are not installed (npm ci --omit=dev)');
    assert.ok(!exists(at(`${PREFIX}/tests`)), 'tests are not installed');
    assert.equal(fs.readlinkSync(at('usr/local/bin/mailgate')), `${PREFIX}/bin/mailgate`, 'the symlink names the final path, not the staging one');
    assert.equal(mode(at('etc/mailgate')), 0o750);
    assert.equal(mode(config()), 0o640);
    assert.equal(mode(at('var/lib/mailgate')), 0o700);
    assert.ok(!exists(at('etc/mailgate/mailgate.yaml.dist')), 'no .dist on a first install');
    assert.ok(!exists(at(`${PREFIX}.installing`)) && !exists(at(`${PREFIX}.previous`)), 'no leftovers beside the prefix');
  });

  test('the installed mailgate check validates the installed example, whose paths point at the systemd directories', () => {
    const r = spawnSync(at(`${PREFIX}/bin/mailgate`), ['check', '-c', config()], { encoding: 'utf8' });
    assert.equal(r.status, 0, `installed check failed:\n${r.stdout}${r.stderr}`);
    assert.match(r.stdout, /: OK/);
    assert.match(r.stdout, /self-signed in \/var\/lib\/mailgate\/certs/);
    const yaml = parse(fs.readFileSync(config(), 'utf8')) as { tls: { dir: string }; control?: { socket?: string } };
    assert.equal(yaml.tls.dir, '/var/lib/mailgate/certs');
    if (yaml.control !== undefined) assert.equal(yaml.control.socket, '/run/mailgate/control.sock');
    // Comments and layout of the example are kept: only values were spliced in.
    assert.match(fs.readFileSync(config(), 'utf8'), /# mailgate example configuration/);
  });

  test('the installed unit runs the installed program and passes verify and the exposure bound', () => {
    const unit = fs.readFileSync(at('etc/systemd/system/mailgate.service'), 'utf8');
    assert.match(unit, new RegExp(`^ExecStart=${PREFIX}/bin/mailgate run -c /etc/mailgate/mailgate.yaml$`, 'm'));
    assert.match(unit, new RegExp(`^ExecStartPre=${PREFIX}/bin/mailgate check -c /etc/mailgate/mailgate.yaml$`, 'm'));
    assert.ok(!unit.includes('/opt/mailgate'), 'every /opt/mailgate was replaced by the prefix');
    assert.ok(!unit.includes(root), 'the unit names final paths, not the staging root');
    // verify checks that the programs exist: point the copy into the staging root.
    const r = verifyUnit(withPrefix(unit, PREFIX, at(PREFIX)));
    assert.equal(r.status, 0, r.output);
    assert.equal(r.output, '', `systemd-analyze verify complained:\n${r.output}`);
    const report = securityReport(at('etc/systemd/system/mailgate.service'));
    assert.ok(report.overall <= MAX_EXPOSURE, `exposure ${report.overall}:\n${report.stdout}`);
  });

  test('an upgrade keeps a changed config and the certificates, replaces the program, and leaves the new example beside the config', async () => {
    const changed = fs.readFileSync(config(), 'utf8').replace(/^hostname: .*$/m, 'hostname: changed.example.net');
    fs.writeFileSync(config(), changed);
    fs.mkdirSync(at('var/lib/mailgate/certs'), { recursive: true, mode: 0o700 });
    const cert = at('var/lib/mailgate/certs/mail.example.net.crt');
    fs.writeFileSync(cert, '-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n', { mode: 0o600 });
    const certTime = fs.statSync(cert).mtimeMs;
    const marker = at(`${PREFIX}/src/left-over-from-the-old-version.ts`);
    fs.writeFileSync(marker, '');

    const out = await mustRun(INSTALL, ['--root', root, '--prefix', PREFIX]);
    assert.match(out, /kept .*mailgate\.yaml/);
    assert.equal(fs.readFileSync(config(), 'utf8'), changed, 'the changed config is untouched');
    assert.equal(mode(config()), 0o640);
    assert.equal(fs.readFileSync(cert, 'utf8'), '-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n');
    assert.equal(fs.statSync(cert).mtimeMs, certTime, 'the certificate is untouched');
    assert.ok(!exists(marker), 'the program tree is rebuilt, not merged');
    assert.equal(
      fs.readFileSync(at('etc/mailgate/mailgate.yaml.dist'), 'utf8'),
      fs.readFileSync(at(`${PREFIX}/config/mailgate.installed.yaml`), 'utf8'),
      'the new example is written beside the config',
    );
    const r = spawnSync(at(`${PREFIX}/bin/mailgate`), ['check', '-c', config()], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /hostname: changed\.example\.net/);
  });

  test('an upgrade is refused, changing nothing, when the new version rejects the config in force', async () => {
    const good = fs.readFileSync(config(), 'utf8');
    const marker = at(`${PREFIX}/src/still-the-old-version.ts`);
    fs.writeFileSync(marker, '');
    fs.writeFileSync(config(), `${good}\nno_such_key: 1\n`);
    try {
      const r = await sh(INSTALL, ['--root', root, '--prefix', PREFIX]);
      assert.notEqual(r.code, 0, `install should fail:\n${r.out}`);
      assert.match(r.out, /refuses .*mailgate\.yaml/);
      assert.match(r.out, /no_such_key/, 'the check output says what is wrong');
      assert.ok(exists(marker), 'the old program is still in place');
      assert.ok(!exists(at(`${PREFIX}.installing`)), 'the staging tree is removed');
    } finally {
      fs.writeFileSync(config(), good);
      fs.rmSync(marker, { force: true });
    }
  });

  test('uninstall removes program, unit and symlink but keeps config and certificates; --purge removes them', async () => {
    const out = await mustRun(UNINSTALL, ['--root', root, '--prefix', PREFIX]);
    assert.match(out, /kept/);
    assert.ok(!exists(at(PREFIX)));
    assert.ok(!exists(at('etc/systemd/system/mailgate.service')));
    assert.ok(!fs.existsSync(at('usr/local/bin/mailgate')) && !isSymlink(at('usr/local/bin/mailgate')));
    assert.ok(exists(config()));
    assert.ok(exists(at('var/lib/mailgate/certs/mail.example.net.crt')));

    await mustRun(UNINSTALL, ['--root', root, '--prefix', PREFIX, '--purge']);
    assert.ok(!exists(at('etc/mailgate')));
    assert.ok(!exists(at('var/lib/mailgate')));
  });

  test('install --no-systemd installs no unit; uninstall refuses a folder that is not a mailgate install', async () => {
    await mustRun(INSTALL, ['--root', root, '--prefix', PREFIX, '--no-systemd']);
    assert.ok(exists(at(`${PREFIX}/bin/mailgate`)));
    assert.ok(exists(config()));
    assert.ok(!exists(at('etc/systemd/system/mailgate.service')));

    const other = at('srv/not-mailgate');
    fs.mkdirSync(other, { recursive: true });
    fs.writeFileSync(path.join(other, 'precious'), 'x');
    const r = await sh(UNINSTALL, ['--root', root, '--prefix', '/srv/not-mailgate']);
    assert.notEqual(r.code, 0);
    assert.ok(exists(path.join(other, 'precious')));
    const i = await sh(INSTALL, ['--root', root, '--prefix', '/srv/not-mailgate']);
    assert.notEqual(i.code, 0, 'install must not replace a folder that is not a mailgate install');
    assert.ok(exists(path.join(other, 'precious')));
  });
});

function isSymlink(p: string): boolean {
  try {
    return fs.lstatSync(p).isSymbolicLink();
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------------------
// readiness

/**
 * A unix datagram receiver in the role of PID 1: prints one JSON line per
 * message with the sender's PID (SCM_CREDENTIALS) and closes the descriptor
 * that BARRIER=1 carries (sd_notify_barrier). On READY=1 it first connects to
 * every given port and records whether each one accepted.
 */
const RECEIVER = String.raw`
import array, json, os, socket, sys, time
path, ports = sys.argv[1], [int(p) for p in sys.argv[2].split(",")]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
s.bind(path)
os.chmod(path, 0o666)
print(json.dumps({"listening": path}), flush=True)
while True:
    data, anc, flags, _ = s.recvmsg(65536, socket.CMSG_SPACE(16 * 4) + socket.CMSG_SPACE(12))
    now = time.monotonic_ns() // 1000
    fds, pid = [], None
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
            fds.extend(a)
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = int.from_bytes(payload[0:4], sys.byteorder)
    fields = dict(l.split("=", 1) for l in data.decode().split("\n") if "=" in l)
    msg = {"pid": pid, "fields": fields, "received_usec": now}
    if fields.get("READY") == "1":
        probe = {}
        for port in ports:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                probe[str(port)] = "accepted"
            except OSError as e:
                probe[str(port)] = type(e).__name__
        msg["probe"] = probe
    for fd in fds:
        os.close(fd)
    print(json.dumps(msg), flush=True)
`;

interface Notification {
  pid: number | null;
  fields: Record<string, string>;
  received_usec: number;
  probe?: Record<string, string>;
}

interface Harness {
  dir: string;
  ports: number[];
  receiver: ManagedProcess;
  daemon: ManagedProcess;
  notifications(): Notification[];
  waitFor(pred: (n: Notification) => boolean, after?: number, timeoutMs?: number): Promise<{ n: Notification; index: number }>;
  daemonLog(): string;
  stop(): Promise<void>;
}

/** Starts the receiver and then the daemon (from this checkout), optionally as another user via setpriv. */
async function startWithNotifySocket(runAs?: { uid: number; gid: number }): Promise<Harness> {
  const dir = await makeTempDir('notify');
  const ports = [await freePort(), await freePort()];
  const socketPath = path.join(dir, 'notify.sock');
  const receiverOut = path.join(dir, 'receiver.out');
  const receiver = spawnServer('notify-receiver', 'python3', ['-c', RECEIVER, socketPath, ports.join(',')], { cwd: dir, outputFile: receiverOut });
  const notifications = (): Notification[] =>
    fs
      .readFileSync(receiverOut, 'utf8')
      .split('\n')
      .filter((l) => l.startsWith('{"pid"'))
      .map((l) => JSON.parse(l) as Notification);
  for (let i = 0; !fs.readFileSync(receiverOut, 'utf8').includes('"listening"'); i++) {
    if (receiver.exitInfo() || i > 200) throw new Error(`notify receiver did not start:\n${fs.readFileSync(receiverOut, 'utf8')}`);
    await sleep(25);
  }
  const config = [
    'hostname: mail.notify.test',
    'log: { level: info }',
    'tls: { dir: ./certs }',
    'timeouts: { shutdown_drain: 2s }',
    // The default control socket is relative to the config file; keep it inside the temp folder.
    'control: { socket: ./control.sock }',
    'listeners:',
    `  - { name: imaps, protocol: imap, tls: implicit, listen: "127.0.0.1:${ports[0]}", backend: "127.0.0.1:9" }`,
    `  - { name: pop3s, protocol: pop3, tls: implicit, listen: "127.0.0.1:${ports[1]}", backend: "127.0.0.1:9" }`,
    '',
  ].join('\n');
  const configFile = path.join(dir, 'mailgate.yaml');
  await fsp.writeFile(configFile, config);
  const daemonOut = path.join(dir, 'daemon.out');
  const env = { ...process.env, NOTIFY_SOCKET: socketPath };
  let daemon: ManagedProcess;
  if (runAs) {
    fs.chownSync(dir, runAs.uid, runAs.gid);
    fs.chownSync(configFile, runAs.uid, runAs.gid);
    const setpriv = ['--reuid', String(runAs.uid), '--regid', String(runAs.gid), '--clear-groups', '--'];
    daemon = spawnServer('mailgate', 'setpriv', [...setpriv, process.execPath, CLI, 'run', '-c', configFile], { cwd: dir, outputFile: daemonOut, env });
  } else {
    daemon = spawnServer('mailgate', process.execPath, [CLI, 'run', '-c', configFile], { cwd: dir, outputFile: daemonOut, env });
  }
  const daemonLog = () => fs.readFileSync(daemonOut, 'utf8');
  const seen = () => `got ${JSON.stringify(notifications())}\ndaemon:\n${daemonLog()}\nreceiver:\n${fs.readFileSync(receiverOut, 'utf8')}`;
  const notification = (pred: (n: Notification) => boolean, from = 0, timeoutMs = 20_000) =>
    waitFor(
      'a matching notification',
      () => {
        const all = notifications();
        const index = all.findIndex((n, i) => i >= from && pred(n));
        if (index >= 0) return { n: all[index]!, index };
        if (receiver.exitInfo()) throw new Error(`the notification receiver exited; ${seen()}`);
        return undefined;
      },
      { timeoutMs, intervalMs: 25, detail: seen },
    );
  return {
    dir,
    ports,
    receiver,
    daemon,
    notifications,
    waitFor: notification,
    daemonLog,
    async stop() {
      await daemon.stop(8000);
      await receiver.stop(2000);
      await removeTempDir(dir);
    },
  };
}

const noNotify = spawnSync('systemd-notify', ['--help']).error
  ? 'systemd-notify is not installed (Debian package "systemd")'
  : spawnSync('python3', ['--version']).error
    ? 'python3 is not installed'
    : false;

describe('readiness notification on $NOTIFY_SOCKET', { timeout: 120_000 }, () => {
  test('prerequisite: systemd-notify and python3 are installed (.ci/install-deps.sh)', () => {
    assert.equal(noNotify, false, String(noNotify));
  });

  test('READY=1 is sent only once every listener accepts; SIGHUP gives RELOADING=1 then READY=1; SIGTERM gives STOPPING=1', async () => {
    const h = await startWithNotifySocket();
    try {
      const ready = await h.waitFor((n) => n.fields.READY === '1');
      assert.deepEqual(
        ready.n.probe,
        Object.fromEntries(h.ports.map((p) => [String(p), 'accepted'])),
        'at READY=1 every listener must already accept connections',
      );
      assert.equal(ready.index, 0, 'READY=1 is the first message');
      assert.match(ready.n.fields.STATUS ?? '', /serving 2 listeners: imaps, pop3s/);
      assert.match(h.daemonLog(), /"msg":"mailgate ready"/);
      // Run as root here, systemd-notify sends with the daemon's PID (as it would under a root unit).
      assert.equal(ready.n.pid, h.daemon.pid);

      h.daemon.child.kill('SIGHUP');
      const reloading = await h.waitFor((n) => n.fields.RELOADING === '1', ready.index + 1);
      const usec = Number(reloading.n.fields.MONOTONIC_USEC);
      assert.ok(Number.isInteger(usec) && usec > 0, `MONOTONIC_USEC=${reloading.n.fields.MONOTONIC_USEC}`);
      assert.ok(usec <= reloading.n.received_usec && reloading.n.received_usec - usec < 5_000_000, 'MONOTONIC_USEC is CLOCK_MONOTONIC, just before receipt');
      const reloaded = await h.waitFor((n) => n.fields.READY === '1', reloading.index + 1);
      assert.match(reloaded.n.fields.STATUS ?? '', /serving 2 listeners/);
      assert.ok(Object.values(reloaded.n.probe ?? {}).every((v) => v === 'accepted'));

      h.daemon.child.kill('SIGTERM');
      const stopping = await h.waitFor((n) => n.fields.STOPPING === '1', reloaded.index + 1);
      // The readiness probe's own connections may still be open: the count is whatever is live.
      assert.match(stopping.n.fields.STATUS ?? '', /draining \d+ sessions?/);
      const exit = await h.daemon.exited;
      assert.equal(exit.code, 0, h.daemonLog());
      assert.deepEqual(
        h.notifications().filter((n) => !('BARRIER' in n.fields)).map((n) => Object.keys(n.fields).filter((k) => k !== 'STATUS' && k !== 'MONOTONIC_USEC')),
        [['READY'], ['RELOADING'], ['READY'], ['STOPPING']],
      );
      assert.ok(!/systemd notification failed/.test(h.daemonLog()), h.daemonLog());
    } finally {
      await h.stop();
    }
  });

  test('a reload that is refused still ends with READY=1 (the unit leaves "reloading")', async () => {
    const h = await startWithNotifySocket();
    try {
      const ready = await h.waitFor((n) => n.fields.READY === '1');
      await fsp.appendFile(path.join(h.dir, 'mailgate.yaml'), 'no_such_key: 1\n');
      h.daemon.child.kill('SIGHUP');
      const reloading = await h.waitFor((n) => n.fields.RELOADING === '1', ready.index + 1);
      const after = await h.waitFor((n) => n.fields.READY === '1', reloading.index + 1);
      assert.match(after.n.fields.STATUS ?? '', /reload failed/);
      assert.ok(Object.values(after.n.probe ?? {}).every((v) => v === 'accepted'), 'the old listeners keep serving');
    } finally {
      await h.stop();
    }
  });

  const nobody = (() => {
    if (process.getuid?.() !== 0) return undefined;
    const r = spawnSync('setpriv', ['--reuid', '65534', '--regid', '65534', '--clear-groups', '--', 'test', '-r', CLI]);
    return r.status === 0 ? { uid: 65534, gid: 65534 } : undefined;
  })();

  test(
    'as an unprivileged user the message comes from the helper\'s PID (why the unit needs NotifyAccess=all)',
    async () => {
      assert.ok(nobody, 'needs root and a checkout readable by nobody (CI runs as root)');
      const h = await startWithNotifySocket(nobody);
      try {
        const ready = await h.waitFor((n) => n.fields.READY === '1');
        assert.ok(Object.values(ready.n.probe ?? {}).every((v) => v === 'accepted'));
        assert.notEqual(ready.n.pid, h.daemon.pid, 'without CAP_SYS_ADMIN systemd-notify cannot send with the daemon\'s PID');
        // The helper waited for the barrier, so PID 1 could still look up its cgroup. The barrier
        // datagram follows READY=1, so it is waited for (on a loaded machine it can come a moment later);
        // waitFor rejects when it never comes.
        await h.waitFor((n) => n.fields.BARRIER === '1' && n.pid === ready.n.pid);
      } finally {
        await h.stop();
      }
    },
  );
});
