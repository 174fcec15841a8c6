#!/usr/bin/env bash
# System packages from Debian, installed only when missing.
#   scripts/install-system-deps.sh         what the local stack needs: redis-server, mosquitto (MQTT), Java 17+,
#                                          Maven (Kafka's jars)
#   scripts/install-system-deps.sh --test  also what the tests need: stream servers, a headless browser,
#                                          docker-compose and Prometheus
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
# the MQTT broker of the local stack and the MQTT tests (Debian installs it in /usr/sbin)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
if [ "${1:-}" = "--test" ]; then
  # camera producers: ffmpeg serves the HTTP/MJPEG test streams; GStreamer's RTSP server (run by the
  # system python3 with its GObject bindings) serves the RTSP ones
  command -v ffmpeg >/dev/null || missing+=(ffmpeg)
  for package in python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  # the dashboard's browser test: Debian's Chromium and its driver (selenium is pointed at both)
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
  # deployment and monitoring: compose validates docker-compose.yml (no Docker engine needed);
  # Prometheus and promtool check the alert rules and the dashboard's queries
  command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
  command -v prometheus >/dev/null || missing+=(prometheus)
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing ${missing[*]} from Debian"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
