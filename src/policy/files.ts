/**
 * The files a config names for policy: the users file (`users.file`) and the
 * backend password files (`backend_login.password_file`). The runtime reads
 * them with the config, at start and at every reload; the serving part gets
 * what they hold as data, so a worker reads no file and runs what its
 * primary checked.
 */
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { parseYamlFile, type Config } from '../config/load.ts';
import { usersFileSchema, type BackendLogin, type UserEntry } from '../config/schema-policy.ts';
import { MailgateError } from '../core/errors.ts';

export interface PolicyFiles {
  /** The users of `users.file` (none without one). */
  readonly users: readonly UserEntry[];
  /** First line of each backend password file, by absolute path. Never logged. */
  readonly passwords: Readonly<Record<string, string>>;
}

/** Reads both kinds; throws ConfigError (with file, line and key) or MailgateError naming the file. */
export function readPolicyFiles(config: Config): PolicyFiles {
  const users = config.users.file ? readUsersFile(resolve(config.baseDir, config.users.file)) : [];
  const passwords: Record<string, string> = {};
  for (const login of backendLogins(config)) {
    if (login === undefined || typeof login === 'string') continue;
    const file = resolve(config.baseDir, login.password_file);
    if (file in passwords) continue;
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (err) {
      throw new MailgateError('CONFIG_READ', `backend_login password_file ${file}: ${(err as Error).message}`, { cause: err });
    }
    const first = text.split(/\r?\n/, 1)[0] ?? '';
    if (first === '') throw new MailgateError('CONFIG_INVALID', `backend_login password_file ${file} is empty`);
    passwords[file] = first;
  }
  return { users, passwords };
}

/** Reads and validates a users file; problems name the file, line and key like the main config. */
export function readUsersFile(file: string): UserEntry[] {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new MailgateError('CONFIG_READ', `${file}: ${(err as Error).message}`, { cause: err });
  }
  return parseYamlFile(usersFileSchema, text, file, []).data;
}

/** Every backend_login of the listeners and routes. */
function backendLogins(config: Config): (BackendLogin | undefined)[] {
  return [...config.listeners.map((l) => ('backend_login' in l ? l.backend_login : undefined)), ...config.routes.map((r) => r.backend_login)];
}
