/**
 * The one place the gateway is assembled. The runtime composed here owns
 * what exists once per gateway: the config (read and checked here, at start
 * and at every reload), certificates and session ticket keys, ACME, the
 * policy state, the control socket and metrics. Listeners and sessions are
 * the serving part (src/serving.ts): in this process with `workers: 1`, or in
 * worker processes (src/cluster/pool.ts starts them, src/worker.ts is where
 * each one starts), which get the checked config as data.
 *
 * `runGateway` is the process around it: signals, systemd readiness, the
 * last word on an uncaught exception.
 */
import { Http01Answers } from './acme/http01.ts';
import { HealthChecker, healthTargets } from './backend/health.ts';
import { AcmeManager } from './acme/manager.ts';
import { loadStoredAcmeCertificates } from './acme/stored.ts';
import { workerCount } from './cluster/count.ts';
import { WorkerPool } from './cluster/pool.ts';
import { loadConfigFile, type Config } from './config/load.ts';
import { registerAcmeCommands } from './control/acme.ts';
import { registerDnsCommand } from './control/dns.ts';
import { PolicyAdmin } from './control/bans.ts';
import { startControlPlane, type ControlPlane } from './control/index.ts';
import type { WorkerStatus } from './control/protocol.ts';
import type { BanAdmin } from './control/target.ts';
import { errorMessage } from './core/errors.ts';
import { createLogger, type Logger } from './core/log.ts';
import { SdNotify } from './core/sd-notify.ts';
import { TlsReportLog } from './discovery/tlsrpt.ts';
import type { ReloadResult } from './listeners/types.ts';
import { checkPolicy } from './policy/engine.ts';
import { readPolicyFiles, type PolicyFiles } from './policy/files.ts';
import { PolicyState } from './policy/state.ts';
import { Serving, type ServingParts } from './serving.ts';
import { SessionRegistry } from './session/registry.ts';
import { buildCertStore } from './tls/bootstrap.ts';
import type { CertInfo, CertStore } from './tls/cert-store.ts';
import { TicketKeys } from './tls/ticket-keys.ts';

/** Where listeners and sessions run: in this process (InProcess), or in worker processes (WorkerPool). */
interface ServingSide {
  /** The policy state the runtime answers the control socket from. */
  readonly policyState: PolicyState;
  start(): Promise<void>;
  addresses(): Record<string, readonly string[]>;
  /** Checks what only the serving side can (the workers' ports) before a reload changes anything. */
  prepare(next: Config): Promise<void>;
  reload(next: Config, files: PolicyFiles): Promise<ReloadResult & { workers?: number }>;
  stop(drainMs: number): Promise<void>;
  /** Worker processes only: mirrored sessions brought up to date, and the workers' states. */
  refresh?(): Promise<void>;
  workers?(): WorkerStatus[];
}

interface RuntimeParts {
  registry: SessionRegistry;
  tlsReports: TlsReportLog;
  health: HealthChecker;
  certs: CertStore;
  ticketKeys: TicketKeys;
  http01: Http01Answers;
  side: ServingSide;
}

export class Runtime {
  readonly registry: SessionRegistry;
  /** TLS reports the serving part took (discovery.tls_rpt), counted for metrics and the dashboard. */
  readonly tlsReports: TlsReportLog;
  readonly startedAt = Date.now();
  readonly refresh: (() => Promise<void>) | undefined;
  readonly workers: (() => WorkerStatus[]) | undefined;
  private config: Config;
  private readonly log: Logger;
  private readonly certs: CertStore;
  private readonly ticketKeys: TicketKeys;
  private readonly http01: Http01Answers;
  private readonly side: ServingSide;
  /** Active checks of every pool member: once per gateway, whatever the number of workers (src/backend/health.ts). */
  readonly health: HealthChecker;
  /** The policy store and worker count as started: a reload that changes them takes effect at the next restart. */
  private readonly started: Pick<Config, 'policy_store' | 'workers'>;
  /** The control socket's view of bans (an adapter over the policy state, control/bans.ts). */
  private readonly banView: BanAdmin;
  private controlPlane: ControlPlane | undefined;
  private acme: AcmeManager | undefined;
  private watchAcme: ((acme: AcmeManager | undefined) => void) | undefined;
  private reloading: Promise<unknown> = Promise.resolve();
  private readonly reloadListeners = new Set<(result: ReloadResult) => void>();
  private stopping: Promise<void> | undefined;

