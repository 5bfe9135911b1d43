import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { parseConfig } from '../../../src/config/load.ts';
import { ConfigError } from '../../../src/core/errors.ts';

const ok = `
listeners:
  - name: imaps
    protocol: imap
    listen: ["127.0.0.1:993", "[::1]:993"]
    tls: implicit
    backend: 127.0.0.1:143
    timeouts: { preauth_idle: 30s }
`;

function problems(text: string) {
  try {
    parseConfig(text, '/etc/mailgate/test.yaml');
  } catch (err) {
    assert.ok(err instanceof ConfigError, `expected a ConfigError, got ${String(err)}`);
    assert.equal(err.code, 'CONFIG_INVALID');
    return err.problems;
  }
  assert.fail('expected the config to be refused');
}

test('a valid config gets defaults merged per listener and is frozen', () => {
  const c = parseConfig(ok, '/etc/mailgate/test.yaml');
  const l = c.listeners[0]!;
  assert.equal(l.timeouts.preauth_idle, 30_000);
  assert.equal(l.timeouts.backend_connect, 5_000);
  assert.deepEqual(l.listen, [{ host: '127.0.0.1', port: 993 }, { host: '::1', port: 993 }]);
  assert.equal(c.tls.dir, '/etc/certs');
  assert.ok(Object.isFrozen(l.timeouts));
  assert.throws(() => {
    (l as { name: string }).name = 'x';
  });
});

test('workers: auto by default, a number from 1 to 64; worker_timeout at least 1s; each mistake named where it is', () => {
  const c = parseConfig(ok, '/etc/mailgate/test.yaml');
  assert.equal(c.workers, 'auto');
  assert.equal(c.worker_timeout, 30_000);
  const set = parseConfig(`workers: 3\nworker_timeout: 5s\n${ok}`, '/etc/mailgate/test.yaml');
  assert.equal(set.workers, 3);
  assert.equal(set.worker_timeout, 5_000);
  const p = problems(`workers: 0\nworker_timeout: 500ms\n${ok}`);
  const byPath = Object.fromEntries(p.map((x) => [x.path, x]));
  assert.equal(byPath.workers?.line, 1);
  assert.equal(byPath.worker_timeout?.line, 2);
  assert.match(byPath.worker_timeout?.message ?? '', /at least 1s/);
  assert.ok(problems(`workers: many\n${ok}`).some((x) => x.path === 'workers'));
});

test('an unknown key names file, line, column and key path', () => {
  const p = problems(ok.replace('    tls: implicit', '    tls: implicit\n    colour: blue'));
  assert.deepEqual(p, [{ file: '/etc/mailgate/test.yaml', line: 7, column: 5, path: 'listeners[0].colour', message: 'unknown key "colour"' }]);
});

test('wrong types, bad addresses, bad durations and bad enums are each reported where they are', () => {
  const p = problems(`
listeners:
  - name: imaps
    protocol: imap
    listen: "[::1:993"
    tls: sometimes
    backend: 127.0.0.1:99999
    timeouts: { preauth_idle: soon }
`);
  const byPath = Object.fromEntries(p.map((x) => [x.path, x]));
  assert.equal(byPath['listeners[0].listen[0]']?.line, 5);
  assert.match(byPath['listeners[0].listen[0]']!.message, /IPv6/);
  assert.equal(byPath['listeners[0].tls']?.line, 6);
  assert.match(byPath['listeners[0].backend']!.message, /out of range/);
  assert.equal(byPath['listeners[0].timeouts.preauth_idle']?.line, 8);
});

test('a missing required key points at its parent, YAML syntax errors at their line', () => {
  const p = problems('listeners:\n  - name: x\n    protocol: pop3\n    tls: none\n    listen: "127.0.0.1:110"\n');
  assert.deepEqual(p.map((x) => [x.path, x.message, x.line]), [['listeners[0].backend', 'is required', 2]]);
  const s = problems('listeners: [\n  - a: b\n');
  assert.ok(s[0]!.line >= 1);
});

