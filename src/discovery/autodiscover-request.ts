/**
 * Reads Outlook's autodiscover request ([MS-OXDSCLI] §2.2.3):
 *
 *   <Autodiscover xmlns="…/outlook/requestschema/2006">
 *     <Request>
 *       <EMailAddress>user@example.org</EMailAddress>
 *       <AcceptableResponseSchema>…/outlook/responseschema/2006a</AcceptableResponseSchema>
 *     </Request>
 *   </Autodiscover>
 *
 * with sax in strict mode (well-formed XML, namespaces), bounded: the body is
 * bounded by the endpoint (AUTODISCOVER_MAX_BODY), at most 64 elements, 8
 * deep. A DOCTYPE ends the parse at once, so no entity is ever declared, let
 * alone expanded (no billion laughs, no external entity); sax knows no
 * entities beyond XML's five and character references, and refuses others.
 */
import sax from 'sax';
import { AUTODISCOVER_REQUEST_NS } from './client-config.ts';

/** Real requests are about 350 bytes. */
export const AUTODISCOVER_MAX_BODY = 16 * 1024;
const MAX_ELEMENTS = 64;
const MAX_DEPTH = 8;

export interface AutodiscoverRequest {
  email: string;
  /** The response schema asked for (Outlook: …/outlook/responseschema/2006a). */
  schema: string;
}

export class AutodiscoverRequestError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'AutodiscoverRequestError';
  }
}

/** Parses a request body; throws AutodiscoverRequestError for anything else. */
export function parseAutodiscoverRequest(body: Buffer): AutodiscoverRequest {
  if (body.length > AUTODISCOVER_MAX_BODY) throw new AutodiscoverRequestError('request too large');
  const parser = sax.parser(true, { xmlns: true, trim: false, position: false });
  const path: string[] = [];
  let elements = 0;
  let email = '';
  let schema = '';
  let failure: string | undefined;
  const fail = (why: string): never => {
    failure ??= why;
    throw new AutodiscoverRequestError(why);
  };
  parser.onerror = (err) => fail(`not well-formed XML: ${err.message.split('\n')[0] ?? ''}`);
  parser.ondoctype = () => fail('a DOCTYPE is not allowed');
  parser.onprocessinginstruction = (pi) => {
    if (pi.name !== 'xml') fail('processing instructions are not allowed');
  };
  parser.onopentag = (tag) => {
    const t = tag as sax.QualifiedTag;
    if (++elements > MAX_ELEMENTS || path.length >= MAX_DEPTH) fail('too many elements');
    if (path.length === 0 && (t.local !== 'Autodiscover' || t.uri !== AUTODISCOVER_REQUEST_NS)) fail('not an Outlook autodiscover request');
    path.push(t.uri === AUTODISCOVER_REQUEST_NS ? t.local : `{${t.uri}}${t.local}`);
  };
  parser.onclosetag = () => {
    path.pop();
  };
  parser.ontext = (text) => {
    const where = path.join('/');
    if (where === 'Autodiscover/Request/EMailAddress') email += text;
    else if (where === 'Autodiscover/Request/AcceptableResponseSchema') schema += text;
  };
  try {
    parser.write(body.toString('utf8')).close();
  } catch (err) {
    if (err instanceof AutodiscoverRequestError) throw err;
    throw new AutodiscoverRequestError(failure ?? `not well-formed XML: ${(err as Error).message.split('\n')[0] ?? ''}`);
  }
  if (elements === 0) throw new AutodiscoverRequestError('empty request');
  email = email.trim();
  schema = schema.trim();
  if (!email) throw new AutodiscoverRequestError('no EMailAddress');
  return { email, schema };
}
