#!/usr/bin/env bash
# The second command of the README: the whole test suite on this machine.
# As root the privileged tests (namespaces, cgroups, btrfs, nftables, tc) run
# for real; otherwise they print why they are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
image/build-test-image.sh >/dev/null
export CPH_TEST_IMAGE="$PWD/target/images/cph-test-image.tar.gz"
cargo build --bins
RUST_TEST_THREADS="${CPH_TEST_THREADS:-2}" cargo test --workspace --all-targets
if compgen -G "tests/sdk/test_*.py" >/dev/null; then
    python3 -m pytest -q tests/sdk
fi
