/**
 * The `mailgate` command: run | check (and the verbs other parts add).
 * Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error.
 */
import cluster from 'node:cluster';
import { configProblem, parseCommandArgs } from './core/cli-args.ts';
import { loadConfigFile, type Config } from './config/load.ts';
import { formatDuration } from './core/duration.ts';
import { errorMessage } from './core/errors.ts';
import { formatHostPort } from './net/address.ts';
import { workerCount } from './cluster/count.ts';
import { policySummary } from './policy/cli.ts';
import { acmeSummary } from './acme/settings.ts';
import { discoverySummary } from './discovery/settings.ts';

const USAGE = `usage: mailgate <command> [options]

commands:
  run   -c FILE      run the gateway in the foreground (systemd friendly)
  check -c FILE      validate a configuration and print the effective listeners
  top   [-c FILE | -s SOCKET]   live dashboard of the running gateway (control socket)
  status [-c FILE | -s SOCKET]  listeners, counters and certificates of the running gateway
  reload [-c FILE | -s SOCKET]  make the running gateway re-read its configuration
  certs [-c FILE | -s SOCKET]   certificate status of the running gateway
  certs renew [NAME...]         renew ACME certificates now through the running gateway
  dns [--check] [--resolver ADDR]  the DNS records to publish (discovery:), checked against a resolver
  bans [-c FILE | -s SOCKET]    every ban of the running gateway (addresses, ranges, users, users from an address)
  ban (IP | --user NAME [--ip IP]) [--for 1h] [--reason TEXT]   ban through the running gateway
  unban (IP | --user NAME [--ip IP] | --id ID)                   lift bans through the running gateway
  hash-password [--bcrypt|--argon2id] print a password hash for users.list (asks twice, or reads stdin)

options:
  -c, --config FILE  configuration file (default: config/mailgate.yaml)
  -s, --socket PATH  control socket (default: control.socket of the configuration)
      --json         status, reload, certs, bans, ban, unban: print the daemon's answer as JSON
  -h, --help         this text
`;

export async function main(argv: string[]): Promise<number> {
  const [verb, ...rest] = argv;
  if (!verb || verb === '-h' || verb === '--help' || verb === 'help') {
    process.stdout.write(USAGE);
    return verb ? 0 : 2;
  }
  if (verb === 'hash-password') {
    const { hashPasswordVerb } = await import('./policy/cli.ts');
    return hashPasswordVerb(rest);
  }
  if (verb === 'certs') {
    // certs [renew [NAME...]]: positional arguments, parsed by the verb itself (src/control/certs-verb.ts).
    const { certsVerb } = await import('./control/certs-verb.ts');
    return certsVerb(rest);
  }
  if (verb === 'dns') {
    // dns [--check] [--resolver ADDR]: options of its own, parsed by the verb (src/control/dns-verb.ts).
    const { dnsVerb } = await import('./control/dns-verb.ts');
    return dnsVerb(rest);
  }
  if (verb === 'bans' || verb === 'ban' || verb === 'unban') {
    // Targets as positionals and options, parsed by the verb itself (src/control/bans-verb.ts).
    const { bansVerb } = await import('./control/bans-verb.ts');
    return bansVerb(verb, rest);
  }
  // check, run and the control socket verbs top, status, reload: -c, -s, --json.
  const parsed = parseCommandArgs(verb, rest, { config: { type: 'string', short: 'c' }, socket: { type: 'string', short: 's' }, json: { type: 'boolean' } }, USAGE);
  if (typeof parsed === 'number') return parsed;
  const values = { config: parsed.string('config'), socket: parsed.string('socket'), json: parsed.values.json === true };
  const file = values.config ?? 'config/mailgate.yaml';
  switch (verb) {
    case 'check':
      return check(file);
    case 'run':
      return run(file);
    case 'top': {
      // The dashboard, a client of the control socket (src/tui/top.ts).
      const { topVerb } = await import('./tui/top.ts');
      return topVerb({ config: file, socket: values.socket });
    }
    case 'status':
    case 'reload': {
      // Clients of the control socket (src/control/cli-verbs.ts).
      const verbs = await import('./control/cli-verbs.ts');
      const opts = { config: file, socket: values.socket, json: values.json };
      return verb === 'status' ? verbs.statusVerb(opts) : verbs.reloadVerb(opts);
    }
    default:
      process.stderr.write(`mailgate: unknown command "${verb}"\n${USAGE}`);
      return 2;
  }
}