  private constructor(config: Config, parts: RuntimeParts, log: Logger) {
    this.config = config;
    this.registry = parts.registry;
    this.tlsReports = parts.tlsReports;
    this.certs = parts.certs;
    this.ticketKeys = parts.ticketKeys;
    this.http01 = parts.http01;
    this.side = parts.side;
    this.health = parts.health;
    this.log = log;
    this.started = { policy_store: config.policy_store, workers: config.workers };
    this.refresh = this.side.refresh?.bind(this.side);
    this.workers = this.side.workers?.bind(this.side);
    this.banView = new PolicyAdmin(this.side.policyState, () => this.config, log).banList();
  }

  /**
   * Reads the policy files, builds the certificates and the policy state,
   * opens the control socket, starts ACME and the serving side. A partial
   * start is undone before the error goes up.
   */
  static async start(config: Config, log: Logger): Promise<Runtime> {
    for (const w of config.warnings) log.warn({ file: config.file }, w);
    const files = readPolicyFiles(config);
    checkPolicy(config, files);
    const count = workerCount(config);
    const registry = new SessionRegistry();
    const tlsReports = new TlsReportLog();
    const onTlsReport = tlsReports.record.bind(tlsReports);
    const http01 = new Http01Answers();
    const ticketKeys = new TicketKeys();
    const health = new HealthChecker(log);
    let certs: CertStore;
    let side: ServingSide;
    try {
      certs = await loadCertificates(config, log, ticketKeys.current);
      health.setTargets(healthTargets(config));
      side =
        count > 1
          ? await WorkerPool.create(config, files, { count, registry, certs, ticketKeys, http01, onTlsReport, log, health })
          : await InProcess.create(config, files, {
              registry,
              certs,
              http01: http01.answer,
              sharedPorts: false,
              onTlsReport,
              log,
              backendHealth: health,
              backendFailed: (key) => health.recheck(key),
            });
    } catch (err) {
      ticketKeys.stop();
      health.stop();
      throw err;
    }
    const rt = new Runtime(config, { registry, tlsReports, health, certs, ticketKeys, http01, side }, log);
    try {
      ticketKeys.onRotate((keys) => certs.setTicketKeys(keys));
      rt.controlPlane = await startControlPlane(rt, log);
      rt.acme = AcmeManager.fromConfig(config, certs, log);
      const control = rt.controlPlane.control;
      if (control) {
        rt.watchAcme = registerAcmeCommands(control, () => rt.acme, certs);
        registerDnsCommand(control, {
          config: () => rt.config,
          certs,
          acmeManages: (name) => rt.acme?.manages(name) ?? false,
          nextKey: (name) => rt.acme?.nextKey(name),
        });
      }
      rt.followAcme();
      await side.start();
      await rt.acme?.start();
    } catch (err) {
      await rt.stop(0);
      throw err;
    }
    log.info({ file: config.file, listeners: config.listeners.length, ...(count > 1 ? { workers: count } : {}) }, 'mailgate ready');
    return rt;
  }

  get currentConfig(): Config {
    return this.config;
  }

  get certificates(): CertStore {
    return this.certs;
  }

  get bans(): BanAdmin {
    return this.banView;
  }

  addresses(): Record<string, readonly string[]> {
    return this.side.addresses();
  }

  /** Renewal state of a served certificate for the control socket; null when ACME does not manage it. */
  certRenewal(info: CertInfo): { failing: boolean; lastError: string | null; nextAttemptAt: number | null } | null {
    return this.acme?.renewalFor(info) ?? null;
  }

