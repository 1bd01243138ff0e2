#!/usr/bin/env bash
# Starts fieldsyncd on a self-contained demo: no broker, no NetworkManager, no root. It
# stays offline and keeps everything captured in ./fieldsync-state, with two work orders
# a dispatcher would have pushed. Stop it with Ctrl-C; the state stays for next time.
#
#   scripts/demo.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh
cargo build --release --locked -p fieldsyncd -p fieldsync-ui-bridge

cat <<'HELP'

fieldsyncd is starting. In another terminal, from this folder:

  target/release/fieldctl work-orders
  target/release/fieldctl add WO-1001 defect --title "Cracked flange" --severity high
  target/release/fieldctl attach-photo <item id printed above> some-photo.jpg
  target/release/fieldctl status
  target/release/fieldctl outbox

HELP
exec target/release/fieldsyncd --config daemon/config/demo.toml
