/**
 * A CMS SignedData (RFC 5652) over some bytes, signed with a certificate and
 * its key: what Apple expects of a signed `.mobileconfig`. The content is
 * embedded; the signer is named by issuer and serial; the signed attributes
 * are contentType, signingTime and messageDigest (SHA-256); the whole chain
 * of the PEM goes into `certificates`. Keys: ECDSA (ecdsa-with-SHA256) and
 * RSA (PKCS #1 v1.5).
 *
 * Written here, with node:crypto for the signature, because node-forge's
 * PKCS #7 signer (the crypto library the project uses) takes RSA keys only,
 * and ACME keys are ECDSA by default. The DER is assembled from the
 * certificate's own bytes (issuer and serial are sliced out, never
 * re-encoded); `openssl cms -verify` checks the result in
 * tests/e2e/discovery.test.ts.
 */
import { createHash, createPrivateKey, sign, X509Certificate } from 'node:crypto';

const OID = {
  data: '1.2.840.113549.1.7.1',
  signedData: '1.2.840.113549.1.7.2',
  contentType: '1.2.840.113549.1.9.3',
  messageDigest: '1.2.840.113549.1.9.4',
  signingTime: '1.2.840.113549.1.9.5',
  sha256: '2.16.840.1.101.3.4.2.1',
  rsaEncryption: '1.2.840.113549.1.1.1',
  ecdsaWithSha256: '1.2.840.10045.4.3.2',
};

/** Signs `content`; `certPem` is the leaf followed by its chain, `keyPem` the leaf's key. */
export function cmsSign(content: Buffer, certPem: string, keyPem: string, now = new Date()): Buffer {
  const chain = pemCertificates(certPem);
  const leaf = chain[0];
  if (!leaf) throw new Error('no certificate to sign with');
  const key = createPrivateKey(keyPem);
  if (!new X509Certificate(leaf).checkPrivateKey(key)) throw new Error('the key does not belong to the certificate');
  const keyType = key.asymmetricKeyType;
  if (keyType !== 'ec' && keyType !== 'rsa') throw new Error(`cannot sign with a ${keyType ?? 'unknown'} key`);
  const { issuer, serial } = issuerAndSerial(leaf);
  const sha256 = seq(oid(OID.sha256));
  const attributes = [
    seq(oid(OID.contentType), set(oid(OID.data))),
    seq(oid(OID.signingTime), set(utcTime(now))),
    seq(oid(OID.messageDigest), set(tlv(0x04, createHash('sha256').update(content).digest()))),
  ].sort(Buffer.compare);
  // The signature covers the attributes as a DER SET (RFC 5652 §5.4); in the SignerInfo they are [0] IMPLICIT.
  const signature = sign('sha256', tlv(0x31, ...attributes), key);
  const signatureAlgorithm = keyType === 'ec' ? seq(oid(OID.ecdsaWithSha256)) : seq(oid(OID.rsaEncryption), tlv(0x05));
  const signerInfo = seq(integer(1), seq(issuer, serial), sha256, tlv(0xa0, ...attributes), signatureAlgorithm, tlv(0x04, signature));
  const signedData = seq(
    integer(1),
    set(sha256),
    seq(oid(OID.data), tlv(0xa0, tlv(0x04, content))),
    tlv(0xa0, ...chain),
    set(signerInfo),
  );
  return seq(oid(OID.signedData), tlv(0xa0, signedData));
}

/** The DER certificates of a PEM bundle, in order. */
function pemCertificates(pem: string): Buffer[] {
  return [...pem.matchAll(/-----BEGIN CERTIFICATE-----([\s\S]*?)-----END CERTIFICATE-----/g)].map((m) => Buffer.from(m[1]!.replace(/\s+/g, ''), 'base64'));
}

// ---- DER, the little this needs --------------------------------------------------------

function tlv(tag: number, ...parts: Buffer[]): Buffer {
  const body = Buffer.concat(parts);
  const n = body.length;
  let len: Buffer;
  if (n < 0x80) len = Buffer.from([n]);
  else {
    const bytes: number[] = [];
    for (let v = n; v > 0; v = Math.floor(v / 256)) bytes.unshift(v % 256);
    len = Buffer.from([0x80 | bytes.length, ...bytes]);
  }
  return Buffer.concat([Buffer.from([tag]), len, body]);
}

const seq = (...parts: Buffer[]) => tlv(0x30, ...parts);
const set = (...parts: Buffer[]) => tlv(0x31, ...parts.sort(Buffer.compare));

function integer(n: number): Buffer {
  return tlv(0x02, Buffer.from([n]));
}

function oid(dotted: string): Buffer {
  const arcs = dotted.split('.').map(Number);
  const out = [40 * arcs[0]! + arcs[1]!];
  for (const arc of arcs.slice(2)) {
    const septets: number[] = [];
    for (let v = arc; ; v = Math.floor(v / 128)) {
      septets.unshift(v % 128);
      if (v < 128) break;
    }
    out.push(...septets.map((b, i) => (i < septets.length - 1 ? b | 0x80 : b)));
  }
  return tlv(0x06, Buffer.from(out));
}

function utcTime(d: Date): Buffer {
  const p = (n: number) => String(n).padStart(2, '0');
  const text = `${p(d.getUTCFullYear() % 100)}${p(d.getUTCMonth() + 1)}${p(d.getUTCDate())}${p(d.getUTCHours())}${p(d.getUTCMinutes())}${p(d.getUTCSeconds())}Z`;
  return tlv(0x17, Buffer.from(text, 'ascii'));
}

/** One TLV at `at`: its tag, where its content starts and where it ends. */
function read(der: Buffer, at: number): { tag: number; start: number; end: number } {
  const tag = der[at]!;
  let len = der[at + 1]!;
  let start = at + 2;
  if (len & 0x80) {
    const count = len & 0x7f;
    len = 0;
    for (let i = 0; i < count; i++) len = len * 256 + der[start + i]!;
    start += count;
  }
  if (start + len > der.length) throw new Error('truncated DER');
  return { tag, start, end: start + len };
}

/** The issuer Name and serialNumber of a certificate, as the bytes it holds them in. */
function issuerAndSerial(cert: Buffer): { issuer: Buffer; serial: Buffer } {
  const outer = read(cert, 0);
  const tbs = read(cert, outer.start);
  let at = tbs.start;
  let field = read(cert, at);
  if (field.tag === 0xa0) {
    at = field.end;
    field = read(cert, at);
  }
  const serial = cert.subarray(at, field.end);
  const signature = read(cert, field.end);
  const issuer = read(cert, signature.end);
  if (field.tag !== 0x02 || issuer.tag !== 0x30) throw new Error('not an X.509 certificate');
  return { issuer: cert.subarray(signature.end, issuer.end), serial };
}
