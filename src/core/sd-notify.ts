/**
 * Service readiness and state for systemd (sd_notify(3)), without a native
 * module.
 *
 * The protocol is one datagram of newline-separated KEY=VALUE fields sent to
 * the AF_UNIX SOCK_DGRAM socket named by $NOTIFY_SOCKET. Node.js cannot open
 * a unix datagram socket (node:dgram is UDP only, node:net is stream only),
 * and the npm packages that can (sd-notify, unix-dgram) are native addons
 * that must be compiled for each Node release. The options considered:
 *
 *  - A native addon: a compiler on the server or a prebuilt binary per Node
 *    version; rejected for an appliance that ships its own Node runtime.
 *  - socat / python3 as the sender: not on every server, and no better than
 *    the tool systemd itself ships.
 *  - `systemd-notify` (chosen): part of the systemd package, so present
 *    wherever $NOTIFY_SOCKET is set. PID 1 attributes a notification to a
 *    unit by the sender's PID (SCM_CREDENTIALS). The helper first tries to
 *    send with our PID (works only with CAP_SYS_ADMIN, i.e. when run as
 *    root) and otherwise sends with its own, so the unit needs
 *    NotifyAccess=all (NotifyAccess=main or exec would drop the message).
 *    The known race, where the helper exits before PID 1 has looked up its
 *    cgroup and the message is dropped, is closed by the helper itself since
 *    systemd 246: without --no-block it sends BARRIER=1 and waits until PID 1
 *    has processed everything before it (sd_notify_barrier(3)). Debian 12
 *    ships systemd 252. We therefore never pass --no-block, and we wait for
 *    each helper to exit before starting the next, which also keeps the
 *    messages in order (RELOADING=1 before its READY=1).
 *
 * Without $NOTIFY_SOCKET (run by hand, in tests, under another supervisor)
 * every call is a no-op. A failed notification is reported through `onError`
 * and never stops the daemon: systemd's start timeout is the backstop.
 */
import { execFile } from 'node:child_process';
import { errorMessage } from './errors.ts';

export interface SdNotifyOptions {
  /** The notify socket; defaults to $NOTIFY_SOCKET. Empty or undefined disables notifications. */
  socket?: string | undefined;
  /** The helper; defaults to `systemd-notify` on $PATH. */
  command?: string;
  /** Deadline for one helper run (its barrier waits up to 5 s for PID 1). */
  timeoutMs?: number;
  /** Called once per failed notification, with the fields that were not delivered. */
  onError?: (err: Error, fields: string[]) => void;
}

export class SdNotify {
  readonly enabled: boolean;
  private readonly socket: string;
  private readonly command: string;
  private readonly timeoutMs: number;
  private readonly onError: (err: Error, fields: string[]) => void;
  private queue: Promise<void> = Promise.resolve();

  constructor(options: SdNotifyOptions = {}) {
    this.socket = ('socket' in options ? options.socket : process.env.NOTIFY_SOCKET) ?? '';
    this.enabled = this.socket !== '';
    this.command = options.command ?? 'systemd-notify';
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.onError = options.onError ?? (() => {});
  }

  /** Start-up (or a reload) is complete: every listener is bound. */
  ready(status?: string): Promise<void> {
    return this.send({ READY: '1', ...statusField(status) });
  }

  /** A reload begins; systemd shows the unit as "reloading" until the next READY=1. */
  reloading(status?: string): Promise<void> {
    return this.send({ RELOADING: '1', MONOTONIC_USEC: monotonicUsec(), ...statusField(status) });
  }

  /** The daemon is shutting down (draining). */
  stopping(status?: string): Promise<void> {
    return this.send({ STOPPING: '1', ...statusField(status) });
  }

  /** Free-form status line shown by `systemctl status`. */
  status(text: string): Promise<void> {
    return this.send(statusField(text));
  }

  /** Resolves when every notification queued so far has been handed to PID 1 (or has failed). */
  flush(): Promise<void> {
    return this.queue;
  }

  /**
   * Queues one notification. Resolves when it was delivered or has failed
   * (failures go to `onError`); never rejects.
   */
  send(fields: Record<string, string>): Promise<void> {
    if (!this.enabled) return Promise.resolve();
    const args = Object.entries(fields).map(([k, v]) => formatField(k, v));
    if (args.length === 0) return this.queue;
    this.queue = this.queue.then(() => this.spawn(args));
    return this.queue;
  }

  private spawn(args: string[]): Promise<void> {
    return new Promise<void>((resolve) => {
      // execFile settles exactly once (exit, spawn error or timeout kill) and
      // passes the socket through the environment, where systemd-notify reads it.
      execFile(
        this.command,
        args,
        { env: { ...process.env, NOTIFY_SOCKET: this.socket }, timeout: this.timeoutMs, killSignal: 'SIGKILL', windowsHide: true },
        (err, _stdout, stderr) => {
          if (err) {
            const detail = stderr.trim();
            this.onError(new Error(`${this.command} ${args.join(' ')}: ${errorMessage(err)}${detail ? `: ${detail}` : ''}`, { cause: err }), args);
          }
          resolve();
        },
      );
    });
  }
}

/** KEY=VALUE with the value on one line: a newline would start a new field. */
export function formatField(key: string, value: string): string {
  if (!/^[A-Z][A-Z0-9_]*$/.test(key)) throw new TypeError(`sd_notify field name "${key}" is not an upper-case identifier`);
  return `${key}=${value.replace(/[\r\n]+/g, ' ')}`;
}

function statusField(status: string | undefined): Record<string, string> {
  return status === undefined ? {} : { STATUS: status };
}

/**
 * CLOCK_MONOTONIC in microseconds, as RELOADING=1 wants it (systemd 253+
 * requires it for Type=notify-reload). process.hrtime reads CLOCK_MONOTONIC
 * on Linux (libuv's uv_hrtime).
 */
export function monotonicUsec(): string {
  return String(process.hrtime.bigint() / 1000n);
}
