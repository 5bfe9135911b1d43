/**
 * The stored password hash formats of local users: parsed (the config
 * schema validates users with it) and written (`mailgate hash-password`).
 * Hashing and verifying live in src/policy/passwords.ts.
 *
 *   scrypt  $scrypt$ln=15,r=8,p=3$<salt>$<hash>   (PHC string, base64 without padding)
 *   bcrypt  $2b$12$<53 characters>  ($2a$ and $2y$ are read as $2b$)
 *   argon2id $argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>  (PHC string, as argon2's reference tools write it)
 */
export interface ScryptHash {
  readonly kind: 'scrypt';
  readonly ln: number;
  readonly r: number;
  readonly p: number;
  readonly salt: Buffer;
  readonly hash: Buffer;
}

export interface BcryptHash {
  readonly kind: 'bcrypt';
  readonly cost: number;
  /** Normalised to the $2b$ prefix bcryptjs reads. */
  readonly text: string;
}

export interface Argon2idHash {
  readonly kind: 'argon2id';
  /** Memory in KiB, passes, lanes. */
  readonly m: number;
  readonly t: number;
  readonly p: number;
  /** Decoded lengths (the dummy hash for unknown users copies them). */
  readonly saltLength: number;
  readonly hashLength: number;
  /** The PHC string as stored; @node-rs/argon2 reads it. */
  readonly text: string;
}

export type PasswordHash = ScryptHash | BcryptHash | Argon2idHash;

/** What `mailgate hash-password` produces: OWASP's scrypt profile N=2^15, r=8, p=3 (32 MiB, about 0.1-0.3 s). */
export const SCRYPT_DEFAULTS = { ln: 15, r: 8, p: 3 } as const;
export const BCRYPT_DEFAULT_COST = 12;
/** What `mailgate hash-password --argon2id` produces: OWASP's first argon2id profile, m=19 MiB, t=2, p=1. */
export const ARGON2ID_DEFAULTS = { m: 19_456, t: 2, p: 1 } as const;
/** The most memory (KiB) and passes one argon2id verification may take. */
const ARGON2_MAX_KIB = 256 * 1024;
const ARGON2_MAX_T = 16;

/** The most memory one scrypt verification may take. */
export const SCRYPT_MAX_MEMORY = 256 * 1024 * 1024;
const BCRYPT_MAX_COST = 15;

const B64 = /^[A-Za-z0-9+/]+$/;

/** Parses a stored hash; a string result says why it is not one (never echoing the value, which may be a password). */
export function parseHash(text: string): PasswordHash | string {
  if (text.startsWith('$scrypt$')) {
    const m = /^\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([^$]+)\$([^$]+)$/.exec(text);
    if (!m) return 'malformed scrypt hash (expected $scrypt$ln=N,r=N,p=N$salt$hash)';
    const [ln, r, p] = [Number(m[1]), Number(m[2]), Number(m[3])];
    if (ln < 10 || ln > 22) return 'scrypt ln must be 10-22';
    if (r < 1 || r > 32 || p < 1 || p > 16) return 'scrypt r must be 1-32 and p 1-16';
    if (128 * 2 ** ln * r > SCRYPT_MAX_MEMORY) return 'scrypt parameters need more than 256 MiB per verification';
    const saltText = m[4] ?? '';
    const hashText = m[5] ?? '';
    if (!B64.test(saltText) || !B64.test(hashText)) return 'scrypt salt and hash must be base64 without padding';
    const salt = Buffer.from(saltText, 'base64');
    const hash = Buffer.from(hashText, 'base64');
    if (salt.length < 8 || hash.length < 16 || hash.length > 64) return 'scrypt salt must be at least 8 bytes and the hash 16-64 bytes';
    return { kind: 'scrypt', ln, r, p, salt, hash };
  }
  const b = /^\$2([aby])\$(\d\d)\$([./A-Za-z0-9]{53})$/.exec(text);
  if (b) {
    const cost = Number(b[2]);
    if (cost < 4 || cost > BCRYPT_MAX_COST) return `bcrypt cost must be 4-${BCRYPT_MAX_COST}`;
    return { kind: 'bcrypt', cost, text: `$2b$${b[2]}$${b[3]}` };
  }
  if (text.startsWith('$2')) return 'malformed bcrypt hash (expected $2b$NN$ and 53 characters)';
  if (text.startsWith('$argon2id$')) return parseArgon2id(text);
  if (text.startsWith('$argon2')) return 'only argon2id is accepted of the argon2 family (argon2i and argon2d are not); make one with `mailgate hash-password --argon2id`';
  return 'not a password hash: plaintext passwords are not accepted; make a hash with `mailgate hash-password`';
}

function parseArgon2id(text: string): Argon2idHash | string {
  const m = /^\$argon2id\$v=19\$m=(\d{1,7}),t=(\d{1,3}),p=(\d{1,3})\$([^$]+)\$([^$]+)$/.exec(text);
  if (!m) return 'malformed argon2id hash (expected $argon2id$v=19$m=N,t=N,p=N$salt$hash)';
  const [mem, t, p] = [Number(m[1]), Number(m[2]), Number(m[3])];
  if (p < 1 || p > 16) return 'argon2id p must be 1-16';
  if (t < 1 || t > ARGON2_MAX_T) return `argon2id t must be 1-${ARGON2_MAX_T}`;
  if (mem < 8 * p) return 'argon2id m must be at least 8 KiB per lane';
  if (mem > ARGON2_MAX_KIB) return 'argon2id parameters need more than 256 MiB per verification';
  const saltText = m[4] ?? '';
  const hashText = m[5] ?? '';
  if (!B64.test(saltText) || !B64.test(hashText)) return 'argon2id salt and hash must be base64 without padding';
  const saltLength = Buffer.from(saltText, 'base64').length;
  const hashLength = Buffer.from(hashText, 'base64').length;
  if (saltLength < 8 || hashLength < 16 || hashLength > 64) return 'argon2id salt must be at least 8 bytes and the hash 16-64 bytes';
  return { kind: 'argon2id', m: mem, t, p, saltLength, hashLength, text };
}

export function formatScrypt(h: ScryptHash): string {
  const b64 = (b: Buffer) => b.toString('base64').replace(/=+$/, '');
  return `$scrypt$ln=${h.ln},r=${h.r},p=${h.p}$${b64(h.salt)}$${b64(h.hash)}`;
}
