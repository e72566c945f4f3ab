#!/bin/sh
# Fetch real Debian guests (kernels + busybox-static) with apt and build the
# busybox initramfs images that btvmm (and QEMU, as the reference) boot.
#
#   scripts/fetch-guests.sh [--arch amd64|i386|all] [--update]   (default: all)
#
# Everything lands in the cache folder $BTVMM_GUESTS_DIR (default:
# guests-cache/ at the repository root, ignored by git). Idempotent: a package
# is downloaded and unpacked again only when the archive's candidate version
# differs from the one recorded in its stamp. apt-get update runs only when a
# package is unknown to apt, or with --update (to follow the archive's newest
# kernel). See scripts/README.md.
set -eu

PROG=fetch-guests
die() { echo "$PROG: error: $*" >&2; exit 1; }
note() { echo "$PROG: $*" >&2; }

ARCHES="amd64 i386"
FORCE_UPDATE=no
while [ $# -gt 0 ]; do
    case "$1" in
        --update) FORCE_UPDATE=yes; shift; continue ;;
        --arch) [ $# -ge 2 ] || die "--arch needs a value (amd64, i386 or all)"; ARG=$2; shift 2 ;;
        --arch=*) ARG=${1#--arch=}; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (usage: $0 [--arch amd64|i386|all] [--update])" ;;
    esac
    case "$ARG" in
        amd64|i386) ARCHES=$ARG ;;
        all) ARCHES="amd64 i386" ;;
        *) die "unknown architecture '$ARG' (amd64, i386 or all)" ;;
    esac
done

SCRIPTS=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$SCRIPTS/.." && pwd)
CACHE=${BTVMM_GUESTS_DIR:-$REPO/guests-cache}
mkdir -p "$CACHE/debs" || die "cannot create the cache folder $CACHE"
CACHE=$(cd "$CACHE" && pwd)

for tool in apt-get apt-cache dpkg dpkg-deb sha256sum python3; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' is needed and not installed"
done

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
    # apt-get download as root otherwise warns that the _apt user cannot
    # write to the download folder.
    APT_DL_OPTS="-o APT::Sandbox::User=root"
else
    SUDO=sudo
    APT_DL_OPTS=""
fi
as_root() {
    if [ -n "$SUDO" ] && ! command -v sudo >/dev/null 2>&1; then
        die "'$*' needs root and sudo is not installed; run it as root once"
    fi
    $SUDO "$@"
}

UPDATED=no
apt_update() {
    [ "$UPDATED" = no ] || return 0
    note "apt-get update"
    # A partial failure (one index out of sync on the mirror, say) is not
    # fatal: what matters is whether the packages resolve afterwards.
    as_root apt-get update -qq -o Acquire::Retries=3 \
        || note "warning: apt-get update reported errors (above); going on with the package lists apt has"
    UPDATED=yes
    rm -f "$CANDIDATES"
}

# Candidate versions of the packages looked up by name, from one apt-cache
# call (each call costs a second or so): lines "PKG:ARCH VERSION".
CANDIDATES="$CACHE/debs/.candidates"
NATIVE=$(dpkg --print-architecture)
load_candidates() {
    apt-cache policy linux-image-amd64:amd64 busybox-static:amd64 \
        linux-image-686:i386 linux-image-686-pae:i386 busybox-static:i386 2>/dev/null |
        awk -v native="$NATIVE" '
            /^[^ ]/ { pkg = $1; sub(/:$/, "", pkg); if (pkg !~ /:/) pkg = pkg ":" native }
            $1 == "Candidate:" && $2 != "(none)" { print pkg, $2 }' > "$CANDIDATES"
}
# candidate PKG:ARCH -> the version apt would install, or nothing.
candidate() {
    [ -f "$CANDIDATES" ] || load_candidates
    awk -v p="$1" '$1 == p { print $2; exit }' "$CANDIDATES"
}

# need_candidate PKG[:ARCH] -> version; runs apt-get update once if unknown.
need_candidate() {
    local v
    v=$(candidate "$1")
    if [ -z "$v" ]; then
        apt_update
        v=$(candidate "$1")
    fi
    [ -n "$v" ] || die "package $1 is not available from the configured apt sources"
    echo "$v"
}

