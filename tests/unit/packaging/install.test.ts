/**
 * packaging/: the installed example config (paths spliced in, comments kept,
 * still valid) and the install scripts' argument checks. The real install
 * into a staging root runs in tests/e2e/systemd.test.ts.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { after, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { parse } from 'yaml';
import { installedExample } from '../../../packaging/example-config.ts';
import { parseConfig } from '../../../src/config/load.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
const EXAMPLE = readFileSync(join(ROOT, 'config/mailgate.yaml'), 'utf8');
const work = mkdtempSync(join(tmpdir(), 'mailgate-packaging-'));
after(() => rmSync(work, { recursive: true, force: true }));

test('the installed example keeps the certificates in the StateDirectory and the control socket in the RuntimeDirectory', () => {
  const text = installedExample(EXAMPLE, '/etc/mailgate/mailgate.yaml');
  const config = parseConfig(text, '/etc/mailgate/mailgate.yaml');
  assert.equal(config.tls.dir, '/var/lib/mailgate/certs');
  const raw = parse(text) as { control?: { socket?: string } };
  assert.equal(raw.control?.socket, '/run/mailgate/control.sock');
  // Only values change: every other line of the example is still there, comments included.
  const kept = new Set(text.split('\n'));
  const lost = EXAMPLE.split('\n').filter((l) => !kept.has(l) && !l.includes('../certs') && !/^\s*socket:/.test(l));
  assert.deepEqual(lost, []);
  assert.ok(!text.includes('../certs'));
});

test('an existing control section gets the socket line, in its own indentation', () => {
  const src = 'tls:\n  dir: ../certs\ncontrol:\n    mode: "0660"\nlisteners:\n  - { name: a, protocol: imap, tls: implicit, listen: "127.0.0.1:1993", backend: "127.0.0.1:143" }\n';
  const text = installedExample(src, '/etc/mailgate/mailgate.yaml');
  assert.match(text, /\ncontrol:\n {4}socket: \/run\/mailgate\/control\.sock\n {4}mode: "0660"\n/);
  assert.equal((parse(text) as { control: { socket: string } }).control.socket, '/run/mailgate/control.sock');
});

test('a socket already set is replaced in place, its comment kept', () => {
  const src =
    'tls: { dir: ../certs }\ncontrol:\n  socket: ../run/x.sock   # where\nlisteners:\n  - { name: a, protocol: imap, tls: implicit, listen: "127.0.0.1:1993", backend: "127.0.0.1:143" }\n';
  const text = installedExample(src, '/etc/mailgate/mailgate.yaml');
  assert.match(text, /\n {2}socket: \/run\/mailgate\/control\.sock {3}# where\n/);
  assert.match(text, /tls: \{ dir: \/var\/lib\/mailgate\/certs \}/);
});

test('an example that would not validate fails the install', () => {
  assert.throws(() => installedExample('tls:\n  dir: ../certs\nlisteners: []\n', '/etc/mailgate/mailgate.yaml'), { code: 'CONFIG_INVALID' });
});

const shellcheck = spawnSync('shellcheck', ['--version']).error ? 'shellcheck is not installed' : false;
test('prerequisite: shellcheck is installed (.ci/install-deps.sh)', () => {
  assert.equal(shellcheck, false, String(shellcheck));
});


test('the install scripts pass shellcheck as POSIX sh', () => {
  const r = spawnSync('shellcheck', ['-s', 'sh', '-x', 'packaging/install.sh', 'packaging/uninstall.sh', 'packaging/target.sh', 'bin/mailgate'], { cwd: ROOT, encoding: 'utf8' });
  assert.equal(r.status, 0, r.stdout);
});

for (const [script, args, message] of [
  ['install.sh', ['--prefix', 'relative/path'], /absolute/],
  ['install.sh', ['--prefix', '/opt/../etc'], /plain absolute path/],
  ['install.sh', ['--prefix', '/'], /plain absolute path/],
  ['install.sh', ['--prefix', '/opt/mail gate'], /plain absolute path/],
  ['install.sh', ['--root', '/nonexistent-mailgate-root'], /not a directory/],
  ['install.sh', ['--bogus'], /unknown option/],
  ['uninstall.sh', ['--prefix', '/opt/x;rm'], /plain absolute path/],
  ['uninstall.sh', ['--root', 'relative'], /absolute/],
] as const) {
  test(`${script} ${args.join(' ')} is refused before anything happens`, () => {
    // Always a staging root, so that nothing could land on this machine even if a check were missing.
    const root = (args as readonly string[]).includes('--root') ? [] : ['--root', work];
    const r = spawnSync('/bin/sh', [join(ROOT, 'packaging', script), ...root, ...args], { encoding: 'utf8' });
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, message);
  });
}

test('--help prints the header of each script', () => {
  for (const script of ['install.sh', 'uninstall.sh']) {
    const r = spawnSync('/bin/sh', [join(ROOT, 'packaging', script), '--help'], { encoding: 'utf8' });
    assert.equal(r.status, 0);
    assert.match(r.stdout, /--prefix DIR/);
    assert.match(r.stdout, /--root DIR/);
  }
});
