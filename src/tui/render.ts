/**
 * Turns the dashboard model into screen lines (blessed tag markup), exactly
 * `width` columns wide and `height` lines high, drawing only the visible
 * session rows. Pure: no terminal, so layouts are unit-tested at 80x24.
 */
import type { Ban, CertStatus, StatusInfo } from '../control/protocol.ts';
import { humanBytes, humanDuration, humanRate } from '../core/human.ts';
import {
  banKey,
  sanitize,
  type DashboardModel,
  type ListenerRow,
  type LogEntry,
  type SessionView,
  type SortKey,
} from './view-model.ts';

export interface Chrome {
  /** The bottom line: key help, or the prompt of the current mode. */
  bottom: string;
  /** Markup-free bottom line is shown inverse when a prompt waits for an answer. */
  prompting: boolean;
  /** The session whose detail replaces the session table, if any. */
  detail: SessionView | null;
  /** The bans view replaces the session table. */
  bans?: boolean;
  unicode: boolean;
  configFile: string | null;
  socketPath: string;
}

export const HELP = '↑↓/jk move  s/S sort  / filter  K kill  b/B ban/bans  ⏎ detail  r reload  q quit';
export const HELP_ASCII = 'jk move  s/S sort  /filter  K kill  b/B ban/bans  Enter detail  r reload  q quit';
export const BANS_HELP = '↑↓/jk move  u unban  Esc/B back to sessions  q quit';
export const BANS_HELP_ASCII = 'jk move  u unban  Esc/B back to sessions  q quit';

// ---- text cells -------------------------------------------------------------------

/** blessed tag markup: braces in text must be escaped. */
export function esc(text: string): string {
  return text.replace(/[{}]/g, (c) => (c === '{' ? '{open}' : '{close}'));
}

/** Exactly `w` columns: cut with an ellipsis, or padded. */
export function fit(text: string, w: number, align: 'left' | 'right' = 'left', ellipsis = '…'): string {
  if (w <= 0) return '';
  const chars = [...text];
  if (chars.length > w) return w === 1 ? chars[0]! : chars.slice(0, w - 1).join('') + ellipsis;
  const pad = ' '.repeat(w - chars.length);
  return align === 'left' ? text + pad : pad + text;
}

/** Columns a markup string takes on screen: tags take none, {open}/{close} one each. */
export function visibleLength(markup: string): number {
  return [...markup.replace(/\{(?:open|close)\}/g, 'x').replace(/\{[^{}]*\}/g, '')].length;
}

// ---- columns --------------------------------------------------------------------------

export interface Column<T> {
  key: string;
  title: string;
  min: number;
  /** Share of the spare width (0: fixed). */
  flex: number;
  /** Lower goes first when the terminal is too narrow for every column. */
  priority: number;
  align: 'left' | 'right';
  cell(row: T, now: number): string;
}

/** Which columns fit in `width` (one space between columns), and how wide each is. */
export function layoutColumns<T>(cols: readonly Column<T>[], width: number): { col: Column<T>; width: number }[] {
  let chosen = [...cols];
  const need = (cs: Column<T>[]) => cs.reduce((n, c) => n + c.min, 0) + Math.max(0, cs.length - 1);
  while (chosen.length > 1 && need(chosen) > width) {
    const drop = chosen.reduce((lo, c) => (c.priority < lo.priority ? c : lo));
    chosen = chosen.filter((c) => c !== drop);
  }
  let spare = Math.max(0, width - need(chosen));
  const flexTotal = chosen.reduce((n, c) => n + c.flex, 0);
  const widths = chosen.map((c) => c.min);
  if (flexTotal > 0) {
    const share = chosen.map((c) => Math.floor((spare * c.flex) / flexTotal));
    chosen.forEach((_c, i) => {
      widths[i]! += share[i]!;
      spare -= share[i]!;
    });
    for (let i = 0; spare > 0 && i < chosen.length; i++) {
      if (chosen[i]!.flex > 0) {
        widths[i]!++;
        spare--;
      }
    }
  }
  return chosen.map((col, i) => ({ col, width: widths[i]! }));
}

