/**
 * Fuzz: SMTP before the backend session (the adapter, fed through the real
 * LineReader, BDAT chunks read as raw bytes the way the driver reads them)
 * and after it (the relay, between a hostile client and a model of a backend
 * that takes a bare LF for a line end, as Postfix 3.7 does).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { DEFAULT_LIMITS } from '../../../src/config/schema.ts';
import { SmtpRelay } from '../../../src/protocols/smtp-relay.ts';
import { smtpProtocol } from '../../../src/protocols/smtp.ts';
import type { RelayHost, RelayUnit } from '../../../src/protocols/types.ts';
import { facts, listener } from '../../helpers/adapters.ts';
import { assertCleanCredentials, count, crlfLines, cutsArb, drive, nastyBytes, params, split } from './helpers.ts';
import { smtpStream as stream } from './streams.ts';

const SMALL = { ...DEFAULT_LIMITS, max_line: 512, max_literal: 300, max_sasl: 200, max_preauth_commands: 25, max_auth_attempts: 3 };

const POSTFIX = ['PIPELINING', 'SIZE 10240000', 'ETRN', 'AUTH PLAIN LOGIN', 'XCLIENT NAME ADDR PROTO HELO LOGIN', 'ENHANCEDSTATUSCODES', '8BITMIME', 'DSN', 'CHUNKING', 'STARTTLS'];

type Mode = 'submission' | 'mx';

function check(input: Buffer, cuts: number[], tls: boolean, mode: Mode, limits: typeof SMALL): void {
  const l = listener('smtp', { tls: tls ? 'implicit' : 'starttls', auth: mode === 'mx' ? 'none' : 'required', limits });
  const f = facts(l, tls);
  const mails: string[] = [];
  const r = drive(smtpProtocol, f, { capabilities: POSTFIX, at: 0 }, split(input, cuts), {
    tlsUp: () => f.setTls(true),
    loginAnswer: (a, credentials) => {
      const state = (a as unknown as { state: { s: string; pending?: { cmd: string; line?: string } } }).state;
      if (credentials === null && state.pending?.cmd === 'MAIL') mails.push(state.pending.line ?? '');
      return a.loginRefusal('denied');
    },
  });
  assert.ok(r.maxBuffered <= limits.max_line + limits.max_literal, `the line reader held ${r.maxBuffered} bytes`);
  assert.equal(r.silent, 0, 'every command line gets an answer');
  for (const s of r.steps) if (s.kind === 'literal') assert.ok(s.size <= limits.max_literal, `a BDAT chunk of ${s.size} bytes is read before login`);
  const lines = crlfLines(r.out);
  for (const line of lines) assert.match(line, /^[2-5]\d\d[ -]/, `not an SMTP reply line: ${JSON.stringify(line)}`);
  // A multi-line reply never ends on a continuation line.
  if (lines.length > 0) assert.match(lines.at(-1)!, /^\d{3} /);
  for (const c of r.logins) assertCleanCredentials(c);
  if (mode === 'submission') assert.ok(r.logins.every((c) => c !== null), 'a submission listener never opens a backend session without AUTH');
  if (mode === 'submission' && !tls) assert.ok(r.logins.length === 0 || f.tls(), 'no AUTH before STARTTLS on a require_tls listener');
  for (const m of mails) {
    assert.match(m, /^MAIL FROM:/i, 'only a MAIL FROM line opens an MX session');
    assert.doesNotMatch(m, /[\0\r\n]/, `the replayed MAIL line is clean: ${JSON.stringify(m)}`);
  }
}

test('fuzz: SMTP submission command streams incl. BDAT, split at random offsets', () => {
  fc.assert(
    fc.property(stream, cutsArb, fc.boolean(), (input, cuts, tls) => {
      count('smtp');
      check(input, cuts, tls, 'submission', SMALL);
    }),
    params(400),
  );
});

test('fuzz: SMTP MX (auth none) command streams', () => {
  fc.assert(
    fc.property(stream, cutsArb, fc.boolean(), (input, cuts, tls) => {
      count('smtp');
      check(input, cuts, tls, 'mx', SMALL);
    }),
    params(300),
  );
});

// ---- the relay after login ------------------------------------------------------------

/**
 * The reference model: a backend that reads the way Postfix 3.7 does with
 * smtpd_forbid_bare_newline = no. A bare LF ends a line (so <LF>.<LF> ends
 * DATA), a NUL ends a command (C strings), words are split at any blank, and
 * BDAT chunks are read by size. It answers every command, and counts what it
 * would act on: every RCPT it reads, every message it queues, every
 * gateway-only command that reached it, and every bare CR or LF it read (in
 * a line, or in a message's chunks taken together: a CRLF may span two).
 */
