#!/usr/bin/env bash
# Lays the offline RustSec snapshot in ../shared/advisory-db out where cargo-deny looks
# for its clone of https://github.com/rustsec/advisory-db (db-path in deny.toml), as a
# git repository committed at the snapshot's date, so `cargo deny --offline` reads it and
# judges its staleness by that date. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src="${TRELLIS_ADVISORY_DB:-$root/../shared/advisory-db}"
# cargo-deny names the clone <last url segment>-<xxhash64 of the url>.
dst="$root/target/advisory-dbs/advisory-db-3157b0e258782691"
if [[ ! -d "$src/crates" ]]; then
  echo "advisory-db.sh: no advisory snapshot at $src (set TRELLIS_ADVISORY_DB)" >&2
  exit 1
fi
stamp="$(cut -d' ' -f2 "$src/SNAPSHOT" 2>/dev/null || true)"
if [[ -f "$dst/.snapshot" ]] && cmp -s "$dst/.snapshot" "$src/SNAPSHOT"; then
  exit 0
fi
rm -rf "$dst"
mkdir -p "$dst"
cp -r "$src/." "$dst/"
chmod -R u+w "$dst"
git -C "$dst" init -q -b main
git -C "$dst" add -A
GIT_AUTHOR_DATE="${stamp:-now}" GIT_COMMITTER_DATE="${stamp:-now}" \
  git -C "$dst" -c user.name=snapshot -c user.email=snapshot@invalid commit -q -m "advisory-db snapshot ${stamp}"
cp "$src/SNAPSHOT" "$dst/.snapshot"
