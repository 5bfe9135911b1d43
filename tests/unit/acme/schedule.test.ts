import assert from 'node:assert/strict';
import { test } from 'node:test';
import { backoffDelay, criticalAt, fallbackRenewAt } from '../../../src/acme/schedule.ts';

const DAY = 86_400_000;
const t0 = Date.parse('2025-03-01T00:00:00Z');
const validity = (days: number) => ({ notBefore: new Date(t0), notAfter: new Date(t0 + days * DAY) });

test('without ARI: renew with a third of the lifetime left, half for certificates under 10 days', () => {
  assert.equal(fallbackRenewAt(validity(90)).getTime(), t0 + 60 * DAY);
  assert.equal(fallbackRenewAt(validity(45)).getTime(), t0 + 30 * DAY);
  assert.equal(fallbackRenewAt(validity(6)).getTime(), t0 + 3 * DAY, "Let's Encrypt shortlived: 3 days before expiry");
  assert.equal(fallbackRenewAt(validity(10)).getTime(), t0 + (10 * DAY * 2) / 3);
});

test('expiry is "approaching" with half of the renewal window left', () => {
  assert.equal(criticalAt(validity(90)).getTime(), t0 + 75 * DAY);
  assert.equal(criticalAt(validity(6)).getTime(), t0 + 4.5 * DAY);
});

test('backoff doubles from retry_min to retry_max with equal jitter, never below half nor above the nominal wait', () => {
  const s = { minMs: 60_000, maxMs: 6 * 3_600_000 };
  const expected = [60_000, 120_000, 240_000, 480_000, 960_000, 1_920_000, 3_840_000, 7_680_000, 15_360_000, 21_600_000, 21_600_000];
  expected.forEach((nominal, i) => {
    assert.equal(backoffDelay(i + 1, s, { random: () => 0 }), nominal / 2, `failure ${i + 1}: lower bound`);
    assert.equal(backoffDelay(i + 1, s, { random: () => 1 }), nominal, `failure ${i + 1}: upper bound`);
  });
  assert.equal(backoffDelay(1000, s, { random: () => 1 }), s.maxMs, 'no overflow after many failures');
});

test('backoff is capped at a tenth of the lifetime, and a Retry-After from the CA is a floor', () => {
  const s = { minMs: 60_000, maxMs: 6 * 3_600_000 };
  assert.equal(backoffDelay(20, s, { lifetimeMs: 2 * DAY, random: () => 1 }), (2 * DAY) / 10, 'a 2-day certificate retries at least every 4.8 h');
  assert.equal(backoffDelay(20, s, { lifetimeMs: 90 * DAY, random: () => 1 }), s.maxMs, 'a 90-day one every retry_max');
  assert.equal(backoffDelay(20, s, { lifetimeMs: 30_000, random: () => 1 }), 60_000, 'never below retry_min');
  assert.equal(backoffDelay(1, s, { retryAfterMs: 3_600_000, random: () => 0 }), 3_600_000);
});
