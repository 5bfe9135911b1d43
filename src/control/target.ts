/**
 * What the control socket and the metrics endpoint need from the running
 * gateway. The runtime (src/main.ts) implements it; unit tests use a small fake.
 */
import type { HealthView } from '../backend/pools.ts';
import type { Config } from '../config/load.ts';
import type { SessionRegistry } from '../session/registry.ts';
import type { CertInfo, CertStore } from '../tls/cert-store.ts';
import type { Ban, CertRenewal, ReloadOutcome, WorkerStatus } from './protocol.ts';

export type { Ban } from './protocol.ts';

/**
 * The ban list's admin side, provided by the policy engine. `ban` replaces an
 * existing ban of the same address; `unban` answers whether one was removed.
 * `onChange` (optional) lets bans made by the engine itself (too many failed
 * logins) reach the dashboard as events.
 */
export interface BanAdmin {
  list(): Ban[];
  ban(ip: string, seconds: number, reason: string): void;
  unban(ip: string): boolean;
  onChange?(listener: (change: { kind: 'banned'; ban: Ban } | { kind: 'unbanned'; ip: string }) => void): () => void;
}

export interface ControlTarget {
  readonly registry: SessionRegistry;
  readonly certificates: CertStore;
  readonly currentConfig: Config;
  readonly startedAt: number;
  /** Bound addresses of the running listeners. */
  addresses(): Record<string, readonly string[]>;
  reload(): Promise<ReloadOutcome>;
  /** Called after every reload, whoever asked for it (SIGHUP or the socket). */
  onReload(listener: (result: ReloadOutcome) => void): () => void;
  /** The policy engine's bans, when it has them. */
  readonly bans: BanAdmin | undefined;
  /**
   * Brings the registry's records up to date before a snapshot, when they are
   * mirrored from other processes (a cluster primary); absent when they are live.
   */
  refresh?(): Promise<void>;
  /** Worker processes, when this is a cluster primary. */
  workers?(): WorkerStatus[];
  /** The ACME part's renewal state of a certificate, when it manages it. */
  certRenewal?(info: CertInfo): CertRenewal | null;
  /** The active checks of backend pool members (src/backend/health.ts). */
  readonly health?: HealthView;
}
