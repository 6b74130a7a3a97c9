"""A DaemonSet's container as `podman run` flags: what the kubelet would do with the manifest.

Role: map one container of a DaemonSet manifest onto podman's flags (securityContext, capabilities,
read-only root, seccomp, memory limit, volumes with their propagation, env from values and the
downward API, $(VAR) expansion in command and args), so tests run the image exactly as the
manifest specifies. Node paths can be replaced (hostPath path -> a stand-in). Anything the mapping
does not know fails loudly instead of being dropped. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

#: Kubernetes mountPropagation -> podman's bind propagation.
PROPAGATION = {None: "rprivate", "None": "rprivate", "HostToContainer": "rslave", "Bidirectional": "rshared"}
#: Fields of a securityContext the mapping understands; any other fails the mapping.
KNOWN_SECURITY = {"privileged", "runAsUser", "runAsNonRoot", "readOnlyRootFilesystem", "capabilities",
                  "seccompProfile", "allowPrivilegeEscalation"}


def daemonset(path: Path) -> dict:
    return next(d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "DaemonSet")


def container(ds: dict, name: str) -> dict:
    pod = ds["spec"]["template"]["spec"]
    return next(c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == name)


def quantity_bytes(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", str(text)).groups()
    return int(number) * units[unit] if unit else int(number)


def podman_run_args(ds: dict, ctr: dict, image: str, host_paths: dict[str, str], downward: dict[str, str],
                    kubelet_env: dict[str, str], kubelet_mounts: list[str]) -> list[str]:
    """`podman run` flags for one container of the DaemonSet, as the kubelet would run it.

    host_paths: hostPath path on the node -> the path that stands in for it here (paths not named
    are used as they are); downward: fieldPath -> value for env valueFrom.fieldRef."""
    pod = ds["spec"]["template"]["spec"]
    sc = ctr.get("securityContext") or {}
    unknown = set(sc) - KNOWN_SECURITY
    assert not unknown, f"container {ctr['name']}: securityContext {sorted(unknown)} has no podman mapping here"
    args = []
    if pod.get("hostNetwork"):
        args.append("--network=host")
    if pod.get("hostPID"):
        args.append("--pid=host")
    if pod.get("hostIPC"):
        args.append("--ipc=host")
    if sc.get("privileged"):
        args.append("--privileged")
    if "runAsUser" in sc:
        args += ["--user", str(sc["runAsUser"])]
    if sc.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]  # no tmpfs the manifest did not ask for
    caps = sc.get("capabilities") or {}
    args += ["--cap-drop=all" if cap == "ALL" else f"--cap-drop=CAP_{cap}" for cap in caps.get("drop", [])]
    args += [f"--cap-add=CAP_{cap}" for cap in caps.get("add", [])]
    # The kubelet runs containers Unconfined unless the pod or container names a seccomp profile.
    seccomp = (sc.get("seccompProfile") or (pod.get("securityContext") or {}).get("seccompProfile") or {})
    if seccomp.get("type", "Unconfined") == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    limit = ((ctr.get("resources") or {}).get("limits") or {}).get("memory")
    if limit:
        args += ["--memory", str(quantity_bytes(limit))]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in ctr.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "hostPath" in volume:
            source = host_paths.get(volume["hostPath"]["path"], volume["hostPath"]["path"])
            options = ["ro" if mount.get("readOnly") else "rw", PROPAGATION[mount.get("mountPropagation")]]
            args += ["--volume", f"{source}:{mount['mountPath']}:{','.join(options)}"]
        elif "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit")
            args += ["--tmpfs", f"{mount['mountPath']}:rw" + (f",size={quantity_bytes(size)}" if size else "")]
        else:
            raise AssertionError(f"volume {mount['name']}: no podman mapping for {sorted(volume)}")
    env = dict(kubelet_env)
    for var in ctr.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            field_path = var["valueFrom"]["fieldRef"]["fieldPath"]
            assert field_path in downward, f"env {var['name']}: no value for the downward API's {field_path}"
            env[var["name"]] = downward[field_path]
    for key, value in env.items():
        args += ["--env", f"{key}={value}"]
    for mount in kubelet_mounts:
        args += ["--volume", mount]

    def expand(text: str) -> str:  # Kubernetes' $(VAR) expansion in command and args
        return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)

    if "command" in ctr:
        args += ["--entrypoint", json.dumps([expand(a) for a in ctr["command"]])]
    return args + [image] + [expand(a) for a in ctr.get("args", [])]
