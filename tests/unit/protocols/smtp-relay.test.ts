import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { rewriteEhlo, SmtpRelay, type SmtpRelayOptions } from '../../../src/protocols/smtp-relay.ts';
import type { CloseReason, RelayHost, RelayUnit } from '../../../src/protocols/types.ts';

/**
 * A driver stand-in: records what the relay sends each way, answers count() with 'go' or 'wait'.
 * Not a RelayHost itself (its `closing` field keeps what closing() was told): `tally` wires one to it.
 */
class Host {
  readonly backendChunks: Buffer[] = [];
  client = '';
  readonly counts: RelayUnit[] = [];
  readonly wait = new Set<RelayUnit>();
  readonly refusals: string[] = [];
  closing: [CloseReason, string] | undefined;
  closed: [CloseReason, string] | undefined;

  toBackend(data: Buffer): void {
    assert.equal(this.closed, undefined, 'nothing reaches the backend after close');
    this.backendChunks.push(data);
  }
  toClient(data: Buffer | string): void {
    assert.equal(this.closed, undefined, 'nothing reaches the client after close');
    this.client += typeof data === 'string' ? data : data.toString('latin1');
  }
  count(unit: RelayUnit): 'go' | 'wait' {
    this.counts.push(unit);
    return this.wait.has(unit) ? 'wait' : 'go';
  }
  refused(what: string): void {
    this.refusals.push(what);
  }
  closingWith(reason: CloseReason, words: string): void {
    this.closing = [reason, words];
  }
  close(reason: CloseReason, words: string): void {
    assert.equal(this.closed, undefined, 'closed once');
    this.closed = [reason, words];
  }
  get backend(): string {
    return Buffer.concat(this.backendChunks).toString('latin1');
  }
  counted(unit: RelayUnit): number {
    return this.counts.filter((u) => u === unit).length;
  }
}

interface Tally {
  host: Host;
  relay: SmtpRelay;
}

function tally(opts: Partial<SmtpRelayOptions> = {}): Tally {
  const host = new Host();
  const face: RelayHost = {
    toBackend: (d) => host.toBackend(d),
    toClient: (d) => host.toClient(d),
    count: (u) => host.count(u),
    refused: (w) => host.refused(w),
    closing: (r, w) => host.closingWith(r, w),
    close: (r, w) => host.close(r, w),
  };
  const relay = new SmtpRelay(face, {
    hostname: 'gw.example.org',
    authenticated: true,
    tls: true,
    chunking: true,
    limitWords: (reason) => `421 4.3.0 gw.example.org ${reason}\r\n`,
    ...opts,
  });
  return { host, relay };
}

type Side = 'client' | 'backend';
interface Segment {
  side: Side;
  data: Buffer;
}

const c = (s: string): Segment => ({ side: 'client', data: Buffer.from(s, 'latin1') });
const b = (s: string): Segment => ({ side: 'backend', data: Buffer.from(s, 'latin1') });

/** Feeds segments in order, each cut into chunks of the given sizes (cycled), checking no chunk is modified. */
function feed(t: Tally, segments: Segment[], sizes: readonly number[] = [Number.MAX_SAFE_INTEGER]): void {
  let k = 0;
  for (const seg of segments) {
    for (let i = 0; i < seg.data.length; ) {
      const size = Math.max(1, sizes[k++ % sizes.length]!);
      const chunk = seg.data.subarray(i, i + size);
      const before = Buffer.from(chunk);
      if (seg.side === 'client') t.relay.fromClient(chunk);
      else t.relay.fromBackend(chunk);
      assert.ok(chunk.equals(before), 'the relay must not change a chunk');
      i += size;
    }
  }
}

/** Feeds segments with segment `index` cut in two at `at`. */
function feedCut(t: Tally, segments: Segment[], index: number, at: number): void {
  segments.forEach((seg, i) => {
    const parts = i === index ? [seg.data.subarray(0, at), seg.data.subarray(at)] : [seg.data];
    for (const p of parts) {
      if (seg.side === 'client') t.relay.fromClient(p);
      else t.relay.fromBackend(p);
    }
  });
}

/** The reply lines of a string, for readable failures. */
const lines = (s: string) => s.split(/(?<=\n)/);

const POSTFIX_EHLO =
  '250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-AUTH PLAIN LOGIN\r\n250-XCLIENT NAME ADDR PROTO HELO LOGIN\r\n' +
  '250-XFORWARD NAME ADDR PROTO HELO\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-STARTTLS\r\n250 CHUNKING\r\n';
const POSTFIX_EHLO_SEEN = '250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 CHUNKING\r\n';

