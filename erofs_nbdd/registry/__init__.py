"""What the server needs of an OCI registry (the distribution API): references, manifests,
credentials and trust found the way docker, podman and skopeo find them, and an HTTP client
(httpx, under trio) that reads tags, manifests and byte ranges of blobs, and pushes images.

Nothing here knows NBD; ``storage/oci.py`` turns registry images into exports."""
