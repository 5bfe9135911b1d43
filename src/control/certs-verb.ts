/**
 * `mailgate certs` and `mailgate certs renew [NAME...]`, clients of the
 * running daemon's control socket.
 *
 *   certs          one row per certificate name: what is served, issuer,
 *                  not-after, days left, next renewal (and why), state or
 *                  last error. Exit 1 when one is expired, failing or
 *                  critical, or one from a file expires within the warning
 *                  window (--warn-days, 14).
 *   certs renew    forces renewal now (all ACME names, or the ones given) and
 *                  waits for the outcome. Exit 1 when one failed.
 */
import type { CertStatus, RenewResult } from '../acme/manager.ts';
import { ACME_COMMANDS } from './acme.ts';
import { parseVerbArgs, verbTarget, withClient } from './cli-verbs.ts';
import { ControlRequestError, type ControlClient } from './client.ts';
import type { CertStatus as ServedCert } from './protocol.ts';

/**
 * A certificate mailgate does not renew (from a file, or the self-signed
 * one) with fewer days left than this is "about to expire" (exit 1): the
 * dashboard's red, time for an admin to replace it.
 */
export const DEFAULT_WARN_DAYS = 14;

const USAGE = `usage: mailgate certs [renew [NAME...]] [-c FILE | -s SOCKET] [--json] [--warn-days N]

  certs               certificate status of the running gateway; exit 1 when one is expired or
                      failing, or one from a file expires within --warn-days (default ${DEFAULT_WARN_DAYS})
  certs renew [NAME]  renew now (all ACME-managed names when none is given) and wait for the result
`;

/** How long `certs renew` waits for the CA (an order may also wait for another gateway's lock). */
const RENEW_WAIT_MS = 15 * 60_000;

export async function certsVerb(argv: string[]): Promise<number> {
  const parsed = parseVerbArgs('certs', argv, { 'warn-days': { type: 'string' } }, USAGE, true);
  if (typeof parsed === 'number') return parsed;
  const warnText = parsed.string('warn-days');
  const warnDays = warnText === undefined ? DEFAULT_WARN_DAYS : Number(warnText);
  if (!Number.isFinite(warnDays) || warnDays < 0) {
    process.stderr.write(`mailgate certs: --warn-days takes a number of days, not "${warnText}"\n${USAGE}`);
    return 2;
  }
  const [sub, ...names] = parsed.positionals;
  if (sub !== undefined && sub !== 'renew') {
    process.stderr.write(`mailgate certs: unknown subcommand "${sub}"\n${USAGE}`);
    return 2;
  }
  const target = verbTarget(parsed);
  const json = target.json === true;
  return withClient(target, (client) => (sub === 'renew' ? renew(client, names, json) : show(client, json, warnDays)), {
    requestTimeoutMs: sub === 'renew' ? RENEW_WAIT_MS : 30_000,
  });
}


interface AcmeAnswer {
  configured: boolean;
  certs: CertStatus[];
}

async function show(client: ControlClient, json: boolean, warnDays: number): Promise<number> {
  const served = await client.request('certs', {});
  let acme: AcmeAnswer = { configured: false, certs: [] };
  try {
    acme = (await client.request(ACME_COMMANDS.status, {})) as AcmeAnswer;
  } catch (err) {
    // A daemon without the ACME part answers UNKNOWN_COMMAND: show what it serves.
    if (!(err instanceof ControlRequestError && err.code === 'UNKNOWN_COMMAND')) throw err;
  }
  if (json) {
    process.stdout.write(`${JSON.stringify({ served, acme }, null, 2)}\n`);
  } else {
    process.stdout.write(formatCertTable(served, acme.certs, Date.now(), warnDays));
  }
  // ACME certificates are judged by their renewal state (a 6-day certificate is fine with 5 days left);
  // the window is for what mailgate does not renew: certificates from files and the self-signed one.
  const bad =
    acme.certs.some((c) => c.state === 'expired' || c.state === 'critical' || c.state === 'failing') ||
    served.some((c) => c.daysLeft < 0 || (c.source !== 'acme' && c.daysLeft < warnDays));
  return bad ? 1 : 0;
}

