/**
 * TLSA `3 1 1` data (DANE-EE, SubjectPublicKeyInfo, SHA-256; RFC 6698,
 * RFC 7671): the SHA-256 of the DER SubjectPublicKeyInfo of a certificate's
 * key, in hex. The same key gives the same value whatever certificate
 * carries it, which is why a kept key (acme.reuse_key) keeps its TLSA record
 * valid across renewals.
 */
import { createHash, createPublicKey, X509Certificate, type KeyObject } from 'node:crypto';

/** From a certificate or key in PEM (a private key gives its public half), or a key object. */
export function spkiSha256(from: string | KeyObject | X509Certificate): string {
  const key =
    from instanceof X509Certificate ? from.publicKey : typeof from === 'string' ? (from.includes('BEGIN CERTIFICATE') ? new X509Certificate(from).publicKey : createPublicKey(from)) : from;
  return createHash('sha256').update(key.export({ type: 'spki', format: 'der' })).digest('hex');
}
