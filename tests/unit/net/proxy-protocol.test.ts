import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { proxyHeader, v6Bytes } from '../../../src/net/proxy-protocol.ts';

const v4 = { clientIp: '192.0.2.10', clientPort: 51234, localIp: '127.0.0.1', localPort: 993 };

test('v1 header for IPv4, IPv6 and a v4 client on a dual-stack socket', () => {
  assert.equal(proxyHeader('v1', v4).toString(), 'PROXY TCP4 192.0.2.10 127.0.0.1 51234 993\r\n');
  assert.equal(
    proxyHeader('v1', { clientIp: '2001:db8::1', clientPort: 1, localIp: '::1', localPort: 2 }).toString(),
    'PROXY TCP6 2001:db8::1 ::1 1 2\r\n',
  );
  assert.equal(proxyHeader('v1', { ...v4, clientIp: '::ffff:192.0.2.10' }).toString(), 'PROXY TCP4 192.0.2.10 127.0.0.1 51234 993\r\n');
  assert.equal(proxyHeader('v1', undefined).toString(), 'PROXY UNKNOWN\r\n');
});

test('v2 header: signature, PROXY command, family, length and addresses', () => {
  const h = proxyHeader('v2', v4);
  assert.equal(h.subarray(0, 12).toString('hex'), '0d0a0d0a000d0a515549540a');
  assert.equal(h[12], 0x21);
  assert.equal(h[13], 0x11);
  assert.equal(h.readUInt16BE(14), 12);
  assert.deepEqual([...h.subarray(16, 20)], [192, 0, 2, 10]);
  assert.deepEqual([...h.subarray(20, 24)], [127, 0, 0, 1]);
  assert.equal(h.readUInt16BE(24), 51234);
  assert.equal(h.readUInt16BE(26), 993);
  const local = proxyHeader('v2', undefined);
  assert.equal(local[12], 0x20, 'LOCAL command for the gateway\'s own probes');
  assert.equal(local.length, 16);
  const six = proxyHeader('v2', { clientIp: '2001:db8::1', clientPort: 7, localIp: '::1', localPort: 8 });
  assert.equal(six[13], 0x21);
  assert.equal(six.readUInt16BE(14), 36);
  assert.equal(six.subarray(16, 32).toString('hex'), '20010db8000000000000000000000001');
  assert.equal(six.subarray(32, 48).toString('hex'), '00000000000000000000000000000001');
  assert.deepEqual([six.readUInt16BE(48), six.readUInt16BE(50), six.length], [7, 8, 52]);
  assert.equal(h.length, 28);
});

test('property: IPv6 text forms all encode to the same 16 bytes', () => {
  fc.assert(
    fc.property(fc.array(fc.integer({ min: 0, max: 0xffff }), { minLength: 8, maxLength: 8 }), (groups) => {
      const full = groups.map((g) => g.toString(16)).join(':');
      const bytes = v6Bytes(full);
      const expect = Buffer.alloc(16);
      groups.forEach((g, i) => expect.writeUInt16BE(g, i * 2));
      assert.deepEqual(bytes, expect);
      // Compress the longest run of zero groups the way inet_ntop does.
      const compressed = full.replace(/(^|:)0(:0)+(:|$)/, '::');
      assert.deepEqual(v6Bytes(compressed), expect, compressed);
    }),
  );
});
