/**
 * The one way a test waits for something that happens a moment later: polls
 * `check` until it returns a value that is not undefined, null or false, and
 * resolves with that value; after `timeoutMs` it rejects with an error that
 * names `what` (and, when given, `detail()` such as the log so far).
 */
export interface WaitOptions {
  /** Default 5 s. */
  timeoutMs?: number;
  /** Between checks; default 20 ms. */
  intervalMs?: number;
  /** Added to the timeout error: what the test saw instead. */
  detail?: () => string | Promise<string>;
}

export type Found<T> = Exclude<T, undefined | null | false>;

export async function waitFor<T>(what: string, check: () => T | Promise<T>, opts: WaitOptions = {}): Promise<Found<T>> {
  const timeoutMs = opts.timeoutMs ?? 5_000;
  const intervalMs = opts.intervalMs ?? 20;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v !== undefined && v !== null && v !== false) return v as Found<T>;
    if (Date.now() >= deadline) {
      const detail = opts.detail ? `\n${await opts.detail()}` : '';
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${detail}`);
    }
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}
