"""RBAC for the stand-in API server: authorize each request as Kubernetes' RBAC authorizer does.

Role: turn a request (method, path, query) into Kubernetes' request attributes (verb, API group,
resource and subresource, namespace, name) and decide it against the rules that
daemonset/rbac.yaml binds to one ServiceAccount: the ClusterRoles of its ClusterRoleBindings
(every namespace) and the Roles of its RoleBindings (their own namespace only). Discovery paths
(/api, /apis and below, without a resource) are non-resource URLs every authenticated user may GET
(the built-in system:discovery role). Pure: reads the manifest text it is given, does no I/O.

Tests use `Policy.from_manifest(...)` with `StandInApiServer(rbac=..., tokens=...)`, and
`policy.without(...)` to take one grant away.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import yaml

#: HTTP method -> RBAC verb, for a request that names an object (GET on a collection is list/watch).
OBJECT_VERBS = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


@dataclass(frozen=True)
class Attributes:
    """What RBAC decides on: a resource request (non-resource URLs have `resource` None)."""

    verb: str
    group: str = ""
    resource: str | None = None  #: plural, with "/subresource" when one is named
    namespace: str = ""  #: "" for cluster-scoped requests and requests across all namespaces
    name: str = ""
    path: str = ""

    def forbidden_message(self, user: str) -> str:
        """The message the real API server writes in a 403 Status."""
        if self.resource is None:
            return f'forbidden: User "{user}" cannot {self.verb} path "{self.path}"'
        plural, _, sub = self.resource.partition("/")
        qualified = f"{plural}.{self.group}" if self.group else plural
        what = f'{qualified} "{self.name}"' if self.name else qualified
        where = f' in the namespace "{self.namespace}"' if self.namespace else " at the cluster scope"
        return (f'{what} is forbidden: User "{user}" cannot {self.verb} resource "{self.resource}" '
                f'in API group "{self.group}"{where}')


def request_attributes(method: str, path: str, query: dict) -> Attributes:
    """Kubernetes' request info for a path such as /apis/G/V/namespaces/NS/PLURAL/NAME/SUB."""
    segments = [s for s in path.split("/") if s]
    if segments[:1] == ["api"] and len(segments) >= 2:
        group, rest = "", segments[2:]
    elif segments[:1] == ["apis"] and len(segments) >= 3:
        group, rest = segments[1], segments[3:]
    else:
        rest = []
    if not rest:
        return Attributes(verb=method.lower(), path=path)
    namespace = ""
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    elif rest[0] == "namespaces" and len(rest) == 2:
        return Attributes(OBJECT_VERBS.get(method, method.lower()), "", "namespaces", "", rest[1], path)
    plural, name = rest[0], rest[1] if len(rest) >= 2 else ""
    resource = f"{plural}/{rest[2]}" if len(rest) >= 3 else plural
    if name:
        verb = OBJECT_VERBS.get(method, method.lower())
    elif method == "GET":
        verb = "watch" if query.get("watch") in ("true", "1") else "list"
    elif method == "POST":
        verb = "create"
    elif method == "DELETE":
        verb = "deletecollection"
    else:
        verb = method.lower()
    return Attributes(verb, group, resource, namespace, name, path)


@dataclass(frozen=True)
class Rule:
    groups: frozenset[str]
    resources: frozenset[str]
    verbs: frozenset[str]
    names: frozenset[str] = frozenset()  #: resourceNames; empty means any

    def allows(self, a: Attributes) -> bool:
        return ((a.verb in self.verbs or "*" in self.verbs)
                and (a.group in self.groups or "*" in self.groups)
                and (a.resource in self.resources or "*" in self.resources)
                and (not self.names or a.name in self.names))


@dataclass(frozen=True)
class Policy:
    """The grants of one ServiceAccount: cluster-wide rules, and rules per namespace."""

    user: str
    cluster_rules: tuple[Rule, ...]
    namespace_rules: tuple[tuple[str, Rule], ...]

    @classmethod
    def from_manifest(cls, text: str, namespace: str, name: str) -> "Policy":
        docs = [d for d in yaml.safe_load_all(text) if d]
        user = f"system:serviceaccount:{namespace}:{name}"

        def binds_us(binding: dict) -> bool:
            return any(s.get("kind") == "ServiceAccount" and s.get("name") == name
                       and s.get("namespace", binding["metadata"].get("namespace")) == namespace
                       for s in binding.get("subjects") or [])

        def rules_of(kind: str, role_name: str, role_namespace: str | None) -> list[Rule]:
            role = next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == role_name
                         and d["metadata"].get("namespace") == role_namespace), None)
            if role is None:
                return []  # a binding to a missing role grants nothing, as in a cluster
            return [Rule(frozenset(r.get("apiGroups") or ()), frozenset(r.get("resources") or ()),
                         frozenset(r.get("verbs") or ()), frozenset(r.get("resourceNames") or ()))
                    for r in role.get("rules") or []]

        cluster: list[Rule] = []
        scoped: list[tuple[str, Rule]] = []
        for doc in docs:
            if doc["kind"] == "ClusterRoleBinding" and binds_us(doc):
                cluster += rules_of("ClusterRole", doc["roleRef"]["name"], None)
            elif doc["kind"] == "RoleBinding" and binds_us(doc):
                where = doc["metadata"]["namespace"]
                ref = doc["roleRef"]
                role_namespace = None if ref["kind"] == "ClusterRole" else where
                scoped += [(where, rule) for rule in rules_of(ref["kind"], ref["name"], role_namespace)]
        return cls(user, tuple(cluster), tuple(scoped))

    def allows(self, a: Attributes) -> bool:
        if a.resource is None:
            return a.verb == "get"  # discovery (system:discovery), for every authenticated user
        if any(rule.allows(a) for rule in self.cluster_rules):
            return True
        return bool(a.namespace) and any(ns == a.namespace and rule.allows(a) for ns, rule in self.namespace_rules)

    def without(self, group: str, resource: str, verb: str) -> "Policy":
        """This policy with one verb on one resource taken away from every rule that grants it."""

        def cut(rule: Rule) -> list[Rule]:
            if group in rule.groups and resource in rule.resources and verb in rule.verbs:
                rest = [replace(rule, resources=rule.resources - {resource})] if len(rule.resources) > 1 else []
                return rest + [replace(rule, resources=frozenset({resource}), verbs=rule.verbs - {verb})]
            return [rule]

        return replace(self, cluster_rules=tuple(c for r in self.cluster_rules for c in cut(r)),
                       namespace_rules=tuple((ns, c) for ns, r in self.namespace_rules for c in cut(r)))
