/**
 * The decision alone: facts and a snapshot of the policy state in, a verdict
 * with a stable code out. No store, no clock, no engine: every fact the
 * decision may look at is given here.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { Ban } from '../../../src/policy/bans.ts';
import type { Count } from '../../../src/policy/counters.ts';
import { blockKey, isRuleReason, MAX_CLIENT_REASON, PolicyRules, type Snapshot } from '../../../src/policy/decide.ts';
import { configFrom, listenerOf } from './helpers.ts';

const NOW = 1_700_000_000_000;

function snapshot(s: Partial<{ ban: Ban; blocked: Record<string, number>; open: number; loggedIn: number; counts: Record<string, Count> }> = {}): Snapshot {
  return {
    now: NOW,
    ban: s.ban,
    blockedUntil: (key) => s.blocked?.[key],
    openFrom: () => s.open ?? 0,
    loggedIn: () => s.loggedIn ?? 0,
    count: (key) => s.counts?.[key],
  };
}

const ban: Ban = { id: 'address:192.0.2.1', kind: 'address', address: '192.0.2.1', user: null, until: NOW + 60_000, createdAt: NOW, reason: 'test', source: 'manual' };

const config = configFrom(`
access:
  rules:
    - { action: deny, addresses: [203.0.113.0/24], reason: Your network is blocked }
    - { action: tempfail, users: [bob] }
rate_limits:
  - { limit: connections, per: address, max: 3, window: 60s }
  - { limit: concurrent, per: user, max: 2 }
  - { limit: messages, per: user, max: 5, window: 1h }
`);
const rules = new PolicyRules(config);
const imaps = listenerOf(config, 'imaps');
const smtps = listenerOf(config, 'smtps');

test('connect: a rule, a ban, a reached window limit and a concurrency limit each refuse with their code', () => {
  assert.deepEqual(rules.decide({ stage: 'connect', listener: imaps, clientIp: '192.0.2.1' }, snapshot()), { action: 'allow' });
  assert.deepEqual(rules.decide({ stage: 'connect', listener: imaps, clientIp: '203.0.113.5' }, snapshot()), { action: 'deny', code: 'access-denied', text: 'Your network is blocked' });
  assert.deepEqual(rules.decide({ stage: 'connect', listener: imaps, clientIp: '192.0.2.1' }, snapshot({ ban: { ...ban, source: 'brute-force' } })), {
    action: 'tempfail',
    code: 'banned',
    text: 'Too many failed logins, try again later',
    retryAfterMs: 60_000,
  });
  // A ban set by hand tells the client the administrator's reason.
  assert.deepEqual(rules.decide({ stage: 'connect', listener: imaps, clientIp: '192.0.2.1' }, snapshot({ ban })), { action: 'tempfail', code: 'banned', text: 'test', retryAfterMs: 60_000 });
  const connections = rules.limits.find((c) => c.spec.limit === 'connections')!;
  const blocked = snapshot({ blocked: { [blockKey(connections, '192.0.2.1')]: NOW + 30_000 } });
  assert.deepEqual(rules.decide({ stage: 'connect', listener: imaps, clientIp: '192.0.2.1' }, blocked), {
    action: 'tempfail',
    code: 'connection-rate',
    text: 'Too many connections, try again later',
    retryAfterMs: 30_000,
  });
  assert.equal(rules.decide({ stage: 'connect', listener: imaps, clientIp: '192.0.2.2' }, blocked).action, 'allow', 'another address has its own count');
});

test('credentials: a name that is not one is a bad login, a ban a tempfail, before any password is looked at', () => {
  const facts = { stage: 'credentials' as const, listener: imaps, clientIp: '192.0.2.1', authzid: null };
  assert.deepEqual(rules.decide({ ...facts, user: 'x'.repeat(321) }, snapshot()), { action: 'deny', code: 'bad-login', text: 'Authentication failed' });
  assert.equal(rules.decide({ ...facts, user: 'alice' }, snapshot({ ban })).action, 'tempfail');
  assert.deepEqual(rules.decide({ ...facts, user: 'alice' }, snapshot()), { action: 'allow' });
});

test('login: rules see the identity; sessions per user and messages per window refuse with their codes', () => {
  const facts = { stage: 'login' as const, clientIp: '192.0.2.1', tls: true, groups: new Set<string>(), authenticated: true };
  assert.deepEqual(rules.decide({ ...facts, listener: imaps, identity: 'alice' }, snapshot()), { action: 'allow' });
  assert.deepEqual(rules.decide({ ...facts, listener: imaps, identity: 'Bob' }, snapshot()), { action: 'tempfail', code: 'access-tempfail', text: 'Try again later' });
  assert.deepEqual(rules.decide({ ...facts, listener: imaps, identity: 'alice' }, snapshot({ loggedIn: 2 })), { action: 'tempfail', code: 'concurrent-user', text: 'Too many sessions for this user' });
  const messages = rules.messageLimits('smtps')[0]!;
  const full = snapshot({ counts: { [blockKey(messages, 'alice')]: { count: 5, resetMs: 1_000 } } });
  assert.deepEqual(rules.decide({ ...facts, listener: smtps, identity: 'Alice' }, full), { action: 'tempfail', code: 'message-rate', text: 'Message limit reached, try again later', retryAfterMs: 1_000 });
  assert.equal(rules.decide({ ...facts, listener: imaps, identity: 'alice' }, full).action, 'allow', 'message limits count SMTP listeners only');
});

test('isRuleReason tells a rule\'s own reason from the fixed texts (SMTP AUTH shows only the former)', () => {
  const login = { stage: 'login' as const, clientIp: '192.0.2.1', tls: true, groups: new Set<string>(), authenticated: true, listener: imaps };
  const own = rules.decide({ stage: 'connect', listener: imaps, clientIp: '203.0.113.5' }, snapshot());
  assert.equal(own.action !== 'allow' && isRuleReason(own), true, 'a rule with a reason');
  const plain = rules.decide({ ...login, identity: 'bob' }, snapshot());
  assert.equal(plain.action !== 'allow' && isRuleReason(plain), false, 'a rule without one says a fixed text');
  const limit = rules.decide({ ...login, identity: 'alice' }, snapshot({ loggedIn: 2 }));
  assert.equal(limit.action !== 'allow' && isRuleReason(limit), false, 'a limit is not a rule');
});

test('request: a ban and a reached request limit', () => {
  const c = configFrom('rate_limits:\n  - { limit: http_requests, per: address, max: 10, window: 10s }\n');
  const r = new PolicyRules(c);
  const https = listenerOf(c, 'https');
  const limit = r.requestLimits('https')[0]!;
  assert.deepEqual(r.decide({ stage: 'request', listener: https, clientIp: '192.0.2.1' }, snapshot({ blocked: { [blockKey(limit, '192.0.2.1')]: NOW + 10_000 } })), {
    action: 'tempfail',
    code: 'request-rate',
    text: 'Too many requests',
    retryAfterMs: 10_000,
  });
  assert.equal(r.decide({ stage: 'request', listener: https, clientIp: '192.0.2.1' }, snapshot({ ban })).action, 'tempfail');
});

test('a ban set by hand shows its reason as one short printable line; an empty one falls back to the fixed text', () => {
  const said = (reason: string) => rules.decide({ stage: 'connect', listener: imaps, clientIp: '192.0.2.1' }, snapshot({ ban: { ...ban, reason } }));
  assert.equal(said('Spam from your network, write to abuse@example.org').action, 'tempfail');
  assert.equal((said('Spam from your network, write to abuse@example.org') as { text: string }).text, 'Spam from your network, write to abuse@example.org');
  assert.equal((said('evil\r\n* OK [ALERT] injected\r\na1 OK done') as { text: string }).text, 'evil * OK [ALERT] injected a1 OK done', 'no line break reaches the client');
  assert.equal((said('Gesperrt f\u00fcr Spam \u2013 bitte melden\u0007\u001b[31m') as { text: string }).text, 'Gesperrt fur Spam bitte melden [31m', 'accents dropped, other non-ASCII and control characters gone');
  const long = (said('x'.repeat(500)) as { text: string }).text;
  assert.equal(long.length, MAX_CLIENT_REASON);
  assert.ok(long.endsWith('...'));
  assert.equal((said('\u0000\u0001 \u200b') as { text: string }).text, 'Too many failed logins, try again later');
});