describe('SMTP relay: forwarding and counting', () => {
  it('forwards a pipelined MAIL/RCPT/RCPT/DATA and its message byte-exact, counting two recipients and one accepted message', () => {
    const t = tally();
    const client = 'MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n';
    const content = 'Subject: hi\r\n\r\nRCPT TO:<not@counted>\r\nBDAT 100000 LAST\r\n..stuffed\r\n.\r\n';
    const replies = '250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n';
    feed(t, [c(client), b(replies), c(content)]);
    assert.equal(t.host.counted('message'), 0, 'a message counts once the backend accepted it');
    feed(t, [b('250 2.0.0 Ok: queued as 4Xyz\r\n')]);
    assert.equal(t.host.backend, client + content);
    assert.equal(t.host.client, `${replies}250 2.0.0 Ok: queued as 4Xyz\r\n`);
    assert.deepEqual(t.host.counts, ['recipient', 'recipient', 'message']);
    assert.equal(t.relay.atBoundary(), true);
  });

  it('does not count a message the backend refused, nor enter content mode when DATA is refused', () => {
    const t = tally();
    feed(t, [
      c('MAIL FROM:<a@example.com>\r\nRCPT TO:<nobody@example.com>\r\nDATA\r\n'),
      b('250 2.1.0 Ok\r\n550 5.1.1 <nobody@example.com>: Recipient address rejected\r\n554 5.5.1 Error: no valid recipients\r\n'),
      c('RSET\r\nRCPT TO:<x@example.com>\r\n'),
      b('250 2.0.0 Ok\r\n503 5.5.1 Error: need MAIL command\r\n'),
      c('MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n'),
      b('250 Ok\r\n250 Ok\r\n354 go\r\n'),
      c('spam\r\n.\r\n'),
      b('554 5.7.1 Rejected: spam\r\n'),
    ]);
    assert.deepEqual(t.host.counts, ['recipient', 'recipient', 'recipient'], 'RCPT lines count whether accepted or not; the refused message does not');
    assert.equal(t.relay.atBoundary(), true);
  });

  it('forwards BDAT chunks by size, whatever lines they hold, and counts the message at the answer to LAST', () => {
    const t = tally();
    const chunk1 = 'line one\r\n.\r\nRCPT TO:<x@y>\r\nXCLIENT ADDR=1.2.3.4\r\n';
    const chunk2 = '\r\n.\r\nDATA\r\n';
    const client = `MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nBDAT ${chunk1.length}\r\n${chunk1}BDAT ${chunk2.length} LAST\r\n${chunk2}`;
    feed(t, [c(client), b('250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: 27 octets received\r\n250 2.0.0 Ok: queued as 4Abc\r\n'), c('QUIT\r\n'), b('221 2.0.0 Bye\r\n')]);
    assert.equal(t.host.backend, `${client}QUIT\r\n`);
    assert.deepEqual(t.host.counts, ['recipient', 'message']);
    assert.deepEqual(t.host.refusals, [], 'inside a chunk nothing is a command');
  });

  it('counts an empty BDAT 0 LAST as a message', () => {
    const t = tally();
    feed(t, [c('MAIL FROM:<>\r\nRCPT TO:<b@x>\r\nbdat 0 last\r\n'), b('250 Ok\r\n250 Ok\r\n250 Ok\r\n')]);
    assert.deepEqual(t.host.counts, ['recipient', 'message']);
  });

  it('does not end the message at a dot-stuffed line', () => {
    const t = tally();
    feed(t, [c('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n'), b('250 Ok\r\n250 Ok\r\n354 go\r\n'), c('..\r\n...\r\n.. \r\n..\r\nRCPT TO:<c@x>\r\n')]);
    assert.equal(t.relay.atBoundary(), false, 'still inside the message');
    feed(t, [c('.\r\n'), b('250 Ok\r\n')]);
    assert.deepEqual(t.host.counts, ['recipient', 'message']);
  });

  it('ends an empty message right after 354', () => {
    const t = tally();
    feed(t, [c('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n'), b('250 Ok\r\n250 Ok\r\n354 go\r\n'), c('.\r\n'), b('250 Ok\r\n')]);
    assert.deepEqual(t.host.counts, ['recipient', 'message']);
  });

  it('follows multi-line replies and replies ending in bare LF', () => {
    const t = tally();
    feed(t, [
      c('NOOP\r\n'),
      b('250-one\r\n250-two\r\n250 three\r\n'),
      c('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n'),
      b('250 Ok\n250-Ok\n250 Ok\n354\n'),
      c('body\r\n.\r\n'),
      b('250 Ok\r\n'),
    ]);
    assert.deepEqual(t.host.counts, ['recipient', 'message']);
    assert.equal(t.host.client, '250-one\r\n250-two\r\n250 three\r\n250 Ok\n250-Ok\n250 Ok\n354\n250 Ok\r\n');
  });

  it('holds what a client sends before the answer to DATA, and reads it as that answer says', () => {
    const early = tally();
    feed(early, [c('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nSubject: x\r\n\r\nRCPT TO:<no@x>\r\n.\r\n')]);
    assert.equal(early.host.backend, 'MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n', 'nothing after DATA goes before its answer');
    assert.equal(early.relay.holding(), true);
    feed(early, [b('250 Ok\r\n250 Ok\r\n354 go\r\n')]);
    assert.equal(early.relay.holding(), false);
    feed(early, [b('250 Ok\r\n')]);
    assert.deepEqual(early.host.counts, ['recipient', 'message']);
    assert.match(early.host.backend, /RCPT TO:<no@x>\r\n\.\r\n$/);

    const refused = tally();
    feed(refused, [c('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nRCPT TO:<c@x>\r\n'), b('250 Ok\r\n250 Ok\r\n554 no\r\n503 need MAIL\r\n')]);
    assert.deepEqual(refused.host.counts, ['recipient', 'recipient'], 'after a refused DATA the held line is a command');
    assert.equal(refused.host.client, '250 Ok\r\n250 Ok\r\n554 no\r\n503 need MAIL\r\n');
  });

  it('holds a flood sent before the answer to DATA (the driver pauses the client), and corrects nothing when DATA was refused', () => {
    const body = 'x'.repeat(70).concat('\r\n').repeat(80); // 5.7 KB
    const accepted = tally();
    feed(accepted, [c(`MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n${body}.\r\n`), b('250 Ok\r\n250 Ok\r\n354 go\r\n'), b('250 Ok\r\n'), c('RCPT TO:<c@x>\r\n')], [1500]);
    assert.deepEqual(accepted.host.counts, ['recipient', 'message', 'recipient']);

    const refused = tally();
    feed(refused, [c(`MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n${body}`), b('250 Ok\r\n250 Ok\r\n554 no valid recipients\r\n')], [1500]);
    // The held lines are commands after all: 80 of them went to the backend as such (as it would read them).
    assert.equal(refused.host.backend, `MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n${body}`);
    feed(refused, [b('502 5.5.2 Error: command not recognized\r\n'.repeat(80)), c('RSET\r\nRCPT TO:<c@x>\r\n')]);
    assert.deepEqual(refused.host.counts, ['recipient', 'recipient']);
    assert.equal(refused.relay.atBoundary(), true);
  });

  it('refuses a command line longer than 4 KiB with 500 and does not forward or count it', () => {
    const t = tally();
    const long = `RCPT TO:<${'x'.repeat(10_000)}@example.com>\r\n`;
    feed(t, [c(`MAIL FROM:<a@x>\r\n${long}RCPT TO:<b@x>\r\n`), b('250 Ok\r\n250 Ok\r\n')], [1000]);
    assert.equal(t.host.backend, 'MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n');
    assert.deepEqual(t.host.counts, ['recipient']);
    assert.equal(t.host.client, '250 Ok\r\n500 5.5.6 Error: line too long\r\n250 Ok\r\n');
    assert.equal(t.relay.atBoundary(), true);
  });

  it('is at a boundary only between whole commands and replies, outside message content', () => {
    const t = tally();
    assert.equal(t.relay.atBoundary(), true);
    t.relay.fromClient(Buffer.from('MAIL FROM:<a@x>\r\nRCPT TO:<b'));
    assert.equal(t.relay.atBoundary(), false, 'partial command line');
    t.relay.fromClient(Buffer.from('@x>\r\nDATA\r\n'));
    assert.equal(t.relay.atBoundary(), false, 'waiting for the answer to DATA');
    t.relay.fromBackend(Buffer.from('250 Ok\r\n250-Ok'));
    assert.equal(t.relay.atBoundary(), false, 'inside a reply');
    t.relay.fromBackend(Buffer.from('\r\n250 Ok\r\n354 go\r\n'));
    assert.equal(t.relay.atBoundary(), false, 'inside message content');
    t.relay.fromClient(Buffer.from('hello\r\n.\r\n'));
    assert.equal(t.relay.atBoundary(), true);
    t.relay.fromClient(Buffer.from('BDAT 10\r\n12345'));
    assert.equal(t.relay.atBoundary(), false, 'inside a BDAT chunk');
    t.relay.fromClient(Buffer.from('67890'));
    assert.equal(t.relay.atBoundary(), true);
  });

  it('forwards message content as the very buffers that arrived, and scans 100 MiB quickly', () => {
    const t = tally();
    feed(t, [c('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n'), b('250 Ok\r\n250 Ok\r\n354 go\r\n')]);
    const chunk = Buffer.alloc(64 * 1024, 'abcdefghij\r\n..stuffed\r\n');
    const sent = t.host.backendChunks.length;
    const started = process.hrtime.bigint();
    for (let i = 0; i < 1600; i++) t.relay.fromClient(chunk); // 100 MiB
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    t.relay.fromClient(Buffer.from('\r\n.\r\n'));
    t.relay.fromBackend(Buffer.from('250 Ok\r\n'));
    assert.deepEqual(t.host.counts, ['recipient', 'message']);
    const forwarded = t.host.backendChunks.slice(sent, sent + 1600);
    assert.ok(
      forwarded.every((f) => f === chunk),
      'each content chunk went on as the same Buffer (no copy, no slice)',
    );
    assert.ok(ms < 5_000, `100 MiB took ${ms.toFixed(0)} ms`);
  });
});

