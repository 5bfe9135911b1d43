/**
 * The HTTP router (src/http/router.ts) and the well-known registry
 * (src/http/well-known.ts): the order ACME challenge → well-known endpoints →
 * redirect → policy → proxy, on a stub connection (no sockets).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { httpListener } from '../../helpers/adapters.ts';
import type { HttpConnection, HttpListener } from '../../../src/http/connection.ts';
import { Router, type LocalAnswer, type Route } from '../../../src/http/router.ts';
import { hostName, WellKnownRegistry } from '../../../src/http/well-known.ts';
import type { Verdict } from '../../../src/policy/engine.ts';

function settings(overrides: Partial<HttpListener> = {}): HttpListener {
  return httpListener(overrides);
}

/** The part of HttpConnection the router reads: settings, tls, the connection verdict and the per-request one. */
function conn(s: HttpListener, verdict: Verdict = { action: 'allow' }, perRequest?: Verdict): HttpConnection & { asked: string[] } {
  const asked: string[] = [];
  const c = {
    settings: s,
    tls: s.tls === 'implicit',
    verdict,
    asked,
    requestVerdict: (method: string, path: string) => {
      asked.push(`${method} ${path}`);
      return perRequest;
    },
  };
  return c as unknown as HttpConnection & { asked: string[] };
}

function answer(r: Route): LocalAnswer {
  assert.equal(r.kind, 'answer', 'a local answer');
  return (r as { kind: 'answer'; answer: LocalAnswer }).answer;
}

test('order: ACME challenge, then well-known endpoints, then redirect, then policy, then proxy', () => {
  const tokens = new Map([['tok-1', 'tok-1.thumb']]);
  const wellKnown = new WellKnownRegistry();
  wellKnown.register({ path: '/.well-known/mta-sts.txt', methods: ['GET'], handle: () => ({ status: 200, body: 'version: STSv1\n' }) });
  const router = new Router({ hostname: 'gw.example', acmeHttp01: (t) => tokens.get(t), wellKnown });
  const denied: Verdict = { action: 'deny', code: 'access-denied', text: 'blocked' };
  const redirecting = conn(settings({ redirect_https: true }), denied);
  const get = (target: string, c = redirecting) => router.route({ method: 'GET', target, host: 'mail.example:80' }, c);

  assert.deepEqual(answer(get('/.well-known/acme-challenge/tok-1')), { status: 200, body: 'tok-1.thumb' }, 'before redirect and policy');
  assert.equal(answer(get('/.well-known/acme-challenge/other')).status, 404, 'an unknown token on a redirect listener');
  assert.equal(answer(get('/.well-known/mta-sts.txt?x=1')).body, 'version: STSv1\n', 'well-known before redirect and policy');
  const redirect = answer(get('/a?b=1'));
  assert.equal(redirect.status, 301);
  assert.equal(redirect.headers?.Location, 'https://mail.example/a?b=1');
  assert.equal(answer(router.route({ method: 'POST', target: '/f', host: undefined }, redirecting)).status, 308);

  const https = conn(settings({ tls: 'implicit' }), denied);
  assert.equal(router.route({ method: 'GET', target: '/.well-known/acme-challenge/tok-1', host: 'h' }, https).kind, 'answer', 'policy answers on TLS');
  assert.deepEqual(answer(router.route({ method: 'GET', target: '/.well-known/acme-challenge/tok-1', host: 'h' }, https)).close, 'policy-denied', 'no HTTP-01 on TLS');
  const tempfail = conn(settings({ tls: 'implicit' }), { action: 'tempfail', code: 'connection-rate', text: 'rate', retryAfterMs: 1500 });
  const t = answer(router.route({ method: 'GET', target: '/', host: 'h' }, tempfail));
  assert.equal(t.status, 429);
  assert.equal(t.headers?.['Retry-After'], 2);
  assert.equal(t.close, 'policy-tempfail');

  const allowed = conn(settings({ tls: 'implicit' }), { action: 'allow' }, { action: 'tempfail', code: 'request-rate', text: 'window', retryAfterMs: 30_000 });
  const limited = answer(router.route({ method: 'GET', target: '/p?secret=1', host: 'h' }, allowed));
  assert.equal(limited.status, 429);
  assert.equal(limited.close, undefined, 'a per-request limit keeps the connection');
  assert.deepEqual(allowed.asked, ['GET /p'], 'the per-request policy sees the path without its query');
  const proxied = conn(settings(), { action: 'allow' });
  assert.deepEqual(router.route({ method: 'GET', target: '/.well-known/acme-challenge/unknown', host: 'h' }, proxied), { kind: 'proxy' }, 'unknown tokens go to the backend on a proxying listener');
  assert.deepEqual(router.route({ method: 'POST', target: '/.well-known/mta-sts.txt', host: 'h' }, proxied), { kind: 'proxy' }, 'other methods go on');
});

