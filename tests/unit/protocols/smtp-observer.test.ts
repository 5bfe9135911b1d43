import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { createSmtpObserver } from '../../../src/protocols/smtp-observer.ts';
import type { StreamObserver } from '../../../src/protocols/types.ts';

interface Tally {
  observer: StreamObserver;
  /** Recipients per completed message, in order. */
  messages: number[];
  recipients: number;
}

function tally(): Tally {
  const t: Tally = {
    messages: [],
    recipients: 0,
    observer: createSmtpObserver({
      onMessage: (n) => t.messages.push(n),
      onRecipient: () => {
        t.recipients++;
      },
    }),
  };
  return t;
}

type Side = 'client' | 'backend';
interface Segment {
  side: Side;
  data: Buffer;
}

const c = (s: string): Segment => ({ side: 'client', data: Buffer.from(s, 'latin1') });
const b = (s: string): Segment => ({ side: 'backend', data: Buffer.from(s, 'latin1') });

/** Feeds segments in order, each cut into chunks of the given sizes (cycled), checking nothing is modified. */
function feed(t: Tally, segments: Segment[], sizes: readonly number[] = [Number.MAX_SAFE_INTEGER]): void {
  let k = 0;
  for (const seg of segments) {
    for (let i = 0; i < seg.data.length; ) {
      const size = Math.max(1, sizes[k++ % sizes.length]!);
      const chunk = seg.data.subarray(i, i + size);
      const before = Buffer.from(chunk);
      if (seg.side === 'client') t.observer.fromClient(chunk);
      else t.observer.fromBackend(chunk);
      assert.ok(chunk.equals(before), 'the observer must not change the stream');
      i += size;
    }
  }
}

/** Feeds segments cut at explicit offsets: `cuts[i]` splits segment i in two. */
function feedCut(t: Tally, segments: Segment[], segmentIndex: number, at: number): void {
  segments.forEach((seg, i) => {
    const parts = i === segmentIndex ? [seg.data.subarray(0, at), seg.data.subarray(at)] : [seg.data];
    for (const p of parts) {
      if (seg.side === 'client') t.observer.fromClient(p);
      else t.observer.fromBackend(p);
    }
  });
}