const STATE_SHORT: Record<string, string> = {
  handshake: 'tls-hs',
  starttls: 'starttls',
  preauth: 'preauth',
  authenticating: 'login',
  relaying: 'relay',
  closing: 'closing',
  closed: 'closed',
};

export const SESSION_COLUMNS: readonly (Column<SessionView> & { sort: SortKey })[] = [
  { key: 'id', sort: 'id', title: 'ID', min: 8, flex: 0, priority: 3, align: 'left', cell: (s) => s.id },
  { key: 'listener', sort: 'listener', title: 'LISTENER', min: 8, flex: 1, priority: 6, align: 'left', cell: (s) => s.listener },
  { key: 'client', sort: 'client', title: 'CLIENT', min: 13, flex: 3, priority: 9, align: 'left', cell: (s) => s.clientIp },
  { key: 'user', sort: 'user', title: 'USER', min: 8, flex: 3, priority: 10, align: 'left', cell: (s) => s.user ?? '-' },
  { key: 'backend', sort: 'backend', title: 'BACKEND', min: 14, flex: 2, priority: 1, align: 'left', cell: (s) => s.backend ?? '-' },
  { key: 'tls', sort: 'tls', title: 'TLS', min: 4, flex: 0, priority: 2, align: 'left', cell: (s) => (s.tlsVersion ? s.tlsVersion.replace(/^TLSv/, '') : '-') },
  { key: 'age', sort: 'age', title: 'AGE', min: 5, flex: 0, priority: 7, align: 'right', cell: (s, now) => humanDuration(now - s.startedAt) },
  { key: 'idle', sort: 'idle', title: 'IDLE', min: 5, flex: 0, priority: 4, align: 'right', cell: (s, now) => humanDuration(now - s.lastActivity) },
  { key: 'in', sort: 'in', title: 'IN', min: 6, flex: 0, priority: 8, align: 'right', cell: (s) => humanBytes(s.bytesIn) },
  { key: 'out', sort: 'out', title: 'OUT', min: 6, flex: 0, priority: 8, align: 'right', cell: (s) => humanBytes(s.bytesOut) },
  { key: 'state', sort: 'state', title: 'STATE', min: 7, flex: 0, priority: 5, align: 'left', cell: (s) => STATE_SHORT[s.state] ?? s.state },
];

const KIND_SHORT: Record<string, string> = { address: 'address', range: 'range', user: 'user', pair: 'user+addr' };

/** The bans view: what each ban stops, until when, who set it and why. */
export const BAN_COLUMNS: readonly Column<Ban>[] = [
  { key: 'kind', title: 'KIND', min: 9, flex: 0, priority: 8, align: 'left', cell: (b) => KIND_SHORT[b.kind ?? (b.ip?.includes('/') ? 'range' : 'address')] ?? '?' },
  { key: 'ip', title: 'ADDRESS', min: 15, flex: 1, priority: 10, align: 'left', cell: (b) => b.ip ?? '-' },
  { key: 'user', title: 'USER', min: 10, flex: 2, priority: 9, align: 'left', cell: (b) => b.user ?? '-' },
  { key: 'left', title: 'LEFT', min: 6, flex: 0, priority: 7, align: 'right', cell: (b, now) => (b.expiresAt === null ? 'never' : humanDuration(Math.max(0, b.expiresAt - now))) },
  { key: 'until', title: 'UNTIL', min: 5, flex: 0, priority: 3, align: 'left', cell: (b) => (b.expiresAt === null ? '-' : new Date(b.expiresAt).toTimeString().slice(0, 5)) },
  { key: 'source', title: 'SOURCE', min: 6, flex: 0, priority: 5, align: 'left', cell: (b) => b.source },
  { key: 'reason', title: 'REASON', min: 10, flex: 6, priority: 6, align: 'left', cell: (b) => b.reason },
];

