/**
 * The discovery endpoints on the https listeners, registered in the HTTP
 * router's well-known seam (src/http/well-known.ts), built from the config
 * (as data: they run in each worker) and rebuilt at every reload. All are
 * TLS only; none redirects anywhere.
 *
 *   GET  https://autoconfig.<domain>/mail/config-v1.1.xml[?emailaddress=]   Thunderbird
 *   GET  https://<any>/.well-known/autoconfig/mail/config-v1.1.xml           Thunderbird
 *   POST https://autodiscover.<domain>/autodiscover/autodiscover.xml        Outlook (also on <domain>)
 *   GET  https://<any>/.well-known/mail.mobileconfig?email=                  Apple, signed
 *   GET  https://mta-sts.<domain>/.well-known/mta-sts.txt                    MTA-STS policy
 *   POST https://<mail_host>/.well-known/tlsrpt                              TLS-RPT intake
 *
 * Client input is bounded (query strings by the head bound, bodies by each
 * endpoint), addresses are checked strictly against the configured domains,
 * and what is reflected into XML is escaped (client-config.ts).
 */
import type { Config } from '../config/load.ts';
import { errorMessage } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { hostName, WellKnownRegistry, type ReadBody } from '../http/well-known.ts';
import type { LocalAnswer, RequestFacts } from '../http/router.ts';
import type { CertStore } from '../tls/cert-store.ts';
import { AUTODISCOVER_MAX_BODY, AutodiscoverRequestError, parseAutodiscoverRequest } from './autodiscover-request.ts';
import { appleProfile, autodiscoverError, autodiscoverResponse, OUTLOOK_RESPONSE_SCHEMA, parseAddress, thunderbirdConfig } from './client-config.ts';
import { cmsSign } from './cms.ts';
import { discoverySettings, TLSRPT_PATH, type DiscoverySettings } from './settings.ts';
import { MAX_REPORT_BODY, parseTlsReport, type TlsReportOutcome } from './tlsrpt.ts';

export interface EndpointDeps {
  /** The certificates served: the Apple profile is signed with the mail host's. */
  certs: CertStore;
  /** Each TLS report taken (or refused), for the runtime to count. */
  onTlsReport: (r: TlsReportOutcome) => void;
  log: Logger;
}

const XML = 'application/xml; charset=utf-8';
const GET = ['GET', 'HEAD'] as const;

/** The registry for a config: empty when it has no `discovery:` section. */
export function discoveryEndpoints(config: Config, deps: EndpointDeps): WellKnownRegistry {
  const registry = new WellKnownRegistry();
  const s = discoverySettings(config);
  if (!s) return registry;
  const log = deps.log.child({ part: 'discovery' });
  if (s.autoconfig) {
    const thunderbird = (req: RequestFacts) => thunderbirdAnswer(s, req);
    registry.register({ path: '/mail/config-v1.1.xml', methods: GET, hosts: s.domains.map((d) => `autoconfig.${d}`), tlsOnly: true, handle: thunderbird });
    registry.register({ path: '/.well-known/autoconfig/mail/config-v1.1.xml', methods: GET, tlsOnly: true, handle: thunderbird });
    registry.register({
      path: '/autodiscover/autodiscover.xml',
      caseInsensitive: true,
      methods: ['POST'],
      hosts: s.domains.flatMap((d) => [`autodiscover.${d}`, d]),
      tlsOnly: true,
      handle: (): ReadBody => ({ read: AUTODISCOVER_MAX_BODY, respond: (body) => autodiscoverAnswer(s, body) }),
    });
    registry.register({ path: '/.well-known/mail.mobileconfig', methods: GET, tlsOnly: true, handle: (req) => appleAnswer(s, req, deps.certs, log) });
  }
  if (s.mtaSts) {
    const policy = s.mtaSts.policy;
    registry.register({
      path: '/.well-known/mta-sts.txt',
      methods: GET,
      hosts: s.domains.map((d) => `mta-sts.${d}`),
      tlsOnly: true,
      // RFC 8461 §3.3: text/plain, over HTTPS, no redirects.
      handle: () => ({ status: 200, body: policy }),
    });
  }
  if (s.tlsRpt?.receiveUrl) {
    registry.register({
      path: TLSRPT_PATH,
      methods: ['POST'],
      hosts: [s.mailHost],
      tlsOnly: true,
      handle: (): ReadBody => ({ read: MAX_REPORT_BODY, respond: (body) => tlsReportAnswer(s, body, deps.onTlsReport, log) }),
    });
  }
  return registry;
}

