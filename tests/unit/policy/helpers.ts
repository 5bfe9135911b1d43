/** Shared setup for policy unit tests: configs from YAML, a silent logger, engines on a fresh or given state. */
import { scryptSync } from 'node:crypto';
import { Writable } from 'node:stream';
import { parseConfig, type Config, type Listener } from '../../../src/config/load.ts';
import { PolicyAdmin } from '../../../src/control/bans.ts';
import { createLogger, type Logger } from '../../../src/core/log.ts';
import { PolicyEngine, type AuthFacts, type ConnectFacts } from '../../../src/policy/engine.ts';
import { readPolicyFiles } from '../../../src/policy/files.ts';
import { formatScrypt } from '../../../src/core/password-hash.ts';
import { passwordBytes } from '../../../src/policy/passwords.ts';
import { PolicyState } from '../../../src/policy/state.ts';
import type { Credentials } from '../../../src/protocols/types.ts';

export const LISTENERS = `
listeners:
  - { name: imaps, protocol: imap, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:143" }
  - { name: imap, protocol: imap, listen: "127.0.0.1:0", tls: starttls, backend: "10.0.0.1:143" }
  - { name: pop3s, protocol: pop3, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:110" }
  - { name: smtps, protocol: smtp, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:25" }
  - { name: mx, protocol: smtp, listen: "127.0.0.1:0", tls: none, auth: none, backend: "10.0.0.1:25" }
  - { name: https, protocol: http, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:80" }
`;

/** A config from YAML policy sections; the standard listeners are added unless the text has its own. */
export function configFrom(yaml: string, file = '/etc/mailgate/mailgate.yaml'): Config {
  return parseConfig(yaml.includes('listeners:') ? yaml : `${yaml}\n${LISTENERS}`, file);
}

/** Log lines, kept for assertions (and silent on the console). */
export function memoryLog(): { log: Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const l of chunk.toString('utf8').split('\n')) if (l) lines.push(JSON.parse(l) as Record<string, unknown>);
      done();
    },
  });
  return { log: createLogger('debug', sink), lines };
}

export const silentLog = createLogger('silent');

/** An engine on a fresh (or given) state, and the admin view of that state (control/bans.ts). */
export async function engineFor(
  config: Config,
  opts: { state?: PolicyState; clock?: () => number; log?: Logger } = {},
): Promise<{ engine: PolicyEngine; state: PolicyState; admin: PolicyAdmin }> {
  const log = opts.log ?? silentLog;
  const state = opts.state ?? (await PolicyState.create({ store: config.policy_store, log, ...(opts.clock ? { clock: opts.clock } : {}) }));
  return { engine: engineOn(config, state, log), state, admin: new PolicyAdmin(state, config.brute_force, log) };
}

/** An engine for `config` on a given state (a reload, another worker), with the config's policy files read. */
export function engineOn(config: Config, state: PolicyState, log: Logger = silentLog): PolicyEngine {
  return new PolicyEngine(config, readPolicyFiles(config), state, log);
}

export function listenerOf(config: Config, name: string): Listener {
  const l = config.listeners.find((x) => x.name === name);
  if (!l) throw new Error(`no listener ${name}`);
  return l;
}

let sessions = 0;

export function connect(config: Config, listener: string, clientIp: string, session = `s${++sessions}`): ConnectFacts {
  const l = listenerOf(config, listener);
  return { listener: l, clientIp, tls: l.tls === 'implicit', now: Date.now(), session };
}

export function login(c: ConnectFacts, credentials: Credentials | null): AuthFacts {
  return { ...c, tls: c.listener.tls !== 'none', now: Date.now(), user: credentials?.user ?? null, mechanism: credentials?.mechanism ?? null };
}

export function creds(user: string, password: string, extra: Partial<Credentials> = {}): Credentials {
  return { user, password, mechanism: 'PLAIN', ...extra };
}

/** A cheap scrypt hash for tests (ln=10 unless asked). */
export function cheapScrypt(password: string, ln = 10): string {
  const salt = Buffer.from('0123456789abcdef');
  const hash = scryptSync(passwordBytes(password), salt, 32, { N: 2 ** ln, r: 8, p: 1, maxmem: 64 * 1024 * 1024 });
  return formatScrypt({ kind: 'scrypt', ln, r: 8, p: 1, salt, hash });
}