function sparkline(values: number[], width: number, unicode: boolean): string {
  const glyphs = unicode ? ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'] : ['_', '.', ':', '-', '=', '+', '*', '#'];
  const tail = values.slice(-width);
  const max = Math.max(0, ...tail);
  const chars = tail.map((v) => (max <= 0 || v <= 0 ? glyphs[0]! : glyphs[Math.min(glyphs.length - 1, Math.floor((v / max) * (glyphs.length - 1) + 0.5))]!));
  return ' '.repeat(Math.max(0, width - chars.length)) + chars.join('');
}

function listenerColumns(): Column<ListenerRow>[] {
  return [
    { key: 'name', title: 'LISTENER', min: 9, flex: 1, priority: 10, align: 'left', cell: (l) => `${l.up ? '' : '!'}${l.name}` },
    { key: 'proto', title: 'PROTO', min: 5, flex: 0, priority: 2, align: 'left', cell: (l) => l.protocol },
    { key: 'sessions', title: 'SESS', min: 5, flex: 0, priority: 9, align: 'right', cell: (l) => String(l.sessions) },
    { key: 'new', title: 'NEW/s', min: 5, flex: 0, priority: 8, align: 'right', cell: (l) => humanRate(l.newPerSec) },
    { key: 'ok', title: 'AUTH OK', min: 7, flex: 0, priority: 7, align: 'right', cell: (l) => String(l.authOk) },
    { key: 'fail', title: 'FAIL', min: 5, flex: 0, priority: 7, align: 'right', cell: (l) => String(l.authFail) },
    { key: 'refused', title: 'REFUSED', min: 7, flex: 0, priority: 6, align: 'right', cell: (l) => String(l.refused) },
    { key: 'in', title: 'IN/s', min: 6, flex: 0, priority: 5, align: 'right', cell: (l) => humanRate(l.inPerSec) },
    { key: 'out', title: 'OUT/s', min: 6, flex: 0, priority: 5, align: 'right', cell: (l) => humanRate(l.outPerSec) },
    // Drawn by renderFrame: a sparkline of bytes/s over the last minute.
    { key: 'spark', title: 'TRAFFIC/60s', min: 8, flex: 2, priority: 3, align: 'left', cell: () => '' },
  ];
}

function row<T>(layout: { col: Column<T>; width: number }[], item: T, now: number, cell?: (col: Column<T>, width: number) => string | undefined): string {
  return layout
    .map(({ col, width }) => {
      const custom = cell?.(col, width);
      if (custom !== undefined) return custom;
      return esc(fit(sanitize(col.cell(item, now)), width, col.align));
    })
    .join(' ');
}

function headerRow<T>(layout: { col: Column<T>; width: number }[], sortKey?: string, desc?: boolean, unicode = true): string {
  return layout
    .map(({ col, width }) => {
      const mark = col.key === sortKey ? (unicode ? (desc ? '▼' : '▲') : desc ? 'v' : '^') : '';
      return esc(fit(col.title + mark, width, col.align));
    })
    .join(' ');
}

// ---- the frame ----------------------------------------------------------------------------

