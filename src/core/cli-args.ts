/**
 * One way every `mailgate` command reads its arguments: node's parseArgs,
 * with a usage error reported as `mailgate VERB: …` and the usage text
 * (exit 2), and --help printing the usage (exit 0).
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { ConfigError, errorMessage, MailgateError } from './errors.ts';

export type Options = NonNullable<ParseArgsConfig['options']>;

/** A command's parsed arguments; `string()` reads a string option. */
export interface CommandArgs {
  values: Record<string, string | boolean | undefined>;
  positionals: string[];
  string(name: string): string | undefined;
}

/** The arguments, or the exit code when there is nothing more to do (a usage error: 2; --help: 0). */
export function parseCommandArgs(verb: string, argv: string[], options: Options, usage: string, allowPositionals = false): CommandArgs | number {
  let values: Record<string, string | boolean | undefined>;
  let positionals: string[];
  try {
    ({ values, positionals } = parseArgs({ args: argv, options: { help: { type: 'boolean', short: 'h' }, ...options }, allowPositionals }) as {
      values: Record<string, string | boolean | undefined>;
      positionals: string[];
    });
  } catch (err) {
    process.stderr.write(`mailgate ${verb}: ${errorMessage(err)}\n${usage}`);
    return 2;
  }
  if (values.help) {
    process.stdout.write(usage);
    return 0;
  }
  return { values, positionals, string: (name) => (typeof values[name] === 'string' ? (values[name] as string) : undefined) };
}

/**
 * A configuration that could not be read, as every command reports it (exit
 * 2): an invalid file with its file:line errors, or a file that is not there
 * (`hint` follows). Anything else is not the config's fault and goes up.
 */
export function configProblem(err: unknown, hint = ''): number {
  if (err instanceof ConfigError) {
    process.stderr.write(`mailgate: invalid configuration\n${err.message}\n`);
    return 2;
  }
  if (err instanceof MailgateError) {
    process.stderr.write(`mailgate: ${err.message}\n${hint}`);
    return 2;
  }
  throw err;
}
