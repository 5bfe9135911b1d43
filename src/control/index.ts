/**
 * The gateway's runtime window: counters, the control socket and the metrics
 * endpoint, started and stopped together by the runtime (src/main.ts).
 */
import type { Logger } from '../core/log.ts';
import { GatewayMetrics, MetricsServer } from './metrics.ts';
import { ControlServer, controlSocketPath, resolveGroup } from './server.ts';
import { GatewayStats } from './stats.ts';
import type { ControlTarget } from './target.ts';

export interface ControlPlane {
  readonly stats: GatewayStats;
  /** Absent when control.enabled is false. */
  readonly control: ControlServer | undefined;
  /** Absent unless metrics.listen is set. */
  readonly metrics: MetricsServer | undefined;
  /** Closes the socket and the metrics endpoint; safe to call twice. */
  close(): Promise<void>;
}

export async function startControlPlane(target: ControlTarget, log: Logger): Promise<ControlPlane> {
  const config = target.currentConfig;
  const stats = new GatewayStats(target.registry, (l) => target.onReload(l));
  let control: ControlServer | undefined;
  let metrics: MetricsServer | undefined;
  let closing: Promise<void> | undefined;
  // The socket and the endpoint stay as started: say so when a reload asks for other ones.
  const started = JSON.stringify([config.control, config.metrics]);
  const offReload = target.onReload((r) => {
    if (r.ok && JSON.stringify([target.currentConfig.control, target.currentConfig.metrics]) !== started) {
      log.warn('control/metrics settings changed: they take effect at the next restart');
    }
  });
  const close = () => {
    closing ??= (async () => {
      offReload();
      await metrics?.close();
      await control?.close();
      stats.close();
    })();
    return closing;
  };
  try {
    if (config.control.enabled) {
      control = await ControlServer.start(
        target,
        stats,
        {
          socketPath: controlSocketPath(config),
          mode: config.control.mode,
          gid: config.control.group === undefined ? undefined : resolveGroup(config.control.group),
        },
        log.child({ part: 'control' }),
      );
    }
    if (config.metrics.listen) {
      const c = control;
      const families = new GatewayMetrics(target, stats, { controlClients: () => c?.clientCount ?? 0, controlDropped: () => c?.droppedClientCount ?? 0 });
      metrics = await MetricsServer.start(config.metrics.listen, () => families.text(), log.child({ part: 'metrics' }));
    }
  } catch (err) {
    await close();
    throw err;
  }
  return {
    stats,
    get control() {
      return control;
    },
    get metrics() {
      return metrics;
    },
    close,
  };
}
