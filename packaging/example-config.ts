/**
 * Writes the example configuration the way it is installed on a server
 * (packaging/install.sh): the paths that are relative to the checkout in
 * config/mailgate.yaml point at the directories systemd gives the service:
 *
 *   tls.dir         -> /var/lib/mailgate/certs      (StateDirectory=mailgate)
 *   control.socket  -> /run/mailgate/control.sock   (RuntimeDirectory=mailgate)
 *
 * Only those values are spliced into the original text, so the comments and
 * the layout of the example stay as written. The result is validated with the
 * daemon's own loader before it is written: a broken example fails the
 * install, not the first start.
 *
 * usage: node packaging/example-config.ts IN OUT
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { isMap, isPair, isScalar, parseDocument, type Node as YamlNode } from 'yaml';
import { parseConfig } from '../src/config/load.ts';
import { configSchema } from '../src/config/schema.ts';

export const INSTALLED_PATHS: readonly { path: readonly [string, string]; value: string }[] = [
  { path: ['tls', 'dir'], value: '/var/lib/mailgate/certs' },
  { path: ['control', 'socket'], value: '/run/mailgate/control.sock' },
];

/** Returns the example text with the installed paths set; throws if the result is not a valid configuration. */
export function installedExample(text: string, file: string): string {
  let out = text;
  for (const { path, value } of INSTALLED_PATHS) {
    // A section this version of the schema does not know (yet) is left alone.
    if (!(path[0] in configSchema.shape)) continue;
    out = setScalar(out, path, value);
  }
  out = out
    .split('\n')
    .map((line) => (line.startsWith('#') ? line.replaceAll('../certs', '/var/lib/mailgate/certs') : line))
    .join('\n');
  out = `# Installed by packaging/install.sh: certificates live in /var/lib/mailgate,\n# the control socket in /run/mailgate (both created by systemd).\n${out}`;
  const config = parseConfig(out, file);
  if (config.tls.dir !== '/var/lib/mailgate/certs') throw new Error(`${file}: tls.dir resolved to ${config.tls.dir}`);
  return out;
}

/** Sets `section.key` to a plain scalar by splicing text: replaces the value, adds the key, or appends the section. */
function setScalar(text: string, [section, key]: readonly [string, string], value: string): string {
  const doc = parseDocument(text);
  if (doc.errors.length > 0) throw new Error(`example config does not parse: ${doc.errors[0]?.message}`);
  const node = doc.getIn([section, key], true) as YamlNode | undefined;
  if (node !== undefined) {
    if (!isScalar(node) || !node.range) throw new Error(`${section}.${key} is not a plain value in the example`);
    return text.slice(0, node.range[0]) + value + text.slice(node.range[1]);
  }
  const parent = doc.get(section, true) as YamlNode | undefined;
  if (parent === undefined || parent === null) {
    const sep = text.endsWith('\n') ? '' : '\n';
    return `${text}${sep}\n${section}:\n  ${key}: ${value}\n`;
  }
  if (!isMap(parent) || parent.flow) throw new Error(`${section} in the example is not a block mapping`);
  const first = parent.items[0];
  if (!isPair(first) || !isScalar(first.key) || !first.key.range) throw new Error(`${section} in the example is empty`);
  const at = first.key.range[0];
  const lineStart = text.lastIndexOf('\n', at - 1) + 1;
  const indent = text.slice(lineStart, at);
  return `${text.slice(0, lineStart)}${indent}${key}: ${value}\n${text.slice(lineStart)}`;
}

if (import.meta.main) {
  const [input, output] = process.argv.slice(2);
  if (!input || !output) {
    process.stderr.write('usage: example-config.ts IN OUT\n');
    process.exit(2);
  }
  writeFileSync(output, installedExample(readFileSync(input, 'utf8'), output), { mode: 0o640 });
}
