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
