/**
 * Generators of hostile client byte streams per protocol, shared by the
 * adapter fuzz suites (fed through a driver replica) and the live session
 * suite (sent over a socket to the real driver).
 */
import fc from 'fast-check';
import { encodePlain } from '../../../src/protocols/sasl.ts';
import { nastyBytes, nastyText } from './helpers.ts';

// ---- IMAP ----------------------------------------------------------------------------

type Arg =
  | { k: 'text'; v: string }
  | { k: 'literal'; size: number; plus: boolean; content: Buffer };

const atom = fc.stringMatching(/^[A-Za-z0-9._@-]{1,12}$/);
const quoted = fc.string({ maxLength: 24 }).map((s) => `"${s.replace(/["\\]/g, (c) => `\\${c}`)}"`);
const textArg = fc.oneof(
  { weight: 4, arbitrary: atom },
  { weight: 3, arbitrary: quoted },
  { weight: 1, arbitrary: fc.constantFrom('NIL', '(', ')', '()', '("name" "x")', '"unterminated', '"bad \\q escape"', '{', '}', '{x}', '\\', '*', '%') },
  { weight: 1, arbitrary: nastyText(16).map((s) => s.replace(/[\r\n]/g, '')) },
).map((v): Arg => ({ k: 'text', v }));

/** A literal: honest (exactly `size` bytes follow) or not, synchronising or LITERAL+. */
const literalArg = fc
  .record({
    plus: fc.boolean(),
    honest: fc.boolean(),
    content: nastyBytes(40),
    bigSize: fc.constantFrom(0, 299, 300, 301, 8192, 8193, 65536, 4_294_967_295, 9_999_999_999),
    useBig: fc.boolean(),
    fill: fc.boolean(),
  })
  .map(({ plus, honest, content, bigSize, useBig, fill }): Arg => {
    if (useBig && fill && bigSize <= 400) return { k: 'literal', size: bigSize, plus, content: Buffer.alloc(bigSize, 0x61) };
    if (useBig) return { k: 'literal', size: bigSize, plus, content };
    return { k: 'literal', size: honest ? content.length : content.length + 3, plus, content };
  });

const tagArb = fc.oneof({ weight: 5, arbitrary: fc.stringMatching(/^[A-Za-z0-9]{1,6}$/) }, { weight: 1, arbitrary: fc.constantFrom('*', '+', '"a"', '(', 'a{b', 'x%', '') });
const nameArb = fc.oneof(
  { weight: 6, arbitrary: fc.constantFrom('LOGIN', 'login', 'AUTHENTICATE', 'CAPABILITY', 'NOOP', 'ID', 'STARTTLS', 'LOGOUT', 'SELECT', 'ENABLE', 'COMPRESS') },
  { weight: 1, arbitrary: nastyText(10).map((s) => s.replace(/[\r\n ]/g, '')) },
);
const eol = fc.constantFrom('\r\n', '\r\n', '\n', '\r\r\n');

const command = fc
  .record({ tag: tagArb, name: nameArb, args: fc.array(fc.oneof({ weight: 3, arbitrary: textArg }, { weight: 1, arbitrary: literalArg }), { maxLength: 5 }), eol })
  .map(({ tag, name, args, eol: end }) => {
    const parts: Buffer[] = [];
    let line = `${tag} ${name}`;
    for (const a of args) {
      if (a.k === 'text') {
        line += ` ${a.v}`;
      } else {
        parts.push(Buffer.from(`${line} {${a.size}${a.plus ? '+' : ''}}\r\n`, 'latin1'), a.content);
        line = '';
      }
    }
    parts.push(Buffer.from(`${line}${end}`, 'latin1'));
    return Buffer.concat(parts);
  });

/** Lines a client might send inside an AUTHENTICATE exchange. */
const saslLine = fc
  .oneof(
    fc.tuple(nastyText(12), nastyText(12), nastyText(6)).map(([u, p, z]) => Buffer.from(`${z}\0${u}\0${p}`, 'latin1').toString('base64')),
    fc.tuple(fc.string({ maxLength: 10 }), fc.string({ maxLength: 10 })).map(([u, p]) => encodePlain(u, p)),
    nastyBytes(30).map((b) => b.toString('base64')),
    fc.constantFrom('*', '=', '', '====', 'AAAA', 'x'.repeat(260)),
    nastyText(20).map((s) => s.replace(/[\r\n]/g, '')),
  )
  .map((s) => Buffer.from(`${s}\r\n`, 'latin1'));

export const imapStream = fc
  .array(
    fc.oneof(
      { weight: 6, arbitrary: command },
      { weight: 2, arbitrary: saslLine },
      { weight: 1, arbitrary: fc.constantFrom('a AUTHENTICATE PLAIN\r\n', 'b AUTHENTICATE LOGIN\r\n', 's STARTTLS\r\n').map((s) => Buffer.from(s)) },
      { weight: 1, arbitrary: nastyBytes(80) },
    ),
    { maxLength: 14 },
  )
  .map((parts) => Buffer.concat(parts));

// ---- POP3 ----------------------------------------------------------------------------

