#!/usr/bin/env bash
# Installs the Debian packages the mailgate test suite needs on a fresh
# Debian 12 (bookworm) machine that already has Node/npm.
#
# The e2e harness (tests/e2e/harness/) starts its own private Dovecot, Postfix,
# smtp-sink and nginx instances in temp folders on high ports; the system-wide
# services these packages would normally start are not needed, so they are kept
# from starting during installation and stopped/disabled afterwards.
#
# Idempotent: safe to run any number of times.
set -euo pipefail

PACKAGES=(
  dovecot-core dovecot-imapd dovecot-pop3d   # IMAP/POP3 backend + SASL auth for Postfix
  postfix                                    # smtpd backend and /usr/sbin/smtp-sink
  nginx                                      # HTTP backend
  swaks                                      # SMTP client used by the tests
  pebble                                     # ACME test CA
  curl openssl ca-certificates               # HTTP client, TLS tooling
  nghttp2-client                             # h2load: HTTP/2 load client for the HTTP/2 tests and the bench
  python3                                    # imaplib/poplib/smtplib clients used by the tests
  procps                                     # ps (leak checks in the tests)
  tmux                                       # interactive TUI tests
  redis-server                               # shared policy store (tests/unit/policy/redis.test.ts starts its own)
  systemd util-linux shellcheck              # systemd-analyze, systemd-notify, setpriv, sh lint (tests/*/systemd*, packaging)
  testssl.sh                                 # the TLS report (npm run test:tls)
)
SERVICES=(dovecot postfix nginx redis-server haproxy)

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    exec sudo -E bash "$0" "$@"
  fi
  echo "install-deps.sh: must run as root (or with sudo available)" >&2
  exit 1
fi

# Extra packages named on the command line (bench/install-deps.sh adds the benchmark's peers and tools).
PACKAGES+=("$@")

export DEBIAN_FRONTEND=noninteractive

# Postfix asks how to configure itself; we want no system configuration at all.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
echo "postfix postfix/mailname string localhost" | debconf-set-selections

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps.sh: installing ${missing[*]}"
  # Keep package post-install scripts from starting services (Debian policy-rc.d
  # mechanism: exit 101 = "action forbidden"), unless a policy already exists.
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# temporary, created by mailgate .ci/install-deps.sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
  fi
  cleanup() {
    if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  }
  trap cleanup EXIT

  apt-get update
  apt-get install -y --no-install-recommends "${PACKAGES[@]}"

  cleanup
  trap - EXIT
else
  echo "install-deps.sh: all packages already installed"
fi

# Stop and disable the system instances (if anything started them) so that they
# neither occupy ports nor interfere with the test instances.
for svc in "${SERVICES[@]}"; do
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl stop "$svc" >/dev/null 2>&1 || true
    systemctl disable "$svc" >/dev/null 2>&1 || true
  fi
  if [ -x "/etc/init.d/$svc" ]; then
    service "$svc" stop >/dev/null 2>&1 || true
    update-rc.d "$svc" disable >/dev/null 2>&1 || true
  fi
done

# Sanity check: the binaries the e2e harness uses.
for bin in /usr/sbin/dovecot /usr/lib/dovecot/imap /usr/lib/postfix/sbin/master /usr/sbin/smtp-sink \
           /usr/sbin/nginx /usr/bin/swaks /usr/bin/pebble /usr/bin/pebble-challtestsrv /usr/bin/curl /usr/bin/h2load /usr/bin/openssl /usr/bin/python3 /usr/bin/tmux \
           /usr/bin/testssl; do
  if [ ! -x "$bin" ]; then
    echo "install-deps.sh: missing $bin" >&2
    exit 1
  fi
done
for acct in nobody postfix dovecot dovenull; do
  getent passwd "$acct" >/dev/null || { echo "install-deps.sh: missing system user $acct" >&2; exit 1; }
done
getent group postdrop >/dev/null || { echo "install-deps.sh: missing group postdrop" >&2; exit 1; }

echo "install-deps.sh: done"
