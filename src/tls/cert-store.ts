/**
 * Certificates by host name for SNI. Lookups are synchronous map reads on
 * the handshake path; `put` swaps a name's context atomically, so the next
 * handshake uses the new certificate while live sessions keep theirs.
 *
 * The store keeps the PEMs it was given, so a primary process can hand its
 * whole content to worker processes (`snapshot` / `load`), and so every
 * context can be rebuilt when the session ticket keys rotate.
 */
import { createPrivateKey, X509Certificate, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type { Socket } from 'node:net';
import { createSecureContext, TLSSocket, type SecureContext, type TLSSocketOptions } from 'node:tls';
import { MailgateError } from '../core/errors.ts';
import { isAcmeTlsHandshake } from './acme-alpn.ts';
import { secureContextOptions } from './options.ts';

export type CertSource = 'file' | 'self-signed' | 'acme';

export interface CertInfo {
  names: string[];
  source: CertSource;
  issuer: string;
  subject: string;
  notBefore: Date;
  notAfter: Date;
  fingerprint256: string;
  certFile?: string;
}

interface Entry {
  info: CertInfo;
  context: SecureContext;
  certPem: string;
  keyPem: string;
}

/** Everything a store holds, as PEM: sent from the primary to its workers (src/cluster). */
export interface CertSnapshot {
  minVersion: 'TLSv1.2' | 'TLSv1.3';
  entries: { certPem: string; keyPem: string; source: CertSource; certFile?: string; isDefault: boolean }[];
  challenges: { name: string; certPem: string; keyPem: string }[];
}

/** What changed: a certificate was put (with its info), or anything else (reload, challenge, ticket keys). */
export type CertStoreChange = { kind: 'put'; info: CertInfo } | { kind: 'replaced' | 'challenge' | 'ticket-keys' };

export class CertStore {
  private byName = new Map<string, Entry>();
  private defaultEntry: Entry | undefined;
  private minVersion: 'TLSv1.2' | 'TLSv1.3';
  private listeners = new Set<(info: CertInfo) => void>();
  private readonly changeListeners = new Set<(change: CertStoreChange) => void>();
  /** TLS-ALPN-01 challenge certificates by name; served only to acme-tls/1 handshakes. Kept across replaceWith (reload). */
  private readonly challenges = new Map<string, { context: SecureContext; certPem: string; keyPem: string }>();
  /**
   * Session ticket keys (48 bytes) for every context, when set: OpenSSL
   * encrypts tickets with the keys of the context a handshake started on, so
   * workers that share these keys resume each other's tickets, and rotating
   * them bounds what a stolen key could decrypt (src/tls/ticket-keys.ts).
   */
  private ticketKeys: Buffer | undefined;

  /** `ticketKeys`: build every context with these from the start (a reload's new store: no second build in replaceWith). */
  constructor(minVersion: 'TLSv1.2' | 'TLSv1.3', ticketKeys?: Buffer) {
    this.minVersion = minVersion;
    this.ticketKeys = ticketKeys;
  }

  /** Adds or replaces the certificate for every name it covers. The first one put becomes the default. */
  put(certPem: string, keyPem: string, source: CertSource, opts: { certFile?: string; makeDefault?: boolean } = {}): CertInfo {
    let x509: X509Certificate;
    let context: SecureContext;
    try {
      x509 = new X509Certificate(certPem);
      context = this.context(certPem, keyPem);
    } catch (err) {
      throw new MailgateError('CERT_LOAD', `certificate${opts.certFile ? ` ${opts.certFile}` : ''} or its key is not usable: ${(err as Error).message}`, { cause: err });
    }
    if (!x509.checkPrivateKey(privateKey(keyPem))) {
      throw new MailgateError('CERT_LOAD', `the key does not belong to the certificate${opts.certFile ? ` ${opts.certFile}` : ''}`);
    }
    const info: CertInfo = {
      names: certNames(x509),
      source,
      issuer: x509.issuer.replace(/\n/g, ', '),
      subject: x509.subject.replace(/\n/g, ', '),
      notBefore: new Date(x509.validFrom),
      notAfter: new Date(x509.validTo),
      fingerprint256: x509.fingerprint256,
      ...(opts.certFile ? { certFile: opts.certFile } : {}),
    };
    const entry: Entry = { info, context, certPem, keyPem };
    for (const name of info.names) this.byName.set(name.toLowerCase(), entry);
    if (!this.defaultEntry || opts.makeDefault) this.defaultEntry = entry;
    else if (this.defaultEntry.info.names.some((n) => info.names.includes(n))) this.defaultEntry = entry;
    for (const l of this.listeners) l(info);
    this.changed({ kind: 'put', info });
    return info;
  }

  private context(certPem: string, keyPem: string): SecureContext {
    return createSecureContext({
      ...secureContextOptions(this.minVersion),
      cert: certPem,
      key: keyPem,
      ...(this.ticketKeys ? { ticketKeys: this.ticketKeys } : {}),
    });
  }

  loadFiles(certFile: string, keyFile: string, makeDefault = false): CertInfo {
    let cert: string;
    let key: string;
    try {
      cert = readFileSync(certFile, 'utf8');
      key = readFileSync(keyFile, 'utf8');
    } catch (err) {
      throw new MailgateError('CERT_LOAD', `cannot read ${certFile} / ${keyFile}: ${(err as Error).message}`, { cause: err });
    }
    return this.put(cert, key, 'file', { certFile, makeDefault });
  }

  /** Exact name, then the wildcard one level up, then the default. */
  contextFor(servername: string | undefined): SecureContext | undefined {
    if (servername) {
      const name = servername.toLowerCase();
      const exact = this.byName.get(name);
      if (exact) return exact.context;
      const dot = name.indexOf('.');
      if (dot > 0) {
        const wild = this.byName.get(`*${name.slice(dot)}`);
        if (wild) return wild.context;
      }
    }
    return this.defaultEntry?.context;
  }

  /** The PEMs served for a name (exact, wildcard, default), e.g. to sign a profile with (src/discovery). */
  pemFor(servername: string): { certPem: string; keyPem: string; info: CertInfo } | undefined {
    const name = servername.toLowerCase();
    const dot = name.indexOf('.');
    const e = this.byName.get(name) ?? (dot > 0 ? this.byName.get(`*${name.slice(dot)}`) : undefined) ?? this.defaultEntry;
    return e ? { certPem: e.certPem, keyPem: e.keyPem, info: e.info } : undefined;
  }

  /** The certificate served to clients without a matching SNI name. */
  defaultInfo(): CertInfo | undefined {
    return this.defaultEntry?.info;
  }

  /** Installs the TLS-ALPN-01 challenge certificate for a name until clearChallenge (RFC 8737). */
  setChallenge(name: string, certPem: string, keyPem: string): void {
    let context: SecureContext;
    try {
      context = this.context(certPem, keyPem);
    } catch (err) {
      throw new MailgateError('CERT_LOAD', `the TLS-ALPN-01 challenge certificate for ${name} is not usable: ${(err as Error).message}`, { cause: err });
    }
    this.challenges.set(name.toLowerCase(), { context, certPem, keyPem });
    this.changed({ kind: 'challenge' });
  }

  clearChallenge(name: string): void {
    if (this.challenges.delete(name.toLowerCase())) this.changed({ kind: 'challenge' });
  }

  has(name: string): boolean {
    return this.byName.has(name.toLowerCase());
  }

  infoFor(name: string): CertInfo | undefined {
    return this.byName.get(name.toLowerCase())?.info;
  }

  /** One row per distinct certificate. */
  list(): CertInfo[] {
    return [...new Set([...this.byName.values()].map((e) => e.info))];
  }

  /** Takes over another store's certificates (reload): listeners keep this object, so no server is rebuilt. */
  replaceWith(other: CertStore): void {
    this.byName = other.byName;
    this.defaultEntry = other.defaultEntry;
    this.minVersion = other.minVersion;
    // The other store's contexts were built without our ticket keys.
    if (this.ticketKeys && other.ticketKeys !== this.ticketKeys) this.rebuild();
    this.changed({ kind: 'replaced' });
  }

  /** A certificate was put (the dashboard's "cert" event). */
  onChange(listener: (info: CertInfo) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Anything changed: what a primary forwards to its workers. */
  onAnyChange(listener: (change: CertStoreChange) => void): () => void {
    this.changeListeners.add(listener);
    return () => this.changeListeners.delete(listener);
  }

  private changed(change: CertStoreChange): void {
    for (const l of this.changeListeners) l(change);
  }

  /** Every context from now on, and every current one (rebuilt), uses these ticket keys. */
  setTicketKeys(keys: Buffer): void {
    if (keys.length !== 48) throw new MailgateError('CERT_LOAD', `session ticket keys must be 48 bytes, got ${keys.length}`);
    this.ticketKeys = keys;
    this.rebuild();
    this.changed({ kind: 'ticket-keys' });
  }

  get currentTicketKeys(): Buffer | undefined {
    return this.ticketKeys;
  }

  /** New contexts for every entry and challenge (same PEMs): live sessions keep the ones they started with. */
  private rebuild(): void {
    const fresh = new Map<Entry, Entry>();
    const renew = (e: Entry): Entry => {
      let n = fresh.get(e);
      if (!n) {
        n = { ...e, context: this.context(e.certPem, e.keyPem) };
        fresh.set(e, n);
      }
      return n;
    };
    const byName = new Map<string, Entry>();
    for (const [name, e] of this.byName) byName.set(name, renew(e));
    this.byName = byName;
    if (this.defaultEntry) this.defaultEntry = renew(this.defaultEntry);
    for (const [name, c] of this.challenges) this.challenges.set(name, { ...c, context: this.context(c.certPem, c.keyPem) });
  }

  /** The store's content as PEM, for a worker process (src/cluster). */
  snapshot(): CertSnapshot {
    const entries = [...new Set(this.byName.values())];
    if (this.defaultEntry && !entries.includes(this.defaultEntry)) entries.push(this.defaultEntry);
    return {
      minVersion: this.minVersion,
      entries: entries.map((e) => ({
        certPem: e.certPem,
        keyPem: e.keyPem,
        source: e.info.source,
        ...(e.info.certFile === undefined ? {} : { certFile: e.info.certFile }),
        isDefault: e === this.defaultEntry,
      })),
      challenges: [...this.challenges].map(([name, c]) => ({ name, certPem: c.certPem, keyPem: c.keyPem })),
    };
  }

  /** Takes over a primary's snapshot: certificates and pending challenges, all at once. */
  load(snapshot: CertSnapshot): void {
    const next = new CertStore(snapshot.minVersion, this.ticketKeys);
    // The default last, so that it stays the default whatever the others cover.
    const ordered = [...snapshot.entries.filter((e) => !e.isDefault), ...snapshot.entries.filter((e) => e.isDefault)];
    for (const e of ordered) next.put(e.certPem, e.keyPem, e.source, { ...(e.certFile === undefined ? {} : { certFile: e.certFile }), makeDefault: e.isDefault });
    this.replaceWith(next);
    this.challenges.clear();
    for (const c of snapshot.challenges) this.setChallenge(c.name, c.certPem, c.keyPem);
  }

  /**
   * The server side of TLS on an accepted connection, for every listener:
   * clients without SNI (a URL with an IP address) get the default
   * certificate, renewals included; SNI picks by name; `alpn` chooses the
   * application protocol (tls/options.ts alpnSelector).
   */
  accept(raw: Socket, alpn: NonNullable<TLSSocketOptions['ALPNCallback']>): TLSSocket {
    return new TLSSocket(raw, { isServer: true, secureContext: this.contextFor(undefined), SNICallback: this.sniCallback, ALPNCallback: alpn });
  }

  /**
   * For tls.createServer / TLSSocket: SNI picks the context, falling back to
   * the default. An ACME TLS-ALPN-01 validation (see acme-alpn.ts) gets the
   * challenge certificate for its name, or a failed handshake when none is
   * pending. A function, not an arrow: node calls it with `this` set to the
   * TLSSocket.
   */
  readonly sniCallback = ((store: CertStore) =>
    function (this: unknown, servername: string, cb: (err: Error | null, ctx?: SecureContext) => void): void {
      if (isAcmeTlsHandshake(this)) {
        const challenge = store.challenges.get(servername.toLowerCase());
        if (challenge) cb(null, challenge.context);
        else cb(new MailgateError('CERT_LOAD', `acme-tls/1 asked for ${servername}, which has no pending challenge`));
        return;
      }
      const ctx = store.contextFor(servername);
      if (ctx) cb(null, ctx);
      else cb(new MailgateError('CERT_LOAD', 'no certificate loaded'));
    })(this);
}

function privateKey(pem: string): KeyObject {
  try {
    return createPrivateKey(pem);
  } catch (err) {
    throw new MailgateError('CERT_LOAD', `the private key is not usable: ${(err as Error).message}`, { cause: err });
  }
}

export function certNames(x509: X509Certificate): string[] {
  const names = new Set<string>();
  for (const part of (x509.subjectAltName ?? '').split(/,\s*/)) {
    if (part.startsWith('DNS:')) names.add(part.slice(4).toLowerCase());
  }
  if (names.size === 0) {
    const cn = /(?:^|\n)CN=([^\n]+)/.exec(x509.subject);
    if (cn?.[1]) names.add(cn[1].toLowerCase());
  }
  return [...names];
}
