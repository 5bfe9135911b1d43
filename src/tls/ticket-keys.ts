/**
 * Session ticket keys: one 48-byte key set (name, HMAC and AES keys, as
 * OpenSSL wants them) for every TLS context, replaced every `rotateMs`.
 *
 * Node gives every SecureContext random keys of its own that never change:
 * a worker could not resume another worker's tickets, and a key stolen from
 * memory would decrypt every ticket since start. One rotating key fixes both.
 * Rotation ends resumption of tickets issued before it (their lifetime is
 * Node's 300 s session timeout, so few), never a live session.
 */
import { randomBytes } from 'node:crypto';

export const TICKET_KEY_BYTES = 48;
export const TICKET_ROTATE_MS = 12 * 60 * 60 * 1000;

export class TicketKeys {
  private keys: Buffer = randomBytes(TICKET_KEY_BYTES);
  private readonly listeners = new Set<(keys: Buffer) => void>();
  private readonly timer: NodeJS.Timeout;

  constructor(rotateMs = TICKET_ROTATE_MS) {
    this.timer = setInterval(() => this.rotate(), rotateMs);
    this.timer.unref();
  }

  get current(): Buffer {
    return this.keys;
  }

  rotate(): void {
    this.keys = randomBytes(TICKET_KEY_BYTES);
    for (const l of this.listeners) l(this.keys);
  }

  /** Called with every new key set (not the current one). */
  onRotate(listener: (keys: Buffer) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  stop(): void {
    clearInterval(this.timer);
    this.listeners.clear();
  }
}
