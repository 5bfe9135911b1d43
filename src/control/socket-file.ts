/**
 * The control socket's file: bound inside a private (0700) folder next to
 * its final path, given its mode and group there, and only then renamed into
 * place, so it is never reachable with looser permissions, whatever the
 * umask. A stale file left by a crashed daemon is replaced; a live one
 * (another daemon answering) or a file that is not a socket is refused.
 */
import { chmodSync, chownSync, lstatSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, unlinkSync } from 'node:fs';
import { createConnection, type Server } from 'node:net';
import { dirname, join, resolve } from 'node:path';
import type { Config } from '../config/load.ts';
import { errorCode, errorMessage, MailgateError } from '../core/errors.ts';

/** A Unix socket path must fit in sun_path (108 bytes) with room for the temporary bind folder. */
const MAX_SOCKET_PATH = 90;

/** Binds `server` at `path` with `mode` (and group `gid`); answers the socket file's inode, for removeSocketFile. */
export async function bindSocketFile(server: Server, path: string, mode: number, gid: number | undefined): Promise<number> {
  if (Buffer.byteLength(path) > MAX_SOCKET_PATH) {
    throw new MailgateError('CONTROL', `control socket path ${path} is longer than ${MAX_SOCKET_PATH} bytes; choose a shorter control.socket`);
  }
  const dir = dirname(path);
  try {
    mkdirSync(dir, { recursive: true, mode: 0o755 });
  } catch (err) {
    throw new MailgateError('CONTROL', `cannot create the folder for the control socket ${dir}: ${errorMessage(err)}`, { cause: err });
  }
  await removeStaleSocket(path);
  let tmpDir: string;
  try {
    tmpDir = mkdtempSync(join(dir, '.mgc-'));
  } catch (err) {
    throw new MailgateError('CONTROL', `cannot create a temporary folder in ${dir}: ${errorMessage(err)}`, { cause: err });
  }
  const tmp = join(tmpDir, 's');
  try {
    await listenPath(server, tmp);
    chmodSync(tmp, mode);
    if (gid !== undefined) chownSync(tmp, -1, gid);
    renameSync(tmp, path);
    return lstatSync(path).ino;
  } catch (err) {
    server.close();
    throw new MailgateError('CONTROL', `cannot create the control socket ${path}: ${errorMessage(err)}`, { cause: err });
  } finally {
    rmSync(tmpDir, { recursive: true, force: true });
  }
}

/** Removes the socket file if it is still ours: a daemon started meanwhile may own the path now. */
export function removeSocketFile(path: string, ino: number): void {
  try {
    if (lstatSync(path).ino === ino) unlinkSync(path);
  } catch (err) {
    if (errorCode(err) !== 'ENOENT') throw err;
  }
}

function listenPath(server: Server, path: string): Promise<void> {
  return new Promise((resolveListen, reject) => {
    const onError = (err: Error) => reject(err);
    server.once('error', onError);
    server.listen({ path, backlog: 64 }, () => {
      server.off('error', onError);
      resolveListen();
    });
  });
}

/** Removes a socket file nobody answers on; refuses to touch a live socket or a file that is not a socket. */
async function removeStaleSocket(path: string): Promise<void> {
  let isSocket: boolean;
  try {
    isSocket = lstatSync(path).isSocket();
  } catch (err) {
    if (errorCode(err) === 'ENOENT') return;
    throw new MailgateError('CONTROL', `cannot inspect ${path}: ${errorMessage(err)}`, { cause: err });
  }
  if (!isSocket) throw new MailgateError('CONTROL', `${path} exists and is not a socket; refusing to replace it`);
  const live = await new Promise<boolean>((resolveProbe) => {
    const probe = createConnection({ path });
    const done = (v: boolean) => {
      probe.destroy();
      resolveProbe(v);
    };
    probe.once('connect', () => done(true));
    probe.once('error', () => done(false));
    probe.setTimeout(1000, () => done(false));
  });
  if (live) throw new MailgateError('CONTROL', `another mailgate is already answering on ${path}`);
  unlinkSync(path);
}

/** A group name (from /etc/group) or a numeric gid. */
export function resolveGroup(group: string): number {
  if (/^\d+$/.test(group)) return Number(group);
  let text: string;
  try {
    text = readFileSync('/etc/group', 'utf8');
  } catch (err) {
    throw new MailgateError('CONTROL', `cannot read /etc/group to find group "${group}": ${errorMessage(err)}`, { cause: err });
  }
  for (const line of text.split('\n')) {
    const [name, , gid] = line.split(':');
    if (name === group && gid !== undefined && /^\d+$/.test(gid)) return Number(gid);
  }
  throw new MailgateError('CONTROL', `control.group: no group "${group}" in /etc/group (use a numeric gid for groups from other sources)`);
}

/** The socket path a config asks for (relative paths are relative to the config file). */
export function controlSocketPath(config: Pick<Config, 'baseDir' | 'control'>): string {
  return resolve(config.baseDir, config.control.socket);
}
