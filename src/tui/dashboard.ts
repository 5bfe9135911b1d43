/**
 * `mailgate top`: a blessed dashboard fed by the control socket, nothing
 * else. One full-screen box redrawn from renderFrame() (only visible rows),
 * at most ten times a second; keys are dispatched on an explicit mode. The
 * connection is retried forever while the dashboard runs (a daemon restart
 * shows as "reconnecting", then "restarted"); quitting restores the terminal.
 */
import blessed from 'blessed';
import { parseDuration } from '../core/duration.ts';
import { errorMessage } from '../core/errors.ts';
import { ControlClient, ControlRequestError } from '../control/client.ts';
import type { Ban } from '../control/protocol.ts';
import { renderFrame, BANS_HELP, BANS_HELP_ASCII, HELP, HELP_ASCII } from './render.ts';
import { humanDuration } from '../core/human.ts';
import { banTarget, DashboardModel, sanitize, type SessionView } from './view-model.ts';

export interface DashboardOptions {
  socketPath: string;
  configFile: string | null;
  /** Default duration offered when banning (seconds). */
  banSeconds?: number;
}

/** What a ban from the dashboard stops: the session's address, its user from that address, or its user everywhere. */
interface BanChoice {
  ip?: string;
  user?: string;
}

type Mode =
  | { kind: 'normal' }
  | { kind: 'filter'; text: string; before: string }
  | { kind: 'ban'; choices: BanChoice[]; choice: number; text: string; error: string | null }
  | { kind: 'confirm'; question: string; run: () => void; back?: Mode }
  | { kind: 'detail'; id: string; last: SessionView }
  | { kind: 'bans' };

interface Key {
  name?: string;
  ctrl?: boolean;
  full?: string;
}

const RENDER_EVERY_MS = 100;
const STATUS_EVERY_MS = 5_000;
const RESYNC_MIN_MS = 2_000;

export function runDashboard(opts: DashboardOptions): Promise<number> {
  return new Dashboard(opts).run();
}

class Dashboard {
  private readonly opts: DashboardOptions;
  private readonly model = new DashboardModel();
  private readonly unicode: boolean;
  private screen: blessed.Widgets.Screen | undefined;
  private body: blessed.Widgets.BoxElement | undefined;
  private mode: Mode = { kind: 'normal' };
  private client: ControlClient | undefined;
  private quitting = false;
  private renderTimer: NodeJS.Timeout | undefined;
  private lastRender = 0;
  private readonly timers: NodeJS.Timeout[] = [];
  private lastResync = 0;
  private wake: (() => void) | undefined;
  private done: ((code: number) => void) | undefined;

  constructor(opts: DashboardOptions) {
    this.opts = opts;
    this.unicode = /utf-?8/i.test(process.env.LC_ALL || process.env.LC_CTYPE || process.env.LANG || '');
  }

  run(): Promise<number> {
    const screen = blessed.screen({
      smartCSR: true,
      fullUnicode: this.unicode,
      title: 'mailgate top',
      warnings: false,
      autoPadding: false,
      resizeTimeout: 100,
    });
    this.screen = screen;
    this.body = blessed.box({ parent: screen, top: 0, left: 0, width: '100%', height: '100%', tags: true, wrap: false });
    screen.on('keypress', (ch: string | undefined, key: Key | undefined) => this.key(ch, key ?? {}));
    screen.on('resize', () => this.render());
    // blessed handles SIGTERM/SIGINT by restoring the terminal; leave cleanly on them too.
    process.once('SIGTERM', () => this.quit(0));
    this.timers.push(setInterval(() => this.requestRender(), 1000));
    this.timers.push(setInterval(() => this.refreshStatus(), STATUS_EVERY_MS));
    this.model.connecting(Date.now());
    this.render();
    void this.connectLoop();
    return new Promise((resolve) => {
      this.done = resolve;
    });
  }

  // ---- connection ---------------------------------------------------------------

