/**
 * Shared pieces of the fuzz suites: the run count (short in CI, long on
 * demand), a splitter that cuts a byte stream at generated offsets, and
 * drive(), which runs the product's own pre-login loop
 * (src/session/preauth-loop.ts, the one the session driver runs) over an
 * adapter, so adapters are fed exactly the way the daemon feeds them, minus
 * the sockets.
 *
 *   FUZZ_RUNS=100000 npm run test:fuzz     # a long run (default: a short smoke run per property)
 *   FUZZ_SEED=1234 FUZZ_PATH=... ...       # replay a failure fast-check reported
 */
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { MailgateError } from '../../../src/core/errors.ts';
import type { BackendCapabilities, BackendLink, CloseReason, Credentials, MailAdapter, ProtocolModule, SessionFacts, Step } from '../../../src/protocols/types.ts';
import { PreauthLoop, type PreauthHost } from '../../../src/session/preauth-loop.ts';

// Longer streams than fast-check's default "small" size (each fuzz file runs in its own process).
fc.configureGlobal({ ...fc.readConfigureGlobal(), baseSize: 'medium' });

/** Runs per property: FUZZ_RUNS when set, else the suite's short default. */
export function runs(smoke: number): number {
  const n = Number(process.env.FUZZ_RUNS);
  if (Number.isInteger(n) && n > 0) return n;
  return smoke;
}

/** fast-check parameters: run count, plus seed/path replay from the environment. */
export function params(smoke: number): fc.Parameters<unknown> {
  const p: fc.Parameters<unknown> = { numRuns: runs(smoke) };
  const seed = Number(process.env.FUZZ_SEED);
  if (Number.isInteger(seed)) p.seed = seed;
  if (process.env.FUZZ_PATH) p.path = process.env.FUZZ_PATH;
  return p;
}

/** Inputs tried so far, per suite; printed at the end of a run for the figures in the report. */
const tried = new Map<string, number>();
export function count(suite: string, n = 1): void {
  tried.set(suite, (tried.get(suite) ?? 0) + n);
}
process.once('exit', () => {
  if (tried.size === 0 || !process.env.FUZZ_REPORT) return;
  for (const [suite, n] of tried) process.stderr.write(`fuzz: ${suite}: ${n} inputs\n`);
});

/** Cuts `buf` at the given offsets (taken modulo its length, deduplicated, sorted). */
export function split(buf: Buffer, cuts: readonly number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => c % (buf.length + 1)))].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let prev = 0;
  for (const p of points) {
    out.push(buf.subarray(prev, p));
    prev = p;
  }
  out.push(buf.subarray(prev));
  return out.filter((c) => c.length > 0);
}

/** Offsets to cut a stream at: up to 12 cut points. */
export const cutsArb = fc.array(fc.nat(100_000), { maxLength: 12 });

export interface DriveOptions {
  /** TLS came up (the driver's startTls): flips the facts; the loop is then told, as the driver tells it. */
  tlsUp(): void;
  /** Answers a login the way policy or the backend would: the adapter's refusal text. */
  loginAnswer?(adapter: MailAdapter, credentials: Credentials | null): string;
}

export interface DriveResult {
  /** Everything written to the client, in order. */
  out: string;
  closed: CloseReason | undefined;
  steps: Step[];
  logins: (Credentials | null)[];
  /** The most the line reader held after a chunk was processed. */
  maxBuffered: number;
  /** Lines read in command position (not literal bytes) and how many of them got no answer at all. */
  lines: number;
  silent: number;
  /** The most bytes (lines and literal data) one command took in before it was answered. */
  maxCommandBytes: number;
}

/**
 * The product's pre-login loop (src/session/preauth-loop.ts), with the
 * module's own adapter and dialogue rules, fed chunk by chunk the way the
 * session driver feeds it, minus the sockets: TLS comes up at once after
 * STARTTLS, and every login is answered with a refusal (it counts against
 * max_auth_attempts). The adapter is watched, not replaced, to record what it
 * was given and answered.
 */
export function drive(module: ProtocolModule, facts: SessionFacts, caps: BackendCapabilities | undefined, chunks: readonly Buffer[], opts: DriveOptions): DriveResult {
  const r: DriveResult = { out: '', closed: undefined, steps: [], logins: [], maxBuffered: 0, lines: 0, silent: 0, maxCommandBytes: 0 };
  let real: MailAdapter | undefined;
  const watched: ProtocolModule = {
    ...module,
    createAdapter: (f, c) => {
      real = module.createAdapter(f, c);
      return watch(real, r);
    },
  };
  const host: PreauthHost = {
    write: (data) => void (r.out += data),
    startTls: () => {
      opts.tlsUp();
      loop.tlsStarted();
    },
    login: (credentials) => {
      r.logins.push(credentials);
      const adapter = real!;
      const answer = opts.loginAnswer ? opts.loginAnswer(adapter, credentials) : adapter.loginRefusal('denied');
      if (loop.loginFailed(answer) === 'again') loop.resume();
    },
    close: (reason, words) => {
      r.out += words;
      r.closed = reason;
    },
  };
  const loop = new PreauthLoop(watched, facts, host);
  loop.greet(caps);
  for (const chunk of chunks) {
    if (r.closed) break;
    loop.push(chunk);
    r.maxBuffered = Math.max(r.maxBuffered, loop.buffered);
  }
  return r;
}