describe('SMTP relay: what only the gateway may say', () => {
  it('refuses XCLIENT, XFORWARD, AUTH and STARTTLS without forwarding them, each answer in its turn under PIPELINING', () => {
    const t = tally();
    t.relay.fromClient(Buffer.from('NOOP\r\nXCLIENT ADDR=6.6.6.6 LOGIN=ceo@example.org\r\nNOOP\r\nxforward addr=7.7.7.7\r\nAUTH PLAIN AGJvYgBwdw==\r\nSTARTTLS\r\nVRFY x\r\n'));
    assert.equal(t.host.backend, 'NOOP\r\nNOOP\r\nVRFY x\r\n');
    assert.equal(t.host.client, '', 'no answer of the relay overtakes the reply the backend owes for the first NOOP');
    t.relay.fromBackend(Buffer.from('250 2.0.0 Ok\r\n250 2.0.0'));
    assert.deepEqual(lines(t.host.client), ['250 2.0.0 Ok\r\n', '550 5.7.0 Error: insufficient authorization\r\n', '250 2.0.0']);
    t.relay.fromBackend(Buffer.from(' Ok\r\n252 2.0.0 x\r\n'));
    assert.deepEqual(lines(t.host.client), [
      '250 2.0.0 Ok\r\n',
      '550 5.7.0 Error: insufficient authorization\r\n',
      '250 2.0.0 Ok\r\n',
      '550 5.7.0 Error: insufficient authorization\r\n',
      '503 5.5.1 Error: already authenticated\r\n',
      '554 5.5.1 Error: TLS already active\r\n',
      '252 2.0.0 x\r\n',
    ]);
    assert.deepEqual(t.host.refusals, ['XCLIENT'], 'the first refusal is reported');
  });

  it('answers at once when no reply is owed, and reads the verb the way Postfix does (leading blanks, any case)', () => {
    const t = tally();
    t.relay.fromClient(Buffer.from(' \tXcLiEnT ADDR=6.6.6.6\r\nXFORWARD\tADDR=7.7.7.7\r\n'));
    assert.equal(t.host.backend, '');
    assert.equal(t.host.client, '550 5.7.0 Error: insufficient authorization\r\n'.repeat(2));
  });

  it('refuses command lines with control characters (Postfix ends a line at NUL and splits words at VT and FF)', () => {
    const t = tally();
    t.relay.fromClient(Buffer.from('\x0bXFORWARD ADDR=1.2.3.6\r\nXFORWARD\x0cADDR=1.2.3.8\r\nNOOP\0XFORWARD\r\nRCPT TO:<a@x>\x00\r\nNOOP\r\n'));
    assert.equal(t.host.backend, 'NOOP\r\n');
    assert.equal(t.host.client, '500 5.5.2 Error: bad character in command\r\n'.repeat(4));
    assert.deepEqual(t.host.counts, []);
  });

  it('words AUTH and STARTTLS for a session without login or TLS (an MX listener)', () => {
    const t = tally({ authenticated: false, tls: false });
    t.relay.fromClient(Buffer.from('AUTH PLAIN AGJvYgBwdw==\r\nSTARTTLS\r\n'));
    assert.equal(t.host.client, '503 5.5.1 Error: authentication not enabled\r\n502 5.5.1 Error: command not implemented\r\n');
    assert.equal(t.host.backend, '');
  });

  it('removes the gateway-only keywords from every EHLO reply and learns CHUNKING from it', () => {
    const t = tally({ chunking: false });
    feed(t, [c('EHLO client.example\r\n'), b(POSTFIX_EHLO)], [7]);
    assert.equal(t.host.client, POSTFIX_EHLO_SEEN);
    // CHUNKING was offered in that reply: BDAT goes to the backend now.
    feed(t, [c('BDAT 2 LAST\r\nhi')]);
    assert.equal(t.host.backend, 'EHLO client.example\r\nBDAT 2 LAST\r\nhi');
  });

  it('makes the line before a removed last line the last one', () => {
    assert.equal(rewriteEhlo(['250-mx.example', '250-PIPELINING', '250 XCLIENT ADDR NAME']), '250-mx.example\r\n250 PIPELINING\r\n');
    assert.equal(rewriteEhlo(['250-mx.example', '250-AUTH=PLAIN', '250-STARTTLS', '250 XFORWARD ADDR']), '250 mx.example\r\n');
    assert.equal(rewriteEhlo(['250-mx.example', '250-BINARYMIME', '250 auth plain login']), '250 mx.example\r\n');
    assert.equal(rewriteEhlo(['250 mx.example']), '250 mx.example\r\n');
    assert.equal(rewriteEhlo(['250-mx.example', '250-AUTHORITY', '250 XCLIENTS']), '250-mx.example\r\n250-AUTHORITY\r\n250 XCLIENTS\r\n', 'only whole keywords');
    assert.equal(rewriteEhlo(['501 5.5.4 Syntax: EHLO hostname']), '501 5.5.4 Syntax: EHLO hostname\r\n');
    const t = tally();
    feed(t, [c('EHLO x\r\n'), b('250-mx.example\r\n250-PIPELINING\r\n250 XCLIENT NAME ADDR\r\n')], [3]);
    assert.equal(t.host.client, '250-mx.example\r\n250 PIPELINING\r\n');
  });

  it('refuses BDAT without CHUNKING from the backend and drops its chunk, so that nothing in it is read as commands', () => {
    const t = tally({ chunking: false });
    const chunk = 'MAIL FROM:<x>\r\nRCPT TO:<y>\r\nDATA\r\nz\r\n.\r\n';
    feed(t, [c(`MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nBDAT ${chunk.length} LAST\r\n${chunk}NOOP\r\n`), b('250 Ok\r\n250 Ok\r\n250 Ok\r\n')], [5]);
    assert.equal(t.host.backend, 'MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nNOOP\r\n');
    assert.equal(t.host.client, '250 Ok\r\n250 Ok\r\n502 5.5.1 Error: command not implemented\r\n250 Ok\r\n');
    assert.deepEqual(t.host.counts, ['recipient']);
  });

  it('ends the session at a BDAT without a size, as Postfix does, after the replies owed', () => {
    const t = tally();
    t.relay.fromClient(Buffer.from('NOOP\r\nBDAT 99999999999999999999\r\nNOOP\r\n'));
    assert.equal(t.host.backend, 'NOOP\r\n');
    assert.deepEqual(t.host.closing, ['protocol-error', '521 5.5.4 Syntax: BDAT count [LAST]\r\n']);
    t.relay.fromBackend(Buffer.from('250 Ok\r\n'));
    assert.equal(t.host.client, '250 Ok\r\n');
    assert.deepEqual(t.host.closed, ['protocol-error', '521 5.5.4 Syntax: BDAT count [LAST]\r\n']);
  });
});

