#!/usr/bin/env bash
# Builds the Debian packages with cargo-deb:
#   target/debian/sallyport-server_<version>-1_<arch>.deb
#   target/debian/sallyport-client_<version>-1_<arch>.deb
#
# usage: packaging/build-deb.sh [--profile release|NAME] [--no-build]
# The packaging metadata is in [package.metadata.deb] of vpn/server/Cargo.toml
# and vpn/client/Cargo.toml; units and maintainer scripts in packaging/deb/.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
build=()
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile=$2; shift 2 ;;
        --no-build) build=(--no-build); shift ;;
        *) echo "build-deb.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

mkdir -p target/deb/man
for page in sallyport-server.8 sallyport-client.8; do
    gzip -9n <"packaging/deb/$page" >"target/deb/man/$page.gz"
done
# A Debian changelog for this version, dated by the last commit (reproducible).
version=$(cargo metadata --format-version 1 --no-deps --locked \
    | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="sallyport-server"))')
date=$(date -R -u -d "@$(git log -1 --format=%ct 2>/dev/null || date +%s)")
cat >target/deb/changelog <<CHANGELOG
sallyport ($version-1) unstable; urgency=medium

  * Sallyport $version.

 -- Sallyport developers <sallyport@example.invalid>  $date
CHANGELOG
for pkg in sallyport-server sallyport-client; do
    cargo deb --locked -p "$pkg" --profile "$profile" "${build[@]}" -o target/debian/
done
