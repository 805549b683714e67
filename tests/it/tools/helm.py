"""Real Helm (Helm v4's library through helm-python-sdk) and Kubernetes' JSON schemas
(kubernetes-validate) for the chart tests. Reads one JSON request on stdin, writes one JSON
answer on stdout; the Rust tests (tests/tools/mod.rs) decide what the answers must be.

    render   {"chart", "values", "release", "namespace"}
             -> {"ok": true, "manifests": {template: text}, "objects": [{"template", "object"}]}
             |  {"ok": false, "error": "<Helm's message>"}
    lint     {"chart", "values"} -> {"messages": [{"severity", "path", "error"}], "errors": [...]}
    validate {"version", "objects": [...]} -> {"results": [{"kind", "name", "problem"}]}
             problem: null (valid), "no schema: ..." (a kind Kubernetes does not ship), or the
             schema violation.
    versions {} -> {"helm": "...", "kubernetes_schemas": ["1.25.0", ...]}
"""

import json
import sys

import helm_python as helm
import kubernetes_validate
import kubernetes_validate.utils as kv
import yaml


def render(req):
    try:
        with helm.Chart.load(req["chart"]) as chart:
            manifests = chart.render(
                req.get("values") or {},
                name=req["release"],
                namespace=req["namespace"],
                is_install=True,
            )
    except helm.HelmError as e:
        return {"ok": False, "error": str(e)}
    objects = []
    for template, text in sorted(manifests.items()):
        if not template.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                objects.append({"template": template, "object": doc})
    return {"ok": True, "manifests": manifests, "objects": objects}


def lint(req):
    return helm.lint(req["chart"], req.get("values") or {}, strict=True)


def validate(req):
    results = []
    for obj in req["objects"]:
        problem = None
        try:
            kv.validate(obj, req["version"], strict=True)
        except kv.SchemaNotFoundError as e:
            problem = "no schema: " + e.message
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.absolute_path)
            problem = "%s: %s" % (path or "<root>", e.message)
        except kv.VersionNotSupportedError as e:
            problem = "unsupported version: " + e.message
        results.append(
            {
                "kind": obj.get("kind"),
                "name": (obj.get("metadata") or {}).get("name"),
                "problem": problem,
            }
        )
    return {"results": results}


def versions(_req):
    return {"helm": helm.helm_sdk_version(), "kubernetes_schemas": kv.all_versions()}


def main():
    helm.disable_logging()
    command = sys.argv[1]
    req = json.load(sys.stdin)
    answer = {"render": render, "lint": lint, "validate": validate, "versions": versions}[command](req)
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
