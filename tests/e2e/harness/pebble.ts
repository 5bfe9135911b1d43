// Pebble, Let's Encrypt's ACME test CA (Debian package `pebble`), for the
// certificate tests: pebble plus pebble-challtestsrv as its DNS server, both
// on 127.0.0.1 high ports in a temp folder.
//
//  - challtestsrv answers every A query with 127.0.0.1 and AAAA with nothing,
//    so any name (mail.acme.test) resolves to the gateway on loopback; its
//    own challenge servers are switched off.
//  - Pebble's VA validates http-01 on `httpPort` and tls-alpn-01 on `tlsPort`
//    of 127.0.0.1: the gateway's plain http and https listener ports.
//  - Pebble's own HTTPS certificate is made here with openssl; `caBundle` is
//    the file to give the gateway as acme.ca_bundle.
//  - Validity is `certificateValidityPeriod` (seconds), so short-lived
//    certificates and their renewal run in seconds.
//  - Env: PEBBLE_VA_NOSLEEP=1 (no random validation delay),
//    PEBBLE_WFE_NONCEREJECT=0 (no random badNonce), PEBBLE_AUTHZREUSE=0 (every
//    order runs its challenge), PEBBLE_VA_ALWAYS_VALID=0 (really validate).
//  - stop()/start() of Pebble alone (the CA "down" and back); Pebble keeps no
//    state, so after a restart it has a new root and forgets all accounts.
//
// Pebble 2.4 (Debian bookworm/trixie) has no ARI (renewalInfo) and no
// profiles; `directory()` says what this one offers.

import { execFile } from 'node:child_process';
import * as fsp from 'node:fs/promises';
import * as https from 'node:https';
import * as path from 'node:path';
import { describeFiles, freePort, makeTempDir, removeTempDir, sleep, spawnServer, type ManagedProcess } from '../../helpers/proc.ts';

export interface Pebble {
  dir: string;
  /** https://127.0.0.1:PORT/dir */
  directoryUrl: string;
  origin: string;
  /** PEM file: Pebble's HTTPS certificate (acme.ca_bundle for the gateway). */
  caBundle: string;
  /** Pebble's HTTPS key (for a proxy in front of it). */
  tlsKey: string;
  port: number;
  managementPort: number;
  /** The root of the chain Pebble issues under now (changes on every Pebble start). */
  root(): Promise<string>;
  /** Writes root() to a file in dir and returns its path (an -CAfile for openssl). */
  rootFile(): Promise<string>;
  directory(): Promise<Record<string, unknown>>;
  /** Stops Pebble only (challtestsrv keeps running): the CA is down. */
  stopCa(): Promise<void>;
  /** Starts Pebble again with the same config and ports (fresh state, new root). */
  startCa(): Promise<void>;
  logs(): Promise<string>;
  stop(): Promise<void>;
}

export interface PebbleOptions {
  /** Where Pebble's VA connects for http-01 (the gateway's plain http listener). */
  httpPort: number;
  /** Where Pebble's VA connects for tls-alpn-01 (the gateway's https listener). */
  tlsPort: number;
  /** Certificate lifetime in seconds (default: Pebble's 5 years minus a bit). */
  validitySeconds?: number;
}

function execOk(cmd: string, args: string[], cwd: string): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { cwd, timeout: 20_000 }, (err, _out, stderr) => (err ? reject(new Error(`${cmd} failed: ${stderr || err.message}`)) : resolve()));
  });
}