async function renew(client: ControlClient, names: string[], json: boolean): Promise<number> {
  let results: RenewResult[];
  try {
    results = (await client.request(ACME_COMMANDS.renew, names.length ? { names } : {})) as RenewResult[];
  } catch (err) {
    if (err instanceof ControlRequestError && err.code === 'FAILED' && Array.isArray(err.result)) {
      results = err.result as RenewResult[];
    } else if (err instanceof ControlRequestError && (err.code === 'UNKNOWN_COMMAND' || err.code === 'UNSUPPORTED')) {
      process.stderr.write(`mailgate: ${err.code === 'UNSUPPORTED' ? err.message : 'this daemon has no ACME support'}\n`);
      return 1;
    } else {
      throw err;
    }
  }
  if (json) process.stdout.write(`${JSON.stringify(results, null, 2)}\n`);
  else for (const r of results) process.stdout.write(r.ok ? `${r.name}: renewed, valid until ${r.notAfter ?? '?'}\n` : `${r.name}: FAILED: ${r.error ?? 'unknown error'}\n`);
  return results.every((r) => r.ok) ? 0 : 1;
}

// ---- text output -------------------------------------------------------------------------

function when(iso: string | number | undefined): string {
  if (iso === undefined) return '-';
  return new Date(iso).toISOString().replace('T', ' ').slice(0, 16) + 'Z';
}

function cn(issuer: string | undefined): string {
  if (!issuer) return '-';
  const m = /(?:^|, )CN=([^,]+)/.exec(issuer);
  return m?.[1] ?? issuer;
}

const STATE_TEXT: Record<CertStatus['state'], string> = {
  pending: 'waiting for the first certificate',
  obtaining: 'obtaining',
  valid: 'ok',
  renewing: 'renewing',
  failing: 'renewal failing',
  critical: 'EXPIRES SOON, renewal failing',
  expired: 'EXPIRED',
};

/**
 * NAME  SERVING  ISSUER  NOT AFTER  DAYS  NEXT RENEWAL  STATE / LAST ERROR:
 * ACME-managed names first, then certificates from files and the self-signed
 * fallback for names ACME does not manage.
 */
export function formatCertTable(served: ServedCert[], acme: CertStatus[], now: number, warnDays = DEFAULT_WARN_DAYS): string {
  const rows: string[][] = [['NAME', 'SERVING', 'ISSUER', 'NOT AFTER', 'DAYS', 'NEXT RENEWAL', 'STATE / LAST ERROR']];
  const managed = new Set(acme.map((c) => c.name));
  for (const c of acme) {
    const state = STATE_TEXT[c.state] + (c.lastError ? `: ${c.lastError}` : '') + (c.serving === 'self-signed' ? ' (serving the self-signed certificate)' : '');
    const next = c.nextRenewal ? `${when(c.nextRenewal)} (${c.basis ?? '?'})` : '-';
    rows.push([c.name, c.serving, cn(c.issuer), when(c.notAfter), c.daysLeft === undefined ? '-' : c.daysLeft.toFixed(1), next, state]);
  }
  for (const c of served) {
    const names = c.names.filter((n) => !managed.has(n));
    if (names.length === 0 || c.source === 'acme') continue;
    const days = (c.notAfter - now) / 86_400_000;
    const fromFile = c.source === 'self-signed' ? 'self-signed (clients will warn)' : 'ok (from a file; not renewed by mailgate)';
    const state = days < 0 ? 'EXPIRED' : days < warnDays ? `EXPIRES IN ${days.toFixed(1)} DAYS (${c.source === 'self-signed' ? 'self-signed' : 'from a file: replace it'})` : fromFile;
    rows.push([names.join(','), c.source, cn(c.issuer), when(c.notAfter), days.toFixed(1), '-', state]);
  }
  if (rows.length === 1) return 'no certificates\n';
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  const table = `${rows.map((r) => r.map((cell, i) => (i === r.length - 1 ? cell : cell.padEnd(widths[i]!))).join('  ').trimEnd()).join('\n')}\n`;
  // Kept keys (acme.reuse_key): their TLSA 3 1 1 data, the current key's and, during a rollover, the next one's.
  const keys = acme.flatMap((c) =>
    c.keys
      ? [`${c.name}: TLSA 3 1 1 ${c.keys.current} (key in use)`, ...(c.keys.next ? [`${c.name}: TLSA 3 1 1 ${c.keys.next.data} (NEXT key: ${c.keys.next.note})`] : [])]
      : [],
  );
  return keys.length ? `${table}\nkeys (DANE; publish with mailgate dns):\n${keys.map((k) => `  ${k}`).join('\n')}\n` : table;
}
