/** The policy examples in README.md and the shipped config are valid configuration, and do what they say. */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { loadConfigFile } from '../../../src/config/load.ts';
import { cheapScrypt, configFrom, connect, engineFor, login } from './helpers.ts';

const ROOT = join(import.meta.dirname, '../../..');

function readmeExamples(): string[] {
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
  const start = readme.indexOf('Three common setups:');
  assert.ok(start > 0, 'README has the policy examples');
  const block = /```yaml\n([\s\S]*?)```/.exec(readme.slice(start))?.[1];
  assert.ok(block);
  return block.split(/\n(?=# \d\. )/).map((s) => s.replace(/"\$scrypt\$ln=15,r=8,p=3\$…"/g, JSON.stringify(cheapScrypt('x'))));
}

test('each README policy example is a valid configuration', () => {
  const examples = readmeExamples();
  assert.equal(examples.length, 3);
  for (const e of examples) assert.doesNotThrow(() => configFrom(e), e.split('\n')[0]);
});

test('README example 1: the relay refuses strangers before the greeting, submission needs a login', async () => {
  const config = configFrom(readmeExamples()[0] ?? '');
  const { engine } = await engineFor(config);
  assert.equal(engine.onConnect(connect(config, 'relay', '203.0.113.9')).action, 'deny');
  assert.equal(engine.onConnect(connect(config, 'relay', '192.0.2.10')).action, 'allow');
  const sub = connect(config, 'submission', '203.0.113.9');
  assert.equal((await engine.onAuth(login(sub, null), null)).action, 'deny');
});

test('the shipped config enables brute-force protection and per-address limits, and submission never relays without a login', async () => {
  const config = loadConfigFile(join(ROOT, 'config/mailgate.yaml'));
  assert.equal(config.brute_force.enabled, true);
  assert.ok(config.rate_limits.some((l) => l.limit === 'connections' && l.per === 'address'));
  assert.ok(config.rate_limits.some((l) => l.limit === 'concurrent' && l.per === 'address'));
  const { engine } = await engineFor(config);
  for (const name of ['smtps', 'submission']) {
    const l = config.listeners.find((x) => x.name === name);
    assert.ok(l && l.protocol === 'smtp' && l.auth === 'required', `${name} requires AUTH`);
    const c = { listener: l, clientIp: '203.0.113.5', tls: true, now: Date.now(), session: `doc-${name}` };
    assert.equal(engine.onConnect(c).action, 'allow');
    assert.deepEqual(await engine.onAuth(login(c, null), null), { action: 'deny', code: 'access-denied', text: 'Authentication required' });
    engine.onDisconnect(c);
  }
});