# fetch_deb PKG ARCH VERSION -> prints the path of the cached .deb.
# Stamp debs/PKG_ARCH.stamp: "PKG ARCH VERSION SHA256 FILE".
fetch_deb() {
    local pkg=$1 arch=$2 ver=$3 stamp tmp got file sum
    stamp="$CACHE/debs/${pkg}_$arch.stamp"
    echo "${pkg}_$arch" >> "$CACHE/debs/.used"
    if [ -f "$stamp" ]; then
        set -- $(cat "$stamp")
        if [ "$#" -eq 5 ] && [ "$3" = "$ver" ] && [ -f "$CACHE/debs/$5" ]; then
            echo "$CACHE/debs/$5"
            return 0
        fi
    fi
    note "downloading $pkg:$arch=$ver"
    tmp=$(mktemp -d "$CACHE/debs/.dl.XXXXXX")
    if ! (cd "$tmp" && apt-get download -q=2 $APT_DL_OPTS "$pkg:$arch=$ver") >&2; then
        rm -rf "$tmp"
        die "cannot download $pkg:$arch=$ver (apt-get download failed; is the archive reachable?)"
    fi
    set -- "$tmp"/*.deb
    [ "$#" -eq 1 ] && [ -f "$1" ] || { rm -rf "$tmp"; die "apt-get download $pkg:$arch=$ver left no single .deb"; }
    got=$(dpkg-deb -f "$1" Version)
    [ "$got" = "$ver" ] || { rm -rf "$tmp"; die "downloaded $pkg has version $got, expected $ver"; }
    file=$(basename "$1")
    mv -f "$1" "$CACHE/debs/$file"
    rm -rf "$tmp"
    sum=$(sha256sum "$CACHE/debs/$file" | cut -d' ' -f1)
    echo "$pkg $arch $ver $sum $file" > "$stamp"
    echo "$CACHE/debs/$file"
}

# unpack_deb DEB DIR: dpkg -x into DIR unless DIR/.stamp names this very deb.
unpack_deb() {
    local deb=$1 dir=$2 want
    want="$(basename "$deb") $(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version)"
    if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$want" ]; then
        return 0
    fi
    note "unpacking $(basename "$deb")"
    rm -rf "$dir" "$dir.tmp"
    mkdir -p "$dir.tmp"
    dpkg -x "$deb" "$dir.tmp" || { rm -rf "$dir.tmp"; die "dpkg -x $deb failed"; }
    echo "$want" > "$dir.tmp/.stamp"
    mv "$dir.tmp" "$dir"
}

# versioned_image META ARCH -> "PKG VERSION" of the linux-image-<abi>-<flavour>
# package that the metapackage META depends on (read from the .deb's Depends).
versioned_image() {
    local meta=$1 arch=$2 mver mdeb
    mver=$(need_candidate "$meta:$arch")
    mdeb=$(fetch_deb "$meta" "$arch" "$mver")
    dpkg-deb -f "$mdeb" Depends | tr ',|' '\n\n' | awk '
        { sub(/^[ \t]+/, "") }
        $1 ~ /^linux-image-[0-9]/ {
            pkg = $1; sub(/:.*/, "", pkg); ver = ""
            if ($2 == "(=") { ver = $3; sub(/\)$/, "", ver) }
            print pkg, ver; exit
        }'
}

# Paths in the manifest are relative to the cache folder.
MANIFEST_LINES=""
record() { # ARCH STABLE-PATH PACKAGE VERSION
    local sum
    sum=$(sha256sum "$CACHE/$2" | cut -d' ' -f1)
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$sum" >> "$CACHE/$1/manifest.tmp"
}

# link_stable ARCH NAME TARGET-relative-to-ARCH-dir
link_stable() {
    [ -e "$CACHE/$1/$3" ] || die "expected file $1/$3 is missing from the unpacked package"
    ln -sfn "$3" "$CACHE/$1/$2"
}

