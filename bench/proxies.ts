/**
 * The proxies under test, each in front of the same backends with the same
 * certificate (ECDSA P-256), TLS 1.3 only and the same number of workers
 * (one by default; --workers N gives mailgate N worker processes, nginx N
 * worker processes and HAProxy N threads):
 *
 *  - mailgate through its real CLI (`src/cli.ts run -c FILE`), as
 *    tests/e2e/harness/gateway.ts starts it, with a generated config;
 *  - nginx with the mail module (imap + smtp, auth_http) and an https
 *    reverse proxy with upstream keep-alive;
 *  - HAProxy in TCP mode terminating TLS.
 *
 * Each runs in its own process group; the bench reads that group's CPU time
 * and RSS from /proc.
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import { connect } from 'node:net';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { stringify } from 'yaml';
import { describeFiles, freePort, makeTempDir, removeTempDir, sleep, spawnServer, waitUntilReady, type ManagedProcess } from '../tests/helpers/proc.ts';
import { HOST, NOFILE, stopper } from './backends.ts';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = path.resolve(HERE, '..');
export const SNI = 'bench.mailgate.test';
const READY_MS = 20_000;

export interface Ports {
  imap: number;
  smtp: number;
  http: number;
}

export interface Proxy {
  name: string;
  ports: Ports;
  /** The process group whose CPU and memory count as the proxy's. */
  pgid: number;
  dir: string;
  stop(): Promise<void>;
}

export interface Certificate {
  cert: string;
  key: string;
  /** cert + key in one file (HAProxy). */
  combined: string;
}

export interface BackendPorts {
  imap: number;
  smtp: number;
  http: number;
}

async function ports(): Promise<Ports> {
  return { imap: await freePort(), smtp: await freePort(), http: await freePort() };
}

/** TLS ports send nothing before the ClientHello: ready is when all three accept a TCP connection. */
async function waitForPorts(what: string, proc: ManagedProcess, p: Ports, logs: string[]): Promise<void> {
  const deadline = Date.now() + READY_MS;
  for (const port of [p.imap, p.smtp, p.http]) {
    while (!(await accepts(port))) {
      if (proc.exitInfo() || Date.now() > deadline) throw new Error(`${what} is not listening on ${HOST}:${port}\n${await describeFiles(logs)}`);
      await sleep(25);
    }
  }
}

function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ host: HOST, port });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

// ---- mailgate ---------------------------------------------------------------

export interface MailgateOptions {
  /** Name in the results (default "mailgate"). */
  name?: string;
  /** Checkout whose src/cli.ts runs (default: this one). */
  root?: string;
  /** Extra node flags, e.g. --cpu-prof. */
  nodeArgs?: string[];
  logLevel?: string;
  env?: NodeJS.ProcessEnv;
  /** mailgate's `workers` (default 1, like the others' default here). */
  workers?: number;
}

/** Whether the checkout's config schema has `workers` (a strict schema refuses keys it does not know). */
function knowsWorkers(root: string): boolean {
  const schema = path.join(root, 'src/config/schema.ts');
  return fs.existsSync(schema) && /\bworkers: z\./.test(fs.readFileSync(schema, 'utf8'));
}

export async function startMailgate(backends: BackendPorts, cert: Certificate, opts: MailgateOptions = {}): Promise<Proxy> {
  const name = opts.name ?? 'mailgate';
  const dir = await makeTempDir(`bench-${name.replace(/[^A-Za-z0-9_-]/g, '_')}`);
  const p = await ports();
  const config = {
    hostname: SNI,
    // An older checkout (--variant) may predate the key (it ran one process then); one that has it defaults to a worker per core.
    ...(knowsWorkers(opts.root ?? REPO_ROOT) ? { workers: opts.workers ?? 1 } : {}),
    log: { level: opts.logLevel ?? 'info' },
    tls: { min_version: 'TLSv1.3', certificates: [{ cert: cert.cert, key: cert.key }], dir: './certs' },
    timeouts: { shutdown_drain: '1s' },
    limits: { max_connections: 50_000 },
    control: { socket: './control.sock' },
    listeners: [
      { name: 'imaps', protocol: 'imap', tls: 'implicit', listen: `${HOST}:${p.imap}`, backend: `${HOST}:${backends.imap}` },
      { name: 'smtps', protocol: 'smtp', tls: 'implicit', listen: `${HOST}:${p.smtp}`, backend: `${HOST}:${backends.smtp}`, auth: 'required' },
      { name: 'https', protocol: 'http', tls: 'implicit', listen: `${HOST}:${p.http}`, backend: `${HOST}:${backends.http}` },
    ],
  };
  const configFile = path.join(dir, 'mailgate.yaml');
  await fsp.writeFile(configFile, stringify(config));
  const log = path.join(dir, 'mailgate.log');
  const cli = path.join(opts.root ?? REPO_ROOT, 'src/cli.ts');
  const proc = spawnServer(name, '/usr/bin/prlimit', [`--nofile=${NOFILE}:${NOFILE}`, process.execPath, ...(opts.nodeArgs ?? []), cli, 'run', '-c', configFile], {
    cwd: dir,
    outputFile: log,
    env: { ...process.env, ...opts.env },
  });
  const deadline = Date.now() + READY_MS;
  for (;;) {
    const text = await fsp.readFile(log, 'utf8').catch(() => '');
    if (text.includes('"msg":"mailgate ready"')) break;
    if (proc.exitInfo() || Date.now() > deadline) {
      await proc.stop(1000);
      throw new Error(`${name} did not start:\n${text.slice(-3000)}`);
    }
    await sleep(25);
  }
  return { name, ports: p, pgid: proc.pid, dir, stop: stopper(proc, dir) };
}

