/**
 * Worker thread for bcrypt verification (bcryptjs is pure JavaScript and
 * would otherwise hold the event loop for the whole hash). One job at a time;
 * the pool in passwords.ts queues the rest.
 */
import { parentPort } from 'node:worker_threads';
import bcrypt from 'bcryptjs';

interface Request {
  id: number;
  password: string;
  hash: string;
}

const port = parentPort;
if (!port) throw new Error('hash-worker.ts runs only as a worker thread');

port.on('message', (m: Request) => {
  try {
    port.postMessage({ id: m.id, ok: bcrypt.compareSync(m.password, m.hash) });
  } catch (err) {
    // Reported to the pool, which rejects the job with HASH_INVALID.
    port.postMessage({ id: m.id, ok: false, error: err instanceof Error ? err.message : String(err) });
  }
});
