/**
 * ACME Renewal Information (ARI, RFC 9773), the pure parts: the certificate
 * identifier, the server's answer, picking the renewal time inside the
 * suggested window, and Retry-After. The request itself is made by
 * client.ts; acme-client 5.x knows nothing of ARI.
 */
import { X509Certificate } from 'node:crypto';
import forge from 'node-forge';
import { z } from 'zod';
import { MailgateError } from '../core/errors.ts';

const OID_AUTHORITY_KEY_IDENTIFIER = '2.5.29.35';

/**
 * The ARI certID (RFC 9773 §4.1): base64url of the Authority Key
 * Identifier's keyIdentifier, ".", base64url of the serial number's DER
 * content octets (with the leading zero a positive number with its top bit
 * set carries), both without padding.
 */
export function ariCertId(certPem: string | X509Certificate): string {
  const der = typeof certPem === 'string' ? new X509Certificate(certPem).raw : certPem.raw;
  let cert: forge.asn1.Asn1;
  try {
    cert = forge.asn1.fromDer(forge.util.createBuffer(der.toString('binary')));
  } catch (err) {
    throw new MailgateError('CERT_LOAD', 'the certificate is not valid DER', { cause: err });
  }
  const tbs = children(cert)[0];
  if (!tbs) throw new MailgateError('CERT_LOAD', 'the certificate has no tbsCertificate');
  const fields = children(tbs);
  // An explicit version ([0]) comes first when present; the serial number is the first INTEGER.
  const serial = fields.find((n) => n.tagClass === forge.asn1.Class.UNIVERSAL && n.type === forge.asn1.Type.INTEGER);
  if (!serial || typeof serial.value !== 'string') throw new MailgateError('CERT_LOAD', 'the certificate has no serial number');
  const extensions = fields.find((n) => n.tagClass === forge.asn1.Class.CONTEXT_SPECIFIC && n.type === 3);
  let keyId: string | undefined;
  for (const ext of extensions ? children(children(extensions)[0]) : []) {
    const parts = children(ext);
    const oid = parts[0];
    if (!oid || typeof oid.value !== 'string' || forge.asn1.derToOid(forge.util.createBuffer(oid.value)) !== OID_AUTHORITY_KEY_IDENTIFIER) continue;
    const octets = parts[parts.length - 1];
    if (!octets || typeof octets.value !== 'string') break;
    const aki = forge.asn1.fromDer(forge.util.createBuffer(octets.value));
    const id = children(aki).find((n) => n.tagClass === forge.asn1.Class.CONTEXT_SPECIFIC && n.type === 0);
    if (id && typeof id.value === 'string') keyId = id.value;
    break;
  }
  if (keyId === undefined) throw new MailgateError('CERT_LOAD', 'the certificate has no Authority Key Identifier, so it has no ARI certID');
  return `${b64url(keyId)}.${b64url(serial.value)}`;
}

function children(node: forge.asn1.Asn1 | undefined): forge.asn1.Asn1[] {
  return node && Array.isArray(node.value) ? node.value : [];
}

function b64url(binary: string): string {
  return Buffer.from(binary, 'binary').toString('base64url');
}

export interface RenewalWindow {
  start: Date;
  end: Date;
}

export interface RenewalInfo {
  window: RenewalWindow;
  explanationURL?: string;
}

const renewalInfoSchema = z.object({
  suggestedWindow: z.object({ start: z.iso.datetime({ offset: true }), end: z.iso.datetime({ offset: true }) }),
  explanationURL: z.string().optional(),
});

/** The server's RenewalInfo object; a window whose end is not after its start is refused (RFC 9773 §4.2). */
export function parseRenewalInfo(body: unknown): RenewalInfo {
  const r = renewalInfoSchema.safeParse(body);
  if (!r.success) throw new MailgateError('ACME', `renewalInfo answer is malformed: ${r.error.issues[0]?.message ?? 'invalid'}`);
  const start = new Date(r.data.suggestedWindow.start);
  const end = new Date(r.data.suggestedWindow.end);
  if (!(end.getTime() > start.getTime())) throw new MailgateError('ACME', 'renewalInfo window ends before it starts');
  return { window: { start, end }, ...(r.data.explanationURL ? { explanationURL: r.data.explanationURL } : {}) };
}

/** A uniformly random moment in the window (RFC 9773 §4.2); a moment in the past means "renew now". */
export function pickRenewalTime(window: RenewalWindow, random: () => number = Math.random): Date {
  const span = window.end.getTime() - window.start.getTime();
  return new Date(window.start.getTime() + Math.floor(random() * span));
}

export function sameWindow(a: RenewalWindow | undefined, b: RenewalWindow): boolean {
  return !!a && a.start.getTime() === b.start.getTime() && a.end.getTime() === b.end.getTime();
}

/** Retry-After as delta-seconds or an HTTP date, in ms from now; undefined when absent or unreadable. */
export function parseRetryAfter(header: unknown, now: number): number | undefined {
  if (typeof header !== 'string' || header.trim() === '') return undefined;
  const v = header.trim();
  if (/^\d+$/.test(v)) return Number(v) * 1000;
  const at = Date.parse(v);
  if (Number.isNaN(at)) return undefined;
  return Math.max(0, at - now);
}

/** RFC 9773 §4.3: poll again per Retry-After, read as at least a minute and at most a day; 6 h when absent. */
export const ARI_POLL_DEFAULT_MS = 6 * 3_600_000;
export function ariPollDelay(retryAfterMs: number | undefined, defaultMs = ARI_POLL_DEFAULT_MS): number {
  const ms = retryAfterMs ?? defaultMs;
  return Math.min(86_400_000, Math.max(60_000, ms));
}
