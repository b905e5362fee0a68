"""Packaging builds for serving: OCI images per (model, SKU), registry pushes, serving configs.

    refs      image references (HOST/REPO:TAG, @sha256:..., oci:PATH[:TAG])
    oci       deterministic streamed tar layers and the OCI image layout on disk
    base      base images from a registry or a layout, for one platform
    auth      registry credentials from the Docker config file
    registry  the registry HTTP API v2 client (Basic and Bearer token auth, streamed uploads)
    serving   what the configs of one (model, SKU) are made from; batching from the measurements
    triton    Triton model repositories (config.pbtxt checked with Triton's ModelConfig)
    kube      Kubernetes Deployment/Service and KServe InferenceService, validated offline
    image     building the images; context: the equivalent Dockerfile; builders: buildah/podman/docker
    publish   pushing (HTTP API or skopeo); ``mlopt compile --push`` is ``mlopt.compiler.publish``
    export    ``mlopt export triton|k8s|kserve``
    entry     the in-image server (standard library + numpy + the build's runtime; no mlopt import)

Nothing here is imported by ``mlopt --help``; the CLI commands live in ``mlopt.cli.image``.
"""
