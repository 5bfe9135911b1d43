/**
 * The composition root: load the config, build the parts, start the
 * listeners; reload on demand; stop with a drain. Nothing else wires parts
 * together.
 */
import { CapabilityCache } from './backend/capabilities.ts';
import { loadConfigFile, type Config, type Listener } from './config/load.ts';
import { errorMessage } from './core/errors.ts';
import type { Logger } from './core/log.ts';
import { startHttpListener } from './listeners/http-listener.ts';
import { startMailListener } from './listeners/mail-listener.ts';
import type { ListenerDeps, ListenerHandle } from './listeners/types.ts';
import { PassthroughPolicy, type Policy } from './policy/engine.ts';
import { imapProtocol } from './protocols/imap.ts';
import { pop3Protocol } from './protocols/pop3.ts';
import { smtpProtocol } from './protocols/smtp.ts';
import type { ProtocolModule } from './protocols/types.ts';
import { SessionRegistry } from './session/registry.ts';
import { buildCertStore } from './tls/bootstrap.ts';
import type { CertStore } from './tls/cert-store.ts';

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

export class Gateway {
  readonly registry = new SessionRegistry();
  private config: Config;
  private readonly log: Logger;
  private certs: CertStore;
  private policy: Policy;
  private readonly capabilities: CapabilityCache;
  private readonly running = new Map<string, Running>();
  private stopping: Promise<void> | undefined;
  readonly startedAt = Date.now();

  private constructor(config: Config, certs: CertStore, log: Logger) {
    this.config = config;
    this.certs = certs;
    this.log = log;
    this.policy = new PassthroughPolicy();
    this.capabilities = new CapabilityCache(config.hostname, log);
  }

  static async start(config: Config, log: Logger): Promise<Gateway> {
    for (const w of config.warnings) log.warn({ file: config.file }, w);
    const certs = await buildCertStore(config, log);
    const gw = new Gateway(config, certs, log);
    try {
      for (const l of config.listeners) await gw.startListener(l);
    } catch (err) {
      await gw.stop(0);
      throw err;
    }
    log.info({ file: config.file, listeners: config.listeners.length }, 'mailgate ready');
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
    };
  }

  private async startListener(l: Listener): Promise<void> {
    const handle =
      l.protocol === 'http'
        ? await startHttpListener(l, this.deps())
        : await startMailListener(l, MODULES[l.protocol], { ...this.deps(), capabilities: this.capabilities });
    this.running.set(l.name, { listener: l, handle });
  }

  /**
   * Re-reads the config file. An invalid file changes nothing. Listeners whose
   * protocol and addresses are unchanged keep their sockets and take the new
   * settings for new sessions; others are started or stopped. Live sessions
   * are never touched.
   */
  async reload(): Promise<ReloadResult> {
    const result: ReloadResult = { ok: false, started: [], stopped: [], updated: [] };
    let next: Config;
    let certs: CertStore;
    try {
      next = loadConfigFile(this.config.file);
      certs = await buildCertStore(next, this.log);
    } catch (err) {
      result.error = errorMessage(err);
      this.log.error({ file: this.config.file, err: result.error }, 'reload refused, keeping the running configuration');
      return result;
    }
    for (const w of next.warnings) this.log.warn({ file: next.file }, w);
    this.certs.replaceWith(certs);
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
