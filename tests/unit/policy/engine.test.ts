import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { ConfigError } from '../../../src/core/errors.ts';
import { cheapScrypt, configFrom, connect, creds, engineFor, login } from './helpers.ts';

const ALICE = cheapScrypt('alice-pw');
const BOB = cheapScrypt('bob-pw');

const LOCAL_LISTENERS = `
listeners:
  - { name: imaps, protocol: imap, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:143", authentication: local }
  - { name: pop3s, protocol: pop3, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:110", authentication: local }
  - { name: smtps, protocol: smtp, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:25", authentication: local, backend_login: none }
  - { name: imap-pass, protocol: imap, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:143" }
  - { name: mx, protocol: smtp, listen: "127.0.0.1:0", tls: none, auth: none, backend: "10.0.0.1:25" }
  - { name: https, protocol: http, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:80" }
`;

const USERS = `
users:
  list:
    - { name: alice@example.org, password_hash: "${ALICE}", groups: [staff] }
    - { name: bob@new.example.org, password_hash: "${BOB}" }
  groups:
    migrated: ["carol@example.org"]
`;

test('passthrough: everyone connects, credentials go to the listener backend unchanged', async () => {
  const config = configFrom('brute_force: { enabled: false }');
  const { engine } = await engineFor(config);
  const c = connect(config, 'imaps', '192.0.2.1');
  assert.deepEqual(engine.onConnect(c), { action: 'allow' });
  const cr = creds('anyone', 'whatever');
  assert.deepEqual(await engine.onAuth(login(c, cr), cr), { action: 'allow', backend: { host: '10.0.0.1', port: 143 }, credentials: cr });
});

test('local: the right password logs in and is replayed; a wrong one or an unknown user gets the same refusal', async () => {
  const config = configFrom(USERS + LOCAL_LISTENERS);
  const { engine } = await engineFor(config);
  const c = connect(config, 'imaps', '192.0.2.1');
  const ok = creds('Alice@Example.org', 'alice-pw');
  assert.deepEqual(await engine.onAuth(login(c, ok), ok), { action: 'allow', backend: { host: '10.0.0.1', port: 143 }, credentials: ok });
  const wrong = creds('alice@example.org', 'nope');
  const unknown = creds('mallory@example.org', 'alice-pw');
  const a = await engine.onAuth(login(c, wrong), wrong);
  const b = await engine.onAuth(login(c, unknown), unknown);
  assert.deepEqual(a, { action: 'deny', code: 'bad-login', text: 'Authentication failed' });
  assert.deepEqual(b, a);
});

test('local SMTP with backend_login none: the backend gets no credentials (a relay without AUTH)', async () => {
  const config = configFrom(USERS + LOCAL_LISTENERS);
  const { engine } = await engineFor(config);
  const c = connect(config, 'smtps', '192.0.2.1');
  const ok = creds('alice@example.org', 'alice-pw');
  assert.deepEqual(await engine.onAuth(login(c, ok), ok), { action: 'allow', backend: { host: '10.0.0.1', port: 25 }, credentials: null });
});

test('local: a PLAIN authorization id for another user is refused', async () => {
  const config = configFrom(USERS + LOCAL_LISTENERS);
  const { engine } = await engineFor(config);
  const c = connect(config, 'imaps', '192.0.2.1');
  const asBob = creds('alice@example.org', 'alice-pw', { authzid: 'bob@new.example.org' });
  assert.equal((await engine.onAuth(login(c, asBob), asBob)).action, 'deny');
  const asSelf = creds('alice@example.org', 'alice-pw', { authzid: 'ALICE@example.org' });
  assert.equal((await engine.onAuth(login(c, asSelf), asSelf)).action, 'allow');
});

test('routes: by user, group and domain, first match wins; a host keeps the listener port; master login from a file', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'mailgate-routes-'));
  try {
    writeFileSync(join(dir, 'master.secret'), 'm4ster\n');
    const config = configFrom(
      `${USERS}
routes:
  - { users: ["alice@example.org"], groups: [staff], host: 10.0.0.9, backend_login: { user: "{user}*mailgate", password_file: master.secret } }
  - { domains: [new.example.org], host: new-mail.internal }
  - { groups: [migrated], listeners: [imap-pass], backend: "10.0.0.7:1143" }
${LOCAL_LISTENERS}`,
      join(dir, 'mailgate.yaml'),
    );
    const { engine } = await engineFor(config);
    const imaps = connect(config, 'imaps', '192.0.2.1');
    const pop3s = connect(config, 'pop3s', '192.0.2.1');
    const alice = creds('ALICE@example.org', 'alice-pw');
    assert.deepEqual(await engine.onAuth(login(imaps, alice), alice), {
      action: 'allow',
      backend: { host: '10.0.0.9', port: 143 },
      credentials: { user: 'alice@example.org*mailgate', password: 'm4ster', mechanism: 'PLAIN' },
    });
    assert.deepEqual(await engine.onAuth(login(pop3s, alice), alice), {
      action: 'allow',
      backend: { host: '10.0.0.9', port: 110 },
      credentials: { user: 'alice@example.org*mailgate', password: 'm4ster', mechanism: 'PLAIN' },
    });
    const bob = creds('bob@new.example.org', 'bob-pw');
    assert.deepEqual(await engine.onAuth(login(imaps, bob), bob), { action: 'allow', backend: { host: 'new-mail.internal', port: 143 }, credentials: bob });
    // Passthrough listener: group from a pattern, route limited to this listener.
    const pass = connect(config, 'imap-pass', '192.0.2.1');
    const carol = creds('carol@example.org', 'whatever');
    assert.deepEqual(await engine.onAuth(login(pass, carol), carol), { action: 'allow', backend: { host: '10.0.0.7', port: 1143 }, credentials: carol });
    const dave = creds('dave@example.org', 'x');
    assert.deepEqual(await engine.onAuth(login(pass, dave), dave), { action: 'allow', backend: { host: '10.0.0.1', port: 143 }, credentials: dave });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a missing backend password file fails the build (start or reload), not a login', async () => {
  const config = configFrom(`
listeners:
  - { name: imaps, protocol: imap, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:143", authentication: local, backend_login: { user: master, password_file: /nonexistent/master.secret } }
`);
  await assert.rejects(engineFor(config), (e: unknown) => e instanceof Error && 'code' in e && e.code === 'CONFIG_READ');
});

