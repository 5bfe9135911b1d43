/**
 * Policy's command-line pieces: `mailgate hash-password` (a hash for
 * `users.list[].password_hash`) and the policy lines of `mailgate check`.
 */
import type { Config } from '../config/load.ts';
import { parseCommandArgs } from '../core/cli-args.ts';
import { formatDuration } from '../core/duration.ts';
import { hashPassword } from './passwords.ts';
import { readPolicyFiles } from './files.ts';
import { UserDirectory } from './users.ts';

const USAGE = `usage: mailgate hash-password [--bcrypt | --argon2id]

Reads a password (asked twice without echo on a terminal, or the first line
of standard input) and prints a hash for users.list[].password_hash.
Without an option: scrypt (N=2^15, r=8, p=3).
  --bcrypt     a bcrypt hash (cost 12)
  --argon2id   an argon2id hash (m=19 MiB, t=2, p=1)
`;

/** Longest password accepted, in characters (the same bound as a SASL exchange). */
const MAX_PASSWORD = 1024;

export async function hashPasswordVerb(args: string[]): Promise<number> {
  const parsed = parseCommandArgs('hash-password', args, { bcrypt: { type: 'boolean' }, argon2id: { type: 'boolean' } }, USAGE);
  if (typeof parsed === 'number') return parsed;
  const values = { bcrypt: parsed.values.bcrypt === true, argon2id: parsed.values.argon2id === true };
  if (values.bcrypt && values.argon2id) {
    process.stderr.write(`mailgate hash-password: choose one of --bcrypt and --argon2id\n${USAGE}`);
    return 2;
  }
  let password: string;
  if (process.stdin.isTTY) {
    const first = await promptHidden('Password: ');
    if (first === null) return 130;
    const again = await promptHidden('Again: ');
    if (again === null) return 130;
    if (first !== again) {
      process.stderr.write('mailgate: the passwords differ\n');
      return 2;
    }
    password = first;
  } else {
    password = firstLine(await readAll(process.stdin, MAX_PASSWORD * 4 + 2));
  }
  if (password === '') {
    process.stderr.write('mailgate: empty password\n');
    return 2;
  }
  if (password.length > MAX_PASSWORD) {
    process.stderr.write(`mailgate: a password is at most ${MAX_PASSWORD} characters\n`);
    return 2;
  }
  process.stdout.write(`${await hashPassword(password, values.bcrypt ? 'bcrypt' : values.argon2id ? 'argon2id' : 'scrypt')}\n`);
  return 0;
}

function firstLine(text: string): string {
  const nl = text.indexOf('\n');
  return (nl < 0 ? text : text.slice(0, nl)).replace(/\r$/, '');
}

function readAll(stream: NodeJS.ReadableStream, max: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    stream.on('data', (c: Buffer) => {
      size += c.length;
      if (size <= max) chunks.push(c);
    });
    stream.once('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    stream.once('error', reject);
  });
}

/** Reads one line from the terminal without echo; null when the user pressed Ctrl-C or Ctrl-D. */
function promptHidden(prompt: string): Promise<string | null> {
  const stdin = process.stdin;
  process.stderr.write(prompt);
  return new Promise((resolve) => {
    let text = '';
    const done = (value: string | null) => {
      stdin.off('data', onData);
      stdin.setRawMode(false);
      stdin.pause();
      process.stderr.write('\n');
      resolve(value);
    };
    const onData = (chunk: Buffer) => {
      for (const ch of chunk.toString('utf8')) {
        if (ch === '\r' || ch === '\n') return done(text);
        if (ch === '\u0003' || ch === '\u0004') return done(null);
        if (ch === '\u007f' || ch === '\b') text = text.slice(0, -1);
        else if (ch >= ' ' && text.length < MAX_PASSWORD) text += ch;
      }
      return undefined;
    };
    stdin.setRawMode(true);
    stdin.resume();
    stdin.on('data', onData);
  });
}

/**
 * What `mailgate check` prints about policy. Reads the users file and the
 * backend password files like a start would; throws ConfigError/MailgateError.
 */
export function policySummary(config: Config): string[] {
  const users = UserDirectory.fromConfig(config.users, readPolicyFiles(config));
  const bf = config.brute_force;
  const t = (x: { failures: number; window: number; ban: number }) => `${x.failures} in ${formatDuration(x.window)} -> ${formatDuration(x.ban)}`;
  const out = [
    `policy: ${config.access.rules.length} access rules (default ${config.access.default}), ${users.size} local users, ${config.routes.length} routes, store ${config.policy_store.type}`,
    bf.enabled
      ? `  brute force: per address ${t(bf.per_address)}; per address+user ${t(bf.per_address_user)}; per user ${t(bf.per_user)}${bf.exempt.length ? `; exempt ${bf.exempt.map((c) => c.text).join(', ')}` : ''}`
      : '  brute force: off',
    `  user names: counted and banned as ${config.username_format.join(', ')} (per-user limits: ${config.username_format[0] ?? '%u'})`,
  ];
  for (const l of config.rate_limits) {
    const scope = [...(l.listeners ?? []), ...(l.protocols ?? [])];
    const exempt = l.exempt.length ? `; exempt ${l.exempt.map((c) => c.text).join(', ')}` : '';
    out.push(`  limit: ${l.limit} per ${l.per} ${l.max}${l.window === undefined ? ' at once' : ` per ${formatDuration(l.window)}`}${scope.length ? ` (${scope.join(', ')})` : ''}${exempt}`);
  }
  for (const l of config.listeners) {
    if ('authentication' in l && l.authentication === 'local') {
      const login = l.backend_login ?? 'replay';
      out.push(`  ${l.name}: local users, backend login ${typeof login === 'string' ? login : `as ${login.user}`}`);
    }
  }
  return out;
}
