"""nginx and haproxy for `bench.proxy`: the echo backend and the two proxies in front of it.

Configs copied from /work/shared/bench/peers/proxy_bench.py (`nginx_conf`,
`start_nginx_backend`, `start_nginx_proxy`, `start_haproxy`).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.harness import spawn
from bench.proxy_targets import BODY


def nginx_conf(workdir: Path, server_block: str, upstream: str = "") -> str:
    for d in ("cb", "px", "fc", "uw", "sc"):
        (workdir / d).mkdir(parents=True, exist_ok=True)
    return f"""
user root;
worker_processes 1;
daemon off;
master_process on;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 65;
  client_body_temp_path {workdir}/cb;
  proxy_temp_path {workdir}/px;
  fastcgi_temp_path {workdir}/fc;
  uwsgi_temp_path {workdir}/uw;
  scgi_temp_path {workdir}/sc;
  {upstream}
  {server_block}
}}
"""


def start_nginx(
    nginx: str, name: str, tmp: Path, server_block: str, upstream: str = ""
) -> subprocess.Popen[bytes]:
    wd = tmp / name
    wd.mkdir(parents=True, exist_ok=True)
    conf = wd / "nginx.conf"
    conf.write_text(nginx_conf(wd, server_block, upstream))
    return spawn([nginx, "-c", str(conf), "-p", f"{wd}/"], tmp / f"{name}.log")


def start_nginx_backend(nginx: str, tmp: Path, port: int) -> subprocess.Popen[bytes]:
    body = BODY.replace("'", "\\'")
    block = f"""server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{ default_type application/json; return 200 '{body}'; }}
  }}"""
    return start_nginx(nginx, "nginx-backend", tmp, block)


def start_nginx_proxy(nginx: str, tmp: Path, port: int, bport: int) -> subprocess.Popen[bytes]:
    upstream = f"""upstream peer_backend {{
    server 127.0.0.1:{bport};
    keepalive 64;
    keepalive_requests 1000000;
  }}"""
    block = f"""server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://peer_backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}"""
    return start_nginx(nginx, "nginx-proxy", tmp, block, upstream)


def start_haproxy(haproxy: str, tmp: Path, port: int, bport: int) -> subprocess.Popen[bytes]:
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(f"""global
  nbthread 1
  maxconn 8192
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  server s1 127.0.0.1:{bport}
""")
    return spawn([haproxy, "-f", str(cfg), "-db"], tmp / "haproxy.log")
