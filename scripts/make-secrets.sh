#!/usr/bin/env bash
# The Docker secrets of docker-compose.yml, as files under ${FALLWATCH_SECRETS_DIR:-./secrets}.
# Existing files are kept. The dashboard token, the webhook key and the MQTT password are random; the camera password
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
write mqtt_password "$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
# the broker's users (mosquitto's password file): `fallwatch` with the password above, hashed as
# mosquitto_passwd hashes ($7$: PBKDF2-SHA512), so no mosquitto is needed on this host
write mqtt_passwords "fallwatch:$(python3 - "$dir/mqtt_password" <<'PY'
import base64, hashlib, secrets, sys
salt, iterations = secrets.token_bytes(12), 101
digest = hashlib.pbkdf2_hmac("sha512", open(sys.argv[1]).read().encode(), salt, iterations)
print(f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}")
PY
)"
if [ ! -s "$dir/camera_password" ]; then
  password="${CAMERA_PASSWORD:-}"
  if [ -z "$password" ] && [ -t 0 ]; then
    read -r -s -p "password of the cameras' user (deploy/fallwatch.yaml urls): " password
    echo
  fi
  [ -n "$password" ] || { echo "error: set CAMERA_PASSWORD (the cameras' password)" >&2; exit 2; }
  write camera_password "$password"
fi