const pop3Verb = fc.oneof(
  { weight: 8, arbitrary: fc.constantFrom('USER', 'PASS', 'AUTH', 'CAPA', 'STLS', 'QUIT', 'APOP', 'STAT', 'RETR', 'user', 'Pass', 'NOOP', 'XCLIENT') },
  { weight: 1, arbitrary: nastyText(8).map((s) => s.replace(/[\r\n ]/g, '')) },
);
const pop3Arg = fc.oneof(
  { weight: 3, arbitrary: fc.stringMatching(/^[A-Za-z0-9@._-]{0,16}$/) },
  { weight: 2, arbitrary: nastyText(24).map((s) => s.replace(/\n/g, '')) },
  { weight: 1, arbitrary: fc.constantFrom('PLAIN', 'LOGIN', 'CRAM-MD5', 'PLAIN =', 'PLAIN *', `PLAIN ${encodePlain('alice', 'pw')}`, 'alice\rQUIT', 'a\0b', 'x'.repeat(600)) },
);
const pop3Eol = fc.constantFrom('\r\n', '\r\n', '\n', '\r\r\n');
const pop3Command = fc
  .tuple(pop3Verb, fc.option(pop3Arg, { nil: undefined }), pop3Eol)
  .map(([v, a, e]) => Buffer.from(`${v}${a === undefined ? '' : ` ${a}`}${e}`, 'latin1'));
const pop3SaslLine = fc
  .oneof(
    fc.tuple(nastyText(10), nastyText(10)).map(([u, p]) => Buffer.from(`\0${u}\0${p}`, 'latin1').toString('base64')),
    nastyBytes(24).map((b) => b.toString('base64')),
    fc.constantFrom('*', '=', '', 'x'.repeat(300)),
  )
  .map((s) => Buffer.from(`${s}\r\n`, 'latin1'));
export const pop3Stream = fc
  .array(fc.oneof({ weight: 6, arbitrary: pop3Command }, { weight: 2, arbitrary: pop3SaslLine }, { weight: 1, arbitrary: nastyBytes(60) }), { maxLength: 16 })
  .map((parts) => Buffer.concat(parts));

// ---- SMTP ----------------------------------------------------------------------------

const smtpArg = fc.oneof(
  { weight: 3, arbitrary: fc.stringMatching(/^[A-Za-z0-9.@<>:=_-]{0,20}$/) },
  { weight: 2, arbitrary: nastyText(24).map((s) => s.replace(/\n/g, '')) },
  {
    weight: 2,
    arbitrary: fc.constantFrom(
      'FROM:<a@example.org>',
      'FROM:<a@example.org> SIZE=100',
      'FROM:<a\0b@x>',
      'FROM:<a\rb@x>',
      'TO:<b@example.org>',
      'PLAIN',
      'LOGIN',
      `PLAIN ${encodePlain('alice', 'pw')}`,
      `PLAIN ${Buffer.from('\0al\rice\0pw').toString('base64')}`,
      'PLAIN =',
      `PLAIN ${'A'.repeat(400)}`,
      'client.example ADDR=6.6.6.6',
      'cl\rient.example',
      'CRAM-MD5',
    ),
  },
);
const smtpVerb = fc.oneof(
  { weight: 8, arbitrary: fc.constantFrom('EHLO', 'HELO', 'ehlo', 'STARTTLS', 'AUTH', 'MAIL', 'RCPT', 'DATA', 'NOOP', 'RSET', 'QUIT', 'HELP', 'VRFY', 'EXPN', 'XCLIENT') },
  { weight: 1, arbitrary: nastyText(8).map((s) => s.replace(/[\r\n]/g, '')) },
);
const smtpEol = fc.constantFrom('\r\n', '\r\n', '\n');
const smtpCommand = fc.tuple(smtpVerb, fc.option(smtpArg, { nil: undefined }), smtpEol).map(([v, a, e]) => Buffer.from(`${v}${a === undefined ? '' : ` ${a}`}${e}`, 'latin1'));
/** BDAT with a chunk that is as long as announced, or not. */
const smtpBdat = fc
  .record({ content: nastyBytes(50), honest: fc.boolean(), last: fc.boolean(), big: fc.constantFrom(undefined, 300, 301, 99_999, 999_999_999_999_999) })
  .map(({ content, honest, last, big }) => {
    const size = big ?? (honest ? content.length : content.length + 2);
    return Buffer.concat([Buffer.from(`BDAT ${size}${last ? ' LAST' : ''}\r\n`), content]);
  });
const smtpSaslLine = fc
  .oneof(nastyBytes(24).map((b) => b.toString('base64')), fc.constantFrom('*', '=', '', 'x'.repeat(250)), fc.tuple(nastyText(8), nastyText(8)).map(([u, p]) => encodePlain(u, p)))
  .map((s) => Buffer.from(`${s}\r\n`, 'latin1'));
export const smtpStream = fc
  .array(
    fc.oneof({ weight: 6, arbitrary: smtpCommand }, { weight: 1, arbitrary: smtpBdat }, { weight: 2, arbitrary: smtpSaslLine }, { weight: 1, arbitrary: nastyBytes(60) }),
    { maxLength: 16 },
  )
  .map((parts) => Buffer.concat(parts));

