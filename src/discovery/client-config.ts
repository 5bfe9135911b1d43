/**
 * The three client formats, generated from the discovery settings (never
 * from files), with every value escaped for XML:
 *
 *  - Thunderbird's autoconfig (config-v1.1.xml): placeholders for the user,
 *    so nothing from the request is reflected;
 *  - Outlook's autodiscover POX response (responseschema 2006a);
 *  - Apple's configuration profile (a plist; apple-profile.ts signs it).
 *
 * Only what the listeners offer is announced, implicit TLS first.
 */
import { createHash } from 'node:crypto';
import type { DiscoverySettings, MailService } from './settings.ts';

/** Escapes text for XML content and attribute values. */
export function xml(text: string | number): string {
  return String(text).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&apos;' })[c]!);
}

const LOCAL_PART = /^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$/;

/** An e-mail address of one of our domains, checked strictly (ASCII, at most 254 bytes); undefined otherwise. */
export function parseAddress(text: string, domains: readonly string[]): { address: string; local: string; domain: string } | undefined {
  if (text.length > 254) return undefined;
  const at = text.lastIndexOf('@');
  if (at <= 0) return undefined;
  const local = text.slice(0, at);
  const domain = text.slice(at + 1).toLowerCase();
  if (local.length > 64 || !LOCAL_PART.test(local) || !domains.includes(domain)) return undefined;
  return { address: `${local}@${domain}`, local, domain };
}

/** Thunderbird: https://wiki.mozilla.org/Thunderbird:Autoconfiguration:ConfigFileFormat */
export function thunderbirdConfig(s: DiscoverySettings, domain: string): string {
  const ac = s.autoconfig!;
  const user = ac.login === 'address' ? '%EMAILADDRESS%' : '%EMAILLOCALPART%';
  const server = (tag: 'incomingServer' | 'outgoingServer', svc: MailService) =>
    [
      `    <${tag} type="${svc.kind === 'submission' ? 'smtp' : svc.kind}">`,
      `      <hostname>${xml(s.mailHost)}</hostname>`,
      `      <port>${svc.port}</port>`,
      `      <socketType>${svc.tls === 'implicit' ? 'SSL' : 'STARTTLS'}</socketType>`,
      '      <authentication>password-cleartext</authentication>',
      `      <username>${user}</username>`,
      `    </${tag}>`,
    ].join('\n');
  const name = ac.displayName(domain);
  return [
    '<?xml version="1.0" encoding="UTF-8"?>',
    '<clientConfig version="1.1">',
    `  <emailProvider id="${xml(domain)}">`,
    ...s.domains.map((d) => `    <domain>${xml(d)}</domain>`),
    `    <displayName>${xml(name)}</displayName>`,
    `    <displayShortName>${xml(name)}</displayShortName>`,
    ...s.services.filter((x) => x.kind !== 'submission').map((x) => server('incomingServer', x)),
    ...s.services.filter((x) => x.kind === 'submission').map((x) => server('outgoingServer', x)),
    '  </emailProvider>',
    '</clientConfig>',
    '',
  ].join('\n');
}

export const AUTODISCOVER_REQUEST_NS = 'http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006';
export const AUTODISCOVER_RESPONSE_NS = 'http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006';
export const OUTLOOK_RESPONSE_SCHEMA = 'http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a';

/** Outlook's POX autodiscover answer ([MS-OXDSCLI] §2.2.4) for one address: IMAP or POP3, and SMTP. */
export function autodiscoverResponse(s: DiscoverySettings, who: { address: string; local: string; domain: string }): string {
  const login = s.autoconfig!.login === 'address' ? who.address : who.local;
  const protocol = (svc: MailService) =>
    [
      '      <Protocol>',
      `        <Type>${svc.kind === 'submission' ? 'SMTP' : svc.kind.toUpperCase()}</Type>`,
      `        <Server>${xml(s.mailHost)}</Server>`,
      `        <Port>${svc.port}</Port>`,
      '        <DomainRequired>off</DomainRequired>',
      `        <LoginName>${xml(login)}</LoginName>`,
      '        <SPA>off</SPA>',
      '        <SSL>on</SSL>',
      `        <Encryption>${svc.tls === 'implicit' ? 'SSL' : 'TLS'}</Encryption>`,
      '        <AuthRequired>on</AuthRequired>',
      ...(svc.kind === 'submission' ? ['        <UsePOPAuth>on</UsePOPAuth>', '        <SMTPLast>off</SMTPLast>'] : []),
      '      </Protocol>',
    ].join('\n');
  return [
    '<?xml version="1.0" encoding="utf-8"?>',
    `<Autodiscover xmlns="${AUTODISCOVER_RESPONSE_NS}">`,
    `  <Response xmlns="${OUTLOOK_RESPONSE_SCHEMA}">`,
    `    <User><DisplayName>${xml(who.address)}</DisplayName></User>`,
    '    <Account>',
    '      <AccountType>email</AccountType>',
    '      <Action>settings</Action>',
    ...preferred(s).map(protocol),
    '    </Account>',
    '  </Response>',
    '</Autodiscover>',
    '',
  ].join('\n');
}

