/** The inbound PROXY header parser: v1 and v2, split at every offset, generated headers round-tripped, hostile input refused within its bounds. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { parseProxyHeader, V1_MAX, V2_MAX, type ProxyParse } from '../../../src/net/proxy-inbound.ts';
import { proxyHeader, type ProxyEndpoints } from '../../../src/net/proxy-protocol.ts';

/** Feeds `bytes` growing one byte at a time: 'more' until the whole header is there, then the same answer. */
function fedByteByByte(bytes: Buffer): ProxyParse {
  for (let n = 1; n < bytes.length; n++) {
    const r = parseProxyHeader(bytes.subarray(0, n));
    if (r.kind !== 'more') return r;
  }
  return parseProxyHeader(bytes);
}

const v4: ProxyEndpoints = { clientIp: '203.0.113.7', clientPort: 51234, localIp: '192.0.2.1', localPort: 993 };
const v6: ProxyEndpoints = { clientIp: '2001:db8::7', clientPort: 443, localIp: '2001:db8:0:1::1', localPort: 8443 };

test('v1 and v2 headers for IPv4 and IPv6 clients give the client endpoints and their length, at every split', () => {
  for (const version of ['v1', 'v2'] as const) {
    for (const ep of [v4, v6]) {
      const header = proxyHeader(version, ep);
      const bytes = Buffer.concat([header, Buffer.from('a1 LOGIN x y\r\n')]);
      const r = fedByteByByte(bytes);
      assert.equal(r.kind, 'done', `${version} ${ep.clientIp}`);
      assert.equal(r.kind === 'done' && r.length, header.length);
      assert.deepEqual(r.kind === 'done' && r.info, { kind: 'proxied', version: version === 'v1' ? 1 : 2, endpoints: ep });
      for (let n = 0; n < header.length; n++) assert.equal(parseProxyHeader(header.subarray(0, n)).kind, 'more', `${version} cut at ${n}`);
    }
  }
});

test('v1 UNKNOWN and v2 LOCAL (a balancer health check) keep the socket addresses', () => {
  for (const version of ['v1', 'v2'] as const) {
    const r = parseProxyHeader(proxyHeader(version, undefined));
    assert.equal(r.kind === 'done' && r.info.kind, 'local', version);
  }
});

test('an IPv4-mapped IPv6 client in a v2 header is the IPv4 address', () => {
  const r = parseProxyHeader(proxyHeader('v2', { clientIp: '::ffff:198.51.100.9', clientPort: 1, localIp: '2001:db8::1', localPort: 2 }));
  assert.equal(r.kind === 'done' && r.info.kind === 'proxied' && r.info.endpoints.clientIp, '198.51.100.9');
});

test('v2 TLVs after the addresses are skipped; the header length covers them', () => {
  const base = proxyHeader('v2', v4);
  const tlv = Buffer.from([0x01, 0x00, 0x02, 0x68, 0x32]); // PP2_TYPE_ALPN "h2"
  const b = Buffer.concat([base, tlv]);
  b.writeUInt16BE(base.length - 16 + tlv.length, 14);
  const r = parseProxyHeader(b);
  assert.equal(r.kind === 'done' && r.length, b.length);
  assert.equal(r.kind === 'done' && r.info.kind === 'proxied' && r.info.endpoints.clientIp, v4.clientIp);
});

test('anything else is refused: no header, garbage, bad addresses, overlong lines and headers, UDP, unknown versions', () => {
  const bad: [string, Buffer][] = [
    ['a TLS ClientHello', Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00])],
    ['an IMAP command', Buffer.from('a1 LOGIN alice secret\r\n')],
    ['a lower-case v1', Buffer.from('proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n')],
    ['v1 with IPv6 for TCP4', Buffer.from('PROXY TCP4 ::1 ::1 1 2\r\n')],
    ['v1 with a port past 65535', Buffer.from('PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n')],
    ['v1 with a leading-zero port', Buffer.from('PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n')],
    ['v1 with extra fields', Buffer.from('PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n')],
    ['v1 with a control byte', Buffer.from('PROXY TCP4 1.2.3.4\x00 5.6.7.8 1 2\r\n')],
    ['v1 without CRLF within 107 bytes', Buffer.from(`PROXY TCP4 ${'1'.repeat(120)}`)],
    ['v2 version 1', Buffer.concat([proxyHeader('v2', v4).subarray(0, 12), Buffer.from([0x11, 0x11, 0, 12]), Buffer.alloc(12)])],
    ['v2 over UDP', Buffer.concat([proxyHeader('v2', v4).subarray(0, 12), Buffer.from([0x21, 0x12, 0, 12]), Buffer.alloc(12)])],
    ['v2 IPv4 too short', Buffer.concat([proxyHeader('v2', v4).subarray(0, 12), Buffer.from([0x21, 0x11, 0, 4]), Buffer.alloc(4)])],
    ['v2 past the bound', Buffer.concat([proxyHeader('v2', v4).subarray(0, 12), Buffer.from([0x21, 0x11, 0xff, 0xff])])],
    ['v2 with a bad signature', Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0b, 0x21, 0x11, 0, 12])],
  ];
  for (const [what, bytes] of bad) assert.equal(fedByteByByte(bytes).kind, 'invalid', what);
});

test('property: any bytes get "more" only while within the bounds, and a verdict never reads past them', () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 300 }), fc.boolean(), (raw, v2) => {
      const prefix = v2 ? proxyHeader('v2', v4).subarray(0, 12) : Buffer.from('PROXY ');
      const bytes = Buffer.concat([prefix, Buffer.from(raw)]);
      const r = parseProxyHeader(bytes);
      if (r.kind === 'more') return bytes.length < (v2 ? V2_MAX : V1_MAX);
      if (r.kind === 'done') return r.length <= bytes.length && r.length <= (v2 ? V2_MAX : V1_MAX);
      return true;
    }),
    { numRuns: 2000 },
  );
});

test('property: generated endpoints survive the outbound header and the inbound parser, v1 and v2', () => {
  const ip4 = fc.ipV4();
  const ip6 = fc.ipV6().filter((ip) => !ip.includes('.') && !/^::ffff:/i.test(ip));
  const port = fc.integer({ min: 0, max: 65535 });
  const norm = (ip: string) => (ip.includes(':') ? new URL(`http://[${ip}]/`).hostname.slice(1, -1) : ip);
  fc.assert(
    fc.property(fc.oneof(fc.tuple(ip4, ip4), fc.tuple(ip6, ip6)), port, port, ([src, dst], sp, dp) => {
      for (const version of ['v1', 'v2'] as const) {
        const r = parseProxyHeader(proxyHeader(version, { clientIp: src, clientPort: sp, localIp: dst, localPort: dp }));
        if (r.kind !== 'done' || r.info.kind !== 'proxied') return false;
        const e = r.info.endpoints;
        if (norm(e.clientIp) !== norm(src) || norm(e.localIp) !== norm(dst) || e.clientPort !== sp || e.localPort !== dp) return false;
      }
      return true;
    }),
    { numRuns: 500 },
  );
});