export function renderFrame(model: DashboardModel, width: number, height: number, now: number, chrome: Chrome): string[] {
  const w = Math.max(20, width);
  const out: string[] = [];
  const line = (markup: string, plainLength?: number) => {
    const len = plainLength ?? visibleLength(markup);
    out.push(len < w ? markup + ' '.repeat(w - len) : markup);
  };

  // Header: three lines.
  header(model, w, now, chrome).forEach((l) => line(l));

  // Layout of the rest.
  const listeners = model.listenerRows();
  const bodyHeight = height - 3 - 1;
  let logLines = height >= 40 ? 8 : height >= 30 ? 6 : height >= 20 ? 4 : 2;
  let listenerLines = Math.min(listeners.length, Math.max(1, Math.floor((bodyHeight - logLines - 2) / 3)));
  let sessionLines = bodyHeight - (1 + listenerLines) - (1 + logLines) - 1;
  if (sessionLines < 3) {
    logLines = Math.max(1, logLines - (3 - sessionLines));
    sessionLines = bodyHeight - (1 + listenerLines) - (1 + logLines) - 1;
  }
  if (sessionLines < 1) {
    listenerLines = Math.max(0, listenerLines - 1);
    sessionLines = Math.max(1, bodyHeight - (1 + listenerLines) - (1 + logLines) - 1);
  }

  // Listener table.
  const lcols = layoutColumns(listenerColumns(), w);
  line(`{inverse}${fit(headerRow(lcols), w)}{/inverse}`, w);
  for (let i = 0; i < listenerLines; i++) {
    const l = listeners[i];
    if (!l) {
      line('');
      continue;
    }
    const text = row(lcols, l, now, (col, cw) => (col.key === 'spark' ? `{cyan-fg}${sparkline(l.history, cw, chrome.unicode)}{/cyan-fg}` : undefined));
    line(l.up ? text : `{red-fg}${text}{/red-fg}`);
  }

  // Session table (or the detail of one session).
  const rows = model.rows();
  const scols = layoutColumns(SESSION_COLUMNS, w);
  if (chrome.bans) {
    const bcols = layoutColumns(BAN_COLUMNS, w);
    line(`{inverse}${headerRow(bcols)}{/inverse}`);
    const bans = model.banRows();
    const selected = model.selectedBan();
    const at = selected ? bans.indexOf(selected) : 0;
    const start = Math.max(0, Math.min(at - sessionLines + 1, bans.length - sessionLines));
    for (let i = 0; i < sessionLines; i++) {
      const b = bans[Math.max(0, start) + i];
      if (!b) {
        line(i === 0 && bans.length === 0 ? esc(fit('  no bans', w)) : '');
        continue;
      }
      const text = row(bcols, b, now);
      line(selected && banKey(b) === banKey(selected) ? `{inverse}${text}{/inverse}` : text);
    }
  } else if (chrome.detail) {
    const title = ` session ${chrome.detail.id}  (Esc/Enter: back, K: kill, b: ban) `;
    line(`{inverse}${esc(fit(title, w))}{/inverse}`, w);
    const d = detailLines(chrome.detail, now);
    for (let i = 0; i < sessionLines; i++) line(esc(fit(d[i] ?? '', w)));
  } else {
    const head = headerRow(scols, SESSION_COLUMNS.find((c) => c.sort === model.sortKey)?.key, model.sortDesc, chrome.unicode);
    line(`{inverse}${head}{/inverse}`);
    const { start, rows: visible } = model.window(sessionLines);
    for (let i = 0; i < sessionLines; i++) {
      const s = visible[i];
      if (!s) {
        if (i === 0 && rows.length === 0) line(esc(fit(model.filter ? `  no session matches "${sanitize(model.filter)}"` : '  no sessions', w)));
        else line('');
        continue;
      }
      const text = row(scols, s, now);
      line(start + i === model.selectedIndex ? `{inverse}${text}{/inverse}` : text);
    }
  }

  // Event log, newest at the bottom.
  const count = chrome.bans ? `${model.bans.length} ban${model.bans.length === 1 ? '' : 's'}  (sessions: ${model.sessions.size})` : `${rows.length}${rows.length !== model.sessions.size ? `/${model.sessions.size}` : ''} sessions`;
  const where = model.filter ? `  filter "${sanitize(model.filter)}"` : '';
  const pos = rows.length > sessionLines ? `  ${model.selectedIndex + 1}/${rows.length}` : '';
  const info = chrome.bans ? ` ${count}` : ` ${count}  sort ${model.sortKey}${model.sortDesc ? ' desc' : ''}${where}${pos}`;
  const label = 'event log ';
  line(`{inverse}${esc(fit(info, Math.max(0, w - label.length)))}${esc(fit(label, Math.min(w, label.length), 'right'))}{/inverse}`, w);
  const entries = model.log.slice(-logLines);
  for (let i = 0; i < logLines; i++) {
    const e = entries[i];
    line(e ? logLine(e, w) : '');
  }

  // Bottom line.
  line(chrome.prompting ? `{inverse}${esc(fit(chrome.bottom, w))}{/inverse}` : `{bold}${esc(fit(chrome.bottom, w))}{/bold}`, chrome.prompting ? w : undefined);
  const lines = out.slice(0, height);
  // Without a UTF-8 locale: the few non-ASCII marks become ASCII of the same width.
  return chrome.unicode ? lines : lines.map((l) => l.replace(/…/g, '~').replace(/→/g, '>').replace(/●/g, '*').replace(/○/g, 'o'));
}

