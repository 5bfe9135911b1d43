/**
 * Turns the per-round samples into the table (medians, ratios to nginx and
 * to the direct backend, the issue's targets) and the JSON document.
 */
import * as os from 'node:os';
import type { Sample } from './scenarios.ts';

export type Better = 'higher' | 'lower';

export interface RowDef {
  id: string;
  label: string;
  unit: string;
  scenario: string;
  metric: string;
  better: Better;
  /** Subtract the direct backend's figure of the same round (added latency). */
  minusDirect?: boolean;
  /** The issue's target for mailgate, if any. */
  /** The issue's target for mailgate, if any; null when it cannot be judged (no nginx figure). */
  goal?: { text: string; met: (mailgate: number, nginx: number | undefined) => boolean | null };
}

const geNginx = { text: '≥ nginx', met: (m: number, n: number | undefined) => (n === undefined ? null : m >= n) };
const leNginx = { text: '≤ nginx', met: (m: number, n: number | undefined) => (n === undefined ? null : m <= n) };

export function rowDefs(idleConns: number, users: number): RowDef[] {
  return [
    { id: '1', label: 'TLS handshakes/s, IMAPS greeting read (64 conc)', unit: '/s', scenario: 'handshake', metric: 'rate', better: 'higher', goal: geNginx },
    { id: '1r', label: '  same, resumed with a session ticket', unit: '/s', scenario: 'resume', metric: 'rate', better: 'higher' },
    { id: '1r%', label: '  handshakes resumed in row 1r, %', unit: '%', scenario: 'resume', metric: 'resumed_pct', better: 'higher' },
    { id: '2', label: `IMAP sessions/s (32 conc, ${users} users)`, unit: '/s', scenario: 'imap_session', metric: 'rate', better: 'higher', goal: geNginx },
    { id: '3a', label: 'IMAP FETCH 10 MiB, MB/s', unit: 'MB/s', scenario: 'fetch', metric: 'mbps', better: 'higher', goal: geNginx },
    { id: '3b', label: 'HTTPS GET 100 MiB, MB/s', unit: 'MB/s', scenario: 'https_bulk', metric: 'mbps', better: 'higher', goal: geNginx },
    { id: '4', label: 'HTTPS 1 KiB keep-alive req/s (wrk, 32 conns)', unit: '/s', scenario: 'https_small', metric: 'rps', better: 'higher', goal: geNginx },
    { id: '4p', label: '  same, p99 latency, ms', unit: 'ms', scenario: 'https_small', metric: 'p99_ms', better: 'lower' },
    { id: '4h', label: 'HTTP/2 1 KiB req/s (h2load, 1 conn, 100 streams)', unit: '/s', scenario: 'https_h2', metric: 'rps', better: 'higher' },
    {
      id: '5',
      label: `RSS per idle TLS IMAP connection, KiB (${idleConns / 2} → ${idleConns} held)`,
      unit: 'KiB',
      scenario: 'idle',
      metric: 'kib_per_conn',
      better: 'lower',
      goal: { text: '≤ 10 KiB', met: (m) => m <= 10 },
    },
    { id: '6a', label: 'IMAP NOOP added latency p50, µs (direct: base)', unit: 'µs', scenario: 'noop', metric: 'p50_us', better: 'lower', minusDirect: true },
    { id: '6b', label: 'IMAP NOOP added latency p99, µs (direct: base)', unit: 'µs', scenario: 'noop', metric: 'p99_us', better: 'lower', minusDirect: true, goal: leNginx },
    { id: '7', label: 'SMTPS messages/s (10 KiB, 16 conc)', unit: '/s', scenario: 'smtp', metric: 'rate', better: 'higher', goal: geNginx },
    { id: '8.1', label: 'proxy CPU per handshake (row 1), µs', unit: 'µs', scenario: 'handshake', metric: 'cpu_us', better: 'lower', goal: leNginx },
    { id: '8.1r', label: '  per resumed handshake (row 1r), µs', unit: 'µs', scenario: 'resume', metric: 'cpu_us', better: 'lower' },
    { id: '8.2', label: 'proxy CPU per IMAP session (row 2), µs', unit: 'µs', scenario: 'imap_session', metric: 'cpu_us', better: 'lower', goal: leNginx },
    { id: '8.3', label: '  per MB of IMAP FETCH (row 3a), µs', unit: 'µs', scenario: 'fetch', metric: 'cpu_us_per_mb', better: 'lower' },
    { id: '8.3b', label: '  per MB of HTTPS GET (row 3b), µs', unit: 'µs', scenario: 'https_bulk', metric: 'cpu_us_per_mb', better: 'lower' },
    { id: '8.4', label: 'proxy CPU per HTTPS request (row 4), µs', unit: 'µs', scenario: 'https_small', metric: 'cpu_us', better: 'lower', goal: leNginx },
    { id: '8.4h', label: '  per HTTP/2 request (row 4h), µs', unit: 'µs', scenario: 'https_h2', metric: 'cpu_us', better: 'lower' },
    { id: '8.7', label: 'proxy CPU per SMTP message (row 7), µs', unit: 'µs', scenario: 'smtp', metric: 'cpu_us', better: 'lower', goal: leNginx },
    { id: '9', label: 'connect + TLS + greeting, 1 connection, p50 ms', unit: 'ms', scenario: 'single', metric: 'p50_ms', better: 'lower', goal: { text: '≤ 3 ms', met: (m) => m <= 3 } },
    { id: '9p', label: '  same, p99 ms', unit: 'ms', scenario: 'single', metric: 'p99_ms', better: 'lower' },
  ];
}

