# Sourced by install.sh and uninstall.sh: checks --prefix and --root (set in
# PREFIX and ROOT by the caller, which also defines die), then sets
# R (the root, empty for /) and STAGING (yes when a staging root is used).
# shellcheck shell=sh

check_target() {
  # Paths end up in a sed expression and a unit file: keep them plain.
  case $PREFIX in
    /*) ;;
    *) die "--prefix must be an absolute path" ;;
  esac
  case $PREFIX in
    *[!A-Za-z0-9._/-]* | / | */ | *//* | */./* | */../* | */. | */..) die "--prefix $PREFIX: use a plain absolute path like /opt/mailgate" ;;
  esac
  case $ROOT in
    /*) ;;
    *) die "--root must be an absolute path" ;;
  esac
  [ -d "$ROOT" ] || die "--root $ROOT is not a directory"
  R=$(cd "$ROOT" && pwd -P)
  [ "$R" = / ] && R=
  STAGING=no
  [ -n "$R" ] && STAGING=yes
  if [ "$STAGING" = no ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (or use --root DIR for a staging install)"
  fi
}
