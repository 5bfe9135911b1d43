/**
 * Fuzz: the PROXY protocol header builder. Whatever the socket reports as
 * addresses (IPv4, IPv6, v4-mapped, zone ids, or strings that are no address
 * at all), the v1 header is one short ASCII line and the v2 header is
 * well-formed: nothing but parsed addresses and ports can reach a backend.
 */
import assert from 'node:assert/strict';
import { isIP } from 'node:net';
import { test } from 'node:test';
import fc from 'fast-check';
import { proxyHeader } from '../../../src/net/proxy-protocol.ts';
import { count, nastyText, params } from './helpers.ts';

const V2_SIGNATURE = '0d0a0d0a000d0a515549540a';

const address = fc.oneof(
  fc.ipV4(),
  fc.ipV6(),
  fc.ipV4().map((v4) => `::ffff:${v4}`),
  fc.constantFrom('::1', '::', 'fe80::1%eth0', '1::', '::ffff:0:0', '0.0.0.0', '255.255.255.255'),
  nastyText(40),
  fc.constantFrom('', '1.2.3.4\r\nPROXY TCP4 6.6.6.6 6.6.6.6 1 1', '1.2.3.4 5.6.7.8', '::1\0', 'localhost', '999.1.1.1'),
);
const port = fc.integer({ min: 0, max: 65535 });

test('fuzz: v1 is one printable line of at most 107 bytes naming parsed addresses only', () => {
  fc.assert(
    fc.property(address, port, address, port, (clientIp, clientPort, localIp, localPort) => {
      count('proxy');
      const h = proxyHeader('v1', { clientIp, clientPort, localIp, localPort }).toString('latin1');
      assert.ok(h.length <= 107, `header of ${h.length} bytes`);
      assert.ok(h.endsWith('\r\n') && h.indexOf('\r') === h.length - 2 && h.indexOf('\n') === h.length - 1, JSON.stringify(h));
      assert.match(h, /^[\x20-\x7e]+\r\n$/);
      const m = /^PROXY (?:UNKNOWN|TCP([46]) (\S+) (\S+) (\d+) (\d+))\r\n$/.exec(h);
      assert.ok(m, JSON.stringify(h));
      if (m[1]) {
        assert.equal(isIP(m[2]!), Number(m[1]), `source ${m[2]}`);
        assert.equal(isIP(m[3]!), Number(m[1]), `destination ${m[3]}`);
        assert.equal(Number(m[4]), clientPort);
        assert.equal(Number(m[5]), localPort);
      }
    }),
    params(2000),
  );
});

test('fuzz: v2 has the signature, a length that matches, and a family that matches its addresses', () => {
  fc.assert(
    fc.property(address, port, address, port, (clientIp, clientPort, localIp, localPort) => {
      count('proxy');
      const h = proxyHeader('v2', { clientIp, clientPort, localIp, localPort });
      assert.equal(h.subarray(0, 12).toString('hex'), V2_SIGNATURE);
      assert.equal(h.readUInt16BE(14), h.length - 16);
      if (h[12] === 0x20) {
        assert.equal(h.length, 16, 'LOCAL carries no addresses');
        return;
      }
      assert.equal(h[12], 0x21);
      if (h[13] === 0x11) {
        assert.equal(h.length, 28);
        assert.equal(h.readUInt16BE(24), clientPort);
        assert.equal(h.readUInt16BE(26), localPort);
      } else {
        assert.equal(h[13], 0x21);
        assert.equal(h.length, 52);
        assert.equal(h.readUInt16BE(48), clientPort);
        assert.equal(h.readUInt16BE(50), localPort);
      }
    }),
    params(2000),
  );
});

test('an IPv4 client keeps its address in v1 and v2, however the socket spells it', () => {
  for (const spelled of ['192.0.2.9', '::ffff:192.0.2.9']) {
    const ep = { clientIp: spelled, clientPort: 1, localIp: '127.0.0.1', localPort: 2 };
    assert.equal(proxyHeader('v1', ep).toString(), 'PROXY TCP4 192.0.2.9 127.0.0.1 1 2\r\n');
    assert.deepEqual([...proxyHeader('v2', ep).subarray(16, 20)], [192, 0, 2, 9]);
  }
});
