/**
 * Parallel guesses (issue 17, defect 5): 40 connections from one address
 * each send one wrong LOGIN at the same moment, through the real daemon to a
 * real Dovecot that, like a production one, delays its answer to a wrong
 * password (auth_failure_delay). No more guesses than the per address+user
 * threshold may reach Dovecot (counted in Dovecot's own log), and the
 * guesses in flight take none of the victim's `concurrent per user` slots:
 * the real user logs in from another address meanwhile. Once in one process
 * (memory store), once with two workers (the primary's state).
 * tests/e2e/policy-redis.test.ts does the same across two gateways sharing Redis.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { checksAt, storm, summary } from './policy-helpers.ts';
import { startGateway, type Gateway } from './harness/gateway.ts';
import { startDovecot, userByName, type Dovecot } from './harness/servers.ts';

const dave = userByName('dave');
const carol = userByName('carol');
const PAIR_FAILURES = 5;
let dovecot: Dovecot;

before(async () => {
  dovecot = await startDovecot({ authFailureDelay: '2 secs' });
});

after(async () => {
  await dovecot?.stop();
});

function gatewayFor(workers: number): Promise<Gateway> {
  return startGateway({
    workers,
    listeners: [
      { name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` },
      { name: 'imaps-limited', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` },
    ],
    extra: {
      brute_force: {
        per_address: { failures: 10, window: '15m', ban: '1h' },
        per_address_user: { failures: PAIR_FAILURES, window: '15m', ban: '15m' },
        per_user: { failures: 30, window: '1h', ban: '1h' },
      },
      // A small per-user limit on the second listener only: the first shows the race to Dovecot without it.
      rate_limits: [{ limit: 'concurrent', per: 'user', max: 2, listeners: ['imaps-limited'] }],
    },
  });
}

for (const workers of [1, 2]) {
  const label = workers === 1 ? 'one process' : 'two workers';
  test(`40 parallel wrong LOGINs from one address (${label}): at most ${PAIR_FAILURES} reach Dovecot; the victim still logs in from elsewhere`, { timeout: 120_000 }, async () => {
    const gw = await gatewayFor(workers);
    try {
      const source = `127.0.0.${40 + workers}`;
      const r = await storm([gw.ports.imaps!], 40, 'dave', source, { user: dave.name, password: dave.password, source: `127.0.0.${50 + workers}` });
      const checked = await checksAt(dovecot, 'dave', source);
      assert.ok(checked >= 1, 'the first guesses did reach Dovecot');
      assert.ok(checked <= PAIR_FAILURES, `Dovecot checked ${checked} passwords for dave from ${source} (threshold ${PAIR_FAILURES}); answers: ${summary(r.answers)}`);
      assert.equal(r.answers.filter((a) => /AUTHENTICATIONFAILED/.test(a)).length, checked, 'each check Dovecot made is a failure the client saw');
      assert.ok(r.answers.every((a) => /AUTHENTICATIONFAILED|UNAVAILABLE/.test(a)), `every guess was refused: ${summary(r.answers)}`);
      assert.equal(r.victim.ok, true, r.victim.error);
      const after = await storm([gw.ports.imaps!], 1, 'dave', source, { user: dave.name, password: dave.password, source: `127.0.0.${50 + workers}` });
      assert.match(after.answers[0] ?? '', /Too many failed logins/, 'the failures that did reach Dovecot banned dave from that address');

      // With `concurrent per user: 2`, the guesses in flight take none of carol's slots.
      const limited = await storm([gw.ports['imaps-limited']!], 40, 'carol', `127.0.0.${60 + workers}`, { user: carol.name, password: carol.password, source: `127.0.0.${70 + workers}` });
      assert.equal(limited.victim.ok, true, `the real carol logs in from another address while the guesses are in flight: ${limited.victim.error ?? ''}`);
      assert.ok((await checksAt(dovecot, 'carol', `127.0.0.${60 + workers}`)) <= PAIR_FAILURES);
    } finally {
      await gw.stop();
    }
  });
}
