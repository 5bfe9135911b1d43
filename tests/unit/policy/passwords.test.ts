import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import * as argon2 from '@node-rs/argon2';
import bcrypt from 'bcryptjs';
import { ConfigError } from '../../../src/core/errors.ts';
import { parseHash, type PasswordHash } from '../../../src/core/password-hash.ts';
import { ARGON2ID_ALGORITHM, dummyHashLike, hashPassword, verifyPassword } from '../../../src/policy/passwords.ts';
import { readPolicyFiles, readUsersFile } from '../../../src/policy/files.ts';
import { mostCommonHash, UserDirectory } from '../../../src/policy/users.ts';
import { cheapScrypt, configFrom } from './helpers.ts';

function parsed(text: string): PasswordHash {
  const h = parseHash(text);
  if (typeof h === 'string') throw new Error(h);
  return h;
}

test('hash-password output (scrypt) verifies the right password and refuses a wrong one', async () => {
  const text = await hashPassword('correct horse battery staple');
  assert.match(text, /^\$scrypt\$ln=15,r=8,p=3\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+$/);
  const h = parsed(text);
  assert.equal(await verifyPassword('correct horse battery staple', h), true);
  assert.equal(await verifyPassword('correct horse battery stapl', h), false);
  assert.equal(await verifyPassword('', h), false);
});

test('bcrypt hashes ($2a$, $2b$, $2y$) verify in the worker pool', async () => {
  const b = bcrypt.hashSync('s3cret', 4);
  for (const prefix of ['$2a$', '$2b$', '$2y$']) {
    const h = parsed(prefix + b.slice(4));
    assert.equal(h.kind, 'bcrypt');
    assert.equal(await verifyPassword('s3cret', h), true, prefix);
    assert.equal(await verifyPassword('s3cret!', h), false, prefix);
  }
  const made = parsed(await hashPassword('migrated', 'bcrypt'));
  assert.equal(made.kind === 'bcrypt' && made.cost, 12);
  assert.equal(await verifyPassword('migrated', made), true);
});

test('many bcrypt checks at once all settle with the right answers', async () => {
  const h = parsed(bcrypt.hashSync('pw', 4));
  const answers = await Promise.all(Array.from({ length: 20 }, (_, i) => verifyPassword(i % 2 ? 'pw' : 'nope', h)));
  assert.deepEqual(
    answers,
    Array.from({ length: 20 }, (_, i) => i % 2 === 1),
  );
});

test('a non-ASCII password verifies whether the client sent it as UTF-8 (SASL) or as raw bytes (IMAP LOGIN)', async () => {
  const h = parsed(cheapScrypt('pässwörd'));
  assert.equal(await verifyPassword('pässwörd', h), true);
  assert.equal(await verifyPassword(Buffer.from('pässwörd', 'utf8').toString('latin1'), h), true);
  assert.equal(await verifyPassword('passwort', h), false);
});

test('argon2id: hash-password --argon2id output verifies the right password (also as raw bytes) and refuses a wrong one', async () => {
  const text = await hashPassword('pässwörd', 'argon2id');
  assert.match(text, /^\$argon2id\$v=19\$m=19456,t=2,p=1\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+$/);
  const h = parsed(text);
  assert.deepEqual(h.kind === 'argon2id' && [h.m, h.t, h.p, h.hashLength], [19456, 2, 1, 32]);
  assert.equal(await verifyPassword('pässwörd', h), true);
  assert.equal(await verifyPassword(Buffer.from('pässwörd', 'utf8').toString('latin1'), h), true);
  assert.equal(await verifyPassword('passwort', h), false);
  // A hash made elsewhere (the reference encoding, another library's parameters) verifies too.
  const other = parsed(await argon2.hash('from-elsewhere', { algorithm: ARGON2ID_ALGORITHM, memoryCost: 4096, timeCost: 3, parallelism: 2 }));
  assert.equal(await verifyPassword('from-elsewhere', other), true);
  assert.equal(await verifyPassword('from-elsewhere!', other), false);
});

test('argon2id: unknown users are checked against a dummy argon2id hash of the same cost, which nothing matches', async () => {
  const real = parsed(await argon2.hash('pw', { algorithm: ARGON2ID_ALGORITHM, memoryCost: 1024, timeCost: 1, parallelism: 1 }));
  const d = dummyHashLike(mostCommonHash([real, real, parsed(cheapScrypt('z'))]));
  assert.deepEqual(d.kind === 'argon2id' && [d.m, d.t, d.p, d.hashLength], [1024, 1, 1, 32]);
  assert.equal(typeof parseHash(d.kind === 'argon2id' ? d.text : ''), 'object', 'the dummy hash is a well-formed argon2id hash');
  assert.equal(await verifyPassword('pw', d), false);
  const dir = new UserDirectory([{ name: 'alice', password_hash: real.kind === 'argon2id' ? real.text : '', groups: [] }]);
  assert.equal((await dir.verify('alice', 'pw'))?.name, 'alice');
  assert.equal(await dir.verify('mallory', 'pw'), undefined);
});

