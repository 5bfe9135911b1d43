import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import type { AccessRule } from '../../../src/config/schema-policy.ts';
import { AddressSet, parseCidr, type Cidr } from '../../../src/net/cidr.ts';
import { globMatch, nameMatcher } from '../../../src/policy/names.ts';
import { RuleSet, type RuleAction, type RuleFacts } from '../../../src/policy/rules.ts';

// ---- reference implementations ------------------------------------------------------

function v4ToBig(ip: string): bigint {
  return ip.split('.').reduce((acc, o) => (acc << 8n) | BigInt(Number(o)), 0n);
}

function v6ToBig(ip: string): bigint {
  let s = ip;
  const dotted = /(\d+\.\d+\.\d+\.\d+)$/.exec(s);
  if (dotted?.[1]) {
    const v = v4ToBig(dotted[1]);
    s = `${s.slice(0, -dotted[1].length)}${(v >> 16n).toString(16)}:${(v & 0xffffn).toString(16)}`;
  }
  const [head, tail] = s.includes('::') ? s.split('::') : [s, undefined];
  const h = head ? head.split(':') : [];
  const t = tail ? tail.split(':') : [];
  const groups = tail === undefined ? h : [...h, ...Array(8 - h.length - t.length).fill('0'), ...t];
  return groups.reduce((acc, g) => (acc << 16n) | BigInt(parseInt(g || '0', 16)), 0n);
}

/** An address as a 128-bit IPv6 number, IPv4 mapped into ::ffff:0:0/96. */
function as128(ip: string): bigint {
  return ip.includes(':') ? v6ToBig(ip) : (0xffffn << 32n) | v4ToBig(ip);
}

function inRange(ip: string, r: Cidr): boolean {
  const base = r.family === 4 ? as128(r.address) : v6ToBig(r.address);
  const prefix = r.family === 4 ? r.prefix + 96 : r.prefix;
  const shift = BigInt(128 - prefix);
  return as128(ip) >> shift === base >> shift;
}

function cidr(text: string): Cidr {
  const c = parseCidr(text);
  if (typeof c === 'string') throw new Error(c);
  return c;
}

const octet = fc.integer({ min: 0, max: 255 });
const v4 = fc.tuple(octet, octet, octet, octet).map((o) => o.join('.'));
const hex = fc.integer({ min: 0, max: 0xffff }).map((n) => n.toString(16));
const v6 = fc.array(hex, { minLength: 8, maxLength: 8 }).map((g) => g.join(':'));

// ---- CIDR ---------------------------------------------------------------------------

test('IPv4 ranges match exactly the addresses a bitwise reference says they do', () => {
  fc.assert(
    fc.property(v4, fc.integer({ min: 0, max: 32 }), v4, (base, prefix, ip) => {
      const r = cidr(`${base}/${prefix}`);
      assert.equal(new AddressSet([r]).has(ip), inRange(ip, r));
    }),
    { numRuns: 2000 },
  );
});

test('an IPv4 address inside a range is also matched in its IPv4-mapped IPv6 form, and by the mapped form of the range', () => {
  fc.assert(
    fc.property(v4, fc.integer({ min: 0, max: 32 }), v4, (base, prefix, ip) => {
      const plain = new AddressSet([cidr(`${base}/${prefix}`)]);
      const mapped = new AddressSet([cidr(`::ffff:${base}/${prefix + 96}`)]);
      const expected = inRange(ip, cidr(`${base}/${prefix}`));
      assert.equal(plain.has(`::ffff:${ip}`), expected, `::ffff:${ip} in ${base}/${prefix}`);
      assert.equal(mapped.has(ip), expected, `${ip} in ::ffff:${base}/${prefix + 96}`);
      assert.equal(mapped.has(`::ffff:${ip}`), expected);
    }),
    { numRuns: 1000 },
  );
});

test('IPv6 ranges match exactly the addresses a bitwise reference says they do', () => {
  fc.assert(
    fc.property(v6, fc.integer({ min: 0, max: 128 }), v6, (base, prefix, ip) => {
      const r = cidr(`${base}/${prefix}`);
      assert.equal(new AddressSet([r]).has(ip), inRange(ip, r));
    }),
    { numRuns: 1000 },
  );
});

