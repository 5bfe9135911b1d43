/**
 * Start and reload: the certificates ACME obtained earlier go into the
 * CertStore straight from storage, so a restart serves them at once and
 * orders nothing that is not due.
 */
import type { Config } from '../config/load.ts';
import { errorMessage } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import type { CertStore } from '../tls/cert-store.ts';
import { acmeSettings } from './settings.ts';
import { AcmeStorage } from './storage.ts';

export async function loadStoredAcmeCertificates(config: Config, store: CertStore, log: Logger): Promise<void> {
  const s = acmeSettings(config);
  if (!s) return;
  const storage = new AcmeStorage(s.storage, s.directory);
  const now = Date.now();
  for (const name of s.names) {
    let loaded;
    try {
      loaded = await storage.loadCert(name);
    } catch (err) {
      log.warn({ name, err: errorMessage(err) }, 'cannot read the stored ACME certificate');
      continue;
    }
    if (loaded.problem) log.warn({ name, problem: loaded.problem }, 'ignoring the stored ACME certificate');
    const c = loaded.cert;
    if (!c) continue;
    if (new Date(c.x509.validTo).getTime() <= now) {
      log.warn({ name, notAfter: new Date(c.x509.validTo).toISOString(), file: c.paths.certFile }, 'the stored ACME certificate has expired; not serving it');
      continue;
    }
    const def = store.defaultInfo();
    const info = store.put(c.certPem, c.keyPem, 'acme', { certFile: c.paths.certFile, makeDefault: !def || def.source === 'self-signed' });
    log.info({ names: info.names, notAfter: info.notAfter.toISOString(), file: c.paths.certFile }, 'certificate loaded');
  }
}
