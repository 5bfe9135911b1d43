/**
 * Where a worker process starts (`workers` > 1; the primary is
 * src/cluster/pool.ts). A worker runs one serving part (src/serving.ts) on
 * every listener, bound with SO_REUSEPORT beside the other workers, with
 * what only the primary may own handed in as data: the config the primary
 * read and checked (a worker never reads the file), certificates and ticket
 * keys, HTTP-01 answers, policy state shared through the primary; its
 * sessions are mirrored into the primary's registry.
 *
 * The worker obeys the primary: it ignores SIGINT and SIGHUP (a terminal
 * sends them to the whole process group; the primary reloads and stops
 * everyone in order), and stops at once if the primary goes away. SIGTERM
 * to one worker drains it alone; the primary starts another.
 */
import { Buffer } from 'node:buffer';
import type { HealthSnapshot } from './backend/health.ts';
import { freezeConfig, type Config } from './config/load.ts';
import { envelope, unwrap, type Message, type PrimaryLink } from './cluster/link.ts';
import { isToWorker, type FromWorker, type ToWorker, type WorkerSettings } from './cluster/messages.ts';
import { createWorkerPolicyState, type WorkerPolicy } from './cluster/policy-link.ts';
import { RegistryForwarder } from './cluster/registry-link.ts';
import { errorMessage } from './core/errors.ts';
import { createLogger, type Logger } from './core/log.ts';
import type { ReloadResult } from './listeners/types.ts';
import { assertNever } from './protocols/types.ts';
import { Serving } from './serving.ts';
import { SessionRegistry } from './session/registry.ts';
import { CertStore } from './tls/cert-store.ts';

/** How long a new worker waits for its start message before giving up. */
const START_WAIT_MS = 30_000;
/** When the primary is gone, live sessions get this long to finish. */
const ORPHAN_DRAIN_MS = 2_000;

type Start = Extract<ToWorker, { t: 'start' }>;

/** Runs this process as a worker until the primary stops it; the exit code. */
export async function runWorker(): Promise<number> {
  process.title = `mailgate: worker ${process.env.MAILGATE_WORKER ?? '?'}`;
  process.on('SIGINT', () => undefined);
  process.on('SIGHUP', () => undefined);
  const send = (msg: FromWorker | Message): void => {
    // The channel may be gone (primary died): the 'disconnect' handler stops us then, so what is lost here no longer matters.
    if (!process.connected) return;
    try {
      process.send?.(envelope(msg));
    } catch (err) {
      log?.debug({ type: msg.t, err: errorMessage(err) }, 'message to the primary not sent');
    }
  };
  let log: Logger | undefined;
  let start: Start;
  try {
    start = await waitForStart();
  } catch (err) {
    process.stderr.write(`mailgate worker: ${errorMessage(err)}\n`);
    return 1;
  }
  const config = freezeConfig(start.settings.config);
  const wlog = createLogger(process.env.MAILGATE_LOG_LEVEL ?? config.log.level).child({ worker: start.index });
  log = wlog;
  process.on('uncaughtException', (err) => {
    wlog.fatal({ err: errorMessage(err), stack: err.stack }, 'uncaught exception in a worker');
    wlog.flush();
    process.exit(70);
  });
  const code = await new WorkerProcess(start, config, wlog, send).run();
  wlog.flush();
  return code;
}

/** One worker's life: its serving part built from the start message, then what the primary says, until it says stop. */
class WorkerProcess {
  private readonly start: Start;
  private readonly log: Logger;
  private readonly send: (msg: FromWorker | Message) => void;
  private readonly registry = new SessionRegistry();
  private readonly certs: CertStore;
  /** Pending HTTP-01 answers (token → key authorization), as the primary sends them. */
  private readonly tokens: Map<string, string>;
  /** The primary's health checks of pool members, as last sent. */
  private health: HealthSnapshot;
  private config: Config;
  private policy: WorkerPolicy | undefined;
  private forwarder: RegistryForwarder | undefined;
  /** Reload and stop need the serving part; everything else applies at once, even while it starts. */
  private readonly serving: Promise<Serving>;
  private servingStarted!: (s: Serving) => void;
  private stopping: Promise<void> | undefined;
  private readonly done: Promise<void>;
  private stopped!: () => void;

  constructor(start: Start, config: Config, log: Logger, send: (msg: FromWorker | Message) => void) {
    this.start = start;
    this.config = config;
    this.log = log;
    this.send = send;
    this.tokens = new Map(start.tokens);
    this.health = start.health;
    this.certs = new CertStore(config.tls.min_version);
    this.serving = new Promise((resolve) => (this.servingStarted = resolve));
    this.done = new Promise((resolve) => (this.stopped = resolve));
  }

