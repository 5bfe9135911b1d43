/**
 * Per-user routing: a user, a group or the domain part of the login can go
 * to another backend than the listener's (the migration case). Routes are an
 * ordered list, first match wins; no match keeps the listener's backend.
 */
import { resolve } from 'node:path';
import type { BackendLogin, Route } from '../config/schema-policy.ts';
import { MailgateError } from '../core/errors.ts';
import type { HostPort } from '../net/address.ts';
import type { Credentials } from '../protocols/types.ts';
import type { PolicyFiles } from './files.ts';
import { domainOf, nameMatcher } from './names.ts';

export interface RouteFacts {
  listener: string;
  protocol: string;
  /** The listener's own backend: its port is kept when a route names only a host. */
  defaultBackend: HostPort;
  /** The listener's pool, when it names one. */
  defaultPool?: readonly HostPort[] | undefined;
  user: string;
  groups: ReadonlySet<string>;
}

export interface RouteTarget {
  backend: HostPort;
  /** When the route names a pool (a list of backends): all of them; `backend` is the first. */
  pool: readonly HostPort[] | undefined;
  /** undefined: the listener's backend_login applies. */
  login: BackendLogin | undefined;
  /** Index into `routes`, or null when the listener's default was used. */
  route: number | null;
}

interface CompiledRoute {
  matches(f: RouteFacts): boolean;
  target(f: RouteFacts): HostPort;
  pool: readonly HostPort[] | undefined;
  login: BackendLogin | undefined;
}

export class Router {
  private readonly routes: CompiledRoute[];

  constructor(routes: readonly Route[]) {
    this.routes = routes.map(compile);
  }

  get size(): number {
    return this.routes.length;
  }

  route(f: RouteFacts): RouteTarget {
    for (let i = 0; i < this.routes.length; i++) {
      const r = this.routes[i] as CompiledRoute;
      if (r.matches(f)) return { backend: r.target(f), pool: r.pool, login: r.login, route: i };
    }
    return { backend: f.defaultBackend, pool: f.defaultPool, login: undefined, route: null };
  }
}

function compile(route: Route): CompiledRoute {
  const listeners = route.listeners && new Set(route.listeners);
  const protocols = route.protocols && new Set<string>(route.protocols);
  const users = route.users && nameMatcher(route.users);
  const groups = route.groups;
  const domains = route.domains && new Set(route.domains.map((d) => d.toLowerCase()));
  const list = route.backend === undefined ? undefined : Array.isArray(route.backend) ? route.backend : [route.backend];
  const first = list?.[0];
  return {
    pool: list && list.length > 1 ? list : undefined,
    matches(f) {
      if (listeners && !listeners.has(f.listener)) return false;
      if (protocols && !protocols.has(f.protocol)) return false;
      // Within a route, users, groups and domains are alternatives: any one of them selects the user.
      if (users?.(f.user)) return true;
      if (groups?.some((g) => f.groups.has(g))) return true;
      if (domains?.has(domainOf(f.user))) return true;
      return false;
    },
    target(f) {
      return first ?? { host: route.host ?? f.defaultBackend.host, port: f.defaultBackend.port };
    },
    login: route.backend_login,
  };
}

/** Backend passwords from the `password_file`s (read with the config, src/policy/files.ts); never logged. */
export class BackendSecrets {
  private readonly passwords: Readonly<Record<string, string>>;
  private readonly baseDir: string;

  constructor(files: PolicyFiles, baseDir: string) {
    this.passwords = files.passwords;
    this.baseDir = baseDir;
  }

  /**
   * The credentials for the backend after a local login. `userName` is the
   * configured name of the verified user (never a glob, never the client's spelling).
   */
  credentials(login: BackendLogin, client: Credentials, userName: string): Credentials | null {
    if (login === 'replay') return client;
    if (login === 'none') return null;
    const password = this.passwords[resolve(this.baseDir, login.password_file)];
    if (password === undefined) throw new MailgateError('CONFIG_INVALID', 'backend_login password_file was not loaded');
    return { user: login.user.replaceAll('{user}', userName), password, mechanism: client.mechanism };
  }
}
