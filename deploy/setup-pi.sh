#!/usr/bin/env bash
# Install leukoedge as a service on Raspberry Pi OS Bookworm (64-bit), Pi 4 or Pi 5.
#
#   sudo deploy/setup-pi.sh [--bundle PATH] [--edgetpu] [--opencv] [--camera SPEC]
#                           [--host ADDR] [--port N] [--source DIR_OR_WHEEL]
#
# What it does (idempotent; safe to re-run to upgrade):
#   1. apt: python3-venv, python3-picamera2 (the Pi camera stack comes from apt, not pip),
#      optionally python3-opencv (USB cameras) and libedgetpu1-std (Coral apt repo);
#   2. a system user `leukoedge` (no login, member of video/plugdev);
#   3. a venv at /opt/leukoedge/venv created with --system-site-packages so the apt
#      picamera2 is importable, and `pip install leukoedge[edge]` from --source
#      (default: this repository). No TensorFlow is installed on the Pi;
#   4. /etc/leukoedge/leukoedge.env with a freshly generated access token (kept on re-runs);
#   5. the systemd unit, enabled; started when a bundle is in place.
# Research use only; leukoedge is not a diagnostic device.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SOURCE="$REPO_DIR"
BUNDLE=""
EDGETPU=0
OPENCV=0
CAMERA="auto"
HOST="0.0.0.0"
PORT="8080"
PREFIX=/opt/leukoedge
STATE=/var/lib/leukoedge
ETC=/etc/leukoedge
SERVICE_USER=leukoedge

die() { echo "setup-pi: $*" >&2; exit 1; }
say() { echo "==> $*"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --bundle) BUNDLE="${2:?--bundle needs a path}"; shift 2 ;;
        --edgetpu) EDGETPU=1; shift ;;
        --opencv) OPENCV=1; shift ;;
        --camera) CAMERA="${2:?--camera needs a spec}"; shift 2 ;;
        --host) HOST="${2:?--host needs an address}"; shift 2 ;;
        --port) PORT="${2:?--port needs a number}"; shift 2 ;;
        --source) SOURCE="${2:?--source needs a directory or wheel}"; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[[ $EUID -eq 0 ]] || die "run as root: sudo $0 $*"
# shellcheck disable=SC1091
. /etc/os-release
if [[ "${VERSION_CODENAME:-}" != "bookworm" ]]; then
    echo "setup-pi: warning: written for Raspberry Pi OS Bookworm, this is ${PRETTY_NAME:-unknown}" >&2
fi
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number"
if [[ -n "$BUNDLE" && ! -e "$BUNDLE" ]]; then die "bundle $BUNDLE does not exist"; fi

say "apt packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
PKGS=(python3-venv python3-pip python3-picamera2 ca-certificates curl gnupg)
if [[ $OPENCV -eq 1 ]]; then PKGS+=(python3-opencv); fi
apt-get install -y --no-install-recommends "${PKGS[@]}"

if [[ $EDGETPU -eq 1 ]]; then
    say "Coral Edge TPU runtime (libedgetpu1-std from the Coral apt repository)"
    KEYRING=/usr/share/keyrings/coral-edgetpu.gpg
    if [[ ! -s "$KEYRING" ]]; then
        curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | gpg --dearmor --yes -o "$KEYRING"
    fi
    echo "deb [signed-by=$KEYRING] https://packages.cloud.google.com/apt coral-edgetpu-stable main" \
        > /etc/apt/sources.list.d/coral-edgetpu.list
    apt-get update -qq
    apt-get install -y libedgetpu1-std
fi

say "service user $SERVICE_USER"
if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    useradd --system --home-dir "$STATE" --shell /usr/sbin/nologin "$SERVICE_USER"
fi
usermod -a -G video "$SERVICE_USER"
if getent group plugdev >/dev/null; then usermod -a -G plugdev "$SERVICE_USER"; fi
install -d -o "$SERVICE_USER" -g "$SERVICE_USER" -m 0750 "$STATE" "$STATE/data"
install -d -o root -g root -m 0755 "$PREFIX" "$ETC"

