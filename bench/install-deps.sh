#!/usr/bin/env bash
# What `npm run bench` needs on a fresh Debian 12 machine: the test suite's
# backends (.ci/install-deps.sh: Dovecot, Postfix and smtp-sink, nginx), plus
# the peers it compares against (nginx's mail module, HAProxy), the load
# tools (wrk; h2load from nghttp2-client, which .ci/install-deps.sh installs
# for the tests too; a C compiler and OpenSSL headers for bench/loadgen.c)
# and prlimit. System services are kept from starting, as for the tests.
set -euo pipefail
exec bash "$(dirname "$0")/../.ci/install-deps.sh" libnginx-mod-mail haproxy wrk build-essential libssl-dev util-linux
