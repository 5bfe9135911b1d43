/**
 * `mailgate bans`, `mailgate ban` and `mailgate unban`: the running daemon's
 * ban list through its control socket, every kind (an address or range, a
 * user, a user from one address).
 *
 *   bans                            the list (--json: as the daemon gives it)
 *   ban IP | --user NAME [--ip IP]  ban for --for (default 1h) with --reason; ends the sessions it covers
 *   unban IP | --user NAME [--ip IP] | --id ID
 *
 * Exit codes as in cli.ts: 0 ok, 1 the daemon refused or cannot be reached
 * (or nothing was lifted), 2 a usage or configuration error.
 */
import { formatDuration, parseDuration } from '../core/duration.ts';
import { humanDuration } from '../core/human.ts';
import { parseVerbArgs, verbTarget, withClient } from './cli-verbs.ts';
import type { Ban } from './protocol.ts';

const USAGE = `usage: mailgate bans  [-c FILE | -s SOCKET] [--json]
       mailgate ban   (IP | --user NAME [--ip IP]) [--for 1h] [--reason TEXT] [-c FILE | -s SOCKET]
       mailgate unban (IP | --user NAME [--ip IP] | --id ID) [-c FILE | -s SOCKET]

  IP is an address or a CIDR range; --user with --ip is the user from that address.
  unban IP lifts the address (or range) and the bans of users from it; unban --user NAME
  every ban of that user; --id one ban as \`mailgate bans\` lists it.
`;

type Verb = 'bans' | 'ban' | 'unban';

export async function bansVerb(verb: Verb, argv: string[]): Promise<number> {
  const own = { user: { type: 'string' }, ip: { type: 'string' }, id: { type: 'string' }, for: { type: 'string' }, reason: { type: 'string' } } as const;
  const parsed = parseVerbArgs(verb, argv, own, USAGE, verb !== 'bans');
  if (typeof parsed === 'number') return parsed;
  const { positionals, string: str } = parsed;
  const ip = positionals[0] ?? str('ip');
  const user = str('user');
  if (positionals.length > 1 || (positionals.length === 1 && str('ip') !== undefined)) return usage(verb, 'give one address');
  let args: Record<string, unknown> = {};
  if (verb === 'ban') {
    if (ip === undefined && user === undefined) return usage(verb, 'name an address or --user');
    const ms = parseDuration(str('for') ?? '1h');
    if (ms === undefined || ms < 1000) return usage(verb, `--for ${str('for') ?? ''}: not a duration (e.g. 30m, 1h, 1d)`);
    args = { ...(ip === undefined ? {} : { ip }), ...(user === undefined ? {} : { user }), seconds: Math.round(ms / 1000), ...(str('reason') === undefined ? {} : { reason: str('reason') }) };
  } else if (verb === 'unban') {
    const id = str('id');
    if ((id === undefined) === (ip === undefined && user === undefined)) return usage(verb, 'name an address, --user, or --id');
    args = id !== undefined ? { id } : { ...(ip === undefined ? {} : { ip }), ...(user === undefined ? {} : { user }) };
  }
  const target = verbTarget(parsed);
  return withClient(target, async (client) => {
    const result = await client.request(verb, args);
    if (target.json) {
      process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
      return verb === 'unban' && !(result as { removed: boolean }).removed ? 1 : 0;
    }
    switch (verb) {
      case 'bans':
        process.stdout.write(formatBans(result as Ban[]));
        return 0;
      case 'ban': {
        const r = result as { bans: Ban[]; killed: number };
        const span = formatDuration((args.seconds as number) * 1000);
        for (const b of r.bans) process.stdout.write(`banned ${describe(b)} for ${span} (${b.id ?? b.ip ?? ''})\n`);
        process.stdout.write(`${r.killed} session${r.killed === 1 ? '' : 's'} ended\n`);
        return 0;
      }
      case 'unban': {
        const removed = (result as { removed: boolean }).removed;
        process.stdout.write(removed ? 'lifted\n' : 'no such ban\n');
        return removed ? 0 : 1;
      }
      default: {
        const never: never = verb;
        throw new Error(`unknown verb ${String(never)}`);
      }
    }
  });
}

function usage(verb: Verb, problem: string): number {
  process.stderr.write(`mailgate ${verb}: ${problem}\n${USAGE}`);
  return 2;
}

function describe(b: Ban): string {
  if (b.user) return b.ip ? `user ${b.user} from ${b.ip}` : `user ${b.user}`;
  return b.ip ?? '?';
}

/** One row per ban, soonest to end first; reasons and names cleaned of control characters. */
export function formatBans(bans: Ban[], now = Date.now()): string {
  if (bans.length === 0) return 'no bans\n';
  const clean = (s: string) => s.replace(/[\u0000-\u001f\u007f-\u009f]/g, '?');
  const rows = [['ID', 'KIND', 'ADDRESS', 'USER', 'LEFT', 'SOURCE', 'REASON']];
  for (const b of [...bans].sort((x, y) => (x.expiresAt ?? Infinity) - (y.expiresAt ?? Infinity))) {
    rows.push([
      clean(b.id ?? '-'),
      b.kind ?? (b.ip?.includes('/') ? 'range' : 'address'),
      b.ip ?? '-',
      clean(b.user ?? '-'),
      b.expiresAt === null ? 'never' : humanDuration(Math.max(0, b.expiresAt - now)),
      b.source,
      clean(b.reason),
    ]);
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  return rows.map((r) => r.map((cell, i) => (i === r.length - 1 ? cell : cell.padEnd(widths[i]!))).join('  ').trimEnd()).join('\n') + '\n';
}
