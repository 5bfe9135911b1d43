/**
 * Address ranges for rules and exemptions: "192.0.2.0/24", "2001:db8::/32",
 * a single address, or an IPv4-mapped IPv6 range ("::ffff:10.0.0.0/104").
 * Matching is Node's BlockList, which treats an IPv4 client and its
 * IPv4-mapped IPv6 form (::ffff:a.b.c.d) as the same address both ways.
 */
import { BlockList, isIP } from 'node:net';

export interface Cidr {
  readonly address: string;
  readonly prefix: number;
  readonly family: 4 | 6;
  /** As written in the config, for logs and error messages. */
  readonly text: string;
}

/** Parses one range; a string result is the reason it is not one. */
export function parseCidr(text: string): Cidr | string {
  const s = text.trim();
  const slash = s.indexOf('/');
  const address = slash < 0 ? s : s.slice(0, slash);
  const family = isIP(address);
  if (family === 0) return `"${address}" is not an IPv4 or IPv6 address`;
  const max = family === 4 ? 32 : 128;
  let prefix = max;
  if (slash >= 0) {
    const p = s.slice(slash + 1);
    if (!/^\d{1,3}$/.test(p) || Number(p) > max) return `"/${p}" is not a prefix length for IPv${family} (0-${max})`;
    prefix = Number(p);
  }
  return { address, prefix, family: family as 4 | 6, text: s };
}

/** A set of ranges with an O(ranges) membership test that never throws. */
export class AddressSet {
  private readonly list = new BlockList();
  readonly size: number;
  readonly ranges: readonly Cidr[];

  constructor(ranges: readonly Cidr[]) {
    this.ranges = ranges;
    this.size = ranges.length;
    for (const r of ranges) this.list.addSubnet(r.address, r.prefix, r.family === 4 ? 'ipv4' : 'ipv6');
  }

  has(ip: string): boolean {
    if (this.size === 0) return false;
    const family = isIP(ip);
    if (family === 0) return false;
    return this.list.check(ip, family === 4 ? 'ipv4' : 'ipv6');
  }
}
