/**
 * The serving part: the listeners and sessions of one process, and the
 * policy decisions they ask for. It runs inside the gateway's own process
 * (`workers: 1`, assembled by src/main.ts) or inside each worker
 * (src/worker.ts). It reads no file: its config arrives parsed and checked,
 * with what the config's policy files hold; its certificates, policy state
 * and ACME answers are handed in by whoever owns them.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { CapabilityCache } from './backend/capabilities.ts';
import { BackendPools, type HealthView } from './backend/pools.ts';
import type { Config, Listener } from './config/load.ts';
import { errorMessage } from './core/errors.ts';
import type { Logger } from './core/log.ts';
import { discoveryEndpoints } from './discovery/endpoints.ts';
import type { TlsReportOutcome } from './discovery/tlsrpt.ts';
import { WellKnownRegistry } from './http/well-known.ts';
import { startHttpListener } from './listeners/http-listener.ts';
import { startMailListener } from './listeners/mail-listener.ts';
import type { ListenerDeps, ListenerHandle, ReloadResult } from './listeners/types.ts';
import { PolicyEngine, type Policy } from './policy/engine.ts';
import type { PolicyFiles } from './policy/files.ts';
import type { PolicyState } from './policy/state.ts';
import { imapProtocol } from './protocols/imap.ts';
import { pop3Protocol } from './protocols/pop3.ts';
import { smtpProtocol } from './protocols/smtp.ts';
import type { ProtocolModule } from './protocols/types.ts';
import type { SessionRegistry } from './session/registry.ts';
import type { CertStore } from './tls/cert-store.ts';

const MODULES: Record<'imap' | 'pop3' | 'smtp', ProtocolModule> = {
  imap: imapProtocol,
  pop3: pop3Protocol,
  smtp: smtpProtocol,
};

/** What the serving part is handed, once, by the process that runs it. */
export interface ServingParts {
  /** Every session registers here (the control socket reads it, or a worker's forwarder). */
  registry: SessionRegistry;
  certs: CertStore;
  /** Counters, bans and session counts; outlives every reload. */
  policyState: PolicyState;
  /** HTTP-01 answers for plain http listeners: the runtime's ACME, here or through the primary. */
  http01: (token: string) => string | undefined;
  /** A worker binds with SO_REUSEPORT beside the other workers. */
  sharedPorts: boolean;
  /** A TLS report posted to the gateway (discovery.tls_rpt): the runtime counts it, here or through the primary. */
  onTlsReport: (r: TlsReportOutcome) => void;
  log: Logger;
  /** The runtime's active checks of pool members (its HealthChecker, or a worker's copy of its results). */
  backendHealth?: HealthView;
  /** A session could not connect to a pool member (the runtime checks it again at once). */
  backendFailed?: (key: string) => void;
}

interface Running {
  listener: Listener;
  handle: ListenerHandle;
}

export class Serving {
  private config: Config;
  private policy: Policy;
  private readonly parts: ServingParts;
  private readonly capabilities: CapabilityCache;
  /** The endpoints the https listeners answer themselves (discovery: autoconfig, MTA-STS, ...), rebuilt at each reload. */
  private readonly wellKnown = new WellKnownRegistry();
  private readonly pools: BackendPools;
  private readonly running = new Map<string, Running>();
  private stopping: Promise<void> | undefined;

  private constructor(config: Config, policy: Policy, parts: ServingParts) {
    this.config = config;
    this.policy = policy;
    this.parts = parts;
    this.capabilities = new CapabilityCache(config.hostname, parts.log);
    this.pools = new BackendPools(parts.backendHealth ?? { get: () => undefined }, parts.backendFailed);
    this.wellKnown.replaceWith(this.endpoints(config));
  }

  private endpoints(config: Config): WellKnownRegistry {
    const { certs, onTlsReport, log } = this.parts;
    return discoveryEndpoints(config, { certs, onTlsReport, log });
  }

  /** Builds the policy and starts every listener; a partial start is undone before the error goes up. */
  static async start(config: Config, files: PolicyFiles, parts: ServingParts): Promise<Serving> {
    const serving = new Serving(config, new PolicyEngine(config, files, parts.policyState, parts.log), parts);
    try {
      for (const l of config.listeners) await serving.startListener(l);
    } catch (err) {
      await serving.stop(0);
      throw err;
    }
    return serving;
  }

  /** Bound addresses per listener name (real ports when 0 was configured). */
  addresses(): Record<string, readonly string[]> {
    return Object.fromEntries([...this.running].map(([name, r]) => [name, r.handle.addresses]));
  }

  /**
   * Takes a checked config: new sessions get the new policy; listeners whose
   * protocol, TLS mode and addresses are unchanged keep their sockets and
   * take the new settings, others are started or stopped. Live sessions are
   * never touched. The caller runs one reload at a time.
   */
  async reload(next: Config, files: PolicyFiles): Promise<ReloadResult> {
    const result: ReloadResult = { ok: false, started: [], stopped: [], updated: [] };
    const log = this.parts.log;
    try {
      this.policy = new PolicyEngine(next, files, this.parts.policyState, log);
    } catch (err) {
      result.error = errorMessage(err);
      log.error({ err: result.error }, 'reload refused, keeping the running configuration');
      return result;
    }
    this.capabilities.clear();
    this.wellKnown.replaceWith(this.endpoints(next));
    this.config = next;
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
      log.error({ err: result.error }, 'reload could not start a listener; the others run with the new configuration');
      return result;
    }
    result.ok = true;
    return result;
  }

  /**
   * Stops accepting, lets live sessions finish for up to `drainMs`, then ends
   * the rest with their protocol's goodbye. Safe to call twice.
   */
  stop(drainMs: number): Promise<void> {
    this.stopping ??= this.doStop(drainMs);
    return this.stopping;
  }

  private async doStop(drainMs: number): Promise<void> {
    const { registry, log } = this.parts;
    await Promise.all([...this.running.values()].map((r) => r.handle.close()));
    registry.drainAll();
    const deadline = Date.now() + drainMs;
    while (registry.size > 0 && Date.now() < deadline) await sleep(Math.min(100, deadline - Date.now()));
    if (registry.size > 0) {
      log.info({ sessions: registry.size }, 'drain deadline reached, closing remaining sessions');
      registry.killAll('shutdown');
      const hard = Date.now() + 3000;
      while (registry.size > 0 && Date.now() < hard) await sleep(50);
    }
  }

  private deps(): ListenerDeps {
    const { certs, registry, log, sharedPorts } = this.parts;
    return {
      hostname: this.config.hostname,
      certs,
      registry,
      policy: () => this.policy,
      log,
      minVersion: this.config.tls.min_version,
      sharedPorts,
      pools: this.pools,
    };
  }

  private async startListener(l: Listener): Promise<void> {
    const handle =
      l.protocol === 'http'
        ? await startHttpListener(l, { ...this.deps(), acmeHttp01: this.parts.http01, wellKnown: this.wellKnown })
        : await startMailListener(l, MODULES[l.protocol], { ...this.deps(), capabilities: this.capabilities });
    this.running.set(l.name, { listener: l, handle });
  }
}

function sameBinding(a: Listener, b: Listener): boolean {
  if (a.protocol !== b.protocol || a.tls !== b.tls || a.listen.length !== b.listen.length) return false;
  return a.listen.every((x, i) => x.host === b.listen[i]?.host && x.port === b.listen[i]?.port);
}
