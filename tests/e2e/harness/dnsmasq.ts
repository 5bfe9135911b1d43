// dnsmasq (Debian package dnsmasq-base) as an authoritative-enough DNS server
// for `mailgate dns --check`: on 127.0.0.1 and a free high port, in a temp
// folder (its pid file there), reading no configuration file, no
// /etc/hosts and no resolv.conf, forwarding nothing: it answers exactly the
// records it was started with (--mx-host, --srv-host, --cname with a
// --host-record for the target, --txt-record, --dns-rr for TLSA), and
// NXDOMAIN or no data for other names in their zones (--local). A TXT text with a comma (TLS-RPT's
// rua list) goes into a records file in the temp folder instead: dnsmasq
// splits a --txt-record at every comma on the command line and honours
// quotes only in a file. The system's resolver configuration
// is never touched: the gateway's CLI is pointed at it with --resolver.
// restart() starts it again with other records on the same port.

import { Resolver } from 'node:dns/promises';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { describeFiles, freePort, makeTempDir, removeTempDir, sleep, spawnServer, type ManagedProcess } from '../../helpers/proc.ts';

/** A record as `mailgate dns --json` describes it (src/discovery/records.ts). */
export type ZoneRecord =
  | { type: 'MX'; name: string; priority: number; exchange: string }
  | { type: 'SRV'; name: string; priority: number; weight: number; port: number; target: string }
  | { type: 'CNAME'; name: string; target: string }
  | { type: 'TXT'; name: string; text: string }
  | { type: 'TLSA'; name: string; usage: number; selector: number; matching: number; data: string };

export interface Dnsmasq {
  /** "127.0.0.1:PORT", for --resolver. */
  address: string;
  port: number;
  dir: string;
  /** Serves these records from now on (dnsmasq is started again on the same port). */
  restart(records: readonly ZoneRecord[]): Promise<void>;
  logs(): Promise<string>;
  stop(): Promise<void>;
}

/**
 * The dnsmasq options that serve `records` (`file`: lines for the records
 * file); CNAME targets get an address of their own (dnsmasq answers a CNAME
 * only to a name it knows).
 */
export function dnsmasqArgs(records: readonly ZoneRecord[]): { args: string[]; file: string[] } {
  const args: string[] = [];
  const file: string[] = [];
  const targets = new Set<string>();
  for (const r of records) {
    switch (r.type) {
      case 'MX':
        args.push(`--mx-host=${r.name},${r.exchange},${r.priority}`);
        break;
      case 'SRV':
        // No target: "the service is decidedly not available" (a record with target ".").
        args.push(r.target === '.' ? `--srv-host=${r.name}` : `--srv-host=${r.name},${r.target},${r.port},${r.priority},${r.weight}`);
        break;
      case 'CNAME':
        args.push(`--cname=${r.name},${r.target}`);
        targets.add(r.target);
        break;
      case 'TXT':
        if (r.text.includes(',')) file.push(`txt-record=${r.name},"${r.text}"`);
        else args.push(`--txt-record=${r.name},${r.text}`);
        break;
      case 'TLSA': {
        const hex = [r.usage, r.selector, r.matching].map((n) => n.toString(16).padStart(2, '0')).join('') + r.data;
        args.push(`--dns-rr=${r.name},52,${hex}`);
        break;
      }
      default: {
        const never: never = r;
        throw new Error(`unknown record ${JSON.stringify(never)}`);
      }
    }
  }
  for (const t of targets) args.push(`--host-record=${t},127.0.0.1`);
  // Local zones: a name without the record asked for is NXDOMAIN/NODATA, as from an authoritative server, not REFUSED.
  for (const zone of new Set(records.map((r) => r.name.split('.').slice(-2).join('.')))) args.push(`--local=/${zone}/`);
  return { args, file };
}

export async function startDnsmasq(records: readonly ZoneRecord[]): Promise<Dnsmasq> {
  const dir = await makeTempDir('dnsmasq');
  const port = await freePort();
  const outputFile = path.join(dir, 'dnsmasq.log');
  let proc: ManagedProcess | undefined;

  const start = async (rs: readonly ZoneRecord[]) => {
    const { args, file } = dnsmasqArgs(rs);
    const recordsFile = path.join(dir, 'records.conf');
    await fsp.writeFile(recordsFile, file.map((l) => `${l}\n`).join(''));
    proc = spawnServer(
      'dnsmasq',
      '/usr/sbin/dnsmasq',
      [
        '--keep-in-foreground',
        // No /etc/dnsmasq.conf: only the records file of this instance.
        `--conf-file=${recordsFile}`,
        '--no-resolv',
        '--no-hosts',
        '--no-poll',
        '--listen-address=127.0.0.1',
        '--bind-interfaces',
        `--port=${port}`,
        `--pid-file=${path.join(dir, 'dnsmasq.pid')}`,
        '--log-queries',
        '--log-facility=-',
        ...args,
      ],
      { cwd: dir, outputFile },
    );
    // Ready when it answers: any DNS answer (NXDOMAIN included) means it listens; a timeout or refusal to connect does not.
    const resolver = new Resolver({ timeout: 500, tries: 1 });
    resolver.setServers([`127.0.0.1:${port}`]);
    const deadline = Date.now() + 10_000;
    for (;;) {
      const info = proc.exitInfo();
      if (info) throw new Error(`dnsmasq exited (${JSON.stringify(info)})\n${await describeFiles([outputFile])}`);
      const answered = await resolver.resolveTxt('ready.probe.invalid').then(
        () => true,
        (err: { code?: string }) => err.code === 'ENOTFOUND' || err.code === 'ENODATA' || err.code === 'EREFUSED',
      );
      if (answered) return;
      if (Date.now() > deadline) throw new Error(`dnsmasq not answering on 127.0.0.1:${port}\n${await describeFiles([outputFile])}`);
      await sleep(50);
    }
  };

  try {
    await start(records);
  } catch (err) {
    await proc?.stop();
    await removeTempDir(dir);
    throw err;
  }
  let stopping: Promise<void> | undefined;
  return {
    address: `127.0.0.1:${port}`,
    port,
    dir,
    async restart(rs) {
      await proc?.stop();
      await start(rs);
    },
    logs: () => describeFiles([outputFile], 200),
    stop() {
      stopping ??= (async () => {
        await proc?.stop();
        await removeTempDir(dir);
      })();
      return stopping;
    },
  };
}
