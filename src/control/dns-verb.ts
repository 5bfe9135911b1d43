/**
 * `mailgate dns [--check] [--resolver ADDR]`, a client of the running
 * daemon's control socket (the records depend on the certificates it serves
 * and the keys it holds):
 *
 *   dns          every record to publish, in zone-file form (records.ts)
 *   dns --check  each one asked of the system resolver (or ADDR: host or
 *                host:port, e.g. 127.0.0.1:5353 or [::1]:53) and reported as
 *                ok, missing, stale or error; exit 1 when any is not ok
 *
 * Exit codes as in cli.ts: 0 ok, 1 a record is wrong or the daemon cannot be
 * reached, 2 usage or configuration error.
 */
import { isIP } from 'node:net';
import { errorMessage } from '../core/errors.ts';
import { checkRecords, newResolver, type CheckResult } from '../discovery/check.ts';
import { recordData, zoneText } from '../discovery/records.ts';
import { parseVerbArgs, verbTarget, withClient } from './cli-verbs.ts';
import { ControlRequestError } from './client.ts';
import { DNS_COMMAND, type DnsAnswer } from './dns.ts';

const USAGE = `usage: mailgate dns [--check] [--resolver ADDR] [-c FILE | -s SOCKET] [--json]

  dns                  the DNS records to publish for the discovery: section, in zone-file form
  dns --check          ask a resolver for each of them; exit 1 when one is missing or stale
      --resolver ADDR  the resolver to ask (an address, optionally with :port); default: the system's
`;

export async function dnsVerb(argv: string[]): Promise<number> {
  const parsed = parseVerbArgs('dns', argv, { check: { type: 'boolean' }, resolver: { type: 'string' } }, USAGE, false);
  if (typeof parsed === 'number') return parsed;
  const resolver = parsed.string('resolver');
  const values = { check: parsed.values.check === true, json: parsed.values.json === true, resolver };
  if (resolver !== undefined && !validResolver(resolver)) {
    process.stderr.write(`mailgate dns: --resolver takes an IP address, optionally with a port (127.0.0.1:5353, [::1]:53), not "${resolver}"\n`);
    return 2;
  }
  let answer: DnsAnswer | undefined;
  const asked = await withClient(verbTarget(parsed), async (client) => {
    try {
      answer = (await client.request(DNS_COMMAND, {})) as DnsAnswer;
      return 0;
    } catch (err) {
      if (!(err instanceof ControlRequestError && err.code === 'UNKNOWN_COMMAND')) throw err;
      process.stderr.write('mailgate: this daemon does not know `dns` (an older version?)\n');
      return 1;
    }
  });
  if (asked !== 0 || answer === undefined) return asked;
  if (!values.check) {
    process.stdout.write(values.json ? `${JSON.stringify(answer, null, 2)}\n` : zoneText(answer.groups, answer.intro));
    return 0;
  }
  const records = answer.groups.flatMap((g) => g.records);
  let results: CheckResult[];
  try {
    results = await checkRecords(records, newResolver(values.resolver));
  } catch (err) {
    process.stderr.write(`mailgate dns: ${errorMessage(err)}\n`);
    return 1;
  }
  const bad = results.filter((r) => r.verdict !== 'ok');
  if (values.json) process.stdout.write(`${JSON.stringify(results, null, 2)}\n`);
  else {
    for (const r of results) {
      const line = `${r.verdict.toUpperCase().padEnd(8)} ${r.record.name} ${r.record.type} ${recordData(r.record)}`;
      process.stdout.write(`${line}${r.detail ? `\n         found: ${r.detail}` : ''}\n`);
    }
    process.stdout.write(
      bad.length === 0
        ? `all ${results.length} records are published as they should be\n`
        : `${bad.length} of ${results.length} records are missing or stale: publish them as \`mailgate dns\` prints them\n`,
    );
  }
  return bad.length === 0 ? 0 : 1;
}

function validResolver(v: string): boolean {
  if (isIP(v)) return true;
  const m = /^\[([0-9A-Fa-f:.]+)\]:(\d{1,5})$/.exec(v) ?? /^([0-9.]+):(\d{1,5})$/.exec(v);
  return m !== null && isIP(m[1]!) !== 0 && Number(m[2]) > 0 && Number(m[2]) < 65536;
}
