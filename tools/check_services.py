#!/usr/bin/env python3
"""Summarises service checks: {"services": [{"name", "up"}]} -> {"health", "down"}."""
import json, sys

services = json.load(sys.stdin).get("services") or []
down = [s.get("name") for s in services if not s.get("up")]
json.dump({"health": "degraded" if down else "ok", "down": down, "checked": len(services)}, sys.stdout)
