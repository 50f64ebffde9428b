"""Units and their manifests: containment, hashes, verification. What build writes and runtime, serve and validate
read. Torch-free.
"""

from pimoe_export.artifacts.manifest import Artifact, Manifest, Unit, read_manifest, verify

__all__ = ["Artifact", "Manifest", "Unit", "read_manifest", "verify"]
