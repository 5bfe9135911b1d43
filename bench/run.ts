/**
 * `npm run bench`: mailgate against the direct backend, nginx's mail+http
 * proxy and HAProxy, on the same machine, interleaved in rounds. See
 * BENCHMARKS.md for the method and the latest table.
 *
 *   node bench/run.ts [--quick] [--rounds N] [--duration S] [--rows a,b] [--targets a,b]
 *                     [--variant NAME=CHECKOUT]... [--mailgate-node-args="ARGS"] [--out FILE]
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { makeTempDir, removeTempDir } from '../tests/helpers/proc.ts';
import { startBenchDovecot, startBenchNginx, startBenchPostfix, startBenchSmtpSink, type Backend } from './backends.ts';
import { REPO_ROOT, SNI, startHaproxy, startMailgate, startNginxProxy, type Proxy } from './proxies.ts';
import { buildRows, renderSaturation, renderTable, rowDefs, saturation, type Samples } from './report.ts';
import { idleMemory, SCENARIOS, writeSmtpMessage, type Ctx, type Settings, type Target } from './scenarios.ts';
import { buildLoadgen, H2load, Loadgen, machineCpu, makeCertificate, Wrk } from './tools.ts';

const USAGE = `usage: node bench/run.ts [options]
  --quick                 fast smoke: 1 round, 1 s per measure, 500 idle connections
  --rounds N              interleaved rounds (default 3)
  --duration S            seconds counted per measure (default 2)
  --warmup S              seconds of load before counting (default 0.3)
  --users N               IMAP users for the session row (default 200)
  --idle-conns N          connections held for the idle memory row (default 5000)
  --rows LIST             scenarios to run: ${SCENARIOS.map((s) => s.id).join(',')},idle (default all)
  --targets LIST          direct,mailgate,nginx,haproxy and variants (default all)
  --workers N             mailgate and nginx worker processes, HAProxy threads (default 1)
  --also-workers LIST     also measure this mailgate with these worker counts, as mailgate-Nw (e.g. 2)
  --variant NAME=DIR      also measure the mailgate checkout in DIR as NAME (e.g. base=/tmp/mailgate-base)
  --mailgate-node-args=S  extra node flags for mailgate (e.g. --mailgate-node-args="--cpu-prof --cpu-prof-dir=/tmp/prof")
  --out FILE              JSON results (default bench/results/latest.json, quick: latest-quick.json)
  --no-install            do not run bench/install-deps.sh when something is missing
  --serve                 start everything, print the ports and wait (for profiling by hand)
`;

interface Options {
  quick: boolean;
  rounds: number;
  settings: Settings;
  rows: Set<string>;
  targets: Set<string> | undefined;
  variants: { name: string; root: string }[];
  nodeArgs: string[];
  out: string;
  install: boolean;
  serve: boolean;
  workers: number;
  alsoWorkers: number[];
}

function options(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean' },
      rounds: { type: 'string' },
      duration: { type: 'string' },
      warmup: { type: 'string' },
      users: { type: 'string' },
      'idle-conns': { type: 'string' },
      rows: { type: 'string' },
      targets: { type: 'string' },
      variant: { type: 'string', multiple: true },
      'mailgate-node-args': { type: 'string' },
      out: { type: 'string' },
      'no-install': { type: 'boolean' },
      serve: { type: 'boolean' },
      workers: { type: 'string' },
      'also-workers': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(USAGE);
    process.exit(0);
  }
  const quick = values.quick === true;
  const num = (v: string | undefined, d: number) => (v === undefined ? d : Number(v));
  const rows = new Set((values.rows ?? [...SCENARIOS.map((s) => s.id), 'idle'].join(',')).split(','));
  const variants = (values.variant ?? []).map((v) => {
    const [name, dir] = v.split('=');
    if (!name || !dir || !fs.existsSync(path.join(dir, 'src/cli.ts'))) throw new Error(`--variant ${v}: expected NAME=DIR with DIR/src/cli.ts`);
    return { name: name.startsWith('mailgate') ? name : `mailgate-${name}`, root: path.resolve(dir) };
  });
  return {
    quick,
    rounds: num(values.rounds, quick ? 1 : 3),
    settings: {
      duration: num(values.duration, quick ? 1 : 2),
      warmup: num(values.warmup, quick ? 0.2 : 0.3),
      users: num(values.users, 200),
      idleConns: num(values['idle-conns'], quick ? 500 : 5000),
      singleConns: quick ? 40 : 200,
      backendPgids: [],
    },
    rows,
    targets: values.targets ? new Set(values.targets.split(',')) : undefined,
    variants,
    nodeArgs: values['mailgate-node-args']?.split(/\s+/).filter(Boolean) ?? [],
    out: values.out ?? path.join(REPO_ROOT, 'bench/results', quick ? 'latest-quick.json' : 'latest.json'),
    install: values['no-install'] !== true,
    serve: values.serve === true,
    workers: num(values.workers, 1),
    alsoWorkers: (values['also-workers'] ?? '').split(',').filter(Boolean).map(Number),
  };
}

// ---- dependencies ------------------------------------------------------------------

const NEEDED: [string, string][] = [
  ['/usr/sbin/nginx', 'nginx'],
  ['/usr/lib/nginx/modules/ngx_mail_module.so', 'libnginx-mod-mail'],
  ['/usr/sbin/haproxy', 'haproxy'],
  ['/usr/bin/wrk', 'wrk'],
  ['/usr/bin/h2load', 'nghttp2-client'],
  ['/usr/bin/cc', 'build-essential'],
  ['/usr/include/openssl/ssl.h', 'libssl-dev'],
  ['/usr/sbin/dovecot', 'dovecot-imapd'],
  ['/usr/lib/dovecot/imap', 'dovecot-imapd'],
  ['/usr/sbin/smtp-sink', 'postfix'],
  ['/usr/bin/openssl', 'openssl'],
  ['/usr/bin/prlimit', 'util-linux'],
];

function missing(): string[] {
  return NEEDED.filter(([f]) => !fs.existsSync(f)).map(([, p]) => p);
}

function ensureDeps(install: boolean): void {
  if (process.getuid?.() !== 0) throw new Error('the bench starts Dovecot, nginx and smtp-sink as root (they drop privileges): run it as root');
  let gone = missing();
  if (gone.length && install) {
    process.stdout.write(`bench: installing ${[...new Set(gone)].join(' ')} (bench/install-deps.sh)\n`);
    const r = spawnSync('bash', [path.join(REPO_ROOT, 'bench/install-deps.sh')], { stdio: 'inherit' });
    if (r.status !== 0) throw new Error('bench/install-deps.sh failed');
    gone = missing();
  }
  const required = gone.filter((p) => p !== 'haproxy' && p !== 'libnginx-mod-mail');
  if (required.length) throw new Error(`missing: ${[...new Set(required)].join(' ')} (run bash bench/install-deps.sh)`);
}

function version(cmd: string, args: string[]): string {
  try {
    const r = spawnSync(cmd, args, { encoding: 'utf8' });
    return `${r.stdout ?? ''}${r.stderr ?? ''}`.split('\n')[0]?.trim() ?? '';
  } catch {
    return '';
  }
}

function gitCommit(): string {
  try {
    return execFileSync('git', ['-C', REPO_ROOT, 'rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).trim();
  } catch {
    return '';
  }
}

// ---- main -------------------------------------------------------------------------------

async function main(): Promise<void> {
  const opts = options(process.argv.slice(2));
  ensureDeps(opts.install);
  const started = Date.now();
  const loadStart = os.loadavg();
  const log = (s: string) => process.stdout.write(`[${((Date.now() - started) / 1000).toFixed(0).padStart(4)} s] ${s}\n`);
  const stops: (() => Promise<void>)[] = [];
  const work = await makeTempDir('bench');
  stops.push(() => removeTempDir(work));
  try {
    const cert = await makeCertificate(work, SNI);
    const loadgen = new Loadgen(await buildLoadgen(work), work, SNI);
    const wrk = await Wrk.create(work);
    const h2load = await H2load.create(work);
    const smtpMessageFile = await writeSmtpMessage(work);
    log(`starting backends (Dovecot with ${opts.settings.users} users, nginx, Postfix smtpd + smtp-sink)`);
    const [dovecot, nginxBackend, sink] = await Promise.all([startBenchDovecot(opts.settings.users), startBenchNginx(), startBenchSmtpSink()]);
    for (const b of [dovecot, nginxBackend, sink] as Backend[]) stops.push(b.stop);
    const postfix = await startBenchPostfix(dovecot.authSocket, sink.port);
    stops.push(postfix.stop);
    const backendPorts = { imap: dovecot.port, smtp: postfix.port, http: nginxBackend.port };
    opts.settings.backendPgids = [dovecot.proc.pid, postfix.proc.pid, sink.proc.pid, nginxBackend.proc.pid];

    const want = (name: string) => !opts.targets || opts.targets.has(name);
    const proxies: Proxy[] = [];
    const add = (p: Proxy) => {
      proxies.push(p);
      stops.push(p.stop);
    };
    if (want('mailgate')) add(await startMailgate(backendPorts, cert, { nodeArgs: opts.nodeArgs, workers: opts.workers }));
    for (const v of opts.variants) if (want(v.name)) add(await startMailgate(backendPorts, cert, { name: v.name, root: v.root, nodeArgs: opts.nodeArgs, workers: opts.workers }));
    for (const n of opts.alsoWorkers) {
      const name = `mailgate-${n}w`;
      if (want(name)) add(await startMailgate(backendPorts, cert, { name, nodeArgs: opts.nodeArgs, workers: n }));
    }
    if (want('nginx')) {
      if (fs.existsSync('/usr/lib/nginx/modules/ngx_mail_module.so')) add(await startNginxProxy(backendPorts, cert, opts.workers));
      else log('nginx mail module not installed: no nginx column');
    }
    if (want('haproxy')) {
      if (fs.existsSync('/usr/sbin/haproxy')) add(await startHaproxy(backendPorts, cert, opts.workers));
      else log('haproxy not installed: no haproxy column');
    }
    const targets: Target[] = [];
    if (want('direct')) targets.push({ name: 'direct', direct: true, ports: backendPorts, pgid: undefined });
    for (const p of proxies) targets.push({ name: p.name, direct: false, ports: p.ports, pgid: p.pgid });
    log(`targets: ${targets.map((t) => t.name).join(', ')}`);

    const ctx: Ctx = { loadgen, wrk, h2load, settings: opts.settings, smtpMessageFile };
    if (opts.serve) {
      const info = { work, loadgen: loadgen.bin, smtpMessageFile, targets: targets.map((t) => ({ name: t.name, ports: t.ports, pgid: t.pgid })) };
      process.stdout.write(`${JSON.stringify(info, null, 2)}\nserving until Ctrl-C or SIGUSR2\n`);
      const keepAlive = setInterval(() => undefined, 60_000); // a signal listener alone does not keep node running
      await new Promise<void>((resolve) => process.once('SIGUSR2', resolve));
      clearInterval(keepAlive);
      return;
    }
    const scenarios = SCENARIOS.filter((s) => opts.rows.has(s.id));
    const samples: Samples = {};
    const warnings: string[] = [];
    const record = (scenario: string, target: string, s: Samples[string][string][number]) => {
      ((samples[scenario] ??= {})[target] ??= []).push(s);
      for (const w of s.warnings) {
        warnings.push(`${target} ${scenario}: ${w}`);
        log(`  warning: ${target} ${scenario}: ${w}`);
      }
    };

    // Warm-up, not recorded: JIT, Dovecot's index files for every user, connection pools.
    log('warm-up');
    const warm: Ctx = { ...ctx, settings: { ...ctx.settings, duration: 0.5, warmup: 0 } };
    for (const t of targets) {
      for (const s of scenarios.filter((x) => x.id !== 'single' && x.id !== 'noop')) {
        const c = s.id === 'imap_session' && t.direct ? { ...warm, settings: { ...warm.settings, duration: Math.max(1, opts.settings.users / 300) } } : warm;
        await s.run(t, c).catch((err: unknown) => log(`  warm-up ${t.name} ${s.id} failed: ${(err as Error).message.split('\n')[0]}`));
      }
    }

    for (let round = 0; round < opts.rounds; round++) {
      log(`round ${round + 1} of ${opts.rounds}`);
      for (const s of scenarios) {
        // Rotate the order each round so no target always runs first (or right after another's load).
        const order = targets.map((_, i) => targets[(i + round) % targets.length] as Target);
        const line: string[] = [];
        for (const t of order) {
          try {
            const m0 = machineCpu();
            const r = await s.run(t, ctx);
            const m1 = machineCpu();
            const wall = (m1.total - m0.total) / os.cpus().length;
            if (wall > 0) r.machine = (m1.busy - m0.busy) / wall;
            record(s.id, t.name, r);
            line.push(`${t.name} ${Object.entries(r.values).map(([k, v]) => `${k}=${v.toFixed(v >= 100 ? 0 : 2)}`).join(' ')}`);
          } catch (err) {
            record(s.id, t.name, { values: {}, warnings: [`failed: ${(err as Error).message.split('\n').slice(0, 3).join(' ')}`] });
          }
        }
        log(`  ${s.id}: ${line.join(' | ')}`);
      }
    }

    if (opts.rows.has('idle')) {
      log(`idle memory: ${opts.settings.idleConns} TLS IMAP connections held per proxy`);
      for (const t of targets.filter((x) => !x.direct)) {
        try {
          const r = await idleMemory(t, ctx);
          record('idle', t.name, r);
          log(`  ${t.name}: ${r.values.kib_per_conn?.toFixed(1)} KiB per connection (opened in ${r.values.setup_s?.toFixed(1)} s)`);
        } catch (err) {
          record('idle', t.name, { values: {}, warnings: [`failed: ${(err as Error).message.split('\n')[0]}`] });
        }
      }
    }

    const names = targets.map((t) => t.name);
    const rows = buildRows(rowDefs(opts.settings.idleConns, opts.settings.users), samples, names).filter((r) =>
      Object.values(r.values).some((v) => v !== null) || (r.base !== undefined && r.base !== null),
    );
    const table = renderTable(rows, names);
    const busy = saturation(samples, names);
    const meta = {
      date: new Date().toISOString(),
      /** 1, 5 and 15 minute load averages at the start and the end: other users of the machine show here. */
      loadavg: { start: loadStart, end: os.loadavg() },
      commit: gitCommit(),
      command: `node bench/run.ts ${process.argv.slice(2).join(' ')}`.trim(),
      machine: { cpus: os.cpus().length, model: os.cpus()[0]?.model ?? '', kernel: os.release(), memGiB: Math.round(os.totalmem() / 2 ** 30) },
      versions: {
        node: process.version,
        nginx: version('/usr/sbin/nginx', ['-v']),
        haproxy: version('/usr/sbin/haproxy', ['-v']),
        dovecot: version('/usr/sbin/dovecot', ['--version']),
        openssl: version('openssl', ['version']),
        wrk: version('wrk', ['-v']),
        h2load: version('h2load', ['--version']),
      },
      settings: { rounds: opts.rounds, workers: opts.workers, ...opts.settings, backendPgids: undefined },
      seconds: Math.round((Date.now() - started) / 1000),
    };
    await fsp.mkdir(path.dirname(opts.out), { recursive: true });
    await fsp.writeFile(opts.out, JSON.stringify({ meta, targets: names, rows, saturation: busy, samples, warnings }, null, 2) + '\n');
    process.stdout.write(`\n${table}\n\nCPU busy during the load rows (share of one core, medians):\n\n${renderSaturation(busy, names)}\n\n`);
    process.stdout.write(`medians of ${opts.rounds} interleaved round(s); MB = 10^6 bytes; results: ${path.relative(process.cwd(), opts.out)}\n`);
    if (warnings.length) process.stdout.write(`${warnings.length} warning(s), see the JSON file\n`);
  } finally {
    for (const stop of stops.reverse()) await stop().catch((err: unknown) => log(`cleanup: ${(err as Error).message}`));
  }
}

for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  // The harness' exit hook kills every server's process group and removes the temp folders.
  process.once(sig, () => process.exit(130));
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    process.stderr.write(`bench: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exit(1);
  },
);
