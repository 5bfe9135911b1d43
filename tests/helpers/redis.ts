/**
 * A real redis-server for the tests that share policy state or the ACME
 * ordering lock: its own temp folder, a free loopback port, no persistence.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { freePort, makeTempDir, removeTempDir, spawnServer, waitUntilReady, type ManagedProcess } from './proc.ts';

export const REDIS_SERVER = '/usr/bin/redis-server';

/** false when redis-server is there, else why not (the prerequisite tests assert it). */
export const redisMissing: string | false = existsSync(REDIS_SERVER) ? false : `${REDIS_SERVER} is not installed (.ci/install-deps.sh installs it)`;

export interface RedisServer {
  port: number;
  url: string;
  proc: ManagedProcess;
  /** Stops the server (SIGTERM to its group, SIGKILL after a grace) and removes its folder; safe to call twice. */
  stop(): Promise<void>;
}

export async function startRedis(): Promise<RedisServer> {
  const dir = await makeTempDir('redis');
  const port = await freePort();
  const proc = spawnServer(
    'redis-server',
    REDIS_SERVER,
    ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--save', '', '--appendonly', 'no', '--protected-mode', 'yes'],
    { cwd: dir, outputFile: join(dir, 'redis.log') },
  );
  try {
    await waitUntilReady('redis-server', [proc], { port, request: 'PING\r\n', expect: /\+PONG\r\n/ }, async () => '', 10_000);
  } catch (err) {
    await proc.stop();
    await removeTempDir(dir);
    throw err;
  }
  return {
    port,
    url: `redis://127.0.0.1:${port}/0`,
    proc,
    async stop() {
      await proc.stop();
      await removeTempDir(dir);
    },
  };
}
