#!/usr/bin/env bash
# The first command of the README: installs what is needed, builds the
# platform and the test phone image, and runs the whole platform on this one
# machine with `cph up` (Ctrl-C stops it; phones' data is kept).
# Extra arguments go to `cph up` (e.g. --data-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --bins
image/build-test-image.sh >/dev/null
exec target/release/cph up --image target/images/cph-test-image.tar.gz "$@"
