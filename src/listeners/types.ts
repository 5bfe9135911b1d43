import type { BackendPools } from '../backend/pools.ts';
import type { Logger } from '../core/log.ts';
import type { Listener } from '../config/load.ts';
import type { Policy } from '../policy/engine.ts';
import type { SessionRegistry } from '../session/registry.ts';
import type { CertStore } from '../tls/cert-store.ts';

/** What every listener is built from, handed in by the serving part (src/serving.ts). */
export interface ListenerDeps {
  hostname: string;
  certs: CertStore;
  registry: SessionRegistry;
  /** Read at each new connection, so a reload's new policy applies to new sessions only. */
  policy: () => Policy;
  log: Logger;
  minVersion: 'TLSv1.2' | 'TLSv1.3';
  /** A worker process: bind with SO_REUSEPORT beside the other workers (src/cluster). */
  sharedPorts?: boolean;
  /** Backend pools: which member a new mail session goes to (src/backend/pools.ts). */
  pools?: BackendPools;
}

/** What a reload did to the listeners: started, stopped, updated in place; `error` when it failed. */
export interface ReloadResult {
  ok: boolean;
  error?: string;
  started: string[];
  stopped: string[];
  updated: string[];
}

export interface ListenerHandle {
  readonly name: string;
  /** The addresses actually bound ("127.0.0.1:993", "[::]:993"), with real ports when 0 was asked. */
  readonly addresses: readonly string[];
  /** Reload: sessions accepted from now on use these settings; live ones keep theirs. */
  update(listener: Listener): void;
  /** Stop accepting. Live sessions are not touched (the registry drains them). Safe to call twice. */
  close(): Promise<void>;
}