test('parseHash refuses plaintext, argon2, malformed and too-expensive hashes without echoing them', () => {
  const secret = 'hunter2';
  const r = parseHash(secret);
  assert.equal(typeof r, 'string');
  assert.ok(!(r as string).includes(secret));
  assert.match(r as string, /plaintext passwords are not accepted/);
  assert.match(parseHash('$argon2i$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA') as string, /only argon2id/);
  assert.match(parseHash('$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA') as string, /salt must be at least 8 bytes/);
  assert.match(parseHash('$argon2id$v=19$m=1048576,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA') as string, /256 MiB/);
  assert.match(parseHash('$argon2id$v=16$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA') as string, /malformed argon2id/);
  assert.match(parseHash('$argon2id$v=19$m=65536,t=99,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA') as string, /t must be/);
  assert.match(parseHash('$2b$12$short') as string, /malformed bcrypt/);
  assert.match(parseHash('$2b$31$' + 'a'.repeat(53)) as string, /cost/);
  assert.match(parseHash('$scrypt$ln=24,r=8,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA') as string, /ln/);
  assert.match(parseHash('$scrypt$ln=20,r=32,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA') as string, /256 MiB/);
});

test('an unknown user is verified against a dummy hash of the most common kind and cost, and fails', async () => {
  const entries = [
    { name: 'a', password_hash: bcrypt.hashSync('x', 5), groups: [] },
    { name: 'b', password_hash: bcrypt.hashSync('y', 5), groups: [] },
    { name: 'c', password_hash: cheapScrypt('z'), groups: [] },
  ];
  const dir = new UserDirectory(entries);
  const d = dummyHashLike(mostCommonHash(entries.map((e) => parsed(e.password_hash))));
  assert.equal(d.kind, 'bcrypt');
  assert.equal(d.kind === 'bcrypt' && d.cost, 5);
  assert.equal(await dir.verify('nobody', 'x'), undefined);
  assert.equal((await dir.verify('A', 'x'))?.name, 'a', 'names compare case-insensitively');
  assert.equal(await dir.verify('a', 'y'), undefined);
  const ds = dummyHashLike(mostCommonHash([parsed(cheapScrypt('z', 12))]));
  assert.deepEqual(ds.kind === 'scrypt' && [ds.ln, ds.r, ds.p, ds.hash.length], [12, 8, 1, 32]);
  assert.equal(dummyHashLike(undefined).kind, 'scrypt');
});

test('checking an unknown user costs a full hash computation, like a known one', async () => {
  const dir = new UserDirectory([{ name: 'alice', password_hash: cheapScrypt('pw', 15), groups: [] }]);
  const time = async (user: string) => {
    const t = performance.now();
    await dir.verify(user, 'wrong');
    return performance.now() - t;
  };
  await time('alice');
  const known: number[] = [];
  const unknown: number[] = [];
  for (let i = 0; i < 3; i++) {
    known.push(await time('alice'));
    unknown.push(await time('mallory'));
  }
  const median = (xs: number[]) => xs.toSorted((a, b) => a - b)[1] as number;
  assert.ok(median(unknown) > median(known) * 0.3, `unknown user took ${median(unknown).toFixed(1)} ms, known ${median(known).toFixed(1)} ms`);
});

test('a plaintext password in the config is refused with file, line and a pointer to hash-password', () => {
  let err: unknown;
  try {
    configFrom(`
users:
  list:
    - name: alice
      password: hunter2
`);
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof ConfigError);
  const p = err.problems.find((x) => x.path === 'users.list[0].password');
  assert.ok(p, JSON.stringify(err.problems));
  assert.equal(p.line, 5);
  assert.equal(p.file, '/etc/mailgate/mailgate.yaml');
  assert.match(p.message, /plaintext passwords are not accepted.*hash-password/);
  assert.ok(!err.message.includes('hunter2'), 'the password is not repeated in the error');
  // A plaintext value where the hash goes is refused as well.
  assert.throws(() => configFrom('users:\n  list:\n    - { name: alice, password_hash: hunter2 }\n'), (e: unknown) => e instanceof ConfigError && /plaintext/.test(e.message) && !e.message.includes('hunter2'));
});

test('a separate users file is read, validated with file:line errors, and merged with the config users', () => {
  const dir = mkdtempSync(join(tmpdir(), 'mailgate-users-'));
  try {
    const good = cheapScrypt('pw');
    writeFileSync(join(dir, 'users.yaml'), `- name: bob@example.org\n  password_hash: "${good}"\n  groups: [migrated]\n`);
    const config = configFrom(`
users:
  file: users.yaml
  list:
    - { name: alice, password_hash: "${good}", groups: [staff] }
  groups:
    staff: ["*@staff.example.org"]
`, join(dir, 'mailgate.yaml'));
    const users = UserDirectory.fromConfig(config.users, readPolicyFiles(config));
    assert.equal(users.size, 2);
    assert.deepEqual([...users.groupsOf('BOB@example.org')], ['migrated']);
    assert.deepEqual([...users.groupsOf('carol@staff.example.org')], ['staff'], 'group patterns cover users mailgate does not know');
    writeFileSync(join(dir, 'bad.yaml'), `- name: carol\n  password_hash: "${good}"\n- name: dave\n  password: secret\n  password_hash: "${good}"\n`);
    assert.throws(
      () => readUsersFile(join(dir, 'bad.yaml')),
      (e: unknown) => e instanceof ConfigError && e.problems.some((p) => p.file === join(dir, 'bad.yaml') && p.line === 4 && p.path === '[1].password'),
    );
    writeFileSync(join(dir, 'dup.yaml'), `- { name: alice, password_hash: "${good}" }\n`);
    const dupConfig = configFrom(`users:\n  file: dup.yaml\n  list:\n    - { name: alice, password_hash: "${good}" }\n`, join(dir, 'mailgate.yaml'));
    assert.throws(() => UserDirectory.fromConfig(dupConfig.users, readPolicyFiles(dupConfig)), /defined twice/);
    assert.throws(() => readUsersFile(join(dir, 'missing.yaml')), (e: unknown) => e instanceof Error && 'code' in e && e.code === 'CONFIG_READ');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