describe('SMTP relay: bare CR and LF (SMTP smuggling)', () => {
  const open = (t: Tally) => feed(t, [c('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n'), b('250 Ok\r\n250 Ok\r\n354 go\r\n')]);
  const prefix = 'MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n';
  const bareLf = ['521 5.5.2 gw.example.org Error: bare <LF> received\r\n'];

  it('refuses <LF>.<LF>, <LF>.<CR><LF> and <CR><LF>.<LF> in DATA with 521; no byte of the offending chunk goes on', () => {
    for (const body of ['hello\n.\nMAIL FROM:<x>\r\n', 'hello\n.\r\nMAIL FROM:<x>\r\n', 'hello\r\n.\nMAIL FROM:<x>\r\n', 'hello\r\n\n.\r\n']) {
      const t = tally();
      open(t);
      t.relay.fromClient(Buffer.from('clean line\r\n'));
      t.relay.fromClient(Buffer.from(`${body}.\r\n`));
      assert.deepEqual(t.host.closed, ['protocol-error', bareLf[0]], JSON.stringify(body));
      assert.equal(t.host.backend, `${prefix}clean line\r\n`, JSON.stringify(body));
      assert.deepEqual(t.host.counts, ['recipient']);
      assert.deepEqual(t.host.refusals, ['bare <LF> received']);
    }
  });

  it('refuses a bare CR in DATA, however the chunks fall, and never sends a CR whose next byte it has not seen', () => {
    for (const cut of ['abc\r|x', 'abc|\rx', '\r\n.\r|.', '\r\n.|\r|x', '\r|\r\n', '\r\r|\n']) {
      const t = tally();
      open(t);
      const parts = cut.split('|');
      for (const p of parts) t.relay.fromClient(Buffer.from(p));
      assert.deepEqual(t.host.closed, ['protocol-error', '521 5.5.2 gw.example.org Error: bare <CR> received\r\n'], cut);
      assert.doesNotMatch(t.host.backend.slice(prefix.length), /\r(?!\n)/, `${cut}: a bare CR reached the backend`);
    }
  });

  it('takes CRLF and CRLF.CRLF split at every byte', () => {
    const content = 'a\r\n.\r\n';
    for (let at = 0; at <= content.length; at++) {
      const t = tally();
      open(t);
      t.relay.fromClient(Buffer.from(content.slice(0, at)));
      t.relay.fromClient(Buffer.from(content.slice(at)));
      t.relay.fromBackend(Buffer.from('250 Ok\r\n'));
      assert.equal(t.host.backend, prefix + content, `cut at ${at}`);
      assert.deepEqual(t.host.counts, ['recipient', 'message'], `cut at ${at}`);
      assert.equal(t.host.closed, undefined);
    }
  });

  it('refuses a bare LF in a command line, and a bare CR inside one', () => {
    const lf = tally();
    lf.relay.fromClient(Buffer.from('NOOP\nRCPT TO:<b@x>\r\n'));
    assert.deepEqual(lf.host.closed, ['protocol-error', bareLf[0]]);
    assert.equal(lf.host.backend, '');
    const cr = tally();
    cr.relay.fromClient(Buffer.from('RCPT TO:<a@x>\rRCPT TO:<b@x>\r\n'));
    assert.deepEqual(cr.host.closed, ['protocol-error', '521 5.5.2 gw.example.org Error: bare <CR> received\r\n']);
    assert.deepEqual(cr.host.counts, []);
  });

  it('refuses a bare LF in a BDAT chunk after the replies owed; the last chunk is never completed', () => {
    const t = tally();
    const chunk = 'Subject: x\r\n\r\none\ntwo\r\n';
    t.relay.fromClient(Buffer.from(`MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nBDAT ${chunk.length} LAST\r\n${chunk}`));
    assert.equal(t.host.backend, `MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nBDAT ${chunk.length} LAST\r\n`, 'no byte of the chunk goes');
    assert.equal(t.host.closed, undefined, 'the refusal waits for the replies owed');
    assert.deepEqual(t.host.closing, ['protocol-error', bareLf[0]]);
    assert.equal(t.relay.holding(), true);
    t.relay.fromClient(Buffer.from('QUIT\r\n'));
    t.relay.fromBackend(Buffer.from('250 Ok\r\n250 Ok\r\n'));
    assert.equal(t.host.client, '250 Ok\r\n250 Ok\r\n');
    assert.deepEqual(t.host.closed, ['protocol-error', bareLf[0]]);
    assert.equal(t.host.backend, `MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nBDAT ${chunk.length} LAST\r\n`);
  });

  it('takes a CRLF split across two BDAT chunks, and refuses a LAST chunk that ends in a CR before its last byte goes', () => {
    const ok = tally();
    feed(ok, [c('MAIL FROM:<a@x>\r\nBDAT 3\r\nab\rBDAT 3 LAST\r\n\ncd'), b('250 Ok\r\n250 Ok\r\n250 Ok\r\n')], [1]);
    assert.equal(ok.host.closed, undefined);
    assert.deepEqual(ok.host.counts, ['message']);

    const split = tally();
    feed(split, [c('MAIL FROM:<a@x>\r\nBDAT 3\r\nab\rBDAT 2 LAST\r\ncd')]);
    assert.deepEqual(split.host.closing, ['protocol-error', '521 5.5.2 gw.example.org Error: bare <CR> received\r\n']);
    assert.equal(split.host.backend, 'MAIL FROM:<a@x>\r\nBDAT 3\r\nab\rBDAT 2 LAST\r\n', 'the last chunk never gets a byte: the message is never completed');

    const last = tally();
    feed(last, [c('MAIL FROM:<a@x>\r\nBDAT 3 LAST\r\nab\r')], [1]);
    assert.equal(last.host.backend, 'MAIL FROM:<a@x>\r\nBDAT 3 LAST\r\nab');
    const between = tally();
    feed(between, [c('MAIL FROM:<a@x>\r\nBDAT 3\r\nab\rRSET\r\nBDAT 1 LAST\r\nc')]);
    assert.deepEqual(between.host.closing, ['protocol-error', '521 5.5.2 gw.example.org Error: bare <CR> received\r\n'], 'only the next chunk may bring its LF');
    assert.equal(between.host.backend, 'MAIL FROM:<a@x>\r\nBDAT 3\r\nab\r');

    const zero = tally();
    feed(zero, [c('MAIL FROM:<a@x>\r\nBDAT 3\r\nab\rBDAT 0 LAST\r\n')]);
    assert.equal(zero.host.backend, 'MAIL FROM:<a@x>\r\nBDAT 3\r\nab\r', 'BDAT 0 LAST would end the message on the bare CR');
  });
});