describe('SMTP stream observer: examples', () => {
  it('counts a pipelined MAIL/RCPT/RCPT/DATA and its message', () => {
    const t = tally();
    feed(t, [
      c('MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n'),
      b('250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n'),
      c('Subject: hi\r\n\r\nRCPT TO:<not@counted>\r\nBDAT 100000 LAST\r\n.\r\n'),
      b('250 2.0.0 Ok: queued as 4Xyz\r\n'),
    ]);
    assert.deepEqual(t.messages, [2]);
    assert.equal(t.recipients, 2);
    assert.equal(t.observer.atBoundary(), true);
  });

  it('does not enter content mode when DATA is refused', () => {
    const t = tally();
    feed(t, [
      c('MAIL FROM:<a@example.com>\r\nRCPT TO:<nobody@example.com>\r\nDATA\r\n'),
      b('250 2.1.0 Ok\r\n550 5.1.1 <nobody@example.com>: Recipient address rejected\r\n554 5.5.1 Error: no valid recipients\r\n'),
      c('RSET\r\nRCPT TO:<x@example.com>\r\n'),
      b('250 2.0.0 Ok\r\n503 5.5.1 Error: need MAIL command\r\n'),
    ]);
    assert.deepEqual(t.messages, []);
    assert.equal(t.recipients, 2, 'RCPT lines count whether accepted or not, also after the refused DATA');
    assert.equal(t.observer.atBoundary(), true);
  });

  it('skips BDAT chunks by size, whatever they contain', () => {
    const t = tally();
    const chunk1 = 'line one\r\n.\r\nRCPT TO:<x@y>\r\n';
    const chunk2 = '\r\n.\r\nDATA\r\n';
    feed(t, [
      c(`MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nBDAT ${chunk1.length}\r\n${chunk1}BDAT ${chunk2.length} LAST\r\n${chunk2}`),
      b('250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: 27 octets received\r\n250 2.0.0 Ok: queued as 4Abc\r\n'),
      c('QUIT\r\n'),
      b('221 2.0.0 Bye\r\n'),
    ]);
    assert.deepEqual(t.messages, [1]);
    assert.equal(t.recipients, 1);
  });

  it('counts an empty BDAT 0 LAST as a message', () => {
    const t = tally();
    feed(t, [c('MAIL FROM:<>\r\nRCPT TO:<b@x>\r\nbdat 0 last\r\n'), b('250 Ok\r\n250 Ok\r\n250 Ok\r\n')]);
    assert.deepEqual(t.messages, [1]);
  });

  it('does not end the message at a dot-stuffed line', () => {
    const t = tally();
    feed(t, [
      c('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n'),
      b('250 Ok\r\n250 Ok\r\n354 go\r\n'),
      c('..\r\n...\r\n.. \r\n..\r\nRCPT TO:<c@x>\r\n'),
    ]);
    assert.deepEqual(t.messages, []);
    assert.equal(t.observer.atBoundary(), false, 'still inside the message');
    feed(t, [c('.\r\n'), b('250 Ok\r\n')]);
    assert.deepEqual(t.messages, [1]);
    assert.equal(t.recipients, 1);
  });

  it('ends an empty message right after 354', () => {
    const t = tally();
    feed(t, [c('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n'), b('250 Ok\r\n250 Ok\r\n354 go\r\n'), c('.\r\n'), b('250 Ok\r\n')]);
    assert.deepEqual(t.messages, [1]);
  });

  it('follows multi-line replies and replies ending in bare LF', () => {
    const t = tally();
    feed(t, [
      c('EHLO client\r\n'),
      b('250-mx.example\r\n250-PIPELINING\r\n250 CHUNKING\r\n'),
      c('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n'),
      b('250 Ok\n250-Ok\n250 Ok\n354\n'),
      c('body\r\n.\r\n'),
      b('250 Ok\r\n'),
    ]);
    assert.deepEqual(t.messages, [1]);
  });

  it('holds what a client sends before the answer to DATA, and reads it as the answer says', () => {
    const early = tally();
    feed(early, [c('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nSubject: x\r\n\r\nRCPT TO:<no@x>\r\n.\r\n'), b('250 Ok\r\n250 Ok\r\n354 go\r\n250 Ok\r\n')]);
    assert.deepEqual(early.messages, [1]);
    assert.equal(early.recipients, 1);

    const refused = tally();
    feed(refused, [c('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nRCPT TO:<c@x>\r\n'), b('250 Ok\r\n250 Ok\r\n554 no\r\n503 need MAIL\r\n')]);
    assert.deepEqual(refused.messages, []);
    assert.equal(refused.recipients, 2, 'after a refused DATA the held line is a command');
  });

  it('takes content for content after a late 354, even when the replies were miscounted', () => {
    const t = tally();
    feed(t, [
      c('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n'),
      b('250 Ok\r\n250 Ok\r\n250 unexpected extra reply\r\n'),
      b('354 go\r\n'),
      c('RCPT TO:<not-a-command@x>\r\nBDAT 99999\r\n.\r\n'),
      b('250 Ok\r\n'),
      c('RCPT TO:<c@x>\r\n'),
    ]);
    assert.deepEqual(t.messages, [1]);
    assert.equal(t.recipients, 2);
  });

  it('takes a flood sent before the answer to DATA for content, and corrects itself if DATA was refused', () => {
    const body = 'x'.repeat(70).concat('\r\n').repeat(80); // 5.7 KB, more than is held
    const accepted = tally();
    feed(accepted, [c(`MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n${body}.\r\n`), b('250 Ok\r\n250 Ok\r\n354 go\r\n250 Ok\r\n'), c('RCPT TO:<c@x>\r\n')], [1500]);
    assert.deepEqual(accepted.messages, [1]);
    assert.equal(accepted.recipients, 2);

    const refused = tally();
    feed(refused, [c(`MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n${body}`), b('250 Ok\r\n250 Ok\r\n554 no valid recipients\r\n'), c('RSET\r\nRCPT TO:<c@x>\r\n')], [1500]);
    assert.deepEqual(refused.messages, []);
    assert.equal(refused.recipients, 2, 'back to commands after the refusal');
    assert.equal(refused.observer.atBoundary(), true);
  });

  it('counts a recipient on a command line longer than its buffer', () => {
    const t = tally();
    const long = `RCPT TO:<${'x'.repeat(10_000)}@example.com>\r\n`;
    feed(t, [c(`MAIL FROM:<a@x>\r\n${long}RCPT TO:<b@x>\r\n`)], [1000]);
    assert.equal(t.recipients, 2);
    assert.equal(t.observer.atBoundary(), true);
  });

  it('is at a boundary only between whole commands outside message content', () => {
    const t = tally();
    assert.equal(t.observer.atBoundary(), true);
    t.observer.fromClient(Buffer.from('MAIL FROM:<a@x>\r\nRCPT TO:<b'));
    assert.equal(t.observer.atBoundary(), false, 'partial command line');
    t.observer.fromClient(Buffer.from('@x>\r\nDATA\r\n'));
    assert.equal(t.observer.atBoundary(), false, 'waiting for the answer to DATA');
    t.observer.fromBackend(Buffer.from('250 Ok\r\n250 Ok\r\n354 go\r\n'));
    assert.equal(t.observer.atBoundary(), false, 'inside message content');
    t.observer.fromClient(Buffer.from('hello\r\n.\r\n'));
    assert.equal(t.observer.atBoundary(), true);
    t.observer.fromClient(Buffer.from('BDAT 10\r\n12345'));
    assert.equal(t.observer.atBoundary(), false, 'inside a BDAT chunk');
    t.observer.fromClient(Buffer.from('67890'));
    assert.equal(t.observer.atBoundary(), true);
  });

  it('scans large message content quickly, without holding on to it', () => {
    const t = tally();
    t.observer.fromClient(Buffer.from('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n'));
    t.observer.fromBackend(Buffer.from('250 Ok\r\n250 Ok\r\n354 go\r\n'));
    const chunk = Buffer.alloc(64 * 1024, 'abcdefghij\r\n..stuffed\r\n');
    const started = process.hrtime.bigint();
    for (let i = 0; i < 1600; i++) t.observer.fromClient(chunk); // 100 MiB
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    t.observer.fromClient(Buffer.from('\r\n.\r\n'));
    assert.deepEqual(t.messages, [1]);
    assert.ok(ms < 5_000, `100 MiB took ${ms.toFixed(0)} ms`);
  });
});

