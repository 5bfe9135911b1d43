/**
 * Reads the YAML file, validates it against the one schema, maps every
 * problem back to file:line:column and key path, resolves defaults and paths,
 * and returns a deeply frozen Config.
 */
import { readFileSync } from 'node:fs';
import { hostname as osHostname } from 'node:os';
import { dirname, resolve } from 'node:path';
import { isMap, isPair, isScalar, isSeq, LineCounter, parseDocument, type Document, type Node as YamlNode } from 'yaml';
import type { z } from 'zod';
import { ConfigError, MailgateError, type ConfigProblem } from '../core/errors.ts';
import { formatHostPort, type HostPort } from '../net/address.ts';
import { discoveryProblems, discoveryWarnings } from './schema-discovery.ts';
import {
  configSchema,
  DEFAULT_LIMITS,
  DEFAULT_TIMEOUTS,
  type Limits,
  type ListenerConfig,
  type ParsedConfig,
  type Timeouts,
} from './schema.ts';

/** A listener with the global timeouts and limits merged in (distributive, so `protocol` still narrows). */
export type Listener = ListenerConfig extends infer L
  ? L extends ListenerConfig
    ? Omit<L, 'timeouts' | 'limits' | 'backend'> & {
        timeouts: Timeouts;
        limits: Limits;
        /** The backend, or the first of the pool. */
        backend: HostPort;
        /** Every backend when the config names a pool (a list); absent for one backend. */
        pool?: readonly HostPort[];
      }
    : never
  : never;

/**
 * The validated configuration. Sections other parts add to the schema
 * (policy, acme, control, metrics, ...) come through as parsed, fully
 * defaulted; the core sections below are resolved further (paths, merged
 * per-listener timeouts and limits).
 */
export type Config = Omit<ParsedConfig, 'hostname' | 'tls' | 'timeouts' | 'limits' | 'listeners'> & {
  /** Absolute path of the file this was read from. */
  file: string;
  /** Folder of the config file: relative paths in it are resolved against this. */
  baseDir: string;
  hostname: string;
  tls: { min_version: 'TLSv1.2' | 'TLSv1.3'; certificates: { cert: string; key: string }[]; dir: string };
  shutdownDrain: number;
  listeners: Listener[];
  /** Things that are legal but probably not what the admin wants. */
  warnings: string[];
};

export function loadConfigFile(file: string): Config {
  const abs = resolve(file);
  let text: string;
  try {
    text = readFileSync(abs, 'utf8');
  } catch (err) {
    throw new MailgateError('CONFIG_READ', `${abs}: ${(err as Error).message}`, { cause: err });
  }
  return parseConfig(text, abs);
}

export function parseConfig(text: string, file: string): Config {
  const { data, doc, at } = parseYamlFile(configSchema, text, file, {});
  return finish(data, file, doc, at);
}

/**
 * YAML text checked by a schema (the config, a users file): a syntax error or
 * a schema problem is a ConfigError naming the file, line, column and key.
 * `empty` stands in for an empty document.
 */
export function parseYamlFile<S extends z.ZodType>(
  schema: S,
  text: string,
  file: string,
  empty: unknown,
): { data: z.output<S>; doc: Document; at: (offset: number) => { line: number; col: number } } {
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, prettyErrors: false, uniqueKeys: true });
  const at = (offset: number) => lineCounter.linePos(offset);
  if (doc.errors.length > 0) {
    throw new ConfigError(
      doc.errors.map((e) => {
        const pos = at(e.pos[0]);
        return { file, line: pos.line, column: pos.col, path: '', message: e.message.split('\n')[0] ?? e.message };
      }),
    );
  }
  const result = schema.safeParse(doc.toJS() ?? empty);
  if (!result.success) throw new ConfigError(result.error.issues.map((issue) => toProblem(issue, doc, file, at)));
  return { data: result.data, doc, at };
}

function toProblem(
  issue: z.core.$ZodIssue,
  doc: Document,
  file: string,
  at: (offset: number) => { line: number; col: number },
): ConfigProblem {
  const path = issue.path.filter((p): p is string | number => typeof p !== 'symbol');
  if (issue.code === 'unrecognized_keys') {
    const key = issue.keys[0] ?? '';
    const offset = keyOffset(doc, path, key);
    const pos = offset === undefined ? { line: 0, col: 0 } : at(offset);
    const keys = issue.keys.map((k) => `"${k}"`).join(', ');
    return { file, line: pos.line, column: pos.col, path: formatPath([...path, key]), message: `unknown key ${keys}` };
  }
  const offset = nodeOffset(doc, path);
  const pos = offset === undefined ? { line: 0, col: 0 } : at(offset);
  let message = issue.message;
  if (issue.code === 'invalid_type' && issue.input === undefined) message = 'is required';
  return { file, line: pos.line, column: pos.col, path: formatPath(path), message };
}

/** The start of the deepest node that exists along `path` (a missing key points at its parent). */
function nodeOffset(doc: Document, path: (string | number)[]): number | undefined {
  for (let n = path.length; n >= 0; n--) {
    const node = doc.getIn(path.slice(0, n), true) as YamlNode | undefined;
    if (node && typeof node === 'object' && 'range' in node && node.range) {
      if (n > 0 && n < path.length) return node.range[0];
      if (n === path.length) {
        const k = keyOffset(doc, path.slice(0, -1), path[path.length - 1]);
        return k ?? node.range[0];
      }
      return node.range[0];
    }
  }
  return undefined;
}

