/**
 * A worker process: one Gateway serving clients on every listener (bound
 * with SO_REUSEPORT beside the other workers), with what only the primary
 * may own handed in: certificates and ticket keys, HTTP-01 answers, policy
 * state shared through the primary, and a registry whose events the primary
 * mirrors for the control socket.
 *
 * The worker obeys the primary: it ignores SIGINT and SIGHUP (a terminal
 * sends them to the whole process group; the primary reloads and stops
 * everyone in order), and stops at once if the primary goes away.
 */
import { Buffer } from 'node:buffer';
import { errorMessage } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { loadConfigFile, type Config } from '../config/load.ts';
import type { Gateway as GatewayType, ReloadResult } from '../main.ts';
import { SessionRegistry } from '../session/registry.ts';
import { CertStore } from '../tls/cert-store.ts';
import { envelope, unwrap, type Message, type PrimaryLink } from './link.ts';
import { isToWorker, type FromWorker, type ToWorker } from './messages.ts';
import { createWorkerPolicyState, type WorkerPolicy } from './policy-link.ts';
import { workerConfig } from './ports.ts';
import { RegistryForwarder } from './registry-link.ts';

/** How long a new worker waits for its start message before giving up. */
const START_WAIT_MS = 30_000;
/** When the primary is gone, live sessions get this long to finish. */
const ORPHAN_DRAIN_MS = 2_000;

export async function runWorker(file: string, log: Logger): Promise<number> {
  const send = (msg: FromWorker | Message): void => {
    // The channel may be gone (primary died): the 'disconnect' handler stops us then, so what is lost here no longer matters.
    if (!process.connected) return;
    try {
      process.send?.(envelope(msg));
    } catch (err) {
      log.debug({ type: msg.t, err: errorMessage(err) }, 'message to the primary not sent');
    }
  };
  const link: PrimaryLink = { send };
  const start = await waitForStart();
  const wlog = log.child({ worker: start.index });

  let config: Config;
  let policy: WorkerPolicy | undefined;
  let forwarder: RegistryForwarder | undefined;
  const tokens = new Map<string, string>(start.tokens);
  try {
    config = workerConfig(loadConfigFile(file), start.plan);
    const certs = new CertStore(config.tls.min_version);
    certs.setTicketKeys(Buffer.from(start.ticketKeys, 'base64'));
    certs.load(start.certs);
    const p = await createWorkerPolicyState({ store: start.store, log: wlog, link, initial: start.policy });
    policy = p;
    const registry = new SessionRegistry();
    // Events go out every 20 ms rather than every turn: one IPC message for many sessions under load; the dashboard flushes every 200 ms anyway.
    const fwd = new RegistryForwarder(registry, link, { flushMs: 20 });
    forwarder = fwd;
    // Reload and stop need the gateway; everything else applies at once, even while it starts.
    let gatewayStarted!: (g: GatewayType) => void;
    const gatewayReady = new Promise<GatewayType>((resolve) => (gatewayStarted = resolve));
    let stopping: Promise<void> | undefined;
    let stopped!: () => void;
    const done = new Promise<void>((resolve) => (stopped = resolve));
    const stop = (drainMs: number) => {
      stopping ??= (async () => {
        try {
          await (await gatewayReady).stop(drainMs);
          await fwd.close();
          await p.close();
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
      reload: async (plan) => {
        const gateway = await gatewayReady;
        const next = workerConfig(loadConfigFile(file), plan);
        config = next;
        return gateway.reload(next);
      },
      stop,
      send,
      log: wlog,
    };
    process.on('message', (raw) => {
      const msg = unwrap(raw);
      if (!msg) return;
      if (p.handle(msg) || fwd.handle(msg)) return;
      if (!isToWorker(msg)) {
        wlog.warn({ type: msg.t }, 'unknown message from the primary');
        return;
      }
      void onMessage(msg, parts);
    });
    // Policy messages sent before this router existed were lost: ask for the current state again.
    p.resync();
    process.on('disconnect', () => {
      wlog.warn('the primary is gone; stopping');
      void stop(ORPHAN_DRAIN_MS);
    });
    const { Gateway } = await import('../main.ts');
    const gateway = await Gateway.start(config, wlog, { registry, certs, policyState: p.state, http01: (token) => tokens.get(token) });
    gatewayStarted(gateway);
    // Someone signalled this worker alone: finish like a stop; the primary starts a new one.
    process.once('SIGTERM', () => {
      wlog.info('SIGTERM: this worker stops; the primary replaces it');
      void stop(config.shutdownDrain);
    });
    send({ t: 'ready', addresses: gateway.addresses() });
    await done;
    return 0;
  } catch (err) {
    wlog.error({ err: errorMessage(err) }, 'worker start failed');
    send({ t: 'start-failed', error: errorMessage(err) });
    await forwarder?.close();
    await policy?.close();
    return 1;
  }
}

interface Parts {
  certs: CertStore;
  tokens: Map<string, string>;
  reload(plan: Extract<ToWorker, { t: 'reload' }>['plan']): Promise<ReloadResult>;
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
          result = await parts.reload(msg.plan);
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

function waitForStart(): Promise<Extract<ToWorker, { t: 'start' }>> {
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
      resolve(msg as Extract<ToWorker, { t: 'start' }>);
    };
    process.on('message', onMessage);
  });
}
