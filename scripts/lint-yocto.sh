#!/usr/bin/env bash
# Lints yocto-layer/meta-fieldsync: oelint-adv against every Yocto series the layer
# declares in LAYERSERIES_COMPAT, the kas files against kas's schema, and the crate list
# against Cargo.lock. Fails on any error or warning; informational findings are shown.
#
#   scripts/lint-yocto.sh
#
# The tools live in a venv under target/, pinned by scripts/yocto-lint-requirements.txt.
# Rules switched off for the whole layer, and why, are in the layer's .oelint.cfg; the
# rest are suppressed on their line with a `# nooelint:` comment and a reason above it.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
layer="$repo/yocto-layer/meta-fieldsync"
requirements="$repo/scripts/yocto-lint-requirements.txt"
venv="$repo/target/venv-oelint"
python=/usr/bin/python3

die() { echo "lint-yocto: $*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

# Debian splits venv and ensurepip out of python3.
if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
    echo "lint-yocto: installing python3-venv" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv
fi

# Rebuilt whenever the pins change, so a stale venv never lints with other versions.
if ! cmp -s "$requirements" "$venv/requirements.txt" 2>/dev/null; then
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/requirements.txt"
fi

failed=0

releases="$(sed -n 's/^LAYERSERIES_COMPAT_fieldsync *= *"\(.*\)"/\1/p' "$layer/conf/layer.conf")"
[ -n "$releases" ] || die "no LAYERSERIES_COMPAT_fieldsync in conf/layer.conf"
mapfile -t files < <(cd "$layer" && find . -type f \
    \( -name '*.bb' -o -name '*.bbappend' -o -name '*.bbclass' -o -path './conf/*.conf' \) \
    | sort)

for release in $releases; do
    echo "== oelint-adv $("$venv/bin/oelint-adv" --version | awk '{ print $2 }') --release $release"
    # The layer's own settings, never a stray ~/.oelint.cfg; relative paths in findings.
    findings="$(cd "$layer" && OELINT_CONFIG="$layer/.oelint.cfg" \
        "$venv/bin/oelint-adv" --quiet --relpaths --mode all --release "$release" \
        "${files[@]}" 2>&1)" || true
    if [ -n "$findings" ]; then
        echo "$findings"
    fi
    if echo "$findings" | grep -Eq ':(error|warning):'; then
        failed=1
    fi
done

echo "== kas files"
"$venv/bin/python" - "$repo" "$layer/kas" <<'EOF' || failed=1
import json
import pathlib
import sys

import jsonschema
import kas
import yaml

repo, kasdir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
schema = json.loads((pathlib.Path(kas.__file__).parent / "schema-kas.json").read_text())
bad = 0
for path in sorted(kasdir.rglob("*.yml")):
    name = path.relative_to(repo)
    try:
        config = yaml.safe_load(path.read_text())
        jsonschema.validate(config, schema)
    except (yaml.YAMLError, jsonschema.ValidationError) as e:
        print(f"{name}: {e}")
        bad = 1
        continue
    # kas resolves plain includes against the root of the repository holding the file.
    for include in config["header"].get("includes", []):
        if isinstance(include, str) and not (repo / include).is_file():
            print(f"{name}: includes {include}, which does not exist")
            bad = 1
    print(f"{name}: ok")
sys.exit(bad)
EOF

echo "== crate list"
"$python" "$repo/scripts/gen-crates-inc.py" --check && echo "fieldsync-crates.inc matches Cargo.lock" \
    || failed=1

[ "$failed" -eq 0 ] || die "findings above"
echo "lint-yocto: ok"