/** samples[scenario][target] = one Sample per round (rounds in order). */
export type Samples = Record<string, Record<string, Sample[]>>;

export interface RowResult {
  id: string;
  label: string;
  unit: string;
  better: Better;
  /** Median over rounds, per target. */
  values: Record<string, number | null>;
  /** Every round's figure, per target. */
  rounds: Record<string, (number | null)[]>;
  /** mailgate (and variants) ÷ nginx and ÷ direct, from the medians. */
  ratios: Record<string, { nginx: number | null; direct: number | null }>;
  /** The direct backend's own figure where the row subtracts it. */
  base?: number | null;
  goal?: { text: string; met: boolean | null };
  /** Highest load-client share of one core seen for this row (all targets, all rounds). */
  clientCpuMax?: number;
}

export function median(xs: number[]): number | null {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? (s[mid] as number) : ((s[mid - 1] as number) + (s[mid] as number)) / 2;
}

export function buildRows(defs: RowDef[], samples: Samples, targets: string[]): RowResult[] {
  const out: RowResult[] = [];
  for (const d of defs) {
    const byTarget = samples[d.scenario] ?? {};
    const direct = byTarget['direct'] ?? [];
    const rounds: Record<string, (number | null)[]> = {};
    const values: Record<string, number | null> = {};
    let clientCpuMax: number | undefined;
    for (const t of targets) {
      const list = byTarget[t] ?? [];
      rounds[t] = list.map((s, i) => {
        const v = s.values[d.metric];
        if (v === undefined) return null;
        if (d.minusDirect && t !== 'direct') {
          const base = direct[i]?.values[d.metric];
          return base === undefined ? null : v - base;
        }
        return v;
      });
      if (t !== 'direct') for (const s of list) if (s.client !== undefined) clientCpuMax = Math.max(clientCpuMax ?? 0, s.client);
      values[t] = median((rounds[t] ?? []).filter((x): x is number => x !== null));
    }
    let base: number | null | undefined;
    if (d.minusDirect) {
      base = values['direct'] ?? null;
      values['direct'] = null;
    }
    const ratios: RowResult['ratios'] = {};
    const nginx = values['nginx'] ?? null;
    const dir = d.minusDirect ? null : (values['direct'] ?? null);
    for (const t of targets) {
      if (t === 'direct' || t === 'nginx') continue;
      const v = values[t] ?? null;
      ratios[t] = {
        nginx: v !== null && nginx !== null && nginx !== 0 ? v / nginx : null,
        direct: v !== null && dir !== null && dir !== 0 ? v / dir : null,
      };
    }
    const mg = values['mailgate'] ?? null;
    const row: RowResult = { id: d.id, label: d.label, unit: d.unit, better: d.better, values, rounds, ratios };
    if (base !== undefined) row.base = base;
    if (d.goal) row.goal = { text: d.goal.text, met: mg === null ? null : d.goal.met(mg, nginx ?? undefined) };
    if (clientCpuMax !== undefined) row.clientCpuMax = clientCpuMax;
    out.push(row);
  }
  return out;
}

