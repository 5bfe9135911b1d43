/**
 * The policy seam. The session driver asks at two points: when a client
 * connects and when credentials are ready. Policy is a pure decision on facts;
 * it never touches a socket. This core version is `passthrough`: everyone may
 * connect, the backend decides on credentials, and the listener's default
 * backend is used. Rules, local users, limits and bans plug in here.
 */
import type { Listener } from '../config/load.ts';
import type { HostPort } from '../net/address.ts';
import type { Credentials } from '../protocols/types.ts';

export interface ConnectFacts {
  listener: Listener;
  clientIp: string;
  tls: boolean;
  now: number;
}

export interface AuthFacts extends ConnectFacts {
  user: string | null;
  mechanism: Credentials['mechanism'] | null;
}

export type Verdict =
  | { action: 'allow' }
  | { action: 'deny'; reason: string }
  | { action: 'tempfail'; reason: string; retryAfterMs?: number };

export type AuthDecision =
  | { action: 'allow'; backend: HostPort; credentials: Credentials | null }
  | { action: 'deny'; reason: string }
  | { action: 'tempfail'; reason: string; retryAfterMs?: number };

export interface Policy {
  onConnect(facts: ConnectFacts): Verdict;
  onAuth(facts: AuthFacts, credentials: Credentials | null): Promise<AuthDecision>;
  /** The backend's (or local) verdict on a login, for failure counting and bans. */
  onAuthResult(facts: AuthFacts, ok: boolean): void;
  /** A session that passed onConnect has ended (concurrency accounting). */
  onDisconnect(facts: ConnectFacts): void;
}

export class PassthroughPolicy implements Policy {
  onConnect(): Verdict {
    return { action: 'allow' };
  }

  async onAuth(facts: AuthFacts, credentials: Credentials | null): Promise<AuthDecision> {
    return { action: 'allow', backend: facts.listener.backend, credentials };
  }

  onAuthResult(): void {}

  onDisconnect(): void {}
}
