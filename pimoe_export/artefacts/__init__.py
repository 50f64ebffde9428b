"""What build and runtime share about artefacts: units and their manifests (containment, hashes, verification),
where the compiled libraries are and whether they are ours, loading TensorRT with our plugins, and this machine's
GPU. Torch-free; TensorRT is imported only when a function needs it.
"""

from pimoe_export.artefacts.manifest import Artifact, Manifest, Unit, read_manifest, verify

__all__ = ["Artifact", "Manifest", "Unit", "read_manifest", "verify"]
