"""Images of the digits builds, built daemonless and checked with real tools: pushed to Debian's
docker-registry on 127.0.0.1, inspected with skopeo, unpacked with umoci (the artifact inside must be
byte-identical to the store's), rebuilt to the same digest; and every failure a user can meet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import ARM, HOST, X86_V4
from oci_helpers import (
    free_port,
    htpasswd_line,
    make_base_layout,
    registry,
    require_tools,
    skopeo_copy,
    skopeo_inspect,
    token_registry,
    umoci_unpack,
)
from typer.testing import CliRunner

from mlopt.cli import app
from mlopt.package.image import read_record
from mlopt.package.oci import Layout
from mlopt.compiler.publish import publish
from mlopt.manifest import read_manifest
from mlopt.package.publish import PushOptions, push_one
from mlopt.core.refs import parse_ref
from mlopt.recipes import load_recipe
from mlopt.store import Store

runner = CliRunner()
X86 = f"v1-{HOST}"
ALL_SKUS = set(dict.fromkeys([HOST, X86_V4, ARM]))  # the digits recipe: [host, cpu-x86-64-v4, aarch64]


@pytest.fixture(autouse=True)
def _no_user_docker_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests never read the user's ~/.docker/config.json."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))


@pytest.fixture(scope="module")
def tools() -> None:
    require_tools()


@pytest.fixture(scope="module")
def manifest(digits_build: dict) -> Path:
    assert digits_build["result"].exit_code == 0, digits_build["result"].output
    return digits_build["out"] / "manifest.json"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic two-platform base image (amd64 and arm64) in an OCI layout."""
    return make_base_layout(tmp_path_factory.mktemp("base") / "layout", arches=("amd64", "arm64"))