# kernel ARCH META SUFFIX: fetch META -> versioned image, unpack, link
# vmlinuz$SUFFIX, config$SUFFIX, System.map$SUFFIX.
kernel() {
    local arch=$1 meta=$2 suffix=$3 vi kpkg kver kdeb krel mver
    vi=$(versioned_image "$meta" "$arch")
    set -- $vi
    [ "$#" -ge 1 ] || die "cannot find a linux-image-<version> dependency of $meta:$arch"
    kpkg=$1
    kver=${2:-$(need_candidate "$kpkg:$arch")}
    kdeb=$(fetch_deb "$kpkg" "$arch" "$kver")
    unpack_deb "$kdeb" "$CACHE/$arch/pkgs/$kpkg"
    krel=${kpkg#linux-image-}
    link_stable "$arch" "vmlinuz$suffix" "pkgs/$kpkg/boot/vmlinuz-$krel"
    link_stable "$arch" "config$suffix" "pkgs/$kpkg/boot/config-$krel"
    link_stable "$arch" "System.map$suffix" "pkgs/$kpkg/boot/System.map-$krel"
    record "$arch" "$arch/vmlinuz$suffix" "$kpkg" "$kver"
    mver=$(candidate "$meta:$arch")
    printf '%s\t%s\t%s\t%s\t%s\n' "$arch" "-" "$meta" "$mver" "-" >> "$CACHE/$arch/manifest.tmp"
    KEEP="$KEEP $kpkg"
}

busybox() {
    local arch=$1 bver bdeb
    bver=$(need_candidate "busybox-static:$arch")
    bdeb=$(fetch_deb busybox-static "$arch" "$bver")
    unpack_deb "$bdeb" "$CACHE/$arch/pkgs/busybox-static"
    link_stable "$arch" busybox "pkgs/busybox-static/bin/busybox"
    record "$arch" "$arch/busybox" busybox-static "$bver"
    KEEP="$KEEP busybox-static"
}

initramfs() {
    local arch=$1 lister b out inputs
    # The applet list comes from running busybox --list-full on the host: the
    # target busybox if it runs here, otherwise the amd64 one (same source
    # package), otherwise none (then /init runs busybox --install -s).
    lister=""
    for b in "$CACHE/$arch/busybox" "$CACHE/amd64/busybox"; do
        if [ -x "$b" ] && "$b" true >/dev/null 2>&1; then lister=$b; break; fi
    done
    out="$CACHE/$arch/initramfs.cpio.gz"
    inputs="$(sha256sum "$CACHE/$arch/busybox" "$SCRIPTS/initramfs/init" "$SCRIPTS/mkinitramfs.py" | cut -d' ' -f1 | tr '\n' ' ')lister=${lister:+yes}"
    if [ -f "$out" ] && [ -f "$out.stamp" ] && [ "$(cat "$out.stamp")" = "$inputs" ]; then
        :
    else
        note "building $arch/initramfs.cpio.gz"
        python3 "$SCRIPTS/mkinitramfs.py" --busybox "$CACHE/$arch/busybox" \
            --init "$SCRIPTS/initramfs/init" ${lister:+--applets-from "$lister"} \
            -o "$out" || die "building $out failed"
        echo "$inputs" > "$out.stamp"
    fi
    record "$arch" "$arch/initramfs.cpio.gz" "-" "-"
}

# prune ARCH: drop unpacked packages this run did not use (an older kernel ABI).
prune() {
    local arch=$1 d
    for d in "$CACHE/$arch/pkgs"/*; do
        [ -d "$d" ] || continue
        case " $KEEP " in *" $(basename "$d") "*) ;; *) note "removing stale $arch/pkgs/$(basename "$d")"; rm -rf "$d" ;; esac
    done
}

[ "$FORCE_UPDATE" = no ] || apt_update
rm -f "$CACHE/debs/.used" "$CANDIDATES"

for arch in $ARCHES; do
    mkdir -p "$CACHE/$arch/pkgs"
    rm -f "$CACHE/$arch/manifest.tmp"
    KEEP=""
    case $arch in
        amd64)
            kernel amd64 linux-image-amd64 ""
            ;;
        i386)
            if ! dpkg --print-foreign-architectures | grep -qx i386 \
               && [ "$(dpkg --print-architecture)" != i386 ]; then
                note "dpkg --add-architecture i386"
                as_root dpkg --add-architecture i386 || die "dpkg --add-architecture i386 failed"
                apt_update
            fi
            kernel i386 linux-image-686 "-686"
            kernel i386 linux-image-686-pae "-686-pae"
            ;;
    esac
    busybox "$arch"
    initramfs "$arch"
    prune "$arch"
    mv "$CACHE/$arch/manifest.tmp" "$CACHE/$arch/manifest.txt"
done

# Stamps of packages of the arches done here that this run did not use (an
# older kernel ABI), then debs no stamp points at, are removed.
for st in "$CACHE/debs"/*.stamp; do
    [ -f "$st" ] || continue
    set -- $(cat "$st")
    case " $ARCHES " in *" $2 "*) ;; *) continue ;; esac
    grep -qx "${1}_$2" "$CACHE/debs/.used" 2>/dev/null || rm -f "$st"
done
for f in "$CACHE/debs"/*.deb; do
    [ -f "$f" ] || continue
    cat "$CACHE/debs"/*.stamp 2>/dev/null | awk -v f="$(basename "$f")" '$5 == f { found = 1 } END { exit !found }' \
        || { note "removing stale debs/$(basename "$f")"; rm -f "$f"; }
done

{
    echo "# btvmm guests, written by scripts/fetch-guests.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# paths are relative to $CACHE; a '-' path is a metapackage (no file)"
    printf '# arch\tpath\tpackage\tversion\tsha256\n'
    for arch in amd64 i386; do
        [ -f "$CACHE/$arch/manifest.txt" ] && cat "$CACHE/$arch/manifest.txt"
    done
} > "$CACHE/manifest.txt"

note "done; $CACHE/manifest.txt:"
cat "$CACHE/manifest.txt"