// ---- generated sessions ---------------------------------------------------------------

interface Transaction {
  recipients: number;
  kind: 'data' | 'data-refused' | 'bdat';
  /** DATA: content lines before dot-stuffing. */
  lines: string[];
  /** BDAT: the chunks' content. */
  chunks: string[];
  pipelined: boolean;
  lowerCase: boolean;
}

const tricky = ['.', '..', '. ', '.x', 'RCPT TO:<z@z>', 'DATA', 'BDAT 99999 LAST', 'MAIL FROM:<>', '', 'plain text', '\r', 'a\rb', '354 x'];
const lineArb = fc.oneof(fc.constantFrom(...tricky), fc.string({ maxLength: 30 }).map((s) => s.replace(/[\r\n]/g, '')));
const chunkArb = fc
  .array(fc.constantFrom('\r\n.\r\n', '\r\n', '.', '\n', '\r', 'RCPT TO:<x>\r\n', 'BDAT 7 LAST\r\n', 'DATA\r\n', 'abc', '\0\xff'), { maxLength: 8 })
  .map((parts) => parts.join(''));

const transactionArb: fc.Arbitrary<Transaction> = fc.record({
  recipients: fc.integer({ min: 0, max: 4 }),
  kind: fc.constantFrom<Transaction['kind']>('data', 'data-refused', 'bdat'),
  lines: fc.array(lineArb, { maxLength: 8 }),
  chunks: fc.array(chunkArb, { minLength: 1, maxLength: 3 }),
  pipelined: fc.boolean(),
  lowerCase: fc.boolean(),
});

