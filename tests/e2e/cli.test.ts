/** The `mailgate` command as an admin meets it: check, run, bad configs. */
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { run } from './harness/clients.ts';

const BIN = fileURLToPath(new URL('../../bin/mailgate', import.meta.url));
const EXAMPLE = fileURLToPath(new URL('../../config/mailgate.yaml', import.meta.url));

test('mailgate check prints the effective listeners of the shipped config', async () => {
  const r = await run(BIN, ['check', '-c', EXAMPLE]);
  assert.equal(r.code, 0, r.stderr);
  for (const [name, port, backend] of [
    ['imaps', 993, 143],
    ['pop3s', 995, 110],
    ['smtps', 465, 25],
    ['submission', 587, 25],
    ['https', 443, 80],
  ] as const) {
    assert.match(r.stdout, new RegExp(`${name}\\s.*0\\.0\\.0\\.0:${port},\\[::\\]:${port} -> 127\\.0\\.0\\.1:${backend}`));
  }
  assert.equal(r.stderr, '');
});

test('mailgate check refuses a bad file with file:line:column, key path and exit code 2', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'mailgate-cli-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const file = join(dir, 'bad.yaml');
  await writeFile(file, 'listeners:\n  - name: imaps\n    protocol: imap\n    listen: "0.0.0.0:993"\n    tls: implicit\n    backend: 127.0.0.1:143\n    timeout: 5s\n');
  const r = await run(BIN, ['check', '-c', file]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, new RegExp(`${file.replace(/[.]/g, '\\.')}:7:5: listeners\\[0\\]\\.timeout: unknown key "timeout"`));
  const missing = await run(BIN, ['check', '-c', join(dir, 'nope.yaml')]);
  assert.equal(missing.code, 2);
  assert.match(missing.stderr, /nope\.yaml: ENOENT/);
});

test('mailgate check warns about an SMTP listener that could relay for anyone', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'mailgate-cli-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const file = join(dir, 'relay.yaml');
  await writeFile(file, 'listeners:\n  - name: mx\n    protocol: smtp\n    listen: "127.0.0.1:2525"\n    tls: starttls\n    backend: 127.0.0.1:25\n    auth: none\n    xclient: false\n');
  const r = await run(BIN, ['check', '-c', file]);
  assert.equal(r.code, 0);
  assert.match(r.stderr, /warning: listener "mx".*open relay/);
});

test('unknown verbs and options are usage errors', async () => {
  const r = await run(BIN, ['frobnicate']);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /unknown command "frobnicate"/);
  const o = await run(BIN, ['check', '--colour']);
  assert.equal(o.code, 2);
});

test('run with a port already in use fails at start with a clear message and exit 1', async (t) => {
  const net = await import('node:net');
  const blocker = net.createServer();
  await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', () => r()));
  const port = (blocker.address() as { port: number }).port;
  t.after(() => blocker.close());
  const dir = await mkdtemp(join(tmpdir(), 'mailgate-cli-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const file = join(dir, 'busy.yaml');
  await writeFile(file, `tls: { dir: ./certs }\ncontrol: { enabled: false }\nlisteners:\n  - name: imaps\n    protocol: imap\n    listen: "127.0.0.1:${port}"\n    tls: implicit\n    backend: 127.0.0.1:143\n`);
  const r = await run(BIN, ['run', '-c', file], { timeoutMs: 20_000 });
  assert.equal(r.code, 1);
  assert.match(r.stderr, new RegExp(`listener "imaps" cannot bind 127\\.0\\.0\\.1:${port}: .*EADDRINUSE`));
});