/** Outlook's error answer: 600 Invalid Request, 601 Provider is not available. */
export function autodiscoverError(code: 600 | 601, message: string): string {
  return [
    '<?xml version="1.0" encoding="utf-8"?>',
    `<Autodiscover xmlns="${AUTODISCOVER_RESPONSE_NS}">`,
    '  <Response>',
    `    <Error Time="${new Date().toISOString().slice(11, 19)}" Id="0">`,
    `      <ErrorCode>${code}</ErrorCode>`,
    `      <Message>${xml(message)}</Message>`,
    '      <DebugData />',
    '    </Error>',
    '  </Response>',
    '</Autodiscover>',
    '',
  ].join('\n');
}

/** The incoming services in order of preference, then the outgoing ones. */
function preferred(s: DiscoverySettings): MailService[] {
  return [...s.services.filter((x) => x.kind !== 'submission'), ...s.services.filter((x) => x.kind === 'submission')];
}

/** Apple's profile (Configuration, one com.apple.mail.managed payload) as plist XML: the best incoming and outgoing service. */
export function appleProfile(s: DiscoverySettings, who: { address: string; local: string; domain: string }): string {
  const incoming = s.services.find((x) => x.kind !== 'submission')!;
  const outgoing = s.services.find((x) => x.kind === 'submission')!;
  const login = s.autoconfig!.login === 'address' ? who.address : who.local;
  const name = s.autoconfig!.displayName(who.domain);
  const base = s.mailHost.split('.').reverse().join('.');
  const ident = `${base}.mailgate.${createHash('sha256').update(who.address.toLowerCase()).digest('hex').slice(0, 16)}`;
  const at = (indent: string) => ({
    str: (k: string, v: string) => `${indent}<key>${k}</key>\n${indent}<string>${xml(v)}</string>`,
    int: (k: string, v: number) => `${indent}<key>${k}</key>\n${indent}<integer>${v}</integer>`,
    bool: (k: string, v: boolean) => `${indent}<key>${k}</key>\n${indent}<${v}/>`,
  });
  const inner = at('        ');
  const outer = at('    ');
  const mail = [
    inner.str('EmailAccountDescription', name),
    inner.str('EmailAccountType', incoming.kind === 'imap' ? 'EmailTypeIMAP' : 'EmailTypePOP'),
    inner.str('EmailAddress', who.address),
    inner.str('IncomingMailServerAuthentication', 'EmailAuthPassword'),
    inner.str('IncomingMailServerHostName', s.mailHost),
    inner.int('IncomingMailServerPortNumber', incoming.port),
    inner.bool('IncomingMailServerUseSSL', true),
    inner.str('IncomingMailServerUsername', login),
    inner.str('OutgoingMailServerAuthentication', 'EmailAuthPassword'),
    inner.str('OutgoingMailServerHostName', s.mailHost),
    inner.int('OutgoingMailServerPortNumber', outgoing.port),
    inner.bool('OutgoingMailServerUseSSL', true),
    inner.str('OutgoingMailServerUsername', login),
    inner.bool('OutgoingPasswordSameAsIncomingPassword', true),
    inner.str('PayloadDescription', `E-mail account ${who.address}`),
    inner.str('PayloadDisplayName', name),
    inner.str('PayloadIdentifier', `${ident}.account`),
    inner.str('PayloadType', 'com.apple.mail.managed'),
    inner.str('PayloadUUID', uuidOf(`${ident}.account`)),
    inner.int('PayloadVersion', 1),
    inner.bool('PreventAppSheet', false),
    inner.bool('PreventMove', false),
    inner.bool('SMIMEEnabled', false),
  ];
  return [
    '<?xml version="1.0" encoding="UTF-8"?>',
    '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">',
    '<plist version="1.0">',
    '<dict>',
    '    <key>PayloadContent</key>',
    '    <array>',
    '      <dict>',
    ...mail,
    '      </dict>',
    '    </array>',
    outer.str('PayloadDescription', `Mail settings for ${who.address} (${s.mailHost})`),
    outer.str('PayloadDisplayName', name),
    outer.str('PayloadIdentifier', ident),
    outer.str('PayloadOrganization', who.domain),
    outer.bool('PayloadRemovalDisallowed', false),
    outer.str('PayloadType', 'Configuration'),
    outer.str('PayloadUUID', uuidOf(ident)),
    outer.int('PayloadVersion', 1),
    '</dict>',
    '</plist>',
    '',
  ].join('\n');
}

/** A stable UUID (the same profile installs over itself): from a hash of the identifier, in RFC 9562 form (version 8). */
function uuidOf(text: string): string {
  const h = createHash('sha256').update(text).digest();
  h[6] = (h[6]! & 0x0f) | 0x80;
  h[8] = (h[8]! & 0x3f) | 0x80;
  const x = h.subarray(0, 16).toString('hex').toUpperCase();
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
}
