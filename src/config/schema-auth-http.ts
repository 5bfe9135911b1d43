/**
 * `auth_http`: the service that checks logins on listeners with
 * `authentication: http`, spoken to in nginx's auth_http protocol (see
 * src/policy/auth-http.ts and README.md "Coming from nginx mail").
 */
import { z } from 'zod';
import { duration as durationOf } from './schema-values.ts';

const duration = durationOf('500ms, 5s, 30s');

/** A header name and value as HTTP allows them; the value one printable line. */
const headerName = z.string().regex(/^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$/, 'not an HTTP header name');
const headerValue = z.string().max(1024).regex(/^[\x20-\x7e]*$/, 'printable ASCII on one line');

export const authHttpSchema = z.strictObject({
  /** nginx `auth_http`: where each login is asked about (http:// or https://). */
  url: z
    .string()
    .max(2048)
    .refine((v) => {
      try {
        const u = new URL(v);
        return (u.protocol === 'http:' || u.protocol === 'https:') && u.username === '' && u.password === '';
      } catch {
        // Not a URL: the refinement's message says so.
        return false;
      }
    }, 'an http:// or https:// URL without user:password'),
  /** nginx `auth_http_timeout` (its default is 60s): a slower answer is the protocol's temporary failure. */
  timeout: duration.refine((ms) => ms >= 100 && ms <= 120_000, 'between 100ms and 2m').default(5_000),
  /** nginx `auth_http_header`: extra request headers (a shared secret the service checks). */
  headers: z.record(headerName, headerValue).default({}),
  /** Keep-alive connections to the service per process (the pool). */
  max_connections: z.number().int().min(1).max(256).default(8),
  /** Refusals ("Invalid login or password") remembered per user, password and client address, so a client that repeats a wrong password does not reach the service again. */
  negative_cache: z
    .strictObject({
      /** Entries kept per process; 0 turns the cache off. */
      size: z.number().int().min(0).max(1_000_000).default(10_000),
      ttl: duration.refine((ms) => ms >= 1000 && ms <= 3_600_000, 'between 1s and 1h').default(30_000),
    })
    .prefault({}),
});

export type AuthHttpSettings = z.output<typeof authHttpSchema>;
