/**
 * Which pool member a new session goes to: the healthy member with the
 * fewest sessions in this process (ties in turn), then the others in case
 * every healthy one refuses the connection (failover happens before the
 * login is sent, so nothing is replayed twice). A session that cannot
 * connect marks its member down here at once (passive), until a check that
 * ended after the mark says it is up again, and asks for such a check.
 * A spliced session is never moved: this only orders new connections.
 *
 * Health comes from the runtime's HealthChecker (health.ts), directly in
 * one process, or as data through the primary in a worker.
 */
import type { HostPort } from '../net/address.ts';
import { targetKey, type HealthState } from './health.ts';

/** Where the active checks' results are read. */
export interface HealthView {
  get(key: string): HealthState | undefined;
}

export interface PoolMember {
  protocol: string;
  proxyProtocol: false | 'v1' | 'v2';
}

export class BackendPools {
  private readonly view: HealthView;
  private readonly onFailure: (key: string) => void;
  /** Sessions per member key (spliced ones, in this process). */
  private readonly counts = new Map<string, number>();
  /** Passive marks: when a connection to the member failed. */
  private readonly marks = new Map<string, number>();
  private turn = 0;

  constructor(view: HealthView, onFailure: (key: string) => void = () => undefined) {
    this.view = view;
    this.onFailure = onFailure;
  }

  /** True when the member may take new sessions: not down by the last check, and not marked since. */
  healthy(key: string): boolean {
    const h = this.view.get(key);
    const mark = this.marks.get(key);
    if (mark !== undefined) {
      if (h && h.up && h.checkedAt > mark) this.marks.delete(key);
      else return false;
    }
    return h?.up ?? true;
  }

  /** The member a new session would get now, without taking a turn (the capability probe's target). */
  peek(m: PoolMember, pool: readonly HostPort[]): HostPort | undefined {
    const turn = this.turn;
    const first = this.order(m, pool)[0];
    this.turn = turn;
    return first;
  }

  /** The members in the order to try them. */
  order(m: PoolMember, pool: readonly HostPort[]): HostPort[] {
    const rows = pool.map((backend, i) => {
      const key = targetKey(m.protocol, backend, m.proxyProtocol);
      return { backend, i, healthy: this.healthy(key), sessions: this.counts.get(key) ?? 0 };
    });
    const start = this.turn++ % pool.length;
    const rank = (i: number) => (i - start + pool.length) % pool.length;
    rows.sort((a, b) => Number(b.healthy) - Number(a.healthy) || a.sessions - b.sessions || rank(a.i) - rank(b.i));
    return rows.map((r) => r.backend);
  }

  /** A session was spliced to `backend`: counted until the returned release runs (once). */
  acquire(m: PoolMember, backend: HostPort): () => void {
    const key = targetKey(m.protocol, backend, m.proxyProtocol);
    this.counts.set(key, (this.counts.get(key) ?? 0) + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const n = (this.counts.get(key) ?? 1) - 1;
      if (n > 0) this.counts.set(key, n);
      else this.counts.delete(key);
    };
  }

  /** A connection to `backend` failed: no new sessions go there until a newer check says it is up. */
  failed(m: PoolMember, backend: HostPort): void {
    const key = targetKey(m.protocol, backend, m.proxyProtocol);
    this.marks.set(key, Date.now());
    this.onFailure(key);
  }

  sessions(m: PoolMember, backend: HostPort): number {
    return this.counts.get(targetKey(m.protocol, backend, m.proxyProtocol)) ?? 0;
  }
}

