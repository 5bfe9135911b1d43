/**
 * The PROXY protocol header a load balancer (HAProxy `send-proxy` /
 * `send-proxy-v2`, any balancer speaking haproxy's spec) puts first on a
 * connection: parsed here, v1 text and v2 binary, from a buffer that may
 * hold only part of it. Pure: no sockets (the listeners read, see
 * src/listeners/proxied.ts). Outbound headers are proxy-protocol.ts.
 */
import { isIP, type Socket } from 'node:net';
import { normalizeIp } from './address.ts';
import { V2_SIGNATURE, type ProxyEndpoints } from './proxy-protocol.ts';

/** Who a connection speaks for: the socket's peer, or the client a trusted balancer named. */
export type Peer = ProxyEndpoints & {
  /** The balancer's address when a PROXY header named the client (logs). */
  via?: string;
};

/** The socket's own addresses. */
export function socketPeer(socket: Socket): Peer {
  return {
    clientIp: normalizeIp(socket.remoteAddress),
    clientPort: socket.remotePort ?? 0,
    localIp: normalizeIp(socket.localAddress),
    localPort: socket.localPort ?? 0,
  };
}

const V1_PREFIX = Buffer.from('PROXY ', 'latin1');
/** The spec's bound for a v1 line, CRLF included. */
export const V1_MAX = 107;
/**
 * The most a v2 header may take here, TLVs included. The spec allows 64 KiB;
 * balancers send addresses (12 or 36 bytes) plus a few TLVs (ALPN, SNI, a
 * VPC id), well under this. A longer one is refused, never buffered.
 */
export const V2_MAX = 16 + 2048;

/** What the header said: the client's endpoints, or `local` (a health check of the balancer's own, v1 UNKNOWN, v2 LOCAL or AF_UNSPEC). */
export type ProxyInfo = { kind: 'proxied'; endpoints: ProxyEndpoints; version: 1 | 2 } | { kind: 'local'; version: 1 | 2 };

export type ProxyParse =
  /** Not enough bytes yet to tell. */
  | { kind: 'more' }
  | { kind: 'done'; info: ProxyInfo; length: number }
  | { kind: 'invalid'; why: string };

const MORE: ProxyParse = { kind: 'more' };

/** Reads a header at the start of `buf`. `buf` past `length` belongs to the protocol behind it. */
export function parseProxyHeader(buf: Buffer): ProxyParse {
  if (buf.length === 0) return MORE;
  if (buf[0] === 0x0d) return parseV2(buf);
  if (buf[0] === 0x50) return parseV1(buf);
  return invalid('the connection does not start with a PROXY protocol header');
}

function invalid(why: string): ProxyParse {
  return { kind: 'invalid', why };
}

function isPrefixOf(have: Buffer, of: Buffer): boolean {
  const n = Math.min(have.length, of.length);
  return have.subarray(0, n).equals(of.subarray(0, n));
}

// ---- v1: "PROXY TCP4 192.0.2.1 198.51.100.1 56324 993\r\n" ----------------------------

function parseV1(buf: Buffer): ProxyParse {
  if (!isPrefixOf(buf, V1_PREFIX)) return invalid('the connection does not start with a PROXY protocol header');
  const end = buf.indexOf('\r\n', 0, 'latin1');
  if (end < 0) return buf.length >= V1_MAX ? invalid(`PROXY v1 line longer than ${V1_MAX} bytes`) : MORE;
  if (end + 2 > V1_MAX) return invalid(`PROXY v1 line longer than ${V1_MAX} bytes`);
  const line = buf.subarray(0, end).toString('latin1');
  if (!/^[\x20-\x7e]+$/.test(line)) return invalid('PROXY v1 line with a control character');
  const parts = line.split(' ');
  const proto = parts[1];
  if (proto === 'UNKNOWN') return { kind: 'done', info: { kind: 'local', version: 1 }, length: end + 2 };
  if ((proto !== 'TCP4' && proto !== 'TCP6') || parts.length !== 6) return invalid('PROXY v1 line is not "PROXY TCP4|TCP6 src dst sport dport"');
  const [, , src, dst, sport, dport] = parts as [string, string, string, string, string, string];
  const family = proto === 'TCP4' ? 4 : 6;
  if (isIP(src) !== family || isIP(dst) !== family) return invalid(`PROXY v1 addresses are not IPv${family}`);
  const clientPort = portOf(sport);
  const localPort = portOf(dport);
  if (clientPort === undefined || localPort === undefined) return invalid('PROXY v1 port out of range');
  return {
    kind: 'done',
    info: { kind: 'proxied', version: 1, endpoints: { clientIp: normalizeIp(src), clientPort, localIp: normalizeIp(dst), localPort } },
    length: end + 2,
  };
}

