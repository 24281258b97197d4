#!/bin/sh
# The GPU check in one short lease (see scripts/device_check.py for what it does and its options):
#   here:  scripts/device_check.sh --prepare      (or --dry-run: the whole check on the CPU backend)
#   there: scripts/device_check.sh                (summary in $OUT/device_check.md, exit 1 on a mismatch)
# python3 only needs its standard library there; here --prepare uses the project's venv.
here=$(cd "$(dirname "$0")" && pwd)
py=python3
if [ -x "$here/../.venv/bin/python" ]; then py="$here/../.venv/bin/python"; fi
exec "$py" "$here/device_check.py" "$@"
