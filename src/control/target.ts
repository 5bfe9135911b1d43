/**
 * What the control socket and the metrics endpoint need from the running
 * gateway. The runtime (src/main.ts) implements it; unit tests use a small fake.
 */
import type { HealthView } from '../backend/pools.ts';
import type { Config } from '../config/load.ts';
import type { TlsReportLog } from '../discovery/tlsrpt.ts';
import type { SessionRegistry } from '../session/registry.ts';
import type { CertInfo, CertStore } from '../tls/cert-store.ts';
import type { Ban, CertRenewal, ReloadOutcome, WorkerStatus } from './protocol.ts';

export type { Ban } from './protocol.ts';

/** Who a ban stops: an address or CIDR range (`ip`), a user everywhere (`user`), or a user from one address (both). */
export interface BanTarget {
  ip?: string;
  user?: string;
}

/**
 * The ban list's admin side, provided by the policy engine. `ban` takes an
 * address or range (a string) or a target, replaces an existing ban of the
 * same target and returns what it bans (a user name may be banned under
 * several keys, see username_format); `unban` lifts the bans of a target, or
 * one ban by its id, and answers whether one was removed. `covers` (optional;
 * without it a ban ends sessions by address) says whether a live session is
 * one the target stops. `onChange` (optional) lets bans made by the engine
 * itself (too many failed logins) reach the dashboard as events.
 */
export interface BanAdmin {
  list(): Ban[];
  ban(target: string | BanTarget, seconds: number, reason: string): Ban[] | void;
  unban(target: string | BanTarget | { id: string }): boolean;
  covers?(target: BanTarget, ip: string, user: string | null): boolean;
  onChange?(listener: (change: { kind: 'banned'; ban: Ban } | { kind: 'unbanned'; ip: string | null; id?: string; user?: string | null }) => void): () => void;
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
  /** TLS reports taken (discovery.tls_rpt); absent in a gateway that has no such part. */
  readonly tlsReports?: TlsReportLog;
  /** The ACME part's renewal state of a certificate, when it manages it. */
  certRenewal?(info: CertInfo): CertRenewal | null;
  /** The active checks of backend pool members (src/backend/health.ts). */
  readonly health?: HealthView;
}