test('the well-known registry: exact paths and prefixes, one handler per path, undefined lets the request go on', () => {
  const r = new WellKnownRegistry();
  r.register({ path: '/.well-known/autoconfig/', methods: ['GET'], handle: (req) => (req.target.includes('mail') ? { status: 200, body: 'xml' } : undefined) });
  assert.throws(() => r.register({ path: '/.well-known/autoconfig/', methods: ['GET'], handle: () => undefined }), /already registered/);
  assert.equal(r.size, 1);
  assert.ok(r.match('/.well-known/autoconfig/mail/config-v1.1.xml', 'GET'));
  assert.equal(r.match('/.well-known/autoconfig/mail/config-v1.1.xml', 'PUT'), undefined);
  assert.equal(r.match('/.well-known/other', 'GET'), undefined);
  const router = new Router({ hostname: 'gw', acmeHttp01: () => undefined, wellKnown: r });
  const c = conn(settings({ tls: 'implicit' }));
  assert.equal(answer(router.route({ method: 'GET', target: '/.well-known/autoconfig/mail/config-v1.1.xml', host: 'h' }, c)).body, 'xml');
  assert.deepEqual(router.route({ method: 'GET', target: '/.well-known/autoconfig/x', host: 'h' }, c), { kind: 'proxy' });
});

test('the registry matches on Host (port, case and a trailing dot ignored), TLS and, when asked, a path without case', () => {
  const r = new WellKnownRegistry();
  r.register({ path: '/mail/config-v1.1.xml', methods: ['GET'], hosts: ['autoconfig.example.org'], tlsOnly: true, handle: () => ({ status: 200, body: 'tb' }) });
  r.register({ path: '/mail/config-v1.1.xml', methods: ['GET'], hosts: ['autoconfig.example.net'], handle: () => ({ status: 200, body: 'net' }) });
  assert.throws(() => r.register({ path: '/mail/config-v1.1.xml', methods: ['GET'], handle: () => undefined }), /already registered/, 'every host overlaps');
  r.register({ path: '/Autodiscover/Autodiscover.xml', caseInsensitive: true, methods: ['POST'], handle: () => ({ read: 10, respond: () => ({ status: 200, body: 'ad' }) }) });
  assert.equal(r.match('/mail/config-v1.1.xml', 'GET', 'AutoConfig.Example.org.:8443')?.hosts?.[0], 'autoconfig.example.org');
  assert.equal(r.match('/mail/config-v1.1.xml', 'GET', 'autoconfig.example.org', false), undefined, 'TLS only');
  assert.equal(r.match('/mail/config-v1.1.xml', 'GET', 'autoconfig.example.net', false)?.hosts?.[0], 'autoconfig.example.net');
  assert.equal(r.match('/mail/config-v1.1.xml', 'GET', 'mail.example.org'), undefined, 'another host');
  assert.equal(r.match('/mail/config-v1.1.xml', 'GET', undefined), undefined, 'no Host');
  assert.ok(r.match('/autodiscover/autodiscover.xml', 'POST', '[::1]:443'));
  assert.equal(hostName('[2001:db8::1]:443'), '2001:db8::1');
  assert.equal(hostName('Mail.Example.org.'), 'mail.example.org');

  const next = new WellKnownRegistry();
  r.replaceWith(next);
  assert.equal(r.size, 0, 'a reload swaps the handlers in place');
});

test('an endpoint that reads the body is routed after the policy; one that answers at once before it', () => {
  const wellKnown = new WellKnownRegistry();
  wellKnown.register({ path: '/intake', methods: ['POST'], handle: () => ({ read: 100, respond: (b) => ({ status: 200, body: `got ${b.length}` }) }) });
  wellKnown.register({ path: '/.well-known/mta-sts.txt', methods: ['GET'], handle: () => ({ status: 200, body: 'policy' }) });
  const router = new Router({ hostname: 'gw', acmeHttp01: () => undefined, wellKnown });
  const denied = conn(settings({ tls: 'implicit' }), { action: 'deny', code: 'access-denied', text: 'no' });
  assert.equal(answer(router.route({ method: 'POST', target: '/intake', host: 'h' }, denied)).status, 403, 'a denied client gets no body read');
  assert.equal(answer(router.route({ method: 'GET', target: '/.well-known/mta-sts.txt', host: 'h' }, denied)).body, 'policy');
  const limited = conn(settings({ tls: 'implicit' }), { action: 'allow' }, { action: 'tempfail', code: 'request-rate', text: 'w', retryAfterMs: 1000 });
  assert.equal(answer(router.route({ method: 'POST', target: '/intake', host: 'h' }, limited)).status, 429, 'requests per window count here too');
  const ok = conn(settings({ tls: 'implicit' }));
  const route = router.route({ method: 'POST', target: '/intake?x', host: 'h' }, ok);
  assert.equal(route.kind, 'read');
  if (route.kind === 'read') {
    assert.equal(route.limit, 100);
    assert.equal(route.respond(Buffer.from('abc')).body, 'got 3');
  }
});
