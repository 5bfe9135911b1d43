/**
 * Protocol text travels as "binary strings" (latin1: one char per byte), so
 * bytes from either side pass through unchanged. Credentials are the one
 * thing that must be real Unicode (policy compares them with the config), so
 * they are converted at the edges with these two helpers.
 */
export function fromWire(s: string): string {
  return Buffer.from(s, 'latin1').toString('utf8');
}

export function toWire(s: string): string {
  return Buffer.from(s, 'utf8').toString('latin1');
}