describe('SMTP relay: limits', () => {
  it('holds the client at a RCPT until its verdict; the one refused is answered 452 in its turn and never forwarded', () => {
    const t = tally();
    t.host.wait.add('recipient');
    t.relay.fromClient(Buffer.from('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nRCPT TO:<c@x>\r\nDATA\r\n'));
    assert.equal(t.host.backend, 'MAIL FROM:<a@x>\r\n', 'the RCPT waits for its verdict, and what follows it');
    assert.equal(t.relay.holding(), true);
    t.relay.fromClient(Buffer.from('more\r\n'));
    t.relay.verdict('recipient', { ok: true });
    assert.equal(t.host.backend, 'MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n');
    t.relay.verdict('recipient', { ok: false, reason: 'Too many recipients, try again later' });
    assert.equal(t.host.backend, 'MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n');
    t.relay.fromBackend(Buffer.from('250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n'));
    assert.deepEqual(lines(t.host.client), ['250 2.1.0 Ok\r\n', '250 2.1.5 Ok\r\n', '452 4.5.3 Too many recipients, try again later\r\n', '354 go\r\n']);
    assert.match(t.host.backend, /DATA\r\nmore\r\n$/, 'held content went on after 354');
  });

  it('after the message that reaches the limit: QUIT at once, the 221 becomes the 421, the client is read no more', () => {
    const t = tally();
    t.host.wait.add('message');
    feed(t, [c('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n'), b('250 Ok\r\n250 Ok\r\n354 go\r\n'), c('hi\r\n.\r\n'), b('250 2.0.0 Ok: queued\r\n'), c('MAIL FROM:<a@x>\r\n')]);
    assert.equal(t.relay.holding(), true, 'no command goes before the verdict on the message');
    t.relay.verdict('message', { ok: false, reason: 'Message limit reached, try again later' });
    assert.match(t.host.backend, /\.\r\nQUIT\r\n$/);
    assert.deepEqual(t.host.closing, ['policy-tempfail', '421 4.3.0 gw.example.org Message limit reached, try again later\r\n']);
    t.relay.fromClient(Buffer.from('RCPT TO:<c@x>\r\n'));
    t.relay.fromBackend(Buffer.from('221 2.0.0 Bye\r\n'));
    assert.deepEqual(t.host.closed, ['policy-tempfail', '421 4.3.0 gw.example.org Message limit reached, try again later\r\n']);
    assert.equal(t.host.client, '250 Ok\r\n250 Ok\r\n354 go\r\n250 2.0.0 Ok: queued\r\n', 'the accepted message kept its 250; the 221 is not passed on');
    assert.doesNotMatch(t.host.backend, /RCPT TO:<c@x>|MAIL FROM:<a@x>\r\nQUIT/);
  });

  it('a limit reached inside a message waits for its end; one reached while a pipelined message is only announced hangs up', () => {
    const inside = tally();
    inside.host.wait.add('message');
    // Message 1 accepted; the client pipelined MAIL/RCPT/DATA of message 2 right after its end.
    feed(inside, [c('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n'), b('250 Ok\r\n250 Ok\r\n354 go\r\n'), c('one\r\n.\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n')]);
    feed(inside, [b('250 queued\r\n250 Ok\r\n250 Ok\r\n354 go\r\n'), c('two\r\n.\r\n')]);
    assert.match(inside.host.backend, /DATA\r\n$/, 'message 2 waits for the verdict on message 1');
    inside.relay.verdict('message', { ok: false, reason: 'limit' });
    assert.deepEqual(inside.host.closed, ['policy-tempfail', '421 4.3.0 gw.example.org limit\r\n'], 'nothing of message 2 went: the backend is hung up on');
    assert.match(inside.host.backend, /DATA\r\n$/);
  });
});

