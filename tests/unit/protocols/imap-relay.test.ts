/**
 * The IMAP relay after login: it passes bytes both ways untouched and knows,
 * from the backend's side alone, where a response ends, so that a goodbye
 * (`* BYE` at shutdown, kill, idle) never lands inside a literal. Streams are
 * fed split at every offset and checked against a reference reader that
 * takes the whole stream at once, byte by byte.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { ImapRelay } from '../../../src/protocols/imap-relay.ts';
import type { CloseReason, RelayHost } from '../../../src/protocols/types.ts';

const lit = (s: string) => `{${Buffer.byteLength(s, 'latin1')}}\r\n${s}`;

/** Responses a client must not see cut: literals holding CRLF, `{5}` and `}`, a `{0}`, a BINARY literal8, two literals in one line. */
const STREAM = [
  `* 1 FETCH (UID 7 BODY[] ${lit('Subject: a {5}\r\n\r\nbody }\r\n{3}\r\n.\r\n')})\r\n`,
  `* 2 FETCH (BODY[HEADER] ${lit('')} BODY[TEXT] ${lit('x\r\n')})\r\n`,
  `* 3 FETCH (BINARY[1] ~${lit('\0\r\n\xff')})\r\n`,
  '* OK [ALERT] a line ending in a brace }\r\n',
  '* OK not a literal {12a}\r\n',
  '* 4 EXISTS\n',
  'A1 OK FETCH completed\r\n',
].join('');

/** The reference: offsets where the client's parser is between responses, read byte by byte over the whole stream. */
function boundaries(stream: string): Set<number> {
  const out = new Set<number>([0]);
  let line = '';
  for (let i = 0; i < stream.length; i++) {
    const c = stream[i]!;
    if (c !== '\n') {
      line += c;
      continue;
    }
    const m = /\{(\d{1,20})\}\r?$/.exec(line);
    if (m) {
      const n = Number(m[1]);
      line += `<literal ${n}>`; // the line goes on after the literal; its bytes are skipped by count
      i += n;
      continue;
    }
    line = '';
    out.add(i + 1);
  }
  return out;
}

interface Host extends RelayHost {
  client: string;
  backend: string;
  closed: { reason: CloseReason; words: string }[];
}

function host(): Host {
  const h: Host = {
    client: '',
    backend: '',
    closed: [],
    toBackend: (d) => void (h.backend += d.toString('latin1')),
    toClient: (d) => void (h.client += typeof d === 'string' ? d : d.toString('latin1')),
    count: () => assert.fail('IMAP counts nothing'),
    refused: () => assert.fail('IMAP refuses nothing'),
    closing: () => assert.fail('IMAP waits for no reply'),
    close: (reason, words) => void h.closed.push({ reason, words }),
  };
  return h;
}

const bytes = (s: string) => Buffer.from(s, 'latin1');

test('the reference finds the boundaries the stream was built with', () => {
  const b = boundaries(STREAM);
  assert.equal(b.size, 8, 'the start and after each of the seven responses');
  assert.ok(b.has(STREAM.length));
});

test('split at every offset: every byte passes unchanged, and atBoundary() agrees with the reference after each piece', () => {
  const want = boundaries(STREAM);
  for (let cut = 0; cut <= STREAM.length; cut++) {
    const h = host();
    const relay = new ImapRelay(h);
    relay.fromBackend(bytes(STREAM.slice(0, cut)));
    assert.equal(relay.atBoundary(), want.has(cut), `after ${cut} bytes`);
    relay.fromBackend(bytes(STREAM.slice(cut)));
    assert.equal(relay.atBoundary(), true);
    assert.equal(h.client, STREAM);
    assert.deepEqual(h.closed, []);
  }
});

test('byte by byte: atBoundary() is right at every offset', () => {
  const want = boundaries(STREAM);
  const relay = new ImapRelay(host());
  for (let i = 0; i < STREAM.length; i++) {
    assert.equal(relay.atBoundary(), want.has(i), `at ${i}`);
    relay.fromBackend(bytes(STREAM[i]!));
  }
});