/** GET over https trusting `ca`; resolves with status and body. */
export function httpsGet(url: string, ca: string, timeoutMs = 5000): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = https.get(url, { ca, timeout: timeoutMs }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${url}: timeout`)));
    req.on('error', reject);
  });
}

export async function startPebble(opts: PebbleOptions): Promise<Pebble> {
  const dir = await makeTempDir('pebble');
  const [port, managementPort, dnsPort, challMgmtPort] = [await freePort(), await freePort(), await freePort(), await freePort()];
  const tlsCert = path.join(dir, 'pebble-https.crt');
  const tlsKey = path.join(dir, 'pebble-https.key');
  await execOk(
    'openssl',
    ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', tlsKey, '-out', tlsCert, '-days', '2', '-subj', '/CN=pebble-e2e', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost'],
    dir,
  );
  const configFile = path.join(dir, 'pebble.json');
  await fsp.writeFile(
    configFile,
    JSON.stringify({
      pebble: {
        listenAddress: `127.0.0.1:${port}`,
        managementListenAddress: `127.0.0.1:${managementPort}`,
        certificate: tlsCert,
        privateKey: tlsKey,
        httpPort: opts.httpPort,
        tlsPort: opts.tlsPort,
        ocspResponderURL: '',
        externalAccountBindingRequired: false,
        ...(opts.validitySeconds ? { certificateValidityPeriod: opts.validitySeconds } : {}),
      },
    }),
  );
  const pebbleOut = path.join(dir, 'pebble.log');
  const challOut = path.join(dir, 'challtestsrv.log');
  const env = { ...process.env, PEBBLE_VA_NOSLEEP: '1', PEBBLE_VA_ALWAYS_VALID: '0', PEBBLE_WFE_NONCEREJECT: '0', PEBBLE_AUTHZREUSE: '0' };
  const caPem = await fsp.readFile(tlsCert, 'utf8');
  const origin = `https://127.0.0.1:${port}`;
  const describe = () => describeFiles([pebbleOut, challOut]);

  const chall = spawnServer(
    'pebble-challtestsrv',
    'pebble-challtestsrv',
    ['-defaultIPv4', '127.0.0.1', '-defaultIPv6', '', '-dns01', `127.0.0.1:${dnsPort}`, '-http01', '', '-https01', '', '-tlsalpn01', '', '-management', `127.0.0.1:${challMgmtPort}`],
    { cwd: dir, outputFile: challOut },
  );
  let ca: ManagedProcess | undefined;

  const startCa = async () => {
    ca = spawnServer('pebble', 'pebble', ['-config', configFile, '-dnsserver', `127.0.0.1:${dnsPort}`], { cwd: dir, env, outputFile: pebbleOut });
    const deadline = Date.now() + 15_000;
    for (;;) {
      const info = ca.exitInfo() ?? chall.exitInfo();
      if (info) throw new Error(`pebble exited before it was ready (${JSON.stringify(info)})\n${await describe()}`);
      try {
        const r = await httpsGet(`${origin}/dir`, caPem, 1000);
        if (r.status === 200) return;
      } catch {
        // not listening yet
      }
      if (Date.now() > deadline) throw new Error(`pebble not ready on ${origin}\n${await describe()}`);
      await sleep(50);
    }
  };

  const stopAll = async () => {
    await ca?.stop();
    await chall.stop();
  };
  try {
    await startCa();
  } catch (err) {
    await stopAll();
    await removeTempDir(dir);
    throw err;
  }

  let stopping: Promise<void> | undefined;
  const pebble: Pebble = {
    dir,
    directoryUrl: `${origin}/dir`,
    origin,
    caBundle: tlsCert,
    tlsKey,
    port,
    managementPort,
    async root() {
      const r = await httpsGet(`https://127.0.0.1:${managementPort}/roots/0`, caPem);
      if (r.status !== 200) throw new Error(`pebble /roots/0: HTTP ${r.status}`);
      return r.body;
    },
    async rootFile() {
      const file = path.join(dir, `root-${Date.now()}.pem`);
      await fsp.writeFile(file, await pebble.root());
      return file;
    },
    async directory() {
      const r = await httpsGet(`${origin}/dir`, caPem);
      return JSON.parse(r.body) as Record<string, unknown>;
    },
    async stopCa() {
      await ca?.stop();
      ca = undefined;
    },
    startCa,
    logs: () => fsp.readFile(pebbleOut, 'utf8').catch(() => ''),
    stop() {
      stopping ??= (async () => {
        await stopAll();
        await removeTempDir(dir);
      })();
      return stopping;
    },
  };
  return pebble;
}
