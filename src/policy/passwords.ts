/**
 * Password hashes for local users: hashing (`mailgate hash-password`) and
 * verification; the formats are src/core/password-hash.ts.
 *
 * Verification never runs on the event loop: scrypt runs in libuv's thread
 * pool (node:crypto), argon2id too (`@node-rs/argon2`, a native addon whose
 * work is an async task on that pool), bcrypt (the pure-JS `bcryptjs`) in a
 * small pool of worker threads. Both are bounded: past MAX_PENDING waiting verifications the
 * caller gets AUTH_BUSY instead of a longer queue.
 */
import { randomBytes, scrypt, timingSafeEqual, type ScryptOptions } from 'node:crypto';
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { hash as argon2Hash, verify as argon2Verify, type Algorithm } from '@node-rs/argon2';
import bcrypt from 'bcryptjs';
import { MailgateError } from '../core/errors.ts';
import { ARGON2ID_DEFAULTS, BCRYPT_DEFAULT_COST, formatScrypt, SCRYPT_DEFAULTS, SCRYPT_MAX_MEMORY, type PasswordHash } from '../core/password-hash.ts';

const MAX_PENDING = 256;
const VERIFY_DEADLINE_MS = 30_000;

/**
 * The bytes a password stands for. IMAP LOGIN hands over the client's bytes
 * as latin1 characters, SASL decodes them as UTF-8; both give the same bytes
 * here, so a password verifies whichever way the client sent it.
 */
export function passwordBytes(password: string): Buffer {
  if (/^[\0-\xff]*$/.test(password)) {
    const raw = Buffer.from(password, 'latin1');
    if (raw.some((b) => b >= 0x80) && isUtf8(raw)) return raw;
  }
  return Buffer.from(password, 'utf8');
}

function isUtf8(b: Buffer): boolean {
  try {
    new TextDecoder('utf-8', { fatal: true }).decode(b);
    return true;
  } catch {
    // A fatal decoder throws on invalid UTF-8: that is the answer, not an error.
    return false;
  }
}

/** The library's Algorithm.Argon2id (a const enum, which type stripping cannot read). */
export const ARGON2ID_ALGORITHM = 2 as Algorithm;

export type HashScheme = 'scrypt' | 'bcrypt' | 'argon2id';

export async function hashPassword(password: string, scheme: HashScheme = 'scrypt'): Promise<string> {
  const bytes = passwordBytes(password);
  if (scheme === 'bcrypt') return bcrypt.hash(bytes.toString('utf8'), BCRYPT_DEFAULT_COST);
  if (scheme === 'argon2id') {
    const { m, t, p } = ARGON2ID_DEFAULTS;
    return argon2Hash(bytes, { algorithm: ARGON2ID_ALGORITHM, memoryCost: m, timeCost: t, parallelism: p, outputLen: 32 });
  }
  const { ln, r, p } = SCRYPT_DEFAULTS;
  const salt = randomBytes(16);
  const hash = await scryptAsync(bytes, salt, 32, { N: 2 ** ln, r, p });
  return formatScrypt({ kind: 'scrypt', ln, r, p, salt, hash });
}

/**
 * A hash of the same kind and cost as `like` that no password matches:
 * verifying an unknown user against it costs what verifying a real one does.
 */
export function dummyHashLike(like: PasswordHash | undefined): PasswordHash {
  if (like?.kind === 'bcrypt') {
    const alphabet = './ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';
    const chars = [...randomBytes(53)].map((b) => alphabet[b % 64]).join('');
    return { kind: 'bcrypt', cost: like.cost, text: `$2b$${String(like.cost).padStart(2, '0')}$${chars}` };
  }
  if (like?.kind === 'argon2id') {
    const b64 = (n: number) => randomBytes(n).toString('base64').replace(/=+$/, '');
    const text = `$argon2id$v=19$m=${like.m},t=${like.t},p=${like.p}$${b64(like.saltLength)}$${b64(like.hashLength)}`;
    return { ...like, text };
  }
  const { ln, r, p } = like?.kind === 'scrypt' ? like : SCRYPT_DEFAULTS;
  return { kind: 'scrypt', ln, r, p, salt: randomBytes(16), hash: randomBytes(like?.kind === 'scrypt' ? like.hash.length : 32) };
}

// ---- verification -----------------------------------------------------------

let pending = 0;

