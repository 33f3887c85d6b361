#!/usr/bin/env bash
# Fetch the headers the C++ example builds against into DEST (default build/cpp-deps):
#   onnxruntime_cxx_api.h & co. from Debian's libonnxruntime-dev, nlohmann/json.hpp from
#   nlohmann-json3-dev. Both are taken from Debian trixie through a private apt configuration
#   (its own sources list, package lists and cache under DEST/apt), so the system's apt setup is
#   left untouched; nothing is installed, the .deb files are only unpacked into DEST.
# The shared library itself comes from the onnxruntime wheel (see README.md); the C API is
# backward compatible, so these headers (ORT_API_VERSION 21, onnxruntime 1.21) work with any
# newer libonnxruntime.
set -euo pipefail

DEST="$(realpath -m "${1:-build/cpp-deps}")"
SUITE="${CPP_DEPS_SUITE:-trixie}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
APT="$DEST/apt"

if [[ -f "$DEST/include/onnxruntime/onnxruntime_cxx_api.h" && -f "$DEST/include/nlohmann/json.hpp" ]]; then
    echo "cpp-deps: headers already in $DEST/include"
    exit 0
fi
command -v apt-get >/dev/null || { echo "cpp-deps: needs apt-get (Debian/Ubuntu)" >&2; exit 1; }
[[ -f "$KEYRING" ]] || { echo "cpp-deps: $KEYRING missing: apt-get install debian-archive-keyring" >&2; exit 1; }

mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/debs" "$DEST/include"
echo "deb [signed-by=$KEYRING] http://deb.debian.org/debian $SUITE main" > "$APT/sources.list"
OPTS=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o "APT::Sandbox::User=root"
      -o "Debug::NoLocking=1" -qq)

apt-get "${OPTS[@]}" update
(cd "$APT/debs" && apt-get "${OPTS[@]}" download libonnxruntime-dev nlohmann-json3-dev)

unpacked="$APT/root"
rm -rf "$unpacked"
for deb in "$APT"/debs/*.deb; do
    dpkg-deb -x "$deb" "$unpacked"
done
rm -rf "$DEST/include/onnxruntime" "$DEST/include/nlohmann"
cp -r "$unpacked/usr/include/onnxruntime" "$unpacked/usr/include/nlohmann" "$DEST/include/"
rm -rf "$unpacked" "$APT/lists" "$APT/cache"
grep -h "define ORT_API_VERSION" "$DEST/include/onnxruntime/onnxruntime_c_api.h"
echo "cpp-deps: headers in $DEST/include ($(ls "$APT"/debs | tr '\n' ' '))"