say "virtualenv $PREFIX/venv (with system site packages for picamera2)"
if [[ ! -x "$PREFIX/venv/bin/python" ]]; then
    python3 -m venv --system-site-packages "$PREFIX/venv"
fi
"$PREFIX/venv/bin/python" -m pip install --quiet --upgrade pip
if [[ -d "$SOURCE" ]]; then
    # a copy the service can read (the repo may live in a home directory ProtectHome hides)
    rm -rf "$PREFIX/src"
    mkdir -p "$PREFIX/src"
    tar -C "$SOURCE" --exclude=.git --exclude=.venv --exclude='*.pyc' -cf - . | tar -C "$PREFIX/src" -xf -
    "$PREFIX/venv/bin/python" -m pip install --quiet "$PREFIX/src[edge]"
else
    "$PREFIX/venv/bin/python" -m pip install --quiet "${SOURCE}[edge]"
fi
"$PREFIX/venv/bin/python" -c "import picamera2" 2>/dev/null \
    || echo "setup-pi: note: picamera2 is not importable; the app will run in upload mode" >&2

if [[ -n "$BUNDLE" ]]; then
    say "bundle -> $STATE/bundle (checksums verified before it replaces the old one)"
    rm -rf "$STATE/bundle.new"
    if [[ -d "$BUNDLE" ]]; then
        cp -r "$BUNDLE" "$STATE/bundle.new"
    else
        # leukoedge's own extractor refuses path traversal, links and oversized archives
        "$PREFIX/venv/bin/python" -c 'import sys; from pathlib import Path; from leukoedge.bundle import extract_archive
dest = Path(sys.argv[2]); dest.mkdir(); extract_archive(Path(sys.argv[1]), dest)' "$BUNDLE" "$STATE/bundle.new"
    fi
    "$PREFIX/venv/bin/python" -c 'import sys; from leukoedge.bundle import load_bundle
b = load_bundle(sys.argv[1]); print(f"bundle ok: {b.name} {b.version}, labels {list(b.labels)}")' "$STATE/bundle.new" \
        || { rm -rf "$STATE/bundle.new"; die "the bundle failed verification; the installed one is unchanged"; }
    rm -rf "$STATE/bundle.old"
    if [[ -e "$STATE/bundle" ]]; then mv "$STATE/bundle" "$STATE/bundle.old"; fi
    mv "$STATE/bundle.new" "$STATE/bundle"
    chown -R root:"$SERVICE_USER" "$STATE/bundle"
    chmod -R u=rwX,g=rX,o= "$STATE/bundle"
fi

say "settings $ETC/leukoedge.env"
ENV_FILE="$ETC/leukoedge.env"
TOKEN=""
if [[ -f "$ENV_FILE" ]]; then
    TOKEN="$(sed -n 's/^LEUKOEDGE_TOKEN=//p' "$ENV_FILE")"
fi
if [[ -z "$TOKEN" ]]; then
    TOKEN="$("$PREFIX/venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))')"
fi
umask 027
cat > "$ENV_FILE" <<ENV
# leukoedge service settings (read by leukoedge.service). Restart after editing:
#   sudo systemctl restart leukoedge
LEUKOEDGE_BUNDLE=$STATE/bundle
LEUKOEDGE_CAMERA=$CAMERA
LEUKOEDGE_HOST=$HOST
LEUKOEDGE_PORT=$PORT
# Every request needs this token (browser: log in once; API: Authorization: Bearer <token>).
LEUKOEDGE_TOKEN=$TOKEN
ENV
chown root:"$SERVICE_USER" "$ENV_FILE"
chmod 0640 "$ENV_FILE"

say "systemd unit"
install -m 0644 "$REPO_DIR/deploy/leukoedge.service" /etc/systemd/system/leukoedge.service
systemctl daemon-reload
systemctl enable leukoedge.service >/dev/null
if [[ -e "$STATE/bundle/bundle.json" ]]; then
    systemctl restart leukoedge.service
    say "started: http://$(hostname -I | awk '{print $1}'):$PORT/  (token: sudo grep TOKEN $ENV_FILE)"
else
    say "installed; copy a bundle (see deploy/README.md) and run: sudo systemctl restart leukoedge"
fi