class LenientBackend {
  messages = 0;
  recipients = 0;
  readonly forbidden: string[] = [];
  readonly bare: string[] = [];
  /** Replies not yet delivered to the relay. */
  out = '';
  done = false;
  private partial = '';
  private mode: 'command' | 'data' | 'chunk' = 'command';
  private chunkLeft = 0;
  private chunkLast = false;
  /** The last byte of the message's chunks so far (-1: none). */
  private chunkTail = -1;

  feed(data: Buffer): void {
    let i = 0;
    while (i < data.length && !this.done) {
      if (this.mode === 'chunk') {
        const take = Math.min(this.chunkLeft, data.length - i);
        for (let k = i; k < i + take; k++) {
          const byte = data[k]!;
          if (this.chunkTail === 0x0d && byte !== 0x0a) this.bare.push('CR in a chunk');
          if (byte === 0x0a && this.chunkTail !== 0x0d) this.bare.push('LF in a chunk');
          this.chunkTail = byte;
        }
        i += take;
        this.chunkLeft -= take;
        if (this.chunkLeft === 0) this.chunkDone();
        continue;
      }
      const lf = data.indexOf(0x0a, i);
      if (lf < 0) {
        this.partial += data.toString('latin1', i);
        return;
      }
      const raw = this.partial + data.toString('latin1', i, lf);
      this.partial = '';
      i = lf + 1;
      if (!raw.endsWith('\r')) this.bare.push(`LF after ${JSON.stringify(raw.slice(-20))}`);
      if (raw.slice(0, -1).includes('\r')) this.bare.push(`CR in ${JSON.stringify(raw.slice(0, 40))}`);
      this.line(raw.replace(/\r$/, ''));
    }
  }

  private line(line: string): void {
    if (this.mode === 'data') {
      if (line === '.') {
        this.mode = 'command';
        this.messages++;
        this.out += '250 2.0.0 Ok: queued\r\n';
      }
      return;
    }
    // C's isspace() in Postfix (ASCII only: String.prototype.trim() would also take 0xA0).
    const words = (line.split('\0')[0] ?? '').replace(/^[ \t\v\f]+|[ \t\v\f]+$/g, '').split(/[ \t\v\f]+/);
    const verb = (words[0] ?? '').toUpperCase();
    switch (verb) {
      case 'EHLO':
        this.out += '250-mx.model\r\n250-PIPELINING\r\n250-AUTH PLAIN\r\n250-XCLIENT ADDR NAME\r\n250-XFORWARD ADDR\r\n250-BINARYMIME\r\n250 CHUNKING\r\n';
        return;
      case 'RCPT':
        this.recipients++;
        this.out += '250 2.1.5 Ok\r\n';
        return;
      case 'DATA':
        this.mode = 'data';
        this.out += '354 go\r\n';
        return;
      case 'BDAT': {
        if (!/^\d{1,15}$/.test(words[1] ?? '') || (words[2] !== undefined && words[2].toUpperCase() !== 'LAST') || words.length > 3) {
          this.out += '521 5.5.4 Syntax: BDAT count [LAST]\r\n';
          this.done = true;
          return;
        }
        this.chunkLeft = Number(words[1]);
        this.chunkLast = words[2] !== undefined;
        this.mode = 'chunk';
        if (this.chunkLeft === 0) this.chunkDone();
        return;
      }
      case 'XCLIENT':
      case 'XFORWARD':
      case 'AUTH':
      case 'STARTTLS':
        this.forbidden.push(line);
        this.out += '250 2.0.0 Ok\r\n';
        return;
      case 'QUIT':
        this.out += '221 2.0.0 Bye\r\n';
        this.done = true;
        return;
      default:
        this.out += '250 2.0.0 Ok\r\n';
    }
  }

