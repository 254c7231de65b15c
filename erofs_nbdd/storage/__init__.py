"""Where export bytes come from: the image directory, backends, and the reads that must wait
for the disk (io_uring, threads)."""
