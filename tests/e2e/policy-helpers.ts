/** Helpers for the brute-force end-to-end tests: a storm of parallel guesses through imaplib, and Dovecot's own count of password checks. */
import { python } from './harness/clients.ts';
import type { Dovecot } from './harness/servers.ts';

export interface Storm {
  /** What each guess was answered: OK, NO ... or an error. */
  answers: string[];
  victim: { ok: boolean; error?: string };
}

/**
 * `n` connections from `source`, each greeted, then all send `a LOGIN user guess-i` at once (a
 * barrier); 0.5 s later, while the guesses wait for Dovecot, the victim logs in from `victimSource`.
 */
export function storm(ports: number[], n: number, user: string, source: string, victim: { user: string; password: string; source: string }): Promise<Storm> {
  return python<Storm>(
    `
import imaplib, threading, time
ports = [int(p) for p in sys.argv[1].split(',')]
n, user, source = int(sys.argv[2]), sys.argv[3], sys.argv[4]
vuser, vpass, vsource = sys.argv[5], sys.argv[6], sys.argv[7]
class From(imaplib.IMAP4_SSL):
    def __init__(self, port, src):
        self.src = src
        super().__init__('127.0.0.1', port, ssl_context=ctx(), timeout=30)
    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.src, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)
barrier = threading.Barrier(n)
answers = [None] * n
def guess(i):
    try:
        m = From(ports[i % len(ports)], source)
    except Exception as e:
        barrier.wait()
        answers[i] = 'connect: %s' % e
        return
    barrier.wait()
    try:
        typ, data = m.login(user, 'guess-%d' % i)
        answers[i] = typ
    except imaplib.IMAP4.error as e:
        answers[i] = 'NO %s' % e
    except Exception as e:
        answers[i] = 'error: %s' % e
threads = [threading.Thread(target=guess, args=(i,)) for i in range(n)]
for t in threads: t.start()
time.sleep(0.5)
try:
    v = From(ports[0], vsource)
    v.login(vuser, vpass)
    v.logout()
    victim = {'ok': True}
except Exception as e:
    victim = {'ok': False, 'error': str(e)}
for t in threads: t.join()
out({'answers': answers, 'victim': victim})
`,
    [ports.join(','), n, user, source, victim.user, victim.password, victim.source],
    120_000,
  );
}

/** Password checks Dovecot made for `user` from `rip` (auth_verbose logs each mismatch). */
export async function checksAt(d: Dovecot, user: string, rip: string): Promise<number> {
  const log = await d.logs();
  return log.split('\n').filter((l) => l.includes(`passwd-file(${user},${rip}`) && /password mismatch/i.test(l)).length;
}

/** Answers counted by kind, for an assertion message: {"NO [AUTHENTICATIONFAILED] ...": 5, ...}. */
export function summary(answers: string[]): string {
  const by = new Map<string, number>();
  for (const a of answers) by.set(a, (by.get(a) ?? 0) + 1);
  return JSON.stringify(Object.fromEntries(by));
}