@pytest.fixture(scope="module")
def reg(tools: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    with registry(tmp_path_factory.mktemp("registry")) as host:
        yield host


def build(manifest: Path, out: Path, base: str, *extra: str) -> "object":
    return runner.invoke(app, ["image", "build", str(manifest), "--out", str(out), "--base-image", base, *extra])


@pytest.fixture(scope="module")
def images(manifest: Path, base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("images")
    res = build(manifest, out, f"oci:{base}:base")
    assert res.exit_code == 0, res.output
    return out


def test_every_sku_gets_an_image_with_labels_and_entry_point(images: Path, digits_build: dict) -> None:
    recorded = {i.sku: i for i in read_record(images)}
    assert set(recorded) == ALL_SKUS
    layout = Layout(images / "oci")
    assert set(layout.tags()) == {f"v1-{s}" for s in ALL_SKUS}
    manifest = layout.read_json(layout.resolve(X86).digest)
    config = layout.read_json(manifest["config"]["digest"])
    assert config["architecture"] == "amd64"
    assert layout.read_json(layout.resolve("v1-cpu-aarch64-neoverse-v1").digest)["layers"][0] != manifest["layers"][0]
    labels = config["config"]["Labels"]
    art = Store(digits_build["store"]).get(recorded[HOST].artifact)
    assert labels["dev.mlopt.artifact.digest"] == art.meta["content_digest"]
    assert labels["dev.mlopt.sku"] == HOST and labels["dev.mlopt.model.version"] == "1"
    assert all(labels[f"dev.mlopt.built-with.{k}"] == v for k, v in art.meta["toolchain"].items() if v != "absent")
    assert not any(k.startswith("dev.mlopt.requires.runtime.") for k in labels)  # a CPU SKU needs no GPU runtime
    assert "absent" not in labels.values()
    assert labels["org.opencontainers.image.base.digest"] == recorded[HOST].base_digest
    assert labels["base.label"] == "kept" and manifest["annotations"]["dev.mlopt.backend"] == art.meta["backend"]
    assert config["config"]["Entrypoint"] == ["python3", "/opt/mlopt/entry.py"]
    assert config["config"]["User"] == "65532:65532"  # not root
    assert "BASE=1" in config["config"]["Env"] and len(config["rootfs"]["diff_ids"]) == 3
    dockerfile = (images / "context" / X86 / "Dockerfile").read_text()
    assert "FROM ${BASE_IMAGE}" in dockerfile and "COPY model/ /opt/mlopt/model/" in dockerfile


def test_same_inputs_give_the_same_digest(manifest: Path, base: Path, images: Path, tmp_path: Path) -> None:
    res = build(manifest, tmp_path, f"oci:{base}:base")
    assert res.exit_code == 0, res.output
    again = {i.tag: i.digest for i in read_record(tmp_path)}
    assert again == {i.tag: i.digest for i in read_record(images)}
    assert sorted(p.name for p in (tmp_path / "oci" / "blobs" / "sha256").iterdir()) == \
        sorted(p.name for p in (images / "oci" / "blobs" / "sha256").iterdir())


def test_uncompressed_layers(tools: None, manifest: Path, base: Path, tmp_path: Path) -> None:
    res = build(manifest, tmp_path, f"oci:{base}:base", "--no-compress", "--sku", HOST)
    assert res.exit_code == 0, res.output
    layout = Layout(tmp_path / "oci")
    assert layout.verify() == []
    manifest_doc = layout.read_json(layout.resolve(X86).digest)
    config = layout.read_json(manifest_doc["config"]["digest"])
    ours = manifest_doc["layers"][1:]
    assert {d["mediaType"] for d in ours} == {"application/vnd.oci.image.layer.v1.tar"}
    assert [d["digest"] for d in ours] == config["rootfs"]["diff_ids"][1:]  # a plain tar's digest is its diff_id
    rootfs = umoci_unpack(tmp_path / "oci", X86, tmp_path / "bundle")
    assert (rootfs / "opt/mlopt/model/artifact.json").is_file()


def test_push_inspect_and_unpack(images: Path, manifest: Path, reg: str, digits_build: dict, tmp_path: Path) -> None:
    res = runner.invoke(app, ["image", "push", str(manifest), "--out", str(images), "--registry", f"{reg}/mlopt/digits"])
    assert res.exit_code == 0, res.output
    built = {i.sku: i for i in read_record(images)}[HOST]
    assert built.pushed == [f"{reg}/mlopt/digits:{X86}@{built.digest}"]
    info = skopeo_inspect(f"{reg}/mlopt/digits:{X86}")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["Digest"] == built.digest and data["Architecture"] == "amd64"
    assert data["Labels"]["dev.mlopt.model"] == "digits-cnn" and data["Labels"]["dev.mlopt.artifact.key"] == built.artifact
    skopeo_copy(f"docker://{reg}/mlopt/digits:{X86}", f"oci:{tmp_path / 'pulled'}:{X86}")
    rootfs = umoci_unpack(tmp_path / "pulled", X86, tmp_path / "bundle")
    art = Store(digits_build["store"]).get(built.artifact)
    for rel in art.meta["files"]:
        assert (rootfs / "opt/mlopt/model" / rel).read_bytes() == (art.path / rel).read_bytes(), rel
    assert (rootfs / "etc/base-release").read_text() == "synthetic base amd64\n"
    serve = json.loads((rootfs / "opt/mlopt/serving/serve.json").read_text())
    assert serve["model"] == "digits-cnn" and serve["backend"] == art.meta["backend"]
    from mlopt.package import entry
    from mlopt.package.triton import validate

    validate((rootfs / "opt/mlopt/serving/triton/digits-cnn/config.pbtxt").read_text())
    for f in (rootfs / "opt/mlopt/serving/triton/digits-cnn/1").iterdir():  # hard links to model/'s files
        assert f.is_file() and not f.is_symlink()
        assert f.stat().st_ino == (rootfs / "opt/mlopt/model" / f.name).stat().st_ino  # stored once
    # the image's own entry point and serving config run the unpacked artifact
    assert entry.main(["--serving", str(rootfs / "opt/mlopt/serving/serve.json"),
                       "--model-dir", str(rootfs / "opt/mlopt/model"), "--check"]) == 0


def test_chunked_upload_and_skopeo_pusher_give_the_same_digest(images: Path, reg: str) -> None:
    layout = Layout(images / "oci")
    want = layout.resolve(X86).digest
    dest = parse_ref(f"{reg}/mlopt/chunked:{X86}")
    assert push_one(layout, X86, dest, PushOptions(str(dest), chunk_bytes=64 << 10)) == want
    dest = parse_ref(f"{reg}/mlopt/via-skopeo:{X86}")
    assert push_one(layout, X86, dest, PushOptions(str(dest), via="skopeo")) == want
    assert json.loads(skopeo_inspect(str(dest)).stdout)["Digest"] == want


def test_base_image_from_the_registry(manifest: Path, base: Path, reg: str, tmp_path: Path) -> None:
    skopeo_copy(f"oci:{base}:base", f"docker://{reg}/base/synthetic:1")  # the amd64 image of the index
    res = build(manifest, tmp_path, f"{reg}/base/synthetic:1", "--sku", HOST)
    assert res.exit_code == 0, res.output
    [img] = read_record(tmp_path)
    assert img.base == f"{reg}/base/synthetic:1"
    assert img.base_digest == json.loads(skopeo_inspect(f"{reg}/base/synthetic:1").stdout)["Digest"]
    dockerfile = (tmp_path / "context" / X86 / "Dockerfile").read_text()
    assert f"ARG BASE_IMAGE={reg}/base/synthetic@{img.base_digest}" in dockerfile


def test_corrupt_layer_blob_is_refused(images: Path, manifest: Path, reg: str, tmp_path: Path) -> None:
    copy = tmp_path / "images"
    shutil.copytree(images, copy, symlinks=True)
    layout = Layout(copy / "oci")
    layer = layout.read_json(layout.resolve(X86).digest)["layers"][-2]  # the artifact layer
    blob = layout.blob_path(layer["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    res = runner.invoke(app, ["image", "verify", str(manifest), "--out", str(copy)])
    assert res.exit_code == 2 and "damaged" in res.output
    res = runner.invoke(app, ["image", "push", str(manifest), "--out", str(copy), "--registry", f"{reg}/mlopt/corrupt",
                              "--sku", HOST])
    assert res.exit_code == 2 and "damaged" in res.output and "nothing was tagged" in res.output
    assert skopeo_inspect(f"{reg}/mlopt/corrupt:{X86}").returncode != 0  # no tag left behind


def test_unreachable_registry(images: Path, manifest: Path) -> None:
    host = f"127.0.0.1:{free_port()}"
    res = runner.invoke(app, ["image", "push", str(manifest), "--out", str(images), "--registry", f"{host}/mlopt/x"])
    assert res.exit_code == 5
    assert f"registry {host} is unreachable" in res.output


def test_missing_base_image(manifest: Path, reg: str, tmp_path: Path) -> None:
    res = build(manifest, tmp_path / "a", f"{reg}/no/such-base:1")
    assert res.exit_code == 5 and f"{reg}/no/such-base:1 not found" in res.output
    res = build(manifest, tmp_path / "b", f"oci:{tmp_path / 'nowhere'}:base")
    assert res.exit_code == 5 and "does not exist" in res.output
    for out in (tmp_path / "a", tmp_path / "b"):  # nothing tagged, nothing recorded
        assert not read_record(out) and (not (out / "oci").exists() or not Layout(out / "oci").tags())


def test_invalid_tag_and_repository(images: Path, manifest: Path, base: Path, reg: str, tmp_path: Path) -> None:
    res = build(manifest, tmp_path, f"oci:{base}:base", "--tag", "bad tag {sku}")
    assert res.exit_code == 2 and "tag 'bad tag {sku}' does not make a valid image tag" in res.output
    assert not (tmp_path / "oci").exists()
    res = runner.invoke(app, ["image", "push", str(manifest), "--out", str(images), "--registry", f"{reg}/Mlopt/UPPER"])
    assert res.exit_code == 2 and "repository 'Mlopt/UPPER'" in res.output


def test_credentials_from_docker_config(tools: None, images: Path, manifest: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    line = htpasswd_line("ci", "s3cret")
    if line is None:
        pytest.skip("no bcrypt: Python's crypt, the bcrypt module or htpasswd (apt-get install apache2-utils)")
    with registry(tmp_path, htpasswd=line) as host:
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
        args = ["image", "push", str(manifest), "--out", str(images), "--registry", f"{host}/mlopt/private",
                "--sku", HOST]
        res = runner.invoke(app, args)
        assert res.exit_code == 5 and f"registry {host} requires credentials" in res.output
        _docker_config(tmp_path / "docker", host, "ci", "wrong")
        res = runner.invoke(app, args)
        assert res.exit_code == 5 and f"registry {host} refused the credentials of user 'ci'" in res.output
        assert skopeo_inspect(f"{host}/mlopt/private:{X86}", creds="ci:s3cret").returncode != 0
        _docker_config(tmp_path / "docker", host, "ci", "s3cret")
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert skopeo_inspect(f"{host}/mlopt/private:{X86}", creds="ci:s3cret").returncode == 0


def test_bearer_token_auth(tools: None, manifest: Path, base: Path, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Token authentication as Docker Hub and NGC use it: the registry sends a Bearer challenge, mlopt
    gets a token for the repository scope from the realm with the Docker config's credentials."""
    with token_registry(tmp_path, "ci", "s3cret") as (host, service):
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
        _docker_config(tmp_path / "docker", host, "ci", "s3cret")
        skopeo_copy(f"oci:{base}:base", f"docker://{host}/base/synthetic:1", dest_creds="ci:s3cret")
        res = build(manifest, tmp_path / "img", f"{host}/base/synthetic:1", "--sku", HOST)
        assert res.exit_code == 0, res.output  # the base pulled with a pull-scope token
        res = runner.invoke(app, ["image", "push", str(manifest), "--out", str(tmp_path / "img"),
                                  "--registry", f"{host}/mlopt/tokened"])
        assert res.exit_code == 0, res.output
        assert any("scope=repository%3Amlopt%2Ftokened%3Apull%2Cpush" in r for r in service.requests)
        assert skopeo_inspect(f"{host}/mlopt/tokened:{X86}", creds="ci:s3cret").returncode == 0
        _docker_config(tmp_path / "docker", host, "ci", "wrong")
        res = runner.invoke(app, ["image", "push", str(manifest), "--out", str(tmp_path / "img"),
                                  "--registry", f"{host}/mlopt/refused"])
        assert res.exit_code == 5 and f"registry {host} refused the credentials of user 'ci'" in res.output


def test_credentials_lookup_follows_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """auths (base64 auth, username/password, URL keys, Docker Hub aliases), credHelpers, credsStore."""
    import base64
    import os

    from mlopt.package.auth import credentials_for

    helper = tmp_path / "bin" / "docker-credential-fake"
    helper.parent.mkdir()
    helper.write_text('#!/bin/sh\nread host\n[ "$host" = "helped.example:5000" ] || { echo "credentials not found"; '
                      'exit 1; }\necho \'{"Username": "bot", "Secret": "from-helper"}\'\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}{os.pathsep}{os.environ['PATH']}")
    config = {"auths": {"https://a.example:5000": {"auth": base64.b64encode(b"alice:pw1").decode()},
                        "https://index.docker.io/v1/": {"username": "hub", "password": "pw2"},
                        "helped.example:5000": {}},
              "credHelpers": {"helped.example:5000": "fake"}}
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "d"))
    assert (credentials_for("a.example:5000").username, credentials_for("a.example:5000").secret) == ("alice", "pw1")
    assert credentials_for("docker.io").username == "hub"
    found = credentials_for("helped.example:5000")
    assert (found.username, found.secret) == ("bot", "from-helper") and "docker-credential-fake" in found.source
    assert credentials_for("other.example") is None
    config["credsStore"] = "fake"  # the store is asked first, then auths
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    assert credentials_for("a.example:5000").username == "alice"  # the store said "not found"


def _docker_config(folder: Path, host: str, user: str, password: str) -> None:
    import base64

    folder.mkdir(exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (folder / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))


def test_publish_builds_and_pushes_from_the_recipe(digits_build: dict, manifest: Path, base: Path, reg: str,
                                                   tmp_path: Path) -> None:
    """What `mlopt compile --push` runs after a build: images from the recipe's image: section, pushed."""
    manifest = Path(shutil.copy(manifest, tmp_path / "manifest.json"))  # images go to image/ beside it
    recipe = load_recipe(digits_build["recipe"], {"image": {"base_image": f"oci:{base}:base", "push": True,
                                                            "registry": f"{reg}/mlopt/published"},
                                                  "serving": {"latency_sla_ms": 5}})
    m = read_manifest(manifest)
    images = publish(m, recipe, tmp_path / "image", log=lambda _: None)
    assert {i.sku for i in images} == ALL_SKUS
    for i in images:
        assert json.loads(skopeo_inspect(f"{reg}/mlopt/published:{i.tag}").stdout)["Digest"] == i.digest
    assert [i.tag for i in read_record(tmp_path / "image")] == [i.tag for i in images]
    recorded = {e.sku: e.image for e in m.entries}  # in the manifest given, which the caller then writes
    assert all(recorded[i.sku].digest == i.digest and recorded[i.sku].pushed == i.pushed for i in images)


def test_export_k8s_uses_the_pushed_digest(images: Path, manifest: Path, reg: str, tmp_path: Path) -> None:
    import yaml

    res = runner.invoke(app, ["image", "push", str(manifest), "--out", str(images), "--registry", f"{reg}/mlopt/digits"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", "k8s", str(manifest), "--out", str(tmp_path), "--images", str(images)])
    assert res.exit_code == 0, res.output
    dep = yaml.safe_load((tmp_path / HOST / "deployment.yaml").read_text())
    built = {i.sku: i for i in read_record(images)}[HOST]
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == f"{reg}/mlopt/digits@{built.digest}"
    res = runner.invoke(app, ["export", "kserve", str(manifest), "--out", str(tmp_path), "--images", str(images)])
    assert res.exit_code == 0 and (tmp_path / "cpu-aarch64-neoverse-v1" / "inferenceservice.yaml").is_file()


def test_external_builder_that_is_missing(manifest: Path, base: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # buildah is absent even where it is installed
    res = build(manifest, tmp_path, f"oci:{base}:base", "--builder", "buildah")
    assert res.exit_code == 4 and "image builder 'buildah' is not installed" in res.output


def test_compile_push_builds_and_pushes_each_skus_image(digits_build: dict, base: Path, reg: str,
                                                        tmp_path: Path) -> None:
    from conftest import digits_recipe

    recipe = digits_recipe(tmp_path)
    res = runner.invoke(app, ["compile", str(recipe), "--store", str(digits_build["store"]), "--push",
                              "--registry", f"{reg}/mlopt/compiled", "--base-image", f"oci:{base}:base"])
    assert res.exit_code == 0, res.output
    for tag in (X86, "v1-cpu-aarch64-neoverse-v1"):
        info = skopeo_inspect(f"{reg}/mlopt/compiled:{tag}")
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["Labels"]["dev.mlopt.model"] == "digits-cnn"
    bad = runner.invoke(app, ["compile", str(recipe), "--store", str(digits_build["store"]), "--push"])
    assert bad.exit_code == 2 and "registry" in bad.output  # --push needs a registry: refused before building


def test_compile_push_writes_the_manifest_once(digits_build: dict, base: Path, reg: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest is written once, after the images were built and pushed, with their digests."""
    import mlopt.compiler.pipeline
    import mlopt.package.image
    from conftest import digits_recipe

    written = []
    for module in (mlopt.compiler.pipeline, mlopt.package.image):
        real = module.write_manifest
        monkeypatch.setattr(module, "write_manifest", lambda m, path, real=real: (written.append(path), real(m, path)))
    recipe = digits_recipe(tmp_path)
    res = runner.invoke(app, ["compile", str(recipe), "--store", str(digits_build["store"]), "--push",
                              "--registry", f"{reg}/mlopt/once", "--base-image", f"oci:{base}:base"])
    assert res.exit_code == 0, res.output
    assert written == [tmp_path / "out" / "manifest.json"]
    entries = json.loads(written[0].read_text())["entries"]
    assert all(e["image"]["pushed"] == [f"{reg}/mlopt/once:{e['image']['tag']}@{e['image']['digest']}"] for e in entries)


def test_compile_push_that_fails_keeps_the_build_and_its_manifest(digits_build: dict, base: Path,
                                                                 tmp_path: Path) -> None:
    """The manifest is written once, after the push; a push that fails still writes it, with the images
    built (not pushed), and the build is reported before the registry's error."""
    from conftest import digits_recipe

    host = f"127.0.0.1:{free_port()}"
    recipe = digits_recipe(tmp_path)
    res = runner.invoke(app, ["compile", str(recipe), "--store", str(digits_build["store"]), "--push",
                              "--registry", f"{host}/mlopt/x", "--base-image", f"oci:{base}:base"])
    assert res.exit_code == 5 and f"registry {host} is unreachable" in res.output
    assert res.output.index("manifest: ") < res.output.index("error: registry")
    entries = json.loads((tmp_path / "out" / "manifest.json").read_text())["entries"]
    built = {i.sku: i.digest for i in read_record(tmp_path / "out" / "image")}
    assert {e["sku"]: e["image"]["digest"] for e in entries} == built and set(built) == ALL_SKUS
    assert all(e["image"]["pushed"] == [] for e in entries)


def test_manifest_records_each_entrys_image(images: Path, manifest: Path, reg: str) -> None:
    res = runner.invoke(app, ["image", "push", str(manifest), "--out", str(images), "--registry", f"{reg}/mlopt/rec"])
    assert res.exit_code == 0, res.output
    entries = {e["sku"]: e for e in json.loads(manifest.read_text())["entries"]}
    built = {i.sku: i for i in read_record(images)}
    for sku, img in built.items():
        recorded = entries[sku]["image"]
        assert recorded["digest"] == img.digest and recorded["tag"] == img.tag
        assert f"{reg}/mlopt/rec:{img.tag}@{img.digest}" in recorded["pushed"]


def test_rocm_build_image_says_how_to_get_a_rocm_tvm_runtime(base: Path, tmp_path: Path) -> None:
    from mlopt.targets.gpu_toolchain import rocm_missing

    if rocm_missing():
        pytest.skip(rocm_missing())
    from test_gpu_builds import conv_onnx

    res = runner.invoke(app, ["compile", str(conv_onnx(tmp_path / "conv.onnx")), "--input", "x:batchx3x16x16",
                              "--target", "mi300x", "--backend", "tvm", "--backend", "onnxruntime", "--store", str(tmp_path / "store"),
                              "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    res = build(tmp_path / "out" / "manifest.json", tmp_path / "img", f"oci:{base}:base")
    assert res.exit_code == 0, res.output
    dockerfile = (tmp_path / "img" / "context" / "v1-mi300x" / "Dockerfile").read_text()
    assert "-DUSE_ROCM=ON" in dockerfile and "no HIP runtime" in dockerfile
