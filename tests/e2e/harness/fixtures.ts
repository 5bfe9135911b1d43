// Known test data shared by the e2e harness and the tests: users, the mail
// that is pre-filled into Dovecot's mailboxes, and the 1 MiB file nginx serves.
//
// All messages use CRLF line endings. Dovecot serves Maildir files that already
// contain CRLF unchanged, so FETCH BODY[] / RETR return exactly these bytes.

import { createHash } from 'node:crypto';

export interface TestUser {
  name: string;
  password: string;
}

/**
 * Users known to every Dovecot/Postfix instance started by the harness.
 * alice, bob and carol have plain passwords; dave's password contains a space,
 * a double quote and a backslash so that tests can exercise IMAP quoting /
 * POP3 PASS / SASL PLAIN handling in the gateway.
 */
export const TEST_USERS: readonly TestUser[] = Object.freeze([
  Object.freeze({ name: 'alice', password: 'alice-Secret-1' }),
  Object.freeze({ name: 'bob', password: 'bob-Secret-2' }),
  Object.freeze({ name: 'carol', password: 'carol-Secret-3' }),
  Object.freeze({ name: 'dave', password: 'dave pass"word\\x' }),
]);

export function userByName(name: string): TestUser {
  const u = TEST_USERS.find((x) => x.name === name);
  if (!u) throw new Error(`unknown test user ${name}`);
  return u;
}

/** UIDVALIDITY pinned for every pre-filled mailbox (via dovecot-uidlist). */
export const FIXTURE_UIDVALIDITY = 1700000000;

/** Mail domain used in the fixtures and by the Postfix instance. */
export const MAIL_DOMAIN = 'e2e.test';

function crlf(lines: string[]): Buffer {
  return Buffer.from(lines.join('\r\n') + '\r\n', 'utf8');
}

function simpleMessage(opts: {
  from: string;
  to: string;
  subject: string;
  date: string;
  id: string;
  body: string[];
}): Buffer {
  return crlf([
    `From: ${opts.from}`,
    `To: ${opts.to}`,
    `Subject: ${opts.subject}`,
    `Date: ${opts.date}`,
    `Message-ID: <${opts.id}@${MAIL_DOMAIN}>`,
    'MIME-Version: 1.0',
    'Content-Type: text/plain; charset=us-ascii',
    '',
    ...opts.body,
  ]);
}

/** Exactly 10240 bytes; contains dot-leading lines and a lone "." line (dot-stuffing). */
function tenKiBMessage(): Buffer {
  const head = [
    'From: Reporting <reports@e2e.test>',
    'To: Alice <alice@e2e.test>',
    'Subject: Quarterly report (10 KiB)',
    'Date: Tue, 14 Nov 2023 22:15:00 +0000',
    `Message-ID: <report-10k@${MAIL_DOMAIN}>`,
    'MIME-Version: 1.0',
    'Content-Type: text/plain; charset=us-ascii',
    '',
    'Quarterly report, generated for the mailgate end-to-end tests.',
    '.this line starts with a dot',
    '.',
    '..two dots',
  ];
  const lines = [...head];
  let i = 0;
  const size = () => Buffer.byteLength(lines.join('\r\n') + '\r\n');
  for (;;) {
    const line = `Line ${String(i).padStart(4, '0')}: the quick brown fox jumps over the lazy dog 0123456789`;
    lines.push(line);
    if (size() > 10240 - 100) break;
    i++;
  }
  const missing = 10240 - size() - 2; // room for one more line incl. CRLF
  lines.push('END' + '.'.repeat(Math.max(0, missing - 3)));
  const buf = crlf(lines);
  if (buf.length !== 10240) throw new Error(`10 KiB fixture has ${buf.length} bytes`);
  return buf;
}

function mimeMessage(): Buffer {
  const attachment = Buffer.from('mailgate attachment payload\n'.repeat(12), 'utf8').toString('base64');
  const b64lines = attachment.match(/.{1,76}/g) ?? [];
  return crlf([
    'From: =?UTF-8?Q?Bj=C3=B6rn?= <bjorn@e2e.test>',
    'To: alice@e2e.test',
    'Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe_mit_Anhang?=',
    'Date: Tue, 14 Nov 2023 22:20:00 +0000',
    `Message-ID: <mime-1@${MAIL_DOMAIN}>`,
    'MIME-Version: 1.0',
    'Content-Type: multipart/mixed; boundary="=_mailgate_boundary"',
    '',
    'This is a multi-part message in MIME format.',
    '',
    '--=_mailgate_boundary',
    'Content-Type: text/plain; charset=utf-8',
    'Content-Transfer-Encoding: 8bit',
    '',
    'Grüße aus dem Test – 8-bit UTF-8 body: äöü ß € 日本語',
    '',
    '--=_mailgate_boundary',
    'Content-Type: application/octet-stream; name="payload.txt"',
    'Content-Transfer-Encoding: base64',
    'Content-Disposition: attachment; filename="payload.txt"',
    '',
    ...b64lines,
    '',
    '--=_mailgate_boundary--',
  ]);
}