function query(target: string): URLSearchParams {
  const q = target.indexOf('?');
  return new URLSearchParams(q < 0 ? '' : target.slice(q + 1));
}

const notOurs = (what: string): LocalAnswer => ({ status: 404, body: `${what}\n` });

function thunderbirdAnswer(s: DiscoverySettings, req: RequestFacts): LocalAnswer | undefined {
  const given = query(req.target).get('emailaddress');
  let domain: string | undefined;
  if (given !== null && given !== '') {
    const who = parseAddress(given, s.domains);
    if (!who) return notOurs('No mail settings for that address');
    domain = who.domain;
  } else {
    const host = req.host === undefined ? '' : hostName(req.host);
    domain = s.domains.find((d) => host === d || host === `autoconfig.${d}`) ?? (host === s.mailHost ? s.domains[0] : undefined);
  }
  // A host of someone else's with no address: not ours to answer.
  if (!domain) return undefined;
  return { status: 200, body: Buffer.from(thunderbirdConfig(s, domain), 'utf8'), contentType: XML };
}

function autodiscoverAnswer(s: DiscoverySettings, body: Buffer): LocalAnswer {
  let request;
  try {
    request = parseAutodiscoverRequest(body);
  } catch (err) {
    if (err instanceof AutodiscoverRequestError) return { status: 400, body: `Bad autodiscover request: ${err.message}\n` };
    throw err;
  }
  const xmlAnswer = (text: string): LocalAnswer => ({ status: 200, body: Buffer.from(text, 'utf8'), contentType: XML });
  if (request.schema !== OUTLOOK_RESPONSE_SCHEMA) return xmlAnswer(autodiscoverError(601, 'Provider is not available'));
  const who = parseAddress(request.email, s.domains);
  if (!who) return xmlAnswer(autodiscoverError(600, 'Invalid Request'));
  return xmlAnswer(autodiscoverResponse(s, who));
}

function appleAnswer(s: DiscoverySettings, req: RequestFacts, certs: CertStore, log: Logger): LocalAnswer {
  const who = parseAddress(query(req.target).get('email') ?? '', s.domains);
  if (!who) return notOurs('No mail settings for that address: ask for /.well-known/mail.mobileconfig?email=you@your.domain');
  const signer = certs.pemFor(s.mailHost);
  if (!signer) return { status: 503, body: 'No certificate to sign the profile with yet\n' };
  let signed: Buffer;
  try {
    signed = cmsSign(Buffer.from(appleProfile(s, who), 'utf8'), signer.certPem, signer.keyPem);
  } catch (err) {
    log.error({ err: errorMessage(err), names: signer.info.names }, 'cannot sign the Apple profile');
    return { status: 500, body: 'The profile could not be signed\n' };
  }
  return {
    status: 200,
    body: signed,
    contentType: 'application/x-apple-aspen-config',
    headers: { 'Content-Disposition': `attachment; filename="${who.domain}.mobileconfig"` },
  };
}

function tlsReportAnswer(s: DiscoverySettings, body: Buffer, onReport: (r: TlsReportOutcome) => void, log: Logger): LocalAnswer {
  const r = parseTlsReport(body, s.domains);
  onReport(r);
  if (!r.ok) {
    log.info({ reason: r.reason, bytes: body.length }, 'TLS report refused');
    return { status: r.reason === 'too-large' ? 413 : 400, body: `Not a TLS report (${r.reason})\n` };
  }
  log.info(
    { organization: r.organization, reportId: r.reportId, domains: r.domains.map((d) => ({ domain: d.domain, success: d.success, failure: d.failure })) },
    'TLS report received',
  );
  return { status: 200, body: 'Report received\n' };
}
