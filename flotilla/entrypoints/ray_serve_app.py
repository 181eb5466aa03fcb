"""flotilla's Ray Serve application for Serve config files: KubeRay's ``serveConfigV2``, ``serve run
config.yaml``, ``serve deploy``. Import path ``flotilla.entrypoints.ray_serve_app:build_app``; ``args``::

    deployment: {models: [...], routes: {...}, ...}   # the deployment document (a deployment file's YAML)
    # or config: /etc/flotilla/deploy.yaml            # a deployment file readable where Serve builds the app
    shutdown_timeout: 30                              # the ingress' drain limit (flotilla serve --shutdown-timeout)
    max_queued_requests: 1024                         # per model, past it: 429 (--max-queued-requests)

The application is the one ``flotilla serve --config FILE --ray`` deploys (``build_openai_ray_app``): a
``ModelServer`` deployment per model behind the OpenAI ingress, the file's replicas, autoscaling, routes,
routing and API key (read from the variable ``api_key_env`` names, where Serve builds the app). Unknown
``args`` keys, or both or neither of ``deployment`` and ``config``, are errors (Ray validates ``AppArgs``
before calling the builder).
"""

import dataclasses
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flotilla.deploy.config import load_deployment_config, parse_deployment_config
from flotilla.entrypoints.openai.cli_args import ServerConfig
from flotilla.entrypoints.openai.ray_ingress import build_openai_ray_app, server_config_for

IMPORT_PATH = "flotilla.entrypoints.ray_serve_app:build_app"


class AppArgs(BaseModel):
    """The builder's ``args`` (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    deployment: Optional[dict[str, Any]] = None
    config: Optional[str] = None
    shutdown_timeout: float = Field(default=ServerConfig.shutdown_timeout, ge=0)
    max_queued_requests: int = Field(default=ServerConfig.max_queued_requests, ge=0)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.deployment is None) == (self.config is None):
            raise ValueError("give the deployment either inline (deployment:) or as a file (config:), not both")
        return self

    def deployment_config(self):
        """The validated ``DeploymentConfig`` (``DeploymentConfigError`` naming the key otherwise)."""
        if self.config is not None:
            return load_deployment_config(self.config)
        return parse_deployment_config(self.deployment, "serve config args.deployment")


# No ``from __future__ import annotations`` here: Ray validates ``args`` into the annotated pydantic model.
def build_app(args: AppArgs):
    """The Serve application for ``args`` (an ``AppArgs``, or its dict)."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    config = args.deployment_config()
    base = dataclasses.replace(ServerConfig(), shutdown_timeout=args.shutdown_timeout,
                               max_queued_requests=args.max_queued_requests)
    return build_openai_ray_app(config, server_config=server_config_for(config, None, base=base))
