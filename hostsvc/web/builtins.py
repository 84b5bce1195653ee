"""The `web.tools` toolbox with every built-in tool registered at its hook point."""
from __future__ import annotations

from . import encoding, httptools, jsontools
from . import sessions, static
from .tools import HandlerTool
from .tools import Tool, Toolbox

tools = Toolbox("tools")

# Priorities follow CherryPy's where it has them: lower runs earlier at the same point.
tools.proxy = Tool("before_request_body", httptools.proxy, priority=30)
tools.basic_auth = Tool("before_handler", httptools.basic_auth, priority=1)
tools.allow = Tool("on_start_resource", httptools.allow)
tools.trailing_slash = Tool("before_handler", httptools.trailing_slash, priority=60)
tools.json_in = Tool("before_request_body", jsontools.json_in, priority=30)
tools.json_out = Tool("before_handler", jsontools.json_out, priority=30)
tools.response_headers = Tool("on_start_resource", httptools.response_headers)
tools.expires = Tool("before_finalize", httptools.expires)
tools.encode = Tool("before_finalize", encoding.encode, priority=70)
tools.gzip = Tool("before_finalize", encoding.gzip, priority=80)
tools.sessions = sessions.SessionTool()
tools.staticdir = HandlerTool(static.staticdir)
tools.staticfile = HandlerTool(static.staticfile)