test('schema: routes need a target and a selector; backend_login none only for SMTP; limits need sensible keys', () => {
  const problems = (yaml: string) => {
    try {
      configFrom(yaml);
    } catch (e) {
      if (e instanceof ConfigError) return e.problems.map((p) => `${p.path}: ${p.message}`);
      throw e;
    }
    return [];
  };
  assert.match(problems('routes:\n  - { users: [a] }\n').join('\n'), /routes\[0\]: give either host or backend/);
  assert.match(problems('routes:\n  - { host: x.example }\n').join('\n'), /routes\[0\]: a route needs users, groups or domains/);
  assert.match(problems('routes:\n  - { users: [a], host: x, backend_login: none }\n').join('\n'), /routes\[0\]\.backend_login: backend_login: none works for SMTP only/);
  assert.match(problems('rate_limits:\n  - { limit: connections, per: user, max: 3, window: 1m }\n').join('\n'), /rate_limits\[0\]\.per: connections can be counted per address or listener/);
  assert.match(problems('rate_limits:\n  - { limit: connections, per: address, max: 3 }\n').join('\n'), /rate_limits\[0\]\.window: is required/);
  assert.match(problems('rate_limits:\n  - { limit: concurrent, per: address, max: 3, window: 1m }\n').join('\n'), /concurrent sessions have no window/);
  assert.match(problems('rate_limits:\n  - { limit: messages, per: user, max: 3, window: 1500ms }\n').join('\n'), /whole number of seconds/);
  assert.match(problems('access:\n  rules:\n    - { action: deny, addresses: [10.0.0.0/33] }\n').join('\n'), /access\.rules\[0\]\.addresses\[0\]: .*prefix/);
  assert.match(problems('policy_store: { type: redis }\n').join('\n'), /policy_store\.url: is required/);
  assert.deepEqual(problems(`
listeners:
  - { name: imaps, protocol: imap, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:143", backend_login: none }
`).length, 1);
});

test('access rules: an address rule refuses at connect, a user rule at login, SMTP without AUTH is "not authenticated"', async () => {
  const config = configFrom(`${USERS}
access:
  default: allow
  rules:
    - { action: deny, addresses: [203.0.113.0/24], reason: "Your network is blocked" }
    - { action: tempfail, users: ["bob@*"] }
    - { action: allow, listeners: [mx], addresses: [10.0.0.0/8] }
    - { action: deny, listeners: [mx], authenticated: false }
    - { action: deny, protocols: [http], addresses: ["::ffff:198.51.100.0/120"] }
${LOCAL_LISTENERS}`);
  const { engine } = await engineFor(config);
  assert.deepEqual(engine.onConnect(connect(config, 'imaps', '203.0.113.5')), { action: 'deny', code: 'access-denied', text: 'Your network is blocked' });
  const c = connect(config, 'imaps', '192.0.2.1');
  assert.deepEqual(engine.onConnect(c), { action: 'allow' });
  const bob = creds('bob@new.example.org', 'bob-pw');
  assert.deepEqual(await engine.onAuth(login(c, bob), bob), { action: 'tempfail', code: 'access-tempfail', text: 'Try again later' });
  // The MX listener: a relay client from inside is allowed, from outside refused at its first transaction.
  const inside = connect(config, 'mx', '10.1.2.3');
  assert.equal(engine.onConnect(inside).action, 'allow');
  assert.equal((await engine.onAuth(login(inside, null), null)).action, 'allow');
  const outside = connect(config, 'mx', '192.0.2.1');
  assert.equal(engine.onConnect(outside).action, 'allow', 'the relay rule needs the login phase');
  assert.deepEqual(await engine.onAuth(login(outside, null), null), { action: 'deny', code: 'access-denied', text: 'Access denied' });
  // HTTP has no login, so every rule is decided at connect; IPv4-mapped ranges match plain IPv4 clients.
  assert.deepEqual(engine.onConnect(connect(config, 'https', '198.51.100.77')), { action: 'deny', code: 'access-denied', text: 'Access denied' });
});
