/**
 * The composition root: load the config, build the parts, start the
 * listeners; reload on demand; stop with a drain. Nothing else wires parts
 * together.
 */
import { registerAcmeCommands } from './acme/control.ts';
import { AcmeManager } from './acme/manager.ts';
import { CapabilityCache } from './backend/capabilities.ts';
import { loadConfigFile, type Config, type Listener } from './config/load.ts';
import { startControlPlane, type ControlPlane } from './control/index.ts';
import type { BanAdmin } from './control/target.ts';
import { errorMessage } from './core/errors.ts';
import type { Logger } from './core/log.ts';
import { startHttpListener } from './listeners/http-listener.ts';
import { startMailListener } from './listeners/mail-listener.ts';
import type { ListenerDeps, ListenerHandle } from './listeners/types.ts';
import { PassthroughPolicy, PolicyEngine, type Policy } from './policy/engine.ts';
import { PolicyState } from './policy/state.ts';
import { imapProtocol } from './protocols/imap.ts';
import { pop3Protocol } from './protocols/pop3.ts';
import { smtpProtocol } from './protocols/smtp.ts';
import type { ProtocolModule } from './protocols/types.ts';
import { SessionRegistry } from './session/registry.ts';
import { buildCertStore } from './tls/bootstrap.ts';
import type { CertInfo, CertStore } from './tls/cert-store.ts';
import { TicketKeys } from './tls/ticket-keys.ts';

const MODULES: Record<'imap' | 'pop3' | 'smtp', ProtocolModule> = {
  imap: imapProtocol,
  pop3: pop3Protocol,
  smtp: smtpProtocol,
};

interface Running {
  listener: Listener;
  handle: ListenerHandle;
}

export interface ReloadResult {
  ok: boolean;
  error?: string;
  started: string[];
  stopped: string[];
  updated: string[];
}

/**
 * What a worker process gets from its primary instead of building it
 * (src/cluster/worker.ts): certificates (and ticket keys) pushed by the
 * primary, policy state shared through it, HTTP-01 answers from its ACME.
 * A worker has no control socket and runs no ACME of its own.
 */
export interface WorkerParts {
  /** Made before the gateway so that the primary's mirror sees the very first session. */
  registry: SessionRegistry;
  certs: CertStore;
  policyState: PolicyState;
  http01: (token: string) => string | undefined;
}

/** What the CLI runs: one Gateway, or a cluster primary with its workers. */
export interface Daemon {
  readonly registry: SessionRegistry;
  addresses(): Record<string, readonly string[]>;
  reload(): Promise<ReloadResult>;
  onReload(listener: (result: ReloadResult) => void): () => void;
  stop(drainMs?: number): Promise<void>;
}

export class Gateway implements Daemon {
  readonly registry: SessionRegistry;
  private config: Config;
  private readonly log: Logger;
  private certs: CertStore;
  private policy: Policy;
  /** Counters, bans and open-session counts: kept across reloads, so bans survive them (src/policy/state.ts). */
  private policyState: PolicyState | undefined;
  private readonly capabilities: CapabilityCache;
  private readonly running = new Map<string, Running>();
  private stopping: Promise<void> | undefined;
  private reloading: Promise<void> = Promise.resolve();
  readonly startedAt = Date.now();
  /** Counters, control socket and metrics (src/control). */
  private controlPlane: ControlPlane | undefined;
  private readonly reloadListeners = new Set<(result: ReloadResult) => void>();
  /** ACME certificates (src/acme), when the config has an `acme:` section. */
  private acme: AcmeManager | undefined;
  private watchAcme: ((acme: AcmeManager | undefined) => void) | undefined;
  /** Set in a worker process; undefined when this process is the whole gateway. */
  private readonly worker: WorkerParts | undefined;
  /** Session ticket keys, rotated here when this process is the whole gateway. */
  private ticketKeys: TicketKeys | undefined;

  private constructor(config: Config, certs: CertStore, log: Logger, worker?: WorkerParts) {
    this.config = config;
    this.certs = certs;
    this.log = log;
    this.worker = worker;
    this.registry = worker?.registry ?? new SessionRegistry();
    this.policy = new PassthroughPolicy();
    this.capabilities = new CapabilityCache(config.hostname, log);
  }

