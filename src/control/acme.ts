/**
 * The ACME part's commands on the control socket:
 *   certs.acme   per managed name: state, dates, next renewal (and why), ARI window, last error
 *   certs.renew  { names?: string[] } forces renewal now and answers when done
 * and a `cert` event to subscribers after each renewal attempt.
 */
import { z } from 'zod';
import { CommandError, certStatus, type ControlServer } from './server.ts';
import type { CertStore } from '../tls/cert-store.ts';
import type { AcmeManager } from '../acme/manager.ts';

export const ACME_COMMANDS = { status: 'certs.acme', renew: 'certs.renew' } as const;

const renewArgs = z.strictObject({
  names: z.array(z.string().min(1).max(253)).max(100).optional(),
});

/**
 * Registered once at start; `current` is read per request, so a reload that
 * adds or removes the acme: section needs no re-registration. The returned
 * function subscribes a (new) manager's updates as `cert` events, so the
 * dashboard sees failed attempts too (successes arrive through the
 * CertStore's own change events).
 */
export function registerAcmeCommands(control: ControlServer, current: () => AcmeManager | undefined, certs: CertStore): (acme: AcmeManager | undefined) => void {
  control.register(ACME_COMMANDS.status, z.strictObject({}), () => ({ configured: current() !== undefined, certs: current()?.status() ?? [] }));
  control.register(ACME_COMMANDS.renew, renewArgs, async (args) => {
    const acme = current();
    if (!acme) throw new CommandError('UNSUPPORTED', 'ACME is not configured (no acme: section in the configuration)');
    const results = await acme.renew(args.names);
    const failed = results.filter((r) => !r.ok);
    if (failed.length > 0) throw new CommandError('FAILED', failed.map((r) => `${r.name}: ${r.error ?? 'failed'}`).join('; '), results);
    return results;
  });
  return (acme) => {
    acme?.onUpdate((name) => {
      const info = certs.infoFor(name) ?? certs.defaultInfo();
      if (info && !acme.renewalFor({ names: [name] })?.failing) return;
      if (info) control.publish({ type: 'cert', at: Date.now(), cert: certStatus(info, acme.renewalFor({ names: [name] })) });
    });
  };
}
