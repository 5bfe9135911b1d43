/**
 * Where ACME state lives on disk, and nothing else: the account key and URL
 * per CA, the obtained certificate, key and metadata per name, and the file
 * locks that keep gateways sharing one folder from ordering at once.
 *
 *   <storage>/acme/<ca>/account.key          ECDSA P-256, mode 0600, created once
 *   <storage>/acme/<ca>/account.json         account URL and contact
 *   <storage>/acme/<ca>/certificates/<name>/<name>.crt   leaf + chain (0644)
 *   <storage>/acme/<ca>/certificates/<name>/<name>.key   mode 0600
 *   <storage>/acme/<ca>/certificates/<name>/<name>.json  what was ordered, when
 *   <storage>/acme/<ca>/certificates/<name>/<name>.next.key   a rollover's next key (0600)
 *   <storage>/acme/<ca>/certificates/<name>/<name>.next.json  when it was made
 *   <storage>/acme/locks/<name>.lock
 *
 * <ca> is the directory URL's host and path, <name> the host name, both made
 * safe as file names (safeFileStem). Certificates are kept per CA, so moving
 * from staging to production never serves a staging certificate. Every write
 * is atomic (temp file, fsync, rename); the key is written before the
 * certificate, and a pair whose key does not match is ignored on load.
 */
import { randomBytes, X509Certificate, createPrivateKey } from 'node:crypto';
import { hostname as osHostname } from 'node:os';
import { link, mkdir, open, readFile, stat, unlink, utimes } from 'node:fs/promises';
import { join } from 'node:path';
import { writeFileAtomic } from '../core/atomic-file.ts';
import { errorCode, errorMessage, MailgateError } from '../core/errors.ts';
import { certNames } from '../tls/cert-store.ts';
import { safeFileStem } from '../tls/self-signed.ts';

export interface CertPaths {
  dir: string;
  certFile: string;
  keyFile: string;
  metaFile: string;
}

export interface AccountRecord {
  url: string;
  directory: string;
  contact: string[];
  created: string;
}

/** What mailgate records next to each certificate. */
export interface CertMeta {
  name: string;
  directory: string;
  obtained: string;
  profile?: string;
  /** ARI certID of the certificate this one replaced, when `replaces` was sent. */
  replaced?: string;
  /** When the certificate's key was made (kept across renewals with acme.reuse_key). */
  keyCreated?: string;
}

/** A rollover's next key (acme.key_rollover): made ahead, used by the renewal after the one it was made at. */
export interface NextKey {
  keyPem: string;
  created: number;
}

export interface StoredCert {
  certPem: string;
  keyPem: string;
  x509: X509Certificate;
  meta: CertMeta | undefined;
  paths: CertPaths;
}

