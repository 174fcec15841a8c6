#!/usr/bin/env bash
# The Docker secrets of docker-compose.yml, as files under ${FALLWATCH_SECRETS_DIR:-./secrets}.
# Existing files are kept. The dashboard token and the webhook key are random; the camera password
# is yours: CAMERA_PASSWORD=... scripts/make-secrets.sh, or typed when asked.
# The folder is private (0700); the files are 0644 because compose mounts them as they are and the
# services run as uid 10001, not as the files' owner.
set -euo pipefail
dir="${FALLWATCH_SECRETS_DIR:-./secrets}"
mkdir -p "$dir"
chmod 700 "$dir"
write() {  # name value
  [ -s "$dir/$1" ] && { echo "$dir/$1 kept"; return; }
  (umask 022 && printf '%s' "$2" > "$dir/$1")
  echo "$dir/$1 written"
}
write dashboard_token "$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
write webhook_secret "$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
if [ ! -s "$dir/camera_password" ]; then
  password="${CAMERA_PASSWORD:-}"
  if [ -z "$password" ] && [ -t 0 ]; then
    read -r -s -p "password of the cameras' user (deploy/fallwatch.yaml urls): " password
    echo
  fi
  [ -n "$password" ] || { echo "error: set CAMERA_PASSWORD (the cameras' password)" >&2; exit 2; }
  write camera_password "$password"
fi
