/**
 * Starts the real mailgate daemon (`src/cli.ts run -c FILE`) as a child
 * process with a generated config in a temp folder, on free loopback ports,
 * and reads its JSON log lines back for assertions.
 */
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { stringify } from 'yaml';
import { freePort, makeTempDir, removeTempDir, spawnServer, type ManagedProcess } from '../../helpers/proc.ts';
import { waitFor } from '../../helpers/wait.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const CLI = path.join(ROOT, 'src/cli.ts');

export interface GatewayListenerSpec {
  name: string;
  protocol: 'imap' | 'pop3' | 'smtp' | 'http';
  tls: 'implicit' | 'starttls' | 'none';
  backend: string | string[];
  /** Addresses to listen on instead of 127.0.0.1 on a free port (then give the port in `ports` too). */
  listen?: string | string[];
  [key: string]: unknown;
}

export interface LogLine {
  level: string;
  msg: string;
  [key: string]: unknown;
}

export interface Gateway {
  dir: string;
  configFile: string;
  /** The self-signed certificate the gateway generated (a CA file for clients). */
  certFile: string;
  hostname: string;
  ports: Record<string, number>;
  proc: ManagedProcess;
  logs(): Promise<LogLine[]>;
  rawLogs(): Promise<string>;
  /** Waits until a log line matches (polling the log file), or throws after timeoutMs. */
  waitForLog(pred: (l: LogLine) => boolean, timeoutMs?: number): Promise<LogLine>;
  /** Rewrites the config file (same ports) with changes to the listeners. */
  rewrite(mutate: (config: Record<string, unknown>) => void): Promise<void>;
  writeRaw(text: string): Promise<void>;
  signal(sig: NodeJS.Signals): void;
  stop(): Promise<void>;
}

export interface GatewayOptions {
  listeners: GatewayListenerSpec[];
  extra?: Record<string, unknown>;
  logLevel?: string;
  /** Fixed ports per listener name (e.g. the ones an ACME test CA validates on); the others get free ones. */
  ports?: Record<string, number>;
  /** Node options before the script (load tests: --inspect=127.0.0.1:0 to measure the heap). */
  nodeArgs?: string[];
  /**
   * Worker processes (the config's `workers`). Default: $MAILGATE_E2E_WORKERS,
   * else 1, so that a test's log and process assertions see one process;
   * tests/e2e/workers.test.ts and `npm run test:workers` cover the cluster.
   */
  workers?: number | 'auto';
}

export async function startGateway(opts: GatewayOptions): Promise<Gateway> {
  const dir = await makeTempDir('gateway');
  const hostname = 'mail.e2e.test';
  const ports: Record<string, number> = {};
  const listeners = [];
  for (const l of opts.listeners) {
    const port = opts.ports?.[l.name] ?? (await freePort());
    ports[l.name] = port;
    // A spec may name its own addresses (an IPv6 test listens on [::1] too); by default 127.0.0.1 on the free port.
    listeners.push({ ...l, listen: l.listen ?? `127.0.0.1:${port}` });
  }
  const envWorkers = process.env.MAILGATE_E2E_WORKERS;
  const config: Record<string, unknown> = {
    hostname,
    workers: opts.workers ?? (envWorkers === undefined ? 1 : envWorkers === 'auto' ? 'auto' : Number(envWorkers)),
    log: { level: opts.logLevel ?? 'debug' },
    tls: { dir: './certs' },
    timeouts: { shutdown_drain: '5s' },
    // Each gateway its own control socket, inside its own folder.
    control: { socket: './control.sock' },
    ...opts.extra,
    listeners,
  };
  const configFile = path.join(dir, 'mailgate.yaml');
  await fsp.writeFile(configFile, stringify(config));
  const outputFile = path.join(dir, 'mailgate.log');
  const proc = spawnServer('mailgate', process.execPath, [...(opts.nodeArgs ?? []), CLI, 'run', '-c', configFile], { cwd: dir, outputFile });
  const rawLogs = () => fsp.readFile(outputFile, 'utf8').catch(() => '');
  // Only complete lines: the daemon writes its log in batches, so the file may end inside a line.
  const logs = async (): Promise<LogLine[]> =>
    (await rawLogs())
      .split('\n')
      .slice(0, -1)
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as LogLine);
  const waitForLog = (pred: (l: LogLine) => boolean, timeoutMs = 10_000): Promise<LogLine> =>
    waitFor(
      'a log line',
      async () => {
        const hit = (await logs()).find(pred);
        if (!hit && proc.exitInfo()) throw new Error(`mailgate exited (${JSON.stringify(proc.exitInfo())}):\n${await rawLogs()}`);
        return hit;
      },
      { timeoutMs, intervalMs: 25, detail: async () => `log:\n${await rawLogs()}` },
    );
  const gw: Gateway = {
    dir,
    configFile,
    certFile: path.join(dir, 'certs', `${hostname}.selfsigned.crt`),
    hostname,
    ports,
    proc,
    logs,
    rawLogs,
    waitForLog,
    async rewrite(mutate) {
      const next = structuredClone(config);
      mutate(next);
      await fsp.writeFile(configFile, stringify(next));
    },
    async writeRaw(text) {
      await fsp.writeFile(configFile, text);
    },
    signal(sig) {
      process.kill(proc.pid, sig);
    },
    async stop() {
      await proc.stop(8000);
      await removeTempDir(dir);
    },
  };
  try {
    await waitForLog((l) => l.msg === 'mailgate ready', 20_000);
  } catch (err) {
    await gw.stop();
    throw err;
  }
  return gw;
}
