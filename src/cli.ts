/**
 * The `mailgate` command: run | check (and the verbs other parts add).
 * Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error.
 */
import { parseArgs } from 'node:util';
import { loadConfigFile, type Config } from './config/load.ts';
import { formatDuration } from './core/duration.ts';
import { ConfigError, errorMessage, MailgateError } from './core/errors.ts';
import { createLogger } from './core/log.ts';
import type { Gateway as GatewayType } from './main.ts';
import { formatHostPort } from './net/address.ts';

const USAGE = `usage: mailgate <command> [options]

commands:
  run   -c FILE      run the gateway in the foreground (systemd friendly)
  check -c FILE      validate a configuration and print the effective listeners

options:
  -c, --config FILE  configuration file (default: config/mailgate.yaml)
  -h, --help         this text
`;

export async function main(argv: string[]): Promise<number> {
  const [verb, ...rest] = argv;
  if (!verb || verb === '-h' || verb === '--help' || verb === 'help') {
    process.stdout.write(USAGE);
    return verb ? 0 : 2;
  }
  let values: { config?: string | undefined; help?: boolean | undefined };
  try {
    ({ values } = parseArgs({
      args: rest,
      options: { config: { type: 'string', short: 'c' }, help: { type: 'boolean', short: 'h' } },
      allowPositionals: false,
    }));
  } catch (err) {
    process.stderr.write(`mailgate: ${errorMessage(err)}\n${USAGE}`);
    return 2;
  }
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const file = values.config ?? 'config/mailgate.yaml';
  switch (verb) {
    case 'check':
      return check(file);
    case 'run':
      return run(file);
    default:
      process.stderr.write(`mailgate: unknown command "${verb}"\n${USAGE}`);
      return 2;
  }
}

function readConfig(file: string): Config | number {
  try {
    return loadConfigFile(file);
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`mailgate: invalid configuration\n${err.message}\n`);
      return 2;
    }
    if (err instanceof MailgateError) {
      process.stderr.write(`mailgate: ${err.message}\n`);
      return 2;
    }
    throw err;
  }
}

function check(file: string): number {
  const config = readConfig(file);
  if (typeof config === 'number') return config;
  const out: string[] = [`${config.file}: OK`, `hostname: ${config.hostname}`, 'listeners:'];
  for (const l of config.listeners) {
    const extras: string[] = [];
    if (l.proxy_protocol) extras.push(`proxy-protocol ${l.proxy_protocol}`);
    if (l.protocol === 'smtp') extras.push(`auth ${l.auth}`, l.xclient ? 'xclient' : 'no-xclient');
    if (l.protocol === 'imap' && l.imap_id) extras.push('imap-id');
    if (l.protocol === 'http' && l.redirect_https) extras.push('redirect-https');
    if (l.protocol === 'http' && l.hsts > 0) extras.push(`hsts ${l.hsts}`);
    out.push(
      `  ${l.name.padEnd(12)} ${l.protocol.padEnd(5)} tls=${l.tls.padEnd(8)} ${l.listen.map(formatHostPort).join(',')} -> ${formatHostPort(l.backend)}` +
        (extras.length ? `  (${extras.join(', ')})` : ''),
    );
    const t = l.timeouts;
    out.push(
      `    timeouts: handshake ${formatDuration(t.tls_handshake)}, preauth idle ${formatDuration(t.preauth_idle)}/total ${formatDuration(t.preauth_total)}, ` +
        `connect ${formatDuration(t.backend_connect)}, login ${formatDuration(t.login_replay)}, idle ${formatDuration(t.postauth_idle)}`,
    );
  }
  out.push(config.tls.certificates.length ? `certificates: ${config.tls.certificates.map((c) => c.cert).join(', ')}` : `certificates: self-signed in ${config.tls.dir}`);
  process.stdout.write(`${out.join('\n')}\n`);
  for (const w of config.warnings) process.stderr.write(`warning: ${w}\n`);
  return 0;
}

async function run(file: string): Promise<number> {
  const config = readConfig(file);
  if (typeof config === 'number') return config;
  const log = createLogger(process.env.MAILGATE_LOG_LEVEL ?? config.log.level);
  // Loaded here so that `check` does not pull in the whole daemon.
  const { Gateway } = await import('./main.ts');
  let gateway: GatewayType;
  try {
    gateway = await Gateway.start(config, log);
  } catch (err) {
    log.fatal({ err: errorMessage(err) }, 'start failed');
    log.flush();
    process.stderr.write(`mailgate: ${errorMessage(err)}\n`);
    return 1;
  }
  process.on('uncaughtException', (err) => {
    // A bug, not client input (that is handled where it is read): log it and let the supervisor restart us.
    log.fatal({ err: errorMessage(err), stack: err.stack }, 'uncaught exception');
    log.flush();
    process.exit(70);
  });
  process.on('SIGHUP', () => {
    log.info('SIGHUP: reloading');
    gateway.reload().catch((err: unknown) => log.error({ err: errorMessage(err) }, 'reload failed'));
  });
  return new Promise<number>((resolve) => {
    const stop = (signal: string) => {
      log.info({ signal }, 'stopping');
      gateway.stop().then(
        () => resolve(0),
        (err: unknown) => {
          log.error({ err: errorMessage(err) }, 'stop failed');
          resolve(1);
        },
      );
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  }).then((code) => {
    log.flush();
    return code;
  });
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
