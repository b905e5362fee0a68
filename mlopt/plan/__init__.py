"""``mlopt plan``: which mix of pools (model, build, SKU, market, replicas) serves the traffic at the
least cost and meets every model's p99 SLA, from the manifests' measured batch curves.

Where things live: ``inputs`` (fleet.yaml, traffic.yaml, --what-if), ``curve`` (a measured batch
curve), ``queueing`` (a replica's capacity within the SLA: Allen-Cunneen/Kingman), ``pools`` (the
candidate pools), ``solve`` (the MILP, HiGHS via scipy), ``simulate`` (discrete-event check),
``planner`` (solve, simulate, derate, re-solve; infeasibility), ``assemble`` (the typed ``Plan``),
``result`` (the Plan models), ``k8s`` (what a cluster runs), ``schemas`` (the published JSON
Schemas), ``command`` (``plan_command``, the CLI's one call, and the table).
"""
