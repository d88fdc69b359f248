"""Read-only model volumes (``--model-volume``): weights that are already somewhere in the cluster,
mounted into a deployment's pods instead of downloaded into the cache emptyDir at start.

``DEPLOYMENT=pvc:CLAIM[:/mount/path]`` mounts a PersistentVolumeClaim (``readOnly`` on the volume
and the mount; with several pods on several nodes the claim must be ``ReadOnlyMany`` or
``ReadWriteMany``); ``DEPLOYMENT=image:REFERENCE[:/mount/path]`` mounts the files of an OCI image
or artifact (a Kubernetes image volume, ``volumes[].image``: alpha in 1.31, beta in 1.33 behind
the ``ImageVolume`` feature gate, on by default from 1.35; always read-only). The mount path
defaults to :data:`DEFAULT_MOUNT`; every pod of the deployment gets it, each rank of a gang too.
``HF_HOME`` and the other cache variables are left as they are: point the app at the path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from shoal.exceptions import CompileError
from shoal.kubernetes import names
from shoal.kubernetes.compiler.common import CACHE_DIR, SHM_DIR, TMP_DIR, CompileOptions, Obj

__all__ = ["DEFAULT_MOUNT", "IMAGE_VOLUME_SINCE", "ModelVolume", "check_model_volume_targets",
           "check_model_volumes", "model_mounts", "model_volumes", "parse_model_volumes", "uses_image_volumes"]

DEFAULT_MOUNT = "/models"
# The first Kubernetes release whose image volumes are beta (behind the ImageVolume gate; on by default from 1.35).
IMAGE_VOLUME_SINCE = (1, 33)
OPTION = "--model-volume"
_PATH = re.compile(r"^(/[A-Za-z0-9._-]+)+$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# An image reference: [host[:port]/]path[:tag][@algorithm:digest], no spaces.
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")
# Where shoal's own volumes are mounted: a model volume may be neither one of them, nor inside or around one.
RESERVED = (names.CONFIG_MOUNT_DIR, names.TLS_MOUNT_DIR, names.API_KEYS_MOUNT_DIR, TMP_DIR, CACHE_DIR, SHM_DIR)


@dataclass(frozen=True)
class ModelVolume:
    deployment: str
    kind: Literal["pvc", "image"]
    source: str  # the claim name or the image reference
    mount: str
    spec: str  # the option's value as given (for messages)


def parse_model_volumes(values: Iterable[str]) -> list[ModelVolume]:
    """Each ``--model-volume`` value, checked; CompileError naming the option and the value."""
    out: list[ModelVolume] = []
    for item in values:
        dep, eq, rest = item.partition("=")
        kind, colon, body = rest.partition(":")
        if not eq or not dep or not colon or kind not in ("pvc", "image") or not body:
            raise CompileError(f"{OPTION} {item!r}: expected DEPLOYMENT=pvc:CLAIM[:/mount/path] or "
                               "DEPLOYMENT=image:REFERENCE[:/mount/path]")
        # A mount path starts with "/"; an image reference never has ":/" (a port or tag follows a colon).
        source, sep, path = body.rpartition(":/")
        mount = "/" + path if sep else DEFAULT_MOUNT
        if not sep:
            source = body
        if kind == "pvc" and (not _DNS1123_SUBDOMAIN.match(source) or len(source) > 253):
            raise CompileError(f"{OPTION} {item!r}: {source!r} is not a PersistentVolumeClaim name")
        if kind == "image" and (not _IMAGE.match(source) or source.endswith((":", "/", "@"))):
            raise CompileError(f"{OPTION} {item!r}: {source!r} is not an image reference like "
                               "registry.example.com/models/llama:v1")
        if not _PATH.match(mount) or any(part in (".", "..") for part in mount.split("/")):
            raise CompileError(f"{OPTION} {item!r}: mount path {mount!r} must be absolute, without '..' or a "
                               "trailing '/'")
        for own in RESERVED:
            if mount == own or mount.startswith(own + "/") or own.startswith(mount + "/"):
                raise CompileError(f"{OPTION} {item!r}: mount path {mount!r} meets shoal's own mount {own!r}; "
                                   "choose another path")
        out.append(ModelVolume(dep, "pvc" if kind == "pvc" else "image", source, mount, item))
    seen: dict[tuple[str, str], str] = {}
    for v in out:
        key = (v.deployment, v.mount)
        if key in seen:
            raise CompileError(f"{OPTION} {v.spec!r} and {seen[key]!r} mount two volumes at {v.mount!r} in "
                               f"deployment {v.deployment!r}; give one of them another path")
        seen[key] = v.spec
    return out


def check_model_volumes(opts: CompileOptions) -> None:
    parse_model_volumes(opts.model_volumes)


def check_model_volume_targets(opts: CompileOptions, deployments: Iterable[str]) -> None:
    """A ``--model-volume`` for a deployment the build does not have is an error naming the known ones."""
    known = sorted(set(deployments))
    for v in parse_model_volumes(opts.model_volumes):
        if v.deployment not in known:
            raise CompileError(f"{OPTION} {v.spec!r}: no deployment named {v.deployment!r} "
                               f"(deployments: {', '.join(known)})")


def _for(opts: CompileOptions, dep: str) -> list[tuple[str, ModelVolume]]:
    """(volume name, volume) of one deployment, in the order given."""
    mine = [v for v in parse_model_volumes(opts.model_volumes) if v.deployment == dep]
    return [("models" if i == 0 else f"models-{i + 1}", v) for i, v in enumerate(mine)]


def model_volumes(opts: CompileOptions, dep: str) -> list[Obj]:
    """The pod's ``volumes`` entries of the deployment's model volumes."""
    out: list[Obj] = []
    for name, v in _for(opts, dep):
        if v.kind == "pvc":
            out.append({"name": name, "persistentVolumeClaim": {"claimName": v.source, "readOnly": True}})
        else:
            out.append({"name": name, "image": {"reference": v.source, "pullPolicy": opts.image_pull_policy}})
    return out


def model_mounts(opts: CompileOptions, dep: str) -> list[Obj]:
    """The replica container's ``volumeMounts`` of them, all read-only."""
    return [{"name": name, "mountPath": v.mount, "readOnly": True} for name, v in _for(opts, dep)]


def uses_image_volumes(opts: CompileOptions) -> bool:
    return any(v.kind == "image" for v in parse_model_volumes(opts.model_volumes))
