/** username_format: how a login name becomes the keys counts and bans are kept under. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ConfigError } from '../../../src/core/errors.ts';
import { parseUsernameFormat } from '../../../src/core/username-format.ts';
import { UserKeys } from '../../../src/policy/names.ts';
import { configFrom } from './helpers.ts';

test('the default counts a name under its whole form and its local part, in lower case', () => {
  const k = new UserKeys();
  assert.deepEqual(k.keys('User5@EXAMPLE.org'), ['user5@example.org', 'user5']);
  assert.deepEqual(k.keys('user5'), ['user5'], 'one key when the two are the same');
  assert.deepEqual(k.keys('a@b@c'), ['a@b@c', 'a'], 'the local part ends at the first "@", as Dovecot cuts it');
  assert.equal(k.account('User5@EXAMPLE.org'), 'user5@example.org');
});

test('Dovecot-style formats: %n, %d, %Lu, literal text and %%', () => {
  assert.deepEqual(new UserKeys(['%Ln']).keys('User5@anything.invalid'), ['user5']);
  assert.deepEqual(new UserKeys(['%n']).keys('user5'), ['user5']);
  assert.deepEqual(new UserKeys(['%Lu']).keys('Alice@Example.ORG'), ['alice@example.org']);
  assert.deepEqual(new UserKeys(['%n@example.org']).keys('bob@old.example'), ['bob@example.org']);
  assert.deepEqual(new UserKeys(['%d']).keys('bob'), ['bob'], 'a format that gives nothing falls back to the name');
  assert.deepEqual(new UserKeys(['%n%%%d']).keys('x@y'), ['x%y']);
});

test('formats that are not ones are refused by the config schema with file and line', () => {
  assert.equal(typeof parseUsernameFormat('%x'), 'string');
  assert.equal(typeof parseUsernameFormat('plain'), 'string', 'a format must use the login');
  assert.equal(typeof parseUsernameFormat('%'), 'string');
  assert.deepEqual(configFrom('username_format: "%Ln"\n').username_format, ['%Ln']);
  assert.deepEqual(configFrom('').username_format, ['%u', '%n']);
  assert.throws(() => configFrom('username_format: "%Lx"\n'), (e: unknown) => e instanceof ConfigError && /1:\d+: username_format\[0\]: unknown variable "%Lx"/.test(e.message));
  assert.throws(() => configFrom('username_format: []\n'), ConfigError);
  assert.throws(() => configFrom('username_format: ["%u", "%n", "%d", "%Lu", "%Ln"]\n'), ConfigError, 'at most four');
  assert.throws(() => configFrom('username_format: "%u %n"\n'), ConfigError, 'no spaces');
});