/** With several workers: how many serve (red when one is starting again after it died). */
function workersPart(workers: StatusInfo['workers']): { text: string; color?: string; priority: number }[] {
  if (!workers) return [];
  const ready = workers.filter((x) => x.state === 'ready').length;
  return [{ text: `workers ${ready}/${workers.length}`, priority: 5, ...(ready < workers.length ? { color: 'red' } : {}) }];
}

/** TLS reports taken (discovery.tls_rpt): how many, and the failed sessions they count (yellow when any). */
function tlsReportPart(t: StatusInfo['tlsReports']): { text: string; color?: string; priority: number }[] {
  if (!t) return [];
  return [{ text: `tls-rpt ${t.accepted} (${t.failure} failed sessions)`, priority: 2, ...(t.failure > 0 ? { color: 'yellow' } : {}) }];
}

function header(model: DashboardModel, w: number, now: number, chrome: Chrome): string[] {
  const st = model.status;
  const c = model.connection;
  const conn =
    c.kind === 'connected'
      ? { text: `${chrome.unicode ? '●' : '*'} live`, color: 'green' }
      : c.kind === 'connecting'
        ? { text: 'connecting…', color: 'yellow' }
        : { text: `${chrome.unicode ? '○' : 'o'} daemon unreachable ${humanDuration(now - c.since)}, reconnecting`, color: 'red' };
  const left1 = st
    ? `mailgate ${st.version}  pid ${st.pid}  up ${humanDuration(now - st.startedAt)}  ${chrome.configFile ?? st.configFile}`
    : `mailgate  ${chrome.socketPath}`;
  const right = ` ${conn.text}`;
  const l1 = `{bold}${esc(fit(left1, Math.max(0, w - right.length)))}{/bold}{${conn.color}-fg}${esc(right)}{/${conn.color}-fg}`;

  const t = model.totals();
  const up = st ? st.listeners.filter((l) => l.up).length : 0;
  const total = st ? st.listeners.length : 0;
  const down = st ? st.listeners.filter((l) => l.backendHealth && !l.backendHealth.ok && l.backendHealth.state !== 'misconfigured').map((l) => l.name) : [];
  const misconfigured = st ? st.listeners.filter((l) => l.backendHealth?.state === 'misconfigured').map((l) => l.name) : [];
  // Pool members the runtime's checks find down: named with their listener.
  const members = st ? st.listeners.flatMap((l) => (l.pool ?? []).map((m) => ({ listener: l.name, ...m }))) : [];
  const membersDown = members.filter((m) => !m.up);
  // Totals, most important kept when the line is narrow; shown in this order.
  const parts: { text: string; color?: string; priority: number }[] = [
    { text: `listeners ${up}/${total} up`, priority: 5, ...(up < total ? { color: 'red' } : {}) },
    ...workersPart(st?.workers),
    ...(down.length ? [{ text: `backend DOWN: ${down.join(',')}`, priority: 8, color: 'red' }] : []),
    ...(misconfigured.length ? [{ text: `backend MISCONFIGURED: ${misconfigured.join(',')}`, priority: 8, color: 'red' }] : []),
    ...(down.length || misconfigured.length ? [] : [{ text: 'backends ok', priority: 8 }]),
    ...(members.length > 0
      ? [
          {
            text: `pool ${members.length - membersDown.length}/${members.length} up${membersDown.length ? `: ${membersDown.map((m) => `${m.listener} ${m.backend} DOWN`).join(', ')}` : ''}`,
            priority: 8,
            ...(membersDown.length ? { color: 'red' } : {}),
          },
        ]
      : []),
    { text: `sessions ${t.sessions} (${t.authenticated} auth)`, priority: 9 },
    { text: `accepted ${t.accepted}`, priority: 3 },
    { text: `auth ok ${t.authOk} fail ${t.authFail}`, priority: 7 },
    { text: `refused ${t.refused}`, priority: 6 },
    { text: `bans ${st?.bans.supported ? model.bans.length : 'n/a'}`, priority: 4 },
    ...tlsReportPart(st?.tlsReports),
  ];
  let shown = st ? parts : parts.slice(2);
  const width = (ps: typeof parts) => ps.reduce((n, p) => n + p.text.length, 0) + 2 * Math.max(0, ps.length - 1);
  while (shown.length > 1 && width(shown) > w) {
    const drop = shown.reduce((lo, p) => (p.priority < lo.priority ? p : lo));
    shown = shown.filter((p) => p !== drop);
  }
  const l2 = shown.map((p) => (p.color ? `{${p.color}-fg}${esc(p.text)}{/${p.color}-fg}` : esc(p.text))).join('  ');

  const certs = st?.certs ?? [];
  let l3 = 'certs ';
  let used = 6;
  if (certs.length === 0) {
    l3 += esc('none loaded');
  }
  for (const cert of certs) {
    const piece = certPiece(cert);
    if (used + piece.text.length + 2 > w) break;
    l3 += piece.color ? `{${piece.color}-fg}${esc(piece.text)}{/${piece.color}-fg}  ` : `${esc(piece.text)}  `;
    used += piece.text.length + 2;
  }
  return [l1, l2, l3];
}

