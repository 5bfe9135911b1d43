/**
 * The primary of a multi-process gateway (`workers` > 1). It serves no
 * client; it owns what must exist once:
 *
 * - the configuration: it reads and checks the file, then tells every
 *   worker to reload, and reports success only when all have;
 * - certificates: built here (files, self-signed, ACME) and sent to the
 *   workers as PEM whenever they change, with the session ticket keys it
 *   rotates, so a ticket from one worker resumes on another;
 * - policy state: bans, counters and session counts across workers
 *   (policy-link.ts);
 * - the control socket and metrics, over a registry that mirrors every
 *   worker's sessions (registry-link.ts); `kill` goes to the right worker;
 * - the workers themselves: started with the ports settled (ports.ts),
 *   restarted with backoff when one dies, drained together at stop.
 */
import cluster, { type Worker } from 'node:cluster';
import { AcmeManager } from '../acme/manager.ts';
import { loadConfigFile, type Config } from '../config/load.ts';
import { registerAcmeCommands } from '../control/acme.ts';
import { startControlPlane, type ControlPlane } from '../control/index.ts';
import type { WorkerStatus } from '../control/protocol.ts';
import type { BanAdmin } from '../control/target.ts';
import { errorMessage, MailgateError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import type { Daemon, ReloadResult } from '../main.ts';
import { PolicyEngine } from '../policy/engine.ts';
import { SessionRegistry } from '../session/registry.ts';
import { buildCertStore } from '../tls/bootstrap.ts';
import type { CertInfo, CertStore } from '../tls/cert-store.ts';
import { TicketKeys } from '../tls/ticket-keys.ts';
import { envelope, unwrap, type Message, type WorkerLink } from './link.ts';
import { isFromWorker, type FromWorker, type PortPlan, type ToWorker, type WorkerPlan } from './messages.ts';
import { PolicyAuthority } from './policy-link.ts';
import { planPorts } from './ports.ts';
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

export class ClusterPrimary implements Daemon {
  readonly registry = new SessionRegistry();
  readonly startedAt = Date.now();
  private config: Config;
  private readonly log: Logger;
  private readonly certs: CertStore;
  private readonly count: number;
  private readonly slots: Slot[] = [];
  private readonly mirror: RegistryMirror;
  private readonly ticketKeys: TicketKeys;
  private readonly authority: PolicyAuthority;
  /** The engine's admin side answers the control socket's bans; workers run their own engines. */
  private engine: PolicyEngine;
  private controlPlane: ControlPlane | undefined;
  private acme: AcmeManager | undefined;
  private watchAcme: ((acme: AcmeManager | undefined) => void) | undefined;
  private offAcmeTokens: (() => void) | undefined;
  private ports: PortPlan = {};
  private boundAddresses: Record<string, readonly string[]> = {};
  private reloading: Promise<unknown> = Promise.resolve();
  private readonly reloadListeners = new Set<(result: ReloadResult) => void>();
  private stopping: Promise<void> | undefined;
  private nextReloadId = 1;
  /** The policy store as started; a reload that changes it takes effect at the next restart. */
  private readonly store: Config['policy_store'];
  private certsQueued = false;
  private heartbeat: NodeJS.Timeout | undefined;
  private pingSeq = 0;

  private constructor(config: Config, certs: CertStore, count: number, log: Logger, authority: PolicyAuthority, ticketKeys: TicketKeys) {
    this.ticketKeys = ticketKeys;
    this.config = config;
    this.certs = certs;
    this.count = count;
    this.log = log;
    this.authority = authority;
    this.engine = PolicyEngine.fromConfig(config, authority.state, log);
    this.mirror = new RegistryMirror(this.registry);
    this.store = config.policy_store;
  }

  static async start(config: Config, log: Logger, count: number): Promise<ClusterPrimary> {
    for (const w of config.warnings) log.warn({ file: config.file }, w);
    const ticketKeys = new TicketKeys();
    let certs: CertStore;
    try {
      certs = await buildCertStore(config, log, ticketKeys.current);
    } catch (err) {
      ticketKeys.stop();
      throw err;
    }
    let primary: ClusterPrimary | undefined;
    const authority = await PolicyAuthority.create({ store: config.policy_store, log, workers: () => primary?.live() ?? [] });
    let p: ClusterPrimary;
    try {
      p = new ClusterPrimary(config, certs, count, log, authority, ticketKeys);
    } catch (err) {
      ticketKeys.stop();
      await authority.close();
      throw err;
    }
    primary = p;
    try {
      p.ticketKeys.onRotate((keys) => {
        certs.setTicketKeys(keys);
        p.broadcast({ t: 'ticket-keys', ticketKeys: keys.toString('base64') });
      });
      certs.onAnyChange((c) => {
        if (c.kind !== 'ticket-keys') p.queueCerts();
      });
      p.controlPlane = await startControlPlane(p, log);
      p.acme = AcmeManager.fromConfig(config, certs, log);
      const control = p.controlPlane.control;
      if (control) p.watchAcme = registerAcmeCommands(control, () => p.acme, certs);
      p.followAcme();
      p.ports = await planPorts(config.listeners);
      cluster.on('message', (worker, raw) => p.onMessage(worker, raw));
      for (let i = 1; i <= count; i++) p.slots.push(p.newSlot(i));
      await Promise.all(p.slots.map((s) => p.spawn(s)));
      p.startHeartbeat();
      await p.acme?.start();
    } catch (err) {
      await p.stop(0);
      throw err;
    }
    log.info({ file: config.file, listeners: config.listeners.length, workers: count }, 'mailgate ready');
    return p;
  }

  // ---- what the control socket reads (ControlTarget) ------------------------------

  get currentConfig(): Config {
    return this.config;
  }

  get certificates(): CertStore {
    return this.certs;
  }

  get bans(): BanAdmin {
    return this.engine.bans;
  }

  addresses(): Record<string, readonly string[]> {
    return this.boundAddresses;
  }

  certRenewal(info: CertInfo): { failing: boolean; lastError: string | null; nextAttemptAt: number | null } | null {
    return this.acme?.renewalFor(info) ?? null;
  }

  /** Mirrored sessions up to date before a dashboard's snapshot (registry-link.ts). */
  refresh(): Promise<void> {
    return this.mirror.refresh(this.slots.filter((s) => s.state === 'ready'));
  }

  /** Worker processes now: index, pid, state (status command, tests). */
  workers(): WorkerStatus[] {
    return this.slots.map((s) => ({ index: s.index, pid: s.pid, state: s.state, restarts: s.restarts }));
  }

  onReload(listener: (result: ReloadResult) => void): () => void {
    this.reloadListeners.add(listener);
    return () => this.reloadListeners.delete(listener);
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

  private plan(): WorkerPlan {
    return { ports: this.ports, workers: this.count };
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
      slot.send({
        t: 'start',
        index: slot.index,
        plan: this.plan(),
        certs: this.certs.snapshot(),
        ticketKeys: this.ticketKeys.current.toString('base64'),
        tokens: [...(this.acme?.pendingTokens() ?? [])],
        policy: this.authority.syncFor(slot),
        store: this.store,
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
    this.broadcast({ t: 'certs', certs: this.certs.snapshot() });
  }

  private followAcme(): void {
    this.watchAcme?.(this.acme);
    this.offAcmeTokens?.();
    this.offAcmeTokens = this.acme?.onTokens((tokens) => this.broadcast({ t: 'tokens', tokens: [...tokens] }));
  }

  // ---- reload and stop --------------------------------------------------------------

  reload(): Promise<ReloadResult> {
    const run = this.reloading.then(() => this.reloadOnce());
    this.reloading = run.catch(() => undefined);
    return run.then((result) => {
      for (const l of this.reloadListeners) l(result);
      return result;
    });
  }

  private async reloadOnce(): Promise<ReloadResult> {
    const refused = (error: string): ReloadResult => {
      this.log.error({ file: this.config.file, err: error }, 'reload refused, keeping the running configuration');
      return { ok: false, error, started: [], stopped: [], updated: [] };
    };
    let next: Config;
    let engine: PolicyEngine;
    let certs: CertStore;
    let ports: PortPlan;
    try {
      next = loadConfigFile(this.config.file);
      engine = PolicyEngine.fromConfig(next, this.authority.state, this.log);
      AcmeManager.check(next, this.log);
      certs = await buildCertStore(next, this.log, this.certs.currentTicketKeys);
      ports = await planPorts(next.listeners, { plan: this.ports, listeners: this.config.listeners });
    } catch (err) {
      return refused(errorMessage(err));
    }
    for (const w of next.warnings) this.log.warn({ file: next.file }, w);
    if (JSON.stringify(next.policy_store) !== JSON.stringify(this.store)) this.log.warn({ running: this.store.type, configured: next.policy_store.type }, 'policy_store changes take effect at the next restart');
    if (next.workers !== this.config.workers) this.log.warn({ running: this.count, configured: next.workers }, 'workers changes take effect at the next restart');
    this.engine = engine;
    // Certificates first (same channel, so they arrive before the reload), once: replaceWith queued them.
    this.certs.replaceWith(certs);
    this.sendCerts();
    this.ports = ports;
    this.config = next;
    const id = this.nextReloadId++;
    const results = await Promise.all(this.live().map((s) => this.askReload(s, id)));
    await this.reloadAcme(next);
    const failed = results.filter((r) => !r.ok);
    const first = results[0] ?? { ok: true, started: [], stopped: [], updated: [] };
    const result: ReloadResult = failed.length
      ? { ...first, ok: false, error: failed.map((r) => r.error ?? 'failed').join('; ') }
      : { ok: true, started: first.started, stopped: first.stopped, updated: first.updated };
    if (result.ok) this.log.info({ file: next.file, workers: results.length, started: result.started, stopped: result.stopped, updated: result.updated }, 'configuration reloaded');
    else this.log.error({ err: result.error }, 'reload failed in a worker');
    return result;
  }

  private askReload(slot: Slot, id: number): Promise<ReloadResult> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        slot.waiters.delete(id);
        resolve({ ok: false, error: `worker ${slot.index} did not answer the reload within ${RELOAD_WAIT_MS} ms`, started: [], stopped: [], updated: [] });
      }, RELOAD_WAIT_MS);
      slot.waiters.set(id, (r) => {
        clearTimeout(timer);
        resolve(r);
      });
      slot.send({ t: 'reload', id, plan: this.plan() });
    });
  }

  private async reloadAcme(next: Config): Promise<void> {
    const before = this.acme;
    const { acme, created } = await AcmeManager.afterReload(before, next, this.certs, this.log);
    this.acme = acme;
    if (acme === before) return;
    this.followAcme();
    if (created) await acme?.start();
  }

  stop(drainMs = this.config.shutdownDrain): Promise<void> {
    this.stopping ??= this.doStop(drainMs);
    return this.stopping;
  }

  private async doStop(drainMs: number): Promise<void> {
    this.log.info({ sessions: this.registry.size, drainMs, workers: this.live().length }, 'shutting down');
    await this.acme?.stop();
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
    this.offAcmeTokens?.();
    this.ticketKeys.stop();
    await this.controlPlane?.close();
    await this.authority.close();
    this.log.info('stopped');
  }
}