export function fmt(v: number | null | undefined): string {
  if (v === null || v === undefined || Number.isNaN(v)) return '–';
  const a = Math.abs(v);
  if (a >= 1000) return Math.round(v).toString();
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

function ratio(v: number | null | undefined): string {
  return v === null || v === undefined ? '–' : `${v.toFixed(2)}×`;
}

/** A Markdown table: figures per target, mailgate's ratios, the goal, the client's CPU share. */
export function renderTable(rows: RowResult[], targets: string[]): string {
  const variants = targets.filter((t) => t !== 'direct' && t !== 'nginx' && t.startsWith('mailgate'));
  const head = ['#', 'metric', ...targets, ...variants.flatMap((v) => [`${v} ÷ nginx`, `${v} ÷ direct`]), 'goal (mailgate)', 'client CPU'];
  const lines = [`| ${head.join(' | ')} |`, `|${head.map((_, i) => (i < 2 ? '---' : '---:')).join('|')}|`];
  for (const r of rows) {
    const cells = [r.id, r.label];
    for (const t of targets) cells.push(t === 'direct' && r.base !== undefined ? `base ${fmt(r.base)}` : fmt(r.values[t]));
    for (const v of variants) cells.push(ratio(r.ratios[v]?.nginx), ratio(r.ratios[v]?.direct));
    cells.push(r.goal ? `${r.goal.text}: ${r.goal.met === null ? '–' : r.goal.met ? 'met' : 'MISSED'}` : '');
    cells.push(r.clientCpuMax !== undefined ? `${Math.round(r.clientCpuMax * 100)}%` : '');
    lines.push(`| ${cells.join(' | ')} |`);
  }
  return lines.join('\n');
}

/**
 * Who was busy: for each load row and target, the proxy's CPU and the load
 * client's CPU as shares of one core (medians over rounds). A rate row whose
 * proxy sits near 100% measured the proxy; one whose client does measured the
 * client. Everything shares the machine's cores with the backends.
 */
export function saturation(
  samples: Samples,
  targets: string[],
): { scenario: string; shares: Record<string, { proxy: number | null; client: number | null }>; machine: number | null }[] {
  const work: [string, (v: Record<string, number>) => number | undefined][] = [
    ['handshake', (v) => mul(v.rate, v.cpu_us)],
    ['resume', (v) => mul(v.rate, v.cpu_us)],
    ['imap_session', (v) => mul(v.rate, v.cpu_us)],
    ['fetch', (v) => mul(v.mbps, v.cpu_us_per_mb)],
    ['https_bulk', (v) => mul(v.mbps, v.cpu_us_per_mb)],
    ['https_small', (v) => mul(v.rps, v.cpu_us)],
    ['https_h2', (v) => mul(v.rps, v.cpu_us)],
    ['smtp', (v) => mul(v.rate, v.cpu_us)],
  ];
  const out = [];
  for (const [scenario, busy] of work) {
    const byTarget = samples[scenario];
    if (!byTarget) continue;
    const shares: Record<string, { proxy: number | null; client: number | null }> = {};
    for (const t of targets) {
      const list = byTarget[t] ?? [];
      shares[t] = {
        proxy: median(list.map((x) => busy(x.values)).filter((x): x is number => x !== undefined)),
        client: median(list.map((x) => x.client).filter((x): x is number => x !== undefined)),
      };
    }
    const machine = median(Object.values(byTarget).flatMap((list) => list.map((x) => x.machine).filter((x): x is number => x !== undefined)));
    out.push({ scenario, shares, machine });
  }
  return out;
}

function mul(a: number | undefined, b: number | undefined): number | undefined {
  return a === undefined || b === undefined ? undefined : (a * b) / 1e6;
}

export function renderSaturation(rows: ReturnType<typeof saturation>, targets: string[]): string {
  const proxies = targets.filter((t) => t !== 'direct');
  const pct = (x: number | null) => (x === null ? '–' : `${Math.round(x * 100)}%`);
  const lines = [`| row | ${proxies.map((t) => `${t}: proxy / client CPU`).join(' | ')} | whole machine busy |`, `|---|${proxies.map(() => '---:').join('|')}|---:|`];
  for (const r of rows) {
    const cells = proxies.map((t) => `${pct(r.shares[t]?.proxy ?? null)} / ${pct(r.shares[t]?.client ?? null)}`);
    lines.push(`| ${r.scenario} | ${cells.join(' | ')} | ${r.machine === null ? '–' : `${r.machine.toFixed(2)} of ${os.cpus().length} cores`} |`);
  }
  return lines.join('\n');
}
