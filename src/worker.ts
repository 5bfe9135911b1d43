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
import { freezeConfig, type Config } from './config/load.ts';
import { envelope, unwrap, type Message, type PrimaryLink } from './cluster/link.ts';
import { isToWorker, type FromWorker, type ToWorker, type WorkerSettings } from './cluster/messages.ts';
import { createWorkerPolicyState, type WorkerPolicy } from './cluster/policy-link.ts';
import { RegistryForwarder } from './cluster/registry-link.ts';
import { errorMessage } from './core/errors.ts';
import { createLogger, type Logger } from './core/log.ts';
import type { ReloadResult } from './listeners/types.ts';
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
  const code = await serve(start, config, wlog, send);
  wlog.flush();
  return code;
}

/** Builds the serving part from the start message and follows the primary's messages until it says stop. */
async function serve(start: Start, initial: Config, log: Logger, send: (msg: FromWorker | Message) => void): Promise<number> {
  const link: PrimaryLink = { send };
  let policy: WorkerPolicy | undefined;
  let forwarder: RegistryForwarder | undefined;
  const tokens = new Map<string, string>(start.tokens);
  try {
    const certs = new CertStore(initial.tls.min_version);
    certs.setTicketKeys(Buffer.from(start.ticketKeys, 'base64'));
    certs.load(start.certs);
    const p = await createWorkerPolicyState({ store: start.store, log, link, initial: start.policy });
    policy = p;
    const registry = new SessionRegistry();
    // Events go out every 20 ms rather than every turn: one IPC message for many sessions under load; the dashboard flushes every 200 ms anyway.
    const fwd = new RegistryForwarder(registry, link, { flushMs: 20 });
    forwarder = fwd;
    // Reload and stop need the serving part; everything else applies at once, even while it starts.
    let servingStarted!: (s: Serving) => void;
    const servingReady = new Promise<Serving>((resolve) => (servingStarted = resolve));
    let current = initial;
    let stopping: Promise<void> | undefined;
    let stopped!: () => void;
    const done = new Promise<void>((resolve) => (stopped = resolve));
    const stop = (drainMs: number) => {
      stopping ??= (async () => {
        try {
          log.info({ sessions: registry.size, drainMs }, 'shutting down');
          await (await servingReady).stop(drainMs);
          fwd.close();
          await p.close();
          log.info('stopped');
          send({ t: 'stopped' });
        } finally {
          stopped();
        }
      })();
      return stopping;
    };
    const parts: Parts = {
      certs,
      tokens,
      reload: async (settings) => {
        const serving = await servingReady;
        const next = freezeConfig(settings.config);
        const result = await serving.reload(next, settings.files);
        current = next;
        if (result.ok) log.info({ file: next.file, started: result.started, stopped: result.stopped, updated: result.updated }, 'configuration reloaded');
        return result;
      },
      stop,
      send,
      log,
    };
    process.on('message', (raw) => {
      const msg = unwrap(raw);
      if (!msg) return;
      if (p.handle(msg) || fwd.handle(msg)) return;
      if (!isToWorker(msg)) {
        log.warn({ type: msg.t }, 'unknown message from the primary');
        return;
      }
      void onMessage(msg, parts);
    });
    // Policy messages sent before this router existed were lost: ask for the current state again.
    p.resync();
    process.on('disconnect', () => {
      log.warn('the primary is gone; stopping');
      void stop(ORPHAN_DRAIN_MS);
    });
    const serving = await Serving.start(initial, start.settings.files, {
      registry,
      certs,
      policyState: p.state,
      http01: (token) => tokens.get(token),
      sharedPorts: true,
      log,
    });
    servingStarted(serving);
    // Someone signalled this worker alone: finish like a stop; the primary starts a new one.
    process.once('SIGTERM', () => {
      log.info('SIGTERM: this worker stops; the primary replaces it');
      void stop(current.shutdownDrain);
    });
    log.info({ file: initial.file, listeners: initial.listeners.length }, 'worker ready');
    send({ t: 'ready', addresses: serving.addresses() });
    await done;
    return 0;
  } catch (err) {
    log.error({ err: errorMessage(err) }, 'worker start failed');
    send({ t: 'start-failed', error: errorMessage(err) });
    forwarder?.close();
    await policy?.close();
    return 1;
  }
}

interface Parts {
  certs: CertStore;
  tokens: Map<string, string>;
  reload(settings: WorkerSettings): Promise<ReloadResult>;
  stop(drainMs: number): Promise<void>;
  send(msg: FromWorker): void;
  log: Logger;
}

async function onMessage(msg: ToWorker, parts: Parts): Promise<void> {
  try {
    switch (msg.t) {
      case 'certs':
        parts.certs.load(msg.certs);
        return;
      case 'ticket-keys':
        parts.certs.setTicketKeys(Buffer.from(msg.ticketKeys, 'base64'));
        return;
      case 'tokens':
        parts.tokens.clear();
        for (const [k, v] of msg.tokens) parts.tokens.set(k, v);
        return;
      case 'reload': {
        let result: ReloadResult;
        try {
          result = await parts.reload(msg.settings);
        } catch (err) {
          result = { ok: false, error: errorMessage(err), started: [], stopped: [], updated: [] };
        }
        parts.send({ t: 'reloaded', id: msg.id, result });
        return;
      }
      case 'stop':
        await parts.stop(msg.drainMs);
        return;
      case 'ping':
        parts.send({ t: 'pong', seq: msg.seq });
        return;
      case 'start':
        parts.log.warn('a second start message; ignored');
        return;
    }
  } catch (err) {
    parts.log.error({ type: msg.t, err: errorMessage(err) }, 'could not apply a message from the primary');
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
