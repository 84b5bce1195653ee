#!/bin/sh
# hostsvc's container entrypoint, run by tini (PID 1).
#   no arguments, or only options   hostsvc run $HOSTSVC_CONFIG --runtime-dir $HOSTSVC_RUNTIME_DIR
#                                   [--watch if HOSTSVC_WATCH is 1/true] [the options]
#   anything else                   hostsvc ARGS... (e.g. `check /etc/hostsvc/hostsvc.yaml`)
set -eu
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
  case "${HOSTSVC_WATCH:-}" in
    1|true|yes) set -- --watch "$@" ;;
  esac
  set -- run "${HOSTSVC_CONFIG:-/etc/hostsvc/hostsvc.yaml}" \
    --runtime-dir "${HOSTSVC_RUNTIME_DIR:-/run/hostsvc}" "$@"
fi
exec hostsvc "$@"
