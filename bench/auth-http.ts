/**
 * The auth_http endpoint nginx's mail proxy asks before every login
 * (https://nginx.org/en/docs/mail/ngx_mail_auth_http_module.html). It accepts
 * every login and names the backend for the protocol. Run as its own process
 * so its CPU is neither the bench's nor nginx's:
 *   node bench/auth-http.ts PORT IMAP_PORT SMTP_PORT
 */
import { createServer } from 'node:http';

const [port, imapPort, smtpPort] = process.argv.slice(2).map(Number);
if (!port || !imapPort || !smtpPort) {
  process.stderr.write('usage: node bench/auth-http.ts PORT IMAP_PORT SMTP_PORT\n');
  process.exit(2);
}

const server = createServer((req, res) => {
  const protocol = String(req.headers['auth-protocol'] ?? '');
  res.writeHead(200, {
    'Auth-Status': 'OK',
    'Auth-Server': '127.0.0.1',
    'Auth-Port': String(protocol === 'smtp' ? smtpPort : imapPort),
  });
  res.end();
});
server.keepAliveTimeout = 60_000;
server.listen(port, '127.0.0.1', () => process.stdout.write(`auth-http listening on 127.0.0.1:${port}\n`));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