// ---- generated sessions ---------------------------------------------------------------

interface Transaction {
  recipients: number;
  kind: 'data' | 'data-refused' | 'bdat';
  /** DATA: content lines before dot-stuffing. */
  lines: string[];
  /** BDAT: where the body is cut into chunks (fractions of its length). */
  cuts: number[];
  pipelined: boolean;
  lowerCase: boolean;
  /** A gateway-only command sent after the envelope, at this position (or none). */
  gatewayOnly: string | null;
}

const tricky = ['.', '..', '. ', '.x', 'RCPT TO:<z@z>', 'DATA', 'BDAT 99999 LAST', 'MAIL FROM:<>', '', 'plain text', 'XCLIENT ADDR=1.2.3.4', '354 x', '\0\xff', 'tab\there'];
const lineArb = fc.oneof(fc.constantFrom(...tricky), fc.string({ maxLength: 30 }).map((s) => s.replace(/[\r\n]/g, '')));

const transactionArb: fc.Arbitrary<Transaction> = fc.record({
  recipients: fc.integer({ min: 0, max: 4 }),
  kind: fc.constantFrom<Transaction['kind']>('data', 'data-refused', 'bdat'),
  lines: fc.array(lineArb, { maxLength: 8 }),
  cuts: fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 3 }),
  pipelined: fc.boolean(),
  lowerCase: fc.boolean(),
  gatewayOnly: fc.constantFrom(null, 'XCLIENT ADDR=6.6.6.6', 'XFORWARD ADDR=7.7.7.7', 'AUTH PLAIN AGFsaWNlAHB3', 'STARTTLS'),
});