test('CIDR edge cases: /0, /32, /128, host bits, garbage and bad prefixes', () => {
  assert.equal(new AddressSet([cidr('0.0.0.0/0')]).has('203.0.113.9'), true);
  assert.equal(new AddressSet([cidr('0.0.0.0/0')]).has('2001:db8::1'), false, 'all of IPv4 is not IPv6');
  assert.equal(new AddressSet([cidr('192.0.2.7')]).has('192.0.2.7'), true, 'a bare address is a /32');
  assert.equal(new AddressSet([cidr('192.0.2.7')]).has('192.0.2.8'), false);
  assert.equal(new AddressSet([cidr('2001:db8::1')]).has('2001:db8::1'), true);
  assert.equal(new AddressSet([cidr('2001:db8::1')]).has('2001:db8::2'), false);
  assert.equal(new AddressSet([cidr('10.1.2.3/8')]).has('10.200.0.1'), true, 'host bits in the base are ignored');
  assert.equal(new AddressSet([cidr('10.0.0.0/8')]).has(''), false);
  assert.equal(new AddressSet([cidr('10.0.0.0/8')]).has('not-an-ip'), false);
  assert.equal(typeof parseCidr('10.0.0.0/33'), 'string');
  assert.equal(typeof parseCidr('2001:db8::/129'), 'string');
  assert.equal(typeof parseCidr('10.0.0.0/-1'), 'string');
  assert.equal(typeof parseCidr('10.0.0/8'), 'string');
  assert.equal(typeof parseCidr('example.org/24'), 'string');
});

// ---- names --------------------------------------------------------------------------

test('glob matching agrees with a regular-expression reference and is case-insensitive', () => {
  const ch = fc.constantFrom('a', 'b', '@', '.', '*', '?');
  fc.assert(
    fc.property(fc.string({ unit: ch, maxLength: 8 }), fc.string({ unit: fc.constantFrom('a', 'b', '@', '.'), maxLength: 10 }), (pattern, text) => {
      const re = new RegExp(`^${[...pattern].map((c) => (c === '*' ? '.*' : c === '?' ? '.' : c.replace(/[.]/, '\\.'))).join('')}$`, 's');
      assert.equal(globMatch(pattern, text), re.test(text));
    }),
    { numRuns: 3000 },
  );
  const m = nameMatcher(['Alice', '*@Example.ORG']);
  assert.equal(m('ALICE'), true);
  assert.equal(m('bob@example.org'), true);
  assert.equal(m('bob@example.net'), false);
});

test('a glob with many stars against a long name is quick (no backtracking blow-up)', () => {
  const started = performance.now();
  assert.equal(globMatch('*a*a*a*a*a*a*a*a*b', 'a'.repeat(320)), false);
  assert.ok(performance.now() - started < 200);
});

// ---- rules: property-based -------------------------------------------------------------

const LISTENERS = ['imaps', 'pop3s', 'smtps'] as const;
const PROTOCOLS = ['imap', 'pop3', 'smtp'] as const;
const ADDRS = ['192.0.2.1', '192.0.2.200', '198.51.100.7', '2001:db8::5', '::ffff:192.0.2.1'];
const RANGES = ['192.0.2.0/25', '198.51.100.0/24', '2001:db8::/32', '0.0.0.0/0'];
const USERS = ['alice', 'bob@example.org', 'carol@example.net'];
const GROUPS = ['staff', 'migrated'];

const ruleArb: fc.Arbitrary<AccessRule> = fc.record(
  {
    action: fc.constantFrom<RuleAction>('allow', 'deny', 'tempfail'),
    reason: fc.constantFrom('r1', 'r2', 'r3'),
    listeners: fc.subarray([...LISTENERS], { minLength: 1 }),
    protocols: fc.subarray([...PROTOCOLS], { minLength: 1 }),
    addresses: fc.subarray(RANGES, { minLength: 1 }).map((rs) => rs.map(cidr)),
    users: fc.subarray(['alice', '*@example.org', 'nobody'], { minLength: 1 }),
    groups: fc.subarray(GROUPS, { minLength: 1 }),
    tls: fc.boolean(),
    authenticated: fc.boolean(),
  },
  { requiredKeys: ['action'] },
);

const factsArb: fc.Arbitrary<RuleFacts> = fc
  .record({
    i: fc.integer({ min: 0, max: 2 }),
    address: fc.constantFrom(...ADDRS),
    tls: fc.boolean(),
    user: fc.constantFrom<string | null>(null, ...USERS),
    groups: fc.subarray(GROUPS),
  })
  .map(({ i, address, tls, user, groups }) => ({
    listener: LISTENERS[i] as string,
    protocol: PROTOCOLS[i] as string,
    address,
    tls,
    user,
    groups: new Set(user === null ? [] : groups),
    authenticated: user !== null,
  }));

