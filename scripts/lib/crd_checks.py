"""CRD checks for scripts/validate-chart: the chart's CustomResourceDefinitions against
custom resources. Runs in target/venv-chart (helm-python-sdk, PyYAML, jsonschema).

Usage: crd_checks.py CHART EXAMPLES_DIR INVALID_DIR [--upstream CRD_FILE EXAMPLES_DIR]...

- Helm sees every file of CHART/crds/ as a CRD (it installs them before the templates);
  each is an apiextensions.k8s.io/v1 CustomResourceDefinition whose every served version
  has an openAPIV3Schema.
- Every file of EXAMPLES_DIR (the policies docs/policy.md shows) validates against the
  schema of the CRD that serves its apiVersion and kind.
- Every file of INVALID_DIR fails validation where and how its header says: a `# path:`
  line (the field, e.g. `spec.rules[0].to[0].ports[0]`) and an `# error:` line (part of
  the message at that field); a `# why:` line says why in words. A file that fails for
  another reason, or passes, is a failure.

- With `--upstream CRD_FILE EXAMPLES_DIR` (repeatable): every file of EXAMPLES_DIR
  validates against a CRD Trellis reads but does not ship, e.g. the Gateway API's
  HTTPRoute (docs/examples/routes/ against
  ../shared/crds/gateway-api-v1.6.1/config/crd/standard/...httproutes.yaml).

Validation is the API server's, as far as a JSON Schema validator reaches: the CRD's
schema (types, enums, bounds, lengths, patterns, required fields), plus strict field
validation (kubectl's default, `--validate=strict`): a field the schema does not
declare is an error instead of being pruned. CEL rules (`x-kubernetes-validations`)
cannot be checked here, so a schema of the chart that has any is refused until this
script learns them. An upstream CRD has many (the Gateway API's path rules, for one):
they are left out and counted, and the Rust tests load the same examples through the
control plane's own checks, which cover the ones Trellis relies on.

Exits 1 with every failure listed. A missing or empty directory, a file that does not
parse, a CRD that cannot be loaded and an example no CRD serves are failures too: a run
that validated nothing must not pass.
"""
import copy
import glob
import os
import re
import sys

import jsonschema
import yaml
from helm_python import chart as hc

failures = []


def fail(msg):
    failures.append(msg)
    print(f"  FAIL {msg}")


def ok(msg):
    print(f"  ok   {msg}")


def yaml_files(directory):
    """The sorted .yaml files of `directory`; a failure when there are none."""
    if not os.path.isdir(directory):
        fail(f"{directory}: no such directory")
        return []
    files = sorted(glob.glob(os.path.join(directory, "*.yaml")))
    if not files:
        fail(f"{directory}: no .yaml file")
    return files


def documents(path):
    """The non-empty YAML documents of `path`, or None (a failure) when it does not parse."""
    try:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        fail(f"{path}: {e}")
        return None
    if not docs:
        fail(f"{path}: no YAML document")
        return None
    return docs


def strict(schema, cel=None):
    """`schema` with strict field validation: every object that declares `properties`
    refuses others, unless it says `x-kubernetes-preserve-unknown-fields`. (A CRD itself
    may not say `additionalProperties: false`: the API server prunes, or with strict
    field validation refuses, what is undeclared.) CEL rules are refused, unless `cel` is
    a list: then they are removed and appended to it."""
    out = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if "x-kubernetes-validations" in node:
            if cel is None:
                raise ValueError("x-kubernetes-validations (CEL) cannot be checked by this script")
            cel.extend(node.pop("x-kubernetes-validations"))
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        for child in (node.get("properties") or {}).values():
            walk(child)
        walk(node.get("items"))
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"])

    walk(out)
    return out


def load_crds(chart):
    """{(apiVersion, kind): (crd name, validator)} for every served version of every CRD
    of CHART/crds/, after checking Helm sees exactly those files."""
    crd_dir = os.path.join(chart, "crds")
    print(f"== CRDs in {crd_dir}")
    files = yaml_files(crd_dir)
    try:
        # Helm names them `<chart>/crds/<file>`.
        helm_sees = sorted(c["filename"].split("/", 1)[-1] for c in hc.Chart.load(chart).crds)
    except Exception as e:  # noqa: BLE001 - report any load error
        fail(f"helm cannot load {chart}: {e}")
        helm_sees = []
    want = sorted(os.path.relpath(f, chart) for f in files)
    if helm_sees != want:
        fail(f"Helm's CRDs of {chart} {helm_sees} are not the files of crds/ {want}")
    else:
        ok(f"Helm installs {len(helm_sees)} CRD file(s) from crds/: {', '.join(helm_sees)}")
    served = {}
    for path in files:
        served.update(crd_validators(path))
    if not served:
        fail(f"{crd_dir}: no CRD schema loaded")
    return served


