"""Kubernetes names and labels for flotilla's objects.

Model names in a deployment file may hold characters Kubernetes does not allow in names or label values
(``:/@+.`` and capitals); ``dns_label`` maps any name to a DNS-1123 label (lower case letters, digits and
``-``, at most 63 characters, starting and ending with a letter or digit), adding a short hash of the
original when it had to change it, so two different names never map to the same label. The real name is
kept in the ``MODEL_ANNOTATION`` annotation.
"""

from __future__ import annotations

import hashlib
import re

MAX_LABEL = 63
LABEL_PREFIX = "flotilla"            # our label and annotation keys: flotilla/<key> (a valid key prefix)
MODEL_LABEL = f"{LABEL_PREFIX}/model"
ROLE_LABEL = f"{LABEL_PREFIX}/role"
GROUP_LABEL = f"{LABEL_PREFIX}/group"
MODEL_ANNOTATION = f"{LABEL_PREFIX}/model-name"
NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
VERSION_LABEL = "app.kubernetes.io/version"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_INVALID = re.compile(r"[^a-z0-9-]+")


def is_dns_label(name: str) -> bool:
    """True for a valid DNS-1123 label (what Services, and the names here, must be)."""
    return len(name) <= MAX_LABEL and bool(_DNS_LABEL.match(name))


def dns_label(name: str, max_len: int = MAX_LABEL) -> str:
    """``name`` as a DNS-1123 label of at most ``max_len`` characters (see the module docstring)."""
    if is_dns_label(name) and len(name) <= max_len:
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:6]
    base = _INVALID.sub("-", name.lower()).strip("-")
    base = re.sub(r"-{2,}", "-", base)[: max_len - len(digest) - 1].strip("-")
    return f"{base}-{digest}" if base else f"m-{digest}"


def object_name(release: str, *parts: str) -> str:
    """``release-part1-part2`` as a DNS-1123 label (hashed down when too long)."""
    return dns_label("-".join((release, *parts)))


def base_labels(release: str, component: str, version: str) -> dict[str, str]:
    """The recommended app.kubernetes.io labels of every object of one release."""
    return {NAME_LABEL: "flotilla", INSTANCE_LABEL: release, COMPONENT_LABEL: component,
            MANAGED_BY_LABEL: "flotilla-k8s", VERSION_LABEL: version}


def selector_labels(release: str, component: str, model_label: str | None = None,
                    role: str | None = None) -> dict[str, str]:
    """The labels a selector matches: stable across versions (no version label), so an upgrade keeps them."""
    labels = {NAME_LABEL: "flotilla", INSTANCE_LABEL: release, COMPONENT_LABEL: component}
    if model_label is not None:
        labels[MODEL_LABEL] = model_label
    if role is not None:
        labels[ROLE_LABEL] = role
    return labels