/** The specification, written the plain way. */
function reference(rules: AccessRule[], dflt: RuleAction, f: RuleFacts): { action: RuleAction; rule: number | 'default' } {
  const matches = (r: AccessRule) =>
    (!r.listeners || r.listeners.includes(f.listener)) &&
    (!r.protocols || (r.protocols as string[]).includes(f.protocol)) &&
    (!r.addresses || r.addresses.some((c) => inRange(f.address, c))) &&
    (r.tls === undefined || r.tls === f.tls) &&
    (r.authenticated === undefined || r.authenticated === f.authenticated) &&
    (!r.users || (f.user !== null && f.user !== undefined && nameMatcher(r.users)(f.user))) &&
    (!r.groups || r.groups.some((g) => f.groups?.has(g)));
  const i = rules.findIndex(matches);
  return i < 0 ? { action: dflt, rule: 'default' } : { action: (rules[i] as AccessRule).action, rule: i };
}

test('with every fact known, the first matching rule decides, else the default', () => {
  fc.assert(
    fc.property(fc.array(ruleArb, { maxLength: 8 }), fc.constantFrom<RuleAction>('allow', 'deny', 'tempfail'), factsArb, (rules, dflt, facts) => {
      const got = new RuleSet(rules, dflt).evaluate(facts);
      assert.equal(got.decided, true);
      const want = reference(rules, dflt, facts);
      if (got.decided) {
        assert.equal(got.rule, want.rule);
        assert.equal(got.action, want.action);
        if (typeof want.rule === 'number') assert.equal(got.reason, rules[want.rule]?.reason);
      }
    }),
    { numRuns: 3000 },
  );
});

test('adding rules after the deciding one never changes the decision; with no rule matching the default applies', () => {
  fc.assert(
    fc.property(fc.array(ruleArb, { maxLength: 6 }), fc.array(ruleArb, { maxLength: 4 }), factsArb, (rules, more, facts) => {
      const a = new RuleSet(rules, 'deny').evaluate(facts);
      const b = new RuleSet([...rules, ...more], 'deny').evaluate(facts);
      if (a.decided && a.rule !== 'default') assert.deepEqual(b, a);
      if (a.decided && a.rule === 'default') assert.ok(b.decided && (b.rule === 'default' ? b.action === 'deny' : b.rule >= rules.length));
    }),
    { numRuns: 2000 },
  );
  assert.deepEqual(new RuleSet([], 'tempfail').evaluate({ listener: 'imaps', protocol: 'imap', address: '192.0.2.1', tls: true, user: null, groups: new Set(), authenticated: false }), {
    decided: true,
    action: 'tempfail',
    reason: undefined,
    rule: 'default',
  });
});

test('a decision made at connect (user, groups, login unknown) is the one the login gets', () => {
  fc.assert(
    fc.property(fc.array(ruleArb, { maxLength: 8 }), fc.constantFrom<RuleAction>('allow', 'deny'), factsArb, fc.boolean(), (rules, dflt, full, tlsKnown) => {
      const set = new RuleSet(rules, dflt);
      const partial: RuleFacts = { ...full, tls: tlsKnown ? full.tls : undefined, user: undefined, groups: undefined, authenticated: undefined };
      const early = set.evaluate(partial);
      const late = set.evaluate(full);
      if (early.decided) assert.deepEqual(late, early);
    }),
    { numRuns: 3000 },
  );
});

test('an address rule refuses at connect; a user rule before it keeps the connect-time walk undecided', () => {
  const denyNet: AccessRule = { action: 'deny', addresses: [cidr('192.0.2.0/24')] };
  const connectFacts: RuleFacts = { listener: 'imaps', protocol: 'imap', address: '192.0.2.9', tls: true, user: undefined, groups: undefined, authenticated: undefined };
  assert.deepEqual(new RuleSet([denyNet], 'allow').evaluate(connectFacts), { decided: true, action: 'deny', reason: undefined, rule: 0 });
  const allowAlice: AccessRule = { action: 'allow', users: ['alice'] };
  assert.deepEqual(new RuleSet([allowAlice, denyNet], 'allow').evaluate(connectFacts), { decided: false });
  assert.equal(new RuleSet([allowAlice, denyNet], 'allow').evaluate({ ...connectFacts, user: 'alice', groups: new Set(), authenticated: true }).decided, true);
  // A user rule scoped to another network is skipped at connect: it can never match this client.
  const allowAliceElsewhere: AccessRule = { action: 'allow', users: ['alice'], addresses: [cidr('198.51.100.0/24')] };
  assert.deepEqual(new RuleSet([allowAliceElsewhere, denyNet], 'allow').evaluate(connectFacts), { decided: true, action: 'deny', reason: undefined, rule: 1 });
});