  private chunkDone(): void {
    this.mode = 'command';
    if (this.chunkLast) {
      if (this.chunkTail === 0x0d) this.bare.push('CR at the end of a message');
      this.chunkTail = -1;
      this.messages++;
    }
    this.out += '250 2.0.0 Ok\r\n';
  }
}

/** Clean CRLF lines, as message content or a chunk's. */
const cleanLines = fc.array(fc.constantFrom('Subject: x', 'hello', '..dot', '.', '', 'RCPT TO:<in@content>', 'DATA', 'XCLIENT ADDR=1.1.1.1', '\xe9t\xe9'), { maxLength: 4 }).map((l) => l.map((x) => `${x}\r\n`).join(''));

const clientSeg = fc.oneof(
  {
    weight: 12,
    arbitrary: fc.constantFrom(
      'MAIL FROM:<a@x>\r\n',
      'RCPT TO:<b@x>\r\n',
      'rcpt to:<c@x>\r\n',
      'DATA\r\n',
      'RSET\r\n',
      'EHLO x\r\n',
      'NOOP\r\n',
      'QUIT\r\n',
      '.\r\n',
      '\r\n.\r\n',
      'BDAT 5 LAST\r\n',
      'BDAT 0 LAST\r\n',
      'bdat 3\r\n',
      'BDAT 99999999999999999999\r\n',
      'XCLIENT ADDR=6.6.6.6\r\n',
      ' xforward addr=7.7.7.7\r\n',
      'AUTH PLAIN AGEAYg==\r\n',
      'STARTTLS\r\n',
    ),
  },
  { weight: 6, arbitrary: cleanLines },
  // BDAT with its chunk; a chunk may end in the CR whose LF opens the next one.
  { weight: 4, arbitrary: fc.tuple(cleanLines, fc.boolean(), fc.boolean()).map(([body, last, cut]) => {
    const chunk = cut && body.endsWith('\r\n') ? body.slice(0, -1) : body;
    return `BDAT ${chunk.length}${last && !cut ? ' LAST' : ''}\r\n${chunk}${cut ? `BDAT 1${last ? ' LAST' : ''}\r\n\n` : ''}`;
  }) },
  // What smuggling is made of: end-of-data lines and transactions behind bare CR and LF, and commands
  // that Postfix reads differently from a plain parser (NUL ends a line, VT and FF separate words).
  { weight: 2, arbitrary: fc.constantFrom('\n.\n', '\n.\r\n', '\r\n.\n', '\r.\r', '\r\n.\r', '\n', '\r', 'x\nMAIL FROM:<s@x>\nRCPT TO:<t@x>\nDATA\n', 'NOOP\nRCPT TO:<u@x>\r\n', '\0XCLIENT ADDR=1.1.1.1\r\n', 'NOOP\0RCPT TO:<v@x>\r\n', '\vXFORWARD ADDR=1.2.3.6\r\n', 'XCLIENT\fADDR=1.2.3.7\r\n', 'RCPT\vTO:<w@x>\r\n') },
  { weight: 1, arbitrary: nastyBytes(120).map((b) => b.toString('latin1')) },
  { weight: 1, arbitrary: fc.nat(9000).map((n) => `${'x'.repeat(n)}\r\n`) },
);