/** The session as it goes over the wire, and what the observer must count. */
function transcript(txs: Transaction[]): { segments: Segment[]; messages: number[]; recipients: number } {
  const segments: Segment[] = [c('EHLO client.example\r\n'), b('250-mx.example\r\n250-PIPELINING\r\n250 CHUNKING\r\n')];
  const push = (seg: Segment) => {
    const last = segments[segments.length - 1];
    if (last && last.side === seg.side) last.data = Buffer.concat([last.data, seg.data]);
    else segments.push(seg);
  };
  const messages: number[] = [];
  let recipients = 0;
  for (const tx of txs) {
    const cmd = (s: string) => (tx.lowerCase ? s.toLowerCase() : s);
    const envelope = [cmd('MAIL FROM:<a@example.com>\r\n'), ...Array.from({ length: tx.recipients }, (_, i) => cmd(`RCPT TO:<r${i}@example.com>\r\n`))];
    const envelopeReplies = ['250 2.1.0 Ok\r\n', ...Array.from({ length: tx.recipients }, () => '250 2.1.5 Ok\r\n')];
    recipients += tx.recipients;
    if (tx.kind === 'bdat') {
      const cmds = tx.chunks.map((ch, i) => `${cmd(`BDAT ${Buffer.byteLength(ch, 'latin1')}${i === tx.chunks.length - 1 ? ' LAST' : ''}`)}\r\n${ch}`);
      const replies = tx.chunks.map(() => '250 2.0.0 Ok\r\n');
      if (tx.pipelined) {
        push(c([...envelope, ...cmds].join('')));
        push(b([...envelopeReplies, ...replies].join('')));
      } else {
        [...envelope, ...cmds].forEach((x, i) => {
          push(c(x));
          push(b([...envelopeReplies, ...replies][i]!));
        });
      }
      messages.push(tx.recipients);
      continue;
    }
    push(c([...envelope, cmd('DATA\r\n')].join('')));
    if (tx.kind === 'data-refused') {
      push(b(`${envelopeReplies.join('')}554 5.5.1 Error: no valid recipients\r\n`));
      push(c(cmd('RSET\r\n')));
      push(b('250 2.0.0 Ok\r\n'));
      continue;
    }
    push(b(`${envelopeReplies.join('')}354 End data with <CR><LF>.<CR><LF>\r\n`));
    push(c(`${tx.lines.map((l) => `${l.startsWith('.') ? '.' : ''}${l}\r\n`).join('')}.\r\n`));
    push(b('250 2.0.0 Ok: queued as ABC\r\n'));
    messages.push(tx.recipients);
  }
  push(c('QUIT\r\n'));
  push(b('221 2.0.0 Bye\r\n'));
  return { segments, messages, recipients };
}

describe('SMTP stream observer: generated sessions', () => {
  it('counts every message and recipient however the stream is cut', () => {
    fc.assert(
      fc.property(
        fc.array(transactionArb, { maxLength: 6 }),
        fc.array(fc.integer({ min: 1, max: 40 }), { minLength: 1, maxLength: 30 }),
        (txs, sizes) => {
          const { segments, messages, recipients } = transcript(txs);
          const t = tally();
          feed(t, segments, sizes);
          assert.deepEqual(t.messages, messages);
          assert.equal(t.recipients, recipients);
          assert.equal(t.observer.atBoundary(), true);
        },
      ),
      { numRuns: 500 },
    );
  });

  it('counts the same when any one segment is cut at any offset, or fed byte by byte', () => {
    const txs: Transaction[] = [
      { recipients: 2, kind: 'data', lines: ['Subject: x', '', '.hidden', '..', 'RCPT TO:<no>', '.'], chunks: [], pipelined: true, lowerCase: false },
      { recipients: 1, kind: 'data-refused', lines: [], chunks: [], pipelined: true, lowerCase: true },
      { recipients: 1, kind: 'bdat', lines: [], chunks: ['a\r\n.\r\nRCPT TO:<x>\r\n', '\r\n.\r\n'], pipelined: true, lowerCase: false },
    ];
    const { segments, messages, recipients } = transcript(txs);
    segments.forEach((seg, i) => {
      for (let at = 0; at <= seg.data.length; at++) {
        const t = tally();
        feedCut(t, segments, i, at);
        assert.deepEqual(t.messages, messages, `segment ${i} cut at ${at}`);
        assert.equal(t.recipients, recipients, `segment ${i} cut at ${at}`);
      }
    });
    const bytewise = tally();
    feed(bytewise, segments, [1]);
    assert.deepEqual(bytewise.messages, messages);
    assert.equal(bytewise.recipients, recipients);
  });
});
