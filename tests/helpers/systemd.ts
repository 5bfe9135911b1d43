/**
 * systemd-analyze helpers shared by tests/unit/packaging/systemd-unit.test.ts (the unit
 * file in the repository) and tests/e2e/systemd.test.ts (the unit as
 * installed by packaging/install.sh).
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** The bound from issue 6: `systemd-analyze security` must rate the unit at this or lower. */
export const MAX_EXPOSURE = 2.0;

/** A reason to skip when systemd-analyze is missing (Debian package "systemd"), else false. */
export function systemdAnalyzeMissing(): string | false {
  const r = spawnSync('systemd-analyze', ['--version'], { encoding: 'utf8' });
  return r.error ? 'systemd-analyze is not installed (Debian package "systemd")' : false;
}

export interface SecurityReport {
  overall: number;
  exposed: { name: string; description: string; exposure: number }[];
  stdout: string;
}

/** Parses `systemd-analyze security --offline=true` output: the rows marked ✗ and the overall level. */
export function parseSecurity(stdout: string): SecurityReport {
  const overall = /Overall exposure level for \S+: ([\d.]+)/.exec(stdout);
  if (!overall) throw new Error(`no overall exposure level in:\n${stdout}`);
  const exposed = stdout
    .split('\n')
    .filter((l) => l.startsWith('✗'))
    .map((l) => {
      const m = /^✗ (\S+)\s+(.*?)\s+([\d.]+)$/.exec(l);
      if (!m) throw new Error(`unparsable row: ${l}`);
      return { name: m[1]!, description: m[2]!, exposure: Number(m[3]) };
    });
  return { overall: Number(overall[1]), exposed, stdout };
}

export function securityReport(unitFile: string): SecurityReport {
  const r = spawnSync('systemd-analyze', ['security', '--offline=true', '--no-pager', unitFile], { encoding: 'utf8' });
  if (r.error) throw r.error;
  return parseSecurity(r.stdout);
}

/**
 * `systemd-analyze verify` on unit text. The program paths in the unit must
 * exist and be executable for verify to pass, so callers hand in a copy whose
 * paths point at a real tree (the checkout, or a staging install). Verify
 * exits 0 even for unknown keys or bad values; those show up on stderr, so a
 * clean result is exit 0 *and* no output.
 */
export function verifyUnit(text: string, name = 'mailgate.service'): { status: number | null; output: string } {
  const dir = mkdtempSync(join(tmpdir(), 'mailgate-verify-'));
  try {
    const file = join(dir, name);
    writeFileSync(file, text);
    const r = spawnSync('systemd-analyze', ['verify', '--no-pager', file], { encoding: 'utf8' });
    if (r.error) throw r.error;
    return { status: r.status, output: `${r.stdout}${r.stderr}`.trim() };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Unit text with the program prefix replaced (install.sh does the same for --prefix). */
export function withPrefix(text: string, from: string, to: string): string {
  return text.replaceAll(`${from}/`, `${to}/`);
}

/** The settings of a unit as (key, value) pairs in file order, comments and section headers dropped. */
export function unitSettings(text: string): [string, string][] {
  return text
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('#') && !l.startsWith(';') && !l.startsWith('['))
    .map((l) => {
      const i = l.indexOf('=');
      return [l.slice(0, i), l.slice(i + 1)] as [string, string];
    });
}
