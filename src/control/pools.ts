/**
 * Backend pools as `status`, the dashboard and the metrics show them: per
 * listener, each member of its pool (and of list routes that apply to it)
 * with the runtime's last active check and the listener's live sessions on it.
 */
import type { HealthView } from '../backend/pools.ts';
import { poolMembers, targetKey } from '../backend/health.ts';
import type { Config } from '../config/load.ts';
import { formatHostPort } from '../net/address.ts';
import type { SessionRecord } from '../session/record.ts';
import type { PoolMemberStatus } from './protocol.ts';

/** Every listener's pool, by listener name; listeners without one are absent. */
export function poolStatus(config: Config, health: HealthView | undefined, sessions: readonly SessionRecord[]): Map<string, PoolMemberStatus[]> {
  const live = new Map<string, number>();
  for (const r of sessions) if (r.backend) live.set(`${r.listener}|${r.backend}`, (live.get(`${r.listener}|${r.backend}`) ?? 0) + 1);
  const out = new Map<string, PoolMemberStatus[]>();
  for (const l of config.listeners) {
    const members = poolMembers(config, l);
    if (members.length === 0 || l.protocol === 'http') continue;
    out.set(
      l.name,
      members.map((b) => {
        const h = health?.get(targetKey(l.protocol, b, l.proxy_protocol));
        const backend = formatHostPort(b);
        return {
          backend,
          up: h?.up ?? true,
          checkedAt: h?.checkedAt ?? null,
          since: h?.since ?? null,
          latencyMs: h?.latencyMs ?? null,
          error: h?.error ?? null,
          sessions: live.get(`${l.name}|${backend}`) ?? 0,
        };
      }),
    );
  }
  return out;
}
