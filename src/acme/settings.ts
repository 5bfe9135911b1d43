/**
 * The `acme:` section resolved against the rest of the config: names default
 * to the host name, storage to tls.dir, paths relative to the config file.
 */
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import type { Config, Listener } from '../config/load.ts';
import { DEFAULT_ACME_RENEW } from '../config/schema-acme.ts';
import { errorMessage, MailgateError } from '../core/errors.ts';
import { discoveryNames } from '../discovery/settings.ts';
import type { ChallengeType, KeyType } from './client.ts';

export interface AcmeSettings {
  directory: string;
  email?: string;
  names: string[];
  challenge: ChallengeType;
  caBundleFile?: string;
  profile?: string;
  keyType: KeyType;
  /** Keep each name's key across renewals (DANE). */
  reuseKey: boolean;
  /** With reuseKey: how old a key may get before the next one takes over (a rollover); undefined: never. */
  keyRolloverMs: number | undefined;
  storage: string;
  renew: { checkIntervalMs: number; retryMinMs: number; retryMaxMs: number; lockWaitMs: number };
  requestTimeoutMs: number;
  /** The ordering lock (src/acme/lock.ts): the policy store's Redis, or the file lock in storage. */
  lock: LockSettings;
}

export type LockSettings = { type: 'file' } | { type: 'redis'; url: string; prefix: string; timeoutMs: number };

/** acme.lock `auto` (default) and `redis` use the policy store's Redis when it is one; `file` always the storage folder. */
function lockSettings(config: Config): LockSettings {
  const store = config.policy_store;
  if (config.acme?.lock === 'file' || store.type !== 'redis' || store.url === undefined) return { type: 'file' };
  return { type: 'redis', url: store.url, prefix: store.prefix, timeoutMs: store.timeout };
}

export function acmeSettings(config: Config): AcmeSettings | undefined {
  const a = config.acme;
  if (!a) return undefined;
  const renew = { ...DEFAULT_ACME_RENEW, ...Object.fromEntries(Object.entries(a.renew).filter(([, v]) => v !== undefined)) };
  return {
    directory: a.directory,
    ...(a.email ? { email: a.email } : {}),
    // The names configured (or the host name), then those the discovery features need (autoconfig., mta-sts., ...).
    names: [...new Set([...(a.names ? a.names : [config.hostname.toLowerCase()]), ...discoveryNames(config)])],
    challenge: a.challenge,
    ...(a.ca_bundle ? { caBundleFile: resolve(config.baseDir, a.ca_bundle) } : {}),
    ...(a.profile ? { profile: a.profile } : {}),
    keyType: a.key_type,
    reuseKey: a.reuse_key,
    keyRolloverMs: a.key_rollover,
    storage: a.storage ? resolve(config.baseDir, a.storage) : config.tls.dir,
    renew: {
      checkIntervalMs: renew.check_interval,
      retryMinMs: renew.retry_min,
      retryMaxMs: Math.max(renew.retry_min, renew.retry_max),
      lockWaitMs: renew.lock_wait,
    },
    requestTimeoutMs: a.request_timeout,
    lock: lockSettings(config),
  };
}

/** The extra CA certificates for the ACME server's HTTPS; read once per start or reload. */
export function readCaBundle(s: AcmeSettings): string | undefined {
  if (!s.caBundleFile) return undefined;
  try {
    const pem = readFileSync(s.caBundleFile, 'utf8');
    if (!pem.includes('-----BEGIN CERTIFICATE-----')) throw new Error('no PEM certificate in it');
    return pem;
  } catch (err) {
    throw new MailgateError('CONFIG_READ', `acme.ca_bundle ${s.caBundleFile}: ${errorMessage(err)}`, { cause: err });
  }
}

/** Settings whose change means a fresh start of the ACME machinery (other than the list of names). */
export function sameAccountSettings(a: AcmeSettings, b: AcmeSettings): boolean {
  return a.directory === b.directory && a.storage === b.storage && a.email === b.email && a.caBundleFile === b.caBundleFile && a.requestTimeoutMs === b.requestTimeoutMs;
}

/**
 * The CA must reach a listener that answers the challenge: tls-alpn-01 needs
 * an implicit-TLS listener (the CA connects to port 443), http-01 a plain
 * http listener (port 80). None at all is an error; none on that port is a
 * warning (fine behind a port forward, and in tests).
 */
export function challengeListenerProblems(s: AcmeSettings, listeners: readonly Listener[]): { error?: string; warning?: string } {
  const wantTls = s.challenge === 'tls-alpn-01';
  const capable = listeners.filter((l) => (wantTls ? l.tls === 'implicit' : l.protocol === 'http' && l.tls === 'none'));
  const port = wantTls ? 443 : 80;
  if (capable.length === 0) {
    return {
      error: wantTls
        ? 'acme.challenge is tls-alpn-01 but no listener has tls: implicit; add the https listener on port 443 (or use http-01 with a plain http listener on port 80)'
        : 'acme.challenge is http-01 but there is no plain http listener (protocol: http, tls: none); add one on port 80, e.g. with redirect_https: true',
    };
  }
  if (!capable.some((l) => l.listen.some((a) => a.port === port))) {
    return {
      warning: `the CA validates ${s.challenge} on port ${port} and no suitable listener binds it: make sure port ${port} reaches one of ${capable.map((l) => `"${l.name}"`).join(', ')}`,
    };
  }
  return {};
}

/** For `mailgate check`: what ACME will do, plus problems. */
export function acmeSummary(config: Config): { lines: string[]; error?: string; warning?: string } {
  const s = acmeSettings(config);
  if (!s) return { lines: [] };
  const lines = [
    `acme: ${s.names.join(', ')} from ${s.directory} by ${s.challenge}${s.profile ? `, profile ${s.profile}` : ''}, ${s.keyType} keys, stored in ${s.storage}, ordering lock: ${s.lock.type === 'redis' ? 'Redis (policy_store)' : 'file'}`,
  ];
  const r = challengeListenerProblems(s, config.listeners);
  let error = r.error;
  if (!error) {
    try {
      readCaBundle(s);
    } catch (err) {
      error = errorMessage(err);
    }
  }
  return { lines, ...(error ? { error } : {}), ...(r.warning ? { warning: r.warning } : {}) };
}