function portOf(text: string): number | undefined {
  if (!/^(0|[1-9]\d{0,4})$/.test(text)) return undefined;
  const n = Number(text);
  return n <= 65535 ? n : undefined;
}

// ---- v2: signature, version/command, family/transport, length, addresses, TLVs ------------

function parseV2(buf: Buffer): ProxyParse {
  if (!isPrefixOf(buf, V2_SIGNATURE)) return invalid('the connection does not start with a PROXY protocol header');
  if (buf.length < 16) return MORE;
  const verCmd = buf[12] as number;
  if (verCmd >> 4 !== 2) return invalid(`PROXY v2 header with version ${verCmd >> 4}`);
  const command = verCmd & 0x0f;
  if (command > 1) return invalid(`PROXY v2 header with unknown command ${command}`);
  const famProto = buf[13] as number;
  const length = 16 + buf.readUInt16BE(14);
  if (length > V2_MAX) return invalid(`PROXY v2 header of ${length} bytes (at most ${V2_MAX} are read)`);
  if (buf.length < length) return MORE;
  // LOCAL: the balancer's own connection (a health check); the socket's addresses stand.
  if (command === 0) return { kind: 'done', info: { kind: 'local', version: 2 }, length };
  const family = famProto >> 4;
  const transport = famProto & 0x0f;
  if (family === 0) return { kind: 'done', info: { kind: 'local', version: 2 }, length };
  if (transport !== 1) return invalid('PROXY v2 header for a transport other than TCP (STREAM)');
  const body = buf.subarray(16, length);
  if (family === 1) {
    if (body.length < 12) return invalid('PROXY v2 IPv4 header too short');
    const endpoints = {
      clientIp: ipv4(body, 0),
      localIp: ipv4(body, 4),
      clientPort: body.readUInt16BE(8),
      localPort: body.readUInt16BE(10),
    };
    return { kind: 'done', info: { kind: 'proxied', version: 2, endpoints }, length };
  }
  if (family === 2) {
    if (body.length < 36) return invalid('PROXY v2 IPv6 header too short');
    const endpoints = {
      clientIp: normalizeIp(ipv6(body, 0)),
      localIp: normalizeIp(ipv6(body, 16)),
      clientPort: body.readUInt16BE(32),
      localPort: body.readUInt16BE(34),
    };
    return { kind: 'done', info: { kind: 'proxied', version: 2, endpoints }, length };
  }
  // AF_UNIX: no network address to believe; the socket's addresses stand.
  if (family === 3) return { kind: 'done', info: { kind: 'local', version: 2 }, length };
  return invalid(`PROXY v2 header with unknown address family ${family}`);
}

function ipv4(b: Buffer, at: number): string {
  return `${b[at]}.${b[at + 1]}.${b[at + 2]}.${b[at + 3]}`;
}

/** The compressed text form ("2001:db8::1"), as node reports addresses. */
function ipv6(b: Buffer, at: number): string {
  const groups: number[] = [];
  for (let i = 0; i < 8; i++) groups.push(b.readUInt16BE(at + i * 2));
  // An IPv4 client on the balancer's dual-stack socket: ::ffff:a.b.c.d (normalizeIp makes it a.b.c.d).
  if (groups.slice(0, 5).every((g) => g === 0) && groups[5] === 0xffff) return `::ffff:${ipv4(b, at + 12)}`;
  // The longest run of two or more zero groups becomes "::" (RFC 5952 §4.2).
  let best = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLen) {
      best = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = groups.map((g) => g.toString(16));
  if (best < 0) return hex.join(':');
  return `${hex.slice(0, best).join(':')}::${hex.slice(best + bestLen).join(':')}`;
}