test('duplicate listener names and addresses are refused; an SMTP listener that could be an open relay is warned about', () => {
  const twice = `${ok}  - name: imaps\n    protocol: imap\n    listen: "127.0.0.1:993"\n    tls: implicit\n    backend: 127.0.0.1:143\n`;
  const p = problems(twice);
  assert.ok(p.some((x) => /duplicate listener name/.test(x.message)));
  assert.ok(p.some((x) => /already used by listener "imaps"/.test(x.message)));
  const relay = parseConfig(
    'listeners:\n  - name: mx\n    protocol: smtp\n    listen: "127.0.0.1:25"\n    tls: starttls\n    backend: 127.0.0.1:2525\n    auth: none\n    xclient: false\n',
    'x.yaml',
  );
  assert.match(relay.warnings[0]!, /open relay/);
});

test('the shipped config/mailgate.yaml is valid and has the documented listeners', () => {
  const file = new URL('../../../config/mailgate.yaml', import.meta.url).pathname;
  const c = parseConfig(readFileSync(file, 'utf8'), file);
  const summary = c.listeners.map((l) => [l.name, l.protocol, l.tls, l.listen[0]!.port, l.backend.port]);
  assert.deepEqual(summary, [
    ['imaps', 'imap', 'implicit', 993, 143],
    ['pop3s', 'pop3', 'implicit', 995, 110],
    ['smtps', 'smtp', 'implicit', 465, 25],
    ['submission', 'smtp', 'starttls', 587, 25],
    ['https', 'http', 'implicit', 443, 80],
  ]);
  assert.deepEqual(c.warnings, []);
});

test('HTTP listeners: http2 on, 100 streams and a 60s response deadline by default; each key checked where it is', () => {
  const web = `
listeners:
  - name: https
    protocol: http
    listen: 127.0.0.1:443
    tls: implicit
    backend: 127.0.0.1:80
`;
  const l = parseConfig(web, '/etc/mailgate/test.yaml').listeners[0]!;
  assert.equal(l.protocol, 'http');
  if (l.protocol !== 'http') return;
  assert.equal(l.http2, true);
  assert.equal(l.http2_max_streams, 100);
  assert.equal(l.response_timeout, 60_000);
  const set = parseConfig(`${web}    http2: false\n    http2_max_streams: 20\n    response_timeout: 90s\n`, '/etc/mailgate/test.yaml').listeners[0]!;
  assert.ok(set.protocol === 'http' && !set.http2 && set.http2_max_streams === 20 && set.response_timeout === 90_000);
  const p = problems(`${web}    http2: sometimes\n    http2_max_streams: 0\n    response_timeout: 10ms\n`);
  const byPath = Object.fromEntries(p.map((x) => [x.path, x]));
  assert.equal(byPath['listeners[0].http2']?.line, 8);
  assert.equal(byPath['listeners[0].http2_max_streams']?.line, 9);
  assert.match(byPath['listeners[0].response_timeout']?.message ?? '', /at least 100ms/);
  assert.ok(problems(web.replace('protocol: http', 'protocol: imap') + '    response_timeout: 60s\n').some((x) => x.path === 'listeners[0].response_timeout'), 'an HTTP key on a mail listener is unknown');
});

