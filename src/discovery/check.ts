/**
 * `mailgate dns --check`: each record the gateway needs, asked of a
 * resolver (the system's, or `--resolver ADDR`), and judged:
 *
 *   ok       published as printed
 *   missing  the name has no such record
 *   stale    there is one, with other data (an old MTA-STS id, an MX to
 *            another host, a TLSA for a key the gateway no longer holds, an
 *            SRV to another port, a second v=STSv1 record, …)
 *   error    the resolver failed (timeout, SERVFAIL)
 *
 * A CNAME may instead be A/AAAA records equal to the mail host's.
 */
import { Resolver } from 'node:dns/promises';
import { errorCode, errorMessage } from '../core/errors.ts';
import { recordData, type DnsRecord } from './records.ts';

export type Verdict = 'ok' | 'missing' | 'stale' | 'error';

export interface CheckResult {
  record: DnsRecord;
  verdict: Verdict;
  /** What was found, when it is not what was wanted. */
  detail?: string;
}

/** Answers that mean "no such record" rather than a failure. */
const ABSENT = new Set(['ENODATA', 'ENOTFOUND', 'NXDOMAIN']);

export function newResolver(server: string | undefined, timeoutMs = 3000): Resolver {
  const r = new Resolver({ timeout: timeoutMs, tries: 2 });
  if (server) r.setServers([server]);
  return r;
}

export async function checkRecords(records: readonly DnsRecord[], resolver: Resolver): Promise<CheckResult[]> {
  const out: CheckResult[] = [];
  // TLSA records are judged per name, together: a record for a key the gateway does not hold is stale.
  const tlsaWanted = new Map<string, Set<string>>();
  for (const r of records) if (r.type === 'TLSA') (tlsaWanted.get(r.name) ?? tlsaWanted.set(r.name, new Set()).get(r.name)!).add(recordData(r));
  const tlsaFound = new Map<string, Promise<string[]>>();
  for (const r of records) {
    try {
      out.push(await checkOne(r, resolver, tlsaWanted, tlsaFound));
    } catch (err) {
      const code = errorCode(err);
      out.push(code !== undefined && ABSENT.has(code) ? { record: r, verdict: 'missing' } : { record: r, verdict: 'error', detail: `${code ?? ''} ${errorMessage(err)}`.trim() });
    }
  }
  // A TLSA record nobody asked for (an old key's) is listed once, as stale.
  for (const [name, wanted] of tlsaWanted) {
    const found = await tlsaFound.get(name)?.catch(() => []);
    for (const data of found ?? []) {
      if (!wanted.has(data)) {
        const [usage, selector, matching, hex] = data.split(' ');
        out.push({ record: { type: 'TLSA', name, usage: Number(usage) as 3, selector: Number(selector) as 1, matching: Number(matching) as 1, data: hex ?? '' }, verdict: 'stale', detail: 'a key the gateway does not hold: remove this record' });
      }
    }
  }
  return out;
}

async function checkOne(r: DnsRecord, resolver: Resolver, tlsaWanted: Map<string, Set<string>>, tlsaFound: Map<string, Promise<string[]>>): Promise<CheckResult> {
  switch (r.type) {
    case 'MX': {
      const mx = await resolver.resolveMx(r.name);
      if (mx.some((m) => same(m.exchange, r.exchange))) return { record: r, verdict: 'ok' };
      return { record: r, verdict: 'stale', detail: `MX ${mx.map((m) => `${m.priority} ${m.exchange}`).join(', ')}` };
    }
    case 'SRV': {
      const srv = await resolver.resolveSrv(r.name);
      const hit = srv.some((x) => (r.target === '.' ? x.name === '' || x.name === '.' : same(x.name, r.target) && x.port === r.port));
      if (hit) return { record: r, verdict: 'ok' };
      return { record: r, verdict: 'stale', detail: `SRV ${srv.map((x) => `${x.priority} ${x.weight} ${x.port} ${x.name || '.'}`).join(', ')}` };
    }
    case 'CNAME': {
      let cname: string[] = [];
      try {
        cname = await resolver.resolveCname(r.name);
      } catch (err) {
        if (!ABSENT.has(errorCode(err) ?? '')) throw err;
      }
      if (cname.some((c) => same(c, r.target))) return { record: r, verdict: 'ok' };
      if (cname.length > 0) return { record: r, verdict: 'stale', detail: `CNAME ${cname.join(', ')}` };
      // Addresses of its own are as good, if they are the mail host's.
      const [mine, theirs] = await Promise.all([addresses(resolver, r.name), addresses(resolver, r.target)]);
      if (mine.length === 0) return { record: r, verdict: 'missing' };
      if (theirs.length > 0 && mine.every((a) => theirs.includes(a))) return { record: r, verdict: 'ok', detail: `A/AAAA ${mine.join(', ')}` };
      return { record: r, verdict: 'stale', detail: `A/AAAA ${mine.join(', ')}, not those of ${r.target} (${theirs.join(', ') || 'none'})` };
    }
    case 'TXT': {
      const texts = (await resolver.resolveTxt(r.name)).map((chunks) => chunks.join(''));
      const tagged = texts.filter((t) => t.replace(/\s+/g, '').startsWith(`${r.tag.replace(/\s+/g, '')};`) || t.trim() === r.tag);
      if (tagged.length === 0) return { record: r, verdict: 'missing', ...(texts.length ? { detail: `other TXT: ${texts.map((t) => JSON.stringify(t)).join(', ')}` } : {}) };
      if (tagged.length > 1) return { record: r, verdict: 'stale', detail: `${tagged.length} ${r.tag} records (there must be one): ${tagged.map((t) => JSON.stringify(t)).join(', ')}` };
      if (sameFields(tagged[0]!, r.text)) return { record: r, verdict: 'ok' };
      return { record: r, verdict: 'stale', detail: `TXT ${JSON.stringify(tagged[0])}` };
    }
    case 'TLSA': {
      let found = tlsaFound.get(r.name);
      if (!found) {
        found = resolver.resolveTlsa(r.name).then((list) => list.map((t) => `${t.certUsage} ${t.selector} ${t.match} ${Buffer.from(t.data).toString('hex')}`));
        tlsaFound.set(r.name, found);
      }
      const list = await found;
      if (list.includes(recordData(r))) return { record: r, verdict: 'ok' };
      return { record: r, verdict: 'missing', ...(list.length ? { detail: `other TLSA: ${list.filter((d) => !tlsaWanted.get(r.name)?.has(d)).join(', ') || 'none'}` } : {}) };
    }
    default: {
      const never: never = r;
      throw new Error(`unknown record ${JSON.stringify(never)}`);
    }
  }
}

async function addresses(resolver: Resolver, name: string): Promise<string[]> {
  const quiet = (p: Promise<string[]>) => p.catch((err: unknown) => (ABSENT.has(errorCode(err) ?? '') ? [] : Promise.reject(err)));
  const [a, aaaa] = await Promise.all([quiet(resolver.resolve4(name)), quiet(resolver.resolve6(name))]);
  return [...a, ...aaaa];
}

function same(a: string, b: string): boolean {
  return a.toLowerCase().replace(/\.$/, '') === b.toLowerCase().replace(/\.$/, '');
}

/** TXT records of the v=…; k=v; form compared field by field (spaces around ";" do not matter). */
function sameFields(found: string, wanted: string): boolean {
  const fields = (t: string) =>
    t
      .split(';')
      .map((f) => f.trim())
      .filter(Boolean)
      .sort()
      .join(';');
  return fields(found) === fields(wanted);
}
