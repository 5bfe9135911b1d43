/**
 * systemd/mailgate.service: valid for systemd (`systemd-analyze verify`),
 * hardened to an exposure of 2.0 or lower, every remaining exposure explained
 * in the file, and the settings the appliance relies on present. Nothing is
 * started here; tests/e2e/systemd.test.ts installs the unit and checks it there.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { after, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { MAX_EXPOSURE, securityReport, systemdAnalyzeMissing, unitSettings, verifyUnit, withPrefix } from '../../helpers/systemd.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
const UNIT = join(ROOT, 'systemd/mailgate.service');
const TEXT = readFileSync(UNIT, 'utf8');
const noAnalyze = systemdAnalyzeMissing();
test('prerequisite: systemd-analyze is installed (.ci/install-deps.sh)', () => {
  assert.equal(noAnalyze, false, String(noAnalyze));
});


const work = mkdtempSync(join(tmpdir(), 'mailgate-unit-'));
after(() => rmSync(work, { recursive: true, force: true }));

function values(key: string): string[] {
  return unitSettings(TEXT)
    .filter(([k]) => k === key)
    .map(([, v]) => v);
}
function one(key: string): string | undefined {
  const v = values(key);
  assert.ok(v.length <= 1, `${key} is set ${v.length} times`);
  return v[0];
}

test('the unit passes systemd-analyze verify', () => {
  // verify checks that /opt/mailgate/bin/mailgate exists and is executable,
  // so it runs on a copy pointing at this checkout's bin/mailgate (the
  // installed paths are checked on a real install in tests/e2e/systemd.test.ts).
  const r = verifyUnit(withPrefix(TEXT, '/opt/mailgate', ROOT));
  assert.equal(r.status, 0, `systemd-analyze verify failed:\n${r.output}`);
  assert.equal(r.output, '', `systemd-analyze verify complained:\n${r.output}`);
});

test('verify would notice a broken unit (the check is not vacuous)', () => {
  const broken = withPrefix(TEXT, '/opt/mailgate', ROOT).replace('\nType=notify\n', '\nTpye=notify\n');
  assert.match(verifyUnit(broken).output, /Unknown key 'Tpye'/);
  assert.match(verifyUnit(TEXT).output, /\/opt\/mailgate\/bin\/mailgate is not executable|No such file/);
});

test(`the exposure is ${MAX_EXPOSURE} or lower and every exposed item is explained in the file`, () => {
  const report = securityReport(UNIT);
  assert.ok(report.overall <= MAX_EXPOSURE, `exposure ${report.overall} > ${MAX_EXPOSURE}:\n${report.stdout}`);
  assert.ok(report.exposed.length > 0, 'expected some rows marked ✗ (the parser may be broken)');
  const comments = TEXT.split('\n')
    .filter((l) => l.startsWith('#'))
    .join('\n');
  for (const item of report.exposed) {
    assert.ok(comments.includes(item.name), `exposed item ${item.name} (${item.exposure}: ${item.description}) is not explained in a comment`);
  }
  // The header states the measured level; keep it true.
  assert.ok(comments.includes(`rates this unit ${report.overall.toFixed(1)}`), `the header should say "rates this unit ${report.overall.toFixed(1)}"`);
  // --threshold is on a 0..100 scale: the command itself fails above the bound.
  const t = spawnSync('systemd-analyze', ['security', '--offline=true', `--threshold=${MAX_EXPOSURE * 10}`, UNIT], { encoding: 'utf8' });
  assert.equal(t.status, 0, `systemd-analyze security --threshold=${MAX_EXPOSURE * 10} failed`);
});

test('the security check tells a weak unit apart (parser and bound are not vacuous)', () => {
  const weak = join(work, 'weak.service');
  writeFileSync(weak, '[Service]\nType=notify\nExecStart=/bin/true\n');
  const report = securityReport(weak);
  assert.ok(report.overall > MAX_EXPOSURE);
  assert.ok(report.exposed.some((e) => e.name === 'User=/DynamicUser='));
});

test('readiness, reload and restart settings', () => {
  assert.equal(one('Type'), 'notify');
  assert.equal(one('NotifyAccess'), 'all', 'notifications come from a systemd-notify child (src/core/sd-notify.ts)');
  assert.equal(one('ExecStart'), '/opt/mailgate/bin/mailgate run -c /etc/mailgate/mailgate.yaml');
  assert.equal(one('ExecStartPre'), '/opt/mailgate/bin/mailgate check -c /etc/mailgate/mailgate.yaml');
  assert.equal(one('ExecReload'), '/bin/kill -HUP $MAINPID');
  assert.equal(one('Restart'), 'on-failure');
  assert.equal(one('RestartPreventExitStatus'), '2', 'exit code 2 is a configuration error (src/cli.ts)');
  assert.ok(one('StartLimitIntervalSec'));
  assert.ok(Number(one('StartLimitBurst')) > 0);
  assert.equal(one('KillMode'), 'mixed');
});

test('an unprivileged user with only CAP_NET_BIND_SERVICE', () => {
  assert.equal(one('User'), 'mailgate');
  assert.equal(one('Group'), 'mailgate');
  assert.equal(one('DynamicUser'), undefined);
  assert.equal(one('AmbientCapabilities'), 'CAP_NET_BIND_SERVICE');
  assert.equal(one('CapabilityBoundingSet'), 'CAP_NET_BIND_SERVICE');
  assert.equal(one('NoNewPrivileges'), 'yes');
  assert.equal(one('PrivateUsers'), 'no', 'a user namespace would void CAP_NET_BIND_SERVICE for the host network');
  assert.equal(one('MemoryDenyWriteExecute'), 'no', "V8's JIT needs writable+executable pages");
});

test('config, state and runtime directories', () => {
  assert.equal(one('ConfigurationDirectory'), 'mailgate');
  assert.equal(one('StateDirectory'), 'mailgate');
  assert.equal(one('StateDirectoryMode'), '0700');
  assert.equal(one('RuntimeDirectory'), 'mailgate');
  assert.equal(one('ProtectSystem'), 'strict');
  assert.equal(one('ReadWritePaths'), undefined, 'only the state and runtime directories are writable');
  assert.equal(one('LogsDirectory'), undefined, 'logs go to the journal');
});

test('the stop timeout leaves room for the default drain', () => {
  const m = /^(\d+)s$/.exec(one('TimeoutStopSec') ?? '');
  assert.ok(m, 'TimeoutStopSec should be given in seconds');
  // timeouts.shutdown_drain defaults to 30s, then 3s for the hard close.
  assert.ok(Number(m[1]) > 33);
});
