"""A small multi-layer OCI image, made at test (or benchmark) time without any container tool.

``skopeo copy oci:<root>:v1 docker://...`` pushes it.  Used by
tests/system/test_registry.py and bench/registry.py.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from typing import Any

MIB = 1 << 20


def _blob(root: str, data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(os.path.join(root, "blobs", "sha256", digest[7:]), "wb") as f:
        f.write(data)
    return {"digest": digest, "size": len(data)}


def make_image(root: str, layers: int = 3, layer_size: int = 5 * MIB) -> dict[str, Any]:
    """Write an OCI layout with tag ``v1`` at ``root``.

    Each layer is a gzip'd tar holding one file of random bytes (gzip cannot
    shrink them, so blob sizes are known); the sizes differ by a few bytes,
    so each blob has its own length.  Returns the manifest's digest, its
    blobs and the layers as ``{"digest", "size"}``.
    """
    os.makedirs(os.path.join(root, "blobs", "sha256"))
    layer_blobs, diff_ids = [], []
    for i in range(layers):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(f"layer{i}.bin")
            info.size, info.mtime = layer_size + i, 0
            tar.addfile(info, io.BytesIO(os.urandom(info.size)))
        diff_ids.append("sha256:" + hashlib.sha256(raw.getvalue()).hexdigest())
        layer = _blob(root, gzip.compress(raw.getvalue(), compresslevel=1, mtime=0))
        layer_blobs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer})
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/true"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **_blob(root, config)},
        "layers": layer_blobs,
    }).encode()
    manifest_blob = _blob(root, manifest)
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                   "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest_blob,
                                  "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}, f)
    with open(os.path.join(root, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    config_blob = json.loads(manifest)["config"]
    return {"manifest": manifest_blob["digest"], "layers": layer_blobs,
            "blobs": [*layer_blobs, config_blob]}
