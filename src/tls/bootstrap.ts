import type { Config } from '../config/load.ts';
import type { Logger } from '../core/log.ts';
import { CertStore } from './cert-store.ts';
import { loadOrCreateSelfSigned } from './self-signed.ts';

/**
 * Builds the certificate store a config asks for: the configured files (the
 * first is the default), or a self-signed certificate for the host name until
 * a real one exists (the runtime adds what ACME obtained earlier, src/main.ts).
 * At a reload, pass the running store's ticket keys: each context is then built once (a TLS context holds its certificate, key and
 * OpenSSL state natively, out of the garbage collector's sight).
 */
export async function buildCertStore(config: Config, log: Logger, ticketKeys?: Buffer): Promise<CertStore> {
  const store = new CertStore(config.tls.min_version, ticketKeys);
  config.tls.certificates.forEach((c, i) => {
    const info = store.loadFiles(c.cert, c.key, i === 0);
    log.info({ names: info.names, notAfter: info.notAfter.toISOString(), file: c.cert }, 'certificate loaded');
  });
  if (config.tls.certificates.length === 0) {
    const pair = await loadOrCreateSelfSigned(config.tls.dir, config.hostname);
    const info = store.put(pair.cert, pair.key, 'self-signed', { certFile: pair.certFile, makeDefault: true });
    log.warn(
      { names: info.names, file: pair.certFile, created: pair.created },
      'serving a self-signed certificate: clients will warn until a real certificate is configured',
    );
  }
  return store;
}
