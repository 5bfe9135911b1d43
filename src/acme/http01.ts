/**
 * The HTTP-01 answers pending now, of whichever ACME manager runs (none when
 * the config has no acme: section). A reload may start or stop ACME; this
 * stays, so the serving part asks it per request (in one process) and the
 * worker pool sends what it holds to every worker when it changes.
 */
import type { AcmeManager } from './manager.ts';

export class Http01Answers {
  private acme: AcmeManager | undefined;
  private off: (() => void) | undefined;
  private readonly listeners = new Set<(pending: [string, string][]) => void>();

  /** Answers from `acme` from now on (told to listeners at once). */
  follow(acme: AcmeManager | undefined): void {
    this.off?.();
    this.acme = acme;
    this.off = acme?.onTokens(() => this.changed());
    this.changed();
  }

  /** The key authorization for a token, for `/.well-known/acme-challenge/<token>`. */
  readonly answer = (token: string): string | undefined => this.acme?.http01Responder(token);

  /** token → key authorization, for a worker that starts mid-order. */
  pending(): [string, string][] {
    return this.acme?.pendingTokens() ?? [];
  }

  onChange(listener: (pending: [string, string][]) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  close(): void {
    this.off?.();
    this.listeners.clear();
  }

  private changed(): void {
    const pending = this.pending();
    for (const l of this.listeners) l(pending);
  }
}
