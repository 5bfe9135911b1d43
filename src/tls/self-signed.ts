/**
 * The bootstrap certificate: a self-signed RSA certificate made with
 * node-forge for the gateway's host name, so a fresh install serves TLS at
 * once. Written atomically, key at mode 0600, and reused on later starts.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import forge from 'node-forge';
import { writeFileAtomic } from '../core/atomic-file.ts';
import { errorMessage, MailgateError } from '../core/errors.ts';

export interface PemPair {
  cert: string;
  key: string;
  certFile: string;
  keyFile: string;
}

/** Host names become file names: keep them to a safe alphabet. */
export function safeFileStem(name: string): string {
  const stem = name.toLowerCase().replace(/[^a-z0-9.-]/g, '_').replace(/^\.+/, '_');
  return stem.slice(0, 200) || 'default';
}

export function selfSignedPaths(dir: string, hostname: string): { certFile: string; keyFile: string } {
  const stem = safeFileStem(hostname);
  return { certFile: join(dir, `${stem}.selfsigned.crt`), keyFile: join(dir, `${stem}.selfsigned.key`) };
}

/** Generation takes about a second of CPU for a 2048-bit key; it runs once per host name, at first start. */
export async function loadOrCreateSelfSigned(dir: string, hostname: string): Promise<PemPair & { created: boolean }> {
  const { certFile, keyFile } = selfSignedPaths(dir, hostname);
  if (existsSync(certFile) && existsSync(keyFile)) {
    try {
      return { cert: readFileSync(certFile, 'utf8'), key: readFileSync(keyFile, 'utf8'), certFile, keyFile, created: false };
    } catch (err) {
      throw new MailgateError('CERT_LOAD', `cannot read ${certFile} or ${keyFile}`, { cause: err });
    }
  }
  const { cert, key } = await generateSelfSigned(hostname);
  try {
    // Key first: a certificate on disk without its key would be reused and fail.
    await writeFileAtomic(keyFile, key, 0o600);
    await writeFileAtomic(certFile, cert, 0o644);
  } catch (err) {
    // The cause (ENOSPC, EACCES, ...) is what the admin needs to read in the log.
    throw new MailgateError('CERT_WRITE', `cannot write the self-signed certificate to ${dir}: ${errorMessage(err)}`, { cause: err });
  }
  return { cert, key, certFile, keyFile, created: true };
}

export function generateSelfSigned(hostname: string, validDays = 825): Promise<{ cert: string; key: string }> {
  return new Promise((resolve, reject) => {
    // workers: -1 lets forge use web workers where it can; in Node it falls back to async steps off the hot path.
    forge.pki.rsa.generateKeyPair({ bits: 2048, workers: -1 }, (err, keys) => {
      if (err) {
        reject(new MailgateError('CERT_WRITE', 'self-signed key generation failed', { cause: err }));
        return;
      }
      const cert = forge.pki.createCertificate();
      cert.publicKey = keys.publicKey;
      cert.serialNumber = '01' + forge.util.bytesToHex(forge.random.getBytesSync(15));
      const now = new Date();
      cert.validity.notBefore = new Date(now.getTime() - 60_000);
      cert.validity.notAfter = new Date(now.getTime() + validDays * 86_400_000);
      const attrs = [
        { name: 'commonName', value: hostname },
        { name: 'organizationName', value: 'mailgate self-signed' },
      ];
      cert.setSubject(attrs);
      cert.setIssuer(attrs);
      cert.setExtensions([
        { name: 'basicConstraints', cA: false },
        { name: 'keyUsage', digitalSignature: true, keyEncipherment: true },
        { name: 'extKeyUsage', serverAuth: true },
        { name: 'subjectAltName', altNames: [{ type: 2, value: hostname }] },
      ]);
      cert.sign(keys.privateKey, forge.md.sha256.create());
      resolve({ cert: forge.pki.certificateToPem(cert), key: forge.pki.privateKeyToPem(keys.privateKey) });
    });
  });
}
