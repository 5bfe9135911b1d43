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
  libnginx-mod-mail                          # nginx's mail proxy: the auth_http comparison (tests/e2e/auth-http.test.ts)
  haproxy                                    # L4 balancer with PROXY v2 in front of two gateways (tests/e2e/scale.test.ts)
  swaks                                      # SMTP client used by the tests
  libnet-ssleay-perl libio-socket-ssl-perl   # swaks's TLS (Recommends of swaks, left out by --no-install-recommends)
  pebble                                     # ACME test CA
  curl openssl ca-certificates               # HTTP client, TLS tooling
  nghttp2-client                             # h2load: HTTP/2 load client for the HTTP/2 tests and the bench
  python3                                    # imaplib/poplib/smtplib clients used by the tests
  procps                                     # ps (leak checks in the tests)
  tmux                                       # interactive TUI tests
  redis-server                               # shared policy store (tests/unit/policy/redis.test.ts starts its own)
  systemd util-linux shellcheck              # systemd-analyze, systemd-notify, setpriv, sh lint (tests/*/systemd*, packaging)
  testssl.sh                                 # the TLS report (npm run test:tls)
  libengine-gost-openssl                     # testssl's GOST engine (a Recommends); without it testssl warns about its own OpenSSL
  bsdextrautils                              # hexdump for testssl's socket checks
  dnsmasq-base                               # a local DNS server for mailgate dns --check (tests/e2e/dns.test.ts); no service of its own
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

# Check that every tool works, not only that its binary exists: a tool whose
# optional part is missing (swaks without TLS, testssl without its engine)
# fails here, by name, instead of in the middle of a test run.
failed=0
check() {
  local what=$1
  shift
  local out
  if ! out=$("$@" 2>&1); then
    echo "install-deps.sh: $what does not work: $*" >&2
    printf '%s\n' "$out" | tail -5 | sed 's/^/    /' >&2
    failed=1
  fi
}
for bin in /usr/sbin/dovecot /usr/lib/dovecot/imap /usr/lib/dovecot/pop3 /usr/lib/postfix/sbin/master /usr/lib/postfix/sbin/smtpd \
           /usr/sbin/smtp-sink /usr/sbin/nginx /usr/bin/pebble /usr/bin/pebble-challtestsrv /usr/bin/redis-server /usr/sbin/dnsmasq /usr/sbin/haproxy; do
  check "$bin" test -x "$bin"
done
check dovecot /usr/sbin/dovecot --version
check postfix /usr/sbin/postconf -d mail_version
check nginx /usr/sbin/nginx -v
check redis-server /usr/bin/redis-server --version
check haproxy sh -c '/usr/sbin/haproxy -v | grep -q "HAProxy version"'
# shellcheck disable=SC2016 # the script is for sh -c, which expands it
check "nginx's mail module" sh -c 'd=$(mktemp -d) && printf "load_module /usr/lib/nginx/modules/ngx_mail_module.so;\nevents {}\nmail { server { listen 127.0.0.1:1; protocol imap; auth_http 127.0.0.1:1/a; } }\n" > "$d/n.conf" && /usr/sbin/nginx -t -q -p "$d" -c "$d/n.conf" -g "pid $d/n.pid; error_log $d/e.log;"; r=$?; rm -rf "$d"; exit $r'
check pebble sh -c '/usr/bin/pebble -h 2>&1 | grep -q -- -config'
check dnsmasq sh -c '/usr/sbin/dnsmasq --version | grep -q "^Dnsmasq version"'
check 'swaks with TLS' sh -c 'swaks --support 2>&1 | grep -q "^=== TLS supported"'
check 'swaks with AUTH' sh -c 'swaks --support 2>&1 | grep -q "^=== Basic AUTH supported"'
check 'curl with imaps, pop3s, smtps' sh -c 'curl -V | grep -q "imaps.*pop3s.*smtps"'
check 'h2load (HTTP/2 load client)' sh -c 'h2load --version | grep -q nghttp2'
check 'openssl with TLS 1.3' sh -c 'openssl s_client -help 2>&1 | grep -q -- -tls1_3'
check 'openssl GOST engine (testssl)' openssl engine gost -t -c
check 'testssl' sh -c 'testssl --version 2>&1 | grep -q "testssl.sh"'
check 'testssl on its own OpenSSL' sh -c '! testssl --local --color 0 2>&1 | grep -qi "no engine"'
check 'python3 ssl, imaplib, poplib, smtplib' python3 -c 'import ssl, imaplib, poplib, smtplib, json; assert ssl.HAS_TLSv1_3'
check tmux tmux -V
check shellcheck shellcheck --version
check systemd-analyze systemd-analyze --version
check systemd-notify systemd-notify --version
check setpriv setpriv --version
check hexdump sh -c 'printf x | hexdump -C'
for acct in nobody postfix dovecot dovenull; do
  check "system user $acct" getent passwd "$acct"
done
check 'group postdrop' getent group postdrop
if [ "$failed" -ne 0 ]; then
  echo "install-deps.sh: some tools do not work (above); the tests would fail on them" >&2
  exit 1
fi

echo "install-deps.sh: done"