def crd_validators(path, upstream=False):
    """{(apiVersion, kind): (crd name, validator)} for every served version of every CRD
    of the file `path`; CEL rules are refused, or with `upstream` left out and counted."""
    served = {}
    for crd in documents(path) or []:
        name = (crd.get("metadata") or {}).get("name", "?")
        if crd.get("apiVersion") != "apiextensions.k8s.io/v1" or crd.get("kind") != "CustomResourceDefinition":
            fail(f"{path}: {name} is {crd.get('apiVersion')} {crd.get('kind')}, not an apiextensions.k8s.io/v1 CustomResourceDefinition")
            continue
        spec = crd.get("spec") or {}
        group, kind = spec.get("group"), (spec.get("names") or {}).get("kind")
        versions = [v for v in spec.get("versions") or [] if v.get("served")]
        if not (group and kind and versions):
            fail(f"{path}: {name} has no group, kind or served version")
            continue
        for v in versions:
            schema = ((v.get("schema") or {}).get("openAPIV3Schema"))
            if not isinstance(schema, dict):
                fail(f"{path}: {name} {v.get('name')}: no openAPIV3Schema")
                continue
            cel = [] if upstream else None
            try:
                top = strict(schema, cel)
                # What every object has beside the CRD's own fields.
                top.setdefault("properties", {}).update({
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1, "maxLength": 253},
                            "namespace": {"type": "string", "minLength": 1, "maxLength": 63},
                        },
                    },
                })
                top.setdefault("required", []).extend(["apiVersion", "kind", "metadata"])
                jsonschema.Draft4Validator.check_schema(top)
                validator = jsonschema.Draft4Validator(top)
            except (ValueError, jsonschema.SchemaError) as e:
                fail(f"{path}: {name} {v.get('name')}: cannot load the schema: {e}")
                continue
            served[(f"{group}/{v['name']}", kind)] = (name, validator)
            unchecked = f", {len(cel)} CEL rules not checked here" if cel else ""
            ok(f"{name}: {group}/{v['name']} {kind} (schema loaded{unchecked})")
    return served


def field_path(error):
    """`spec.rules[0].to[0].ports[0]` for a jsonschema error's absolute path."""
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def errors(served, obj):
    """[(field path, message)] of `obj` against the CRD serving it."""
    if not isinstance(obj, dict):
        return [("", "not a mapping")]
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in served:
        return [("apiVersion", f"no CRD serves {key[0]} {key[1]}")]
    _, validator = served[key]
    return sorted((field_path(e), e.message) for e in validator.iter_errors(obj))


def examples(served, directory):
    print(f"== {directory}: every object validates")
    for path in yaml_files(directory):
        for obj in documents(path) or []:
            found = errors(served, obj)
            if found:
                fail(f"{path}: " + "; ".join(f"{p}: {m}" for p, m in found))
            else:
                ok(f"{path}: {obj['kind']} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}")


HEADER = re.compile(r"^# (why|path|error): (.*)$")


def header(path):
    """{why, path, error} from the file's leading comment lines (continuations of `why`
    are plain comment lines)."""
    out = {}
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            m = HEADER.match(line.rstrip("\n"))
            if m:
                out[m.group(1)] = m.group(2).strip()
    return out


def invalid(served, directory):
    print(f"== {directory}: every policy is refused, for the reason it states")
    for path in yaml_files(directory):
        want = header(path)
        missing = [k for k in ("why", "path", "error") if not want.get(k)]
        if missing:
            fail(f"{path}: header lacks {', '.join('# ' + k + ':' for k in missing)}")
            continue
        docs = documents(path)
        if docs is None:
            continue
        if len(docs) != 1:
            fail(f"{path}: {len(docs)} documents; one invalid policy per file")
            continue
        found = errors(served, docs[0])
        if not found:
            fail(f"{path}: validated although {want['why']}")
        elif any(p == want["path"] and want["error"] in m for p, m in found):
            ok(f"{path}: refused at {want['path']}: {want['error']}")
        else:
            fail(f"{path}: refused, but not at {want['path']} with {want['error']!r}: "
                 + "; ".join(f"{p}: {m}" for p, m in found))


def main():
    args = sys.argv[1:]
    upstream = []
    while len(args) > 3 and args[-3] == "--upstream":
        upstream.insert(0, (args[-2], args[-1]))
        args = args[:-3]
    if len(args) != 3:
        print(__doc__.split("\n\n")[1])
        sys.exit(2)
    chart, examples_dir, invalid_dir = args
    served = load_crds(chart)
    if served:
        examples(served, examples_dir)
        invalid(served, invalid_dir)
    for crd_file, directory in upstream:
        print(f"== upstream CRD {crd_file}")
        if not os.path.isfile(crd_file):
            fail(f"{crd_file}: no such file")
            continue
        theirs = crd_validators(crd_file, upstream=True)
        if not theirs:
            fail(f"{crd_file}: no CRD schema loaded")
            continue
        examples(theirs, directory)
    if failures:
        print(f"CRD checks: {len(failures)} failure(s)")
        sys.exit(1)


if __name__ == "__main__":
    main()
