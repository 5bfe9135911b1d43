#!/usr/bin/env bash
# Installs what `npm run bench` needs on a fresh Debian 12 (bookworm) machine:
# the backends (Dovecot, Postfix's smtp-sink, nginx), the peers it compares
# against (nginx's mail module, HAProxy), the load tools (wrk, a C compiler and
# OpenSSL headers for bench/loadgen.c) and prlimit.
#
# The bench starts its own private server instances in temp folders; the
# system services these packages would start are kept from starting and are
# stopped and disabled afterwards. Idempotent.
set -euo pipefail

PACKAGES=(
  dovecot-core dovecot-imapd           # IMAP backend
  postfix                              # /usr/sbin/smtp-sink (SMTP backend)
  nginx libnginx-mod-mail              # HTTP backend; nginx mail+http proxy (peer)
  haproxy                              # peer: TCP mode with TLS termination
  wrk                                  # HTTPS load
  build-essential libssl-dev           # bench/loadgen.c, built at bench time
  openssl util-linux procps            # certificate, prlimit, ps
)
SERVICES=(dovecot postfix nginx haproxy)

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    exec sudo -E bash "$0" "$@"
  fi
  echo "bench/install-deps.sh: must run as root (or with sudo available)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
echo "postfix postfix/mailname string localhost" | debconf-set-selections

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "bench/install-deps.sh: installing ${missing[*]}"
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    # Debian's policy-rc.d: exit 101 keeps package scripts from starting services.
    printf '#!/bin/sh\n# temporary, created by mailgate bench/install-deps.sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
  fi
  cleanup() {
    if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  }
  trap cleanup EXIT
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
  cleanup
  trap - EXIT
else
  echo "bench/install-deps.sh: all packages already installed"
fi

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

for bin in /usr/sbin/dovecot /usr/lib/dovecot/imap /usr/sbin/smtp-sink /usr/sbin/nginx \
           /usr/lib/nginx/modules/ngx_mail_module.so /usr/sbin/haproxy /usr/bin/wrk /usr/bin/cc \
           /usr/include/openssl/ssl.h /usr/bin/openssl /usr/bin/prlimit; do
  if [ ! -e "$bin" ]; then
    echo "bench/install-deps.sh: missing $bin" >&2
    exit 1
  fi
done
getent passwd nobody >/dev/null || { echo "bench/install-deps.sh: missing system user nobody" >&2; exit 1; }
echo "bench/install-deps.sh: done"
