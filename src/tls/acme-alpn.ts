/**
 * TLS-ALPN-01 (RFC 8737) on the ordinary TLS listeners.
 *
 * The CA's validation server opens TLS to port 443 with the SNI name being
 * validated and an ALPN extension holding exactly "acme-tls/1"; it must be
 * answered with a special self-signed challenge certificate for that name,
 * while every other client keeps getting the real certificate.
 *
 * Node picks the certificate in SNICallback (OpenSSL's certificate callback)
 * and the protocol in ALPNCallback; neither sees the other's input, and the
 * certificate cannot be changed from the ALPN callback. What makes it work is
 * the order OpenSSL calls them in TLS 1.3: ALPN is negotiated while the
 * ClientHello is processed, before the certificate callback. Both callbacks
 * are called with `this` set to the TLSSocket, so the ALPN callback marks the
 * socket and the certificate callback, which runs next, serves the challenge
 * certificate to a marked socket only. Ordinary clients are never affected,
 * also not while a renewal's challenge is pending.
 *
 * In TLS 1.2 OpenSSL calls the certificate callback first; by the time ALPN is
 * seen the real certificate is chosen, so acme-tls/1 is refused there (the
 * handshake ends with no_application_protocol) instead of pretending. The
 * validation servers of Let's Encrypt (Boulder), Pebble and step-ca speak TLS
 * 1.3 (Go crypto/tls), and mailgate always offers TLS 1.3.
 *
 * A client that asks for acme-tls/1 for a name without a pending challenge
 * gets a failed handshake, so acme-tls/1 never becomes a way to speak another
 * protocol on a mail port (ALPACA).
 */
export const ACME_TLS_ALPN = 'acme-tls/1';

/** Sockets whose ALPN callback selected acme-tls/1 (TLS 1.3: before the certificate callback). */
const wantsChallenge = new WeakSet<object>();
/** Sockets whose certificate was picked already (TLS 1.2 order): too late for a challenge certificate. */
const certificateChosen = new WeakSet<object>();

/**
 * Called from the ALPN callback with the TLSSocket as `socket`: selects
 * acme-tls/1 when it is the only protocol offered, for a name, before the
 * certificate was chosen.
 */
export function selectAcmeTlsAlpn(socket: unknown, servername: string | false | undefined, protocols: readonly string[]): boolean {
  if (protocols.length !== 1 || protocols[0] !== ACME_TLS_ALPN) return false;
  if (!servername || typeof socket !== 'object' || socket === null) return false;
  if (certificateChosen.has(socket)) return false;
  wantsChallenge.add(socket);
  return true;
}

/** Called from the certificate (SNI) callback: true when this handshake is a TLS-ALPN-01 validation. */
export function isAcmeTlsHandshake(socket: unknown): boolean {
  if (typeof socket !== 'object' || socket === null) return false;
  if (wantsChallenge.has(socket)) return true;
  certificateChosen.add(socket);
  return false;
}
