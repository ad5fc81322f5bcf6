//! Byte sizes ("512KiB", 1024) and durations ("250ms", "5s", "2m") as written in the config file.