function keyOffset(doc: Document, parentPath: (string | number)[], key: string | number | undefined): number | undefined {
  const parent = parentPath.length === 0 ? doc.contents : doc.getIn(parentPath, true);
  if (!isMap(parent)) {
    if (isSeq(parent) && typeof key === 'number') {
      const item = parent.items[key] as YamlNode | undefined;
      return item?.range?.[0];
    }
    return undefined;
  }
  for (const item of parent.items) {
    if (isPair(item) && isScalar(item.key) && String(item.key.value) === String(key)) return item.key.range?.[0];
  }
  return undefined;
}

function formatPath(path: (string | number)[]): string {
  return path.map((p, i) => (typeof p === 'number' ? `[${p}]` : i === 0 ? p : `.${p}`)).join('');
}

function finish(
  parsed: ParsedConfig,
  file: string,
  doc: Document,
  at: (offset: number) => { line: number; col: number },
): Config {
  const base = dirname(file);
  const problems: ConfigProblem[] = [];
  const problem = (path: (string | number)[], message: string) => {
    const offset = nodeOffset(doc, path);
    const pos = offset === undefined ? { line: 0, col: 0 } : at(offset);
    problems.push({ file, line: pos.line, column: pos.col, path: formatPath(path), message });
  };

  const names = new Set<string>();
  const bound = new Map<string, string>();
  const warnings: string[] = [];
  const globalTimeouts = { ...DEFAULT_TIMEOUTS, ...stripUndefined(parsed.timeouts) };
  const globalLimits = { ...DEFAULT_LIMITS, ...stripUndefined(parsed.limits) };

  const listeners: Listener[] = parsed.listeners.map((l, i) => {
    if (names.has(l.name)) problem(['listeners', i, 'name'], `duplicate listener name "${l.name}"`);
    names.add(l.name);
    l.listen.forEach((addr: HostPort, j: number) => {
      if (addr.port === 0) return;
      const key = `${addr.host}:${addr.port}`;
      const other = bound.get(key);
      if (other !== undefined) problem(['listeners', i, 'listen', j], `${formatHostPort(addr)} is already used by listener "${other}"`);
      bound.set(key, l.name);
    });
    if (l.protocol === 'smtp' && l.auth === 'none' && l.proxy_protocol === false && !l.xclient) {
      warnings.push(
        `listener "${l.name}": auth is none and the client's address is passed neither by XCLIENT nor by the PROXY protocol; ` +
          'a backend that trusts the gateway would relay for anyone (open relay)',
      );
    }
    if (l.protocol === 'smtp' && l.auth === 'none' && l.proxy_protocol === false && l.xclient) {
      warnings.push(
        `listener "${l.name}": auth is none; the client's address reaches the backend only if the backend offers XCLIENT to the gateway, ` +
          'otherwise a backend that trusts the gateway would relay for anyone',
      );
    }
    if ('authentication' in l && l.authentication === 'http') {
      if (parsed.auth_http === undefined) problem(['listeners', i, 'authentication'], 'http needs an auth_http section (at least its url)');
      if (l.protocol === 'smtp' && l.auth === 'none') problem(['listeners', i, 'authentication'], 'http asks the auth service about logins; a listener with auth: none has none');
    }
    const { timeouts, limits, backend, ...rest } = l;
    const list = Array.isArray(backend) ? backend : [backend];
    return {
      ...rest,
      backend: list[0],
      ...(list.length > 1 ? { pool: list } : {}),
      timeouts: { ...globalTimeouts, ...stripUndefined(timeouts) },
      limits: { ...globalLimits, ...stripUndefined(limits) },
    } as Listener;
  });
  if (parsed.acme?.lock === 'redis' && parsed.policy_store.type !== 'redis') {
    problem(['acme', 'lock'], 'redis uses the policy store\'s Redis: set policy_store: { type: redis, url: ... }, or use auto or file');
  }

  for (const p of discoveryProblems(parsed)) problem(p.path, p.message);
  warnings.push(...discoveryWarnings(parsed));

  if (problems.length > 0) throw new ConfigError(problems);

  const { hostname, tls, timeouts, limits: _limits, listeners: _listeners, ...sections } = parsed;
  const config: Config = {
    ...sections,
    file,
    baseDir: base,
    hostname: hostname ?? osHostname(),
    tls: {
      min_version: tls.min_version,
      certificates: tls.certificates.map((c) => ({ cert: resolve(base, c.cert), key: resolve(base, c.key) })),
      dir: resolve(base, tls.dir),
    },
    shutdownDrain: timeouts.shutdown_drain ?? 30_000,
    listeners,
    warnings,
  };
  return deepFreeze(config);
}

function stripUndefined<T extends object>(o: T): { [K in keyof T]-?: Exclude<T[K], undefined> } {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as never;
}

/**
 * A config that crossed a process boundary as data (a worker's, from its
 * primary, which read and checked it): frozen again, as loadConfigFile
 * leaves every config.
 */
export function freezeConfig(data: Config): Config {
  return deepFreeze(data);
}

function deepFreeze<T>(o: T): T {
  if (o && typeof o === 'object' && !Object.isFrozen(o)) {
    Object.freeze(o);
    for (const v of Object.values(o)) deepFreeze(v);
  }
  return o;
}
