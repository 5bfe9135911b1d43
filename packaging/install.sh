#!/bin/sh
# Installs or upgrades mailgate on a server, from a checkout or release tree.
#
#   sudo packaging/install.sh [--prefix DIR] [--root DIR] [--no-systemd]
#
# What it does (paths shown for the defaults):
#   /opt/mailgate                 the program: bin, src, config, docs, and its
#                                 runtime and dependencies (`npm ci --omit=dev`,
#                                 which brings Node 24 as the npm package "node")
#   /usr/local/bin/mailgate       symlink to /opt/mailgate/bin/mailgate
#   /etc/systemd/system/mailgate.service
#   /etc/mailgate/mailgate.yaml   the example config, only if there is none yet;
#                                 otherwise the example goes to mailgate.yaml.dist
#   /var/lib/mailgate             state: certificates, ACME account (mailgate, 0700)
#   user and group "mailgate"     system user, created unless it exists
#
# Upgrading is running the same command again: the new tree is built beside
# the old one and swapped in only when it is complete and the new program
# accepts the existing /etc/mailgate/mailgate.yaml (`mailgate check`). Config
# and state are never touched. A running service is restarted.
#
# --root DIR   install into a staging root (tests, packagers): every path
#              above goes under DIR; no user is created, no ownership is set
#              and systemctl is not called. Paths inside the installed files
#              (unit, symlink, config) are the final ones, without DIR.
# --prefix DIR where the program goes (default /opt/mailgate).
# --no-systemd no unit file and no systemctl.
#
# Needs: npm (only to install; Debian: `apt-get install npm`), useradd.
set -eu

PREFIX=/opt/mailgate
ROOT=/
SYSTEMD=yes
NAME=mailgate

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,/^set -eu/p' "$0" | sed -e '/^set -eu/d' -e 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
  case $1 in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
    --prefix=*) PREFIX=${1#*=}; shift ;;
    --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
    --root=*) ROOT=${1#*=}; shift ;;
    --no-systemd) SYSTEMD=no; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

# shellcheck source=packaging/target.sh
. "$(dirname "$0")/target.sh"
check_target

SRC=$(cd "$(dirname "$0")/.." && pwd -P)
if ! { [ -f "$SRC/package.json" ] && [ -f "$SRC/package-lock.json" ] && [ -x "$SRC/bin/mailgate" ]; }; then
  die "$SRC does not look like a mailgate tree (package.json, package-lock.json, bin/mailgate)"
fi
grep -q '"name": "mailgate"' "$SRC/package.json" || die "$SRC/package.json is not mailgate's"
command -v npm >/dev/null 2>&1 || die "npm is needed to install the dependencies (Debian: apt-get install npm)"

DEST=$R$PREFIX
STAGE=$DEST.installing
OLD=$DEST.previous
ETC=$R/etc/$NAME
STATE=$R/var/lib/$NAME
CONFIG=$ETC/$NAME.yaml

# Never replace a directory that is not an earlier mailgate install.
is_install() { [ -f "$1/package.json" ] && grep -q '"name": "mailgate"' "$1/package.json"; }
if [ -e "$DEST" ] && ! is_install "$DEST"; then
  if [ -n "$(ls -A "$DEST" 2>/dev/null)" ]; then die "$DEST exists and is not a mailgate install; refusing to replace it"; fi
fi

cleanup() { rm -rf "$STAGE"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. build the new tree beside the old one -------------------------------
say "building $PREFIX in $STAGE"
rm -rf "$STAGE"
mkdir -p "$STAGE"
for f in package.json package-lock.json README.md LICENSE; do
  [ -f "$SRC/$f" ] && cp "$SRC/$f" "$STAGE/"
done
for d in bin src config systemd packaging docs; do
  [ -d "$SRC/$d" ] && cp -R "$SRC/$d" "$STAGE/"
done
rm -rf "$STAGE/config/"*.local.yaml

say "installing dependencies (npm ci --omit=dev)"
# prefer-offline: reuse the npm cache where it has the exact versions.
(cd "$STAGE" && npm_config_prefer_offline=true npm ci --omit=dev --no-audit --no-fund --loglevel=error) ||
  die "npm ci failed; nothing was changed"
NODE=$STAGE/node_modules/node/bin/node
[ -x "$NODE" ] || die "the Node runtime was not installed ($NODE missing; are npm scripts disabled?)"
case $("$NODE" --version) in
  v24.* | v25.* | v26.*) ;;
  *) die "unexpected Node version $("$NODE" --version) in the runtime package" ;;