test('a goodbye at every offset goes out at the next boundary: the response in flight complete, then the words, then the end', () => {
  const want = [...boundaries(STREAM)].sort((a, b) => a - b);
  for (let cut = 0; cut <= STREAM.length; cut++) {
    const h = host();
    const relay = new ImapRelay(h);
    relay.fromBackend(bytes(STREAM.slice(0, cut)));
    relay.goodbye('shutdown', '* BYE [UNAVAILABLE] Server shutting down\r\n');
    assert.equal(h.closed.length, boundaries(STREAM).has(cut) ? 1 : 0, 'at a boundary the goodbye goes at once');
    assert.equal(relay.holding(), true, 'the client is not read once the goodbye is given');
    relay.fromClient(bytes('B1 NOOP\r\n'));
    assert.equal(h.backend, '', 'nothing the client sends after the goodbye reaches the backend');
    // The rest arrives in two pieces, cut in the middle.
    const rest = STREAM.slice(cut);
    relay.fromBackend(bytes(rest.slice(0, rest.length >> 1)));
    relay.fromBackend(bytes(rest.slice(rest.length >> 1)));
    const end = want.find((b) => b >= cut)!;
    assert.equal(h.client, STREAM.slice(0, end), `cut at ${cut}: the client got the stream up to ${end}`);
    assert.deepEqual(h.closed, [{ reason: 'shutdown', words: '* BYE [UNAVAILABLE] Server shutting down\r\n' }]);
  }
});

test('before the goodbye the client side passes untouched; a relay at a boundary ends at once', () => {
  const h = host();
  const relay = new ImapRelay(h);
  relay.fromClient(bytes('A1 APPEND INBOX {5+}\r\nhello\r\n'));
  assert.equal(h.backend, 'A1 APPEND INBOX {5+}\r\nhello\r\n');
  assert.equal(relay.holding(), false);
  assert.equal(relay.counts, false);
  relay.goodbye('killed', '* BYE Connection closed by the administrator\r\n');
  assert.deepEqual(h.closed, [{ reason: 'killed', words: '* BYE Connection closed by the administrator\r\n' }]);
  relay.fromBackend(bytes('* 5 EXISTS\r\n'));
  assert.equal(h.client, '', 'nothing passes after the end');
});

test('a literal size that spans chunks and a huge literal are followed, never scanned', () => {
  const h = host();
  const relay = new ImapRelay(h);
  const head = `* 1 FETCH (BODY[] {${'1'.repeat(5)}`;
  for (const c of head) relay.fromBackend(bytes(c));
  relay.fromBackend(bytes('}\r'));
  relay.fromBackend(bytes('\n'));
  assert.equal(relay.atBoundary(), false);
  relay.fromBackend(Buffer.alloc(11_110, 0x0a)); // line ends inside the literal are content
  assert.equal(relay.atBoundary(), false);
  relay.fromBackend(bytes('\n'));
  assert.equal(relay.atBoundary(), false, 'the last byte of the literal was an LF: content, and the line goes on');
  relay.fromBackend(bytes(')\r\n'));
  assert.equal(relay.atBoundary(), true);
});

// ---- generated streams ----------------------------------------------------------------

const content = fc.array(fc.constantFrom('a', ' ', '\r\n', '\n', '{5}', '{0}\r\n', '}', '{', ')', '\0', '\xff', '{12}\r\n'), { maxLength: 12 }).map((a) => a.join(''));
const response = fc.oneof(
  fc.tuple(fc.nat(99), content).map(([n, c]) => `* ${n} FETCH (BODY[] ${lit(c)})\r\n`),
  fc.tuple(content, content).map(([a, b]) => `* 1 FETCH (A ${lit(a)} B ~${lit(b)})\r\n`),
  fc.constantFrom('* 3 EXISTS\r\n', 'A2 OK done\r\n', '* OK brace }\r\n', '* OK {x}\r\n', '* BYE\n', '+ go\r\n'),
);

test('property: generated responses, cut anywhere, pass whole; atBoundary() and goodbyes agree with the reference', () => {
  fc.assert(
    fc.property(fc.array(response, { minLength: 1, maxLength: 8 }), fc.array(fc.nat(2000), { maxLength: 6 }), fc.nat(2000), (parts, cuts, at) => {
      const stream = parts.join('');
      const want = boundaries(stream);
      const points = [...new Set(cuts.map((c) => c % (stream.length + 1)))].sort((a, b) => a - b);
      const h = host();
      const relay = new ImapRelay(h);
      let prev = 0;
      for (const p of [...points, stream.length]) {
        relay.fromBackend(bytes(stream.slice(prev, p)));
        assert.equal(relay.atBoundary(), want.has(p), `after ${p} bytes of ${JSON.stringify(stream)}`);
        prev = p;
      }
      assert.equal(h.client, stream);

      const g = host();
      const stopping = new ImapRelay(g);
      const cut = at % (stream.length + 1);
      stopping.fromBackend(bytes(stream.slice(0, cut)));
      stopping.goodbye('shutdown', 'BYE\r\n');
      stopping.fromBackend(bytes(stream.slice(cut)));
      const end = [...want].filter((b) => b >= cut).sort((a, b) => a - b)[0]!;
      assert.equal(g.client, stream.slice(0, end));
      assert.equal(g.closed.length, 1);
    }),
    { numRuns: 500 },
  );
});
