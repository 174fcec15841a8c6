"""Camera producers: read streams through OpenCV, sample, JPEG-encode, publish to `frames`."""
