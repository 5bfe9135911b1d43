/**
 * TLS-RPT (RFC 8460) reports posted to the gateway: read, bounded, counted.
 *
 * A report is a JSON document, gzipped (application/tlsrpt+gzip) or not
 * (application/tlsrpt+json), told apart by the gzip magic bytes. Bounds: at
 * most MAX_REPORT_BODY bytes on the wire, MAX_REPORT_JSON bytes once
 * decompressed (zlib stops there: a small bomb cannot grow in memory), at
 * most MAX_POLICIES policies. What is kept is a summary: per policy domain
 * (one of ours, else "other"), the successful and failed session counts and
 * the failures by result type (RFC 8460's registry, else "other"); the
 * sender's organization name and report id are kept as short printable text
 * for the dashboard, never as metric labels.
 *
 * The serving part reads reports (parseTlsReport); the runtime counts them
 * (TlsReportLog), in this process or, with workers, from their messages.
 */
import { gunzipSync } from 'node:zlib';

export const MAX_REPORT_BODY = 256 * 1024;
export const MAX_REPORT_JSON = 4 * 1024 * 1024;
const MAX_POLICIES = 1000;
const MAX_FAILURE_DETAILS = 10_000;

/** RFC 8460 §4.3 result types (and the IANA registry's): anything else is counted as "other". */
export const RESULT_TYPES = [
  'starttls-not-supported',
  'certificate-host-mismatch',
  'certificate-expired',
  'certificate-not-trusted',
  'validation-failure',
  'tlsa-invalid',
  'dnssec-invalid',
  'dane-required',
  'sts-policy-fetch-error',
  'sts-policy-invalid',
  'sts-webpki-invalid',
] as const;

export interface DomainSummary {
  domain: string;
  success: number;
  failure: number;
  /** Failed sessions by result type. */
  failures: Record<string, number>;
}

export type TlsReportOutcome =
  | { ok: true; at: number; organization: string; reportId: string; domains: DomainSummary[] }
  | { ok: false; at: number; reason: 'too-large' | 'bad-gzip' | 'bad-json' | 'not-a-report' };

/** Reads one posted report; a refusal says why (the client gets 400 or 413). */
export function parseTlsReport(body: Buffer, ourDomains: readonly string[], now = Date.now()): TlsReportOutcome {
  if (body.length > MAX_REPORT_BODY) return { ok: false, at: now, reason: 'too-large' };
  let json = body;
  if (body.length >= 2 && body[0] === 0x1f && body[1] === 0x8b) {
    try {
      json = gunzipSync(body, { maxOutputLength: MAX_REPORT_JSON });
    } catch (err) {
      return { ok: false, at: now, reason: err instanceof RangeError || (err as { code?: string }).code === 'ERR_BUFFER_TOO_LARGE' ? 'too-large' : 'bad-gzip' };
    }
  }
  if (json.length > MAX_REPORT_JSON) return { ok: false, at: now, reason: 'too-large' };
  let doc: unknown;
  try {
    doc = JSON.parse(json.toString('utf8'));
  } catch {
    return { ok: false, at: now, reason: 'bad-json' };
  }
  if (!isObject(doc) || !Array.isArray(doc.policies) || doc.policies.length > MAX_POLICIES) return { ok: false, at: now, reason: 'not-a-report' };
  const byDomain = new Map<string, DomainSummary>();
  let details = 0;
  for (const p of doc.policies) {
    if (!isObject(p) || !isObject(p.policy) || !isObject(p.summary)) return { ok: false, at: now, reason: 'not-a-report' };
    const named = typeof p.policy['policy-domain'] === 'string' ? p.policy['policy-domain'].toLowerCase().replace(/\.$/, '') : '';
    const domain = ourDomains.includes(named) ? named : 'other';
    const s = byDomain.get(domain) ?? { domain, success: 0, failure: 0, failures: {} };
    s.success += count(p.summary['total-successful-session-count']);
    s.failure += count(p.summary['total-failure-session-count']);
    const list = Array.isArray(p['failure-details']) ? p['failure-details'] : [];
    details += list.length;
    if (details > MAX_FAILURE_DETAILS) return { ok: false, at: now, reason: 'not-a-report' };
    for (const f of list) {
      if (!isObject(f)) continue;
      const raw = f['result-type'];
      const type = typeof raw === 'string' && (RESULT_TYPES as readonly string[]).includes(raw) ? raw : 'other';
      s.failures[type] = (s.failures[type] ?? 0) + count(f['failed-session-count']);
    }
    byDomain.set(domain, s);
  }
  return { ok: true, at: now, organization: text(doc['organization-name']), reportId: text(doc['report-id']), domains: [...byDomain.values()] };
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** A session count: a non-negative integer (capped), else 0. */
function count(v: unknown): number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v > 0 ? Math.min(v, 1e12) : 0;
}

/** Sender-chosen text, shown on the dashboard: printable, short. */
function text(v: unknown): string {
  if (typeof v !== 'string') return '';
  // eslint-disable-next-line no-control-regex
  return v.replace(/[\u0000-\u001f\u007f-\u009f]/g, '?').slice(0, 100);
}

// ---- the runtime's count --------------------------------------------------------------

export interface TlsReportTotals {
  reports: { accepted: number; refused: number };
  /** Per domain (ours, or "other"): sessions and failures by type, added over every report since start. */
  domains: DomainSummary[];
  /** The last reports, newest last (at most 20). */
  recent: TlsReportOutcome[];
}

const RECENT = 20;

/** Every report the gateway took since it started, for the metrics, `mailgate status` and the dashboard. */
export class TlsReportLog {
  private accepted = 0;
  private refused = 0;
  private readonly byDomain = new Map<string, DomainSummary>();
  private readonly recent: TlsReportOutcome[] = [];
  private readonly listeners = new Set<(r: TlsReportOutcome) => void>();

  record(r: TlsReportOutcome): void {
    if (r.ok) {
      this.accepted++;
      for (const d of r.domains) {
        const t = this.byDomain.get(d.domain) ?? { domain: d.domain, success: 0, failure: 0, failures: {} };
        t.success += d.success;
        t.failure += d.failure;
        for (const [type, n] of Object.entries(d.failures)) t.failures[type] = (t.failures[type] ?? 0) + n;
        this.byDomain.set(d.domain, t);
      }
    } else this.refused++;
    this.recent.push(r);
    if (this.recent.length > RECENT) this.recent.shift();
    for (const l of this.listeners) l(r);
  }

  totals(): TlsReportTotals {
    return {
      reports: { accepted: this.accepted, refused: this.refused },
      domains: [...this.byDomain.values()].map((d) => ({ ...d, failures: { ...d.failures } })),
      recent: [...this.recent],
    };
  }

  onReport(listener: (r: TlsReportOutcome) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
}
