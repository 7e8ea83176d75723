#!/usr/bin/env bash
# Builds the Windows client MSI with wixl:
#   target/msi/sallyport-client-<version>-x64.msi
#
# usage: packaging/build-msi.sh [--profile release|dev] [--version X.Y.Z] [--no-build]
#   --profile  cargo profile of sallyport-client.exe (default release)
#   --version  MSI version (default: the client's Cargo version; tests use it
#              to make an "upgrade")
#   --no-build package the exe that is already built
#
# Needs: rustup target x86_64-pc-windows-gnu, gcc-mingw-w64-x86-64, wixl,
# python3 (all installed by .ci/deps.sh). wintun.dll comes from the wintun
# crate's package in the cargo registry (`cargo fetch`), never downloaded here.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-pc-windows-gnu
profile=release
version=
build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile=$2; shift 2 ;;
        --version) version=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        *) echo "build-msi.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$profile" in
    release) profile_dir=release ;;
    dev) profile_dir=debug ;;
    *) echo "build-msi.sh: --profile must be release or dev" >&2; exit 2 ;;
esac

cargo fetch --locked -q
metadata=$(cargo metadata --format-version 1 --locked --filter-platform "$target")
meta() { python3 -c "import json,sys; m=json.load(sys.stdin); $1" <<<"$metadata"; }
[ -n "$version" ] || version=$(meta 'print(next(p["version"] for p in m["packages"] if p["name"]=="sallyport-client"))')
wintun_dir=$(meta 'import os; print(os.path.dirname(next(p["manifest_path"] for p in m["packages"] if p["name"]=="wintun")))')/wintun

if [ "$build" = 1 ]; then
    cargo build --locked --target "$target" --profile "$profile" -p sallyport-client
fi
exe=target/$target/$profile_dir/sallyport-client.exe
[ -f "$exe" ] || { echo "build-msi.sh: $exe is missing" >&2; exit 1; }

dll=$wintun_dir/bin/amd64/wintun.dll
[ -f "$dll" ] && [ -f "$wintun_dir/LICENSE.txt" ] \
    || { echo "build-msi.sh: no wintun.dll/LICENSE.txt in $wintun_dir" >&2; exit 1; }
x86_64-w64-mingw32-objdump -f "$dll" | grep -q 'file format pei-x86-64' \
    || { echo "build-msi.sh: $dll is not an amd64 DLL" >&2; exit 1; }

stage=target/msi/stage
rm -rf "$stage"
mkdir -p "$stage"
# Debug info stays in target/; the installed program does not need it.
x86_64-w64-mingw32-strip -o "$stage/sallyport-client.exe" "$exe"
cp "$dll" "$stage/wintun.dll"
cp "$wintun_dir/LICENSE.txt" "$stage/wintun-LICENSE.txt"
# The sample config with Windows paths.
sed -e 's|"/etc/sallyport/ca.crt"|'"'"'C:\\ProgramData\\Sallyport\\ca.crt'"'"'|' \
    -e '2a # On Windows: %ProgramData%\\Sallyport\\client.toml; the service reads it when it starts.' \
    packaging/client.toml >"$stage/client.toml"

out=target/msi/sallyport-client-$version-x64.msi
wixl --arch x64 -D Version="$version" -D SourceDir="$stage" -o "$out" packaging/msi/sallyport.wxs
# wixl 0.101 ignores NeverOverwrite and Permanent on a Component; set them
# in the Component table: 256 (64-bit) + 128 (never overwrite) + 16 (permanent).
msibuild "$out" -q "UPDATE \`Component\` SET \`Attributes\` = 400 WHERE \`Component\` = 'DefaultConfig'"
attrs=$(msiinfo export "$out" Component | awk -F'\t' '$1 == "DefaultConfig" { print $4 }')
[ "$attrs" = 400 ] || { echo "build-msi.sh: DefaultConfig attributes are '$attrs', not 400" >&2; exit 1; }
echo "$out"