function certPiece(c: CertStatus): { text: string; color: string | null } {
  const name = c.names[0] ?? '?';
  const more = c.names.length > 1 ? `+${c.names.length - 1}` : '';
  if (c.renewal?.failing) return { text: `${name}${more} ${c.daysLeft}d RENEWAL FAILING`, color: 'red' };
  if (c.daysLeft < 0) return { text: `${name}${more} EXPIRED`, color: 'red' };
  if (c.daysLeft < 14) return { text: `${name}${more} ${c.daysLeft}d`, color: 'red' };
  if (c.source === 'self-signed') return { text: `${name}${more} ${c.daysLeft}d (self-signed: clients warn)`, color: 'yellow' };
  if (c.daysLeft < 30) return { text: `${name}${more} ${c.daysLeft}d`, color: 'yellow' };
  return { text: `${name}${more} ${c.daysLeft}d`, color: 'green' };
}

function logLine(e: LogEntry, w: number): string {
  const time = new Date(e.at).toTimeString().slice(0, 8);
  const text = esc(fit(`${time} ${e.text}`, w));
  return e.level === 'error' ? `{red-fg}${text}{/red-fg}` : e.level === 'warn' ? `{yellow-fg}${text}{/yellow-fg}` : text;
}

export function detailLines(s: SessionView, now: number): string[] {
  const rows: [string, string][] = [
    ['id', s.id],
    ['listener', `${s.listener} (${s.protocol})`],
    ['client', `${s.clientIp}:${s.clientPort}`],
    ['user', s.user ?? '-'],
    ['backend', s.backend ?? '-'],
    ['state', s.state],
    ['TLS', s.tlsVersion ? `${s.tlsVersion} ${s.tlsCipher ?? ''}` : '-'],
    ['started', `${new Date(s.startedAt).toISOString()} (${humanDuration(now - s.startedAt)} ago)`],
    ['last activity', `${humanDuration(now - s.lastActivity)} ago`],
    ['bytes in', `${s.bytesIn} (${humanBytes(s.bytesIn)})`],
    ['bytes out', `${s.bytesOut} (${humanBytes(s.bytesOut)})`],
  ];
  if (s.protocol === 'smtp') rows.push(['messages', `${s.messages}, ${s.recipients} recipients`]);
  return rows.map(([k, v]) => `  ${k.padEnd(14)} ${sanitize(v)}`);
}
