"""nginx ``proxy_pass`` to the upstream: the reference patgate is compared with.

One worker process (patgate serves from one process too), keep-alive connections to the
upstream (``keepalive 64``, HTTP/1.1, no ``Connection`` header passed on), no access log.
``keepalive_requests`` is raised on both sides so that neither nginx nor its clients
reconnect every 1,000 requests (nginx's default) - patgate and the upstream never do.
"""

from __future__ import annotations

from pathlib import Path

from bench.processes import Service, wait_for_port

CONFIG = """\
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def start(nginx: str, root: Path, *, port: int, upstream_port: int, pin: list[str]) -> Service:
    root.mkdir(parents=True, exist_ok=True)
    config = root / "nginx.conf"
    config.write_text(CONFIG.format(root=root, port=port, upstream_port=upstream_port))
    command = [*pin, nginx, "-p", str(root), "-c", str(config), "-g", "daemon off;"]
    service = Service("nginx", command, root / "stderr.log")
    wait_for_port(port, service)
    return service