/** Checks a password off the event loop. Rejects with AUTH_BUSY when too many checks are waiting. */
export async function verifyPassword(password: string, hash: PasswordHash): Promise<boolean> {
  if (pending >= MAX_PENDING) throw new MailgateError('AUTH_BUSY');
  pending++;
  try {
    const bytes = passwordBytes(password);
    if (hash.kind === 'scrypt') {
      const got = await scryptAsync(bytes, hash.salt, hash.hash.length, { N: 2 ** hash.ln, r: hash.r, p: hash.p });
      return timingSafeEqual(got, hash.hash);
    }
    if (hash.kind === 'argon2id') return await verifyArgon2id(hash.text, bytes);
    return await bcryptPool().verify(bytes.toString('utf8'), hash.text);
  } finally {
    pending--;
  }
}

/** The library compares in constant time; a hash it cannot read is the config's fault, with its code. */
async function verifyArgon2id(text: string, password: Buffer): Promise<boolean> {
  try {
    return await argon2Verify(text, password);
  } catch (err) {
    throw new MailgateError('HASH_INVALID', `argon2id hash could not be verified: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  }
}

function scryptAsync(password: Buffer, salt: Buffer, length: number, opts: ScryptOptions): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    scrypt(password, salt, length, { ...opts, maxmem: SCRYPT_MAX_MEMORY + 1024 * 1024 }, (err, key) => (err ? reject(err) : resolve(key)));
  });
}

interface Job {
  id: number;
  password: string;
  hash: string;
  resolve(ok: boolean): void;
  reject(err: Error): void;
  timer?: NodeJS.Timeout;
}

interface Slot {
  worker: Worker;
  job: Job | undefined;
}

/** A few worker threads running bcryptjs; jobs queue when all are busy. */
class BcryptPool {
  private readonly slots: Slot[] = [];
  private readonly queue: Job[] = [];
  private readonly size = Math.max(1, Math.min(2, availableParallelism()));
  private nextId = 0;

  verify(password: string, hash: string): Promise<boolean> {
    return new Promise<boolean>((resolve, reject) => {
      const job: Job = { id: ++this.nextId, password, hash, resolve, reject };
      job.timer = setTimeout(() => this.fail(job, new MailgateError('AUTH_BUSY', 'password verification timed out')), VERIFY_DEADLINE_MS);
      job.timer.unref();
      this.queue.push(job);
      this.dispatch();
    });
  }

  private dispatch(): void {
    while (this.queue.length > 0) {
      let slot = this.slots.find((s) => s.job === undefined);
      if (!slot && this.slots.length < this.size) slot = this.spawn();
      if (!slot) return;
      const job = this.queue.shift();
      if (!job) return;
      slot.job = job;
      slot.worker.ref();
      slot.worker.postMessage({ id: job.id, password: job.password, hash: job.hash });
    }
  }

  private spawn(): Slot {
    const worker = new Worker(new URL('./hash-worker.ts', import.meta.url));
    const slot: Slot = { worker, job: undefined };
    worker.unref();
    worker.on('message', (m: { id: number; ok: boolean; error?: string }) => {
      const job = slot.job;
      if (!job || job.id !== m.id) return;
      slot.job = undefined;
      worker.unref();
      clearTimeout(job.timer);
      if (m.error !== undefined) job.reject(new MailgateError('HASH_INVALID', m.error));
      else job.resolve(m.ok);
      this.dispatch();
    });
    const lost = (err: Error) => {
      const i = this.slots.indexOf(slot);
      if (i >= 0) this.slots.splice(i, 1);
      if (slot.job) this.fail(slot.job, new MailgateError('AUTH_BUSY', 'password verification worker failed', { cause: err }));
      slot.job = undefined;
      this.dispatch();
    };
    worker.on('error', lost);
    worker.on('exit', (code) => lost(new Error(`worker exited with code ${code}`)));
    this.slots.push(slot);
    return slot;
  }

  private fail(job: Job, err: Error): void {
    clearTimeout(job.timer);
    const q = this.queue.indexOf(job);
    if (q >= 0) this.queue.splice(q, 1);
    // Settle once: a late answer from the worker finds no job with this id.
    for (const s of this.slots) if (s.job === job) s.job = undefined;
    job.reject(err);
    this.dispatch();
  }
}

let pool: BcryptPool | undefined;
function bcryptPool(): BcryptPool {
  pool ??= new BcryptPool();
  return pool;
}
