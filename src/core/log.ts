/**
 * pino JSON logs with fixed field names. Credentials never reach a log line:
 * the protocol code never hands them to the logger, and these redaction paths
 * are the second fence for anything that might (headers, error objects).
 */
import { pino, type Logger, type DestinationStream } from 'pino';

export type { Logger };

export const REDACT_PATHS = [
  'password',
  'pass',
  'credentials',
  '*.password',
  '*.pass',
  '*.credentials',
  'req.headers.authorization',
  'req.headers["proxy-authorization"]',
  'req.headers.cookie',
  'headers.authorization',
  'headers["proxy-authorization"]',
  'headers.cookie',
];

/**
 * At info level and above, log lines are gathered up to LOG_BATCH_BYTES and
 * written together, and at least every LOG_FLUSH_MS: one write per line cost
 * every session two thread-pool round trips ('login ok', 'session end'),
 * 5-10% of a session's CPU under load (BENCHMARKS.md). At debug and trace,
 * where someone is watching, every line is written at once. pino writes what
 * is buffered synchronously when the process exits, process.exit() after a
 * fatal error included.
 */
const LOG_BATCH_BYTES = 4096;
const LOG_FLUSH_MS = 100;

export function createLogger(level: string, destination?: DestinationStream): Logger {
  return pino(
    {
      level,
      base: { service: 'mailgate' },
      timestamp: pino.stdTimeFunctions.isoTime,
      redact: { paths: REDACT_PATHS, censor: '[redacted]' },
      formatters: { level: (label) => ({ level: label }) },
    },
    destination ?? pino.destination(level === 'debug' || level === 'trace' ? { fd: 1, sync: false } : { fd: 1, sync: false, minLength: LOG_BATCH_BYTES, periodicFlush: LOG_FLUSH_MS }),
  );
}
