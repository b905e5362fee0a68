"""``mlopt image build|push|verify`` and ``mlopt export triton|k8s|kserve``: thin typer commands over
``mlopt.package``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from mlopt.cli.guard import err, guard
from mlopt.cli.guard import out as console  # commands here have an --out parameter
from mlopt.cli.options import Catalog, Skus

image_app = typer.Typer(help="Build OCI images of a manifest's builds (no Docker daemon) and push them.",
                        no_args_is_help=True)
export_app = typer.Typer(help="Serving configs from a manifest's measurements: Triton, Kubernetes, KServe.",
                         no_args_is_help=True)

ManifestArg = typer.Argument(..., help="A manifest.json written by `mlopt compile`.")
StoreOpt = typer.Option(None, "--store", help="Artifact store (default: the one the manifest names).")
RecipeOpt = typer.Option(None, "--recipe", help="Take image: and serving: settings from this recipe (flags win).")
ImageDirOpt = typer.Option(None, "--out", "-o", help="The image folder (default: image/ beside the manifest).")
SlaOpt = typer.Option(None, "--sla-ms", help="Latency SLA (p99, ms) for the batching settings (serving.latency_sla_ms).")


def _log(message: str) -> None:
    console.print(message, highlight=False, markup=False)


def _image_dir(manifest: Path, out: Optional[Path]) -> Path:
    return out if out is not None else manifest.parent / "image"


def _settings(recipe: Optional[Path], image: dict[str, Any], serving: dict[str, Any]) -> tuple[Any, Any, Optional[str]]:
    """(image settings, serving settings, catalog): a recipe's sections with the given flags over them."""
    from pydantic import ValidationError

    from mlopt.core.errors import RecipeError
    from mlopt.recipes import load_recipe
    from mlopt.recipes.schema import ImageSettings, ServingSettings

    image = {k: v for k, v in image.items() if v is not None}
    serving = {k: v for k, v in serving.items() if v is not None}
    if recipe is not None:
        r = load_recipe(recipe, {"image": image, "serving": serving})
        return r.image, r.serving, r.catalog
    try:
        return ImageSettings(**image), ServingSettings(**serving), None
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"]))
        raise RecipeError(f"flags: {where + ': ' if where else ''}{err['msg'].removeprefix('Value error, ')}") from None


@image_app.command("build")
@guard
def image_build(
    manifest: Path = ManifestArg,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: image/ beside the manifest)."),
    base_image: Optional[str] = typer.Option(
        None, "--base-image", help="For every SKU: REGISTRY/REPO:TAG, ...@sha256:..., or oci:PATH[:TAG]."),
    runtime_dir: Optional[Path] = typer.Option(None, "--runtime-dir", help="Python packages to add on PYTHONPATH."),
    tag: Optional[str] = typer.Option(None, "--tag", help="Tag template: {model} {version} {sku} {backend}."),
    builder: Optional[str] = typer.Option(None, "--builder", help="builtin (default), buildah, podman or docker."),
    no_compress: bool = typer.Option(False, "--no-compress", help="Uncompressed tar layers."),
    sla_ms: Optional[float] = SlaOpt,
    skus: Skus = [],
    store: Optional[Path] = StoreOpt,
    catalog: Catalog = None,
    recipe: Optional[Path] = RecipeOpt,
) -> None:
    """Build one OCI image per SKU of a manifest into an OCI layout, plus Dockerfile contexts."""
    from mlopt.package.image import build_images
    from mlopt.package.publish import image_options
    from mlopt.core.refs import absolute_oci
    from mlopt.store import Store

    img, srv, cat = _settings(recipe, {"base_image": absolute_oci(base_image), "tag": tag, "builder": builder,
                                       "runtime_dir": str(runtime_dir.absolute()) if runtime_dir else None,
                                       "compress": False if no_compress else None}, {"latency_sla_ms": sla_ms})
    options = replace(image_options(img, srv, _image_dir(manifest, out)), skus=tuple(skus))
    images = build_images(manifest, Store(store) if store else None, options, _log, str(catalog) if catalog else cat)
    _table(images, options.out)


@image_app.command("push")
@guard
def image_push(
    manifest: Path = ManifestArg,
    registry: str = typer.Option(..., "--registry", help="HOST[:PORT]/REPO; tags are the built ones (v{version}-{sku})."),
    out: Optional[Path] = ImageDirOpt,
    via: str = typer.Option("http", "--via", help="http (the registry API) or skopeo."),
    chunk_mb: int = typer.Option(0, "--chunk-mb", min=0, help="Upload in PATCH chunks of this size (0: one stream)."),
    skus: Skus = [],
) -> None:
    """Push built images; credentials come from the Docker config file (docker login), never flags."""
    from mlopt.package.publish import PushOptions, push_images

    images = push_images(_image_dir(manifest, out), PushOptions(registry, via, chunk_mb << 20), _log, tuple(skus),
                         manifest_path=manifest)
    _table(images, _image_dir(manifest, out))


