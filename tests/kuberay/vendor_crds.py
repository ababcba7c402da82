"""Writes crd_schemas.json.gz: the ray.io/v1 JSON schemas of KubeRay's RayCluster, RayJob
and RayService CRDs (ray-project/kuberay at feeaf72f, helm-chart/kuberay-operator/crds/,
Apache-2.0), so the manifest tests run without the CRD files.

    .venv/bin/python tests/kuberay/vendor_crds.py CRD_FOLDER

CRD_FOLDER holds the CRD YAML files of that chart folder (a checkout of kuberay).
"""

import gzip
import json
import sys
from pathlib import Path

import yaml


def main(crd_dir: str) -> None:
    schemas = {}
    for path in sorted(Path(crd_dir).glob("ray.io_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        kind = crd["spec"]["names"]["kind"]
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas[kind] = v1["schema"]["openAPIV3Schema"]
    out = Path(__file__).with_name("crd_schemas.json.gz")
    with gzip.open(out, "wt") as f:
        json.dump(schemas, f, sort_keys=True)
    print(out, sorted(schemas))


if __name__ == "__main__":
    main(sys.argv[1])