const OWN: Record<string, string> = {
  XCLIENT: '550 5.7.0 Error: insufficient authorization\r\n',
  XFORWARD: '550 5.7.0 Error: insufficient authorization\r\n',
  AUTH: '503 5.5.1 Error: already authenticated\r\n',
  STARTTLS: '554 5.5.1 Error: TLS already active\r\n',
};

/** The session as it goes over the wire, what the backend must receive and the client see, and what is counted. */
function transcript(txs: Transaction[]): { segments: Segment[]; backend: string; client: string; counts: RelayUnit[] } {
  const segments: Segment[] = [c('EHLO client.example\r\n'), b(POSTFIX_EHLO)];
  let backend = 'EHLO client.example\r\n';
  let client = POSTFIX_EHLO_SEEN;
  const counts: RelayUnit[] = [];
  const push = (seg: Segment) => {
    const last = segments[segments.length - 1];
    if (last && last.side === seg.side) last.data = Buffer.concat([last.data, seg.data]);
    else segments.push(seg);
  };
  /** A group of commands: sent together (pipelined) or one by one; `own` commands are answered by the relay. */
  const group = (steps: { cmd: string; reply: string; own?: boolean }[], pipelined: boolean) => {
    const replies = steps.filter((s) => !s.own).map((s) => s.reply);
    if (pipelined) {
      push(c(steps.map((s) => s.cmd).join('')));
      if (replies.length > 0) push(b(replies.join('')));
    } else {
      for (const s of steps) {
        push(c(s.cmd));
        if (!s.own) push(b(s.reply));
      }
    }
    for (const s of steps) {
      if (!s.own) backend += s.cmd;
      client += s.reply;
    }
  };
  for (const tx of txs) {
    const cmd = (s: string) => (tx.lowerCase ? s.toLowerCase() : s);
    const steps: { cmd: string; reply: string; own?: boolean }[] = [{ cmd: cmd('MAIL FROM:<a@example.com>\r\n'), reply: '250 2.1.0 Ok\r\n' }];
    for (let i = 0; i < tx.recipients; i++) {
      steps.push({ cmd: cmd(`RCPT TO:<r${i}@example.com>\r\n`), reply: '250 2.1.5 Ok\r\n' });
      counts.push('recipient');
    }
    if (tx.gatewayOnly) steps.push({ cmd: `${tx.gatewayOnly}\r\n`, reply: OWN[tx.gatewayOnly.split(' ')[0]!]!, own: true });
    if (tx.kind === 'bdat') {
      const body = tx.lines.map((l) => `${l}\r\n`).join('');
      const at = [...new Set(tx.cuts.map((f) => Math.floor(f * body.length)))].sort((x, y) => x - y);
      const chunks = [0, ...at].map((from, i, all) => body.slice(from, all[i + 1] ?? body.length));
      chunks.forEach((ch, i) => steps.push({ cmd: `${cmd(`BDAT ${ch.length}${i === chunks.length - 1 ? ' LAST' : ''}`)}\r\n${ch}`, reply: '250 2.0.0 Ok\r\n' }));
      group(steps, tx.pipelined);
      counts.push('message');
      continue;
    }
    if (tx.kind === 'data-refused') {
      steps.push({ cmd: cmd('DATA\r\n'), reply: '554 5.5.1 Error: no valid recipients\r\n' });
      group(steps, tx.pipelined);
      group([{ cmd: cmd('RSET\r\n'), reply: '250 2.0.0 Ok\r\n' }], false);
      continue;
    }
    steps.push({ cmd: cmd('DATA\r\n'), reply: '354 End data with <CR><LF>.<CR><LF>\r\n' });
    group(steps, tx.pipelined);
    group([{ cmd: `${tx.lines.map((l) => `${l.startsWith('.') ? '.' : ''}${l}\r\n`).join('')}.\r\n`, reply: '250 2.0.0 Ok: queued as ABC\r\n' }], false);
    counts.push('message');
  }
  group([{ cmd: 'QUIT\r\n', reply: '221 2.0.0 Bye\r\n' }], false);
  return { segments, backend, client, counts };
}

