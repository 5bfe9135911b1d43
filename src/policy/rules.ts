/**
 * Access rules: an ordered list, the first rule whose conditions all hold
 * decides, the default decides when none does.
 *
 * Rules are checked twice per session. At connect only the listener, the
 * protocol and the address are known (and TLS on implicit-TLS listeners); the
 * user, groups and whether the client logged in are not. A condition on an
 * unknown fact is "unknown": a rule with a false condition is skipped, a rule
 * whose conditions are all true decides, and a rule that could still match
 * once the login is known stops the connect-time walk undecided. So a
 * connect-time decision is always the one the login would get, and an address
 * rule refuses before the greeting.
 */
import type { AccessRule } from '../config/schema-policy.ts';
import { AddressSet } from '../net/cidr.ts';
import { nameMatcher } from './names.ts';

export type RuleAction = 'allow' | 'deny' | 'tempfail';

/** Facts a rule can test; `undefined` means not known yet. */
export interface RuleFacts {
  listener: string;
  protocol: string;
  address: string;
  tls: boolean | undefined;
  /** The login name (null: the client did not log in), undefined before the login. */
  user: string | null | undefined;
  groups: ReadonlySet<string> | undefined;
  authenticated: boolean | undefined;
}

export type RuleOutcome =
  | { decided: true; action: RuleAction; reason: string | undefined; rule: number | 'default' }
  | { decided: false };

type Tri = boolean | undefined;
type Condition = (f: RuleFacts) => Tri;

interface CompiledRule {
  action: RuleAction;
  reason: string | undefined;
  conditions: Condition[];
}

export class RuleSet {
  private readonly rules: CompiledRule[];
  private readonly defaultAction: RuleAction;

  constructor(rules: readonly AccessRule[], defaultAction: RuleAction) {
    this.rules = rules.map(compile);
    this.defaultAction = defaultAction;
  }

  get size(): number {
    return this.rules.length;
  }

  /** The first rule that matches decides; with unknown facts the answer may be "not yet". */
  evaluate(facts: RuleFacts): RuleOutcome {
    for (let i = 0; i < this.rules.length; i++) {
      const rule = this.rules[i] as CompiledRule;
      let unknown = false;
      let skip = false;
      for (const c of rule.conditions) {
        const v = c(facts);
        if (v === false) {
          skip = true;
          break;
        }
        if (v === undefined) unknown = true;
      }
      if (skip) continue;
      if (unknown) return { decided: false };
      return { decided: true, action: rule.action, reason: rule.reason, rule: i };
    }
    return { decided: true, action: this.defaultAction, reason: undefined, rule: 'default' };
  }
}

function compile(rule: AccessRule): CompiledRule {
  const conditions: Condition[] = [];
  if (rule.listeners) {
    const set = new Set(rule.listeners);
    conditions.push((f) => set.has(f.listener));
  }
  if (rule.protocols) {
    const set = new Set<string>(rule.protocols);
    conditions.push((f) => set.has(f.protocol));
  }
  if (rule.addresses) {
    const set = new AddressSet(rule.addresses);
    conditions.push((f) => set.has(f.address));
  }
  if (rule.tls !== undefined) {
    const want = rule.tls;
    conditions.push((f) => (f.tls === undefined ? undefined : f.tls === want));
  }
  if (rule.authenticated !== undefined) {
    const want = rule.authenticated;
    conditions.push((f) => (f.authenticated === undefined ? undefined : f.authenticated === want));
  }
  if (rule.users) {
    const match = nameMatcher(rule.users);
    conditions.push((f) => (f.user === undefined ? undefined : f.user !== null && match(f.user)));
  }
  if (rule.groups) {
    const wanted = rule.groups;
    conditions.push((f) => (f.groups === undefined ? undefined : wanted.some((g) => f.groups?.has(g))));
  }
  return { action: rule.action, reason: rule.reason, conditions };
}