  /** Called after every reload (SIGHUP or the control socket) with its result. */
  onReload(listener: (result: ReloadResult) => void): () => void {
    this.reloadListeners.add(listener);
    return () => this.reloadListeners.delete(listener);
  }

  /** Reloads run one after another: two SIGHUPs in a row must not start the same new listener twice. */
  reload(): Promise<ReloadResult> {
    const run = this.reloading.then(() => this.reloadOnce());
    this.reloading = run.catch(() => undefined);
    return run.then((result) => {
      for (const l of this.reloadListeners) l(result);
      return result;
    });
  }

  /**
   * Re-reads the config file and checks everything it names before anything
   * changes: an invalid file, an unreadable users or password file, an ACME
   * section that cannot work, a certificate that cannot be written, a port
   * another program holds: the reload is refused and nothing changes. Then
   * the serving side takes the new config; live sessions are never touched.
   */
  private async reloadOnce(): Promise<ReloadResult> {
    let next: Config;
    let files: PolicyFiles;
    let certs: CertStore;
    try {
      next = loadConfigFile(this.config.file);
      files = readPolicyFiles(next);
      // Rules, users and limits for new sessions (the serving side builds them); bans and counts stay (same policy state).
      checkPolicy(next, files);
      AcmeManager.check(next, this.log);
      certs = await loadCertificates(next, this.log, this.certs.currentTicketKeys);
      await this.side.prepare(next);
    } catch (err) {
      const error = errorMessage(err);
      this.log.error({ file: this.config.file, err: error }, 'reload refused, keeping the running configuration');
      return { ok: false, error, started: [], stopped: [], updated: [] };
    }
    // From here on the serving side gets this copy as data: what the file says later is the next reload's.
    this.log.debug({ file: next.file }, 'configuration checked; serving it');
    for (const w of next.warnings) this.log.warn({ file: next.file }, w);
    if (JSON.stringify(next.policy_store) !== JSON.stringify(this.started.policy_store)) {
      this.log.warn({ running: this.started.policy_store.type, configured: next.policy_store.type }, 'policy_store changes take effect at the next restart');
    }
    if (next.workers !== this.started.workers) this.log.warn({ running: workerCount(this.started), configured: next.workers }, 'workers changes take effect at the next restart');
    this.certs.replaceWith(certs);
    this.health.setTargets(healthTargets(next));
    const previous = this.config;
    this.config = next;
    const { workers, ...result } = await this.side.reload(next, files);
    await this.reloadAcme(next);
    if (result.ok) {
      this.log.info({ file: next.file, previous: previous.file, ...result, ...(workers === undefined ? {} : { workers }) }, 'configuration reloaded');
    }
    return result;
  }

  /** ACME starts, follows the new settings, or stops, after the serving side took the new config. */
  private async reloadAcme(next: Config): Promise<void> {
    const before = this.acme;
    const { acme, created } = await AcmeManager.afterReload(before, next, this.certs, this.log);
    this.acme = acme;
    if (acme === before) return;
    this.followAcme();
    if (created) await acme?.start();
  }

  private followAcme(): void {
    this.watchAcme?.(this.acme);
    this.http01.follow(this.acme);
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
    const workers = this.side.workers?.().filter((w) => w.state === 'ready' || w.state === 'starting').length;
    this.log.info({ sessions: this.registry.size, drainMs, ...(workers === undefined ? {} : { workers }) }, 'shutting down');
    await this.acme?.stop();
    await this.side.stop(drainMs);
    this.health.stop();
    this.http01.close();
    this.ticketKeys.stop();
    await this.controlPlane?.close();
    this.log.info('stopped');
  }
}

/** The serving part in this process, on the runtime's registry and a policy state of its own store. */
class InProcess implements ServingSide {
  readonly policyState: PolicyState;
  private readonly config: Config;
  private readonly files: PolicyFiles;
  private readonly parts: ServingParts;
  private serving: Serving | undefined;

  private constructor(config: Config, files: PolicyFiles, parts: ServingParts) {
    this.config = config;
    this.files = files;
    this.parts = parts;
    this.policyState = parts.policyState;
  }

