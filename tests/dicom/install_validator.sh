#!/usr/bin/env bash
# The DICOM validators tests/test_photos_dicom.py runs on what it writes: dciodvfy (Debian's
# dicom3tools: checks an object against its IOD) and dcmdump (dcmtk: parses it).
#
#   bash tests/dicom/install_validator.sh     # installs them (apt) if missing
#
# Exit code 3 and one line on stderr when they cannot be installed here (the tests then skip with
# that line, or fail where MEMA_REQUIRE_ALL=1).  Installing needs root, as on this project's CI.
set -euo pipefail

cant() { echo "DICOM validators unavailable: $*" >&2; exit 3; }

command -v dciodvfy >/dev/null && command -v dcmdump >/dev/null && exit 0
[[ $(id -u) == 0 ]] || cant "dicom3tools/dcmtk are not installed and installing them needs root"
command -v apt-get >/dev/null || cant "dicom3tools/dcmtk are not installed and there is no apt-get"
log=$(mktemp "${TMPDIR:-/tmp}/install-dicom-validators.XXXXXX.log")
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools dcmtk) \
  >"$log" 2>&1 || cant "apt-get install dicom3tools dcmtk failed (see $log)"
command -v dciodvfy >/dev/null && command -v dcmdump >/dev/null || cant "installed, but dciodvfy or dcmdump is not on PATH"