@image_app.command("verify")
@guard
def image_verify(
    manifest: Path = ManifestArg,
    out: Optional[Path] = ImageDirOpt,
) -> int:
    """Re-hash every blob of the built images (exit 2 when any is missing or damaged)."""
    from mlopt.package.oci import Layout

    layout = Layout(_image_dir(manifest, out) / "oci")
    problems = layout.verify()
    for p in problems:
        err.print(f"[red]damaged:[/] {p}", highlight=False)
    console.print(f"{len(layout.tags())} images, {len(problems)} problems", highlight=False)
    return 2 if problems else 0


def _table(images: list[Any], folder: Path) -> None:
    t = Table(title=f"images in {folder / 'oci'}")
    for col in ("SKU", "backend", "tag", "digest", "base", "pushed"):
        t.add_column(col)
    for i in images:
        t.add_row(i.sku, i.backend, i.tag, i.digest[:19], i.base, "\n".join(i.pushed) or "-")
    console.print(t)


@guard
def _export(kind: str, manifest: Path, out: Path, sla_ms: Optional[float], skus: list[str], store: Optional[Path],
            catalog: Optional[Path], recipe: Optional[Path], **extra: Any) -> None:
    from mlopt.package.export import ExportOptions, export_kubernetes, export_triton
    from mlopt.package.kube import KubeOptions
    from mlopt.package.publish import serving_options

    if "kube" in extra:  # made here, under guard: a bad secret name is a one-line error
        extra["kube"] = KubeOptions(*extra["kube"])

    _, srv, cat = _settings(recipe, {}, {"latency_sla_ms": sla_ms, "replicas": extra.pop("replicas", None)})
    options = ExportOptions(out, serving_options(srv), str(store) if store else None,
                            str(catalog) if catalog else cat, tuple(skus), **extra)
    if kind == "triton":
        export_triton(manifest, options, _log)
    else:
        export_kubernetes(manifest, options, kind, _log)


@export_app.command("triton")
def export_triton_cmd(manifest: Path = ManifestArg, out: Path = typer.Option(..., "--out", "-o"),
                      sla_ms: Optional[float] = SlaOpt, skus: Skus = [], store: Optional[Path] = StoreOpt,
                      catalog: Catalog = None, recipe: Optional[Path] = RecipeOpt) -> None:
    """A Triton model repository per SKU (config.pbtxt from the measured figures, model files)."""
    _export("triton", manifest, out, sla_ms, skus, store, catalog, recipe)


def _kube_command(kind: str, doc: str) -> Any:
    def command(manifest: Path = ManifestArg, out: Path = typer.Option(..., "--out", "-o"),
                images: Optional[Path] = typer.Option(None, "--images", help="Image folder with images.json."),
                registry: Optional[str] = typer.Option(None, "--registry", help="HOST/REPO of built, unpushed images."),
                replicas: Optional[int] = typer.Option(None, "--replicas", min=0),
                k8s_version: Optional[str] = typer.Option(None, "--k8s-version", help="Validate for this Kubernetes."),
                pull_secrets: list[str] = typer.Option(
                    [], "--pull-secret", metavar="NAME", help="imagePullSecrets entry (a Secret's name); repeat for several."),
                engine_cache_claim: Optional[str] = typer.Option(
                    None, "--engine-cache-claim", metavar="CLAIM",
                    help="PersistentVolumeClaim for on-device engine caches (default: an emptyDir per pod)."),
                grace_seconds: int = typer.Option(30, "--grace-seconds", min=1,
                                                  help="terminationGracePeriodSeconds: time to drain on SIGTERM."),
                skus: Skus = [], store: Optional[Path] = StoreOpt, catalog: Catalog = None,
                recipe: Optional[Path] = RecipeOpt) -> None:
        _export(kind, manifest, out, None, skus, store, catalog, recipe, images=images, registry=registry,
                k8s_version=k8s_version, replicas=replicas,
                kube=(tuple(pull_secrets), engine_cache_claim, grace_seconds))
    command.__doc__ = doc
    return command


export_app.command("k8s")(_kube_command(
    "k8s", "A Deployment and Service per SKU: image by digest, GPU limit, node selector, probes, measured memory."))
export_app.command("kserve")(_kube_command(
    "kserve", "A KServe v1beta1 InferenceService per SKU running the image as its predictor."))
