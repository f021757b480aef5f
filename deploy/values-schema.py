"""Write helm/sink/values.schema.json; `--check` fails when the file is out of date.

The `config` part mirrors sink/config.py (sections, keys, types), so a typo in a worker
setting fails at `helm install` instead of crash-looping the pod. Run it after changing the
configuration model:  PYTHONPATH=. python deploy/values-schema.py
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from sink.config import Config

TARGET = Path(__file__).resolve().parent.parent / "helm" / "sink" / "values.schema.json"


def _field(field: FieldInfo, any_case: bool = False) -> dict[str, Any]:
    annotation = field.annotation
    parsed = any(type(m).__name__ == "BeforeValidator" for m in field.metadata)
    nullable = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        nullable = type(None) in args
        annotation = next(a for a in args if a is not type(None))
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    schema: dict[str, Any]
    if parsed and annotation is float:
        schema = {"type": ["number", "string"], "description": "seconds, or 500ms, 30s, 5m, 32d"}
    elif parsed and annotation is int:
        schema = {"type": ["integer", "string"], "description": "bytes, or 64KiB, 16MiB"}
    elif origin is typing.Literal:
        # A field with a "before" validator (such as Meter.aggregation) also takes lower case.
        schema = {"enum": list(args) + ([a.lower() for a in args] if any_case else [])}
    elif annotation is bool:
        schema = {"type": "boolean"}
    elif annotation is int:
        schema = {"type": "integer"}
    elif annotation is float:
        schema = {"type": "number"}
    elif annotation in (str, SecretStr):
        schema = {"type": "string"}
    elif origin is tuple and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        schema = {"type": "array", "items": _model(args[0])}
    elif origin is tuple:
        schema = {"type": "array", "items": {"type": "string"}}
    elif origin is dict:
        values = typing.get_args(args[1]) or (args[1],)
        names = {str: "string", int: "integer", float: "number"}
        kinds = [names[v] for v in values]
        schema = {
            "type": "object",
            "additionalProperties": {"type": kinds[0] if len(kinds) == 1 else kinds},
        }
    else:
        raise SystemExit(f"values-schema.py: no JSON type for {field.annotation}")
    if nullable:
        if "enum" in schema:
            schema["enum"].append(None)
        else:
            kinds = schema["type"]
            schema["type"] = [*(kinds if isinstance(kinds, list) else [kinds]), "null"]
    return schema


def _model(model: type[BaseModel]) -> dict[str, Any]:
    required = [name for name, field in model.model_fields.items() if field.is_required()]
    before = {
        name
        for validator in model.__pydantic_decorators__.field_validators.values()
        if validator.info.mode == "before"
        for name in validator.info.fields
    }
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            name: _field(field, any_case=name in before)
            for name, field in model.model_fields.items()
        },
    }
    if required:
        schema["required"] = required
    return schema


def config_schema() -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for name, field in Config.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            section = _model(annotation)
            section["type"] = ["object", "null"]
            properties[name] = section
        else:
            properties[name] = _field(field)
    return {
        "type": "object",
        "additionalProperties": False,
        "description": "sink.yaml: the model of sink/config.py",
        "properties": properties,
    }


def _strict(
    properties: dict[str, Any], required: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }
    if required:
        schema["required"] = required
    schema.update(extra)
    return schema


STRING = {"type": "string"}
BOOL = {"type": "boolean"}
OBJECT = {"type": "object"}
ARRAY = {"type": "array"}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
PROM_DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}
PROBE = _strict(
    {
        "initialDelaySeconds": {"type": "integer", "minimum": 0},
        "periodSeconds": {"type": "integer", "minimum": 1},
        "timeoutSeconds": {"type": "integer", "minimum": 1},
        "failureThreshold": {"type": "integer", "minimum": 1},
        "successThreshold": {"type": "integer", "minimum": 1},
    }
)


def values_schema() -> dict[str, Any]:
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Values of the sink chart (generated by deploy/values-schema.py)",
        **_strict(
            {
                "global": OBJECT,
                "image": _strict(
                    {
                        "repository": {"type": "string", "minLength": 1},
                        "tag": STRING,
                        "digest": {"type": "string", "pattern": "^(|sha256:[0-9a-f]{64})$"},
                        "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                    },
                    ["repository"],
                ),
                "imagePullSecrets": {"type": "array", "items": _strict({"name": STRING}, ["name"])},
                "nameOverride": STRING,
                "fullnameOverride": STRING,
                "replicaCount": {"type": "integer", "minimum": 0},
                "workers": {"type": "integer", "minimum": 1, "description": "sink run --workers"},
                "config": config_schema(),
                "secrets": _strict(
                    {
                        "existingSecret": STRING,
                        "keys": _strict(
                            {
                                "clickhouseUrl": {"type": "string", "minLength": 1},
                                "redisUrl": {"type": "string", "minLength": 1},
                                "kafkaSaslPassword": {"type": "string", "minLength": 1},
                                "redisPassword": {"type": "string", "minLength": 1},
                                "redisSentinelPassword": {"type": "string", "minLength": 1},
                            },
                            [
                                "clickhouseUrl",
                                "redisUrl",
                                "kafkaSaslPassword",
                                "redisPassword",
                                "redisSentinelPassword",
                            ],
                        ),
                        "clickhouseUrl": {"type": "string", "pattern": "^(|clickhouses?://.+)$"},
                        "redisUrl": {"type": "string", "pattern": "^(|rediss?://.+|unix://.+)$"},
                        "kafkaSaslPassword": STRING,
                        "redisPassword": STRING,
                        "redisSentinelPassword": STRING,
                    }
                ),
                "terminationGracePeriodSeconds": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "must exceed config.worker.drain_timeout",
                },
                "resources": _strict({"requests": OBJECT, "limits": OBJECT, "claims": ARRAY}),
                "livenessProbe": PROBE,
                "readinessProbe": PROBE,
                "serviceAccount": _strict({"create": BOOL, "name": STRING, "annotations": LABELS}),
                "podAnnotations": LABELS,
                "podLabels": LABELS,
                "podSecurityContext": OBJECT,
                "securityContext": OBJECT,
                "extraEnv": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                "extraVolumes": {
                    "type": "array",
                    "items": {"type": "object", "required": ["name"]},
                },
                "extraVolumeMounts": {
                    "type": "array",
                    "items": {"type": "object", "required": ["name", "mountPath"]},
                },
                "priorityClassName": STRING,
                "nodeSelector": LABELS,
                "tolerations": ARRAY,
                "affinity": OBJECT,
                "topologySpreadConstraints": ARRAY,
                "service": _strict(
                    {
                        "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                        "annotations": LABELS,
                    }
                ),
                "serviceMonitor": _strict(
                    {
                        "enabled": BOOL,
                        "labels": LABELS,
                        "interval": PROM_DURATION,
                        "scrapeTimeout": PROM_DURATION,
                    }
                ),
                "podDisruptionBudget": _strict(
                    {"enabled": BOOL, "maxUnavailable": {"type": ["integer", "string"]}}
                ),
                "autoscaling": _strict(
                    {
                        "enabled": BOOL,
                        "partitions": {"type": ["integer", "null"], "minimum": 1},
                        "minReplicaCount": {"type": "integer", "minimum": 0},
                        "maxReplicaCount": {"type": "integer", "minimum": 1},
                        "lagThreshold": {"type": "integer", "minimum": 1},
                        "activationLagThreshold": {"type": "integer", "minimum": 0},
                        "pollingInterval": {"type": "integer", "minimum": 1},
                        "cooldownPeriod": {"type": "integer", "minimum": 0},
                        "topic": STRING,
                        "bootstrapServers": STRING,
                        "consumerGroup": STRING,
                        "offsetResetPolicy": {"enum": ["earliest", "latest"]},
                        "authenticationRef": STRING,
                    },
                    **{
                        "if": {"properties": {"enabled": {"const": True}}, "required": ["enabled"]},
                        "then": {
                            "properties": {"partitions": {"type": "integer"}},
                            "required": ["partitions"],
                        },
                    },
                ),
                "prometheusRule": _strict(
                    {
                        "enabled": BOOL,
                        "labels": LABELS,
                        "selector": STRING,
                        "lagThreshold": {"type": "integer", "minimum": 0},
                        "deadLetterRatePerSecond": {"type": "number", "minimum": 0},
                        "readinessAlert": BOOL,
                    }
                ),
                "grafanaDashboard": _strict(
                    {"enabled": BOOL, "labels": LABELS, "annotations": LABELS, "namespace": STRING}
                ),
                "apiServer": _strict(
                    {
                        "enabled": BOOL,
                        "replicaCount": {"type": "integer", "minimum": 0},
                        "existingSecret": STRING,
                        "clickhouseUrlKey": {"type": "string", "minLength": 1},
                        "clickhouseUrl": {"type": "string", "pattern": "^(|clickhouses?://.+)$"},
                        "tokensSecret": STRING,
                        "tokensKey": {"type": "string", "minLength": 1},
                        "resources": _strict(
                            {"requests": OBJECT, "limits": OBJECT, "claims": ARRAY}
                        ),
                        "podAnnotations": LABELS,
                        "service": _strict(
                            {
                                "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                                "annotations": LABELS,
                            }
                        ),
                    }
                ),
            }
        ),
    }


def main() -> int:
    text = json.dumps(values_schema(), indent=2) + "\n"
    if sys.argv[1:] == ["--check"]:
        if TARGET.read_text() != text:
            print(f"{TARGET} is out of date with sink/config.py:")
            print("  PYTHONPATH=. python deploy/values-schema.py")
            return 1
        print(f"{TARGET.name} matches sink/config.py")
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