  /** The whole gateway in this process, or (with `worker`) one worker of a cluster. */
  static async start(config: Config, log: Logger, worker?: WorkerParts): Promise<Gateway> {
    if (!worker) for (const w of config.warnings) log.warn({ file: config.file }, w);
    // A worker's certificates and ticket keys come from its primary; here they are this process's own.
    const ticketKeys = worker ? undefined : new TicketKeys();
    let certs: CertStore;
    try {
      certs = worker ? worker.certs : await buildCertStore(config, log, ticketKeys?.current);
    } catch (err) {
      ticketKeys?.stop();
      throw err;
    }
    const gw = new Gateway(config, certs, log, worker);
    gw.ticketKeys = ticketKeys;
    try {
      if (worker) {
        gw.policyState = worker.policyState;
      } else {
        ticketKeys?.onRotate((keys) => certs.setTicketKeys(keys));
        gw.policyState = await PolicyState.create({ store: config.policy_store, log });
      }
      gw.policy = PolicyEngine.fromConfig(config, gw.policyState, log);
      if (!worker) {
        gw.controlPlane = await startControlPlane(gw, log);
        gw.acme = AcmeManager.fromConfig(config, certs, log);
        const control = gw.controlPlane.control;
        if (control) gw.watchAcme = registerAcmeCommands(control, () => gw.acme, certs);
        gw.watchAcme?.(gw.acme);
      }
      for (const l of config.listeners) await gw.startListener(l);
      await gw.acme?.start();
    } catch (err) {
      await gw.stop(0);
      throw err;
    }
    log.info({ file: config.file, listeners: config.listeners.length }, worker ? 'worker ready' : 'mailgate ready');
    return gw;
  }

  get currentConfig(): Config {
    return this.config;
  }

  get certificates(): CertStore {
    return this.certs;
  }

  /** Bound addresses per listener name (real ports when 0 was configured). */
  addresses(): Record<string, readonly string[]> {
    return Object.fromEntries([...this.running].map(([name, r]) => [name, r.handle.addresses]));
  }

  private deps(): ListenerDeps {
    return {
      hostname: this.config.hostname,
      certs: this.certs,
      registry: this.registry,
      policy: () => this.policy,
      log: this.log,
      minVersion: this.config.tls.min_version,
      sharedPorts: this.worker !== undefined,
    };
  }

  private async startListener(l: Listener): Promise<void> {
    const handle =
      l.protocol === 'http'
        ? await startHttpListener(l, { ...this.deps(), acmeHttp01: this.http01 })
        : await startMailListener(l, MODULES[l.protocol], { ...this.deps(), capabilities: this.capabilities });
    this.running.set(l.name, { listener: l, handle });
  }

  /** HTTP-01 answers for plain http listeners: this process's ACME, or (in a worker) the primary's tokens. */
  private readonly http01 = (token: string): string | undefined => (this.worker ? this.worker.http01(token) : this.acme?.http01Responder(token));

  /** Renewal state of a served certificate for the control socket; null when ACME does not manage it. */
  certRenewal(info: CertInfo): { failing: boolean; lastError: string | null; nextAttemptAt: number | null } | null {
    return this.acme?.renewalFor(info) ?? null;
  }

  /** Reload: ACME starts, follows the new settings, or stops, after the listeners are in place. */
  private async reloadAcme(next: Config): Promise<void> {
    const { acme, created } = await AcmeManager.afterReload(this.acme, next, this.certs, this.log);
    this.acme = acme;
    if (!created || !acme) return;
    this.watchAcme?.(acme);
    await acme.start();
  }

  /**
   * Re-reads the config file. An invalid file changes nothing. Listeners whose
   * protocol and addresses are unchanged keep their sockets and take the new
   * settings for new sessions; others are started or stopped. Live sessions
   * are never touched.
   */
  /** Reloads run one after another: two SIGHUPs in a row must not start the same new listener twice. */
  reload(next?: Config): Promise<ReloadResult> {
    const run = this.reloading.then(() => this.reloadOnce(next));
    this.reloading = run.then(
      () => undefined,
      () => undefined,
    );
    return run.then((result) => {
      for (const l of this.reloadListeners) l(result);
      return result;
    });
  }

  /** Called after every reload (SIGHUP or the control socket) with its result. */
  onReload(listener: (result: ReloadResult) => void): () => void {
    this.reloadListeners.add(listener);
    return () => this.reloadListeners.delete(listener);
  }

