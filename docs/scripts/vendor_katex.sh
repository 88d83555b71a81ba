#!/usr/bin/env bash
# Vendors KaTeX into docs/javascripts/katex so that math renders with no network access.
# Run once when upgrading KaTeX; the output is committed. Needs npm (the npm registry).
#
# Keeps only what the site uses: katex.min.js, the auto-render extension, the CSS and the
# woff2 fonts (every current browser reads woff2); the CSS's woff/ttf fallbacks are removed
# so that no browser asks for a file that is not there.
set -euo pipefail
VERSION="${1:-0.19.1}"
HERE="$(cd "$(dirname "$0")" && pwd)"
DEST="$HERE/../javascripts/katex"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && npm pack --silent "katex@$VERSION" >/dev/null && tar xzf "katex-$VERSION.tgz")
rm -rf "$DEST"
mkdir -p "$DEST/fonts" "$DEST/contrib"
cp "$TMP/package/dist/katex.min.js" "$DEST/"
cp "$TMP/package/dist/contrib/auto-render.min.js" "$DEST/contrib/"
cp "$TMP/package/dist/fonts/"*.woff2 "$DEST/fonts/"
cp "$TMP/package/LICENSE" "$DEST/LICENSE"
sed -E 's/,url\(fonts\/[A-Za-z0-9_-]+\.woff\) format\("woff"\)//g; s/,url\(fonts\/[A-Za-z0-9_-]+\.ttf\) format\("truetype"\)//g' \
    "$TMP/package/dist/katex.min.css" > "$DEST/katex.min.css"
echo "$VERSION" > "$DEST/VERSION"
if grep -qE '\.(woff|ttf)\)' "$DEST/katex.min.css"; then
    echo "vendor_katex.sh: woff/ttf references left in katex.min.css" >&2
    exit 1
fi
echo "KaTeX $VERSION vendored into $DEST"
