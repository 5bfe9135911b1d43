#!/bin/sh
# Removes mailgate installed by packaging/install.sh.
#
#   sudo packaging/uninstall.sh [--prefix DIR] [--root DIR] [--purge]
#
# Removes the program (/opt/mailgate), the /usr/local/bin/mailgate symlink and
# the unit (stopping and disabling the service first). Keeps /etc/mailgate
# (config), /var/lib/mailgate (certificates, ACME account) and the user, so a
# later install picks up where this one left off, unless --purge is given:
# then those go too, with the unit's drop-in folder.
#
# --prefix DIR  where the program was installed (default /opt/mailgate)
# --root DIR    a staging root, as for install.sh (no systemctl, no userdel)
# --purge       also remove config, state, drop-ins and the user
set -eu

PREFIX=/opt/mailgate
ROOT=/
PURGE=no
NAME=mailgate

say() { printf 'uninstall: %s\n' "$*"; }
die() { printf 'uninstall: error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case $1 in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
    --prefix=*) PREFIX=${1#*=}; shift ;;
    --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
    --root=*) ROOT=${1#*=}; shift ;;
    --purge) PURGE=yes; shift ;;
    -h | --help) sed -n '2,/^set -eu/p' "$0" | sed -e '/^set -eu/d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

# shellcheck source=packaging/target.sh
. "$(dirname "$0")/target.sh"
check_target

DEST=$R$PREFIX
UNIT=$R/etc/systemd/system/$NAME.service
SYSTEMCTL=no
if [ "$STAGING" = no ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then SYSTEMCTL=yes; fi

if [ -e "$DEST" ]; then
  if ! { [ -f "$DEST/package.json" ] && grep -q '"name": "mailgate"' "$DEST/package.json"; }; then
    die "$DEST is not a mailgate install; refusing to remove it"
  fi
fi

if [ "$SYSTEMCTL" = yes ] && [ -f "$UNIT" ]; then
  say "stopping and disabling $NAME.service"
  systemctl disable --now "$NAME.service" || say "warning: systemctl could not stop or disable $NAME.service"
fi
rm -f "$UNIT"

LINK=$R/usr/local/bin/$NAME
if [ -L "$LINK" ] && [ "$(readlink "$LINK")" = "$PREFIX/bin/$NAME" ]; then rm -f "$LINK"; fi

rm -rf "$DEST" "$DEST.installing" "$DEST.previous"
say "removed $PREFIX, the unit and the symlink"

if [ "$PURGE" = yes ]; then
  rm -rf "$R/etc/${NAME:?}" "$R/var/lib/${NAME:?}" "$R/etc/systemd/system/${NAME:?}.service.d"
  if [ "$STAGING" = no ] && getent passwd "$NAME" >/dev/null; then
    userdel "$NAME" || say "warning: could not remove the user $NAME"
  fi
  say "purged /etc/$NAME, /var/lib/$NAME and the drop-ins"
else
  say "kept /etc/$NAME (config) and /var/lib/$NAME (certificates); --purge removes them"
fi
if [ "$SYSTEMCTL" = yes ]; then systemctl daemon-reload; fi