function readConfig(file: string): Config | number {
  try {
    return loadConfigFile(file);
  } catch (err) {
    return configProblem(err);
  }
}

function check(file: string): number {
  const config = readConfig(file);
  if (typeof config === 'number') return config;
  const workers = `workers: ${workerCount(config)}${config.workers === 'auto' ? ' (auto: one per core)' : ''}`;
  const out: string[] = [`${config.file}: OK`, `hostname: ${config.hostname}`, workers, 'listeners:'];
  for (const l of config.listeners) {
    const extras: string[] = [];
    if (l.proxy_protocol) extras.push(`proxy-protocol ${l.proxy_protocol}`);
    if (l.accept_proxy_from?.length) extras.push(`accepts PROXY from ${l.accept_proxy_from.map((c) => c.text).join(',')}`);
    if ('authentication' in l && l.authentication === 'http') extras.push('auth_http');
    if (l.protocol === 'http' && l.trust_forwarded.length > 0) extras.push(`trusts X-Forwarded-* from ${l.trust_forwarded.map((c) => c.text).join(',')}`);
    if (l.protocol === 'smtp') extras.push(`auth ${l.auth}`, l.xclient ? 'xclient' : 'no-xclient');
    if (l.protocol === 'imap' && l.imap_id) extras.push('imap-id');
    if (l.protocol === 'http' && l.redirect_https) extras.push('redirect-https');
    if (l.protocol === 'http' && l.hsts > 0) extras.push(`hsts ${l.hsts}`);
    out.push(
      `  ${l.name.padEnd(12)} ${l.protocol.padEnd(5)} tls=${l.tls.padEnd(8)} ${l.listen.map(formatHostPort).join(',')} -> ${(l.pool ?? [l.backend]).map(formatHostPort).join(' | ')}` +
        (extras.length ? `  (${extras.join(', ')})` : ''),
    );
    const t = l.timeouts;
    out.push(
      `    timeouts: handshake ${formatDuration(t.tls_handshake)}, preauth idle ${formatDuration(t.preauth_idle)}/total ${formatDuration(t.preauth_total)}, ` +
        `connect ${formatDuration(t.backend_connect)}, login ${formatDuration(t.login_replay)}, idle ${formatDuration(t.postauth_idle)}`,
    );
  }
  out.push(config.tls.certificates.length ? `certificates: ${config.tls.certificates.map((c) => c.cert).join(', ')}` : `certificates: self-signed in ${config.tls.dir}`);
  const acme = acmeSummary(config);
  if (acme.error) {
    process.stderr.write(`mailgate: invalid configuration\n${config.file}: ${acme.error}\n`);
    return 2;
  }
  out.push(...acme.lines);
  out.push(...discoverySummary(config));
  try {
    // The users file and backend password files are read as a start would read them.
    out.push(...policySummary(config));
  } catch (err) {
    process.stderr.write(`mailgate: invalid configuration\n${errorMessage(err)}\n`);
    return 2;
  }
  process.stdout.write(`${out.join('\n')}\n`);
  for (const w of config.warnings) process.stderr.write(`warning: ${w}\n`);
  if (acme.warning) process.stderr.write(`warning: ${acme.warning}\n`);
  return 0;
}

/** The gateway (src/main.ts), or, in a process the gateway forked, one of its workers (src/worker.ts). */
async function run(file: string): Promise<number> {
  // A worker reads no file: its config comes from the primary.
  if (cluster.isWorker) {
    const { runWorker } = await import('./worker.ts');
    return runWorker();
  }
  const config = readConfig(file);
  if (typeof config === 'number') return config;
  // Loaded here so that `check` does not pull in the whole daemon.
  const { runGateway } = await import('./main.ts');
  return runGateway(config);
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
    // Nothing is left to wait for after run/check; pending keep-alive handles must not hold the process.
    if (code !== 0 || process.argv[2] !== 'run') return;
    setTimeout(() => process.exit(code), 200).unref();
  },
  (err: unknown) => {
    process.stderr.write(`mailgate: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exitCode = 1;
  },
);