  private async connectLoop(): Promise<void> {
    let delay = 500;
    while (!this.quitting) {
      this.model.connecting(Date.now());
      try {
        const c = await ControlClient.connect(this.opts.socketPath, { connectTimeoutMs: 3000, requestTimeoutMs: 30_000 });
        if (this.quitting) {
          c.close();
          return;
        }
        this.client = c;
        const closed = new Promise<Error | undefined>((resolve) => c.onClose(resolve));
        c.onSnapshot((s) => {
          this.model.applySnapshot(s, Date.now());
          this.requestRender();
        });
        c.onEvents((b) => {
          this.model.applyBatch(b, Date.now());
          if (b.dropped > 0) this.resync();
          if (b.events.some((e) => e.type === 'reload')) this.refreshStatus();
          this.requestRender();
        });
        await c.request('subscribe', {});
        delay = 500;
        const err = await closed;
        this.client = undefined;
        if (this.quitting) return;
        this.model.disconnected(err ? err.message : 'the daemon shut down', Date.now());
      } catch (err) {
        this.client = undefined;
        if (this.quitting) return;
        this.model.disconnected(errorMessage(err), Date.now());
      }
      this.requestRender();
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, delay);
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.wake = undefined;
      delay = Math.min(5000, delay * 2);
    }
  }

  private resync(): void {
    const now = Date.now();
    if (!this.client || now - this.lastResync < RESYNC_MIN_MS) return;
    this.lastResync = now;
    this.client.request('subscribe', {}).catch((err: unknown) => this.model.addLog(Date.now(), 'error', `resync failed: ${errorMessage(err)}`));
  }

  private refreshStatus(): void {
    this.client
      ?.request('status', {})
      .then((s) => {
        this.model.applyStatus(s);
        this.requestRender();
      })
      .catch(() => undefined /* the connection loop reports a lost daemon */);
  }

  // ---- drawing ---------------------------------------------------------------------

  private requestRender(): void {
    if (this.renderTimer || this.quitting) return;
    const wait = Math.max(0, RENDER_EVERY_MS - (Date.now() - this.lastRender));
    this.renderTimer = setTimeout(() => {
      this.renderTimer = undefined;
      this.render();
    }, wait);
  }

  private render(): void {
    const screen = this.screen;
    const body = this.body;
    if (!screen || !body || this.quitting) return;
    this.lastRender = Date.now();
    const now = Date.now();
    let detail: SessionView | null = null;
    if (this.mode.kind === 'detail') {
      const live = this.model.sessions.get(this.mode.id);
      if (live) this.mode.last = live;
      detail = this.mode.last;
    }
    const showBans = this.mode.kind === 'bans' || (this.mode.kind === 'confirm' && this.mode.back?.kind === 'bans');
    const lines = renderFrame(this.model, screen.width as number, screen.height as number, now, {
      bottom: this.bottomLine(),
      prompting: this.mode.kind !== 'normal' && this.mode.kind !== 'detail' && this.mode.kind !== 'bans',
      detail,
      bans: showBans,
      unicode: this.unicode,
      configFile: this.opts.configFile,
      socketPath: this.opts.socketPath,
    });
    body.setContent(lines.join('\n'));
    screen.render();
  }

  private bottomLine(): string {
    const m = this.mode;
    switch (m.kind) {
      case 'normal':
      case 'detail':
        return this.unicode ? HELP : HELP_ASCII;
      case 'bans':
        return this.unicode ? BANS_HELP : BANS_HELP_ASCII;
      case 'filter':
        return `filter: ${m.text}_   (Enter keep, Esc clear)`;
      case 'ban': {
        const target = m.choices[m.choice]!;
        const n = this.model.sessionsCovered(target);
        const next = m.choices.length > 1 ? `   Tab: ${choiceText(m.choices[(m.choice + 1) % m.choices.length]!)}` : '';
        return `ban ${sanitize(choiceText(target))} for: ${m.text}_   Enter ban${n ? ` and end ${n} session${n === 1 ? '' : 's'}` : ''}, Esc cancel${sanitize(next)}${m.error ? `   ${m.error}` : ''}`;
      }
      case 'confirm':
        return `${m.question} [y/N]`;
      default: {
        const never: never = m;
        throw new Error(`unknown mode ${JSON.stringify(never)}`);
      }
    }
  }

  // ---- keys ----------------------------------------------------------------------------

  private key(ch: string | undefined, key: Key): void {
    if (this.quitting) return;
    if (key.full === 'C-c') {
      this.quit(0);
      return;
    }
    // blessed reports Enter twice ("enter" and "return"): act on "enter" only.
    if (key.name === 'return' || key.name === 'linefeed') return;
    const m = this.mode;
    switch (m.kind) {
      case 'normal':
        this.normalKey(ch, key);
        break;
      case 'detail':
        if (key.name === 'escape' || key.name === 'enter' || ch === 'q') this.mode = { kind: 'normal' };
        else if (ch === 'K' || ch === 'x') this.askKill(m.last);
        else if (ch === 'b') this.askBan(m.last);
        break;
      case 'filter':
        if (key.name === 'enter') this.mode = { kind: 'normal' };
        else if (key.name === 'escape') {
          this.model.setFilter('');
          this.mode = { kind: 'normal' };
        } else {
          m.text = edit(m.text, ch, key);
          this.model.setFilter(m.text);
        }
        break;
      case 'bans':
        this.bansKey(ch, key);
        break;
      case 'ban':
        if (key.name === 'escape') this.mode = { kind: 'normal' };
        else if (key.name === 'enter') this.ban(m);
        else if (key.name === 'tab') m.choice = (m.choice + 1) % m.choices.length;
        else {
          m.text = edit(m.text, ch, key);
          m.error = null;
        }
        break;
      case 'confirm':
        this.mode = m.back ?? { kind: 'normal' };
        if (ch === 'y' || ch === 'Y') m.run();
        break;
      default: {
        const never: never = m;
        throw new Error(`unknown mode ${JSON.stringify(never)}`);
      }
    }
    this.render();
  }

  private normalKey(ch: string | undefined, key: Key): void {
    const page = Math.max(1, (this.screen?.height as number) - 16);
    switch (key.name) {
      case 'up':
        return this.model.move(-1);
      case 'down':
        return this.model.move(1);
      case 'pageup':
        return this.model.move(-page);
      case 'pagedown':
        return this.model.move(page);
      case 'home':
        return this.model.moveTo(0);
      case 'end':
        return this.model.moveTo(this.model.rows().length - 1);
      case 'enter': {
        const s = this.model.selected();
        if (s) this.mode = { kind: 'detail', id: s.id, last: s };
        return;
      }
      case 'escape':
        return this.model.setFilter('');
      default:
        break;
    }
    switch (ch) {
      case 'k':
        return this.model.move(-1);
      case 'j':
        return this.model.move(1);
      case 'g':
        return this.model.moveTo(0);
      case 'G':
        return this.model.moveTo(this.model.rows().length - 1);
      case 's':
        return this.model.cycleSort();
      case 'S':
        return this.model.reverseSort();
      case '/':
        this.mode = { kind: 'filter', text: this.model.filter, before: this.model.filter };
        return;
      case 'K':
      case 'x': {
        const s = this.model.selected();
        if (s) this.askKill(s);
        return;
      }
      case 'b': {
        const s = this.model.selected();
        if (s) this.askBan(s);
        return;
      }
      case 'B':
        this.mode = { kind: 'bans' };
        return;
      case 'r':
        return this.reload();
      case 'q':
        return this.quit(0);
      default:
        return;
    }
  }

  /** The bans view: move, lift the selected ban (after a `y`), back to the sessions. */
  private bansKey(ch: string | undefined, key: Key): void {
    if (key.name === 'escape' || ch === 'B') {
      this.mode = { kind: 'normal' };
      return;
    }
    if (ch === 'q') return this.quit(0);
    if (key.name === 'up' || ch === 'k') return this.model.moveBan(-1);
    if (key.name === 'down' || ch === 'j') return this.model.moveBan(1);
    if (key.name === 'home' || ch === 'g') return this.model.moveBan(-this.model.bans.length);
    if (key.name === 'end' || ch === 'G') return this.model.moveBan(this.model.bans.length);
    if (ch === 'u' || ch === 'd' || key.name === 'delete') {
      const b = this.model.selectedBan();
      if (!b) return;
      const left = b.expiresAt === null ? '' : `, ${humanDuration(Math.max(0, b.expiresAt - Date.now()))} left`;
      this.mode = { kind: 'confirm', question: `Lift the ban of ${sanitize(banTarget(b))} (${b.source}${left})?`, run: () => this.unban(b), back: { kind: 'bans' } };
    }
  }

  // ---- actions -----------------------------------------------------------------------

  private askKill(s: SessionView): void {
    const who = s.user ? `${sanitize(s.user)} from ${s.clientIp}` : s.clientIp;
    this.mode = { kind: 'confirm', question: `Kill session ${s.id} (${who} on ${s.listener}, ${humanDuration(Date.now() - s.startedAt)})?`, run: () => this.kill(s.id) };
  }

  /** `b`: the session's address, then (Tab) its user from that address, its user everywhere. */
  private askBan(s: SessionView): void {
    const choices: BanChoice[] = [{ ip: s.clientIp }];
    if (s.user) choices.push({ ip: s.clientIp, user: s.user }, { user: s.user });
    this.mode = { kind: 'ban', choices, choice: 0, text: formatSeconds(this.opts.banSeconds ?? 3600), error: null };
  }

  private kill(id: string): void {
    const c = this.client;
    if (!c) return this.model.addLog(Date.now(), 'error', `kill ${id}: not connected`);
    c.request('kill', { id }).then(
      () => {
        this.model.addLog(Date.now(), 'info', `killed session ${id}`);
        this.requestRender();
      },
      (err: unknown) => {
        this.model.addLog(Date.now(), 'error', `kill ${id}: ${errorMessage(err)}`);
        this.requestRender();
      },
    );
  }

  private ban(m: Extract<Mode, { kind: 'ban' }>): void {
    const ms = parseDuration(m.text.trim());
    if (ms === undefined || ms < 1000) {
      m.error = 'not a duration (e.g. 30m, 1h, 1d)';
      return;
    }
    this.mode = { kind: 'normal' };
    const target = m.choices[m.choice]!;
    const what = sanitize(choiceText(target));
    const c = this.client;
    if (!c) return this.model.addLog(Date.now(), 'error', `ban ${what}: not connected`);
    c.request('ban', { ...target, seconds: Math.round(ms / 1000), reason: 'Banned by the administrator' }).then(
      (r) => {
        // The daemon's "banned" event goes into the log; say here only what it does not.
        if (r.killed === 0) this.model.addLog(Date.now(), 'info', `ban of ${what} accepted`);
        else this.model.addLog(Date.now(), 'info', `ban of ${what}: ${r.killed} session${r.killed === 1 ? '' : 's'} ended`);
        this.requestRender();
      },
      (err: unknown) => {
        const why = err instanceof ControlRequestError && err.code === 'UNSUPPORTED' ? 'this gateway has no ban list' : errorMessage(err);
        this.model.addLog(Date.now(), 'error', `ban ${what}: ${why}`);
        this.requestRender();
      },
    );
  }

  private unban(b: Ban): void {
    const what = sanitize(banTarget(b));
    const c = this.client;
    if (!c) return this.model.addLog(Date.now(), 'error', `unban ${what}: not connected`);
    // By id where the daemon gives one: exactly this ban.
    const args: { id?: string; ip?: string } = b.id !== undefined ? { id: b.id } : { ip: b.ip ?? '' };
    c.request<'unban'>('unban', args).then(
      (r) => {
        if (!r.removed) this.model.addLog(Date.now(), 'warn', `unban ${what}: it had already ended`);
        this.requestRender();
      },
      (err: unknown) => {
        this.model.addLog(Date.now(), 'error', `unban ${what}: ${errorMessage(err)}`);
        this.requestRender();
      },
    );
  }

  private reload(): void {
    const c = this.client;
    if (!c) return this.model.addLog(Date.now(), 'error', 'reload: not connected');
    this.model.addLog(Date.now(), 'info', 'reload requested');
    // The daemon's "reload" event reports the outcome; only a failure to ask is logged here.
    c.request('reload', {}).catch((err: unknown) => {
      if (!(err instanceof ControlRequestError && err.code === 'FAILED')) this.model.addLog(Date.now(), 'error', `reload: ${errorMessage(err)}`);
      this.requestRender();
    });
  }

  private quit(code: number): void {
    if (this.quitting) return;
    this.quitting = true;
    for (const t of this.timers) clearInterval(t);
    clearTimeout(this.renderTimer);
    this.wake?.();
    this.client?.close();
    this.screen?.destroy();
    this.done?.(code);
  }
}

/** Line editing for the prompts: printable characters, backspace, Ctrl-U. */
function edit(text: string, ch: string | undefined, key: Key): string {
  if (key.name === 'backspace') return text.slice(0, -1);
  if (key.full === 'C-u') return '';
  if (ch && ch.length === 1 && ch >= ' ' && ch !== '\x7f' && text.length < 200) return text + ch;
  return text;
}

function choiceText(c: BanChoice): string {
  return banTarget({ ip: c.ip ?? null, user: c.user ?? null });
}

function formatSeconds(s: number): string {
  if (s % 86_400 === 0) return `${s / 86_400}d`;
  if (s % 3_600 === 0) return `${s / 3_600}h`;
  if (s % 60 === 0) return `${s / 60}m`;
  return `${s}s`;
}