/** The adapter as it is, recording each line and literal it is given and the step it answers with. */
function watch(adapter: MailAdapter, r: DriveResult): MailAdapter {
  let pending = 0;
  const seen = (step: Step, bytes: number): Step => {
    pending += bytes;
    r.steps.push(step);
    assertStep(step);
    r.maxCommandBytes = Math.max(r.maxCommandBytes, pending);
    // A literal (and the empty answer to its bytes) continues the command; anything else ends it.
    if (step.kind !== 'literal' && !(step.kind === 'reply' && step.data === '')) pending = 0;
    return step;
  };
  return {
    greeting: () => adapter.greeting(),
    onLine: (line, tally) => {
      r.lines++;
      const step = adapter.onLine(line, tally);
      if (step.kind === 'reply' && step.data === '') r.silent++;
      return seen(step, line.length + 2);
    },
    onLiteral: (data) => seen(adapter.onLiteral(data), data.length),
    tlsStarted: () => adapter.tlsStarted(),
    refusal: (why, text) => adapter.refusal(why, text),
    loginRefusal: (why, text, fromRule) => adapter.loginRefusal(why, text, fromRule),
    login: (backend, credentials, caps) => adapter.login(backend, credentials, caps),
    goodbye: (why) => adapter.goodbye(why),
  };
}

function assertStep(step: Step): void {
  switch (step.kind) {
    case 'reply':
    case 'starttls':
    case 'close':
      assert.equal(typeof step.data, 'string');
      return;
    case 'literal':
      assert.ok(Number.isSafeInteger(step.size) && step.size >= 0, `literal size ${step.size}`);
      return;
    case 'login':
      return;
    default: {
      const never: never = step;
      assert.fail(`unknown step ${JSON.stringify(never)}`);
    }
  }
}

/** Splits client-bound text into lines, asserting every one ends in CRLF and none holds a bare CR, LF or NUL. */
export function crlfLines(out: string): string[] {
  if (out === '') return [];
  assert.ok(out.endsWith('\r\n'), `output ends mid-line: ${JSON.stringify(out.slice(-80))}`);
  const lines = out.slice(0, -2).split('\r\n');
  for (const l of lines) assert.doesNotMatch(l, /[\r\n\0]/, `bare CR/LF or NUL in a line sent to the client: ${JSON.stringify(l)}`);
  return lines;
}

/** Credentials handed on must never carry a byte that could end or split a backend command. */
export function assertCleanCredentials(c: Credentials | null): void {
  if (!c) return;
  for (const v of [c.user, c.password, c.authzid ?? '']) assert.doesNotMatch(v, /[\0\r\n]/, `CR/LF/NUL in credentials: ${JSON.stringify(c)}`);
  assert.ok(c.user.length > 0, 'an empty user name is never handed on');
}

/**
 * A backend for the login replay that answers from a fixed list of lines and,
 * once they run out, rejects the way SocketLink does at its deadline. Every
 * read past the end is counted: a well-behaved adapter stops at the first
 * rejection.
 */
export class ScriptLink implements BackendLink {
  readonly written: string[] = [];
  reads = 0;
  readsAfterEnd = 0;
  private next = 0;
  private readonly lines: readonly string[];
  private readonly end: 'timeout' | 'closed';

  constructor(lines: readonly string[], end: 'timeout' | 'closed' = 'timeout') {
    this.lines = lines;
    this.end = end;
  }

  readLine(): Promise<string> {
    this.reads++;
    if (this.next < this.lines.length) return Promise.resolve(this.lines[this.next++]!);
    this.readsAfterEnd++;
    return Promise.reject(
      this.end === 'timeout' ? new MailgateError('BACKEND_TIMEOUT', 'deadline') : new MailgateError('BACKEND_CLOSED', 'backend closed'),
    );
  }

  write(data: string): void {
    this.written.push(data);
  }
}

/** Settles `p` or fails the property when it hangs (a fake link never blocks, so a hang is a bug). */
export async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not settle within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([p, hang]);
  } finally {
    clearTimeout(timer);
  }
}

/** Random bytes weighted towards the characters protocol parsers care about. */
export const nastyByte = fc.oneof(
  { weight: 3, arbitrary: fc.integer({ min: 0x20, max: 0x7e }) },
  { weight: 2, arbitrary: fc.constantFrom(0x0d, 0x0a, 0x00, 0x20, 0x09, 0x22, 0x5c, 0x7b, 0x7d, 0x28, 0x29, 0x2b, 0x2a, 0x3d, 0x2e) },
  { weight: 1, arbitrary: fc.integer({ min: 0, max: 255 }) },
);
export const nastyBytes = (maxLength: number) => fc.array(nastyByte, { maxLength }).map((a) => Buffer.from(a));
export const nastyText = (maxLength: number) => nastyBytes(maxLength).map((b) => b.toString('latin1'));
