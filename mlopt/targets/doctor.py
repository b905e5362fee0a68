"""``mlopt doctor``: what this machine has, matched to catalog SKUs, with each SKU requirement checked.

``diagnose(catalog, env)`` runs the probes of ``mlopt.targets.detect`` plus the runtime and toolchain
probes of ``mlopt.targets.probes``, groups identical GPUs, matches each group to catalog SKUs (``device.match`` on the
product name or ``device.pci_ids``, and the same ``arch`` where the tool reports one), and checks
every matched SKU's ``requirements``: the driver at least the minimum, each runtime present and at
least its minimum. A failed check carries the fix: the driver to install, or the Kubernetes operator
setting that manages drivers on a cluster (``kubernetes.operator``).

Replay hook, for tests and demos only: with ``MLOPT_DOCTOR_FIXTURE=DIR`` set, ``environment()``
replays the recorded machine in DIR (``machine.yaml``: the commands and their recorded outputs, a
fake filesystem root, the Python packages) instead of probing this one. The format is described in
``tests/fixtures/doctor/README.md``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mlopt.core.errors import BackendUnavailable, BadInput, UnknownName
from mlopt.targets.catalog import SKU, Catalog
from mlopt.targets.detect import (
    GPU,
    Env,
    detect_gpus,
    get_target,
    host,
    host_runs,
    host_sku,
    live_env,
    version_at_least,
)
from mlopt.targets.probes import (  # noqa: F401  (the probes are part of doctor's interface)
    Component,
    cross_compile_needs,
    cuda_runtime,
    rocm_runtime,
    runtimes,
    toolchains,
)

REPLAY_VAR = "MLOPT_DOCTOR_FIXTURE"


# ------------------------------------------------------------------ matching and checks


@dataclass(frozen=True)
class Match:
    """Identical GPUs of this machine and the catalog SKUs they are."""

    gpu: GPU
    indices: tuple[int, ...]
    skus: tuple[str, ...]

    @property
    def label(self) -> str:
        """'8x NVIDIA H100 80GB HBM3' or the name alone for one GPU."""
        return f"{len(self.indices)}x {self.gpu.name}" if len(self.indices) > 1 else self.gpu.name


@dataclass(frozen=True)
class Check:
    """One requirement of one SKU, checked on one group of GPUs."""

    gpu: str
    sku: str
    requirement: str  # "driver" or "<runtime> runtime"
    need: str
    found: str | None
    status: Literal["ok", "fail", "unknown"]
    fix: str = ""

    def problem(self) -> str:
        """One line saying what is wrong."""
        have = f"{self.found} is below the minimum {self.need}" if self.found else f"is absent (needs {self.need})"
        return f"{self.gpu} (SKU {self.sku}): {self.requirement} {have}"


def matching_skus(gpu: GPU, catalog: Catalog) -> list[SKU]:
    """Catalog GPU SKUs this GPU is: same vendor, product name or PCI id matches, same arch where known."""
    def named(s: SKU) -> bool:
        return s.matches_device(gpu.name) or (gpu.pci_id or "").lower() in (p.lower() for p in s.device.pci_ids)
    return [s for s in catalog.skus if s.needs_gpu and s.vendor == gpu.vendor and named(s)
            and (gpu.arch is None or s.arch == gpu.arch)]


def match_gpus(gpus: list[GPU], catalog: Catalog) -> list[Match]:
    """Group identical GPUs (same name, arch, driver, memory, PCI id) and match each group."""
    groups: dict[GPU, list[int]] = {}
    for i, g in enumerate(gpus):
        groups.setdefault(g, []).append(i)
    return [Match(g, tuple(idx), tuple(s.name for s in matching_skus(g, catalog))) for g, idx in groups.items()]


DRIVER_NAMES = {"nvidia": "NVIDIA driver", "amd": "amdgpu driver (amdgpu-dkms, from ROCm's amdgpu-install)",
                "intel": "Intel GPU driver"}
RUNTIME_FIXES = {
    "cuda": "install an NVIDIA driver that supports CUDA {need} ({driver} or newer); the CUDA runtime itself "
            "ships in the base image {image}",
    "rocm": "install ROCm {need} or newer (amdgpu-install --usecase=rocm), or serve from the base image {image}",
    "level_zero": "install the Level Zero loader {need} or newer (Intel's level-zero package), or serve from "
                  "the base image {image}",
    "oneapi": "install the Intel oneAPI runtime {need} or newer, or serve from the base image {image}",
}


def _driver_fix(sku: SKU, need: str) -> str:
    fix = f"install the {DRIVER_NAMES.get(sku.vendor, 'GPU driver')} {need} or newer"
    operator = sku.kubernetes.operator
    return fix + (f"; on Kubernetes the driver is managed by the {operator}: set it to {need} or newer"
                  if operator else "")


def driver_check(m: Match, sku: SKU) -> Check | None:
    """The GPU's driver against the SKU's minimum (None where the SKU sets none)."""
    need = sku.requirements.driver
    if need is None:
        return None
    ok = version_at_least(m.gpu.driver, need)
    status = "unknown" if ok is None else "ok" if ok else "fail"
    fix = "" if ok else _driver_fix(sku, need)
    if ok is None:
        fix = f"could not read the driver version ({m.gpu.source} reported {m.gpu.driver!r}); if it is old: {fix}"
    return Check(m.label, sku.name, "driver", need, m.gpu.driver, status, fix)


def runtime_check(m: Match, sku: SKU, name: str, need: str, found: dict[str, Component]) -> Check:
    """One runtime of the SKU's requirements: present and at least ``need``."""
    comp = found.get(name)
    if comp is None:
        return Check(m.label, sku.name, f"{name} runtime", need, None, "unknown",
                     f"mlopt cannot detect the {name!r} runtime; check its version by hand")
    ok = version_at_least(comp.version, need) if comp.present else False
    status = "unknown" if ok is None else "ok" if ok else "fail"
    template = RUNTIME_FIXES.get(name, "install {name} {need} or newer")
    fix = "" if ok else template.format(name=name, need=need, driver=sku.requirements.driver or "a current driver",
                                        image=sku.base_image or "of the SKU")
    return Check(m.label, sku.name, f"{name} runtime", need, comp.version if comp.present else None, status, fix)


