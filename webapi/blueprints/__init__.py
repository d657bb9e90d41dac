"""One blueprint per resource, grouped into the gateway's route table."""

from sanic import Blueprint

from webapi.blueprints.admin import bp as admin_bp
from webapi.blueprints.auth import bp as auth_bp
from webapi.blueprints.channels import bp as channels_bp
from webapi.blueprints.health import bp as health_bp
from webapi.blueprints.heartbeat import bp as heartbeat_bp
from webapi.blueprints.proxy import bp as proxy_bp
from webapi.blueprints.rpc import bp as rpc_bp

api = Blueprint.group(health_bp, heartbeat_bp, channels_bp, auth_bp, admin_bp, rpc_bp, proxy_bp)

__all__ = ["api"]