  /** The policy engine's ban list for the control socket, when the engine exposes one as `bans`. */
  get bans(): BanAdmin | undefined {
    return (this.policy as Policy & { bans?: BanAdmin }).bans;
  }

  /** `given`: a worker reloads the config its primary read and checked (same file, same moment). */
  private async reloadOnce(given?: Config): Promise<ReloadResult> {
    const result: ReloadResult = { ok: false, started: [], stopped: [], updated: [] };
    let next: Config;
    let certs: CertStore | undefined;
    let policy: Policy | undefined;
    try {
      next = given ?? loadConfigFile(this.config.file);
      // Rules, users and limits for new sessions; bans and counts stay (same PolicyState). A bad users file refuses the reload.
      if (this.policyState) policy = PolicyEngine.fromConfig(next, this.policyState, this.log);
      // A worker's certificates come from its primary, which has built them by now.
      if (!this.worker) {
        AcmeManager.check(next, this.log);
        certs = await buildCertStore(next, this.log, this.certs.currentTicketKeys);
      }
    } catch (err) {
      result.error = errorMessage(err);
      this.log.error({ file: this.config.file, err: result.error }, 'reload refused, keeping the running configuration');
      return result;
    }
    if (!this.worker) for (const w of next.warnings) this.log.warn({ file: next.file }, w);
    if (policy) this.policy = policy;
    if (this.policyState && next.policy_store.type !== this.policyState.storeType) {
      this.log.warn({ running: this.policyState.storeType, configured: next.policy_store.type }, 'policy_store changes take effect at the next restart');
    }
    if (certs) this.certs.replaceWith(certs);
    this.capabilities.clear();
    const prev = this.config;
    this.config = { ...next, tls: next.tls };
    const wanted = new Map(next.listeners.map((l) => [l.name, l]));
    for (const [name, r] of [...this.running]) {
      const n = wanted.get(name);
      if (n && sameBinding(r.listener, n)) {
        r.handle.update(n);
        r.listener = n;
        result.updated.push(name);
      } else {
        await r.handle.close();
        this.running.delete(name);
        result.stopped.push(name);
      }
    }
    try {
      for (const l of next.listeners) {
        if (!this.running.has(l.name)) {
          await this.startListener(l);
          result.started.push(l.name);
        }
      }
    } catch (err) {
      result.error = errorMessage(err);
      this.log.error({ err: result.error }, 'reload could not start a listener; the others run with the new configuration');
      return result;
    }
    if (!this.worker) await this.reloadAcme(next);
    result.ok = true;
    this.log.info({ file: next.file, previous: prev.file, ...result }, 'configuration reloaded');
    return result;
  }

  /**
   * Stops accepting, lets live sessions finish for up to `drainMs`, then ends
   * the rest with their protocol's goodbye. Safe to call twice.
   */
  stop(drainMs = this.config.shutdownDrain): Promise<void> {
    this.stopping ??= this.doStop(drainMs);
    return this.stopping;
  }

  private async doStop(drainMs: number): Promise<void> {
    this.log.info({ sessions: this.registry.size, drainMs }, 'shutting down');
    await this.acme?.stop();
    await Promise.all([...this.running.values()].map((r) => r.handle.close()));
    this.registry.drainAll();
    const deadline = Date.now() + drainMs;
    while (this.registry.size > 0 && Date.now() < deadline) await sleep(Math.min(100, deadline - Date.now()));
    if (this.registry.size > 0) {
      this.log.info({ sessions: this.registry.size }, 'drain deadline reached, closing remaining sessions');
      this.registry.killAll('shutdown');
      const hard = Date.now() + 3000;
      while (this.registry.size > 0 && Date.now() < hard) await sleep(50);
    }
    await this.controlPlane?.close();
    // A worker's policy state belongs to its worker runtime, which closes it after this.
    if (!this.worker) await this.policyState?.close();
    this.ticketKeys?.stop();
    this.log.info('stopped');
  }
}

function sameBinding(a: Listener, b: Listener): boolean {
  if (a.protocol !== b.protocol || a.tls !== b.tls || a.listen.length !== b.listen.length) return false;
  return a.listen.every((x, i) => x.host === b.listen[i]?.host && x.port === b.listen[i]?.port);
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