def check_sku(m: Match, sku: SKU, found: dict[str, Component]) -> list[Check]:
    """Every requirement of ``sku`` checked for the GPUs of ``m``."""
    driver = driver_check(m, sku)
    rest = [runtime_check(m, sku, name, need, found) for name, need in sku.requirements.runtimes.items()]
    return ([driver] if driver else []) + rest


# ------------------------------------------------------------------ the report


@dataclass
class Report:
    """Everything ``mlopt doctor`` found and concluded."""

    host: dict[str, Any]
    gpus: list[GPU]
    matches: list[Match]
    checks: list[Check]
    runtimes: list[Component]
    toolchains: list[Component]
    cross_compile: list[dict[str, Any]]
    skus: dict[str, dict[str, Any]]  # every catalog SKU: can its builds run (be validated, measured) here?
    sku: str | None = None
    host_sku: str | None = None  # what the target 'host' resolves to here (None: no catalog CPU SKU runs)
    problems: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    replayed_from: str | None = None

    @property
    def ok(self) -> bool:
        """No failed check and, with --sku, the SKU's device is here."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """One JSON document: host, gpus, matches, checks, runtimes, toolchains and the verdict."""
        return {
            "ok": self.ok, "exit_code": 0 if self.ok else BackendUnavailable.exit_code,
            "problems": self.problems, "fixes": self.fixes, "sku": self.sku, "replayed_from": self.replayed_from,
            "host": self.host,
            "gpus": [{"index": i, **g.as_dict()} for i, g in enumerate(self.gpus)],
            "matches": [{"gpu": m.gpu.name, "count": len(m.indices), "indices": list(m.indices), "arch": m.gpu.arch,
                         "driver": m.gpu.driver, "pci_id": m.gpu.pci_id, "skus": list(m.skus),
                         "in_catalog": bool(m.skus)} for m in self.matches],
            "checks": [asdict(c) for c in self.checks],
            "runtimes": {c.name: asdict(c) for c in self.runtimes},
            "toolchains": {c.name: asdict(c) for c in self.toolchains},
            "cross_compile": self.cross_compile,
            "skus": self.skus,
            "host_sku": self.host_sku,
        }


def _runs_here(sku: SKU, matches: list[Match], checks: list[Check]) -> dict[str, Any]:
    """Can code built for ``sku`` run on this machine: its CPU, or its GPU with every requirement met?"""
    if not sku.needs_gpu:
        runs, why = host_runs(sku)
        return {"runs_here": runs, "reason": f"{why} (cross-compile only)" if why else ""}
    if not any(sku.name in m.skus for m in matches):
        return {"runs_here": False, "reason": f"no {sku.name} GPU here (cross-compile only)"}
    failed = [f"{c.requirement} {c.found or 'absent'} < {c.need}" for c in checks
              if c.sku == sku.name and c.status == "fail"]
    return {"runs_here": not failed, "reason": "; ".join(failed)}


def _sku_problems(wanted: SKU, matches: list[Match]) -> tuple[list[str], list[str]]:
    """Is the one SKU asked for with --sku on this machine?"""
    if not wanted.needs_gpu:
        runs, why = host_runs(wanted)
        return ([], []) if runs else ([f"this machine cannot run {wanted.name} code: {why}"],
                                      [f"run {wanted.name} builds on a {wanted.description or wanted.name} machine"])
    if any(wanted.name in m.skus for m in matches):
        return [], []
    seen = ", ".join(m.label for m in matches) or "no GPU"
    return ([f"no {wanted.name} GPU on this machine (found: {seen})"],
            [(f"run on a machine with a {wanted.description or wanted.name}; this one can still cross-compile "
              f"for it (mlopt compile --target {wanted.name})")])


def diagnose(catalog: Catalog, env: Env | None = None, sku: str | None = None) -> Report:
    """Probe the machine in ``env``, match GPUs to ``catalog`` and check requirements (of ``sku`` alone if given)."""
    env = env or live_env()
    wanted = get_target(catalog, sku) if sku else None
    gpus = detect_gpus(env)
    matches = match_gpus(gpus, catalog)
    found, tools = runtimes(env), toolchains(env)
    by_name = {c.name: c for c in found}
    every = [c for m in matches for name in m.skus for c in check_sku(m, catalog.get(name), by_name)]
    checks = [c for c in every if wanted is None or c.sku == wanted.name]
    failed = [c for c in checks if c.status == "fail"]
    problems, fixes = _sku_problems(wanted, matches) if wanted else ([], [])
    return Report(
        host=host(), gpus=gpus, matches=matches, checks=checks, runtimes=found, toolchains=tools,
        cross_compile=cross_compile_needs(catalog, tools),
        skus={s.name: _runs_here(s, matches, every) for s in catalog.skus},
        sku=wanted.name if wanted else None, host_sku=_host_sku(catalog), problems=problems + [c.problem() for c in failed],
        fixes=list(dict.fromkeys(fixes + [c.fix for c in failed])), replayed_from=getattr(env, "replayed_from", None))


def _host_sku(catalog: Catalog) -> str | None:
    try:
        return host_sku(catalog).name
    except UnknownName:
        return None


def raise_for(report: Report) -> None:
    """Raise ``BackendUnavailable`` (exit 4) naming each failed requirement and its fix."""
    if report.problems:
        raise BackendUnavailable("; ".join(report.problems), hint=" | ".join(report.fixes) or None)


# ------------------------------------------------------------------ replay (tests and demos)


@dataclass(frozen=True)
class ReplayEnv(Env):
    """An ``Env`` that answers from a folder of recorded tool outputs."""

    replayed_from: str = ""


def replay_env(folder: Path) -> ReplayEnv:
    """The machine recorded in ``folder/machine.yaml`` (format: tests/fixtures/doctor/README.md)."""
    spec_file = folder / "machine.yaml"
    if not spec_file.is_file():
        raise BadInput(f"{REPLAY_VAR}={folder}: no machine.yaml there", hint="see tests/fixtures/doctor/README.md")
    spec = yaml.safe_load(spec_file.read_text()) or {}
    outputs = {cmd: (folder / name).read_text() for cmd, name in (spec.get("commands") or {}).items()}
    tools = {cmd.split()[0] for cmd in outputs}
    packages = {k: str(v) for k, v in (spec.get("packages") or {}).items()}
    python = spec.get("python") or {}
    root = folder / spec.get("root", "root")
    site = root / "site-packages"
    return ReplayEnv(
        run=lambda cmd: outputs.get(" ".join(cmd)), which=lambda t: f"/usr/bin/{t}" if t in tools else None,
        root=root, environ={k: str(v) for k, v in (spec.get("environ") or {}).items()}, package=packages.get,
        package_dir=lambda m: site / m if (site / m).is_dir() else None, python=python.get, nvml=lambda: None,
        replayed_from=str(folder))


def environment() -> Env:
    """This machine, or the recorded one in ``$MLOPT_DOCTOR_FIXTURE`` (the test and demo replay hook)."""
    folder = os.environ.get(REPLAY_VAR)
    return replay_env(Path(folder)) if folder else live_env()


# ------------------------------------------------------------------ rendering


STATUS_STYLE = {"ok": "[green]ok[/]", "fail": "[bold red]FAIL[/]", "unknown": "[yellow]unknown[/]"}


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*row)
    return t


def _gpu_rows(report: Report) -> list[list[str]]:
    return [[str(len(m.indices)), m.gpu.vendor, m.gpu.name, m.gpu.arch or "-", m.gpu.driver or "-",
             f"{m.gpu.memory_mib} MiB" if m.gpu.memory_mib else "-", m.gpu.pci_id or "-", m.gpu.source,
             ", ".join(m.skus) or "[yellow]not in the catalog[/]"] for m in report.matches]


def _component_rows(comps: list[Component]) -> list[list[str]]:
    return [[c.name, (c.version or "present") if c.present else "[dim]absent[/]", c.source, c.detail] for c in comps]


def render(report: Report, console: Any) -> None:
    """Print the report as rich tables."""
    h = report.host
    if report.replayed_from:
        console.print(f"[yellow]replayed from {report.replayed_from} ({REPLAY_VAR}); host line is this machine[/]")
    console.print(f"[bold]CPU[/] {h['cpu']} ({h['machine']}, {h['cores']} logical cores, level {h['x86_level']}); "
                  f"features {', '.join(h['features']) or '-'}")
    if report.matches:
        console.print(_table("GPUs", ["n", "vendor", "name", "arch", "driver", "memory", "PCI id", "source",
                                      "catalog SKU"], _gpu_rows(report)))
        for m in (m for m in report.matches if not m.skus):
            console.print(f"[yellow]{m.gpu.name} is not in the catalog[/]: add a SKU for it with --catalog FILE "
                          f"(device.match: a regex of its name; device.pci_ids: [{m.gpu.pci_id or '?'}])")
    else:
        console.print("[bold]no GPU found[/] (NVML, nvidia-smi, amd-smi, rocm-smi, /sys/class/kfd, xpu-smi, "
                      "/sys/class/drm); cross-compiling for GPU SKUs needs:")
        for r in report.cross_compile:
            state = f"[green]present[/] {r['found']}" if r["present"] else f"[red]missing[/]: {r['fix']}"
            console.print(f"  {r['needs']} for {r['target']} ({', '.join(r['skus'])}): {state}")
    if report.checks:
        console.print(_table("requirements", ["GPU", "SKU", "requirement", "needs", "found", "status", "fix"],
                             [[c.gpu, c.sku, c.requirement, f">= {c.need}", c.found or "absent",
                               STATUS_STYLE[c.status], c.fix] for c in report.checks]))
    console.print(_table("runtimes", ["runtime", "version", "source", "detail"], _component_rows(report.runtimes)))
    console.print(_table("toolchains", ["tool", "version", "source", "detail"], _component_rows(report.toolchains)))
    console.print(_table("catalog SKUs on this machine", ["SKU", "run and measure here"],
                         [[n, "yes" if i["runs_here"] else f"no: {i['reason']}"] for n, i in report.skus.items()]))
    console.print(f"target [bold]host[/] is {report.host_sku} on this machine" if report.host_sku else
                  "[yellow]no catalog CPU SKU runs on this machine[/]: add one with --catalog FILE")
    unknown = [c for c in report.checks if c.status == "unknown"]
    if report.ok and (report.checks or report.sku):
        verdict = f"this machine can serve {report.sku}" if report.sku else "all requirement checks pass"
        console.print(f"[green]{verdict}[/]" + (f" ({len(unknown)} could not be checked)" if unknown else ""))