test('the commented examples in config/mailgate.yaml (the MX listener, discovery, reuse_key) are valid once uncommented', () => {
  const file = new URL('../../../config/mailgate.yaml', import.meta.url).pathname;
  const text = readFileSync(file, 'utf8');
  // The blocks as an admin would switch them on: "# " removed from the commented listener, section and ACME keys.
  const on = text
    .replace(/^ {2}# (- name: mx\n(?: {2}# {3}.*\n)+)/m, (_m, block: string) => `  ${block.replace(/^ {2}# /gm, '  ')}`)
    .replace(/^# (discovery:\n(?:# .*\n)+)/m, (_m, block: string) => block.replace(/^# ?/gm, ''))
    .replace(/^# (acme:\n(?:# .*\n)+)/m, (_m, block: string) => block.replace(/^# ?/gm, '').replace(/^ {2}# (reuse_key|key_rollover)/gm, '  $1'));
  assert.notEqual(on, text);
  const c = parseConfig(on, file);
  const mx = c.listeners.find((l) => l.name === 'mx');
  assert.ok(mx && mx.protocol === 'smtp');
  assert.deepEqual([mx.tls, mx.auth, mx.greet_delay, mx.xclient, mx.listen[0]!.port], ['starttls', 'none', 3000, true, 25]);
  assert.deepEqual(c.discovery?.domains, ['example.org']);
  assert.equal(c.discovery?.mta_sts?.mode, 'testing');
  assert.equal(c.acme?.reuse_key, true);
  assert.equal(c.acme?.key_rollover, 365 * 86_400_000);
});

test('trust_forwarded: a list of proxy ranges; false is none; true is refused with file, line and what to write instead', () => {
  const http = (value: string) => `
listeners:
  - name: https
    protocol: http
    listen: 127.0.0.1:443
    tls: implicit
    backend: 127.0.0.1:80
    trust_forwarded: ${value}
`;
  const list = parseConfig(http('[192.0.2.10/32, "2001:db8::/48"]'), '/etc/mailgate/test.yaml').listeners[0]!;
  assert.deepEqual(list.protocol === 'http' && list.trust_forwarded.map((c) => c.text), ['192.0.2.10/32', '2001:db8::/48']);
  const none = parseConfig(http('false'), '/etc/mailgate/test.yaml').listeners[0]!;
  assert.deepEqual(none.protocol === 'http' && none.trust_forwarded, []);
  const [p] = problems(http('true'));
  assert.equal(p?.path, 'listeners[0].trust_forwarded');
  assert.equal(p?.line, 8);
  assert.match(p?.message ?? '', /no longer accepted.*any client.*trust_forwarded: \[192\.0\.2\.10\/32\]/);
  assert.equal(problems(http('[10.0.0.300/8]'))[0]?.path, 'listeners[0].trust_forwarded[0]');
});

test('accept_proxy_from takes address ranges and timeouts.proxy_header a duration (5s by default); mistakes are named where they are', () => {
  const base = `
listeners:
  - name: imaps
    protocol: imap
    listen: 127.0.0.1:993
    tls: implicit
    backend: 127.0.0.1:143
`;
  const c = parseConfig(`${base}    accept_proxy_from: [127.0.0.1, 10.0.0.0/8]\n    timeouts: { proxy_header: 2s }\n`, '/etc/mailgate/test.yaml');
  const l = c.listeners[0]!;
  assert.deepEqual(l.accept_proxy_from?.map((x) => x.text), ['127.0.0.1', '10.0.0.0/8']);
  assert.equal(l.timeouts.proxy_header, 2000);
  assert.equal(parseConfig(base, '/etc/mailgate/test.yaml').listeners[0]!.timeouts.proxy_header, 5000);
  const [p] = problems(`${base}    accept_proxy_from: [10.0.0.0/33]\n`);
  assert.equal(p?.path, 'listeners[0].accept_proxy_from[0]');
  assert.equal(p?.line, 8);
});

test('a mail listener\'s backend may be a pool (a list): the first is its backend; each bad member is named; HTTP listeners take one', () => {
  const base = (backend: string, protocol = 'imap') => `
listeners:
  - name: l
    protocol: ${protocol}
    listen: 127.0.0.1:993
    tls: implicit
    backend: ${backend}
    health_check: { interval: 2s }
`;
  const l = parseConfig(base('["127.0.0.1:1143", "127.0.0.2:1143"]'), '/x.yaml').listeners[0]!;
  assert.deepEqual([l.backend, l.pool?.length, l.protocol !== 'http' && l.health_check?.interval], [{ host: '127.0.0.1', port: 1143 }, 2, 2000]);
  const [p] = problems(base('["127.0.0.1:1143", "127.0.0.2:99999"]'));
  assert.deepEqual([p?.path, p?.line], ['listeners[0].backend[1]', 7]);
  assert.match(p?.message ?? '', /out of range/);
  assert.match(problems(base('[]'))[0]?.message ?? '', /1 to 32 backends/);
  assert.ok(problems(base('["127.0.0.1:80", "127.0.0.2:80"]', 'http')).some((x) => x.path.startsWith('listeners[0].backend')));
});
