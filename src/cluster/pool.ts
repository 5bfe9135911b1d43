/**
 * The workers, seen from the primary (`workers` > 1): the gateway's serving
 * part (src/serving.ts) run in N processes. The runtime (src/main.ts) owns
 * what exists once; this pool
 *
 * - starts each worker (src/worker.ts) with its settings as data: the config
 *   the runtime read and checked (this worker's ports and share of the
 *   limits, ports.ts) and what the config's policy files hold;
 * - sends the runtime's certificates, ticket keys and HTTP-01 answers to every
 *   worker whenever they change;
 * - fans a reload out to every worker and reports when all have answered;
 * - keeps the policy state of all of them (policy-link.ts) and mirrors their
 *   sessions into the runtime's registry (registry-link.ts); `kill` goes to
 *   the worker that owns the session;
 * - restarts a worker that dies or stops answering, with backoff, and drains
 *   them all at stop.
 */
import cluster, { type Worker } from 'node:cluster';
import type { HealthChecker } from '../backend/health.ts';
import type { Config } from '../config/load.ts';
import type { WorkerStatus } from '../control/protocol.ts';
import { errorMessage, MailgateError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import type { TlsReportOutcome } from '../discovery/tlsrpt.ts';
import type { ReloadResult } from '../listeners/types.ts';
import type { PolicyFiles } from '../policy/files.ts';
import type { PolicyState } from '../policy/state.ts';
import type { SessionRegistry } from '../session/registry.ts';
import type { CertStore } from '../tls/cert-store.ts';
import type { TicketKeys } from '../tls/ticket-keys.ts';
import { envelope, unwrap, type Message, type WorkerLink } from './link.ts';
import { isFromWorker, type FromWorker, type PortPlan, type ToWorker, type WorkerPlan, type WorkerSettings } from './messages.ts';
import { PolicyAuthority } from './policy-link.ts';
import { planPorts, workerConfig } from './ports.ts';
import { RegistryMirror } from './registry-link.ts';

/** A worker must say ready (or why not) within this. */
const READY_WAIT_MS = 30_000;
/** A reload must be answered by every worker within this. */
const RELOAD_WAIT_MS = 30_000;
/** Restart backoff after a worker died: doubles from the first to the last. */
const RESTART_MIN_MS = 500;
const RESTART_MAX_MS = 30_000;
/** A worker that lived this long before dying resets the backoff. */
const STABLE_MS = 60_000;

interface Slot extends WorkerLink {
  pid: number;
  send(msg: ToWorker | Message): void;
  worker: Worker | undefined;
  state: 'starting' | 'ready' | 'stopping' | 'dead';
  startedAt: number;
  failures: number;
  restarts: number;
  restartTimer: NodeJS.Timeout | undefined;
  /** When the worker last answered a heartbeat (or started). */
  lastPong: number;
  /** Settles when this process said ready or failed to start. */
  ready: Promise<void> | undefined;
  waiters: Map<number, (r: ReloadResult) => void>;
  exited: Promise<void>;
}

/** The HTTP-01 answers the workers must give (acme/http01.ts). */
export interface ChallengeAnswers {
  pending(): [string, string][];
  onChange(listener: (pending: [string, string][]) => void): () => void;
}

export interface PoolParts {
  /** How many workers. */
  count: number;
  /** The runtime's registry: every worker's sessions are mirrored into it. */
  registry: SessionRegistry;
  /** The runtime's certificates and session ticket keys: sent to every worker as they change. */
  certs: CertStore;
  ticketKeys: TicketKeys;
  http01: ChallengeAnswers;
  /** A TLS report one of the workers took. */
  onTlsReport: (r: TlsReportOutcome) => void;
  log: Logger;
  /** The runtime's checks of pool members: their results go to every worker, their passive failures come back. */
  health: HealthChecker;
}

export class WorkerPool {
  /** The primary's policy state: the authority for every worker's (policy-link.ts). */
  readonly policyState: PolicyState;
  private readonly parts: PoolParts;
  private readonly log: Logger;
  private readonly slots: Slot[] = [];
  private readonly mirror: RegistryMirror;
  private readonly authority: PolicyAuthority;
  /** The policy store as started; a reload that changes it takes effect at the next restart. */
  private readonly store: Config['policy_store'];
  /** What workers serve now (a restarted worker gets these too), and the ports they bind. */
  private config: Config;
  private files: PolicyFiles;
  private ports: PortPlan = {};
  /** The ports of a reload being prepared (prepare), taken by reload. */
  private preparedPorts: { config: Config; ports: PortPlan } | undefined;
  private boundAddresses: Record<string, readonly string[]> = {};
  private readonly unsubscribe: (() => void)[] = [];
  private stopping: Promise<void> | undefined;
  private nextReloadId = 1;
  private certsQueued = false;
  private heartbeat: NodeJS.Timeout | undefined;
  private pingSeq = 0;

  private constructor(config: Config, files: PolicyFiles, parts: PoolParts, authority: PolicyAuthority) {
    this.config = config;
    this.files = files;
    this.parts = parts;
    this.log = parts.log;
    this.authority = authority;
    this.policyState = authority.state;
    this.mirror = new RegistryMirror(parts.registry);
    this.store = config.policy_store;
  }

  /** The policy authority is ready; no worker runs yet (start). */
  static async create(config: Config, files: PolicyFiles, parts: PoolParts): Promise<WorkerPool> {
    let pool: WorkerPool | undefined;
    const authority = await PolicyAuthority.create({ store: config.policy_store, log: parts.log, workers: () => pool?.live() ?? [] });
    pool = new WorkerPool(config, files, parts, authority);
    return pool;
  }

  /** Settles the ports, then starts every worker and resolves when all serve. */
  async start(): Promise<void> {
    const { certs, ticketKeys, http01 } = this.parts;
    this.unsubscribe.push(
      ticketKeys.onRotate((keys) => this.broadcast({ t: 'ticket-keys', ticketKeys: keys.toString('base64') })),
      certs.onAnyChange((c) => {
        if (c.kind !== 'ticket-keys') this.queueCerts();
      }),
      http01.onChange((tokens) => this.broadcast({ t: 'tokens', tokens })),
      this.parts.health.onChange((health) => this.broadcast({ t: 'health', health })),
    );
    this.ports = await planPorts(this.config.listeners);
    const onMessage = (worker: Worker, raw: unknown) => this.onMessage(worker, raw);
    cluster.on('message', onMessage);
    this.unsubscribe.push(() => cluster.off('message', onMessage));
    for (let i = 1; i <= this.parts.count; i++) this.slots.push(this.newSlot(i));
    await Promise.all(this.slots.map((s) => this.spawn(s)));
    this.startHeartbeat();
  }

  // ---- what the control socket reads ------------------------------------------------

  addresses(): Record<string, readonly string[]> {
    return this.boundAddresses;
  }

  /** Mirrored sessions up to date before a dashboard's snapshot (registry-link.ts). */
  refresh(): Promise<void> {
    return this.mirror.refresh(this.slots.filter((s) => s.state === 'ready'));
  }

  /** Worker processes now: index, pid, state (status command, tests). */
  workers(): WorkerStatus[] {
    return this.slots.map((s) => ({ index: s.index, pid: s.pid, state: s.state, restarts: s.restarts }));
  }

  // ---- workers ---------------------------------------------------------------------

  private newSlot(index: number): Slot {
    const slot: Slot = {
      index,
      pid: 0,
      worker: undefined,
      state: 'dead',
      startedAt: 0,
      failures: 0,
      restarts: 0,
      lastPong: 0,
      restartTimer: undefined,
      ready: undefined,
      waiters: new Map(),
      exited: Promise.resolve(),
      send: (msg: ToWorker | Message) => {
        const w = slot.worker;
        // A worker that is gone gets nothing; its exit handler cleans up after it.
        if (w?.isConnected()) w.send(envelope(msg), undefined, (err: Error | null) => err && this.log.debug({ worker: index, err: err.message }, 'send to worker failed'));
      },
    };
    return slot;
  }

  private live(): Slot[] {
    return this.slots.filter((s) => s.state === 'ready' || s.state === 'starting');
  }

  /** What a worker serves now: the runtime's config with its ports and share of the limits, and the policy files. */
  private settings(): WorkerSettings {
    const plan: WorkerPlan = { ports: this.ports, workers: this.parts.count };
    return { config: workerConfig(this.config, plan), files: this.files };
  }

  /** Starts the slot's process and resolves when it is serving; rejects with its reason otherwise. */
  private spawn(slot: Slot): Promise<void> {
    const worker = cluster.fork({ MAILGATE_WORKER: String(slot.index) });
    slot.worker = worker;
    slot.pid = worker.process.pid ?? 0;
    slot.state = 'starting';
    slot.startedAt = Date.now();
    slot.lastPong = slot.startedAt;
    slot.exited = new Promise((resolve) => worker.once('exit', () => resolve()));
    worker.once('exit', (code, signal) => this.onExit(slot, worker, code, signal));
    worker.on('error', (err) => this.log.warn({ worker: slot.index, err: errorMessage(err) }, 'worker channel error'));
    slot.ready = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        cleanup();
        worker.kill('SIGKILL');
        reject(new MailgateError('WORKER', `worker ${slot.index} did not start within ${READY_WAIT_MS} ms`));
      }, READY_WAIT_MS);
      const onMsg = (raw: unknown) => {
        const msg = unwrap(raw);
        if (msg?.t === 'ready') {
          cleanup();
          const m = msg as Extract<FromWorker, { t: 'ready' }>;
          slot.state = 'ready';
          slot.lastPong = Date.now();
          this.boundAddresses = m.addresses;
          resolve();
        } else if (msg?.t === 'start-failed') {
          cleanup();
          reject(new MailgateError('WORKER', `worker ${slot.index}: ${(msg as Extract<FromWorker, { t: 'start-failed' }>).error}`));
        }
      };
      const onEarlyExit = (code: number | null) => {
        cleanup();
        reject(new MailgateError('WORKER', `worker ${slot.index} exited (code ${code}) before it was ready`));
      };
      const cleanup = () => {
        clearTimeout(timer);
        worker.off('message', onMsg);
        worker.off('exit', onEarlyExit);
      };
      worker.on('message', onMsg);
      worker.once('exit', onEarlyExit);
    });
    worker.once('online', () => {
      const { certs, ticketKeys, http01 } = this.parts;
      slot.send({
        t: 'start',
        index: slot.index,
        settings: this.settings(),
        certs: certs.snapshot(),
        ticketKeys: ticketKeys.current.toString('base64'),
        tokens: http01.pending(),
        policy: this.authority.syncFor(slot),
        store: this.store,
        health: this.parts.health.snapshot(),
      });
    });
    return slot.ready;
  }

  /**
   * Pings every serving worker; one that has not answered for worker_timeout
   * is killed (its exit restarts it). A worker whose event loop is stuck
   * keeps its listening sockets, and the kernel keeps sending it clients.
   */
  private startHeartbeat(): void {
    const tick = () => {
      const timeout = this.config.worker_timeout;
      const now = Date.now();
      for (const s of this.slots) {
        if (s.state !== 'ready' || !s.worker) continue;
        if (now - s.lastPong > timeout) {
          this.log.error({ worker: s.index, pid: s.pid, silentMs: now - s.lastPong }, 'worker does not answer; killing it');
          s.worker.process.kill('SIGKILL');
          continue;
        }
        s.send({ t: 'ping', seq: ++this.pingSeq });
      }
      this.heartbeat = setTimeout(tick, Math.max(250, Math.min(5_000, Math.floor(this.config.worker_timeout / 4))));
      this.heartbeat.unref();
    };
    tick();
  }

  private onExit(slot: Slot, worker: Worker, code: number | null, signal: string | null): void {
    if (slot.worker !== worker) return;
    const was = slot.state;
    slot.state = 'dead';
    slot.worker = undefined;
    for (const w of slot.waiters.values()) w({ ok: false, error: `worker ${slot.index} exited`, started: [], stopped: [], updated: [] });
    slot.waiters.clear();
    this.mirror.workerGone(slot);
    this.authority.workerGone(slot);
    if (this.stopping || was === 'stopping') return;
    const lived = Date.now() - slot.startedAt;
    slot.failures = lived > STABLE_MS ? 1 : slot.failures + 1;
    const delay = Math.min(RESTART_MAX_MS, RESTART_MIN_MS * 2 ** (slot.failures - 1));
    this.log.error({ worker: slot.index, pid: slot.pid, code, signal, restartInMs: delay }, 'worker exited; restarting it');
    slot.restartTimer = setTimeout(() => {
      slot.restartTimer = undefined;
      if (this.stopping) return;
      slot.restarts++;
      this.spawn(slot).then(
        () => this.log.info({ worker: slot.index, pid: slot.pid }, 'worker restarted'),
        (err: unknown) => this.log.error({ worker: slot.index, err: errorMessage(err) }, 'worker restart failed'),
      );
    }, delay);
    slot.restartTimer.unref();
  }

  private onMessage(worker: Worker, raw: unknown): void {
    const msg = unwrap(raw);
    if (!msg) return;
    const slot = this.slots.find((s) => s.worker === worker);
    if (!slot) return;
    if (this.mirror.handle(slot, msg) || this.authority.handle(slot, msg)) return;
    if (!isFromWorker(msg)) {
      this.log.warn({ worker: slot.index, type: msg.t }, 'unknown message from a worker');
      return;
    }
    if (msg.t === 'reloaded') {
      slot.waiters.get(msg.id)?.(msg.result);
      slot.waiters.delete(msg.id);
    } else if (msg.t === 'pong') {
      slot.lastPong = Date.now();
    } else if (msg.t === 'tlsrpt') {
      this.parts.onTlsReport(msg.report);
    } else if (msg.t === 'backend-failed') {
      this.parts.health.recheck(msg.key);
    }
    // ready / start-failed are awaited in spawn(); stopped is followed by the exit.
  }

  private broadcast(msg: ToWorker): void {
    for (const s of this.live()) s.send(msg);
  }

  /** Certificates go out once per event-loop turn, however many changed in it. */
  private queueCerts(): void {
    if (this.certsQueued) return;
    this.certsQueued = true;
    setImmediate(() => this.sendCerts());
  }

  /** Sends what is queued now (a reload needs the certificates ahead of its own message); a no-op when nothing is. */
  private sendCerts(): void {
    if (!this.certsQueued) return;
    this.certsQueued = false;
    this.broadcast({ t: 'certs', certs: this.parts.certs.snapshot() });
  }

  // ---- reload and stop --------------------------------------------------------------

  /**
   * Settles the ports of a config about to be reloaded (a port another
   * program holds refuses the reload here, before anything changes).
   */
  async prepare(next: Config): Promise<void> {
    this.preparedPorts = { config: next, ports: await planPorts(next.listeners, { plan: this.ports, listeners: this.config.listeners }) };
  }

  /**
   * Every worker takes the checked config (after prepare); resolves when all
   * have answered, with their result. The certificates the runtime replaced
   * for it go out first, on the same channel.
   */
  async reload(next: Config, files: PolicyFiles): Promise<ReloadResult & { workers: number }> {
    const prepared = this.preparedPorts?.config === next ? this.preparedPorts.ports : await planPorts(next.listeners, { plan: this.ports, listeners: this.config.listeners });
    this.preparedPorts = undefined;
    this.sendCerts();
    this.ports = prepared;
    this.config = next;
    this.files = files;
    const id = this.nextReloadId++;
    const settings = this.settings();
    const results = await Promise.all(this.live().map((s) => this.askReload(s, id, settings)));
    const failed = results.filter((r) => !r.ok);
    const first = results[0] ?? { ok: true, started: [], stopped: [], updated: [] };
    if (failed.length === 0) return { ok: true, started: first.started, stopped: first.stopped, updated: first.updated, workers: results.length };
    const error = failed.map((r) => r.error ?? 'failed').join('; ');
    this.log.error({ err: error }, 'reload failed in a worker');
    return { ...first, ok: false, error, workers: results.length };
  }

  private askReload(slot: Slot, id: number, settings: WorkerSettings): Promise<ReloadResult> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        slot.waiters.delete(id);
        resolve({ ok: false, error: `worker ${slot.index} did not answer the reload within ${RELOAD_WAIT_MS} ms`, started: [], stopped: [], updated: [] });
      }, RELOAD_WAIT_MS);
      slot.waiters.set(id, (r) => {
        clearTimeout(timer);
        resolve(r);
      });
      slot.send({ t: 'reload', id, settings });
    });
  }

  /** Every worker drains for up to `drainMs`, then ends what is left; past that it is killed. Safe to call twice. */
  stop(drainMs: number): Promise<void> {
    this.stopping ??= this.doStop(drainMs);
    return this.stopping;
  }

  private async doStop(drainMs: number): Promise<void> {
    clearTimeout(this.heartbeat);
    for (const s of this.slots) clearTimeout(s.restartTimer);
    const running = this.slots.filter((s) => s.worker);
    for (const s of running) {
      s.state = 'stopping';
      s.send({ t: 'stop', drainMs });
    }
    // Workers drain, then end what is left within a few seconds; past that they are killed.
    const deadline = drainMs + 5_000;
    await Promise.all(
      running.map(async (s) => {
        const w = s.worker;
        const timer = setTimeout(() => {
          this.log.warn({ worker: s.index, pid: s.pid }, 'worker did not stop in time; killing it');
          w?.process.kill('SIGKILL');
        }, deadline);
        await s.exited;
        clearTimeout(timer);
      }),
    );
    for (const u of this.unsubscribe.splice(0)) u();
    await this.authority.close();
  }
}
