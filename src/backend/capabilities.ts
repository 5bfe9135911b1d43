/**
 * What each backend advertises before login (IMAP CAPABILITY, POP3 CAPA,
 * SMTP EHLO), learned on a throwaway connection and cached, so greetings do
 * not cost a backend round trip per client. A stale entry is served while a
 * refresh runs; a failed probe is remembered briefly so a dead backend is not
 * hammered by every new client.
 */
import type { Logger } from '../core/log.ts';
import { errorMessage } from '../core/errors.ts';
import { formatHostPort, type HostPort } from '../net/address.ts';
import type { BackendCapabilities, ProtocolModule } from '../protocols/types.ts';
import { connectBackend } from './connector.ts';
import { SocketLink } from './link.ts';

const FRESH_MS = 300_000;
const FAILED_MS = 5_000;

interface Entry {
  caps: BackendCapabilities | undefined;
  expires: number;
  inflight: Promise<BackendCapabilities | undefined> | undefined;
}

export interface ProbeTarget {
  module: ProtocolModule;
  backend: HostPort;
  proxyProtocol: false | 'v1' | 'v2';
  connectTimeoutMs: number;
  replayTimeoutMs: number;
  maxLine: number;
}

export class CapabilityCache {
  private readonly entries = new Map<string, Entry>();
  private readonly hostname: string;
  private readonly log: Logger;

  constructor(hostname: string, log: Logger) {
    this.hostname = hostname;
    this.log = log;
  }

  /** Cached capabilities, probing when there are none yet; undefined when the backend cannot be reached. */
  async get(t: ProbeTarget): Promise<BackendCapabilities | undefined> {
    const key = keyOf(t);
    const now = Date.now();
    let entry = this.entries.get(key);
    if (!entry) {
      entry = { caps: undefined, expires: 0, inflight: undefined };
      this.entries.set(key, entry);
    }
    if (entry.expires > now) return entry.caps;
    if (!entry.inflight) {
      const e = entry;
      e.inflight = this.probe(t).then((caps) => {
        e.inflight = undefined;
        // Keep the last good answer through a failed refresh: the backend's features rarely change.
        if (caps) e.caps = caps;
        e.expires = Date.now() + (caps ? FRESH_MS : FAILED_MS);
        return caps ?? e.caps;
      });
    }
    return entry.caps ?? entry.inflight;
  }

  /**
   * The capabilities known right now, without waiting: the cached answer (a
   * stale one also starts a refresh, as get() does), or undefined when none
   * is known yet. The common greeting needs no promise or timer this way.
   */
  peek(t: ProbeTarget): BackendCapabilities | undefined {
    const entry = this.entries.get(keyOf(t));
    if (!entry?.caps) return undefined;
    if (entry.expires <= Date.now()) void this.get(t);
    return entry.caps;
  }

  /** Forget everything (reload: backends may have changed). */
  clear(): void {
    this.entries.clear();
  }

  private async probe(t: ProbeTarget): Promise<BackendCapabilities | undefined> {
    let link: SocketLink | undefined;
    try {
      const socket = await connectBackend(t.backend, { timeoutMs: t.connectTimeoutMs, proxyProtocol: t.proxyProtocol });
      link = new SocketLink(socket, { maxLine: t.maxLine, timeoutMs: t.replayTimeoutMs });
      return await t.module.probe(link, this.hostname);
    } catch (err) {
      this.log.warn({ backend: formatHostPort(t.backend), protocol: t.module.protocol, err: errorMessage(err) }, 'backend capability probe failed');
      return undefined;
    } finally {
      link?.destroy();
    }
  }
}

function keyOf(t: ProbeTarget): string {
  return `${t.module.protocol}|${formatHostPort(t.backend)}|${t.proxyProtocol}`;
}
