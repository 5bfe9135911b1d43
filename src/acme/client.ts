/**
 * Talking to the ACME CA, on top of acme-client: the account (created once,
 * key kept in storage), one order for one name with the configured
 * challenge, and the ARI renewalInfo request acme-client 5.x lacks.
 *
 * acme-client is used through its documented low-level methods plus three
 * adjustments (what they reach of the library is in library.ts):
 *  - its axios instance (process-wide) gets our deadline, an https agent that
 *    also trusts `ca_bundle`, no retries of its own (the renewal scheduler
 *    owns retrying, with backoff and Retry-After, so nothing sleeps for hours
 *    inside a request), and network failures turned into coded errors;
 *  - each client's `api.apiRequest` is wrapped so that a refused request
 *    becomes an AcmeError with the problem type, HTTP status and Retry-After
 *    (acme-client throws a plain Error with the detail text only);
 *  - renewalInfo is fetched with its HTTP client, so the same agent and CA
 *    trust apply.
 */
import { createPrivateKey } from 'node:crypto';
import { Agent as HttpsAgent } from 'node:https';
import { rootCertificates } from 'node:tls';
import acme from 'acme-client';
import type { Authorization, Order } from 'acme-client';
import { errorCode, errorMessage, MailgateError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { parseRenewalInfo, parseRetryAfter, type RenewalInfo } from './ari.ts';
import {
  acmeHttpDefaults,
  acmeNodeHttpAdapter,
  clientHttp,
  createOrder,
  wrapApiRequest,
  type AxiosConfigLike,
  type AxiosResponseLike,
  type ClientHttp,
  type Directory,
} from './library.ts';
import type { AcmeStorage } from './storage.ts';

export type ChallengeType = 'tls-alpn-01' | 'http-01';
export type KeyType = 'ecdsa-p256' | 'ecdsa-p384' | 'rsa-2048' | 'rsa-3072' | 'rsa-4096';

const PROBLEM_PREFIX = 'urn:ietf:params:acme:error:';

/** A refusal or failure from the CA, with what the scheduler needs to react. */
export class AcmeError extends MailgateError {
  /** The ACME problem type without its urn prefix ("rateLimited", "accountDoesNotExist", ...). */
  readonly problem: string | undefined;
  readonly status: number | undefined;
  readonly retryAfterMs: number | undefined;
  constructor(message: string, opts: { problem?: string; status?: number; retryAfterMs?: number; cause?: unknown } = {}) {
    super('ACME', message, { cause: opts.cause });
    this.name = 'AcmeError';
    this.problem = opts.problem;
    this.status = opts.status;
    this.retryAfterMs = opts.retryAfterMs;
  }
}

// ---- the process-wide axios instance of acme-client ------------------------------

let adapterInstalled = false;

/**
 * Applies a configuration's deadline and CA trust to acme-client's axios
 * instance. One ACME configuration per process, so the last call wins; the
 * previous agent's idle sockets are closed.
 */
export function configureAcmeHttp(opts: { timeoutMs: number; extraCaPem?: string }): void {
  const defaults = acmeHttpDefaults();
  if (!adapterInstalled) {
    adapterInstalled = true;
    const http = acmeNodeHttpAdapter();
    defaults.adapter = async (config: AxiosConfigLike): Promise<AxiosResponseLike> => {
      try {
        return await http(config);
      } catch (err) {
        // acme-client rejects every status through axios and reads it back from err.response; only failures without one are ours.
        if (err && typeof err === 'object' && 'response' in err && err.response) throw err;
        // No `config` on this error: acme-client's retry interceptor passes it through untouched.
        const what = `${(config.method ?? 'get').toUpperCase()} ${config.url ?? ''}`;
        const timeout = errorCode(err) === 'ECONNABORTED' || errorCode(err) === 'ETIMEDOUT';
        throw new AcmeError(`${what}: ${timeout ? 'no answer in time' : errorMessage(err)}`, { cause: err });
      }
    };
    defaults.acmeSettings.retryMaxAttempts = 0;
  }
  defaults.timeout = opts.timeoutMs;
  const previous = defaults.httpsAgent;
  defaults.httpsAgent = new HttpsAgent({
    keepAlive: true,
    maxSockets: 4,
    ...(opts.extraCaPem ? { ca: [...rootCertificates, opts.extraCaPem] } : {}),
  });
  previous?.destroy();
}

/** Closes kept-alive connections to the CA (gateway stop). */
export function closeAcmeHttp(): void {
  acmeHttpDefaults().httpsAgent?.destroy();
}

// ---- one client per account --------------------------------------------------------

/** How a challenge is answered: each returns the undo. */
export interface ChallengeHooks {
  http01(token: string, keyAuthorization: string): () => void;
  tlsAlpn01(name: string, certPem: string, keyPem: string): () => void;
}

export interface OrderRequest {
  name: string;
  challenge: ChallengeType;
  keyType: KeyType;
  profile?: string;
  /** The certificate's key (PEM) when it is kept across renewals (acme.reuse_key); a new one is made otherwise. */
  keyPem?: string;
  /** ARI certID of the certificate being replaced (only sent when the CA offers ARI). */
  replaces?: string;
  hooks: ChallengeHooks;
  /** Throws when the order must stop (gateway stopping); called between steps. */
  checkpoint: () => void;
  log: Logger;
}

export interface Issued {
  certPem: string;
  keyPem: string;
  /** `replaces` as finally sent (dropped when the CA said alreadyReplaced). */
  replaced?: string;
  profile?: string;
}

export interface AcmeAccountOptions {
  directory: string;
  email?: string;
  storage: AcmeStorage;
  log: Logger;
  /** Status polling while the CA validates and issues. */
  poll?: { attempts: number; minMs: number; maxMs: number };
}

export class AcmeAccount {
  private readonly opts: AcmeAccountOptions;
  private client: acme.Client | undefined;
  private accountUrl: string | undefined;
  private readonly contact: string[];

  constructor(opts: AcmeAccountOptions) {
    this.opts = opts;
    this.contact = opts.email ? [`mailto:${opts.email}`] : [];
  }

  /** The directory (cached by acme-client for a day). */
  async directory(): Promise<Directory> {
    return (await this.unsignedHttp()).getDirectory();
  }

  /**
   * RFC 9773 §4.2: GET renewalInfo/<certID>. Undefined when the CA offers no
   * ARI. Retry-After (ms) says when to ask again.
   */
  async renewalInfo(certId: string): Promise<{ info: RenewalInfo; retryAfterMs: number | undefined } | undefined> {
    const http = await this.unsignedHttp();
    const dir = await http.getDirectory();
    if (typeof dir.renewalInfo !== 'string') return undefined;
    const url = `${dir.renewalInfo.replace(/\/+$/, '')}/${certId}`;
    const resp = await http.request(url, 'get');
    if (resp.status !== 200) throw problemError(resp, `GET ${url}`);
    return { info: parseRenewalInfo(resp.data), retryAfterMs: parseRetryAfter(resp.headers['retry-after'], Date.now()) };
  }

  /** Orders, validates, finalizes and downloads one certificate for one name. */
  async order(req: OrderRequest): Promise<Issued> {
    await this.ensureAccount(req.log);
    try {
      return await this.orderOnce(req);
    } catch (err) {
      // The CA forgot the account (a test CA restarted, or the account was deactivated): register again, once.
      if (err instanceof AcmeError && (err.problem === 'accountDoesNotExist' || (err.problem === 'unauthorized' && /account/i.test(err.message)))) {
        req.log.warn({ err: err.message }, 'the CA does not know our account any more; registering again with the same key');
        this.accountUrl = undefined;
        this.client = undefined;
        await this.ensureAccount(req.log, true);
        return this.orderOnce(req);
      }
      throw err;
    }
  }

  private async orderOnce(req: OrderRequest): Promise<Issued> {
    const client = await this.ensureClient();
    const { name } = req;
    const dir = await this.directory();
    const payload: Parameters<typeof createOrder>[1] = { identifiers: [{ type: 'dns', value: name }] };
    let profile = req.profile;
    if (profile) {
      const offered = dir.meta?.profiles;
      if (!offered) {
        req.log.warn({ profile }, 'the CA does not offer certificate profiles; ordering without one');
        profile = undefined;
      } else if (!(profile in offered)) {
        throw new AcmeError(`the CA does not offer the profile "${profile}" (it offers: ${Object.keys(offered).join(', ') || 'none'})`, { problem: 'invalidProfile' });
      } else {
        payload.profile = profile;
      }
    }
    let replaced = typeof dir.renewalInfo === 'string' ? req.replaces : undefined;
    if (replaced) payload.replaces = replaced;

    req.checkpoint();
    let order: Order;
    try {
      order = await createOrder(client, payload);
    } catch (err) {
      // RFC 9773 §5: the certificate was replaced already (by another gateway, or an order we lost track of).
      if (!(err instanceof AcmeError && err.problem === 'alreadyReplaced' && replaced)) throw err;
      req.log.info({ replaces: replaced }, 'the CA says that certificate was replaced already; ordering without "replaces"');
      delete payload.replaces;
      replaced = undefined;
      order = await createOrder(client, payload);
    }
    req.log.info({ order: order.url, challenge: req.challenge, ...(replaced ? { replaces: replaced } : {}), ...(profile ? { profile } : {}) }, 'order created');

    req.checkpoint();
    const authorizations = await client.getAuthorizations(order);
    for (const authz of authorizations) {
      req.checkpoint();
      await this.authorize(client, authz, req);
    }

    req.checkpoint();
    const keyPem = req.keyPem ?? (await createCertKey(req.keyType));
    const [, csr] = await acme.crypto.createCsr({ altNames: [name], ...(name.length <= 64 ? { commonName: name } : {}) }, keyPem);
    req.checkpoint();
    let finalized: Order;
    try {
      finalized = await client.finalizeOrder(order, csr);
      req.checkpoint();
      const certPem = await client.getCertificate(finalized);
      return { certPem, keyPem, ...(replaced ? { replaced } : {}), ...(profile ? { profile } : {}) };
    } catch (err) {
      throw wrapStatusError(err, `finalizing the order for ${name}`);
    }
  }

  private async authorize(client: acme.Client, authz: Authorization, req: OrderRequest): Promise<void> {
    const ident = authz.identifier.value;
    if (authz.status === 'valid') {
      req.log.debug({ identifier: ident }, 'authorization still valid, no challenge needed');
      return;
    }
    if (authz.status !== 'pending') throw new AcmeError(`the authorization for ${ident} is ${authz.status}`);
    const challenge = authz.challenges.find((c) => c.type === req.challenge);
    if (!challenge) {
      throw new AcmeError(`the CA offers no ${req.challenge} challenge for ${ident} (offered: ${authz.challenges.map((c) => c.type).join(', ')})`, { problem: 'unsupportedChallenge' });
    }
    const keyAuthorization = await client.getChallengeKeyAuthorization(challenge);
    let undo: () => void;
    if (challenge.type === 'http-01') {
      undo = req.hooks.http01(challenge.token, keyAuthorization);
    } else {
      const alpnKey = await acme.crypto.createPrivateEcdsaKey('P-256');
      const [, alpnCert] = await acme.crypto.createAlpnCertificate(authz, keyAuthorization, alpnKey);
      undo = req.hooks.tlsAlpn01(ident, alpnCert.toString(), alpnKey.toString());
    }
    try {
      req.log.debug({ identifier: ident, challenge: challenge.type }, 'challenge ready, asking the CA to validate');
      await client.completeChallenge(challenge);
      await client.waitForValidStatus(challenge);
      req.log.info({ identifier: ident, challenge: challenge.type }, 'challenge validated');
    } catch (err) {
      throw wrapStatusError(err, `the CA could not validate ${ident} with ${challenge.type}`);
    } finally {
      undo();
    }
  }

  private async ensureAccount(log: Logger, forceNew = false): Promise<void> {
    if (this.accountUrl && this.client) return;
    const { storage } = this.opts;
    let key = await storage.readAccountKey();
    if (key === undefined) {
      const made = await storage.createAccountKey((await acme.crypto.createPrivateEcdsaKey('P-256')).toString());
      key = made.pem;
      if (made.created) log.info({ file: storage.accountKeyFile }, 'ACME account key created');
    }
    const stored = forceNew ? undefined : await storage.readAccount();
    this.client = this.newClient(key, stored?.url);
    if (stored) {
      this.accountUrl = stored.url;
      if (stored.contact.join(',') !== this.contact.join(',')) {
        await this.client.updateAccount({ contact: this.contact });
        await storage.writeAccount({ ...stored, contact: this.contact });
        log.info({ account: stored.url, contact: this.contact }, 'ACME account contact updated');
      }
      return;
    }
    await this.client.createAccount({ termsOfServiceAgreed: true, ...(this.contact.length ? { contact: this.contact } : {}) });
    this.accountUrl = this.client.getAccountUrl();
    await storage.writeAccount({ url: this.accountUrl, directory: this.opts.directory, contact: this.contact, created: new Date().toISOString() });
    log.info({ account: this.accountUrl, directory: this.opts.directory }, 'ACME account registered (terms of service accepted in the config)');
  }

  private async ensureClient(): Promise<acme.Client> {
    if (!this.client) throw new MailgateError('ACME', 'no ACME account');
    return this.client;
  }

  /** The client's HTTP side (a client is made before the account exists), for the directory and renewalInfo. */
  private async unsignedHttp(): Promise<ClientHttp> {
    if (!this.client) {
      const key = (await this.opts.storage.readAccountKey()) ?? (await acme.crypto.createPrivateEcdsaKey('P-256')).toString();
      this.client = this.newClient(key, undefined);
    }
    return clientHttp(this.client);
  }

  private newClient(accountKey: string, accountUrl: string | undefined): acme.Client {
    const poll = this.opts.poll ?? { attempts: 12, minMs: 500, maxMs: 10_000 };
    const client = new acme.Client({
      directoryUrl: this.opts.directory,
      accountKey,
      ...(accountUrl ? { accountUrl } : {}),
      backoffAttempts: poll.attempts,
      backoffMin: poll.minMs,
      backoffMax: poll.maxMs,
    });
    // A refused request becomes an AcmeError with the problem type, status and Retry-After.
    wrapApiRequest(client, (original) => async (url, payload = null, validStatusCodes = [], opts) => {
      const resp = await original(url, payload, [], opts);
      if (validStatusCodes.length > 0 && !validStatusCodes.includes(resp.status)) throw problemError(resp, `POST ${url}`);
      return resp;
    });
    return client;
  }
}

function problemError(resp: AxiosResponseLike, what: string): AcmeError {
  const data = resp.data && typeof resp.data === 'object' ? (resp.data as { type?: unknown; detail?: unknown }) : {};
  const type = typeof data.type === 'string' ? data.type : undefined;
  const problem = type?.startsWith(PROBLEM_PREFIX) ? type.slice(PROBLEM_PREFIX.length) : type;
  const detail = typeof data.detail === 'string' ? data.detail : `HTTP ${resp.status}`;
  const retryAfterMs = parseRetryAfter(resp.headers['retry-after'], Date.now());
  return new AcmeError(`${what}: ${detail}${problem ? ` (${problem})` : ''}`, {
    status: resp.status,
    ...(problem ? { problem } : {}),
    ...(retryAfterMs !== undefined ? { retryAfterMs } : {}),
  });
}

/** acme-client reports an invalid challenge or order as a plain Error with the CA's detail. */
function wrapStatusError(err: unknown, what: string): unknown {
  if (err instanceof MailgateError) return err;
  return new AcmeError(`${what}: ${errorMessage(err)}`, { cause: err });
}

/** A new private key (PEM) of the configured type. */
export async function createCertKey(type: KeyType): Promise<string> {
  switch (type) {
    case 'ecdsa-p256':
      return (await acme.crypto.createPrivateEcdsaKey('P-256')).toString();
    case 'ecdsa-p384':
      return (await acme.crypto.createPrivateEcdsaKey('P-384')).toString();
    case 'rsa-2048':
      return (await acme.crypto.createPrivateRsaKey(2048)).toString();
    case 'rsa-3072':
      return (await acme.crypto.createPrivateRsaKey(3072)).toString();
    case 'rsa-4096':
      return (await acme.crypto.createPrivateRsaKey(4096)).toString();
    default: {
      const never: never = type;
      throw new MailgateError('ACME', `unknown key type ${String(never)}`);
    }
  }
}

/** Whether a key (PEM) is of the configured type: a kept key of another type is replaced. */
export function keyIsOfType(pem: string, type: KeyType): boolean {
  const key = createPrivateKey(pem);
  const d = key.asymmetricKeyDetails ?? {};
  switch (type) {
    case 'ecdsa-p256':
      return key.asymmetricKeyType === 'ec' && d.namedCurve === 'prime256v1';
    case 'ecdsa-p384':
      return key.asymmetricKeyType === 'ec' && d.namedCurve === 'secp384r1';
    case 'rsa-2048':
      return key.asymmetricKeyType === 'rsa' && d.modulusLength === 2048;
    case 'rsa-3072':
      return key.asymmetricKeyType === 'rsa' && d.modulusLength === 3072;
    case 'rsa-4096':
      return key.asymmetricKeyType === 'rsa' && d.modulusLength === 4096;
    default: {
      const never: never = type;
      throw new MailgateError('ACME', `unknown key type ${String(never)}`);
    }
  }
}
