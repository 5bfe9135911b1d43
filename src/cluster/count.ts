import { availableParallelism } from 'node:os';
import type { Config } from '../config/load.ts';

/** Worker processes a config asks for: `auto` is one per core the process may use. */
export function workerCount(config: Pick<Config, 'workers'>): number {
  return config.workers === 'auto' ? Math.max(1, availableParallelism()) : config.workers;
}
