/** An in-process stand-in for the Gateway: a real SessionRegistry with scripted sessions, for control/metrics unit tests. */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseConfig, type Config } from '../../../src/config/load.ts';
import { createLogger } from '../../../src/core/log.ts';
import type { Ban, ReloadOutcome } from '../../../src/control/protocol.ts';
import type { BanAdmin, ControlTarget } from '../../../src/control/target.ts';
import type { CloseReason } from '../../../src/protocols/types.ts';
import { newSessionRecord, type SessionRecord } from '../../../src/session/record.ts';
import { SessionRegistry, type SessionControl } from '../../../src/session/registry.ts';
import { CertStore } from '../../../src/tls/cert-store.ts';

export const silentLog = createLogger('silent');

export function testConfig(extra = ''): Config {
  return parseConfig(
    `
hostname: mail.test
listeners:
  - name: imaps
    protocol: imap
    listen: 127.0.0.1:993
    tls: implicit
    backend: 127.0.0.1:143
  - name: pop3s
    protocol: pop3
    listen: 127.0.0.1:995
    tls: implicit
    backend: 127.0.0.1:110
${extra}`,
    '/etc/mailgate/mailgate.yaml',
  );
}

export class FakeSession implements SessionControl {
  readonly record: SessionRecord;
  killedWith: CloseReason | null = null;
  private readonly registry: SessionRegistry;

  constructor(registry: SessionRegistry, fields: Partial<SessionRecord> = {}) {
    this.registry = registry;
    this.record = {
      ...newSessionRecord({ id: registry.nextId(), listener: 'imaps', protocol: 'imap', clientIp: '192.0.2.10', clientPort: 40000, state: 'preauth' }),
      tlsVersion: 'TLSv1.3',
      tlsCipher: 'TLS_AES_256_GCM_SHA384',
      ...fields,
    };
  }

  open(): this {
    this.registry.add(this);
    return this;
  }

  login(user: string, backend = '127.0.0.1:143'): this {
    this.registry.backendConnected(this.record, backend, 1.5);
    this.record.user = user;
    this.record.backend = backend;
    this.record.state = 'relaying';
    this.registry.authenticated(this.record);
    return this;
  }

  end(reason: CloseReason): void {
    this.record.state = 'closed';
    this.record.closeReason = reason;
    this.registry.remove(this.record.id);
  }

  kill(reason: CloseReason): void {
    this.killedWith = reason;
    this.end(reason);
  }

  drain(): void {}
}

export class FakeBans implements BanAdmin {
  readonly bans = new Map<string, Ban>();

  list(): Ban[] {
    return [...this.bans.values()];
  }

  ban(ip: string, seconds: number, reason: string): void {
    const now = Date.now();
    this.bans.set(ip, { ip, reason, createdAt: now, expiresAt: now + seconds * 1000, source: 'manual' });
  }

  unban(ip: string): boolean {
    return this.bans.delete(ip);
  }
}

export interface FakeTarget extends ControlTarget {
  registry: SessionRegistry;
  nextReload: ReloadOutcome;
  bans: BanAdmin | undefined;
  reloads: number;
}

export function fakeTarget(opts: { bans?: BanAdmin; certs?: CertStore; config?: Config } = {}): FakeTarget {
  const listeners = new Set<(r: ReloadOutcome) => void>();
  const config = opts.config ?? testConfig();
  const target: FakeTarget = {
    registry: new SessionRegistry(),
    certificates: opts.certs ?? new CertStore('TLSv1.2'),
    currentConfig: config,
    startedAt: Date.now() - 5000,
    bans: opts.bans,
    reloads: 0,
    nextReload: { ok: true, started: [], stopped: [], updated: ['imaps', 'pop3s'] },
    addresses: () => ({ imaps: ['127.0.0.1:993'], pop3s: ['127.0.0.1:995'] }),
    async reload() {
      target.reloads++;
      const r = target.nextReload;
      for (const l of listeners) l(r);
      return r;
    },
    onReload(l) {
      listeners.add(l);
      return () => listeners.delete(l);
    },
  };
  return target;
}

export function tempDir(): { dir: string; remove(): void } {
  const dir = mkdtempSync(join(tmpdir(), 'mailgate-unit-control-'));
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

