/**
 * Certificates and keys are written with writeFileAtomic: when the disk is
 * full (a 16 KiB tmpfs, if this machine lets the test mount one) or
 * something is in the way, the write fails with its cause, the previous
 * content stays, and no temporary file is left behind.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { writeFileAtomic } from '../../../src/core/atomic-file.ts';
import { loadOrCreateSelfSigned } from '../../../src/tls/self-signed.ts';

/** A full 16 KiB tmpfs at a fresh folder, or undefined when mounting is not allowed here. */
async function fullDisk(t: TestContext): Promise<string | undefined> {
  const dir = await mkdtemp(join(tmpdir(), 'mailgate-full-'));
  let mounted = false;
  t.after(async () => {
    if (mounted) execFileSync('umount', [dir], { stdio: 'ignore' });
    await rm(dir, { recursive: true, force: true });
  });
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=16k,mode=0755', 'tmpfs', dir], { stdio: 'ignore' });
    mounted = true;
  } catch {
    return undefined;
  }
  return dir;
}

/** Fills what is left of the file system with one growing file. */
async function fill(dir: string): Promise<void> {
  const chunk = Buffer.alloc(1024, 0x61);
  let filler = Buffer.alloc(0);
  for (;;) {
    try {
      filler = Buffer.concat([filler, chunk]);
      await writeFile(join(dir, 'filler'), filler);
    } catch {
      return;
    }
  }
}

test('disk full: writeFileAtomic fails with ENOSPC, the old file keeps its content, no temporary file is left', async (t) => {
  const dir = await fullDisk(t);
  if (!dir) {
    assert.fail('mounting a 16 KiB tmpfs needs root (CI runs as root)');
  }
  await writeFile(join(dir, 'cert.pem'), 'old certificate\n');
  await fill(dir);
  await assert.rejects(writeFileAtomic(join(dir, 'cert.pem'), Buffer.alloc(8192, 0x62), 0o644), { code: 'ENOSPC' });
  assert.equal(await readFile(join(dir, 'cert.pem'), 'utf8'), 'old certificate\n');
  assert.deepEqual((await readdir(dir)).sort(), ['cert.pem', 'filler']);
});

test('disk full: the bootstrap certificate fails with CERT_WRITE naming the cause, and writes nothing', async (t) => {
  const dir = await fullDisk(t);
  if (!dir) {
    assert.fail('mounting a 16 KiB tmpfs needs root (CI runs as root)');
  }
  await fill(dir);
  await assert.rejects(loadOrCreateSelfSigned(dir, 'mail.example.org'), (err: Error & { code?: string }) => {
    assert.equal(err.code, 'CERT_WRITE');
    assert.match(err.message, /ENOSPC|no space/i);
    return true;
  });
  assert.deepEqual(await readdir(dir), ['filler']);
});

test('something in the way: a directory where the file goes fails cleanly, without a temporary file', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'mailgate-atomic-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await mkdir(join(dir, 'mail.example.org.selfsigned.key'));
  await assert.rejects(writeFileAtomic(join(dir, 'mail.example.org.selfsigned.key'), 'key', 0o600), { code: 'EISDIR' });
  await assert.rejects(loadOrCreateSelfSigned(dir, 'mail.example.org'), { code: 'CERT_WRITE' });
  assert.deepEqual(await readdir(dir), ['mail.example.org.selfsigned.key']);
});