// ---- nginx mail + http proxy ------------------------------------------------

function nginxProxyConf(o: { dir: string; p: Ports; b: BackendPorts; auth: number; cert: Certificate; workers: number }): string {
  const tls = `ssl_certificate ${o.cert.cert};
  ssl_certificate_key ${o.cert.key};
  ssl_protocols TLSv1.3;`;
  return `# generated by bench/proxies.ts -- nginx mail + http proxy under test
load_module /usr/lib/nginx/modules/ngx_mail_module.so;
daemon off;
master_process on;
worker_processes ${o.workers};
worker_rlimit_nofile ${NOFILE};
pid ${o.dir}/nginx.pid;
error_log ${o.dir}/error.log error;
events {
  worker_connections 16000;
}
mail {
  server_name ${SNI};
  auth_http ${HOST}:${o.auth}/auth;
  proxy_pass_error_message on;
  proxy_buffer 16k;
  ${tls}
  server {
    listen ${HOST}:${o.p.imap} ssl backlog=4096;
    protocol imap;
    imap_auth login plain;
  }
  server {
    listen ${HOST}:${o.p.smtp} ssl backlog=4096;
    protocol smtp;
    smtp_auth login plain;
    xclient on;
  }
}
http {
  default_type application/octet-stream;
  client_body_temp_path ${o.dir}/tmp/client_body;
  proxy_temp_path ${o.dir}/tmp/proxy;
  fastcgi_temp_path ${o.dir}/tmp/fastcgi;
  uwsgi_temp_path ${o.dir}/tmp/uwsgi;
  scgi_temp_path ${o.dir}/tmp/scgi;
  access_log off;
  server_tokens off;
  keepalive_timeout 300s;
  keepalive_requests 10000000;
  upstream backend {
    server ${HOST}:${o.b.http};
    keepalive 64;
  }
  server {
    listen ${HOST}:${o.p.http} ssl http2 backlog=4096;
    ${tls}
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto https;
      proxy_max_temp_file_size 0;
    }
  }
}
`;
}

export async function startNginxProxy(backends: BackendPorts, cert: Certificate, workers = 1): Promise<Proxy> {
  const dir = await makeTempDir('bench-nginx-proxy');
  await fsp.mkdir(path.join(dir, 'tmp'), { mode: 0o755 });
  const p = await ports();
  const auth = await freePort();
  const authOut = path.join(dir, 'auth-http.log');
  const authProc = spawnServer('auth-http', process.execPath, [path.join(HERE, 'auth-http.ts'), String(auth), String(backends.imap), String(backends.smtp)], {
    cwd: dir,
    outputFile: authOut,
  });
  await waitUntilReady(
    'auth-http',
    [authProc],
    { port: auth, request: `GET /auth HTTP/1.0\r\nAuth-Protocol: imap\r\n\r\n`, expect: /Auth-Status: OK/i },
    () => describeFiles([authOut]),
    READY_MS,
  );
  const conf = path.join(dir, 'nginx.conf');
  await fsp.writeFile(conf, nginxProxyConf({ dir, p, b: backends, auth, cert, workers }));
  const out = path.join(dir, 'nginx.stderr');
  const proc = spawnServer('nginx proxy', '/usr/sbin/nginx', ['-e', path.join(dir, 'error.log'), '-p', dir, '-c', conf], { cwd: dir, outputFile: out });
  try {
    await waitForPorts('nginx proxy', proc, p, [out, path.join(dir, 'error.log')]);
  } catch (err) {
    await proc.stop(1000);
    await authProc.stop(1000);
    await removeTempDir(dir);
    throw err;
  }
  return { name: 'nginx', ports: p, pgid: proc.pid, dir, stop: stopper(proc, dir, () => authProc.stop(2000)) };
}

// ---- HAProxy ----------------------------------------------------------------------

function haproxyConf(o: { p: Ports; b: BackendPorts; cert: Certificate; workers: number }): string {
  const front = (name: string, port: number, backendPort: number) => `
frontend ${name}
  bind ${HOST}:${port} ssl crt ${o.cert.combined}
  default_backend ${name}_be
backend ${name}_be
  server s1 ${HOST}:${backendPort}
`;
  return `# generated by bench/proxies.ts -- HAProxy under test (TCP mode, TLS termination)
global
  nbthread ${o.workers}
  maxconn 8000
  ssl-default-bind-options ssl-min-ver TLSv1.3
defaults
  mode tcp
  timeout connect 5s
  timeout client 600s
  timeout server 600s
${front('imaps', o.p.imap, o.b.imap)}${front('smtps', o.p.smtp, o.b.smtp)}${front('https', o.p.http, o.b.http)}`;
}

export async function startHaproxy(backends: BackendPorts, cert: Certificate, workers = 1): Promise<Proxy> {
  const dir = await makeTempDir('bench-haproxy');
  const p = await ports();
  const conf = path.join(dir, 'haproxy.cfg');
  await fsp.writeFile(conf, haproxyConf({ p, b: backends, cert, workers }));
  const out = path.join(dir, 'haproxy.log');
  const proc = spawnServer('haproxy', '/usr/sbin/haproxy', ['-db', '-f', conf], { cwd: dir, outputFile: out });
  try {
    await waitForPorts('haproxy', proc, p, [out]);
  } catch (err) {
    await proc.stop(1000);
    await removeTempDir(dir);
    throw err;
  }
  return { name: 'haproxy', ports: p, pgid: proc.pid, dir, stop: stopper(proc, dir) };
}