/** "acme-v02.api.letsencrypt.org-directory", "127.0.0.1_14000-dir". */
export function caKey(directoryUrl: string): string {
  const u = new URL(directoryUrl);
  const path = u.pathname.replace(/^\/+|\/+$/g, '').replace(/\//g, '-');
  return safeFileStem(path ? `${u.host}-${path}` : u.host);
}

export class AcmeStorage {
  readonly root: string;
  readonly caDir: string;
  readonly directory: string;

  constructor(storageDir: string, directoryUrl: string) {
    this.root = join(storageDir, 'acme');
    this.directory = directoryUrl;
    this.caDir = join(this.root, caKey(directoryUrl));
  }

  get accountKeyFile(): string {
    return join(this.caDir, 'account.key');
  }

  get accountFile(): string {
    return join(this.caDir, 'account.json');
  }

  certPaths(name: string): CertPaths {
    const stem = safeFileStem(name);
    const dir = join(this.caDir, 'certificates', stem);
    return { dir, certFile: join(dir, `${stem}.crt`), keyFile: join(dir, `${stem}.key`), metaFile: join(dir, `${stem}.json`) };
  }

  nextKeyPaths(name: string): { keyFile: string; metaFile: string } {
    const p = this.certPaths(name);
    const stem = safeFileStem(name);
    return { keyFile: join(p.dir, `${stem}.next.key`), metaFile: join(p.dir, `${stem}.next.json`) };
  }

  /** The next key of a rollover, if one was made (and both its files are there). */
  async loadNextKey(name: string): Promise<NextKey | undefined> {
    const p = this.nextKeyPaths(name);
    const [keyPem, meta] = await Promise.all([readOptional(p.keyFile), readOptional(p.metaFile)]);
    if (keyPem === undefined || meta === undefined) return undefined;
    try {
      const created = Date.parse(String((JSON.parse(meta) as { created?: unknown }).created));
      createPrivateKey(keyPem);
      return Number.isFinite(created) ? { keyPem, created } : undefined;
    } catch (err) {
      throw new MailgateError('CERT_LOAD', `${p.keyFile} or ${p.metaFile} is not usable: ${errorMessage(err)}`, { cause: err });
    }
  }

  /** Key first (0600), then when it was made; each write atomic. */
  async saveNextKey(name: string, next: NextKey): Promise<void> {
    const p = this.nextKeyPaths(name);
    await writeOrThrow(p.keyFile, next.keyPem, 0o600);
    await writeOrThrow(p.metaFile, `${JSON.stringify({ created: new Date(next.created).toISOString() }, null, 2)}\n`, 0o644);
  }

  /** The rollover is over (its key is the current one): the files go, metadata first. */
  async removeNextKey(name: string): Promise<void> {
    const p = this.nextKeyPaths(name);
    for (const f of [p.metaFile, p.keyFile]) {
      await unlink(f).catch((err: unknown) => {
        if (errorCode(err) !== 'ENOENT') throw new MailgateError('CERT_WRITE', `cannot remove ${f}: ${errorMessage(err)}`, { cause: err });
      });
    }
  }

  lockFile(name: string): string {
    return join(this.root, 'locks', `${safeFileStem(name)}.lock`);
  }

  /** The account key, or undefined when none was made yet. */
  async readAccountKey(): Promise<string | undefined> {
    return readOptional(this.accountKeyFile);
  }

  /**
   * Stores a new account key unless one appeared meanwhile (another gateway
   * on the same folder): the key on disk wins and is returned.
   */
  async createAccountKey(pem: string): Promise<{ pem: string; created: boolean }> {
    const file = this.accountKeyFile;
    const tmp = `${file}.${randomBytes(6).toString('hex')}.new`;
    try {
      await writeFileAtomic(tmp, pem, 0o600);
      try {
        // link() fails with EEXIST instead of replacing: create-if-absent, atomically, with the full content.
        await link(tmp, file);
        return { pem, created: true };
      } catch (err) {
        if (errorCode(err) !== 'EEXIST') throw err;
      }
    } catch (err) {
      throw new MailgateError('CERT_WRITE', `cannot write ${file}: ${errorMessage(err)}`, { cause: err });
    } finally {
      await unlink(tmp).catch((err: unknown) => {
        if (errorCode(err) !== 'ENOENT') throw new MailgateError('CERT_WRITE', `cannot remove ${tmp}: ${errorMessage(err)}`, { cause: err });
      });
    }
    const existing = await readOptional(file);
    if (existing === undefined) throw new MailgateError('CERT_LOAD', `${file} vanished while it was being created`);
    return { pem: existing, created: false };
  }

  async readAccount(): Promise<AccountRecord | undefined> {
    const text = await readOptional(this.accountFile);
    if (text === undefined) return undefined;
    try {
      const v = JSON.parse(text) as Partial<AccountRecord>;
      if (typeof v.url !== 'string' || v.directory !== this.directory) return undefined;
      return { url: v.url, directory: v.directory, contact: Array.isArray(v.contact) ? v.contact.map(String) : [], created: String(v.created ?? '') };
    } catch (err) {
      throw new MailgateError('CERT_LOAD', `${this.accountFile} is not valid JSON: ${errorMessage(err)}`, { cause: err });
    }
  }

  async writeAccount(rec: AccountRecord): Promise<void> {
    await writeOrThrow(this.accountFile, `${JSON.stringify(rec, null, 2)}\n`, 0o600);
  }

  /**
   * The stored certificate for a name, if there is a usable one: it parses,
   * the key matches, and it covers the name. Otherwise undefined, with the
   * reason in `problem` (a missing pair is no problem).
   */
  async loadCert(name: string): Promise<{ cert?: StoredCert; problem?: string }> {
    const paths = this.certPaths(name);
    const [certPem, keyPem, metaText] = await Promise.all([readOptional(paths.certFile), readOptional(paths.keyFile), readOptional(paths.metaFile)]);
    if (certPem === undefined && keyPem === undefined) return {};
    if (certPem === undefined || keyPem === undefined) return { problem: `${paths.dir} holds only half of a certificate/key pair` };
    let x509: X509Certificate;
    try {
      x509 = new X509Certificate(certPem);
      if (!x509.checkPrivateKey(createPrivateKey(keyPem))) return { problem: `${paths.keyFile} does not belong to ${paths.certFile}` };
    } catch (err) {
      return { problem: `${paths.certFile} or its key is not usable: ${errorMessage(err)}` };
    }
    if (!certNames(x509).includes(name.toLowerCase())) return { problem: `${paths.certFile} does not cover ${name}` };
    let meta: CertMeta | undefined;
    if (metaText !== undefined) {
      try {
        meta = JSON.parse(metaText) as CertMeta;
      } catch {
        meta = undefined;
      }
    }
    return { cert: { certPem, keyPem, x509, meta, paths } };
  }

  /** Key first (0600), then certificate, then metadata; each write atomic. */
  async saveCert(name: string, certPem: string, keyPem: string, meta: CertMeta): Promise<CertPaths> {
    const paths = this.certPaths(name);
    await writeOrThrow(paths.keyFile, keyPem, 0o600);
    await writeOrThrow(paths.certFile, certPem, 0o644);
    await writeOrThrow(paths.metaFile, `${JSON.stringify(meta, null, 2)}\n`, 0o644);
    return paths;
  }
}

async function readOptional(file: string): Promise<string | undefined> {
  try {
    return await readFile(file, 'utf8');
  } catch (err) {
    if (errorCode(err) === 'ENOENT') return undefined;
    throw new MailgateError('CERT_LOAD', `cannot read ${file}: ${errorMessage(err)}`, { cause: err });
  }
}

async function writeOrThrow(file: string, data: string, mode: number): Promise<void> {
  try {
    await writeFileAtomic(file, data, mode);
  } catch (err) {
    throw new MailgateError('CERT_WRITE', `cannot write ${file}: ${errorMessage(err)}`, { cause: err });
  }
}

// ---- file lock -----------------------------------------------------------------

/** A holder refreshes its lock file's time this often; a lock not refreshed for LOCK_STALE_MS is taken over. */
export const LOCK_REFRESH_MS = 20_000;
export const LOCK_STALE_MS = 120_000;

export interface FileLock {
  readonly file: string;
  release(): Promise<void>;
}

export interface LockOptions {
  /** Give up (ACME_LOCK error) after waiting this long for another holder. */
  waitMs: number;
  pollMs?: number;
  staleMs?: number;
  refreshMs?: number;
  /** Stop waiting when this says so (gateway stopping). */
  cancelled?: () => boolean;
  /** Told once when the lock is busy and we start waiting. */
  onWait?: (holder: string) => void;
  /** Refreshing the lock's time failed (it may be taken over as stale); reported, not fatal. */
  onRefreshError?: (err: unknown) => void;
}

/**
 * An O_EXCL lock file that works on a folder shared by several gateways
 * (local disk or NFSv3+, where O_EXCL create is atomic). The holder keeps its
 * mtime fresh; a lock whose holder died (no refresh for staleMs) is removed
 * and taken. Two waiters seeing the same stale lock at the same moment can
 * both take it; the cost is one duplicate order, which the CA tolerates.
 */
export async function acquireLock(file: string, opts: LockOptions): Promise<FileLock> {
  const staleMs = opts.staleMs ?? LOCK_STALE_MS;
  const refreshMs = opts.refreshMs ?? LOCK_REFRESH_MS;
  const pollMs = opts.pollMs ?? 1000;
  const token = randomBytes(8).toString('hex');
  const body = `${JSON.stringify({ pid: process.pid, host: osHostname(), token, at: new Date().toISOString() })}\n`;
  const deadline = Date.now() + opts.waitMs;
  let told = false;
  await mkdir(join(file, '..'), { recursive: true, mode: 0o700 });
  for (;;) {
    try {
      const fh = await open(file, 'wx', 0o600);
      try {
        await fh.writeFile(body);
      } finally {
        await fh.close();
      }
      break;
    } catch (err) {
      if (errorCode(err) !== 'EEXIST') throw new MailgateError('ACME_LOCK', `cannot create ${file}: ${errorMessage(err)}`, { cause: err });
    }
    let age: number;
    try {
      age = Date.now() - (await stat(file)).mtimeMs;
    } catch (err) {
      if (errorCode(err) === 'ENOENT') continue; // released between our create and stat: try again at once
      throw new MailgateError('ACME_LOCK', `cannot read ${file}: ${errorMessage(err)}`, { cause: err });
    }
    if (age > staleMs) {
      try {
        await unlink(file);
      } catch (err) {
        if (errorCode(err) !== 'ENOENT') throw new MailgateError('ACME_LOCK', `cannot remove the stale lock ${file}: ${errorMessage(err)}`, { cause: err });
      }
      continue;
    }
    if (!told) {
      told = true;
      opts.onWait?.((await readOptional(file).catch(() => undefined))?.trim() ?? 'unknown');
    }
    if (Date.now() >= deadline || opts.cancelled?.()) {
      throw new MailgateError('ACME_LOCK', `${file} is held by another gateway (waited ${Math.round(opts.waitMs / 1000)}s)`);
    }
    await new Promise((r) => setTimeout(r, Math.min(pollMs, Math.max(1, deadline - Date.now()))));
  }

  const refresh = setInterval(() => {
    const now = new Date();
    utimes(file, now, now).catch((err: unknown) => opts.onRefreshError?.(err));
  }, refreshMs);
  refresh.unref();
  let released = false;
  return {
    file,
    async release() {
      if (released) return;
      released = true;
      clearInterval(refresh);
      // Only our own lock is removed: after a long stall another gateway may have taken it over as stale.
      const current = await readOptional(file).catch(() => undefined);
      if (current === undefined || !current.includes(token)) return;
      try {
        await unlink(file);
      } catch (err) {
        if (errorCode(err) !== 'ENOENT') throw new MailgateError('ACME_LOCK', `cannot remove ${file}: ${errorMessage(err)}`, { cause: err });
      }
    },
  };
}
