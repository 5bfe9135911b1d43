/**
 * Value types every part of the one schema uses: durations, host:port
 * addresses, positive integers. Defined once, so a duration or an address
 * is read and refused with the same words wherever it appears.
 */
import { z } from 'zod';
import { parseDuration } from '../core/duration.ts';
import { parseHostPort, type HostPort } from '../net/address.ts';
import { parseCidr, type Cidr } from '../net/cidr.ts';

/** A number of seconds, or a string with a unit ("500ms", "30s", "5m", "2h", "1d"), as milliseconds; `examples` go into the error. */
export function duration(examples = '500ms, 30s, 5m, 2h') {
  return z.union([z.number(), z.string()]).transform((v, ctx) => {
    const ms = parseDuration(v);
    if (ms === undefined) {
      ctx.addIssue({ code: 'custom', message: `"${v}" is not a duration (use e.g. ${examples} or a number of seconds)` });
      return z.NEVER;
    }
    return ms;
  });
}

/** "host:port", "[v6]:port". */
export const hostPort = z.string().transform((v, ctx): HostPort => {
  const r = parseHostPort(v);
  if (typeof r === 'string') {
    ctx.addIssue({ code: 'custom', message: `bad address "${v}": ${r}` });
    return z.NEVER;
  }
  return r;
});

export const positiveInt = z.number().int().positive();

/** An address range ("10.0.0.0/8", "2001:db8::/32") or one address. */
export const cidr = z.string().transform((v, ctx): Cidr => {
  const r = parseCidr(v);
  if (typeof r === 'string') {
    ctx.addIssue({ code: 'custom', message: r });
    return z.NEVER;
  }
  return r;
});

/**
 * One backend, or a pool of them (a list): new sessions go to the healthy
 * member with the fewest sessions; the listener or route keeps the first as
 * its `backend` and the whole list as its `pool` (src/config/load.ts).
 */
export const backendOrPool = z.unknown().transform((v, ctx): HostPort | HostPort[] => {
  // Checked by hand rather than as a union, so that a bad address is reported with its own words and place.
  const one = (x: unknown, path: number[]): HostPort | undefined => {
    const r = hostPort.safeParse(x);
    if (r.success) return r.data;
    for (const issue of r.error.issues) ctx.addIssue({ code: 'custom', message: issue.message, path: [...path, ...issue.path.filter((p): p is string | number => typeof p !== 'symbol')] });
    return undefined;
  };
  if (v === undefined) {
    ctx.addIssue({ code: 'custom', message: 'is required' });
    return z.NEVER;
  }
  if (!Array.isArray(v)) return one(v, []) ?? z.NEVER;
  if (v.length < 1 || v.length > 32) {
    ctx.addIssue({ code: 'custom', message: 'a pool lists 1 to 32 backends' });
    return z.NEVER;
  }
  const list = v.map((x, i) => one(x, [i]));
  return list.every((x): x is HostPort => x !== undefined) ? list : z.NEVER;
});
