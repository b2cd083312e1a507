"""Stage 3: the container runtime (the OCI runtime in stages.runtime.oci; images and the engine beside it)."""