esac

# Program files belong to root and are read-only for the service.
if [ "$(id -u)" -eq 0 ]; then chown -R 0:0 "$STAGE"; fi
chmod -R u+rwX,go+rX,go-w "$STAGE"

# The example as installed: state and runtime paths point where systemd puts them.
EXAMPLE=$STAGE/config/$NAME.installed.yaml
"$NODE" "$STAGE/packaging/example-config.ts" "$STAGE/config/$NAME.yaml" "$EXAMPLE" ||
  die "could not prepare the example configuration"

# An upgrade must accept the config that is in force, or it does not happen.
if [ -f "$CONFIG" ]; then
  say "checking $CONFIG with the new version"
  "$STAGE/bin/mailgate" check -c "$CONFIG" >/dev/null ||
    die "the new version refuses $CONFIG (see above); fix the config or compare with the new example in $EXAMPLE; nothing was changed"
fi

# --- 2. user ------------------------------------------------------------------
if [ "$STAGING" = no ]; then
  if ! getent passwd "$NAME" >/dev/null; then
    say "creating system user $NAME"
    useradd --system --user-group --home-dir "/var/lib/$NAME" --no-create-home \
      --shell /usr/sbin/nologin --comment "mailgate TLS gateway" "$NAME"
  fi
fi
own() { # own USER:GROUP PATH... (not in a staging root, where the user does not exist)
  if [ "$STAGING" = no ]; then chown "$@"; fi
}

# --- 3. swap the program in ---------------------------------------------------
mkdir -p "$(dirname "$DEST")"
rm -rf "$OLD"
if [ -e "$DEST" ]; then
  say "upgrading $PREFIX"
  mv "$DEST" "$OLD"
fi
if ! mv "$STAGE" "$DEST"; then
  [ -e "$OLD" ] && mv "$OLD" "$DEST"
  die "could not move the new tree into place; the previous install is back"
fi
rm -rf "$OLD"
EXAMPLE=$DEST/config/$NAME.installed.yaml

mkdir -p "$R/usr/local/bin"
LINK=$R/usr/local/bin/$NAME
if [ -e "$LINK" ] && [ ! -L "$LINK" ]; then
  say "warning: $LINK exists and is not a symlink; left alone"
else
  ln -sfn "$PREFIX/bin/$NAME" "$LINK"
fi

# --- 4. config and state ------------------------------------------------------
mkdir -p "$ETC"
chmod 0750 "$ETC"
own "root:$NAME" "$ETC"
if [ -f "$CONFIG" ]; then
  cp "$EXAMPLE" "$CONFIG.dist"
  chmod 0640 "$CONFIG.dist"
  own "root:$NAME" "$CONFIG.dist"
  say "kept $CONFIG; the new example is $CONFIG.dist"
else
  cp "$EXAMPLE" "$CONFIG"
  chmod 0640 "$CONFIG"
  own "root:$NAME" "$CONFIG"
  say "installed the example config $CONFIG: edit it before the first start"
fi

mkdir -p "$STATE"
chmod 0700 "$STATE"
own "$NAME:$NAME" "$STATE"

# --- 5. systemd ---------------------------------------------------------------
if [ "$SYSTEMD" = yes ]; then
  UNIT_DIR=$R/etc/systemd/system
  mkdir -p "$UNIT_DIR"
  sed "s#/opt/mailgate#$PREFIX#g" "$DEST/systemd/$NAME.service" >"$UNIT_DIR/$NAME.service.tmp"
  chmod 0644 "$UNIT_DIR/$NAME.service.tmp"
  mv "$UNIT_DIR/$NAME.service.tmp" "$UNIT_DIR/$NAME.service"
  say "installed $UNIT_DIR/$NAME.service"
  if [ "$STAGING" = no ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    if systemctl is-active --quiet "$NAME.service"; then
      say "restarting the running service"
      systemctl restart "$NAME.service"
    else
      say "start it with: systemctl enable --now $NAME"
    fi
  fi
fi

say "done: $PREFIX ($("$DEST/node_modules/node/bin/node" --version))"