test('fuzz: the SMTP relay counts what a lenient backend queues, passes no bare CR/LF and no gateway-only command, and answers in reply lines', () => {
  fc.assert(
    fc.property(
      fc.array(clientSeg, { maxLength: 30 }),
      fc.array(fc.integer({ min: 1, max: 64 }), { minLength: 1, maxLength: 8 }),
      fc.boolean(),
      (segs, sizes, waits) => {
        count('smtp-relay');
        const backend = new LenientBackend();
        const units: Record<RelayUnit, number> = { recipient: 0, message: 0 };
        const verdicts: RelayUnit[] = [];
        let client = '';
        let closed = false;
        const host: RelayHost = {
          toBackend: (d) => {
            assert.equal(closed, false, 'nothing goes to the backend after close');
            backend.feed(d);
          },
          toClient: (d) => void (client += typeof d === 'string' ? d : d.toString('latin1')),
          count: (unit) => {
            units[unit]++;
            if (!waits) return 'go';
            verdicts.push(unit);
            return 'wait';
          },
          refused: () => undefined,
          closing: () => undefined,
          close: () => void (closed = true),
        };
        const relay = new SmtpRelay(host, { hostname: 'gw.test', authenticated: true, tls: true, chunking: true, limitWords: (r) => `421 4.3.0 gw.test ${r}\r\n` });
        const peek = relay as unknown as { heldBytes: number; partsLen: number };
        /** Lets the backend's replies (and the verdicts) in, in pieces, until nothing moves. */
        const settle = () => {
          for (let k = 0; backend.out.length > 0 || verdicts.length > 0; k++) {
            if (verdicts.length > 0 && (k % 2 === 0 || backend.out.length === 0)) {
              relay.verdict(verdicts.shift()!, { ok: true });
              continue;
            }
            const n = sizes[k % sizes.length]!;
            const piece = backend.out.slice(0, n);
            backend.out = backend.out.slice(n);
            relay.fromBackend(Buffer.from(piece, 'latin1'));
          }
        };
        let k = 0;
        for (const seg of segs) {
          const data = Buffer.from(seg, 'latin1');
          // The driver ends the session when either side does.
          for (let i = 0; i < data.length && !closed && !backend.done; ) {
            const n = sizes[k++ % sizes.length]!;
            relay.fromClient(data.subarray(i, i + n));
            assert.ok(peek.heldBytes <= 1024 * 1024 && peek.partsLen <= 4096, `the relay holds ${peek.heldBytes} + ${peek.partsLen} bytes`);
            if (k % 3 === 0) settle();
            i += n;
          }
        }
        settle();
        assert.equal(units.message, backend.messages, 'the relay counted every message the backend queued, and no other');
        // A RCPT the client pipelined behind QUIT is counted as it goes, and never read by the backend that hung up.
        if (backend.done) assert.ok(units.recipient >= backend.recipients, `the relay counted ${units.recipient} recipients, the backend read ${backend.recipients}`);
        else assert.equal(units.recipient, backend.recipients, 'the relay counted every recipient the backend read');
        assert.deepEqual(backend.forbidden, [], 'no gateway-only command reached the backend');
        assert.deepEqual(backend.bare, [], 'no bare CR or LF reached the backend');
        for (const line of client.split('\r\n').slice(0, -1)) assert.match(line, /^\d{3}[ -]/, `not a reply line: ${JSON.stringify(line)}`);
        assert.doesNotMatch(client, /^250[ -](XCLIENT|XFORWARD|AUTH|STARTTLS|BINARYMIME)\b/m, 'a gateway-only keyword reached the client');
      },
    ),
    params(300),
  );
});

test('the relay keeps up with a megabyte of message content in small chunks (no quadratic rescans)', () => {
  const sent: Buffer[] = [];
  let messages = 0;
  const host: RelayHost = {
    toBackend: (d) => void sent.push(d),
    toClient: () => undefined,
    count: (u) => {
      if (u === 'message') messages++;
      return 'go';
    },
    refused: () => undefined,
    closing: () => undefined,
    close: () => assert.fail('closed'),
  };
  const relay = new SmtpRelay(host, { hostname: 'gw.test', authenticated: true, tls: true, chunking: true, limitWords: () => '' });
  relay.fromClient(Buffer.from('DATA\r\n'));
  relay.fromBackend(Buffer.from('354 go\r\n'));
  const line = Buffer.from(`${'y'.repeat(70)}\r\n`);
  const started = process.hrtime.bigint();
  for (let i = 0; i < 15_000; i++) {
    relay.fromClient(line.subarray(0, 30));
    relay.fromClient(line.subarray(30, 71)); // ends in the CR: it waits for its LF
    relay.fromClient(line.subarray(71));
  }
  relay.fromClient(Buffer.from('.\r\n'));
  relay.fromBackend(Buffer.from('250 ok\r\n'));
  const ms = Number(process.hrtime.bigint() - started) / 1e6;
  assert.equal(messages, 1);
  assert.equal(relay.atBoundary(), true);
  assert.equal(Buffer.concat(sent).length, 'DATA\r\n'.length + 15_000 * line.length + 3);
  assert.ok(ms < 2_000, `1 MB in 45,000 pieces took ${ms.toFixed(0)} ms`);
});
