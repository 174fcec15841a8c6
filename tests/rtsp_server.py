"""A real RTSP server for the producer tests: GStreamer's gst-rtsp-server (Debian packages).

Run with the system Python that has the GObject bindings (python3-gi, gir1.2-gst-rtsp-server-1.0,
gstreamer1.0-plugins-good), not the project's virtualenv:

    /usr/bin/python3 tests/rtsp_server.py PORT VIDEO.mp4    # serves rtsp://127.0.0.1:PORT/cam

VIDEO must be H.264 in MP4 (the packages have no encoder); every client gets the file from its
start, paced in real time like a camera. Prints `ready` once it listens.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402  (after require_version, as gi demands)


def main() -> None:
    port, video = sys.argv[1], sys.argv[2]
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f'( filesrc location="{video}" ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )'
    )
    server.get_mount_points().add_factory("/cam", factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on port {port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
