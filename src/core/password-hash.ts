/**
 * The stored password hash formats of local users: parsed (the config
 * schema validates users with it) and written (`mailgate hash-password`).
 * Hashing and verifying live in src/policy/passwords.ts.
 *
 *   scrypt  $scrypt$ln=15,r=8,p=3$<salt>$<hash>   (PHC string, base64 without padding)
 *   bcrypt  $2b$12$<53 characters>  ($2a$ and $2y$ are read as $2b$)
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

export type PasswordHash = ScryptHash | BcryptHash;

/** What `mailgate hash-password` produces: OWASP's scrypt profile N=2^15, r=8, p=3 (32 MiB, about 0.1-0.3 s). */
export const SCRYPT_DEFAULTS = { ln: 15, r: 8, p: 3 } as const;
export const BCRYPT_DEFAULT_COST = 12;

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
  if (text.startsWith('$argon2')) return 'argon2 hashes are not supported; make an scrypt hash with `mailgate hash-password` (or use bcrypt)';
  return 'not a password hash: plaintext passwords are not accepted; make a hash with `mailgate hash-password`';
}


export function formatScrypt(h: ScryptHash): string {
  const b64 = (b: Buffer) => b.toString('base64').replace(/=+$/, '');
  return `$scrypt$ln=${h.ln},r=${h.r},p=${h.p}$${b64(h.salt)}$${b64(h.hash)}`;
}
