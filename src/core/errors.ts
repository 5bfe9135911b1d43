/**
 * One catalogue of coded errors. Tests and callers match on `code`, never on
 * the message, so messages can be improved without breaking anything.
 */
export const ErrorCodes = {
  CONFIG_INVALID: 'Configuration is invalid',
  CONFIG_READ: 'Configuration file could not be read',
  LISTEN_FAILED: 'Listener could not bind',
  BACKEND_CONNECT: 'Backend connection failed',
  BACKEND_TIMEOUT: 'Backend did not answer in time',
  BACKEND_PROTOCOL: 'Backend sent something unexpected',
  BACKEND_CLOSED: 'Backend closed the connection',
  BACKEND_NO_AUTH: 'Backend offers no AUTH, which passthrough authentication needs',
  CERT_LOAD: 'Certificate or key could not be loaded',
  CERT_WRITE: 'Certificate or key could not be written',
  ACME: 'The ACME certificate authority refused or could not be reached',
  ACME_LOCK: 'Another gateway holds the ordering lock for this name',
  CONTROL: 'Control socket error',
  POLICY_STORE: 'Policy store (Redis) failed',
  AUTH_BUSY: 'Too many password verifications are waiting',
  HASH_INVALID: 'Not a supported password hash',
  BAN_INVALID: 'Ban request is invalid',
  WORKER: 'A worker process failed to start or answer',
} as const;

export type ErrorCode = keyof typeof ErrorCodes;

export class MailgateError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message?: string, options?: { cause?: unknown }) {
    super(message ?? ErrorCodes[code], options);
    this.name = 'MailgateError';
    this.code = code;
  }
}

export interface ConfigProblem {
  file: string;
  line: number;
  column: number;
  path: string;
  message: string;
}

export class ConfigError extends MailgateError {
  readonly problems: readonly ConfigProblem[];
  constructor(problems: readonly ConfigProblem[], options?: { cause?: unknown }) {
    super('CONFIG_INVALID', problems.map(formatProblem).join('\n'), options);
    this.name = 'ConfigError';
    this.problems = problems;
  }
}

export function formatProblem(p: ConfigProblem): string {
  const where = p.line > 0 ? `${p.file}:${p.line}:${p.column}` : p.file;
  return p.path ? `${where}: ${p.path}: ${p.message}` : `${where}: ${p.message}`;
}

export function errorMessage(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}

export function errorCode(err: unknown): string | undefined {
  if (err && typeof err === 'object' && 'code' in err && typeof err.code === 'string') return err.code;
  return undefined;
}