  /** Serves until stopped: 0, or 1 when the start failed (the primary hears why). */
  async run(): Promise<number> {
    try {
      const serving = await this.build();
      this.servingStarted(serving);
      // Someone signalled this worker alone: finish like a stop; the primary starts a new one.
      process.once('SIGTERM', () => {
        this.log.info('SIGTERM: this worker stops; the primary replaces it');
        void this.stop(this.config.shutdownDrain);
      });
      this.log.info({ file: this.config.file, listeners: this.config.listeners.length }, 'worker ready');
      this.send({ t: 'ready', addresses: serving.addresses() });
      await this.done;
      return 0;
    } catch (err) {
      this.log.error({ err: errorMessage(err) }, 'worker start failed');
      this.send({ t: 'start-failed', error: errorMessage(err) });
      this.forwarder?.close();
      await this.policy?.close();
      return 1;
    }
  }

  /** Certificates, policy state and the registry's forwarder from the start message, the router, then the serving part. */
  private async build(): Promise<Serving> {
    const { start, log } = this;
    const link: PrimaryLink = { send: this.send };
    this.certs.setTicketKeys(Buffer.from(start.ticketKeys, 'base64'));
    this.certs.load(start.certs);
    const policy = await createWorkerPolicyState({ store: start.store, log, link, initial: start.policy });
    this.policy = policy;
    // Events go out every 20 ms rather than every turn: one IPC message for many sessions under load; the dashboard flushes every 200 ms anyway.
    const forwarder = new RegistryForwarder(this.registry, link, { flushMs: 20 });
    this.forwarder = forwarder;
    process.on('message', (raw) => {
      const msg = unwrap(raw);
      if (!msg || policy.handle(msg) || forwarder.handle(msg)) return;
      if (isToWorker(msg)) void this.apply(msg);
      else log.warn({ type: msg.t }, 'unknown message from the primary');
    });
    // Policy messages sent before this router existed were lost: ask for the current state again.
    policy.resync();
    process.on('disconnect', () => {
      log.warn('the primary is gone; stopping');
      void this.stop(ORPHAN_DRAIN_MS);
    });
    return Serving.start(this.config, start.settings.files, {
      registry: this.registry,
      certs: this.certs,
      policyState: policy.state,
      http01: (token) => this.tokens.get(token),
      sharedPorts: true,
      onTlsReport: (report) => this.send({ t: 'tlsrpt', report }),
      log,
      backendHealth: { get: (key) => this.health[key] },
      backendFailed: (key) => this.send({ t: 'backend-failed', key }),
    });
  }

  private async apply(msg: ToWorker): Promise<void> {
    try {
      switch (msg.t) {
        case 'certs':
          this.certs.load(msg.certs);
          return;
        case 'ticket-keys':
          this.certs.setTicketKeys(Buffer.from(msg.ticketKeys, 'base64'));
          return;
        case 'tokens':
          this.tokens.clear();
          for (const [k, v] of msg.tokens) this.tokens.set(k, v);
          return;
        case 'reload':
          this.send({ t: 'reloaded', id: msg.id, result: await this.reload(msg.settings) });
          return;
        case 'stop':
          await this.stop(msg.drainMs);
          return;
        case 'ping':
          this.send({ t: 'pong', seq: msg.seq });
          return;
        case 'health':
          this.health = msg.health;
          return;
        case 'start':
          this.log.warn('a second start message; ignored');
          return;
        default:
          assertNever(msg);
      }
    } catch (err) {
      this.log.error({ type: msg.t, err: errorMessage(err) }, 'could not apply a message from the primary');
    }
  }

  /** The primary's copy of the config, as data: never the file. */
  private async reload(settings: WorkerSettings): Promise<ReloadResult> {
    try {
      const next = freezeConfig(settings.config);
      const result = await (await this.serving).reload(next, settings.files);
      this.config = next;
      if (result.ok) this.log.info({ file: next.file, started: result.started, stopped: result.stopped, updated: result.updated }, 'configuration reloaded');
      return result;
    } catch (err) {
      return { ok: false, error: errorMessage(err), started: [], stopped: [], updated: [] };
    }
  }

  private stop(drainMs: number): Promise<void> {
    this.stopping ??= (async () => {
      try {
        this.log.info({ sessions: this.registry.size, drainMs }, 'shutting down');
        await (await this.serving).stop(drainMs);
        this.forwarder?.close();
        await this.policy?.close();
        this.log.info('stopped');
        this.send({ t: 'stopped' });
      } finally {
        this.stopped();
      }
    })();
    return this.stopping;
  }
}

function waitForStart(): Promise<Start> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      process.off('message', onMessage);
      reject(new Error(`no start message from the primary within ${START_WAIT_MS} ms`));
    }, START_WAIT_MS);
    const onMessage = (raw: unknown) => {
      const msg = unwrap(raw);
      if (msg?.t !== 'start') return;
      clearTimeout(timer);
      process.off('message', onMessage);
      resolve(msg as Start);
    };
    process.on('message', onMessage);
  });
}
