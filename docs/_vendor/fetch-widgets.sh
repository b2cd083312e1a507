#!/usr/bin/env bash
# How html-manager/ was made. The docs build never runs this (it needs npm and the network); run it
# again only to move to another version, then commit what it wrote.
#
# Rendered notebooks show their ipywidgets through @jupyter-widgets/html-manager's embed.js, the
# bundle that needs no require.js and renders the widgets ipywidgets ships (controls, output) with no
# loader, so it never fetches a module from a CDN. ipywidgets 8 asks for html-manager ^1.0.1
# (ipywidgets/_version.py: __html_manager_version__).
#
# The bundle is stored gzip-compressed (1.9 MB -> 450 KB); docs/_ext/stages_docs.py unpacks it into the
# build's _static/widgets/ and checks every file against SHA256SUMS (sums of the unpacked files).
# Font Awesome's woff2 fonts (SIL OFL 1.1) sit beside it: embed.js's CSS loads them relative to itself;
# every browser that runs the bundle reads woff2, so the eot/ttf/svg/woff copies are left out.
set -euo pipefail
version=${1:-1.0.15}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cd "$work"
npm pack --silent "@jupyter-widgets/html-manager@$version" >/dev/null
tar xzf "jupyter-widgets-html-manager-$version.tgz"
dist=$work/package/dist

out=$here/html-manager
rm -rf "$out"
mkdir -p "$out"
fonts=$(grep -o '[0-9a-f]\{20\}\.woff2' "$dist/embed.js" | sort -u)
gzip -9nc "$dist/embed.js" >"$out/embed.js.gz"
cp "$dist/embed.js.LICENSE.txt" "$out/"
for font in $fonts; do cp "$dist/$font" "$out/"; done
(cd "$dist" && sha256sum embed.js $fonts) >"$out/SHA256SUMS"
echo "@jupyter-widgets/html-manager@$version" >"$out/VERSION"
echo "wrote $out:"
ls -l "$out"