export interface FixtureMessage {
  /** UID pinned through dovecot-uidlist (1-based, in order). */
  uid: number;
  /** Maildir flags (after ":2,"), e.g. "S" for \Seen. */
  flags: string;
  /** INTERNALDATE (file mtime), seconds since epoch. */
  internalDate: number;
  bytes: Buffer;
}

/** user -> mailbox name ("INBOX", "Archive") -> messages in UID order. */
export type MailboxFixtures = Record<string, Record<string, FixtureMessage[]>>;

function build(): MailboxFixtures {
  let t = FIXTURE_UIDVALIDITY;
  const msg = (uid: number, bytes: Buffer, flags = ''): FixtureMessage => ({
    uid,
    flags,
    internalDate: (t += 60),
    bytes,
  });
  return {
    alice: {
      INBOX: [
        msg(
          1,
          simpleMessage({
            from: 'Postmaster <postmaster@e2e.test>',
            to: 'Alice <alice@e2e.test>',
            subject: 'Welcome to mailgate',
            date: 'Tue, 14 Nov 2023 22:13:20 +0000',
            id: 'welcome-alice',
            body: ['Hello Alice,', '', 'this is the first message in your INBOX.', '', '-- ', 'postmaster'],
          }),
          'S',
        ),
        msg(2, tenKiBMessage()),
        msg(3, mimeMessage()),
      ],
      Archive: [
        msg(
          1,
          simpleMessage({
            from: 'Bob <bob@e2e.test>',
            to: 'Alice <alice@e2e.test>',
            subject: 'Old archived note',
            date: 'Mon, 02 Jan 2023 09:00:00 +0000',
            id: 'archived-1',
            body: ['This message lives in the Archive folder.'],
          }),
          'S',
        ),
      ],
    },
    bob: {
      INBOX: [
        msg(
          1,
          simpleMessage({
            from: 'Alice <alice@e2e.test>',
            to: 'Bob <bob@e2e.test>',
            subject: 'Lunch?',
            date: 'Wed, 15 Nov 2023 11:00:00 +0000',
            id: 'lunch-bob',
            body: ['Lunch at noon?'],
          }),
        ),
        msg(
          2,
          simpleMessage({
            from: 'Carol <carol@e2e.test>',
            to: 'Bob <bob@e2e.test>',
            subject: 'Re: Lunch?',
            date: 'Wed, 15 Nov 2023 11:05:00 +0000',
            id: 'lunch-bob-2',
            body: ['Count me in.'],
          }),
        ),
      ],
    },
    carol: { INBOX: [] },
    dave: {
      INBOX: [
        msg(
          1,
          simpleMessage({
            from: 'Postmaster <postmaster@e2e.test>',
            to: 'Dave <dave@e2e.test>',
            subject: 'Your password is hard to quote',
            date: 'Thu, 16 Nov 2023 08:00:00 +0000',
            id: 'welcome-dave',
            body: ['Hello Dave.'],
          }),
        ),
      ],
    },
  };
}

/** The pre-filled mailboxes (same content for every startDovecot()). Treat as read-only. */
export const MAILBOXES: MailboxFixtures = build();

/** Mailbox bytes as plain buffers: MAILBOX_BYTES.alice.INBOX[1] is the 10 KiB message. */
export function mailboxBytes(user: string, mailbox = 'INBOX'): Buffer[] {
  const box = MAILBOXES[user]?.[mailbox];
  if (!box) throw new Error(`no fixture mailbox ${user}/${mailbox}`);
  return box.map((m) => Buffer.from(m.bytes));
}

/** Deterministic 1 MiB (1048576 bytes) content for nginx's big.bin: SHA-256 in counter mode. */
export function bigBinContent(): Buffer {
  const out = Buffer.alloc(1024 * 1024);
  for (let i = 0; i < out.length / 32; i++) {
    createHash('sha256').update(`mailgate-e2e-big.bin:${i}`).digest().copy(out, i * 32);
  }
  return out;
}

let bigSha: string | undefined;
/** Hex SHA-256 of bigBinContent(). */
export function bigBinSha256(): string {
  bigSha ??= createHash('sha256').update(bigBinContent()).digest('hex');
  return bigSha;
}