describe('SMTP relay: generated sessions', () => {
  it('forwards, answers and counts every session the same however the stream is cut', () => {
    fc.assert(
      fc.property(fc.array(transactionArb, { maxLength: 6 }), fc.array(fc.integer({ min: 1, max: 40 }), { minLength: 1, maxLength: 30 }), (txs, sizes) => {
        const want = transcript(txs);
        const t = tally();
        feed(t, want.segments, sizes);
        assert.equal(t.host.backend, want.backend);
        assert.equal(t.host.client, want.client);
        assert.deepEqual(t.host.counts, want.counts);
        assert.equal(t.host.closed, undefined);
        assert.equal(t.relay.atBoundary(), true);
      }),
      { numRuns: 300 },
    );
  });

  it('does the same when any one segment is cut at any offset, or fed byte by byte', () => {
    const txs: Transaction[] = [
      { recipients: 2, kind: 'data', lines: ['Subject: x', '', '.hidden', '..', 'RCPT TO:<no>', '.'], cuts: [], pipelined: true, lowerCase: false, gatewayOnly: 'XCLIENT ADDR=6.6.6.6' },
      { recipients: 1, kind: 'data-refused', lines: [], cuts: [], pipelined: true, lowerCase: true, gatewayOnly: null },
      { recipients: 1, kind: 'bdat', lines: ['a', '.', 'RCPT TO:<x>', '', '.'], cuts: [0.1, 0.55], pipelined: true, lowerCase: false, gatewayOnly: 'XFORWARD ADDR=7.7.7.7' },
    ];
    const want = transcript(txs);
    want.segments.forEach((seg, i) => {
      for (let at = 0; at <= seg.data.length; at++) {
        const t = tally();
        feedCut(t, want.segments, i, at);
        assert.equal(t.host.backend, want.backend, `segment ${i} cut at ${at}`);
        assert.equal(t.host.client, want.client, `segment ${i} cut at ${at}`);
        assert.deepEqual(t.host.counts, want.counts, `segment ${i} cut at ${at}`);
      }
    });
    const bytewise = tally();
    feed(bytewise, want.segments, [1]);
    assert.equal(bytewise.host.backend, want.backend);
    assert.equal(bytewise.host.client, want.client);
    assert.deepEqual(bytewise.host.counts, want.counts);
  });
});
