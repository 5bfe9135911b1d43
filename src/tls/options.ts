/**
 * TLS settings shared by every listener: TLS 1.2 minimum, forward-secret
 * AEAD suites only (Mozilla "intermediate"), server cipher order, no
 * compression, no renegotiation.
 */
import { constants } from 'node:crypto';
import type { SecureContextOptions } from 'node:tls';
import { ACME_TLS_ALPN, selectAcmeTlsAlpn } from './acme-alpn.ts';

export const TLS12_CIPHERS = [
  'ECDHE-ECDSA-AES128-GCM-SHA256',
  'ECDHE-RSA-AES128-GCM-SHA256',
  'ECDHE-ECDSA-AES256-GCM-SHA384',
  'ECDHE-RSA-AES256-GCM-SHA384',
  'ECDHE-ECDSA-CHACHA20-POLY1305',
  'ECDHE-RSA-CHACHA20-POLY1305',
].join(':');

export const TLS13_CIPHERSUITES = 'TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256';

export function secureContextOptions(minVersion: 'TLSv1.2' | 'TLSv1.3'): SecureContextOptions {
  return {
    minVersion,
    ciphers: `${TLS13_CIPHERSUITES}:${TLS12_CIPHERS}`,
    honorCipherOrder: true,
    ecdhCurve: 'X25519:P-256:P-384',
    secureOptions:
      constants.SSL_OP_NO_SSLv2 |
      constants.SSL_OP_NO_SSLv3 |
      constants.SSL_OP_NO_TLSv1 |
      constants.SSL_OP_NO_TLSv1_1 |
      constants.SSL_OP_NO_COMPRESSION |
      constants.SSL_OP_NO_RENEGOTIATION,
  };
}

/**
 * ALPN ids per protocol (IANA registry). A client that offers ALPN but none of
 * ours is talking another protocol to this port (the ALPACA cross-protocol
 * attack): answering undefined makes Node end the handshake with the
 * no_application_protocol alert. A client without ALPN is let through.
 * "acme-tls/1" alone is selected for an ACME TLS-ALPN-01 validation, which
 * the certificate callback then answers only if a challenge is pending for
 * that name (acme-alpn.ts).
 */
export const ALPN_IDS: Record<'imap' | 'pop3' | 'smtp' | 'http', readonly string[]> = {
  imap: ['imap'],
  pop3: ['pop3'],
  smtp: ['smtp'],
  http: ['http/1.1', 'http/1.0'],
};

export function alpnSelector(
  protocol: keyof typeof ALPN_IDS,
  ours: readonly string[] = ALPN_IDS[protocol],
): (this: unknown, arg: { servername: string; protocols: string[] }) => string | undefined {
  // A function, not an arrow: node calls it with `this` set to the TLSSocket (see acme-alpn.ts).
  return function (this: unknown, { servername, protocols }) {
    if (selectAcmeTlsAlpn(this, servername, protocols)) return ACME_TLS_ALPN;
    return protocols.find((p) => ours.includes(p));
  };
}
