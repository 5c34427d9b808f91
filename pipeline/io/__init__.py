"""Storage access (fsspec) and image decoding: the only place that touches files and object stores."""
