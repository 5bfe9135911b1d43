import { isIP } from 'node:net';

export interface HostPort {
  host: string;
  port: number;
}

/**
 * Parses "host:port", "[v6]:port" or ":port"/"port" (all addresses). IPv6
 * literals must be bracketed so that the port is unambiguous.
 */
export function parseHostPort(text: string): HostPort | string {
  const s = text.trim();
  let host: string;
  let portText: string;
  if (/^\d+$/.test(s)) return checkPort('0.0.0.0', s);
  if (s.startsWith('[')) {
    const end = s.indexOf(']');
    if (end < 0 || s[end + 1] !== ':') return 'an IPv6 address must be written as [addr]:port';
    host = s.slice(1, end);
    portText = s.slice(end + 2);
    if (isIP(host) !== 6) return `"${host}" is not an IPv6 address`;
  } else {
    const colon = s.lastIndexOf(':');
    if (colon < 0) return 'expected host:port';
    host = s.slice(0, colon);
    portText = s.slice(colon + 1);
    if (host.includes(':')) return 'an IPv6 address must be written as [addr]:port';
    if (host === '' || host === '*') host = '0.0.0.0';
    if (isIP(host) === 0 && !/^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$/.test(host)) {
      return `"${host}" is neither an IP address nor a host name`;
    }
  }
  return checkPort(host, portText);
}

function checkPort(host: string, portText: string): HostPort | string {
  if (!/^\d{1,5}$/.test(portText)) return `"${portText}" is not a port number`;
  const port = Number(portText);
  if (port > 65535) return `port ${port} is out of range`;
  return { host, port };
}

export function formatHostPort(a: HostPort): string {
  return isIP(a.host) === 6 ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}

/** Node reports IPv4 clients on dual-stack sockets as ::ffff:a.b.c.d; logs and rules want a.b.c.d. */
export function normalizeIp(ip: string | undefined): string {
  if (!ip) return '';
  return ip.startsWith('::ffff:') && isIP(ip.slice(7)) === 4 ? ip.slice(7) : ip;
}
