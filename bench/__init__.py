"""meshlet benchmarks: meshlet against direct connections and kube-proxy's rule layouts (issue 6).

Layout, pure first:
- `naming`, `synth`, `iptables_rules`, `nft_rules`: pure generators (no I/O), unit-tested against
  the concrete checks of BASELINES.md;
- `loadgen.c`: the C client and server (compiled at bench time into bench/out/);
- `topology`: network namespaces, veths, cgroups the bench makes and removes;
- `modes`: one class per datapath mode (direct, meshlet, iptables-*, nftables);
- `datapath_bench`, `controlplane`: the measurement drivers;
- `report`: JSON, plots and the generated bench/RESULTS.md, targets judged met / not met.

Everything the bench touches lives in namespaces and cgroups it made; the root netns is never
changed.
"""
