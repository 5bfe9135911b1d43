/**
 * PROXY protocol headers (haproxy's spec, v1 text and v2 binary) that tell a
 * backend the real client address. Only addresses go in; nothing the client
 * typed can reach the header.
 */
import { isIP } from 'node:net';

export interface ProxyEndpoints {
  clientIp: string;
  clientPort: number;
  localIp: string;
  localPort: number;
}

/** The twelve bytes every PROXY protocol v2 header starts with. */
export const V2_SIGNATURE = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);

/** Without endpoints (a probe made by the gateway itself): v1 UNKNOWN, v2 LOCAL. */
export function proxyHeader(version: 'v1' | 'v2', ep: ProxyEndpoints | undefined): Buffer {
  const fam = ep ? familyOf(ep) : 0;
  if (version === 'v1') {
    if (!ep || fam === 0) return Buffer.from('PROXY UNKNOWN\r\n', 'latin1');
    const [src, dst] = fam === 4 ? [v4(ep.clientIp), v4(ep.localIp)] : [v6(ep.clientIp), v6(ep.localIp)];
    return Buffer.from(`PROXY TCP${fam} ${src} ${dst} ${ep.clientPort} ${ep.localPort}\r\n`, 'latin1');
  }
  if (!ep || fam === 0) return Buffer.concat([V2_SIGNATURE, Buffer.from([0x20, 0x00, 0x00, 0x00])]);
  // v2: signature, version 2 + PROXY, family + STREAM, the address block's length, then source and
  // destination addresses (4 or 16 bytes each) and ports.
  const [src, dst, family, size] = fam === 4 ? [v4Bytes(v4(ep.clientIp)), v4Bytes(v4(ep.localIp)), 0x11, 4] : [v6Bytes(v6(ep.clientIp)), v6Bytes(v6(ep.localIp)), 0x21, 16];
  const b = Buffer.alloc(16 + 2 * size + 4);
  V2_SIGNATURE.copy(b, 0);
  b[12] = 0x21;
  b[13] = family;
  b.writeUInt16BE(2 * size + 4, 14);
  src.copy(b, 16);
  dst.copy(b, 16 + size);
  b.writeUInt16BE(ep.clientPort, 16 + 2 * size);
  b.writeUInt16BE(ep.localPort, 18 + 2 * size);
  return b;
}

/** Both ends must be of one family; an IPv4 client on a v6 socket arrives as ::ffff:a.b.c.d. */
function familyOf(ep: ProxyEndpoints): 0 | 4 | 6 {
  const a = isIP(v4(ep.clientIp));
  const b = isIP(v4(ep.localIp));
  if (a === 4 && b === 4) return 4;
  if (a !== 0 && b !== 0) return 6;
  return 0;
}

function v4(ip: string): string {
  return ip.startsWith('::ffff:') && isIP(ip.slice(7)) === 4 ? ip.slice(7) : ip;
}

function v6(ip: string): string {
  return isIP(ip) === 4 ? `::ffff:${ip}` : ip;
}

function v4Bytes(ip: string): Buffer {
  return Buffer.from(ip.split('.').map(Number));
}

export function v6Bytes(ip: string): Buffer {
  const out = Buffer.alloc(16);
  let text = ip;
  const dotted = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (dotted?.[1]) {
    const [a, b, c, d] = dotted[1].split('.').map(Number) as [number, number, number, number];
    text = text.slice(0, -dotted[1].length) + `${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const [head, tail] = text.includes('::') ? (text.split('::') as [string, string]) : [text, undefined];
  const h = head ? head.split(':') : [];
  const t = tail ? tail.split(':') : [];
  const groups = tail === undefined ? h : [...h, ...Array(8 - h.length - t.length).fill('0'), ...t];
  groups.forEach((g, i) => out.writeUInt16BE(parseInt(g || '0', 16), i * 2));
  return out;
}
