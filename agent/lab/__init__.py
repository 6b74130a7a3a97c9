"""A lab of Kubernetes-like pods on one machine, for the demo, the kernel tests and people.

`pods` builds it (network namespaces, veths, a bridge, kubelet-style cgroups, one echo server per
pod); `echo` and `client` are the programs that run inside the pods; `cli` is `meshlet lab`;
`demo` is `meshlet demo`. Importing this package imports nothing heavy: `client` and `echo` run
inside pods with the standard library only.
"""
