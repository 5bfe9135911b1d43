/**
 * Certificate maintenance: one schedule per name, orders through the CA,
 * hot swap into the CertStore. The certmagic model: the CertStore is the
 * cache, AcmeStorage the storage, this the renewal; a failed renewal never
 * takes the current certificate away.
 *
 * Per name, at each wake-up (timer, `renew` command, start):
 *   1. adopt a newer certificate another gateway wrote to shared storage;
 *   2. work out when renewal is due: ARI's suggested window when the CA
 *      offers it (a random moment inside it, kept while the window stays the
 *      same), otherwise a third of the lifetime left (half under 10 days);
 *   3. due (or forced) and not backing off: order, under the name's ordering
 *      lock (Redis when the policy store is Redis, else a file lock; lock.ts),
 *      with `replaces` when ARI is on; success swaps the certificate in,
 *      failure backs off exponentially with jitter (Retry-After as a floor);
 *   4. sleep until the earliest of: due, retry, next ARI poll, check_interval.
 * Orders run one at a time per gateway. Timers are unref'd and cleared by stop().
 *
 * Keys (DANE, RFC 7672): with acme.reuse_key an order uses the stored key,
 * so a `3 1 1` TLSA record stays valid across renewals. With key_rollover,
 * a renewal at which the key would be older than that by the next renewal
 * first makes the next key (stored beside the current one, listed by
 * `mailgate dns` and `mailgate certs`); the renewal after that, one renewal
 * period later, uses it. A next key made between renewals (another gateway,
 * a restart) waits one more: it is used only by a renewal that comes after
 * a certificate obtained after it was made.
 */