  static async create(config: Config, files: PolicyFiles, parts: Omit<ServingParts, 'policyState'>): Promise<InProcess> {
    const policyState = await PolicyState.create({ store: config.policy_store, log: parts.log });
    return new InProcess(config, files, { ...parts, policyState });
  }

  async start(): Promise<void> {
    this.serving = await Serving.start(this.config, this.files, this.parts);
  }

  addresses(): Record<string, readonly string[]> {
    return this.serving?.addresses() ?? {};
  }

  async prepare(): Promise<void> {}

  reload(next: Config, files: PolicyFiles): Promise<ReloadResult> {
    if (!this.serving) throw new Error('reload before the serving part started');
    return this.serving.reload(next, files);
  }

  async stop(drainMs: number): Promise<void> {
    await this.serving?.stop(drainMs);
    await this.policyState.close();
  }
}

/** The certificates a config asks for: files or a self-signed one (tls/), and what ACME obtained earlier. */
async function loadCertificates(config: Config, log: Logger, ticketKeys: Buffer | undefined): Promise<CertStore> {
  const store = await buildCertStore(config, log, ticketKeys);
  // The self-signed one stays the fallback until ACME's certificates exist.
  await loadStoredAcmeCertificates(config, store, log);
  return store;
}

/**
 * `mailgate run`: the gateway in this process until SIGTERM or SIGINT, with
 * SIGHUP reloading and systemd told of each step. The exit code.
 */
export async function runGateway(config: Config): Promise<number> {
  const log = createLogger(process.env.MAILGATE_LOG_LEVEL ?? config.log.level);
  // systemd readiness (Type=notify): READY=1 only once every listener is bound; a no-op without $NOTIFY_SOCKET.
  const notify = new SdNotify({ onError: (err) => log.warn({ err: err.message }, 'systemd notification failed') });
  const workers = workerCount(config);
  // `ps` tells the roles apart (workers name themselves in src/worker.ts).
  if (workers > 1) process.title = `mailgate: primary (${workers} workers)`;
  let gateway: Runtime;
  try {
    gateway = await Runtime.start(config, log);
  } catch (err) {
    log.fatal({ err: errorMessage(err) }, 'start failed');
    log.flush();
    process.stderr.write(`mailgate: ${errorMessage(err)}\n`);
    return 1;
  }
  process.on('uncaughtException', (err) => {
    // A bug, not client input (that is handled where it is read): log it and let the supervisor restart us.
    log.fatal({ err: errorMessage(err), stack: err.stack }, 'uncaught exception');
    log.flush();
    process.exit(70);
  });
  // Every reload (SIGHUP or the control socket) ends with READY=1 and the status it left.
  gateway.onReload((r) => void notify.ready(r.ok ? servingStatus(gateway) : `reload failed, see the log: ${r.error ?? ''}`));
  process.on('SIGHUP', () => {
    log.info('SIGHUP: reloading');
    void notify.reloading('reloading configuration');
    gateway.reload().catch((err: unknown) => {
      log.error({ err: errorMessage(err) }, 'reload failed');
      void notify.ready('reload failed, see the log');
    });
  });
  const code = await new Promise<number>((resolve) => {
    const stop = (signal: string) => {
      log.info({ signal }, 'stopping');
      void notify.stopping(`draining ${gateway.registry.size} sessions`);
      gateway.stop().then(
        () => resolve(0),
        (err: unknown) => {
          log.error({ err: errorMessage(err) }, 'stop failed');
          resolve(1);
        },
      );
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
    // After the signal handlers: systemd may send SIGHUP or SIGTERM as soon as it sees READY=1.
    // Logs are written in batches; the start-up lines go out before the service counts as up.
    log.flush();
    void notify.ready(servingStatus(gateway));
  });
  await notify.flush();
  log.flush();
  return code;
}

function servingStatus(gateway: Runtime): string {
  const names = Object.keys(gateway.addresses());
  return `serving ${names.length} listeners: ${names.join(', ')}`;
}
