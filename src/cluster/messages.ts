/**
 * The lifecycle messages between the primary and a worker (the `t` values
 * without a part prefix; see link.ts). Policy and registry messages are
 * defined by their parts (policy-link.ts, registry-link.ts).
 */
import type { HealthSnapshot } from '../backend/health.ts';
import type { Config } from '../config/load.ts';
import type { TlsReportOutcome } from '../discovery/tlsrpt.ts';
import type { ReloadResult } from '../listeners/types.ts';
import type { PolicyFiles } from '../policy/files.ts';
import type { StoreConfig } from '../policy/state.ts';
import type { CertSnapshot } from '../tls/cert-store.ts';
import type { PolicySync } from './policy-link.ts';

/** Concrete ports per listener name, in `listen:` order: what every worker binds (port 0 resolved once, by the primary). */
export type PortPlan = Record<string, number[]>;

export interface WorkerPlan {
  ports: PortPlan;
  /** How many workers share the listeners: each enforces its share of a listener's max_connections. */
  workers: number;
}

/**
 * The config a worker serves, as data: the primary's parsed and checked copy
 * (with this worker's ports and share of the limits, ports.ts) and what its
 * policy files hold. A worker reads no file.
 */
export interface WorkerSettings {
  config: Config;
  files: PolicyFiles;
}

export type ToWorker =
  | {
      t: 'start';
      index: number;
      settings: WorkerSettings;
      certs: CertSnapshot;
      /** base64 of the 48-byte session ticket keys. */
      ticketKeys: string;
      /** Pending HTTP-01 answers (token → key authorization). */
      tokens: [string, string][];
      /** The policy part's start-up state (policy-link.ts). */
      policy: PolicySync;
      /** The policy store the primary started with: a reload changes it only at the next restart, for every process alike. */
      store: StoreConfig;
      /** The primary's health checks of pool members, as they stand. */
      health: HealthSnapshot;
    }
  /** The primary's health checks of pool members, after each check. */
  | { t: 'health'; health: HealthSnapshot }
  | { t: 'certs'; certs: CertSnapshot }
  | { t: 'ticket-keys'; ticketKeys: string }
  | { t: 'tokens'; tokens: [string, string][] }
  | { t: 'reload'; id: number; settings: WorkerSettings }
  | { t: 'stop'; drainMs: number }
  /** Heartbeat: answered from the worker's event loop, so a stuck loop goes unanswered. */
  | { t: 'ping'; seq: number };

export type FromWorker =
  | { t: 'ready'; addresses: Record<string, readonly string[]> }
  | { t: 'start-failed'; error: string }
  | { t: 'reloaded'; id: number; result: ReloadResult }
  | { t: 'stopped' }
  | { t: 'pong'; seq: number }
  /** A TLS report a worker took (discovery.tls_rpt): the primary counts it. */
  | { t: 'tlsrpt'; report: TlsReportOutcome }
  /** A session of this worker could not connect to a pool member (targetKey): the primary checks it at once. */
  | { t: 'backend-failed'; key: string };

const TO_WORKER = new Set(['start', 'certs', 'ticket-keys', 'tokens', 'reload', 'stop', 'ping', 'health']);
const FROM_WORKER = new Set(['ready', 'start-failed', 'reloaded', 'stopped', 'pong', 'tlsrpt', 'backend-failed']);

export function isToWorker(m: { t: string }): m is ToWorker {
  return TO_WORKER.has(m.t);
}

export function isFromWorker(m: { t: string }): m is FromWorker {
  return FROM_WORKER.has(m.t);
}
