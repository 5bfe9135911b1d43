import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

const LOG_TS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../src/core/log.ts');

/** Runs a snippet with createLogger in a child process (stdout is the log). */
function child(body: string): { status: number | null; lines: Record<string, unknown>[] } {
  const code = `import { createLogger } from ${JSON.stringify(LOG_TS)};\n${body}`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', code], { encoding: 'utf8', timeout: 20_000 });
  assert.equal(r.stderr, '', r.stderr);
  return { status: r.status, lines: r.stdout.split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>) };
}

test('info level: lines gathered for batching are all written when the process exits right after a fatal one', () => {
  const r = child(`const log = createLogger('info');
for (let i = 0; i < 5; i++) log.info({ i }, 'session end');
log.fatal('uncaught exception');
log.flush();
process.exit(70);`);
  assert.equal(r.status, 70);
  assert.deepEqual(
    r.lines.map((l) => l.msg),
    ['session end', 'session end', 'session end', 'session end', 'session end', 'uncaught exception'],
  );
});

test('info level: a lone line reaches the output without an exit (periodic flush)', () => {
  const r = child(`const log = createLogger('info');
log.info('mailgate ready');
// stdout is a pipe here; wait until the line has been written, then leave without flushing.
setTimeout(() => process.kill(process.pid, 'SIGKILL'), 1500);`);
  assert.equal(r.status, null, 'killed');
  assert.deepEqual(
    r.lines.map((l) => l.msg),
    ['mailgate ready'],
  );
});

test('debug level: every line is written at once, so a reader sees it without waiting', () => {
  const r = child(`const log = createLogger('debug');
log.debug('one');
// Killed well before the 100 ms periodic flush that batching would wait for.
setTimeout(() => process.kill(process.pid, 'SIGKILL'), 60);`);
  assert.deepEqual(
    r.lines.map((l) => l.msg),
    ['one'],
  );
});
