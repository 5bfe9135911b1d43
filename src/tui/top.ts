/** `mailgate top`: the dashboard in this terminal, on the running daemon's control socket. */
import { target, type VerbOptions } from '../control/cli-verbs.ts';

export async function topVerb(opts: Omit<VerbOptions, 'json'>): Promise<number> {
  const t = target(opts);
  if (typeof t === 'number') return t;
  if (!process.stdout.isTTY) {
    process.stderr.write('mailgate top: needs a terminal (use `mailgate status` for a one-shot view)\n');
    return 2;
  }
  // Loaded here so that the other verbs do not pull in blessed.
  const { runDashboard } = await import('./dashboard.ts');
  const code = await runDashboard({ socketPath: t.socket, configFile: t.configFile });
  // blessed keeps stdin referenced; the terminal is restored by now, so leave.
  setTimeout(() => process.exit(code), 50).unref();
  return code;
}