import { X509Certificate } from 'node:crypto';
import type { Config, Listener } from '../config/load.ts';
import { errorMessage, MailgateError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import type { CertStore } from '../tls/cert-store.ts';
import { certNames } from '../tls/cert-store.ts';
import { spkiSha256 } from '../tls/spki.ts';
import { ariCertId, ariPollDelay, pickRenewalTime, sameWindow, type RenewalWindow } from './ari.ts';
import { AcmeAccount, AcmeError, closeAcmeHttp, configureAcmeHttp, createCertKey, keyIsOfType } from './client.ts';
import { backoffDelay, criticalAt, fallbackRenewAt, MAX_TIMER_MS } from './schedule.ts';
import { acmeSettings, challengeListenerProblems, readCaBundle, sameAccountSettings, type AcmeSettings } from './settings.ts';
import { orderLockFor, type OrderLock } from './lock.ts';
import { AcmeStorage, type StoredCert } from './storage.ts';

const DAY = 86_400_000;

export type CertState = 'pending' | 'obtaining' | 'valid' | 'renewing' | 'failing' | 'critical' | 'expired';

/** One row of `mailgate certs`. Times are ISO strings so the object crosses the control socket as is. */
export interface CertStatus {
  name: string;
  state: CertState;
  /** What a client asking for this name gets right now. */
  serving: 'acme' | 'self-signed' | 'file' | 'none';
  issuer?: string;
  notBefore?: string;
  notAfter?: string;
  daysLeft?: number;
  nextRenewal?: string;
  /** Why nextRenewal is what it is. */
  basis?: 'ari' | 'lifetime' | 'retry' | 'now';
  ariWindow?: { start: string; end: string; explanationURL?: string };
  failures: number;
  lastError?: string;
  lastErrorAt?: string;
  lastRenewed?: string;
  /** With acme.reuse_key: TLSA 3 1 1 data of the key in use and, during a rollover, of the next one (and when it takes over). */
  keys?: { current: string; next?: { data: string; note: string } };
}

export interface RenewResult {
  name: string;
  ok: boolean;
  error?: string;
  notAfter?: string;
}

interface Current {
  x509: X509Certificate;
  notBefore: Date;
  notAfter: Date;
  fingerprint: string;
  issuer: string;
  certId: string | undefined;
}

interface AriState {
  window: RenewalWindow;
  explanationURL?: string;
  /** The moment picked inside the window (kept while the window does not change). */
  renewAt: number;
  nextPollAt: number;
}

interface Managed {
  readonly name: string;
  removed: boolean;
  /** A wake-up is being handled; a second one only sets `again`. */
  busy: boolean;
  again: boolean;
  ordering: boolean;
  forced: boolean;
  cert: Current | undefined;
  ari: AriState | undefined;
  /** ARI poll failed: when to try again (the lifetime rule applies meanwhile). */
  ariRetryAt: number | undefined;
  failures: number;
  retryAt: number | undefined;
  retryAfterMs: number | undefined;
  lastError: string | undefined;
  lastErrorAt: number | undefined;
  lastRenewed: number | undefined;
  nextWakeAt: number | undefined;
  timer: NodeJS.Timeout | undefined;
  waiters: ((r: RenewResult) => void)[];
  /** A rollover's next key (storage holds it): its TLSA data, when it was made. */
  next: { data: string; created: number } | undefined;
  /** When the current certificate was obtained (its metadata), to tell whether the next key has been published a renewal period. */
  obtained: number | undefined;
}

export interface AcmeManagerOptions {
  now?: () => number;
  random?: () => number;
}

export class AcmeManager {
  private settings: AcmeSettings;
  private readonly certs: CertStore;
  private readonly log: Logger;
  private readonly now: () => number;
  private readonly random: () => number;
  private storage: AcmeStorage;
  private lock: OrderLock;
  private account: AcmeAccount;
  private readonly managed = new Map<string, Managed>();
  /** HTTP-01 tokens → key authorizations, answered by plain http listeners. */
  private readonly tokens = new Map<string, string>();
  private queue: Promise<unknown> = Promise.resolve();
  private ariOffered: boolean | undefined;
  private readonly updateListeners = new Set<(name: string) => void>();
  private readonly tokenListeners = new Set<(tokens: ReadonlyMap<string, string>) => void>();
  private started = false;
  private stopped = false;

  /** Throws when the config's acme: section cannot work (no listener for the challenge, unreadable ca_bundle). */
  static check(config: Config, log: Logger): void {
    const s = acmeSettings(config);
    if (!s) return;
    checkChallengeListeners(s, config.listeners, log);
    readCaBundle(s);
  }

  /**
   * What a reload does to ACME: the running manager follows the new settings,
   * or stops when the section is gone; without one, a new manager is made
   * (`created`: not started, so that the caller can attach it first).
   */
  static async afterReload(current: AcmeManager | undefined, next: Config, certs: CertStore, log: Logger): Promise<{ acme: AcmeManager | undefined; created: boolean }> {
    if (!next.acme) {
      await current?.stop();
      return { acme: undefined, created: false };
    }
    if (current) {
      await current.update(next);
      return { acme: current, created: false };
    }
    return { acme: AcmeManager.fromConfig(next, certs, log), created: true };
  }

  /** undefined when the config has no `acme:` section. */
  static fromConfig(config: Config, certs: CertStore, log: Logger, opts: AcmeManagerOptions = {}): AcmeManager | undefined {
    const s = acmeSettings(config);
    if (!s) return undefined;
    checkChallengeListeners(s, config.listeners, log);
    return new AcmeManager(s, certs, log, opts);
  }

  constructor(settings: AcmeSettings, certs: CertStore, log: Logger, opts: AcmeManagerOptions = {}) {
    this.settings = settings;
    this.certs = certs;
    this.log = log.child({ component: 'acme' });
    this.now = opts.now ?? Date.now;
    this.random = opts.random ?? Math.random;
    configureAcmeHttp(httpOptions(settings));
    this.storage = new AcmeStorage(settings.storage, settings.directory);
    this.lock = orderLockFor(settings, this.storage, this.log);
    this.account = this.newAccount();
  }

  /** For plain http listeners (the gateway passes it to them as a dependency): `/.well-known/acme-challenge/<token>`. */
  readonly http01Responder = (token: string): string | undefined => this.tokens.get(token);

  /** Told of every change of the pending HTTP-01 answers (http01.ts follows them for the serving part). */
  onTokens(listener: (tokens: ReadonlyMap<string, string>) => void): () => void {
    this.tokenListeners.add(listener);
    return () => this.tokenListeners.delete(listener);
  }

  /** The HTTP-01 answers pending now (a worker that starts mid-order needs them). */
  pendingTokens(): [string, string][] {
    return [...this.tokens];
  }

  private tokensChanged(): void {
    for (const l of this.tokenListeners) l(this.tokens);
  }

  /** Loads what storage holds and starts every name's schedule. */
  async start(): Promise<void> {
    if (this.started || this.stopped) return;
    this.started = true;
    this.log.info({ directory: this.settings.directory, names: this.settings.names, challenge: this.settings.challenge, storage: this.storage.caDir, lock: this.lock.kind }, 'ACME certificate management on');
    for (const name of this.settings.names) await this.add(name);
  }

  /**
   * Reload (after AcmeManager.check passed): new names start, dropped ones
   * stop; per-name state survives unless the CA or storage changed.
   */
  async update(config: Config): Promise<void> {
    const next = acmeSettings(config);
    if (!next || this.stopped) return;
    const fresh = !sameAccountSettings(this.settings, next);
    this.settings = next;
    if (fresh) {
      configureAcmeHttp(httpOptions(next));
      this.storage = new AcmeStorage(next.storage, next.directory);
      this.account = this.newAccount();
      this.ariOffered = undefined;
      for (const m of this.managed.values()) this.remove(m);
      this.managed.clear();
    }
    // Holds nothing between orders: rebuilt for the new storage folder or policy store (an order in flight keeps its own).
    this.lock = orderLockFor(next, this.storage, this.log);
    for (const m of [...this.managed.values()]) {
      if (!next.names.includes(m.name)) {
        this.remove(m);
        this.managed.delete(m.name);
      }
    }
    // The reload rebuilt the CertStore from storage (bootstrap); each name re-checks its schedule.
    for (const name of next.names) {
      const m = this.managed.get(name);
      if (m) this.kick(m);
      else await this.add(name);
    }
  }

  /** Stops every timer; an order in flight stops at its next step. Safe to call twice. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    for (const m of this.managed.values()) this.remove(m);
    // Give an order in flight a moment to reach a checkpoint and release its lock and challenge.
    await Promise.race([this.queue, new Promise((r) => setTimeout(r, 2000).unref())]);
    closeAcmeHttp();
  }

  /** Forces renewal of the named certificates (all when none named), through the lock and the queue. */
  renew(names?: readonly string[]): Promise<RenewResult[]> {
    const wanted = names && names.length > 0 ? names.map((n) => n.toLowerCase()) : [...this.managed.keys()];
    return Promise.all(
      wanted.map((name) => {
        const m = this.managed.get(name);
        if (!m || this.stopped) return Promise.resolve<RenewResult>({ name, ok: false, error: this.stopped ? 'stopping' : `${name} is not an ACME-managed name` });
        return new Promise<RenewResult>((resolve) => {
          m.waiters.push(resolve);
          m.forced = true;
          this.log.info({ name }, 'renewal forced');
          this.kick(m);
        });
      }),
    );
  }

  status(): CertStatus[] {
    return [...this.managed.values()].map((m) => this.statusOf(m));
  }

  /** Whether this manager orders certificates for the name. */
  manages(name: string): boolean {
    return this.managed.has(name.toLowerCase());
  }

  /** A rollover's next key for a name (TLSA 3 1 1 data), and when it takes over; undefined when none is pending. */
  nextKey(name: string): { data: string; note: string } | undefined {
    const m = this.managed.get(name.toLowerCase());
    if (!m?.next) return undefined;
    return { data: m.next.data, note: this.nextNote(m, m.next) };
  }

  private nextNote(m: Managed, next: { created: number }): string {
    const made = `made ${new Date(next.created).toISOString()}`;
    const due = m.cert ? new Date(this.dueAt(m)).toISOString().replace(/\.\d+Z$/, 'Z') : 'now';
    if (m.obtained !== undefined && next.created < m.obtained) return `${made}; it takes over at the next renewal (due ${due})`;
    // The renewal that made it (or one already due) keeps the current key: the key must be listed a whole period first.
    if (m.ordering) return `${made}; the renewal in progress keeps the current key, the one after it uses this`;
    return `${made}; the next renewal (due ${due}) keeps the current key, the one after uses this`;
  }

  /** Renewal facts for a certificate the CertStore serves (control socket, dashboard); null when ACME does not manage its names. */
  renewalFor(info: { names: readonly string[] }): { failing: boolean; lastError: string | null; nextAttemptAt: number | null } | null {
    const m = info.names.map((n) => this.managed.get(n.toLowerCase())).find((x) => x !== undefined);
    if (!m) return null;
    const st = this.statusOf(m);
    return { failing: m.failures > 0, lastError: m.lastError ?? null, nextAttemptAt: st.nextRenewal ? Date.parse(st.nextRenewal) : null };
  }

  /** Told the name after every renewal attempt, successful or not (for control-socket events). */
  onUpdate(listener: (name: string) => void): () => void {
    this.updateListeners.add(listener);
    return () => this.updateListeners.delete(listener);
  }

  private updated(name: string): void {
    for (const l of this.updateListeners) {
      try {
        l(name);
      } catch (err) {
        this.log.error({ name, err: errorMessage(err) }, 'a certificate update listener failed');
      }
    }
  }

  // ---- per name -----------------------------------------------------------------------

  private async add(name: string): Promise<void> {
    const m: Managed = {
      name,
      removed: false,
      busy: false,
      again: false,
      ordering: false,
      forced: false,
      cert: undefined,
      ari: undefined,
      ariRetryAt: undefined,
      failures: 0,
      retryAt: undefined,
      retryAfterMs: undefined,
      lastError: undefined,
      lastErrorAt: undefined,
      lastRenewed: undefined,
      nextWakeAt: undefined,
      timer: undefined,
      waiters: [],
      next: undefined,
      obtained: undefined,
    };
    this.managed.set(name, m);
    await this.adoptFromDisk(m, 'start');
    await this.loadNext(m);
    if (!m.cert) {
      const serving = this.certs.contextFor(name) ? (this.certs.infoFor(name)?.source ?? this.certs.defaultInfo()?.source) : undefined;
      this.log.warn({ name, serving: serving ?? 'none' }, `no ACME certificate for ${name} yet: serving the ${serving ?? 'no'} certificate until the first one arrives`);
    }
    this.kick(m);
  }

  private remove(m: Managed): void {
    m.removed = true;
    clearTimeout(m.timer);
    m.timer = undefined;
    for (const w of m.waiters.splice(0)) w({ name: m.name, ok: false, error: 'no longer managed' });
  }

  private kick(m: Managed): void {
    if (m.removed || this.stopped) return;
    if (m.busy) {
      m.again = true;
      return;
    }
    clearTimeout(m.timer);
    m.timer = undefined;
    m.busy = true;
    this.wake(m)
      .catch((err: unknown) => {
        // wake() handles its own failures; reaching this is a bug, and the schedule must go on regardless.
        this.log.error({ name: m.name, err: errorMessage(err), stack: (err as Error).stack }, 'certificate maintenance failed unexpectedly');
        this.sleep(m, this.now() + this.settings.renew.retryMinMs);
      })
      .finally(() => {
        m.busy = false;
        if (m.again && !m.removed && !this.stopped) {
          m.again = false;
          this.kick(m);
        }
      });
  }

  private async wake(m: Managed): Promise<void> {
    if (await this.adoptFromDisk(m, 'shared storage')) await this.loadNext(m);
    if (m.removed || this.stopped) return;
    let now = this.now();
    if (m.cert) await this.pollAri(m, now);
    now = this.now();
    const forced = m.forced;
    const due = this.dueAt(m);
    if (!forced && m.retryAt !== undefined && m.retryAt > now) {
      this.sleep(m, Math.min(m.retryAt, this.nextCheck(m, now)));
      return;
    }
    if (forced || due <= now) {
      await this.renewNow(m, forced ? 'forced' : m.cert ? 'due' : 'first');
      if (m.removed || this.stopped) return;
      now = this.now();
      if (m.retryAt !== undefined && m.failures > 0) {
        this.sleep(m, m.retryAt);
        return;
      }
      // A new certificate: ask for its window right away (also finds out whether the CA offers ARI at all).
      if (m.cert) await this.pollAri(m, now);
      now = this.now();
    }
    this.sleep(m, Math.min(this.dueAt(m), this.nextCheck(m, now)));
  }

  /** When renewal is due: ARI's pick, else the lifetime rule; now when there is no certificate. */
  private dueAt(m: Managed): number {
    if (!m.cert) return this.now();
    if (m.ari) return m.ari.renewAt;
    return fallbackRenewAt(m.cert).getTime();
  }

  private nextCheck(m: Managed, now: number): number {
    let at = now + this.settings.renew.checkIntervalMs;
    if (m.ari) at = Math.min(at, m.ari.nextPollAt);
    if (m.ariRetryAt !== undefined) at = Math.min(at, m.ariRetryAt);
    return at;
  }

  private sleep(m: Managed, at: number): void {
    if (m.removed || this.stopped) return;
    clearTimeout(m.timer);
    const delay = Math.min(MAX_TIMER_MS, Math.max(0, at - this.now()));
    m.nextWakeAt = this.now() + delay;
    m.timer = setTimeout(() => this.kick(m), delay);
    m.timer.unref();
    this.log.debug({ name: m.name, wakeAt: new Date(m.nextWakeAt).toISOString() }, 'next certificate check');
  }

  private async pollAri(m: Managed, now: number): Promise<void> {
    const cert = m.cert;
    if (!cert?.certId || this.ariOffered === false) return;
    if (m.ari && m.ari.nextPollAt > now) return;
    if (m.ariRetryAt !== undefined && m.ariRetryAt > now) return;
    try {
      const r = await this.account.renewalInfo(cert.certId);
      if (!r) {
        if (this.ariOffered === undefined) this.log.info('the CA offers no renewal information (ARI); renewing when a third of the lifetime is left (half under 10 days)');
        this.ariOffered = false;
        return;
      }
      this.ariOffered = true;
      m.ariRetryAt = undefined;
      const at = this.now();
      const changed = !sameWindow(m.ari?.window, r.info.window);
      const renewAt = changed || !m.ari ? pickRenewalTime(r.info.window, this.random).getTime() : m.ari.renewAt;
      m.ari = {
        window: r.info.window,
        ...(r.info.explanationURL ? { explanationURL: r.info.explanationURL } : {}),
        renewAt,
        nextPollAt: at + ariPollDelay(r.retryAfterMs, this.settings.renew.checkIntervalMs),
      };
      if (changed) {
        const early = r.info.window.start.getTime() < fallbackRenewAt(cert).getTime() - DAY && r.info.window.start.getTime() <= at;
        this.log[early ? 'warn' : 'info'](
          {
            name: m.name,
            windowStart: r.info.window.start.toISOString(),
            windowEnd: r.info.window.end.toISOString(),
            renewAt: new Date(renewAt).toISOString(),
            ...(r.info.explanationURL ? { explanationURL: r.info.explanationURL } : {}),
          },
          early ? 'the CA asks for early renewal (ARI)' : 'renewal window from the CA (ARI)',
        );
      }
    } catch (err) {
      m.ariRetryAt = this.now() + Math.min(this.settings.renew.checkIntervalMs, Math.max(this.settings.renew.retryMinMs, 3_600_000));
      this.log.warn({ name: m.name, err: errorMessage(err), retryAt: new Date(m.ariRetryAt).toISOString() }, 'renewal information (ARI) unavailable; the lifetime rule applies meanwhile');
    }
  }

  private renewNow(m: Managed, why: 'forced' | 'due' | 'first'): Promise<void> {
    m.ordering = true;
    const run = async (): Promise<void> => {
      const result: RenewResult = { name: m.name, ok: false };
      try {
        if (m.removed || this.stopped) {
          result.error = 'stopping';
          return;
        }
        await this.orderUnderLock(m, why);
        result.ok = true;
        if (m.cert) result.notAfter = m.cert.notAfter.toISOString();
      } catch (err) {
        result.error = errorMessage(err);
        this.failed(m, err);
      } finally {
        m.ordering = false;
        m.forced = false;
        for (const w of m.waiters.splice(0)) w(result);
        this.updated(m.name);
      }
    };
    const p = this.queue.then(run);
    // The queue only orders the work; each run reports its own outcome above.
    this.queue = p.catch(() => undefined);
    return p;
  }

  private async orderUnderLock(m: Managed, why: 'forced' | 'due' | 'first'): Promise<void> {
    const s = this.settings;
    const lock = await this.lock.acquire(m.name, {
      waitMs: s.renew.lockWaitMs,
      cancelled: () => this.stopped || m.removed,
      onWait: (holder) => this.log.info({ name: m.name, holder }, 'another gateway is ordering this certificate; waiting for it'),
      onRefreshError: (err) => this.log.warn({ name: m.name, err: errorMessage(err) }, 'cannot refresh the ordering lock; another gateway may take it over'),
    });
    try {
      // Whoever held the lock before us may have renewed already.
      if (why !== 'forced' && (await this.adoptFromDisk(m, 'shared storage')) && this.dueAt(m) > this.now()) return;
      const checkpoint = () => {
        if (this.stopped || m.removed) throw new AcmeError('stopped while ordering');
      };
      const replaces = m.cert?.certId;
      const key = await this.keyForOrder(m);
      this.log.info(
        { name: m.name, reason: why, ...(m.cert ? { notAfter: m.cert.notAfter.toISOString() } : {}), key: key.nextUsed ? 'next (rollover)' : key.keyPem ? 'kept' : 'new' },
        m.cert ? 'renewing certificate' : 'obtaining certificate',
      );
      const issued = await this.account.order({
        name: m.name,
        challenge: s.challenge,
        keyType: s.keyType,
        ...(key.keyPem ? { keyPem: key.keyPem } : {}),
        ...(s.profile ? { profile: s.profile } : {}),
        ...(replaces ? { replaces } : {}),
        hooks: {
          http01: (token, keyAuthorization) => {
            this.tokens.set(token, keyAuthorization);
            this.tokensChanged();
            return () => {
              this.tokens.delete(token);
              this.tokensChanged();
            };
          },
          tlsAlpn01: (name, certPem, keyPem) => {
            this.certs.setChallenge(name, certPem, keyPem);
            return () => this.certs.clearChallenge(name);
          },
        },
        checkpoint,
        log: this.log.child({ name: m.name }),
      });
      checkpoint();
      const x509 = new X509Certificate(issued.certPem);
      if (!certNames(x509).includes(m.name)) throw new AcmeError(`the CA issued a certificate that does not cover ${m.name}`);
      const obtained = this.now();
      const paths = await this.storage.saveCert(m.name, issued.certPem, issued.keyPem, {
        name: m.name,
        directory: s.directory,
        obtained: new Date(obtained).toISOString(),
        keyCreated: new Date(key.created ?? obtained).toISOString(),
        ...(issued.profile ? { profile: issued.profile } : {}),
        ...(issued.replaced ? { replaced: issued.replaced } : {}),
      });
      const first = !m.cert;
      this.install(m, issued.certPem, issued.keyPem, paths.certFile, x509);
      m.obtained = obtained;
      if (key.nextUsed) {
        await this.storage.removeNextKey(m.name);
        m.next = undefined;
        this.log.warn({ name: m.name, tlsa: spkiSha256(issued.keyPem) }, 'key rollover done: the next key is in use; the TLSA records of the old key can go now (mailgate dns --check lists them as stale)');
      }
      m.lastRenewed = this.now();
      m.failures = 0;
      m.retryAt = undefined;
      m.retryAfterMs = undefined;
      m.lastError = undefined;
      m.lastErrorAt = undefined;
      this.log.info(
        { name: m.name, issuer: m.cert?.issuer, notAfter: m.cert?.notAfter.toISOString(), file: paths.certFile, ...(issued.replaced ? { replaced: issued.replaced } : {}) },
        first ? `certificate obtained for ${m.name}; serving it from now on (the self-signed one is retired)` : `certificate renewed for ${m.name}; new handshakes use it`,
      );
    } finally {
      await lock.release().catch((err: unknown) => this.log.warn({ name: m.name, err: errorMessage(err) }, 'releasing the ordering lock failed'));
    }
  }

  /**
   * The key an order uses: a new one (no reuse_key, a first order, a key of
   * another type), the stored one, or a rollover's next key once it has been
   * published for a renewal period. Starts a rollover when it is due.
   */
  private async keyForOrder(m: Managed): Promise<{ keyPem?: string; created?: number; nextUsed?: boolean }> {
    const s = this.settings;
    const now = this.now();
    if (!s.reuseKey) {
      if (m.next) {
        await this.storage.removeNextKey(m.name);
        m.next = undefined;
      }
      return {};
    }
    const stored = m.cert ? (await this.storage.loadCert(m.name)).cert : undefined;
    if (!stored) return {};
    if (!keyIsOfType(stored.keyPem, s.keyType)) {
      this.log.warn({ name: m.name, keyType: s.keyType }, 'the kept key is not of acme.key_type: a new key is made (publish its TLSA record: mailgate dns)');
      return {};
    }
    const obtained = Date.parse(stored.meta?.obtained ?? stored.x509.validFrom);
    const next = await this.storage.loadNextKey(m.name);
    if (next && keyIsOfType(next.keyPem, s.keyType) && next.created < obtained) return { keyPem: next.keyPem, created: next.created, nextUsed: true };
    const created = Date.parse(stored.meta?.keyCreated ?? stored.meta?.obtained ?? stored.x509.validFrom);
    if (!next && s.keyRolloverMs !== undefined && now - created + (now - obtained) >= s.keyRolloverMs) {
      // By the next renewal the key would be older than key_rollover: the next key is made now and published meanwhile.
      const made = { keyPem: await createCertKey(s.keyType), created: now };
      await this.storage.saveNextKey(m.name, made);
      m.next = { data: spkiSha256(made.keyPem), created: now };
      this.log.warn(
        { name: m.name, tlsa: m.next.data, keyAgeDays: Math.floor((now - created) / DAY) },
        'key rollover: the next key was made; publish its TLSA record now (mailgate dns), beside the current one: the renewal after this one uses it',
      );
    }
    return { keyPem: stored.keyPem, created };
  }

  /** What storage holds of a rollover, and when the current certificate was obtained. */
  private async loadNext(m: Managed): Promise<void> {
    try {
      const stored = (await this.storage.loadCert(m.name)).cert;
      m.obtained = stored ? Date.parse(stored.meta?.obtained ?? stored.x509.validFrom) : undefined;
      const next = this.settings.reuseKey ? await this.storage.loadNextKey(m.name) : undefined;
      m.next = next ? { data: spkiSha256(next.keyPem), created: next.created } : undefined;
    } catch (err) {
      this.log.warn({ name: m.name, err: errorMessage(err) }, 'cannot read the stored key rollover');
    }
  }

  private failed(m: Managed, err: unknown): void {
    const now = this.now();
    m.failures += 1;
    m.lastError = errorMessage(err);
    m.lastErrorAt = now;
    m.retryAfterMs = err instanceof AcmeError ? err.retryAfterMs : undefined;
    const lifetimeMs = m.cert ? m.cert.notAfter.getTime() - m.cert.notBefore.getTime() : undefined;
    const delay = backoffDelay(
      m.failures,
      { minMs: this.settings.renew.retryMinMs, maxMs: this.settings.renew.retryMaxMs },
      { random: this.random, ...(lifetimeMs !== undefined ? { lifetimeMs } : {}), ...(m.retryAfterMs !== undefined ? { retryAfterMs: m.retryAfterMs } : {}) },
    );
    m.retryAt = now + delay;
    const state = this.healthOf(m, now);
    const fields = {
      name: m.name,
      err: m.lastError,
      ...(err instanceof AcmeError && err.problem ? { problem: err.problem } : {}),
      failures: m.failures,
      retryAt: new Date(m.retryAt).toISOString(),
      ...(m.cert ? { notAfter: m.cert.notAfter.toISOString(), daysLeft: daysLeft(m.cert.notAfter, now) } : { serving: this.certs.defaultInfo()?.source ?? 'none' }),
    };
    if (state === 'critical' || state === 'expired') {
      this.log.error(fields, m.cert ? `certificate for ${m.name} ${state === 'expired' ? 'has expired' : 'expires soon'} and renewal keeps failing` : 'certificate renewal failed');
    } else if (!m.cert && m.failures >= 3) {
      this.log.error(fields, `still no certificate for ${m.name}: ordering keeps failing, clients get the self-signed certificate`);
    } else {
      this.log.warn(fields, m.cert ? 'certificate renewal failed; the current certificate stays in service' : 'obtaining the first certificate failed; the self-signed one stays in service');
    }
  }

  /** Puts a certificate in the CertStore (new handshakes use it at once) and makes it the name's current one. */
  private install(m: Managed, certPem: string, keyPem: string, certFile: string, x509: X509Certificate): void {
    const def = this.certs.defaultInfo();
    this.certs.put(certPem, keyPem, 'acme', { certFile, makeDefault: !def || def.source === 'self-signed' });
    m.cert = currentOf(x509);
    // A new certificate has a new certID and its own window.
    m.ari = undefined;
    m.ariRetryAt = undefined;
  }

  /** Takes the stored certificate when it is newer than ours (start, or another gateway renewed). */
  private async adoptFromDisk(m: Managed, from: 'start' | 'shared storage'): Promise<boolean> {
    let loaded: { cert?: StoredCert; problem?: string };
    try {
      loaded = await this.storage.loadCert(m.name);
    } catch (err) {
      this.log.warn({ name: m.name, err: errorMessage(err) }, 'cannot read the stored certificate');
      return false;
    }
    if (loaded.problem) this.log.warn({ name: m.name, problem: loaded.problem }, 'ignoring the stored certificate');
    const stored = loaded.cert;
    if (!stored) return false;
    if (m.cert && (stored.x509.fingerprint256 === m.cert.fingerprint || new Date(stored.x509.validTo) <= m.cert.notAfter)) return false;
    const now = this.now();
    const notAfter = new Date(stored.x509.validTo);
    if (from === 'start') {
      m.cert = currentOf(stored.x509);
      // bootstrap put it in the store unless it had expired
      if (notAfter.getTime() > now && this.certs.infoFor(m.name)?.fingerprint256 !== stored.x509.fingerprint256) {
        this.install(m, stored.certPem, stored.keyPem, stored.paths.certFile, stored.x509);
      }
      this.log.info({ name: m.name, notAfter: notAfter.toISOString(), file: stored.paths.certFile, expired: notAfter.getTime() <= now }, 'stored ACME certificate in use');
      return true;
    }
    if (notAfter.getTime() <= now) return false;
    this.install(m, stored.certPem, stored.keyPem, stored.paths.certFile, stored.x509);
    m.failures = 0;
    m.retryAt = undefined;
    m.lastError = undefined;
    m.lastErrorAt = undefined;
    this.log.info({ name: m.name, notAfter: notAfter.toISOString(), file: stored.paths.certFile }, 'a newer certificate appeared in shared storage (another gateway renewed it); using it');
    return true;
  }

  private stateOf(m: Managed, now: number): CertState {
    if (m.ordering) return m.cert ? 'renewing' : 'obtaining';
    return this.healthOf(m, now);
  }

  /** The state apart from an order in progress. */
  private healthOf(m: Managed, now: number): CertState {
    if (!m.cert) return m.failures > 0 ? 'failing' : 'pending';
    if (now >= m.cert.notAfter.getTime()) return 'expired';
    if (m.failures > 0) return now >= criticalAt(m.cert).getTime() ? 'critical' : 'failing';
    return 'valid';
  }

  private statusOf(m: Managed): CertStatus {
    const now = this.now();
    const info = this.certs.infoFor(m.name);
    const serving: CertStatus['serving'] = info ? info.source : (this.certs.defaultInfo()?.source ?? 'none');
    const st: CertStatus = { name: m.name, state: this.stateOf(m, now), serving, failures: m.failures };
    if (m.cert) {
      st.issuer = m.cert.issuer;
      st.notBefore = m.cert.notBefore.toISOString();
      st.notAfter = m.cert.notAfter.toISOString();
      st.daysLeft = daysLeft(m.cert.notAfter, now);
    }
    if (m.ordering) {
      st.nextRenewal = new Date(now).toISOString();
      st.basis = 'now';
    } else if (m.failures > 0 && m.retryAt !== undefined) {
      st.nextRenewal = new Date(m.retryAt).toISOString();
      st.basis = 'retry';
    } else if (m.cert) {
      st.nextRenewal = new Date(this.dueAt(m)).toISOString();
      st.basis = m.ari ? 'ari' : 'lifetime';
    } else {
      st.nextRenewal = new Date(m.nextWakeAt ?? now).toISOString();
      st.basis = 'now';
    }
    if (m.ari) {
      st.ariWindow = {
        start: m.ari.window.start.toISOString(),
        end: m.ari.window.end.toISOString(),
        ...(m.ari.explanationURL ? { explanationURL: m.ari.explanationURL } : {}),
      };
    }
    if (m.lastError !== undefined) st.lastError = m.lastError;
    if (m.lastErrorAt !== undefined) st.lastErrorAt = new Date(m.lastErrorAt).toISOString();
    if (m.lastRenewed !== undefined) st.lastRenewed = new Date(m.lastRenewed).toISOString();
    if (this.settings.reuseKey && m.cert) {
      const current = spkiSha256(m.cert.x509);
      st.keys = { current, ...(m.next ? { next: { data: m.next.data, note: this.nextNote(m, m.next) } } : {}) };
    }
    return st;
  }

  private newAccount(): AcmeAccount {
    return new AcmeAccount({
      directory: this.settings.directory,
      ...(this.settings.email ? { email: this.settings.email } : {}),
      storage: this.storage,
      log: this.log,
    });
  }
}

function currentOf(x509: X509Certificate): Current {
  let certId: string | undefined;
  try {
    certId = ariCertId(x509);
  } catch {
    // No Authority Key Identifier: no ARI for this certificate; the lifetime rule schedules it.
    certId = undefined;
  }
  return {
    x509,
    notBefore: new Date(x509.validFrom),
    notAfter: new Date(x509.validTo),
    fingerprint: x509.fingerprint256,
    issuer: x509.issuer.replace(/\n/g, ', '),
    certId,
  };
}

function daysLeft(notAfter: Date, now: number): number {
  return Math.floor(((notAfter.getTime() - now) / DAY) * 10) / 10;
}

function httpOptions(s: AcmeSettings): { timeoutMs: number; extraCaPem?: string } {
  const ca = readCaBundle(s);
  return { timeoutMs: s.requestTimeoutMs, ...(ca ? { extraCaPem: ca } : {}) };
}

/** Throws when no listener can answer the configured challenge; warns when none is on the port the CA uses. */
export function checkChallengeListeners(s: AcmeSettings, listeners: readonly Listener[], log: Logger): void {
  const r = challengeListenerProblems(s, listeners);
  if (r.error) throw new MailgateError('CONFIG_INVALID', r.error);
  if (r.warning) log.warn({ challenge: s.challenge }, r.warning);
}
