/** Shared fakes for adapter unit tests: a listener, session facts, a scripted backend, the pre-login loop around an adapter. */
import type { Listener } from '../../src/config/load.ts';
import { DEFAULT_LIMITS, DEFAULT_TIMEOUTS } from '../../src/config/schema.ts';
import type { BackendCapabilities, BackendLink, CloseReason, MailAdapter, ProtocolModule, SessionFacts, Step } from '../../src/protocols/types.ts';
import { PreauthLoop } from '../../src/session/preauth-loop.ts';

export function listener<P extends Listener['protocol']>(protocol: P, extra: Record<string, unknown> = {}): Extract<Listener, { protocol: P }> {
  const base = {
    name: `test-${protocol}`,
    protocol,
    listen: [{ host: '127.0.0.1', port: 0 }],
    backend: { host: '127.0.0.1', port: 1 },
    proxy_protocol: false,
    tls: 'implicit',
    timeouts: { ...DEFAULT_TIMEOUTS },
    limits: { ...DEFAULT_LIMITS },
    imap_id: true,
    require_tls: true,
    auth: 'required',
    xclient: true,
    greet_delay: 0,
    redirect_https: false,
    hsts: 0,
    trust_forwarded: [],
  };
  return { ...base, ...extra } as unknown as Extract<Listener, { protocol: P }>;
}

/** An HTTP listener as the schema's defaults make it (plain, backend 127.0.0.1:8080), with `overrides`. */
export function httpListener(overrides: Partial<Extract<Listener, { protocol: 'http' }>> = {}): Extract<Listener, { protocol: 'http' }> {
  return {
    name: 'web',
    protocol: 'http',
    listen: [{ host: '127.0.0.1', port: 0 }],
    backend: { host: '127.0.0.1', port: 8080 },
    proxy_protocol: false,
    tls: 'none',
    redirect_https: false,
    hsts: 0,
    trust_forwarded: [],
    http2: true,
    http2_max_streams: 100,
    response_timeout: 60_000,
    timeouts: { ...DEFAULT_TIMEOUTS },
    limits: { ...DEFAULT_LIMITS },
    ...overrides,
  };
}

export function facts(l: Listener, tls = true): SessionFacts & { setTls(v: boolean): void } {
  let on = tls;
  return {
    id: 's-1',
    listener: l,
    hostname: 'mail.test',
    clientIp: '192.0.2.7',
    clientPort: 40000,
    localIp: '127.0.0.1',
    localPort: 993,
    tls: () => on,
    setTls(v: boolean) {
      on = v;
    },
  };
}

/**
 * A backend that answers each line the adapter writes with the next scripted
 * reply. `script` maps a predicate on the written line to reply lines.
 */
export class ScriptedBackend implements BackendLink {
  readonly written: string[] = [];
  private readonly queue: string[] = [];
  private readonly rules: [RegExp, string[]][];
  private waiting: ((line: string) => void) | undefined;

  constructor(greeting: string[], rules: [RegExp, string[]][]) {
    this.queue.push(...greeting);
    this.rules = rules;
  }

  write(data: string): void {
    for (const line of data.split('\r\n').filter((l) => l !== '')) {
      this.written.push(line);
      const rule = this.rules.find(([re]) => re.test(line));
      if (rule) this.queue.push(...rule[1]);
    }
    this.flush();
  }

  readLine(): Promise<string> {
    return new Promise((resolve, reject) => {
      this.waiting = resolve;
      this.flush();
      if (this.waiting !== undefined) setTimeout(() => reject(new Error(`backend script ran dry; written: ${JSON.stringify(this.written)}`)), 200);
    });
  }

  private flush(): void {
    if (this.waiting && this.queue.length > 0) {
      const w = this.waiting;
      this.waiting = undefined;
      w(this.queue.shift()!);
    }
  }
}

export const b = (s: string): Buffer => Buffer.from(s, 'latin1');

/**
 * The product's pre-login loop (src/session/preauth-loop.ts) around a
 * module's adapter, for the bounds it enforces: send() pushes one line and
 * returns what the client got, as a reply, or as the close that ended the
 * session (its last words and reason). Logins and STARTTLS are not answered.
 */
export function looped(module: ProtocolModule, f: SessionFacts, caps?: BackendCapabilities): { adapter: MailAdapter; send(line: string): Step } {
  let out = '';
  let closed: { reason: CloseReason; words: string } | undefined;
  const loop = new PreauthLoop(module, f, {
    write: (data) => void (out += data),
    startTls: () => undefined,
    login: () => undefined,
    close: (reason, words) => void (closed = { reason, words }),
  });
  loop.greet(caps);
  return {
    adapter: loop.adapter,
    send(line) {
      out = '';
      loop.push(Buffer.from(`${line}\r\n`, 'latin1'));
      return closed ? { kind: 'close', data: closed.words, reason: closed.reason } : { kind: 'reply', data: out };
    },
  };
}
