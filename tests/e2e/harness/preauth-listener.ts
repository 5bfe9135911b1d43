// inetd-style bridge used by startDovecot({ preauth: true }).
//
// Dovecot's imap-login cannot greet with PREAUTH, but Dovecot's imap binary
// does when it is started directly for a user ("imap -u alice", the way it is
// run over ssh/rsh/inetd): it looks the user up in the running instance's
// userdb, drops privileges to the mail uid and greets with
// "* PREAUTH [CAPABILITY ...] Logged in as alice". This script listens on a
// TCP port and connects every accepted socket to such an imap process, so the
// PREAUTH session is served by real Dovecot.
//
// usage: node preauth-listener.ts <port> <imap-binary> <dovecot.conf> <user> <log-file>

import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';

const [portArg, imapBin, conf, user, logFile] = process.argv.slice(2);
if (!portArg || !imapBin || !conf || !user || !logFile) {
  process.stderr.write('usage: preauth-listener.ts <port> <imap-binary> <dovecot.conf> <user> <log-file>\n');
  process.exit(2);
}

const log = fs.createWriteStream(logFile, { flags: 'a' });

const server = net.createServer((sock) => {
  sock.setNoDelay(true);
  // imap refuses to run with a socket on stdin ("must not be started from inetd"),
  // and node's stdio pipes are socketpairs -- so give it real pipes via cat.
  const imap = spawn('/bin/sh', ['-c', 'cat | "$0" -c "$1" -u "$2" | cat', imapBin, conf, user], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  log.write(`preauth-listener: connection from ${sock.remoteAddress}:${sock.remotePort} -> imap pid ${imap.pid} (user ${user})\n`);
  sock.pipe(imap.stdin);
  imap.stdout.pipe(sock);
  imap.stderr.on('data', (d: Buffer) => log.write(d));
  imap.stdin.on('error', () => {});
  // client gone: closing the pipe makes cat, imap and the second cat exit in turn
  sock.on('error', () => imap.stdin.end());
  sock.on('close', () => imap.stdin.end());
  imap.on('error', (e) => {
    log.write(`preauth-listener: spawn failed: ${e.message}\n`);
    sock.destroy();
  });
  imap.on('exit', () => sock.end());
});

server.on('error', (e) => {
  process.stderr.write(`preauth-listener: ${e.message}\n`);
  process.exit(1);
});
server.listen({ port: Number(portArg), host: '127.0.0.1', exclusive: true }, () => {
  process.stderr.write(`preauth-listener: listening on 127.0.0.1:${portArg}\n`);
});
process.on('SIGTERM', () => process.exit(0));
